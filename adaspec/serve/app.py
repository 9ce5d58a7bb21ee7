"""The ASGI application (Starlette): OpenAI routes, health and Prometheus metrics.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` answers
Server-Sent Events ``data: {chunk}`` ... ``data: [DONE]``), ``GET /v1/models``,
``GET /health``, ``GET /metrics``. Errors use OpenAI's ``{"error": {...}}`` body.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..api import SpeculativeGenerator
from ..errors import InvalidArgumentError
from .batch import PREFILL_CHUNK
from .metrics import CONTENT_TYPE, Metrics
from .protocol import ApiError, ResponseShape, error_body, parse_request
from .scheduler import Event, Failure, Final, Job, Scheduler, Text

DISCONNECT_POLL_S = 0.2  # how often a waiting non-streamed request checks for a gone client
MAX_BODY_BYTES = 1 << 20  # default request body limit (413 beyond)


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def _error(exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)


async def _next_event(job: Job, request: Request) -> Event | None:
    """The job's next event, or None once the client has disconnected (the job is cancelled)."""
    getter = asyncio.ensure_future(job.events.get())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if done:
                return getter.result()
            if await request.is_disconnected():
                job.cancel()
                return None
    finally:
        getter.cancel()


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or ApiError 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {declared} bytes; the limit is {limit}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body exceeds the limit of {limit} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


class Server:
    """Holds the scheduler and metrics; its methods are the route handlers."""

    def __init__(self, generator: SpeculativeGenerator, model_name: str, max_queue: int,
                 runtime: str, max_batch: int = 8, max_body: int = MAX_BODY_BYTES,
                 batch_budget: bool = True, prefill_chunk: int = PREFILL_CHUNK,
                 engine_thread: bool = True) -> None:
        if generator.tokenizer is None:
            raise InvalidArgumentError(f"target {generator.target.name!r} has no tokenizer: nothing to serve")
        if max_body < 1:
            raise InvalidArgumentError(f"max_body must be >= 1 byte, got {max_body}")
        self.model_name = model_name
        self.max_body = max_body
        self.metrics = Metrics()
        self.scheduler = Scheduler(generator, self.metrics, max_queue=max_queue, max_batch=max_batch,
                                   runtime=runtime, batch_budget=batch_budget, prefill_chunk=prefill_chunk,
                                   engine_thread=engine_thread)
        self.metrics.gauges = self.scheduler.gauges
        self.started = int(time.time())

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion", "/v1/completions")

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat", "/v1/chat/completions")

    async def _generate(self, request: Request, kind: str, endpoint: str) -> Response:
        t0 = time.perf_counter()
        try:
            raw = await _read_body(request, self.max_body)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ApiError(400, "the request body is not valid JSON") from None
            req = parse_request(body, kind)
            if req.model is not None and req.model != self.model_name:
                raise ApiError(404, f"The model `{req.model}` does not exist; this server serves "
                                    f"`{self.model_name}`.", param="model", code="model_not_found")
            job = self.scheduler.submit(req)
        except ApiError as exc:
            self.metrics.request_done(endpoint, str(exc.status))
            return _error(exc)
        first = await _next_event(job, request)
        shape = ResponseShape(kind, self.model_name)
        if first is None:
            self.metrics.request_done(endpoint, "cancelled")
            return Response(status_code=499)
        if isinstance(first, Failure):  # nothing sent yet: a plain error response
            self.metrics.request_done(endpoint, str(first.error.status), time.perf_counter() - t0)
            return _error(first.error)
        if isinstance(first, Text):
            self.metrics.ttft.observe(time.perf_counter() - t0)
        if req.stream:
            return StreamingResponse(self._stream(job, first, shape, endpoint, t0),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        parts, event = [], first
        while isinstance(event, Text):
            parts.append(event.text)
            event = await _next_event(job, request)
        if event is None:
            self.metrics.request_done(endpoint, "cancelled")
            return Response(status_code=499)
        if isinstance(event, Failure):
            self.metrics.request_done(endpoint, str(event.error.status), time.perf_counter() - t0)
            return _error(event.error)
        self.metrics.request_done(endpoint, "ok", time.perf_counter() - t0)
        return JSONResponse(shape.full("".join(parts), event.finish_reason, event.usage, event.stats))

    async def _stream(self, job: Job, event: Event, shape: ResponseShape, endpoint: str,
                      t0: float) -> AsyncIterator[str]:
        """SSE body; a disconnect cancels this iterator, which cancels the job at its next round."""
        status = "cancelled"
        try:
            if shape.kind == "chat":
                yield _sse(shape.chunk(role=True))
            while True:
                if isinstance(event, Text):
                    yield _sse(shape.chunk(event.text))
                elif isinstance(event, Final):
                    yield _sse({**shape.chunk(finish=event.finish_reason), "usage": event.usage,
                                "adaspec": event.stats})
                    if job.request.include_usage:
                        yield _sse(shape.usage_chunk(event.usage))
                    yield _sse("[DONE]")
                    status = "ok"
                    return
                else:  # a failure after the stream started: an error event, then the end
                    yield _sse(event.error.to_dict())
                    yield _sse("[DONE]")
                    status = str(event.error.status)
                    return
                event = await job.events.get()
        finally:
            if status == "cancelled":
                job.cancel()
            self.metrics.request_done(endpoint, status, time.perf_counter() - t0)

    async def models(self, request: Request) -> Response:
        card = {"id": self.model_name, "object": "model", "created": self.started, "owned_by": "adaspec"}
        return JSONResponse({"object": "list", "data": [card]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name != self.model_name:
            return _error(ApiError(404, f"The model `{name}` does not exist.", param="model",
                                   code="model_not_found"))
        return JSONResponse({"id": name, "object": "model", "created": self.started, "owned_by": "adaspec"})

    async def health(self, request: Request) -> Response:
        s = self.scheduler
        return JSONResponse({"status": "ok", "model": self.model_name, "policy": s.policy_name(None),
                             "running": s.running, "max_batch": s.batch.max_batch, "queue_depth": s.waiting,
                             "max_queue": s.max_queue})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", kind),
                        status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception) -> Response:
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)


class ApiKeyMiddleware:
    """ASGI middleware: ``/v1/*`` requests need ``Authorization: Bearer <key>`` (401 otherwise;
    constant-time comparison). ``/health`` and ``/metrics`` stay open, as in vLLM."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                body = error_body("invalid or missing API key (send Authorization: Bearer <key>)",
                                  "authentication_error", code="invalid_api_key")
                await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(generator: SpeculativeGenerator, *, model_name: str | None = None,
               max_queue: int = 16, runtime: str = "auto", max_batch: int = 8,
               api_key: str | None = None, max_body: int = MAX_BODY_BYTES,
               batch_budget: bool = True, prefill_chunk: int = PREFILL_CHUNK,
               engine_thread: bool = True) -> Starlette:
    """The OpenAI-compatible app serving ``generator`` (its target, draft and default policy).

    Args:
        model_name: the id clients pass as ``model`` (default: the target's name).
        max_queue: requests that may wait for a batch slot; more get 429.
        runtime: kept for compatibility (per-sequence engines share ``generator``'s runtime).
        max_batch: sequences generated together (one target forward per step).
        api_key: when set, ``/v1/*`` needs ``Authorization: Bearer <api_key>``.
        max_body: request body limit in bytes (413 beyond).
        batch_budget: cap adaptive policies' drafts by the batch-level draft budget.
        prefill_chunk: prompt rows fed per step while other sequences decode (chunked prefill).
        engine_thread: run the engine loop in a thread of its own; when False the caller runs
            ``app.state.scheduler.run()`` (on the main thread, as ``adaspec serve`` does).
    """
    server = Server(generator, model_name or generator.target.name, max_queue, runtime, max_batch,
                    max_body, batch_budget, prefill_chunk, engine_thread)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        server.scheduler.shutdown()

    app = Starlette(
        routes=[Route("/v1/completions", server.completions, methods=["POST"]),
                Route("/v1/chat/completions", server.chat, methods=["POST"]),
                Route("/v1/models", server.models, methods=["GET"]),
                Route("/v1/models/{model:path}", server.model, methods=["GET"]),
                Route("/health", server.health, methods=["GET"]),
                Route("/metrics", server.metrics_text, methods=["GET"])],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan)
    app.state.server = server
    if api_key:
        app.add_middleware(ApiKeyMiddleware, key=api_key)
    return app
