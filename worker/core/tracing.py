"""OpenTelemetry tracing: what the rest of the project asks of it.

``current_trace_id`` is read by the event recorder (``worker.store.events``) for every event it
appends, so an auditor can go from an event to its trace. Without an active, valid span it is
None: tracing is off unless the standard ``OTEL_*`` variables turn it on.
"""

from __future__ import annotations

from opentelemetry import trace


def current_trace_id() -> str | None:
    """The current span's trace id as 32 lowercase hex digits, or None when there is none."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x")
