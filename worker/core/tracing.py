"""OpenTelemetry tracing: turned on by the standard ``OTEL_*`` variables only, off otherwise.

When is it on (``requested``)? ``OTEL_SDK_DISABLED=true`` turns it off whatever else is set.
Otherwise ``OTEL_TRACES_EXPORTER`` decides when it is set (``otlp``, ``console``, both
comma-separated, or ``none``), and when it is not, an OTLP endpoint
(``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``) turns on the OTLP
exporter. Nothing set: off, and the spans below are the OpenTelemetry API's no-op spans. (The
specification's default exporter is ``otlp``; pushworker does not send anything anywhere unless
asked.) The exporter speaks OTLP over HTTP with protobuf; ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``
is refused rather than silently ignored. Everything else (endpoint, headers, timeout,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``) is
read by the SDK itself, as the specification says.

Each process turns it on for itself (``configure``), after any fork: a Celery pool process in
``worker_process_init`` (the batch processor's export thread must not be inherited from a
parent), beat, the API, a producer at its first ``enqueue_push``. The provider is this module's
own; it is also made the global one when the process has none, and a process that already set
up its own (a web platform embedding the producer) keeps its provider, which pushworker's spans
then join.

Secrets never reach a span: attributes are set from allow-lists (``EVENT_ATTRIBUTES``, the seams'
own few), an exception is recorded as its error code only (``error.type``), never its text.

``current_trace_id`` is read by the event recorder (``worker.store.events``) for every event it
appends, so an auditor can go from an event to its trace. Without an active, valid span it is
None.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from worker.core.errors import PushWorkerError, ValidationError

#: The instrumentation scope of every span pushworker opens itself.
TRACER_NAME = "pushworker"
#: ``service.name`` when neither ``OTEL_SERVICE_NAME`` nor ``OTEL_RESOURCE_ATTRIBUTES`` names one.
DEFAULT_SERVICE_NAME = "pushworker"
#: The exporters this installation has (``OTEL_TRACES_EXPORTER``).
EXPORTERS = ("otlp", "console")
#: The one OTLP protocol installed (``opentelemetry-exporter-otlp-proto-http``).
OTLP_PROTOCOL = "http/protobuf"

# Attribute names: the semantic conventions' where they exist, ``pushworker.`` for the rest.
JOB_ID = "pushworker.job.id"
STEP = "pushworker.step"
REGISTRY_ID = "pushworker.registry.id"
REGISTRY_HOST = "pushworker.registry.host"
REPOSITORY = "pushworker.repository"
DIGEST = "pushworker.digest"
BYTES_PUSHED = "pushworker.bytes_pushed"
ATTEMPT = "pushworker.attempt"
OUTCOME = "pushworker.outcome"
EVENT_ID = "pushworker.event.id"
ERROR_TYPE = "error.type"


@dataclass(frozen=True)
class TracingRequest:
    """What the ``OTEL_*`` variables ask for: the exporters, and the variable that decided."""

    exporters: tuple[str, ...]
    turned_on_by: str


def requested(environ: Mapping[str, str]) -> TracingRequest | None:
    """The tracing ``environ`` asks for, or None (off); a ``ValidationError`` naming the variable
    for a value this installation cannot honour (an unknown exporter, OTLP over gRPC)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    named = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if named:
        exporters = tuple(dict.fromkeys(n.strip().lower() for n in named.split(",") if n.strip()))
        if "none" in exporters:
            return None
        unknown = [name for name in exporters if name not in EXPORTERS]
        if unknown:
            raise ValidationError(
                f"OTEL_TRACES_EXPORTER names {', '.join(unknown)}, which pushworker does not have",
                hint="use otlp (OTLP over HTTP/protobuf), console, or none",
            )
        turned_on_by = "OTEL_TRACES_EXPORTER"
    else:
        endpoint = next(
            (
                name
                for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
                if environ.get(name, "").strip()
            ),
            None,
        )
        if endpoint is None:
            return None
        exporters, turned_on_by = ("otlp",), endpoint
    if "otlp" in exporters:
        for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = environ.get(name, "").strip()
            if protocol and protocol != OTLP_PROTOCOL:
                raise ValidationError(
                    f"{name}={protocol!r}: pushworker exports OTLP over {OTLP_PROTOCOL} only",
                    hint=f"set {name}={OTLP_PROTOCOL} (a collector's port 4318), or unset it",
                )
            if protocol:
                break
    return TracingRequest(exporters, turned_on_by)


def requested_here() -> TracingRequest | None:
    """``requested`` of this process's environment."""
    return requested(os.environ)


# --- the process's tracer -----------------------------------------------------------------------


@dataclass
class _State:
    #: The provider spans go to (ours, or the host process's own); None: off.
    provider: Any = None
    #: Whether ``provider`` is ours to flush and shut down.
    owned: bool = False
    tracer: trace.Tracer = field(default_factory=trace.NoOpTracer)
    #: The process that configured (a forked child configures again).
    pid: int = 0
    celery: bool = False


_state = _State()
_lock = threading.Lock()
#: Every provider this module made: never mistaken for a host's own (after ``reset``, or in a
#: forked child of a process that had one).
_made: weakref.WeakSet[Any] = weakref.WeakSet()


def enabled() -> bool:
    """Whether spans are recorded in this process."""
    return _state.provider is not None and _state.pid == os.getpid()


def tracer() -> trace.Tracer:
    """The tracer for pushworker's own spans: the no-op tracer while tracing is off."""
    return _state.tracer if _state.pid == os.getpid() else trace.NoOpTracer()


def configure(role: str, *, celery: bool = False) -> bool:
    """Turn tracing on in this process if the ``OTEL_*`` variables ask for it; True when on.

    Once per process (a forked child decides again): later calls return the first answer.
    ``role`` becomes the resource attribute ``pushworker.process`` (worker, beat, api,
    producer). ``celery``: also instrument Celery (publish spans that carry the trace context
    in each message's headers, and a span around each task run that continues it).
    """
    with _lock:
        if _state.pid == os.getpid():
            if celery and _state.provider is not None and not _state.celery:
                _instrument_celery(_state.provider)
            return _state.provider is not None
        request = requested_here()
        _state.pid = os.getpid()
        if request is None:
            _state.provider, _state.owned, _state.tracer = None, False, trace.NoOpTracer()
            return False
        provider, owned = _host_provider(), False
        if provider is None:
            provider, owned = _new_provider(role, request), True
            _made.add(provider)
            if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
                trace.set_tracer_provider(provider)
        _use(provider, owned=owned, celery=celery)
        return True


def use_provider(provider: Any, *, celery: bool = False) -> None:
    """Send this process's spans to ``provider`` (tests: one with an in-memory exporter)."""
    with _lock:
        _state.pid = os.getpid()
        _use(provider, owned=False, celery=celery)


def reset() -> None:
    """Back to off: flush and shut down our provider, remove the Celery instrumentation. The
    next ``configure`` reads the variables again."""
    with _lock:
        if _state.celery:
            _celery_instrumentor().uninstrument()
        if _state.owned and _state.pid == os.getpid():
            _state.provider.shutdown()
        _state.provider, _state.owned, _state.tracer = None, False, trace.NoOpTracer()
        _state.pid, _state.celery = 0, False


def shutdown() -> None:
    """Export what is still queued and stop (a process about to exit: the last job's spans
    must not be lost). The host's own provider is left to the host."""
    with _lock:
        if _state.owned and _state.pid == os.getpid() and _state.provider is not None:
            _state.provider.shutdown()
            _state.provider, _state.owned, _state.tracer = None, False, trace.NoOpTracer()


def force_flush(timeout_millis: int = 10_000) -> bool:
    """Export what is queued now; False when it did not finish in time (or tracing is off)."""
    provider = _state.provider if _state.pid == os.getpid() else None
    return bool(provider is not None and provider.force_flush(timeout_millis))


def _use(provider: Any, *, owned: bool, celery: bool) -> None:
    _state.provider, _state.owned = provider, owned
    _state.tracer = provider.get_tracer(TRACER_NAME)
    _state.celery = False
    if celery:
        _instrument_celery(provider)


def _celery_instrumentor() -> Any:
    # Imported when asked for: a process with tracing off never loads the instrumentation.
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    return CeleryInstrumentor()  # type: ignore[no-untyped-call]  # a singleton


def _instrument_celery(provider: Any) -> None:
    instrumentor = _celery_instrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        # Inherited from a parent, or the host's: its spans go to another provider.
        instrumentor.uninstrument()
    instrumentor.instrument(tracer_provider=provider)
    _state.celery = True


def _host_provider() -> Any:
    """The SDK provider the process set up before pushworker did, if any."""
    from opentelemetry.sdk.trace import TracerProvider

    found = trace.get_tracer_provider()
    if isinstance(found, TracerProvider) and found not in _made:
        return found
    return None


def _new_provider(role: str, request: TracingRequest) -> Any:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES first; pushworker's defaults only fill gaps.
    resource = Resource.create({})
    defaults: dict[str, str] = {}
    if "pushworker.process" not in resource.attributes:
        defaults["pushworker.process"] = role
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        defaults[SERVICE_NAME] = DEFAULT_SERVICE_NAME
    resource = resource.merge(Resource(defaults))
    # The sampler comes from OTEL_TRACES_SAMPLER / _ARG, read by the provider itself.
    provider = TracerProvider(resource=resource)
    for name in request.exporters:
        exporter: SpanExporter
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


# --- spans ----------------------------------------------------------------------------------------


def current_trace_id() -> str | None:
    """The current span's trace id as 32 lowercase hex digits, or None when there is none."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x")


def current_ids() -> tuple[str, str] | None:
    """The current span's trace id and span id (32 and 16 hex digits), or None."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


@contextmanager
def span(
    name: str, *, kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping[str, Any] | None = None
) -> Iterator[trace.Span]:
    """A span around the block, current inside it. An exception marks it failed with its error
    code (``error.type``: the project's code, or the exception's class name) and nothing of its
    text, which could quote what a caller passed."""
    with tracer().start_as_current_span(
        name,
        kind=kind,
        attributes=_plain(attributes or {}),
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except BaseException as error:
            failed(current, error)
            raise


def failed(target: trace.Span, error: BaseException | str) -> None:
    """Mark ``target`` failed with an error code (a string, or the error's code)."""
    if not target.is_recording():
        return
    if isinstance(error, PushWorkerError):
        code = error.code
    elif isinstance(error, BaseException):
        code = type(error).__name__
    else:
        code = error
    target.set_attribute(ERROR_TYPE, code)
    target.set_status(trace.Status(trace.StatusCode.ERROR, code))


def set_attributes(attributes: Mapping[str, Any], target: trace.Span | None = None) -> None:
    """Set ``attributes`` (None values left out) on ``target`` or the current span."""
    target = target or trace.get_current_span()
    if target.is_recording():
        target.set_attributes(_plain(attributes))


def _plain(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: value
        for key, value in attributes.items()
        if isinstance(value, str | bool | int | float) and value is not None
    }


def url_without_secrets(url: str) -> str:
    """``url.full`` as the semantic conventions want it here: no userinfo, no query (a token
    realm's query names scopes today; a query is where a token would travel), no fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def http_client_attributes(method: str, url: str) -> dict[str, Any]:
    """The semantic conventions' attributes of an HTTP client request to ``url``."""
    parts = urlsplit(url)
    port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
    return {
        "http.request.method": method.upper(),
        "server.address": parts.hostname or "",
        "server.port": port,
        "url.full": url_without_secrets(url),
    }


# --- one trace per job --------------------------------------------------------------------------


@contextmanager
def resumed(trace_id: str | None, job_id: str, name: str) -> Iterator[None]:
    """Run the block in the trace ``trace_id`` (a job's, as its events recorded it), under a span
    ``name`` linked to the span current now.

    For work done on behalf of a job outside the message chain that carries its trace: a
    republish by reconcile, a flow-control hand-over run by another job's worker. The trace's
    span that started that run is not known here, so the span's parent is the job's anchor: a
    span id derived from the job id, the same for every resumed piece of the job (a trace viewer
    shows it as a missing parent). Nothing changes when tracing is off, ``trace_id`` is None or
    is already the current trace.
    """
    if not enabled() or trace_id is None or trace_id == current_trace_id():
        yield
        return
    try:
        number = int(trace_id, 16)
    except ValueError:
        yield
        return
    anchor = SpanContext(
        trace_id=number,
        span_id=int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big") or 1,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    here = trace.get_current_span().get_span_context()
    links = [Link(here)] if here.is_valid else []
    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(anchor)))
    try:
        with tracer().start_as_current_span(
            name, links=links, attributes={JOB_ID: job_id}, record_exception=False
        ):
            yield
    finally:
        otel_context.detach(token)


# --- events as span events ------------------------------------------------------------------------

#: The payload keys of an event that become attributes, and their names. Nothing else of an
#: event reaches a span: the issue's list (registry id and host, repository, bytes pushed,
#: digest, attempt, outcome, error code), the fallback's two registries, the event's id.
EVENT_ATTRIBUTES = {
    "registry_host": REGISTRY_HOST,
    "digest": DIGEST,
    "bytes_pushed": BYTES_PUSHED,
    "error_code": ERROR_TYPE,
    "from_registry_id": "pushworker.fallback.from_registry_id",
    "to_registry_id": "pushworker.fallback.to_registry_id",
}
#: Columns of an event that become attributes.
EVENT_COLUMNS = {
    "id": EVENT_ID,
    "job_id": JOB_ID,
    "step": STEP,
    "registry_id": REGISTRY_ID,
    "repository": REPOSITORY,
    "attempt": ATTEMPT,
    "outcome": OUTCOME,
}


def event_attributes(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The allow-listed attributes of one event (``worker.store.queries.event_fields``)."""
    found: dict[str, Any] = {}
    for column, name in EVENT_COLUMNS.items():
        found[name] = fields.get(column)
    payload = fields.get("payload") or {}
    if isinstance(payload, Mapping):
        for key, name in EVENT_ATTRIBUTES.items():
            found[name] = payload.get(key)
        reference = payload.get("reference")
        if found[REGISTRY_HOST] is None and isinstance(reference, str) and "/" in reference:
            # A target reference is always ``host/repository:tag`` (worker.core.reference).
            found[REGISTRY_HOST] = reference.split("/", 1)[0]
    return _plain(found)


def record_event(fields: dict[str, Any]) -> None:
    """A subscriber of ``worker.store.events``: each event the job appends becomes a span event
    of the span current when it was committed (the step's), and its allow-listed fields that
    describe the job (not the event itself) become that span's attributes; a failure marks
    the span failed with its code."""
    current = trace.get_current_span()
    if not current.is_recording():
        return
    attributes = event_attributes(fields)
    current.add_event(str(fields.get("type", "event")), attributes)
    if fields.get("job_id") is None:
        return  # a registry's or the log's own event: not about this span's job
    current.set_attributes({k: v for k, v in attributes.items() if k != EVENT_ID})
    if str(fields.get("type")) in ("step.failed", "job.failed"):
        code = attributes.get(ERROR_TYPE)
        if isinstance(code, str):
            failed(current, code)
