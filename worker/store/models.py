"""The stored state: registries, push jobs, step claims and the append-only event log.

Typed SQLAlchemy 2.x ORM; the schema itself is created by the Alembic migrations in
``worker/store/migrations`` (``pushctl db upgrade``), never implicitly.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# A 64-bit id that is still SQLite's rowid alias (so it autoincrements there too).
EventId = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[int]: JSON}


class RegistryKind(enum.StrEnum):
    GENERIC = "generic"
    HARBOR = "harbor"
    GITLAB = "gitlab"
    DOCKERHUB = "dockerhub"


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class StepStatus(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Registry(Base):
    __tablename__ = "registries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    #: Normalised ``scheme://host[:port]``.
    url: Mapped[str] = mapped_column(String(300))
    #: ``host[:port]`` exactly as it prefixes a pushed reference.
    host: Mapped[str] = mapped_column(String(300))
    kind: Mapped[str] = mapped_column(String(20), default=RegistryKind.GENERIC.value)
    username: Mapped[str | None] = mapped_column(String(200))
    #: False only when an operator said explicitly that the registry takes anonymous pushes.
    auth_required: Mapped[bool] = mapped_column(Boolean, default=True)
    credential_kind: Mapped[str | None] = mapped_column(String(10))
    credential_secret: Mapped[str | None] = mapped_column(Text)
    credential_ref: Mapped[str | None] = mapped_column(String(500))
    ca_cert: Mapped[str | None] = mapped_column(Text)
    insecure: Mapped[bool] = mapped_column(Boolean, default=False)
    fallback_chain: Mapped[list[int]] = mapped_column(JSON, default=list)
    #: At most this many pushes to the registry at once, across every worker (None: no cap).
    max_concurrent: Mapped[int | None] = mapped_column(Integer)
    #: At most this many registry requests a second, across every worker (None: no limit).
    rate_per_second: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    #: Removed registries keep their row, so the history that names them stays readable.
    removed_at: Mapped[datetime | None] = mapped_column()


class PushJob(Base):
    __tablename__ = "push_jobs"
    __table_args__ = (
        Index("ix_push_jobs_status_created", "status", "created_at"),
        Index("ix_push_jobs_registry_created", "requested_registry_id", "created_at"),
        Index("ix_push_jobs_created_id", "created_at", "id"),
        Index("ix_push_jobs_repository_created", "repository", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    source_image: Mapped[str] = mapped_column(String(300))
    repository: Mapped[str] = mapped_column(String(255))
    tag: Mapped[str] = mapped_column(String(128))
    requested_registry_id: Mapped[int] = mapped_column(ForeignKey("registries.id"))
    effective_registry_id: Mapped[int] = mapped_column(ForeignKey("registries.id"))
    #: The registries to try after the requested one, resolved when the job was created.
    fallback_chain: Mapped[list[int]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.QUEUED.value)
    current_step: Mapped[str | None] = mapped_column(String(40))
    #: 1 for the first run; each operator retry adds one.
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    error_code: Mapped[str | None] = mapped_column(String(60))
    error_message: Mapped[str | None] = mapped_column(Text)
    pushed_reference: Mapped[str | None] = mapped_column(String(600))
    digest: Mapped[str | None] = mapped_column(String(100))
    requested_by: Mapped[str] = mapped_column(String(200))
    #: The named Docker Engine that holds the source image (None: the default worker queue).
    docker_host: Mapped[str | None] = mapped_column(String(100))
    #: Where the image comes from (``worker.core.sources.SourceKind``): ``docker`` (the engine
    #: holds ``source_image``), ``registry``, ``oci-layout`` or ``docker-archive`` (then
    #: ``source_image`` holds the whole spec).
    # A server default only: a Python-side one would be sent by every INSERT, also to a
    # database still at an older revision (tests/integration/test_event_store.py writes at 0002).
    source_kind: Mapped[str] = mapped_column(String(20), server_default="docker")
    #: The registry a ``registry`` source reads from.
    source_registry_id: Mapped[int | None] = mapped_column(Integer)
    #: The immutable digest the pin step resolved the source to; what the push copies.
    source_digest: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    #: Waiting for a throttled registry never fails a job before this moment (flow control).
    deadline_at: Mapped[datetime | None] = mapped_column()


class StepRun(Base):
    """The claim on one step of one job against one registry: what makes a step run once.

    Mutable on purpose (it is a lock and a memo, not history); the event log holds the history.
    """

    __tablename__ = "step_runs"

    job_id: Mapped[str] = mapped_column(ForeignKey("push_jobs.id"), primary_key=True)
    step: Mapped[str] = mapped_column(String(40), primary_key=True)
    registry_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Event(Base):
    """One thing that happened. Rows are inserted, never updated or deleted (triggers enforce it;
    the one exception is retention, which deletes only events covered by an ``EventCheckpoint``).

    ``stream`` is ``job/<uuid>``, ``registry/<id>`` or ``audit``; ``seq`` numbers the events of
    one stream from 1, and ``UNIQUE(stream, seq)`` turns two concurrent writers into a key clash.

    Every event is a link of a hash chain in ``id`` order: ``hash`` is the SHA-256 of the event's
    canonical JSON, which includes ``prev_hash``, the hash of the event before it in its chain
    (see ``worker.store.chain`` and docs/event-log.md). Events before migration 0010 form one
    global chain (``lane`` NULL); later ones the chain of their ``lane``, a function of the stream.
    ``repository`` and ``outcome`` are derived from the payload and the type when the event is
    appended, so that they can be indexed.
    """

    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("stream", "seq", name="uq_events_stream_seq"),
        Index("ix_events_job", "job_id", "seq"),
        Index("ix_events_registry_time", "registry_id", "time"),
        Index("ix_events_type_time", "type", "time"),
        Index("ix_events_time", "time"),
        Index("ix_events_registry_outcome_time", "registry_id", "outcome", "time"),
        Index("ix_events_repository_type_time", "repository", "type", "time"),
        Index("ix_events_actor_time", "actor", "time"),
        # Only events with an outcome: "every failure since ..." (migration 0007).
        Index(
            "ix_events_outcome_time",
            "outcome",
            "time",
            postgresql_where=text("outcome IS NOT NULL"),
            sqlite_where=text("outcome IS NOT NULL"),
        ),
        # A filtered page of the log with no time bound, in id order (migration 0007).
        Index("ix_events_actor_id", "actor", "id"),
        Index("ix_events_repository_id", "repository", "id"),
        Index("ix_events_type_id", "type", "id"),
        # A lane's head, read by every append (migration 0010).
        Index("ix_events_lane_id", "lane", "id"),
    )

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    stream: Mapped[str] = mapped_column(String(80))
    seq: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str | None] = mapped_column(String(36))
    time: Mapped[datetime] = mapped_column(default=utcnow)
    type: Mapped[str] = mapped_column(String(40))
    step: Mapped[str | None] = mapped_column(String(40))
    registry_id: Mapped[int | None] = mapped_column(Integer)
    attempt: Mapped[int | None] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(200))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: The repository the event is about (from the payload, or the job's), for indexed queries.
    repository: Mapped[str | None] = mapped_column(String(255))
    #: ``succeeded``, ``failed``, ``skipped``, ``cancelled``, ``fallback`` or None (see events).
    outcome: Mapped[str | None] = mapped_column(String(20))
    #: The hash of the event before this one in its chain (or of the latest checkpoint).
    prev_hash: Mapped[str] = mapped_column(String(64))
    #: SHA-256 (hex) of this event's canonical JSON, ``prev_hash`` included.
    hash: Mapped[str] = mapped_column(String(64))
    #: The chain this event is a link of (``worker.store.chain.lane_of(stream)``); None: the
    #: version-1 global chain of the events recorded before migration 0010.
    lane: Mapped[int | None] = mapped_column(SmallInteger)
    #: The OpenTelemetry trace the event was recorded in (32 hex digits), if tracing was on.
    trace_id: Mapped[str | None] = mapped_column(String(32))


class EventCheckpoint(Base):
    """Where retention cut the chain: the events up to ``last_event_id`` were archived (or
    discarded) and deleted; the first remaining event links to ``last_hash``.

    Append-only like the events (triggers); each checkpoint is confirmed by an ``events.pruned``
    event appended in the same transaction, so a forged checkpoint does not verify.
    """

    __tablename__ = "event_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    first_event_id: Mapped[int] = mapped_column(EventId)
    last_event_id: Mapped[int] = mapped_column(EventId, index=True)
    #: The hash of the event ``last_event_id``: the chain's anchor for what remains.
    last_hash: Mapped[str] = mapped_column(String(64))
    #: How many events were removed.
    count: Mapped[int] = mapped_column(BigInteger)
    #: Events older than this were pruned.
    cutoff: Mapped[datetime] = mapped_column()
    #: The JSON-lines archive they were written to (None: discarded on purpose).
    archived_to: Mapped[str | None] = mapped_column(String(1000))
    #: SHA-256 of the archive file as written.
    archive_sha256: Mapped[str | None] = mapped_column(String(64))
    time: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))
    #: ``{lane name: [id, hash]}``: each chain's last pruned event, where its remaining events
    #: start (this checkpoint's and every earlier one's). None: a checkpoint from before the
    #: lanes, whose ``last_event_id``/``last_hash`` are the global chain's.
    heads: Mapped[dict[str, list[Any]] | None] = mapped_column(JSON)


class EventEpoch(Base):
    """Where the version-1 global chain ended and the lanes began (written once, by migration
    0010): every lane's first event links to ``v1_last_hash``.

    Append-only (triggers). The lanes' root is read from here, never recomputed from the events,
    so a version-1 tail removed later cannot become the root of a new lane unnoticed.
    """

    __tablename__ = "event_epochs"

    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: The last version-1 event (None: the log had none).
    v1_last_id: Mapped[int | None] = mapped_column(EventId)
    v1_last_hash: Mapped[str] = mapped_column(String(64))


class EventSeal(Base):
    """The heads of every lane at one moment, chained to the seal before it (docs/event-log.md).

    A lane's tail cannot be cut off below a seal without the seal noticing: verify finds every
    head of the latest seal in the log with its hash. Seals are written by one writer at a time
    (``worker.store.seals``), never by appenders, so they cost appends nothing.
    """

    __tablename__ = "event_seals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    time: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))
    #: ``{lane name: [id, hash]}``: each lane's newest event when the seal was taken.
    heads: Mapped[dict[str, list[Any]]] = mapped_column(JSON)
    #: The hash of the seal before this one (the genesis hash for the first).
    prev_hash: Mapped[str] = mapped_column(String(64))
    #: SHA-256 of the seal's canonical JSON (``worker.store.seals.seal_hash``).
    hash: Mapped[str] = mapped_column(String(64))
    #: HMAC-SHA256 of ``hash`` with a key derived from the secret key (``worker.core.signing``):
    #: someone who can write the database but lacks the key cannot forge a seal. None: sealed
    #: where no secret key was configured.
    signature: Mapped[str | None] = mapped_column(String(64))
    #: Which key signed it (a fingerprint, not the key), so a rotated key is told from a forgery.
    key_id: Mapped[str | None] = mapped_column(String(16))


class ApiToken(Base):
    """A credential of the HTTP API: a name, a role, optionally the registries it may push to.

    Only a hash of the token is stored; the token itself is shown once, when it is created.
    """

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    #: The registries a producer token may push to (None: any).
    registry_ids: Mapped[list[int] | None] = mapped_column(JSON)
    token_hash: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()
    last_used_at: Mapped[datetime | None] = mapped_column()


class WebhookSubscription(Base):
    """Where to deliver which committed events; ``cursor`` is the last event id looked at."""

    __tablename__ = "webhook_subscriptions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    url: Mapped[str] = mapped_column(String(2000))
    event_types: Mapped[list[str]] = mapped_column(JSON)
    registry_id: Mapped[int | None] = mapped_column(Integer)
    only_failures: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Deliveries to loopback, private or link-local addresses only when an operator said so.
    allow_private: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The signing secret, encrypted like registry secrets.
    secret: Mapped[str] = mapped_column(Text)
    cursor: Mapped[int] = mapped_column(EventId, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200))
    removed_at: Mapped[datetime | None] = mapped_column()


class WebhookDelivery(Base):
    """One event for one subscription, and how its delivery went (every attempt counted)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("subscription_id", "event_id", name="uq_webhook_delivery_event"),
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_job", "subscription_id", "job_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subscription_id: Mapped[int] = mapped_column(ForeignKey("webhook_subscriptions.id"))
    event_id: Mapped[int] = mapped_column(EventId)
    #: The event's job: a job's deliveries to one subscription go out in event order.
    job_id: Mapped[str | None] = mapped_column(String(36))
    #: The ``webhook-id`` header: the same for every attempt of this delivery.
    message_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    #: Failed attempts are retried until this moment plus ``PUSHWORKER_WEBHOOK_RETRY_FOR``
    #: (when it was planned, or redelivered by an operator).
    retry_since: Mapped[datetime] = mapped_column(default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_latency_ms: Mapped[float | None] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column()


class WebhookAttempt(Base):
    """One attempt of one delivery: inserted when a worker takes it (so an attempt whose worker
    died shows, unfinished), completed with the receiver's answer."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (UniqueConstraint("delivery_id", "attempt", name="uq_webhook_attempt"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("webhook_deliveries.id"))
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str] = mapped_column(String(200))


class Heartbeat(Base):
    """The last run of a periodic task (Celery beat's reconcile and registry health): one row
    per task, overwritten by each run. A quiet run records no event, so this row is how
    ``pushctl doctor`` and the metrics tell that beat (and a worker running its tasks) is alive."""

    __tablename__ = "heartbeats"

    task: Mapped[str] = mapped_column(String(100), primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    #: ``worker:<host>:<pid>``: the process that ran it.
    actor: Mapped[str] = mapped_column(String(200))
