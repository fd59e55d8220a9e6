"""Push jobs: creation (validated before anything is queued), operator retry and cancel, queries."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Select, and_, bindparam, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker.core.credentials import check_credential_configured
from worker.core.errors import (
    InvalidReference,
    InvalidStateTransition,
    JobNotFound,
    UnknownDockerHost,
    ValidationError,
)
from worker.core.reference import assert_resolves_to, build_target
from worker.core.settings import DOCKER_HOST_NAME, DOCKER_HOSTS_ENV, get_settings
from worker.core.sources import Source, SourceKind, check_path, docker_source, parse_source
from worker.core.text import refuse_control
from worker.engine.targets import target_refusal
from worker.registries import get_registry, job_chain
from worker.store import events
from worker.store.db import read_connection
from worker.store.models import Event, JobStatus, PushJob, Registry, StepRun, StepStatus, utcnow

MAX_SOURCE_IMAGE = 300
# The recorded actor is "producer:" + requested_by, in a 200-character column.
MAX_REQUESTED_BY = 191
MAX_REPOSITORY = 255  # Docker's limit for a repository name, and the column's
MAX_TAG = 128  # Docker's limit for a tag, and the column's
MAX_IDEMPOTENCY_KEY = 200
#: The largest id a record can have: the range of an ``Integer`` column on every backend
#: (PostgreSQL's is 32-bit; SQLite would keep more, and PostgreSQL would then refuse it).
MAX_ID = 2**31 - 1


#: The error code of a job that names a Docker host no worker serves.
def _unknown_docker_host(message: str, hint: str) -> UnknownDockerHost:
    return UnknownDockerHost(message, hint=hint)


def check_docker_host(name: str) -> str:
    """``name`` if jobs may name it; otherwise a ``ValidationError`` with the code
    ``unknown_docker_host`` that says what to do."""
    if not isinstance(name, str) or not DOCKER_HOST_NAME.fullmatch(name):
        raise _unknown_docker_host(
            f"docker_host {name!r} is not a Docker host name",
            hint="use 1 to 63 of a-z, 0-9, '.', '-' and '_', starting with a letter or digit",
        )
    known = get_settings().docker_hosts
    if name not in known:
        listed = ", ".join(known) if known else "none are configured"
        raise _unknown_docker_host(
            f"docker_host {name!r} is not a known Docker host ({listed})",
            hint=f"name the host whose engine holds the image, or add it to {DOCKER_HOSTS_ENV} "
            "and start a worker with PUSHWORKER_WORKER_HOST set to it",
        )
    return name


@dataclass(frozen=True)
class PushRequest:
    """What a producer asks for. Every field is checked before a job row exists."""

    source_image: str
    registry_id: int
    repository: str
    tag: str
    requested_by: str
    fallback: list[int] | None = None
    idempotency_key: str | None = None
    #: The named Docker Engine that holds ``source_image`` (None: the default queue's engine).
    docker_host: str | None = None
    #: Seconds the job may wait for its registry's limits (flow control) before it fails with
    #: ``throttled_past_deadline``; None: ``PUSHWORKER_FLOW_DEADLINE``.
    deadline: float | None = None
    #: A source spec (``worker.core.sources``: ``registry:``, ``oci-layout:``,
    #: ``docker-archive:``, ``docker:``) instead of ``source_image``, which is then "".
    source: str | None = None

    def parsed_source(self) -> Source:
        return (
            parse_source(self.source)
            if self.source is not None
            else docker_source(self.source_image)
        )


def create_job(session: Session, request: PushRequest, *, actor: str) -> tuple[PushJob, bool]:
    """The job for ``request`` and whether it is new; an idempotency key returns its job."""
    check_request(request)
    if request.idempotency_key:
        existing = session.scalar(
            select(PushJob).where(PushJob.idempotency_key == request.idempotency_key)
        )
        if existing is not None:
            return existing, False
    registry = _validate(session, request)
    source = _validate_source(session, request)
    # The registry's stored address and the chain (asked for, or stored) are checked now.
    chain = job_chain(session, registry, request.fallback)
    job = PushJob(
        idempotency_key=request.idempotency_key, source_image=source.stored,
        source_kind=source.kind.value, source_registry_id=source.registry_id,
        repository=request.repository, tag=request.tag, requested_registry_id=registry.id,
        effective_registry_id=registry.id, fallback_chain=chain,
        status=JobStatus.QUEUED.value, attempt=1, requested_by=request.requested_by,
        docker_host=request.docker_host, deadline_at=_deadline_at(request.deadline),
    )  # fmt: skip
    if not request.idempotency_key:
        # A new random id clashes with nothing: no savepoint (two round trips on PostgreSQL)
        # to catch a clash that cannot happen.
        session.add(job)
        session.flush()
    else:
        try:
            with session.begin_nested():
                session.add(job)
        except IntegrityError:
            # A concurrent request with the same idempotency key won: return its job.
            existing = session.scalar(
                select(PushJob).where(PushJob.idempotency_key == request.idempotency_key)
            )
            if existing is None:
                raise
            return existing, False
    events.append(
        session, stream=events.job_stream(job.id), type="job.enqueued", actor=actor,
        job_id=job.id, registry_id=registry.id, attempt=1,
        payload={
            "source_image": job.source_image, "repository": job.repository, "tag": job.tag,
            "reference": str(build_target(registry.host, job.repository, job.tag)),
            "fallback_chain": chain, "requested_by": job.requested_by,
            "idempotency_key": job.idempotency_key,
            **({"deadline_at": job.deadline_at.isoformat()} if job.deadline_at else {}),
            **({"source": str(source), "source_kind": source.kind.value}
               if source.kind is not SourceKind.DOCKER else {}),
            **({"source_registry_id": source.registry_id} if source.registry_id else {}),
        },
    )  # fmt: skip
    return job, True


#: The longest deadline a job may ask for: a week.
MAX_DEADLINE = 7 * 86400.0


def _deadline_at(seconds: float | None) -> datetime | None:
    if seconds is None:
        return None
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or not 0 < seconds <= MAX_DEADLINE
    ):
        raise ValidationError(
            f"deadline must be a number of seconds > 0 and at most {MAX_DEADLINE:.0f}, "
            f"not {seconds!r}"
        )
    return utcnow() + timedelta(seconds=seconds)


def check_id(field: str, value: object) -> int:
    """``value`` if it is a record id: an int (a bool is not an id, nor is ``"2"`` or 2.0)
    from 1 to ``MAX_ID``; otherwise a ``ValidationError`` naming the field."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValidationError(f"{field} must be an integer, not {type(value).__name__}")
    if not 1 <= value <= MAX_ID:
        raise ValidationError(f"{field} must be a registry id from 1 to {MAX_ID}")
    return int(value)


def check_text(
    field: str, value: object, max_length: int, error: type[ValidationError] = ValidationError
) -> str:
    """``value`` if it is a plain string of 1 to ``max_length`` characters without control
    characters (``worker.core.text``) or lone surrogates; otherwise ``error`` (a
    ``ValidationError``; ``InvalidReference`` for the parts of a reference)."""
    if not isinstance(value, str):
        raise error(f"{field} must be a string, not {type(value).__name__}")
    if not 1 <= len(value) <= max_length:
        raise error(f"{field} must be 1 to {max_length} characters")
    refuse_control(field, value)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError(f"{field} is not valid Unicode (a lone surrogate)") from None
    return value


def check_request(request: PushRequest) -> None:
    """Every field of ``request`` has exactly the type and range it is stored with, before
    anything reads or writes the database: an id is an int in the columns' range, text is a
    ``str`` without control characters. Nothing is coerced, so what is hashed is what is
    stored (a ``"2"`` or ``True`` in a chain would be hashed as sent and stored as 2 or 1)."""
    check_id("registry_id", request.registry_id)
    if request.source is not None:
        if request.source_image:
            raise ValidationError("give source_image or source, not both")
        kind = parse_source(request.source).kind  # the rules that need no database or files
        if request.docker_host is not None and kind is not SourceKind.DOCKER:
            raise ValidationError(
                f"docker_host names a Docker Engine, and a {kind.value} source uses none",
                hint="leave docker_host out: skopeo workers (queue pushworker.skopeo) copy it",
            )
    else:
        check_text("source_image", request.source_image, MAX_SOURCE_IMAGE)
    check_text("repository", request.repository, MAX_REPOSITORY, InvalidReference)
    check_text("tag", request.tag, MAX_TAG, InvalidReference)
    check_text("requested_by", request.requested_by, MAX_REQUESTED_BY)
    if request.idempotency_key is not None:
        check_text("idempotency_key", request.idempotency_key, MAX_IDEMPOTENCY_KEY)
    if request.docker_host is not None:
        check_text("docker_host", request.docker_host, 100)
    if request.fallback is not None:
        if not isinstance(request.fallback, list):
            raise ValidationError(
                f"fallback must be a list of registry ids, not {type(request.fallback).__name__}"
            )
        for index, member in enumerate(request.fallback):
            check_id(f"fallback[{index}]", member)


def _validate(session: Session, request: PushRequest) -> Registry:
    if request.source is None and (
        any(c.isspace() for c in request.source_image) or not request.source_image.isascii()
    ):
        raise ValidationError(f"source_image {request.source_image!r} is not an image reference")
    if request.docker_host is not None:
        check_docker_host(request.docker_host)
    registry = get_registry(session, request.registry_id)
    build_target(registry.host, request.repository, request.tag)
    check_credential_configured(registry)
    return registry


def _validate_source(session: Session, request: PushRequest) -> Source:
    """The request's source, checked as far as this host can: a file source's path inside
    ``PUSHWORKER_SOURCES_DIR``; a promotion's registry record usable, with a credential, and
    its reference resolving to that record's host (the reference guard, for the source)."""
    source = request.parsed_source()
    if source.kind is SourceKind.DOCKER:
        return source
    if source.kind.is_file:
        check_path(source, get_settings())
        return source
    assert source.registry_id is not None and source.repository is not None
    origin = get_registry(session, source.registry_id)
    refusal = target_refusal(origin, source.registry_id)
    if refusal is not None:
        raise refusal
    assert_resolves_to(f"{origin.host}/{source.repository}", origin.host, source.repository)
    check_credential_configured(origin)
    return source


def route_of(job_id: str) -> tuple[str | None, str]:
    """Where a job's steps run: its Docker host (None: none, or no such job) and the engine its
    source needs (``docker`` or ``skopeo``); one read that takes no lock, made on every publish."""
    with read_connection() as connection:
        row = connection.execute(_ROUTE_OF, {"job_id": job_id}).first()
    if row is None:
        return None, "docker"
    kind = row[1] if row[1] in {k.value for k in SourceKind} else SourceKind.DOCKER.value
    return row[0], SourceKind(kind).engine


_ROUTE_OF = select(PushJob.docker_host, PushJob.source_kind).where(
    PushJob.id == bindparam("job_id")
)
_DOCKER_HOST_OF = select(PushJob.docker_host).where(PushJob.id == bindparam("job_id"))


def docker_host_of(job_id: str) -> str | None:
    """The Docker host a job names (None: none, or no such job): one read that takes no lock,
    made on every publish."""
    with read_connection() as connection:
        return connection.execute(_DOCKER_HOST_OF, {"job_id": job_id}).scalar_one_or_none()


def get_job(session: Session, job_id: str, *, lock: bool = False) -> PushJob:
    """The job (``JobNotFound`` if none); with ``lock``, its row locked until the transaction
    ends (PostgreSQL; SQLite's write transactions hold the database's lock from their start)."""
    job = (
        session.get(PushJob, job_id, with_for_update=True, populate_existing=True)
        if lock
        else session.get(PushJob, job_id)
    )
    if job is None:
        raise JobNotFound(f"job {job_id} does not exist", hint="see `pushctl jobs list`")
    return job


def list_jobs(
    session: Session,
    *,
    status: str | None = None,
    registry_id: int | None = None,
    since: datetime | None = None,
    limit: int = 100,
    before: tuple[datetime, str] | None = None,
    enqueued_by: str | None = None,
    repository: str | None = None,
    requested_by: str | None = None,
) -> list[PushJob]:
    """Jobs, newest first (then by id, so that equal times have an order). ``before``: only
    jobs after this ``(created_at, id)`` in that order (a page's cursor); ``enqueued_by``: only
    jobs whose ``job.enqueued`` event names this actor (the HTTP API's producer tokens)."""
    query = select(PushJob)
    if status:
        query = query.where(PushJob.status == status)
    if registry_id is not None:
        query = query.where(PushJob.requested_registry_id == registry_id)
    if since is not None:
        query = query.where(PushJob.created_at >= since)
    if repository is not None:
        query = query.where(PushJob.repository == repository)
    if requested_by is not None:
        query = query.where(PushJob.requested_by == requested_by)
    if before is not None:
        created, job_id = before
        query = query.where(
            or_(
                PushJob.created_at < created,
                and_(PushJob.created_at == created, PushJob.id < job_id),
            )
        )
    if enqueued_by is not None:
        query = query.where(PushJob.id.in_(_enqueued_by(enqueued_by)))
    query = query.order_by(PushJob.created_at.desc(), PushJob.id.desc())
    return list(session.scalars(query.limit(limit)))


def _enqueued_by(actor: str) -> Select[tuple[str | None]]:
    return select(Event.job_id).where(Event.type == "job.enqueued", Event.actor == actor)


def job_enqueued_by(session: Session, job_id: str, actor: str) -> bool:
    """Whether the ``job.enqueued`` event of ``job_id`` names ``actor``."""
    found = session.scalar(_enqueued_by(actor).where(Event.job_id == job_id).limit(1))
    return found is not None


def job_for_key(session: Session, idempotency_key: str) -> PushJob | None:
    """The job made for ``idempotency_key``, if any."""
    return session.scalar(select(PushJob).where(PushJob.idempotency_key == idempotency_key))


def retry_job(session: Session, job_id: str, *, actor: str, reason: str | None) -> PushJob:
    """Put a failed or cancelled job back in the queue; steps that succeeded will be skipped.

    The status change is a conditional UPDATE, so two operators retrying at once make one retry.
    """
    job = get_job(session, job_id)
    if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
        raise InvalidStateTransition(
            f"job {job_id} is {job.status}; only failed or cancelled jobs can be retried"
        )
    previous = job.status
    now = utcnow()
    # The flow-control deadline starts again with the retry, as long as the job first had.
    window = (
        job.deadline_at - job.created_at
        if job.deadline_at is not None
        else timedelta(seconds=get_settings().flow_deadline)
    )
    changed = session.execute(
        update(PushJob)
        .where(PushJob.id == job_id, PushJob.status == previous, PushJob.attempt == job.attempt)
        .values(
            status=JobStatus.QUEUED.value, attempt=job.attempt + 1,
            effective_registry_id=job.requested_registry_id, current_step=None,
            error_code=None, error_message=None, finished_at=None, updated_at=now,
            deadline_at=now + window,
        )
        .execution_options(synchronize_session=False)
    )  # fmt: skip
    if changed.rowcount != 1:  # type: ignore[attr-defined]
        raise InvalidStateTransition(f"job {job_id} was retried by someone else just now")
    # The failed step starts counting its tries afresh.
    session.execute(
        update(StepRun)
        .where(StepRun.job_id == job_id, StepRun.status == StepStatus.FAILED.value)
        .values(attempts=0)
        .execution_options(synchronize_session=False)
    )
    session.refresh(job)
    events.append(
        session, stream=events.job_stream(job_id), type="job.retried", actor=actor,
        job_id=job_id, registry_id=job.requested_registry_id, attempt=job.attempt,
        payload={"reason": reason or "", "previous_status": previous, "job_attempt": job.attempt},
    )  # fmt: skip
    return job


def cancel_job(session: Session, job_id: str, *, actor: str, reason: str | None) -> PushJob:
    # The row locked as it is read: a step that ends the job meanwhile (its last step marking
    # it succeeded) is waited for and seen, never overwritten with "cancelled".
    job = get_job(session, job_id, lock=True)
    if JobStatus(job.status).is_final:
        raise InvalidStateTransition(f"job {job_id} is {job.status} already")
    previous = job.status
    job.status, job.finished_at = JobStatus.CANCELLED.value, utcnow()
    events.append(
        session, stream=events.job_stream(job_id), type="job.cancelled", actor=actor,
        job_id=job_id, registry_id=job.effective_registry_id, attempt=job.attempt,
        payload={"reason": reason or "", "previous_status": previous},
    )  # fmt: skip
    return job
