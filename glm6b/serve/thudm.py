"""THUDM's `api.py` protocol (spec formats.md §3): POST / with prompt and history, answered like model.chat.

Request: `{"prompt": str, "history": [[query, response], ...], "max_length": int, "top_p": float,
"temperature": float}`; absent fields take THUDM's defaults (max_length 2048, top_p 0.7, temperature
0.95, history []). Answer: `{"response", "history": history + [[prompt, response]], "status": 200,
"time": "YYYY-MM-DD HH:MM:SS"}`. As in chat, max_length bounds prompt + answer; it is capped at the
model's context length, and the answer at the server's --max-tokens. Beyond THUDM's server:
requests run concurrently in the shared batch, `temperature: 0` means greedy, and bad input gets a
400 with an error body instead of a crash.
"""

from __future__ import annotations

import datetime

from pydantic import Field
from starlette.requests import Request as HTTPRequest

from ..inference.chat import build_prompt
from ..inference.scheduler import SamplingParams
from .protocol import APIError, Generation, StrictModel, parse_body


class ThudmRequest(StrictModel):
    prompt: str
    history: list[tuple[str, str]] = Field(default_factory=list)
    max_length: int = Field(2048, ge=1)
    top_p: float = Field(0.7, gt=0, le=1)
    temperature: float = Field(0.95, ge=0)


async def thudm_chat(http_request: HTTPRequest, server) -> dict:
    """POST / (THUDM api.py)."""
    body = await parse_body(http_request, ThudmRequest)
    history = [tuple(pair) for pair in body.history]
    prompt_ids = server.tokenizer.encode(build_prompt(body.prompt, history))
    room = min(body.max_length, server.context_length) - len(prompt_ids)
    if room < 1:
        raise APIError(400, f"max_length: the chat prompt has {len(prompt_ids)} tokens ({len(history)} earlier "
                            f"rounds), which leaves no room for an answer within max_length={body.max_length} (the "
                            f"model's context length is {server.context_length})", param="max_length",
                       code="context_length_exceeded")
    greedy = body.temperature == 0
    params = SamplingParams(max_new_tokens=min(room, server.max_tokens), do_sample=not greedy,
                            temperature=1.0 if greedy else body.temperature, top_p=body.top_p)
    generation = Generation(server.scheduler, [prompt_ids], [params], chat=True)
    response, tokens = "", 0
    async for _, event in generation.events(http_request):
        tokens = event.completion_tokens
        if event.finish_reason == "error":
            server.metrics.observe(generation, tokens)
            raise APIError(500, f"generation failed: {event.error}", type="server_error")
        if event.finish_reason is not None:
            response = event.full_text or ""
    server.metrics.observe(generation, tokens)
    return {"response": response, "history": [list(pair) for pair in history] + [[body.prompt, response]],
            "status": 200, "time": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")}
