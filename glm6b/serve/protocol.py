"""What the HTTP protocols share: the OpenAI-style error, request-body parsing, and the bridge that
runs one request's choices on the scheduler and hands their events to asyncio."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request as HTTPRequest

from ..inference.scheduler import Event, QueueFullError, Request, SamplingParams, Scheduler

# How long a queue-full client is told to wait before retrying (seconds).
RETRY_AFTER = 1


class StrictModel(BaseModel):
    """A request schema: "0.5" is not a number and 1 is not a boolean; unknown fields are ignored
    (OpenAI's many optional fields this server does not use)."""

    model_config = ConfigDict(strict=True, extra="ignore")


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

    Args:
        status: HTTP status code.
        message: one line saying what was wrong and what was expected.
        param: the request field at fault (dotted, e.g. "messages.1.role"), if any.
        type: OpenAI's error type ("invalid_request_error", ...).
        code: a short machine-readable code, if any.
        headers: extra response headers (e.g. Retry-After).
    """

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


async def parse_body(request: HTTPRequest, schema: type[BaseModel]) -> BaseModel:
    """The JSON body validated against `schema`.

    Raises:
        APIError: 400 for a body that is not JSON or does not fit the schema; the message and
            `param` name the first field at fault.
    """
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate_json(raw)  # JSON mode: arrays may fill tuple fields
    except ValidationError as e:
        first = e.errors()[0]
        param = _field_path(first["loc"], data) or None
        value = first.get("input")
        got = "" if first["type"] == "missing" else f", got {json.dumps(value, ensure_ascii=False, default=str)[:80]}"
        raise APIError(400, f"{param}: {first['msg']}{got}", param=param) from None


def _field_path(loc: tuple, data) -> str:
    """The dotted path of an error's location in the request, without pydantic's union-branch tags
    (("messages", 0, "content", "str") -> "messages.0.content")."""
    parts, node = [], data
    for part in loc:
        if isinstance(node, dict):
            if part in node:
                node = node[part]
            elif part not in node and isinstance(part, str) and part == loc[-1]:
                node = None  # a missing field
            else:
                continue  # a union branch's tag
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        elif isinstance(node, list):
            continue
        else:
            break
        parts.append(str(part))
    return ".".join(parts)


class Generation:
    """One HTTP request's choices running on the scheduler; iterate it for (choice index, Event).

    Submitting is all-or-nothing: if the queue fills up halfway, the choices already queued are
    cancelled and 429 is raised. Leaving the iteration early (client gone) cancels what still runs.

    Args:
        scheduler: the running scheduler.
        prompts: token ids of each choice's prompt.
        params: sampling settings of each choice.
        chat: clean the text up as chat() does.
    """

    def __init__(self, scheduler: Scheduler, prompts: list[list[int]], params: list[SamplingParams], chat: bool):
        self.scheduler = scheduler
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.requests = [Request(ids, p, self._callback(i), chat=chat) for i, (ids, p) in enumerate(zip(prompts, params))]
        self.running = set(range(len(self.requests)))
        for i, request in enumerate(self.requests):
            try:
                scheduler.submit(request)
            except QueueFullError as e:
                self.cancel()
                raise APIError(429, f"the server is busy: {e}; retry after {RETRY_AFTER} s", type="rate_limit_error",
                               code="queue_full", headers={"Retry-After": str(RETRY_AFTER)}) from None
            except ValueError as e:
                self.cancel()
                raise APIError(400, str(e)) from None

    def _callback(self, index: int):
        def on_event(event: Event) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:  # the event loop has closed (server shutting down)
                pass
        return on_event

    def cancel(self) -> None:
        """Free the rows of the choices still running."""
        for i in list(self.running):
            self.scheduler.cancel(self.requests[i])
        self.running.clear()

    async def events(self, http_request: HTTPRequest | None = None) -> AsyncIterator[tuple[int, Event]]:
        """Events of all choices until every one has finished; cancels the rest if left early.

        Args:
            http_request: when given, checked every second; a disconnected client ends the iteration.
        """
        checked = time.monotonic()
        try:
            while self.running:
                if http_request is not None and time.monotonic() - checked >= 1.0:
                    if await http_request.is_disconnected():
                        return
                    checked = time.monotonic()
                try:
                    index, event = await asyncio.wait_for(self.queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    continue
                if self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                if event.finish_reason is not None:
                    self.running.discard(index)
                yield index, event
        finally:
            self.cancel()
