"""The OpenAI API (spec formats.md §4): /v1/models, /v1/chat/completions, /v1/completions, with SSE streaming.

Messages become ChatGLM-6B's `[Round i]` prompt (glm6b.inference.chat.build_prompt): each assistant
message closes a round with the user messages before it (several user messages in a row are joined
with a newline), the last message must be the user's, and system (or developer) messages, which
ChatGLM-6B has no slot for, are joined and put before the first user message, separated by a
newline. `temperature: 0` means greedy decoding; absent sampling settings take ChatGLM-6B's chat
defaults (temperature 0.95, top_p 0.7; top-k 50 as in its generate).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import Field
from sse_starlette import EventSourceResponse
from starlette.requests import Request as HTTPRequest

from ..inference.chat import build_prompt
from ..inference.scheduler import SamplingParams
from .protocol import APIError, Generation, StrictModel, parse_body

# ChatGLM-6B's chat defaults (spec §5.3), used when a request leaves them out.
DEFAULT_TEMPERATURE = 0.95
DEFAULT_TOP_P = 0.7
MAX_CHOICES = 16
MAX_STOP_STRINGS = 4


# ----------------------------------------------------------------------------------- request schemas


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class Message(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(StrictModel):
    include_usage: bool = False


class _Sampling(StrictModel):
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(None, ge=-2**63, lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False


# ----------------------------------------------------------------------------------- conversion


def messages_to_chat(messages: list[Message]) -> tuple[str, list[tuple[str, str]]]:
    """(query, history) for ChatGLM-6B's chat prompt from OpenAI messages (rules in the module docstring).

    Raises:
        APIError: 400 when the last message is not the user's.
    """
    if messages[-1].role != "user":
        raise APIError(400, f"messages: the last message must have role 'user' (the model answers it), got "
                            f"'{messages[-1].role}'", param=f"messages.{len(messages) - 1}.role")
    system, history, pending = [], [], []
    for message in messages:
        if message.role in ("system", "developer"):
            system.append(message.text())
        elif message.role == "user":
            pending.append(message.text())
        else:
            history.append(("\n".join(pending), message.text()))
            pending = []
    query = "\n".join(pending)
    if system:
        prefix = "\n".join(system)
        if history:
            history[0] = (f"{prefix}\n{history[0][0]}", history[0][1])
        else:
            query = f"{prefix}\n{query}"
    return query, history


def sampling_params(body: _Sampling, max_tokens: int | None, prompt_tokens: int, server) -> list[SamplingParams]:
    """One SamplingParams per choice; choice i > 0 of a seeded request gets its own derived seed.

    Raises:
        APIError: 400 for a prompt that leaves no room to answer, more than 4 stop strings, logprobs.
    """
    if body.logprobs:
        raise APIError(400, "logprobs: not supported by this server", param="logprobs")
    room = server.context_length - prompt_tokens
    if room < 1:
        field = "messages" if hasattr(body, "messages") else "prompt"
        raise APIError(400, f"{field}: the prompt has {prompt_tokens} tokens, which leaves no room for an answer "
                            f"within the context length {server.context_length}", param=field,
                       code="context_length_exceeded")
    # max_tokens is an upper bound: the answer also stops at the server's --max-tokens and at the end
    # of the context (finish_reason "length"), as a chat with max_length does.
    limit = min(room, server.max_tokens, max_tokens or room)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop")
    temperature = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    top_p = DEFAULT_TOP_P if body.top_p is None else body.top_p
    greedy = temperature == 0
    params = []
    for i in range(body.n):
        seed = None if body.seed is None else (body.seed if i == 0 else hash((body.seed, i)) & (2**63 - 1))
        params.append(SamplingParams(max_new_tokens=limit, do_sample=not greedy,
                                     temperature=1.0 if greedy else temperature, top_p=top_p, seed=seed, stop=stop))
    return params


# ----------------------------------------------------------------------------------- endpoints


def list_models(server) -> dict:
    """GET /v1/models."""
    return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                        "owned_by": "glm6b"}]}


async def chat_completions(http_request: HTTPRequest, server):
    """POST /v1/chat/completions."""
    body = await parse_body(http_request, ChatCompletionRequest)
    query, history = messages_to_chat(body.messages)
    prompt_ids = server.tokenizer.encode(build_prompt(query, history))
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = sampling_params(body, max_tokens, len(prompt_ids), server)
    return await _respond(http_request, server, body, [prompt_ids] * body.n, params, chat=True)


async def completions(http_request: HTTPRequest, server):
    """POST /v1/completions (the prompt goes to the model as it is, no chat template)."""
    body = await parse_body(http_request, CompletionRequest)
    if body.echo:
        raise APIError(400, "echo: not supported by this server", param="echo")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise APIError(400, "prompt: give a string or a non-empty list of strings", param="prompt")
    prompt_ids, params = [], []
    for text in prompts:
        ids = server.tokenizer.encode(text)
        prompt_ids += [ids] * body.n
        params += sampling_params(body, body.max_tokens, len(ids), server)
    return await _respond(http_request, server, body, prompt_ids, params, chat=False)


async def _respond(http_request, server, body, prompt_ids, params, chat: bool):
    kind = "chat.completion" if chat else "text_completion"
    generation = Generation(server.scheduler, prompt_ids, params, chat)
    prompt_tokens = sum(len(ids) for ids in prompt_ids[::body.n])
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": server.model_name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(_stream(server, generation, head, kind, chat, include_usage, len(params),
                                           prompt_tokens), ping=15)
    texts, reasons = [""] * len(params), [None] * len(params)
    usage = _Usage(prompt_tokens)
    async for index, event in generation.events(http_request):
        usage.add(index, event)
        if event.finish_reason is not None:
            texts[index], reasons[index] = event.full_text or "", event.finish_reason
            if event.finish_reason == "error":
                server.metrics.observe(generation, usage.completion)
                raise APIError(500, f"generation failed: {event.error}", type="server_error")
    server.metrics.observe(generation, usage.completion)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    return {**head, "object": kind, "choices": choices, "usage": usage.body()}


async def _stream(server, generation: Generation, head: dict, kind: str, chat: bool, include_usage: bool, n: int,
                  prompt_tokens: int):
    """SSE data lines: a role chunk per choice (chat), a chunk per text piece, a finish chunk per
    choice, the usage chunk if asked, then [DONE]."""
    usage = _Usage(prompt_tokens)
    chunk_kind = f"{kind}.chunk" if chat else kind
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str | None, finish_reason: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return json.dumps({**head, "object": chunk_kind, "choices": [choice], **extra}, ensure_ascii=False)

    if chat:
        for i in range(n):
            yield {"data": chunk(i, None, None, role=True)}
    async for index, event in generation.events():
        usage.add(index, event)
        if event.finish_reason == "error":
            server.metrics.observe(generation, usage.completion)
            error = APIError(500, f"generation failed: {event.error}", type="server_error")
            yield {"data": json.dumps(error.body())}
            return
        if event.text:
            yield {"data": chunk(index, event.text, None)}
        if event.finish_reason is not None:
            yield {"data": chunk(index, None, event.finish_reason)}
    server.metrics.observe(generation, usage.completion)
    if include_usage:
        yield {"data": json.dumps({**head, "object": chunk_kind, "choices": [], "usage": usage.body()})}
    yield {"data": "[DONE]"}


class _Usage:
    """Token counts of one request: each distinct prompt counted once (as OpenAI does with n > 1),
    the completions of all choices summed."""

    def __init__(self, prompt_tokens: int):
        self.prompt = prompt_tokens
        self.by_choice: dict[int, int] = {}

    @property
    def completion(self) -> int:
        return sum(self.by_choice.values())

    def add(self, index: int, event) -> None:
        self.by_choice[index] = event.completion_tokens

    def body(self) -> dict:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion}
