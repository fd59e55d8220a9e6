"""The producer API: what the web platform calls to enqueue a push.

The job row and its ``job.enqueued`` event are committed before the message is published, so a
broker that is down at enqueue time loses nothing: the job stays ``queued`` and the periodic
reconcile task publishes it once the broker is back.
"""

from __future__ import annotations

from sqlalchemy import select

from worker.core import tracing
from worker.core.errors import ValidationError
from worker.core.logs import get_logger
from worker.engine.dispatch import get_dispatcher
from worker.jobs import PushRequest, create_job
from worker.store import events
from worker.store.db import read_connection, session_scope
from worker.store.models import Event

log = get_logger("pushworker.producer")

#: The events that start a run of a job: the trace they were recorded in is the run's.
RUN_STARTS = ("job.enqueued", "job.retried")


def enqueue_push(
    *,
    source_image: str | None = None,
    source: str | None = None,
    registry_id: int,
    repository: str,
    tag: str,
    requested_by: str,
    fallback: list[int] | None = None,
    idempotency_key: str | None = None,
    docker_host: str | None = None,
    actor: str | None = None,
    deadline: float | None = None,
) -> str:
    """Validate, record and queue a push; return the job id.

    Raises a ``worker.core.errors.ValidationError``, ``RegistryNotFound`` or ``CredentialError``
    (nothing recorded, nothing queued) when the request cannot succeed as given. The same
    ``idempotency_key`` returns the first job's id and queues nothing more.

    ``actor``: who the ``job.enqueued`` event names (default ``producer:<requested_by>``); the
    HTTP API passes ``token:<name>``, so the token that asked is on record.

    ``docker_host`` names the Docker Engine that holds ``source_image`` (one of
    ``PUSHWORKER_DOCKER_HOSTS``); the job then runs only on that host's worker. An unknown name
    raises a ``ValidationError`` with the code ``unknown_docker_host``. None: the default
    queue's worker and engine.

    ``deadline``: seconds the job may wait for its registry's limits (flow control) before it
    fails with ``throttled_past_deadline``; None: ``PUSHWORKER_FLOW_DEADLINE``.

    ``source`` (instead of ``source_image``): where else the image comes from
    (docs/sources.md): ``registry:ID/REPOSITORY:TAG`` or ``@sha256:...`` (a promotion),
    ``oci-layout:PATH``, ``docker-archive:PATH`` (in ``PUSHWORKER_SOURCES_DIR`` of the worker),
    or ``docker:IMAGE``. Such a job runs on the skopeo workers' queue, without Docker.
    """
    if (source_image is None) == (source is None):
        raise ValidationError("give exactly one of source_image and source")
    start_tracing("producer")
    # The job's trace starts here (or continues the caller's): the job.enqueued event, the
    # message's publish span and, through its headers, every step.
    with tracing.span(
        "pushworker.enqueue_push",
        attributes={tracing.REGISTRY_ID: registry_id, tracing.REPOSITORY: repository},
    ) as span:
        request = PushRequest(
            source_image=source_image or "", source=source, registry_id=registry_id,
            repository=repository, tag=tag,
            requested_by=requested_by, fallback=fallback, idempotency_key=idempotency_key,
            docker_host=docker_host, deadline=deadline,
        )  # fmt: skip
        with session_scope() as session:
            job, created = create_job(session, request, actor=actor or f"producer:{requested_by}")
            job_id, registry = job.id, job.effective_registry_id
        tracing.set_attributes({tracing.JOB_ID: job_id, "pushworker.job.created": created}, span)
        if created:
            _publish(job_id, registry)
    return job_id


def publish(job_id: str, registry_id: int) -> bool:
    """Send the job's chain to the broker; False (and a warning) when the broker is away.

    With tracing on, a chain published outside the job's trace (reconcile republishing it) is
    published in the trace of the job's run (``recorded_trace``), so the job stays one trace.
    """
    recorded = recorded_trace(job_id) if tracing.enabled() else None
    with tracing.resumed(recorded, job_id, "pushworker.republish"):
        return _publish(job_id, registry_id)


def recorded_trace(job_id: str) -> str | None:
    """The trace the job's current run was started in: that of its newest ``job.enqueued`` or
    ``job.retried`` event (None: not recorded, or the database cannot say now)."""
    try:
        # A read connection: no SQLite write lock for a read on the way to a publish.
        with read_connection() as connection:
            found = connection.execute(
                select(Event.trace_id)
                .where(Event.job_id == job_id, Event.type.in_(RUN_STARTS))
                .order_by(Event.id.desc())
                .limit(1)
            ).scalar_one_or_none()
    except Exception:  # tracing must never stop a publish
        return None
    return found if isinstance(found, str) else None


#: Whether this process hands its events to the tracing subscriber (a forked child inherits
#: the subscription with the subscriber list).
_events_traced = False


def start_tracing(role: str) -> bool:
    """Tracing on in this process when the ``OTEL_*`` variables ask for it (once; after any
    fork): spans, the Celery instrumentation (the trace context in every message's headers),
    and each event recorded as an event of the span current then. True when on."""
    global _events_traced
    if not tracing.configure(role, celery=True):
        return False
    if not _events_traced:
        events.subscribe(tracing.record_event)
        _events_traced = True
    return True


def _publish(job_id: str, registry_id: int) -> bool:
    try:
        get_dispatcher().start_chain(job_id, registry_id)
    except Exception as exc:  # kombu raises many types; every one means "not published"
        log.warning(
            "job.publish_deferred", job_id=job_id, error=type(exc).__name__,
            hint="the job is recorded; the reconcile task publishes it when the broker is back",
        )  # fmt: skip
        return False
    return True


__all__ = ["enqueue_push", "events", "publish"]
