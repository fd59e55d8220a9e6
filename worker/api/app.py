"""The ASGI application: routes, the error handlers (one place), the request size limit."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.api import console
from worker.api.errors import ApiError, body, status_for
from worker.api.routes import router
from worker.api.tracing import TraceRequests
from worker.core.errors import PushWorkerError, StorageError
from worker.core.logs import configure_logging, get_logger
from worker.core.settings import get_settings
from worker.producer import start_tracing

log = get_logger("pushworker.api")


class BodyLimit:
    """Refuse a request body larger than ``limit`` bytes (413), by its Content-Length or, when
    it is sent in chunks, as soon as the chunks pass it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            body("request_too_large", f"the request body is larger than {self.limit} bytes",
                 "send a smaller body (PUSHWORKER_API_MAX_BODY)"),
            status_code=413,
        )  # fmt: skip
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def _validation_message(exc: RequestValidationError) -> str:
    """Where each problem is and what it is, never the value sent."""
    problems = []
    for error in exc.errors()[:10]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(problems) or "the request is not valid"


def create_app() -> FastAPI:
    """The API (``uvicorn --factory worker.api:create_app``)."""
    settings = get_settings()
    configure_logging(settings.log_format)
    # In the serving process (uvicorn's --factory: once in each of its worker processes).
    start_tracing("api")
    app = FastAPI(
        title="pushworker",
        version="1",
        description="Push container images to explicitly named registries; read the event "
        "log. Every route but /healthz and /readyz takes `Authorization: Bearer <token>`. "
        "See docs/api.md.",
    )
    app.include_router(router)
    app.include_router(console.router)
    app.mount(f"{console.PREFIX}/static", console.static, name="console-static")

    @app.exception_handler(PushWorkerError)
    async def _service_error(request: Request, exc: PushWorkerError) -> JSONResponse:
        status = status_for(exc)
        if status >= 500:
            log.error("api.error", path=request.url.path, code=exc.code, status=status)
        return JSONResponse(body(exc.code, exc.message, exc.hint), status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            body(exc.code, exc.message, exc.hint), status_code=exc.status, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            body("invalid_input", _validation_message(exc), "see /openapi.json"), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        if exc.status_code == 400:
            # A body that is not JSON (not even text): malformed like any other request.
            return JSONResponse(
                body("invalid_input", "the request body is not JSON", "send a JSON object"),
                status_code=422,
            )
        return JSONResponse(
            body(codes.get(exc.status_code, "http_error"), str(exc.detail)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(SQLAlchemyError)
    async def _database(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        # Never the driver's text: it quotes the statement's parameters.
        log.error("api.database_error", path=request.url.path, error=type(exc).__name__)
        error = StorageError(
            f"the database refused the request ({type(exc).__name__})",
            hint="check the database (PUSHWORKER_DATABASE_URL) and its logs",
        )
        return JSONResponse(body(error.code, error.message, error.hint), status_code=503)

    @app.exception_handler(UnicodeError)
    async def _unicode(request: Request, exc: Any) -> JSONResponse:
        return JSONResponse(
            body("invalid_input", "the request holds text that is not valid Unicode"),
            status_code=422,
        )

    app.add_middleware(BodyLimit, limit=settings.api_max_body)
    app.add_middleware(console.SecurityHeaders)
    # Outermost: the request's span covers every answer, a refusal of a too large body too.
    app.add_middleware(TraceRequests)
    return app
