"""The HTTP server: a FastAPI app over one continuous-batching scheduler, and `serve` which loads a model and runs it.

Routes:
    GET  /                      the web chat page (static/index.html)
    POST /                      THUDM's api.py protocol (thudm.py)
    GET  /v1/models             OpenAI model list (openai.py)
    POST /v1/chat/completions   OpenAI chat completions, streamed or not
    POST /v1/completions        OpenAI text completions, streamed or not
    GET  /health                200 when the model is loaded and the scheduler runs, else 503
    GET  /metrics               Prometheus text format (metrics.py)

With an API key, POST / and /v1/* need `Authorization: Bearer KEY` (the page asks for it); the
page, /health and /metrics stay open.
"""

from __future__ import annotations

import hmac
import logging
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest

from ..api import load
from ..config import LoadConfig
from ..inference.engine import lookup_tokens
from ..inference.lookup import DEFAULT_MAX_NGRAM
from ..inference.scheduler import Scheduler
from . import openai, thudm
from .metrics import CONTENT_TYPE, Metrics
from .protocol import APIError

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("static") / "index.html"
# The page's script and style are inline; nothing else may load, and it talks to this server only.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
               "img-src 'self' data:; base-uri 'none'; form-action 'none'")


class Server:
    """What the routes need: the model's tokenizer, the scheduler, limits, metrics and the API key.

    Args:
        model: a ChatGLMForConditionalGeneration in eval mode.
        tokenizer: its ChatGLMTokenizer.
        model_name: the id /v1/models reports.
        api_key: required as a Bearer token on the API routes when set.
        max_batch: rows decoded together.
        max_queue: requests waiting for a row before 429.
        max_tokens: most tokens one request may generate (default: the context length).
        compile: the decode step's compilation (True, False or "auto"; see glm6b.inference.engine).
        prompt_lookup, prompt_lookup_max_ngram, prompt_lookup_corpus: prompt-lookup decoding for every request
            (see Scheduler).
    """

    def __init__(self, model, tokenizer, model_name: str = "glm6b", api_key: str | None = None, max_batch: int = 8,
                 max_queue: int = 64, max_tokens: int | None = None, compile: bool | str = "auto",
                 prompt_lookup: int | str | None = None, prompt_lookup_max_ngram: int = DEFAULT_MAX_NGRAM,
                 prompt_lookup_corpus: str | None = None):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.api_key = api_key or None
        self.scheduler = Scheduler(model, tokenizer, max_batch=max_batch, max_queue=max_queue, compile=compile,
                                   prompt_lookup=prompt_lookup, prompt_lookup_max_ngram=prompt_lookup_max_ngram,
                                   prompt_lookup_corpus=prompt_lookup_corpus)
        self.context_length = self.scheduler.context_length
        self.max_tokens = min(max_tokens or self.context_length, self.context_length)
        if self.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {max_tokens}")
        self.metrics = Metrics(self.scheduler)
        self.created = int(time.time())

    def check_key(self, request: HTTPRequest) -> None:
        """Raise 401 unless the request carries the API key (when one is set)."""
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "wrong API key", code="invalid_api_key")


class _CountRequests:
    """ASGI middleware counting answered requests by route and status (streaming-safe, unlike
    BaseHTTPMiddleware)."""

    ENDPOINTS = {"/", "/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics"}

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.ENDPOINTS else "other"
        endpoint = f"{scope['method']} {path}"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(server: Server) -> FastAPI:
    """The FastAPI app for a Server; its lifespan starts and stops the scheduler.

    Args:
        server: the model, scheduler and settings.

    Returns:
        The app (run it with uvicorn, or use it with a test client).
    """
    page = PAGE.read_bytes()

    @asynccontextmanager
    async def lifespan(app):
        server.scheduler.start()
        try:
            yield
        finally:
            server.scheduler.shutdown()

    app = FastAPI(title="glm6b", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_CountRequests, metrics=server.metrics)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        error = APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                         type="invalid_request_error" if e.status_code < 500 else "server_error")
        return JSONResponse(error.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        error = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"})

    @app.post("/")
    async def thudm_api(request: HTTPRequest):
        server.check_key(request)
        return await thudm.thudm_chat(request, server)

    @app.get("/health")
    async def health():
        if server.scheduler.running:
            return {"status": "ok", "model": server.model_name}
        return JSONResponse({"status": "unavailable", "model": server.model_name}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        server.check_key(request)
        return openai.list_models(server)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        server.check_key(request)
        return await openai.chat_completions(request, server)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        server.check_key(request)
        return await openai.completions(request, server)

    return app


def serve(model: LoadConfig, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, max_queue: int = 64, max_tokens: int | None = None,
          prompt_lookup: int | str | None = None, prompt_lookup_max_ngram: int = DEFAULT_MAX_NGRAM,
          prompt_lookup_corpus: str | None = None) -> None:
    """Load a model (glm6b.api.load: a LoRA adapter merged in, quantized after the merge) and serve it until
    interrupted (what `glm6b serve` runs).

    Args:
        model: what to load.
        host, port: where to listen (127.0.0.1 by default: only this machine can connect).
        api_key: required as a Bearer token on the API routes when set.
        max_batch, max_queue, max_tokens, prompt_lookup, prompt_lookup_max_ngram, prompt_lookup_corpus: see Server.
    """
    import uvicorn

    loaded, tokenizer, name = load(model)
    server = Server(loaded, tokenizer, model_name=name, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                    max_tokens=max_tokens, compile=model.compile, prompt_lookup=prompt_lookup,
                    prompt_lookup_max_ngram=prompt_lookup_max_ngram, prompt_lookup_corpus=prompt_lookup_corpus)
    compiling = ", compiling the decode step" if server.scheduler.engine.compiled else ""
    lookup = lookup_tokens(prompt_lookup, loaded, 1)
    corpus = server.scheduler.corpus
    lookup = (f", prompt lookup of up to {lookup} tokens" + (f" (and from {prompt_lookup_corpus}: {corpus})"
                                                               if corpus else "")) if lookup else ", no prompt lookup"
    print(f"glm6b serve: warming up {name} ({max_batch} rows of {server.context_length} tokens{compiling}{lookup})",
          file=sys.stderr, flush=True)
    server.scheduler.warm_up()
    uvicorn.run(create_app(server), host=host, port=port, log_level="info")
