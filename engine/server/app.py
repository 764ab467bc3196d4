"""The FastAPI app: OpenAI-compatible completions/chat over one ``AsyncEngine``.

    app = create_app(llm, served_model_name="selfrag")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` -> SSE ``data: {json}`` chunks
ending with ``data: [DONE]``). Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``: invalid requests 400,
bad key 401, unknown model 404, body too large 413, queue full 429 (with
``Retry-After``), draining 503, only server faults 500.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Callable

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("the HTTP server needs FastAPI and uvicorn: pip install 'selfrag-engine[serve]' "
                      "(or pip install fastapi uvicorn)") from e

from engine.server.asgi import (
    APIError,
    LimitsMiddleware,
    ServerApp,
    document_raw_routes,
    error_response,
    package_version,
)
from engine.server.async_engine import AsyncEngine
from engine.server.protocol import ChatCompletionRequest, CompletionRequest, now_s
from engine.server.serving import OpenAIServing
from engine.server.serving_chat import create_chat_completion
from engine.server.serving_completion import create_completion

log = logging.getLogger("engine.server")

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_TOKENS_CAP = 4096


def create_app(llm, *, served_model_name: str = "selfrag", api_key: str | None = None,
               rag: Callable | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP, max_waiting: int | None = 1024,
               engine: AsyncEngine | None = None,
               chat_prompt: Callable[[list[dict]], str] | None = None) -> FastAPI:
    """The app serving ``llm`` (one shared ``AsyncEngine``, started on app startup).

    rag: optional ``install(app, engine)`` adding more routes (``selfrag.server``
        passes one adding ``/v1/selfrag/answer``).
    max_tokens_cap: largest ``max_tokens`` accepted (400 above).
    max_waiting: requests waiting for their first token before 429.
    engine: an existing ``AsyncEngine`` over ``llm`` (default: a new one).
    chat_prompt: ``chat_prompt(messages) -> str`` renders a chat conversation
        when the checkpoint has no chat_template (``selfrag.server`` passes
        Self-RAG's instruction format); see engine/server/chat.py.
    """
    owns_engine = engine is None
    engine = engine or AsyncEngine(llm, max_waiting=max_waiting)
    serving = OpenAIServing(llm, engine, served_model_name, max_tokens_cap, chat_prompt)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            if owns_engine:
                engine.begin_drain()
                engine.stop()

    app = ServerApp(title="selfrag-engine OpenAI-compatible server", lifespan=lifespan,
                    docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.llm = llm
    app.state.served_model_name = served_model_name
    app.state.max_tokens_cap = max_tokens_cap
    app.state.api_error = APIError
    _install_error_handlers(app)

    @app.get("/health")
    async def health():
        if llm.engine_error is not None:
            return JSONResponse({"status": "dead", "error": str(llm.engine_error)}, status_code=503)
        if engine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": package_version()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model",
                                            "created": now_s(), "owned_by": "selfrag-engine",
                                            "max_model_len": llm.max_model_len}]}

    async def completions(request: Request):
        return await create_completion(serving, request)

    async def chat(request: Request):
        return await create_chat_completion(serving, request)

    # The two hot routes take the raw Request and parse their bodies with pydantic's
    # JSON parser: FastAPI's body dependency and route machinery took 0.19 ms of the
    # 0.65 ms from request to engine on the CPU VM. ``document_raw_routes`` keeps
    # them in /openapi.json; ``ServerApp`` also reaches them without the middleware.
    hot = {"/v1/completions": completions, "/v1/chat/completions": chat}
    for path, endpoint in hot.items():
        app.add_route(path, endpoint, methods=["POST"])
    document_raw_routes(app, {"/v1/completions": ("Create a completion", CompletionRequest),
                               "/v1/chat/completions": ("Create a chat completion", ChatCompletionRequest)})
    if rag is not None:
        rag(app, engine)

    metrics = _metrics(llm, engine, {r.path for r in app.routes if hasattr(r, "path")})
    if metrics is not None:
        engine.observer = metrics

        @app.get("/metrics")
        async def prometheus_metrics():
            body, content_type = metrics.render()
            return Response(body, media_type=content_type)
    app.state.metrics = metrics

    # The key / size / draining gate: outermost for every request, direct or not.
    limits = {"api_key": api_key, "max_body_bytes": max_body_bytes, "engine": engine,
              "metrics": metrics}
    app.add_middleware(LimitsMiddleware, **limits)
    app.set_direct_routes(hot, lambda inner: LimitsMiddleware(inner, **limits))
    return app


def _install_error_handlers(app) -> None:
    """Every error in OpenAI's shape: validation 400, ``APIError``'s own status, HTTP
    errors, and only server faults 500."""
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg, loc = "the body is not valid JSON", []
        else:
            msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: "
                            f"{e.get('msg')}" for e in errs[:5])
        return error_response(400, msg, param=".".join(loc) or None, code=first.get("type"))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type_, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        log.exception("server error")
        return error_response(500, f"internal server error: {type(exc).__name__}", "server_error")


def _metrics(llm, engine, routes: set[str]):
    """The server's Prometheus metrics, or None (and no /metrics) without prometheus_client."""
    try:
        from engine.server.metrics import ServerMetrics
        return ServerMetrics(llm, engine, routes | {"/metrics"})
    except ImportError:
        log.warning("prometheus_client is not installed: no /metrics (pip install prometheus_client)")
        return None
