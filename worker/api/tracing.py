"""A server span per HTTP request, continuing the caller's trace (W3C ``traceparent``).

A push asked through ``POST /v1/pushes`` is then one trace from the platform's own request
through the API, the broker and every step. Recorded: the method, the route's template, the
path, the status. Never a header (the bearer token), never the query string, never a body.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.core import tracing


class TraceRequests:
    """ASGI middleware: nothing but a pass-through while tracing is off."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not tracing.enabled():
            await self.app(scope, receive, send)
            return
        method = str(scope.get("method", "GET"))
        # Only the propagation headers are read, by the propagator (traceparent, tracestate,
        # baggage); nothing of the request's headers is recorded.
        carrier = {
            key.decode("latin-1").lower(): value.decode("latin-1")
            for key, value in scope.get("headers") or []
        }
        status: list[int] = []

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        with tracing.tracer().start_as_current_span(
            method,
            context=extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": str(scope.get("path", ""))},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                await self.app(scope, receive, send_status)
            except BaseException as error:
                tracing.failed(span, error)
                raise
            finally:
                route = _route_template(scope)
                if route is not None:
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                if status:
                    span.set_attribute("http.response.status_code", status[0])
                    if status[0] >= 500:
                        # A server span fails on 5xx only (semantic conventions).
                        tracing.failed(span, str(status[0]))


def _route_template(scope: Scope) -> str | None:
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else None
