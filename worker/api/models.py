"""What the API answers, as pydantic models (so ``/openapi.json`` describes every body), and the
push request's schema, derived from the message contract's (``worker.contract``) so the two
cannot drift."""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from worker.contract import push_request_schema
from worker.store.models import Event, PushJob


def api_push_schema() -> dict[str, Any]:
    """The body of ``POST /v1/pushes``: the contract's push request, but the idempotency key is
    the ``Idempotency-Key`` header, and ``requested_by`` may be left out (then it is the
    token's ``token:<name>``)."""
    schema = copy.deepcopy(push_request_schema())
    for key in ("$schema", "$id"):
        schema.pop(key, None)
    schema["title"] = "PushRequest"
    schema["description"] = (
        "The push request of the message contract (docs/push-request.schema.json) without "
        "idempotency_key, which is the Idempotency-Key header."
    )
    del schema["properties"]["idempotency_key"]
    schema["required"] = [
        name for name in schema["required"] if name not in ("idempotency_key", "requested_by")
    ]
    return schema


class Job(BaseModel):
    id: str
    status: str
    source_image: str
    #: ``docker``, ``registry``, ``oci-layout`` or ``docker-archive`` (docs/sources.md).
    source_kind: str
    #: The digest a non-Docker source was pinned to.
    source_digest: str | None
    repository: str
    tag: str
    requested_registry_id: int
    effective_registry_id: int
    fallback_chain: list[int]
    current_step: str | None
    attempt: int
    error_code: str | None
    error_message: str | None
    pushed_reference: str | None
    digest: str | None
    requested_by: str
    idempotency_key: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: PushJob) -> Job:
        return cls(
            id=job.id, status=job.status, source_image=job.source_image,
            source_kind=job.source_kind or "docker", source_digest=job.source_digest,
            repository=job.repository, tag=job.tag,
            requested_registry_id=job.requested_registry_id,
            effective_registry_id=job.effective_registry_id,
            fallback_chain=list(job.fallback_chain or []), current_step=job.current_step,
            attempt=job.attempt, error_code=job.error_code, error_message=job.error_message,
            pushed_reference=job.pushed_reference, digest=job.digest,
            requested_by=job.requested_by, idempotency_key=job.idempotency_key,
            created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        )  # fmt: skip


class EventOut(BaseModel):
    id: int
    stream: str
    seq: int
    job_id: str | None
    time: datetime
    type: str
    step: str | None
    registry_id: int | None
    attempt: int | None
    actor: str
    payload: dict[str, Any]
    repository: str | None
    outcome: str | None
    prev_hash: str
    hash: str
    #: The chain the event is a link of (docs/event-log.md); None: recorded before the lanes.
    lane: int | None
    #: The OpenTelemetry trace the event was recorded in, when tracing was on.
    trace_id: str | None

    @classmethod
    def of(cls, row: Event) -> EventOut:
        return cls(
            id=row.id, stream=row.stream, seq=row.seq, job_id=row.job_id, time=row.time,
            type=row.type, step=row.step, registry_id=row.registry_id, attempt=row.attempt,
            actor=row.actor, payload=dict(row.payload or {}), repository=row.repository,
            outcome=row.outcome, prev_hash=row.prev_hash, hash=row.hash, lane=row.lane,
            trace_id=row.trace_id,
        )  # fmt: skip


class JobWithEvents(BaseModel):
    job: Job
    events: list[EventOut]


class JobPage(BaseModel):
    items: list[Job]
    #: Give it as ``cursor`` for the next page; None: this was the last.
    next_cursor: str | None


class EventPage(BaseModel):
    items: list[EventOut]
    next_cursor: str | None


class Reason(BaseModel):
    """Why: recorded in the event log (``reason``)."""

    reason: str


class Health(BaseModel):
    status: str | None
    #: When the status was recorded (a ``registry.health`` event); None: never checked.
    since: datetime | None


class RegistryOut(BaseModel):
    id: int
    name: str
    url: str
    host: str
    kind: str
    #: How it authenticates: ``anonymous``, ``secret``, ``env:NAME``, ``file:PATH`` or ``none``;
    #: a secret is never readable back.
    credential: str
    insecure: bool
    fallback_chain: list[int]
    health: Health


class Check(BaseModel):
    name: str
    ok: bool
    latency_ms: float | None
    detail: str
    fix: str | None
    skipped: bool
    error_code: str | None


class TestReport(BaseModel):
    registry_id: int
    url: str
    ok: bool
    checks: list[Check]


class Liveness(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    database: str
    broker: str
