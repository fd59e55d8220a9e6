"""The routes: parse, authorise, call the services the CLI calls, render."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import kombu
import redis
from fastapi import APIRouter, Body, Depends, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.models import Dependant
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from sqlalchemy import text
from sse_starlette import EventSourceResponse

from worker import health as registry_health
from worker import jobs, producer
from worker.api.auth import require
from worker.api.errors import ERROR_RESPONSES, ApiError
from worker.api.models import (
    EventOut,
    EventPage,
    Health,
    Job,
    JobPage,
    JobWithEvents,
    Liveness,
    Readiness,
    Reason,
    RegistryOut,
    TestReport,
    api_push_schema,
)
from worker.contract import request_from_call
from worker.core.brokers import broker_kind
from worker.core.credentials import CredentialKind
from worker.core.errors import JobNotFound, PushWorkerError, ValidationError
from worker.core.settings import get_settings
from worker.core.sources import parse_source
from worker.jobs import (
    MAX_ID,
    MAX_IDEMPOTENCY_KEY,
    cancel_job,
    check_text,
    get_job,
    job_enqueued_by,
    job_for_key,
    retry_job,
)
from worker.probe import check_registry, record_test
from worker.registries import get_registry, list_registries
from worker.store import events, queries
from worker.store.chain import Outcome
from worker.store.db import read_connection, read_scope, read_snapshot, session_scope
from worker.store.models import JobStatus, PushJob, Registry
from worker.tokens import Principal


def _declared_query(dependant: Dependant) -> frozenset[str]:
    """The query parameters a route reads: its own and its dependencies' (by alias)."""
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _declared_query(sub)
    return frozenset(names)


async def only_declared_query(request: Request) -> None:
    """A dependency of every route of the API: a query parameter the route does not declare
    (any name, the empty one included) is 422 ``invalid_input`` naming it, never accepted and
    ignored (the OpenAPI document lists each route's parameters, and no others are taken)."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    declared = _declared_query(route.dependant)
    unknown = [name for name in request.query_params if name not in declared]
    if unknown:
        name = unknown[0]
        shown = repr(name[:40] + ("..." if len(name) > 40 else "")) if name else "'' (no name)"
        takes = ", ".join(sorted(declared)) or "no query parameters"
        raise ApiError(
            422, "invalid_input", f"unknown query parameter {shown}",
            hint=f"this route takes {takes} (see /openapi.json)",
        )  # fmt: skip


router = APIRouter(
    dependencies=[Depends(only_declared_query)],
    responses={422: ERROR_RESPONSES[422]},
)
NDJSON = "application/x-ndjson"
#: How often the event stream of a job looks for new events.
STREAM_POLL = 0.5

Id = Annotated[int, Query(ge=1, le=MAX_ID)]


# --- helpers ---------------------------------------------------------------------------------


def _plain(field: str, value: str | None, limit: int = 200) -> str | None:
    if value is None:
        return None
    return check_text(field, value, limit)


_DURATION = re.compile(r"(?:[0-9]{1,9}[smhdw])+")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: A moment of a filter: a duration ago (``2h``, ``1d12h``) or an ISO 8601 time (UTC if no zone).
Moment = Annotated[
    str | None,
    Query(
        min_length=1, max_length=40,
        description="That long ago (30m, 2h, 1d, 1h30m) or an ISO 8601 time (UTC if no zone)",
        examples=["2h", "2026-01-31T12:00:00Z"],
    ),
]  # fmt: skip


def _moment(field: str, value: str | None) -> datetime | None:
    """``since``/``until`` as `pushctl` reads them: a duration ago, or an ISO 8601 time."""
    if value is None:
        return None
    text = value.strip().lower()
    if _DURATION.fullmatch(text):
        seconds = sum(int(n) * _SECONDS[unit] for n, unit in re.findall(r"([0-9]+)([smhdw])", text))
        try:
            return datetime.now(UTC) - timedelta(seconds=seconds)
        except OverflowError:
            raise ValidationError(f"{field} is too long ago") from None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValidationError(
            f"{field} is neither a duration (30m, 2h, 1d, 1h30m) nor an ISO 8601 time"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _readable_job(session: Any, job_id: str, who: Principal) -> PushJob:
    """The job, if ``who`` may read it: a producer reads only the jobs it created (another's is
    answered like a job that does not exist)."""
    check_text("job id", job_id, 36)
    job = get_job(session, job_id)
    if who.role == "producer" and not job_enqueued_by(session, job_id, who.actor):
        raise JobNotFound(f"job {job_id} does not exist", hint="see GET /v1/jobs")
    return job


def _encode_cursor(*parts: object) -> str:
    raw = json.dumps([str(part) for part in parts]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str, size: int) -> list[str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        parts = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError):
        parts = None
    if (
        not isinstance(parts, list)
        or len(parts) != size
        or not all(isinstance(p, str) for p in parts)
    ):
        raise ValidationError(
            "cursor is not a cursor of this listing", hint="give next_cursor as it was returned"
        )
    return parts


# --- pushes ----------------------------------------------------------------------------------


@router.post(
    "/v1/pushes",
    status_code=201,
    response_model=Job,
    responses={
        **ERROR_RESPONSES,
        200: {"model": Job, "description": "the job of an earlier request with this key"},
        201: {"description": "a new job"},
    },
    openapi_extra={"requestBody": {"content": {"application/json": {"schema": api_push_schema()}}}},
    tags=["pushes"],
)
def create_push(
    body: Annotated[dict[str, Any], Body()],
    response: Response,
    who: Annotated[Principal, Depends(require("push"))],
    idempotency_key: Annotated[
        str, Header(alias="Idempotency-Key", min_length=1, max_length=MAX_IDEMPOTENCY_KEY)
    ],
) -> Job:
    """Ask for a push: the same checks as `enqueue_push` (and the message contract). The same
    Idempotency-Key returns the first job (200) instead of making a second one."""
    check_text("Idempotency-Key", idempotency_key, MAX_IDEMPOTENCY_KEY)
    request = dict(body)
    if "idempotency_key" in request:
        raise ValidationError(
            "idempotency_key is not a field of the body",
            hint="send it as the Idempotency-Key header",
        )
    request.setdefault("requested_by", who.actor)
    request["idempotency_key"] = idempotency_key
    checked = request_from_call([request], {})
    registry_ids = [checked["registry_id"], *checked.get("fallback", [])]
    # A promotion reads with the source registry's credential: the token must be allowed it too.
    registry_ids += [rid for rid in [_source_registry_id(checked)] if rid is not None]
    refused = [rid for rid in registry_ids if not who.may_use_registry(rid)]
    if refused:
        raise ApiError(
            403, "forbidden",
            f"token {who.name!r} may not push to registry {refused[0]}",
            hint=f"this token may push to registries {list(who.registry_ids or [])}",
        )  # fmt: skip
    with read_scope() as session:
        existing = job_for_key(session, idempotency_key)
        if existing is not None:
            _same_request(session, existing, checked, who)
            response.status_code = 200
            return Job.of(existing)
    job_id = producer.enqueue_push(**checked, actor=who.actor)
    with read_scope() as session:
        return Job.of(get_job(session, job_id))


def _source_registry_id(request: dict[str, Any]) -> int | None:
    return parse_source(request["source"]).registry_id if "source" in request else None


def _same_request(session: Any, job: PushJob, request: dict[str, Any], who: Principal) -> None:
    """A repeated Idempotency-Key must come with the same push (and, for a producer, from the
    same token): otherwise 409, naming neither the other request nor its job."""
    source = (
        parse_source(request["source"]).stored if "source" in request else request["source_image"]
    )
    asked = (source, request["registry_id"], request["repository"], request["tag"])
    made = (job.source_image, job.requested_registry_id, job.repository, job.tag)
    own = who.role != "producer" or job_enqueued_by(session, job.id, who.actor)
    if asked != made or not own:
        raise ApiError(
            409, "idempotency_key_reused",
            "this Idempotency-Key was used for another push request",
            hint="use a new key for each intended push; repeat a key only to repeat a request",
        )  # fmt: skip


# --- jobs ------------------------------------------------------------------------------------


@router.get("/v1/jobs/{job_id}", response_model=JobWithEvents, responses=ERROR_RESPONSES,
            tags=["jobs"])  # fmt: skip
def read_job(
    job_id: str, who: Annotated[Principal, Depends(require("read_jobs"))]
) -> JobWithEvents:
    """A job and its events, oldest first."""
    with read_scope() as session:
        job = _readable_job(session, job_id, who)
        rows = queries.select_events(session, job_id=job_id)
        return JobWithEvents(job=Job.of(job), events=[EventOut.of(row) for row in rows])


@router.get("/v1/jobs", response_model=JobPage, responses=ERROR_RESPONSES, tags=["jobs"])
def list_jobs(
    who: Annotated[Principal, Depends(require("read_jobs"))],
    status: Annotated[JobStatus | None, Query()] = None,
    registry: Id | None = None,
    since: Moment = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
) -> JobPage:
    """Jobs, newest first, as `pushctl jobs list` filters them; a producer sees its own."""
    before = None
    if cursor is not None:
        created_text, last_id = _decode_cursor(cursor, 2)
        try:
            before = (datetime.fromisoformat(created_text), last_id)
        except ValueError:
            raise ValidationError("cursor is not a cursor of this listing") from None
    with read_scope() as session:
        rows = jobs.list_jobs(
            session, status=status.value if status else None, registry_id=registry,
            since=_moment("since", since), limit=limit + 1, before=before,
            enqueued_by=who.actor if who.role == "producer" else None,
        )  # fmt: skip
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = _encode_cursor(rows[-1].created_at.isoformat(), rows[-1].id) if more else None
    return JobPage(items=[Job.of(row) for row in rows], next_cursor=next_cursor)


@router.post("/v1/jobs/{job_id}/retry", response_model=Job, responses=ERROR_RESPONSES,
             tags=["jobs"])  # fmt: skip
def retry(
    job_id: str, reason: Reason, who: Annotated[Principal, Depends(require("operate_jobs"))]
) -> Job:
    """Queue a failed or cancelled job again (steps that succeeded are skipped)."""
    check_text("job id", job_id, 36)
    check_text("reason", reason.reason, 500)
    with session_scope() as session:
        job = retry_job(session, job_id, actor=who.actor, reason=reason.reason)
        registry_id = job.requested_registry_id
    producer.publish(job_id, registry_id)  # after the commit, as the CLI does
    with read_scope() as session:
        return Job.of(get_job(session, job_id))


@router.post("/v1/jobs/{job_id}/cancel", response_model=Job, responses=ERROR_RESPONSES,
             tags=["jobs"])  # fmt: skip
def cancel(
    job_id: str, reason: Reason, who: Annotated[Principal, Depends(require("operate_jobs"))]
) -> Job:
    """Cancel a queued or running job: steps not yet started are skipped."""
    check_text("job id", job_id, 36)
    check_text("reason", reason.reason, 500)
    with session_scope() as session:
        job = cancel_job(session, job_id, actor=who.actor, reason=reason.reason)
        return Job.of(job)


@router.get(
    "/v1/jobs/{job_id}/events/stream",
    responses={
        **ERROR_RESPONSES,
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "Server-Sent Events: one per event of the job (`event:` its type, "
            "`id:` its id, `data:` the event as JSON), until the job has ended",
        },
    },
    response_class=Response,
    tags=["jobs"],
)
async def stream_job_events(
    job_id: str,
    who: Annotated[Principal, Depends(require("read_jobs"))],
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
) -> Response:
    """The job's events as Server-Sent Events, from the first (or after Last-Event-ID), until
    the job has ended."""

    def first() -> None:
        with read_scope() as session:
            _readable_job(session, job_id, who)

    await run_in_threadpool(first)
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0

    def poll(after_id: int) -> tuple[list[EventOut], bool]:
        with read_scope() as session:
            rows = queries.select_events(session, job_id=job_id, after_id=after_id, limit=500)
            ended = JobStatus(get_job(session, job_id).status).is_final
            return [EventOut.of(row) for row in rows], ended

    async def feed() -> AsyncIterator[dict[str, str]]:
        last = after
        while True:
            rows, ended = await run_in_threadpool(poll, last)
            for row in rows:
                last = row.id
                yield {"event": row.type, "id": str(row.id), "data": row.model_dump_json()}
            if ended and not rows:
                return
            if not rows:
                await asyncio.sleep(STREAM_POLL)

    return EventSourceResponse(feed(), ping=15)


# --- events ----------------------------------------------------------------------------------


@router.get(
    "/v1/events",
    response_model=EventPage,
    responses={
        **ERROR_RESPONSES,
        200: {
            "content": {NDJSON: {"schema": {"type": "string"}}},
            "description": "a page of events (JSON), or with `Accept: application/x-ndjson` "
            "every matching event after the cursor, one JSON object per line, streamed",
        },
    },
    tags=["events"],
)
def list_events(
    request: Request,
    who: Annotated[Principal, Depends(require("read_events"))],
    job: Annotated[str | None, Query(max_length=36)] = None,
    registry: Id | None = None,
    repository: Annotated[str | None, Query(max_length=255)] = None,
    type: Annotated[list[str] | None, Query(max_length=40)] = None,
    outcome: Annotated[list[Outcome] | None, Query(max_length=20)] = None,
    actor: Annotated[str | None, Query(max_length=200)] = None,
    since: Moment = None,
    until: Moment = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=20, pattern="^[0-9]+$")] = None,
) -> Any:
    """Events in the log's order (oldest first), filtered as `pushctl events` does."""
    for index, value in enumerate([*(type or []), *(outcome or [])]):
        _plain(f"type/outcome[{index}]", value)
    query = queries.EventQuery(
        job_id=_plain("job", job), registry_id=registry,
        repository=_plain("repository", repository, 255), types=type or None,
        outcomes=outcome or None, actor=_plain("actor", actor), since=_moment("since", since),
        until=_moment("until", until), after_id=int(cursor) if cursor else 0,
    )  # fmt: skip
    if query.after_id is not None and query.after_id > 2**63 - 1:
        raise ValidationError("cursor is not a cursor of this listing")
    if NDJSON in request.headers.get("accept", ""):
        return StreamingResponse(_ndjson(query), media_type=NDJSON)
    with read_scope() as session:
        rows = list(session.scalars(query.select(limit=limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return EventPage(
        items=[EventOut.of(row) for row in rows],
        next_cursor=str(rows[-1].id) if more else None,
    )


def _ndjson(query: queries.EventQuery) -> Iterator[bytes]:
    with read_snapshot() as connection:
        for record in queries.iter_records(connection, query):
            yield (json.dumps(record, default=str) + "\n").encode()


# --- registries ------------------------------------------------------------------------------


def _credential(registry: Registry) -> str:
    if not registry.auth_required:
        return "anonymous"
    if registry.credential_kind == CredentialKind.SECRET:
        return "secret"
    if registry.credential_kind in (CredentialKind.ENV, CredentialKind.FILE):
        return f"{registry.credential_kind}:{registry.credential_ref}"
    return "none"


def _health(session: Any, registry_id: int) -> Health:
    rows = queries.select_events(
        session, stream=events.registry_stream(registry_id), types=[registry_health.EVENT],
        newest_first=True, limit=1,
    )  # fmt: skip
    if not rows:
        return Health(status=None, since=None)
    return Health(status=str(rows[0].payload.get("status")), since=rows[0].time)


@router.get("/v1/registries", response_model=list[RegistryOut], responses=ERROR_RESPONSES,
            tags=["registries"])  # fmt: skip
def registries(who: Annotated[Principal, Depends(require("read_registries"))]) -> list[RegistryOut]:
    """The registries (a producer token limited to some sees those), with their last recorded
    health; credentials are described, never shown."""
    with read_scope() as session:
        return [
            RegistryOut(
                id=r.id,
                name=r.name,
                url=r.url,
                host=r.host,
                kind=r.kind,
                credential=_credential(r),
                insecure=r.insecure,
                fallback_chain=list(r.fallback_chain or []),
                health=_health(session, r.id),
            )
            for r in list_registries(session)
            if who.role != "producer" or who.may_use_registry(r.id)
        ]


@router.post("/v1/registries/{registry_id}/test", response_model=TestReport,
             responses=ERROR_RESPONSES, tags=["registries"])  # fmt: skip
def test_registry(
    registry_id: Annotated[int, Path(ge=1, le=MAX_ID)],
    who: Annotated[Principal, Depends(require("test_registries"))],
) -> TestReport:
    """The connection test of `pushctl registry test` (dns, tcp, tls, /v2/, credentials),
    recorded as a `registry.tested` event."""
    with read_scope() as session:
        registry = get_registry(session, registry_id)
    # The network part runs outside any transaction (no write lock held meanwhile).
    report = check_registry(registry, timeout=get_settings().http_timeout)
    with session_scope() as session:
        record_test(session, registry_id, report, who.actor)
    return TestReport.model_validate(report.to_dict())


# --- health ----------------------------------------------------------------------------------


@router.get("/healthz", response_model=Liveness, tags=["health"])
def healthz() -> Liveness:
    """The process answers."""
    return Liveness(status="ok")


def _ping_broker(url: str) -> None:
    """Raise unless the broker answers: a Redis PING, or an AMQP connection handshake."""
    if broker_kind(url) == "redis":
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
        return
    with kombu.Connection(url, connect_timeout=2) as connection:
        connection.connect()


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "the database or the broker is away"}},
    tags=["health"],
)
def readyz(response: Response) -> Readiness:
    """Ready when the database and the broker answer."""
    database = broker = "ok"
    try:
        with read_connection() as connection:
            connection.execute(text("SELECT 1"))
    except (PushWorkerError, Exception) as exc:  # any failure means "not ready"
        database = f"unavailable ({type(exc).__name__})"
    try:
        _ping_broker(get_settings().broker_url)
    except Exception as exc:  # any failure means "not ready"
        broker = f"unavailable ({type(exc).__name__})"
    ready = database == "ok" and broker == "ok"
    if not ready:
        response.status_code = 503
    return Readiness(status="ready" if ready else "unavailable", database=database, broker=broker)
