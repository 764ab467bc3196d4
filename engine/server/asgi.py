"""The ASGI plumbing under the routes: OpenAI-shaped errors, the key / body-size /
draining gate, and the direct path that takes the hot routes past FastAPI's stack."""
from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from engine.server.async_engine import AsyncEngine
from engine.server.protocol import error_body


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code=None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.code, self.headers = code, headers


def package_version() -> str:
    """The installed selfrag-engine version (the source tree's pyproject if not installed)."""
    from importlib import metadata
    try:
        return metadata.version("selfrag-engine")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                    param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


# Answered without the API key: probes and scrapers (as vLLM's server does).
OPEN_PATHS = ("/health", "/version", "/metrics")


class LimitsMiddleware:
    """Pure-ASGI gate before routing: API key, body size, draining."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, engine: AsyncEngine,
                 metrics=None):
        self.app, self.max_body = app, max_body_bytes
        self.key = api_key.encode() if api_key else None
        self.engine = engine
        self.metrics = metrics                  # counts every response by route and status

    def _authorized(self, header: bytes | None) -> bool:
        """``Authorization: Bearer KEY``; the scheme is case-insensitive (RFC 7235)."""
        if header is None:
            return False
        scheme, _, token = header.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.metrics is None:
            return await self._gate(scope, receive, send)
        status = [500]

        async def counted(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)
        try:
            await self._gate(scope, receive, counted)
        finally:
            self.metrics.count_http(scope.get("path", ""), scope.get("method", ""), status[0])

    async def _gate(self, scope, receive, send):
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        if self.engine.draining and path != "/health":
            return await error_response(503, "the server is shutting down", "service_unavailable",
                                         code="draining")(scope, receive, send)
        if (self.key is not None and path not in OPEN_PATHS
                and not self._authorized(headers.get(b"authorization"))):
            return await error_response(401, "missing or invalid API key (Authorization: Bearer KEY)",
                                         "authentication_error", code="invalid_api_key",
                                         headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                return await error_response(400, "bad Content-Length")(scope, receive, send)
            if too_big:
                return await self._too_large(scope, receive, send)
            return await self.app(scope, receive, send)
        # Chunked body: count as it arrives.
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge()
            return msg

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._too_large(scope, receive, send)


    def _too_large(self, scope, receive, send):
        return error_response(413, f"request body over {self.max_body} bytes",
                               code="body_too_large")(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class ServerApp(FastAPI):
    """FastAPI with a direct path for the hot routes (``set_direct_routes``).

    A POST to one of them goes through the same key/size/draining gate and the same
    error handlers as every other request, but skips FastAPI's middleware stack and
    router (server-error, telemetry, body-limit, exception and exit-stack layers, route
    matching): those took 0.11 of the 0.35 ms from request to engine at one client on
    the CPU VM. The routes stay registered on the router too, so /openapi.json and
    every other method or path behave as before. Adding a middleware afterwards
    (``add_middleware``, ``@app.middleware``) turns the direct path off, so the
    new middleware sees every request.
    """

    _direct: dict = {}

    def add_middleware(self, *args, **kwargs) -> None:
        self._direct = {}
        super().add_middleware(*args, **kwargs)

    def set_direct_routes(self, routes: dict, gate) -> None:
        """routes: path -> ``async endpoint(request) -> Response``; gate: wraps an
        ASGI app in the key/size/draining checks."""
        self._direct = {path: gate(self._direct_app(endpoint)) for path, endpoint in routes.items()}

    def _direct_app(self, endpoint):
        handlers = self.exception_handlers

        async def app(scope, receive, send):
            request = Request(scope, receive)
            try:
                response = await endpoint(request)
            except _BodyTooLarge:
                raise                           # the gate answers 413
            except Exception as exc:        # the most specific handler; Exception has one
                handler = next(handlers[cls] for cls in type(exc).__mro__ if cls in handlers)
                response = await handler(request, exc)
            await response(scope, receive, send)
        return app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            direct = self._direct.get(scope["path"])
            if direct is not None:
                scope["app"] = self
                return await direct(scope, receive, send)
        await super().__call__(scope, receive, send)


def document_raw_routes(app: FastAPI, routes: dict) -> None:
    """Adds POST operations for plain Starlette routes (which FastAPI's schema skips)
    to ``app.openapi()``: ``routes`` maps path -> (summary, pydantic request model)."""
    build = app.openapi

    def openapi():
        schema = build()
        if any(path not in schema.get("paths", {}) for path in routes):
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for path, (summary, model) in routes.items():
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(body.pop("$defs", {}))
                comps[model.__name__] = body
                schema.setdefault("paths", {})[path] = {"post": {
                    "summary": summary, "operationId": path.strip("/").replace("/", "_"),
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}},
                    "responses": {"200": {"description": "JSON, or text/event-stream with stream: true"},
                                  "400": {"description": "invalid request (OpenAI error shape)"}}}}
        return schema

    app.openapi = openapi
