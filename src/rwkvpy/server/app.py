"""The HTTP side: an OpenAI-compatible FastAPI app in front of the :class:`Engine`.

Routes (server/routes.py): ``GET /health`` (no key needed), ``GET /v1/models``,
``GET /v1/models/{id}``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``POST/GET /v1/states``, ``GET/DELETE /v1/states/{id}``, ``GET /v1/stats`` (engine and
prefix-cache counters); server/extra_routes.py: ``POST /tokenize``, ``POST /detokenize``,
``GET /metrics`` (Prometheus; it needs the key like the others unless ``metrics_public``).

Every error is ``{"error": {"message", "type", "param", "code"}}`` with its status (400 bad JSON
or parameters, 401 missing or wrong key, 404 unknown model, state or route, 413 body too large,
429 too many running sequences, 503 shutting down, 500 otherwise); no traceback ever reaches a
client.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine
from ..errors import RwkvpyError
from . import protocol as P
from .context import SHUTDOWN_MESSAGE, NamedState, ServerConfig, ServerState
from .extra_routes import router as extra_router
from .metrics import CountRequests, Metrics
from .openapi import router as openapi_router
from .routes import read_json, router

__all__ = [
    "SHUTDOWN_MESSAGE",
    "Engine",
    "Guard",
    "NamedState",
    "ServerConfig",
    "ServerState",
    "build_app",
    "create_app",
    "read_json",
]

log = logging.getLogger("rwkvpy.server")


def error_response(err: P.ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# -- errors ----------------------------------------------------------------------------------------
async def _api_error(request, exc: P.ApiError):
    return error_response(exc)


async def _http_error(request, exc):
    if exc.status_code == 404:
        err = P.ApiError(404, f"no route {request.method} {request.url.path}", code="not_found")
    elif exc.status_code == 405:
        err = P.ApiError(
            405,
            f"method {request.method} is not allowed on {request.url.path}",
            code="method_not_allowed",
        )
    else:
        err = P.ApiError(exc.status_code, str(exc.detail))
    return error_response(err)


async def _validation_error(request, exc):
    return error_response(P.bad("invalid request"))


async def _input_error(request, exc):  # a request's text or tokens the model cannot take
    return error_response(P.bad(str(exc)))


async def _internal_error(request, exc):
    log.error(
        "internal error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc
    )
    return error_response(
        P.ApiError(500, "internal server error", type="server_error", code="internal_error")
    )


@asynccontextmanager
async def _lifespan(app):
    engine = app.state.server.engine
    engine.start()
    try:
        yield
    finally:
        await run_in_threadpool(engine.stop)
        log.info("engine stopped")


def create_app(server: ServerState) -> FastAPI:
    """The FastAPI app of ``server``: the routes, the error handlers, the engine's lifespan."""
    app = FastAPI(
        title="rwkvpy", docs_url=None, redoc_url=None, openapi_url=None, lifespan=_lifespan
    )
    app.state.server = server
    app.add_exception_handler(P.ApiError, _api_error)  # type: ignore[arg-type]  # a subclass handler
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(RwkvpyError, _input_error)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(router)
    app.include_router(extra_router)
    app.include_router(openapi_router)
    if getattr(server, "metrics", None) is None:
        server.metrics = Metrics(server)
    server.engine.observer = server.metrics
    return app


class Guard:
    """ASGI middleware: with an API key, every route but /health (and /metrics when
    ``metrics_public``) needs ``Authorization: Bearer KEY`` (401 otherwise)."""

    def __init__(self, app, api_key: str | None, metrics_public: bool = False):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.open = {"/health", "/metrics"} if metrics_public else {"/health"}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.key is None or scope.get("path") in self.open:
            return await self.app(scope, receive, send)
        got = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                got = value
                break
        scheme, _, token = got.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        msg = (
            "missing API key: send the header 'Authorization: Bearer KEY'"
            if not got
            else "invalid API key"
        )
        err = P.ApiError(401, msg, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await error_response(err)(scope, receive, send)


def build_app(server: ServerState):
    """The ASGI application: the routes behind the API-key guard, every response counted."""
    app = create_app(server)
    guarded = Guard(app, server.config.api_key, server.config.metrics_public)
    return CountRequests(guarded, server.metrics)
