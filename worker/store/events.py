"""The append-only event log's recorder: ``append`` (reading is ``worker.store.queries``; verify,
export, retention and seals are ``worker.store.verify``, ``export``, ``retention``, ``seals``).

Every event is a link of the hash chain of its lane (``worker.store.chain``): its ``hash`` is the
SHA-256 of its canonical JSON, which holds the hash of the lane's previous event. Appenders of one
lane are serialised so that its chain stays a line: SQLite takes its write lock at the start of
every transaction (``worker.store.db``), PostgreSQL takes a transaction-level advisory lock on
the lane here, in ``append``, held until the transaction ends. Appenders of different lanes do
not wait for each other. See docs/event-log.md.

Every appended event is also one structlog line with the same fields, written after the
transaction that stored it commits (a rolled-back event is not logged as if it happened), and
handed to the subscribers (``subscribe``). Only the project's own sessions do this: the hooks
are registered on its sessionmaker (``worker.store.db``), not on every Session of the process.
Payloads pass an allow-list of keys, so a credential cannot be recorded by accident.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC
from functools import cached_property
from typing import Any

from sqlalchemy import (
    BindParameter,
    Connection,
    Select,
    String,
    TextClause,
    bindparam,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from worker.core.errors import EventConflict, StorageError, ValidationError
from worker.core.logs import get_logger
from worker.core.settings import get_settings
from worker.core.tracing import current_trace_id
from worker.store.chain import (
    canonical_parts,
    chain_hash,
    derive_outcome,
    lane_name,
    lane_of,
)
from worker.store.models import Event, EventCheckpoint, EventEpoch, PushJob, utcnow
from worker.store.queries import event_fields

log = get_logger("pushworker.events")

#: The only keys an event payload may carry: descriptions, never secrets.
ALLOWED_PAYLOAD_KEYS = frozenset(
    {
        "source_image", "repository", "tag", "reference", "image_id", "digest", "size",
        "registry_host", "registry_name", "requested_registry_id", "fallback_chain",
        "from_registry_id", "to_registry_id", "reason", "error_code", "error_message", "hint",
        "will_retry", "retry_in", "try", "credential_source", "username", "requested_by",
        "idempotency_key", "bytes_pushed", "bytes_total", "layers_done", "layers_total",
        "refusals", "previous_status", "owner", "checks", "ok", "status", "latency_ms",
        "job_attempt", "noop",
        # what a registry and the engine each said when an authentication failure was checked
        "observed", "retry_after",
        # chain members a fallback passed over (removed, unusable): registry id and why
        "skipped",
        # poison messages (message.rejected)
        "task_name", "queue", "content_type", "body_bytes", "message_id",
        # retention (events.pruned)
        "first_event_id", "last_event_id", "last_hash", "count", "cutoff", "archived_to",
        "archive_sha256", "heads_sha256",
        # flow control (step.waiting, registry.throttled / registry.unthrottled, limits)
        "ahead", "holders", "limit", "effective_limit", "previous_limit", "max_concurrent",
        "rate_per_second", "deadline_at",
        # webhooks (webhook.added, webhook.removed, webhook.redelivered): never the URL's path or
        # query (it may hold a token) and never the signing secret
        "webhook_id", "url_host", "event_types", "only_failures", "allow_private", "delivery_id",
        # API tokens (token.created, token.revoked): name, role, scope; never the token or hash
        # ("name", not "token_name": log lines mask keys that say "token")
        "name", "role", "registry_ids", "expires_at",
        # registry.updated: that the credential was replaced (never what it is)
        "credential_replaced",
        # sources other than the Docker Engine (docs/sources.md): the spec, the registry a
        # promotion reads from and its credential's source, the pinned digest, "pin" or "tag"
        "source", "source_kind", "source_registry_id", "source_digest",
        "source_credential_source", "source_username", "action",
    }
)  # fmt: skip

#: The key of the PostgreSQL advisory lock of the log's housekeeping ("pushevnt"): retention and
#: seals take it, one at a time; appenders never do.
CHAIN_LOCK_KEY = int.from_bytes(b"pushevnt", "big")
#: The first key of a lane's advisory lock (the second is the lane): "pwln" as a signed int4.
LANE_LOCK_CLASS = int.from_bytes(b"pwln", "big", signed=True)
#: The stream of the log's own housekeeping (retention).
AUDIT_STREAM = "audit"


def job_stream(job_id: str) -> str:
    return f"job/{job_id}"


def registry_stream(registry_id: int) -> str:
    return f"registry/{registry_id}"


def worker_actor() -> str:
    return f"worker:{socket.gethostname()}:{os.getpid()}"


def operator_actor(name: str | None = None) -> str:
    who = name or get_settings().operator or _login_name()
    return f"operator:{who}"


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


#: Deadlock, serialisation failure, lock not available: nothing was written, try again.
_RETRYABLE = ("40P01", "40001", "55P03")


@contextmanager
def _lock_waits_retryable() -> Iterator[None]:
    """A deadlock with a writer that holds a lock this statement waits for (and waits for a row
    this transaction locked) is retryable, like a sequence clash: ``EventConflict``."""
    try:
        yield
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) in _RETRYABLE:
            raise EventConflict("the event chain is busy (deadlock); try again") from None
        raise


def lock_chain(session: Session) -> None:
    """Serialise the log's housekeeping (retention, seals) on PostgreSQL until this transaction
    ends (SQLite: already done). Appends do not take it."""
    if session.get_bind().dialect.name == "postgresql":
        with _lock_waits_retryable():
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHAIN_LOCK_KEY})


def lanes_root(session: Session) -> str:
    """The hash every lane's first event links to (``EventEpoch``, written by migration 0010).

    Read only when a lane has no event yet (at most once per lane of a database), so it is not
    cached: a restored database must never be chained to another one's root.
    """
    found = session.scalar(select(EventEpoch.v1_last_hash).where(EventEpoch.version == 2))
    if found is None:
        raise ValidationError(
            "the event log has no lanes' root (event_epochs): run `pushctl db upgrade`"
        )
    return str(found)


def _checkpoint_head(session: Session, lane: int) -> tuple[int | None, str] | None:
    """Where ``lane`` resumes after retention pruned all its events: the latest checkpoint's
    head of the lane, or None."""
    checkpoint = session.execute(
        select(EventCheckpoint.heads, EventCheckpoint.last_event_id)
        .order_by(EventCheckpoint.id.desc())
        .limit(1)
    ).first()
    if checkpoint is None:
        return None
    heads = checkpoint[0] or {}
    head = heads.get(lane_name(lane))
    return (int(head[0]), str(head[1])) if head else None


def _newest_checkpoint_id(session: Session) -> int:
    return int(session.scalar(select(func.max(EventCheckpoint.last_event_id))) or 0)


@dataclass(frozen=True)
class _AppendState:
    last_seq: int
    head_hash: str | None
    job_repository: str | None
    #: PostgreSQL: the id the sequence gave this event. SQLite: the newest id (or None).
    next_or_newest_id: int | None


def _sqlite_state_query() -> Select[Any]:
    """What an append reads on SQLite, in one round trip: the stream's last seq, its lane's
    head, the repository of the job (for the indexed ``repository`` column) and the newest id
    (the event's id is hashed, so it is known before the insert). PostgreSQL reads the same
    through ``pushworker_append_state`` (migration 0010), with its lane's lock and ``nextval``."""
    events, jobs = Event.__table__, PushJob.__table__
    head = (
        select(events.c.hash)
        .where(events.c.lane == bindparam("lane"))
        .order_by(events.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    return select(
        select(func.max(events.c.seq))
        .where(events.c.stream == bindparam("stream"))
        .scalar_subquery(),
        head,
        select(jobs.c.repository).where(jobs.c.id == bindparam("job_id")).scalar_subquery(),
        select(func.max(events.c.id)).scalar_subquery(),
    )


# Built once: SQLAlchemy memoises a statement's cache key on the statement object, so a
# statement built per call pays for its key (a walk of the whole tree) every time. Appends are
# the hottest path there is (about ten per job).
_SQLITE_STATE = _sqlite_state_query()
_INSERT_EVENT = insert(Event)


#: PostgreSQL: the lane's lock and the state query in one round trip (migration 0010).
_LOCKED_STATE = text("SELECT * FROM pushworker_append_state(:cls, :lane, :stream, :job_id)")


_EVENTS = Event.__table__
#: PostgreSQL: the whole append in one round trip (migration 0011): the lane's lock, the
#: values only the database knows (id, seq, the lane's head, the job's repository, the time)
#: put into the canonical form the recorder sent in parts, the hash, the insert. No row back: the
#: recorder's own way is needed (``_append_linked``).
_APPEND_EVENT_SQL = (
    "SELECT * FROM pushworker_append_event(:cls, :lane, :stream, :job_id, :type, :step, "
    ":registry_id, :attempt, :actor, :payload, :repository, :repository_json, :outcome, "
    ":trace_id, :part0, :part1, :part2, :part3, :part4, :part5)"
)
_APPEND_EVENT = (
    text(_APPEND_EVENT_SQL)
    .bindparams(bindparam("payload", type_=_EVENTS.c.payload.type))
    .columns(
        _EVENTS.c.id,
        _EVENTS.c.seq,
        _EVENTS.c.prev_hash,
        _EVENTS.c.repository,
        _EVENTS.c.time,
        _EVENTS.c.hash,
    )
)


def _append_linked(
    connection: Connection, values: dict[str, Any], repository_known: bool
) -> dict[str, Any] | None:
    """The event appended by ``pushworker_append_event`` (PostgreSQL): its stored fields, or
    None when the database left the append to the recorder's own way (a lane with no event
    yet, a job repository whose JSON it does not write).

    The hash the database computed is recomputed here from what it filled in, before the
    transaction commits: an event that would not verify is never stored.
    """
    params = _linked_params(values, repository_known)
    with _appending(values["stream"]):
        row = connection.execute(_APPEND_EVENT, params).first()
    return None if row is None else _checked_link(values, tuple(row))


def _linked_params(values: dict[str, Any], repository_known: bool) -> dict[str, Any]:
    """What ``pushworker_append_event`` takes for the event ``values`` (its canonical form cut
    into parts, the lane's lock class, the repository's JSON when the recorder knows it)."""
    parts = canonical_parts(values)
    repository = values["repository"]
    return {
        **values, "cls": LANE_LOCK_CLASS,
        **{f"part{index}": part for index, part in enumerate(parts)},
        "repository_json": json.dumps(repository) if repository_known else None,
    }  # fmt: skip


@contextmanager
def _appending(stream: str) -> Iterator[None]:
    """Around a statement that appends to ``stream``: a clash on one of the events table's keys
    is ``EventConflict``. Any other constraint the statement breaks (a guard's row change, say)
    is a bug, raised as it is."""
    try:
        with _lock_waits_retryable():
            yield
    except IntegrityError as exc:
        diagnostics = getattr(exc.orig, "diag", None)
        if getattr(diagnostics, "table_name", None) != Event.__tablename__:
            raise
        raise EventConflict(f"another writer appended to {stream} first") from None


def _checked_link(values: dict[str, Any], linked_row: tuple[Any, ...]) -> dict[str, Any]:
    """``values`` with what the database filled in (``linked_row``: id, seq, previous hash,
    repository, time, hash), its hash checked against this version's."""
    ident, seq, prev_hash, stored_repository, time, digest = linked_row
    # As the events table's type gives it back (UTC), whatever the session's TimeZone: an
    # untyped statement (a guarded append) returns the server's zone.
    time = time.astimezone(UTC)
    linked = {
        **values, "id": int(ident), "seq": int(seq), "prev_hash": str(prev_hash),
        "repository": stored_repository, "time": time, "hash": str(digest),
    }  # fmt: skip
    if chain_hash(linked) != linked["hash"]:
        raise StorageError(
            f"the database linked event {ident} of {values['stream']} with a hash this version "
            "does not compute; nothing was stored",
            hint="the database's pushworker_append_event is not this version's: "
            "run `pushctl db upgrade` with this version",
        )
    return linked


def _append_state(session: Session, stream: str, lane: int, job_id: str | None) -> _AppendState:
    """What an append reads, under its lane's lock (taken here on PostgreSQL; SQLite's write
    lock is already held)."""
    connection = session.connection()
    params = {"stream": stream, "lane": lane, "job_id": job_id}
    if connection.dialect.name == "postgresql":
        with _lock_waits_retryable():
            row = connection.execute(_LOCKED_STATE, {**params, "cls": LANE_LOCK_CLASS}).one()
    else:
        row = connection.execute(_SQLITE_STATE, params).one()
    last_seq, head_hash, job_repository, ident = row
    return _AppendState(
        int(last_seq or 0),
        None if head_hash is None else str(head_hash),
        job_repository,
        None if ident is None else int(ident),
    )


def _lane_head(session: Session, lane: int, found: str | None) -> str:
    """The hash the lane's next event links to: its newest event's, else where retention left
    it, else the lanes' root."""
    if found is not None:
        return found
    resumed = _checkpoint_head(session, lane)
    return resumed[1] if resumed is not None else lanes_root(session)


def _checked_payload(payload: Mapping[str, Any] | None) -> dict[str, Any]:
    payload = dict(payload or {})
    unknown = set(payload) - ALLOWED_PAYLOAD_KEYS
    if unknown:
        raise ValidationError(f"event payload keys not allowed: {sorted(unknown)}")
    try:
        # Exactly what the database will give back (tuples become lists, and so on): the hash
        # is taken over what a verifier reads, not over what the caller happened to pass.
        normal: dict[str, Any] = json.loads(json.dumps(payload, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"event payload is not plain JSON: {exc}") from None
    return normal


#: The range of an ``Integer`` column on every backend (PostgreSQL's ``integer`` is 32-bit;
#: SQLite would take more, and then PostgreSQL would refuse what SQLite kept).
INT_MIN, INT_MAX = -(2**31), 2**31 - 1


def _length(name: str) -> int:
    kind = Event.__table__.c[name].type
    assert isinstance(kind, String) and kind.length, f"events.{name} is a bounded String"
    return kind.length


#: Each text column's length limit, read from the model so that the two cannot drift apart.
_TEXT_LIMITS = {
    name: _length(name)
    for name in ("stream", "job_id", "type", "step", "actor", "repository", "outcome")
}


def stored_text(name: str, value: object, *, required: bool = False) -> str | None:
    """``value`` exactly as the text column ``name`` stores it, or a ``ValidationError``.

    A plain ``str`` (a ``str`` subclass such as an enum member becomes its plain value, which
    is what the driver binds), within the column's length, without NUL (PostgreSQL cannot
    store it) and encodable as UTF-8 (no lone surrogates: neither driver can send them).
    """
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ValidationError(f"event field {name} must be a string, not {_type_name(value)}")
    text = str.__str__(value)
    limit = _TEXT_LIMITS.get(name)
    if (required and not text) or (limit is not None and len(text) > limit):
        raise ValidationError(f"event field {name} must be 1 to {limit} characters")
    if "\x00" in text:
        raise ValidationError(f"event field {name} contains a NUL character")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError(
                f"event field {name} is not valid Unicode (a lone surrogate)"
            ) from None
    return text


def stored_int(name: str, value: object) -> int | None:
    """``value`` exactly as an ``Integer`` column stores it, or a ``ValidationError``: a real
    int (a bool is not a number here: it would be hashed as ``true`` and stored as 1) in the
    32-bit range every backend keeps."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValidationError(f"event field {name} must be an integer, not {_type_name(value)}")
    number = int(value)
    if not INT_MIN <= number <= INT_MAX:
        raise ValidationError(f"event field {name} is out of range ({INT_MIN} to {INT_MAX})")
    return number


def _type_name(value: object) -> str:
    return type(value).__name__


def _stored_columns(
    stream: object,
    type: object,
    actor: object,
    job_id: object,
    step: object,
    registry_id: object,
    attempt: object,
) -> dict[str, Any]:
    """The caller's column values in the form the database stores them (checked, never coerced
    silently): the hash is taken over these, so a stored event always verifies."""
    return {
        "stream": stored_text("stream", stream, required=True),
        "type": stored_text("type", type, required=True),
        "actor": stored_text("actor", actor, required=True),
        "job_id": stored_text("job_id", job_id),
        "step": stored_text("step", step),
        "registry_id": stored_int("registry_id", registry_id),
        "attempt": stored_int("attempt", attempt),
    }  # fmt: skip


def _named_repository(payload: Mapping[str, Any]) -> str | None:
    """The payload's repository as the indexed column stores it (cut to the column's length);
    None when the payload names none (the job's is used)."""
    named = payload.get("repository")
    if isinstance(named, str) and named:
        return stored_text("repository", named[: _TEXT_LIMITS["repository"]])
    return None


def append(
    session: Session,
    *,
    stream: str,
    type: str,
    actor: str,
    job_id: str | None = None,
    step: str | None = None,
    registry_id: int | None = None,
    attempt: int | None = None,
    payload: dict[str, Any] | None = None,
) -> Event:
    """Append one event to ``stream`` with the next sequence number, as the next link of the
    chain."""
    unlinked, known = _unlinked(stream, type, actor, job_id, step, registry_id, attempt, payload)
    # This transaction's other changes take their row locks before the lane's lock, not while
    # holding it, which keeps lock waits one-way in the common case.
    session.flush()
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        linked = _append_linked(connection, unlinked, known)
        if linked is not None:
            return _pending(session, Event(**linked))
    return _append_unlinked(session, unlinked)


def _bound_names(sql: str) -> set[str]:
    """The names of the values ``sql`` binds (``:name``; ``::type`` casts are not names)."""
    return set(re.findall(r"(?<![:\w]):(\w+)", sql))


#: The names ``pushworker_append_event``'s call binds.
_APPEND_NAMES = frozenset(_bound_names(_APPEND_EVENT_SQL))


@dataclass(frozen=True)
class Guard:
    """A statement that changes rows and decides whether an event follows: ``sql`` returns at
    most one row, and the event is appended when it returns one (``append_guarded``). Made once,
    at import.

    ``sql`` is what SQLite and PostgreSQL both run, an ``UPDATE ... RETURNING`` say. A guard with
    ``ctes`` (data-modifying CTEs ``sql`` reads, ``name AS (...)``, comma-separated) runs on
    PostgreSQL only; every change it makes must be read by ``sql``, so that it is made before
    the append takes its lane's lock (PostgreSQL runs a CTE nobody reads at the statement's
    end). Its values must not be named as the append's are (checked when it is made). Its
    statements are built on first use and kept.
    """

    sql: str
    binds: tuple[BindParameter[Any], ...]
    ctes: str = ""

    def __post_init__(self) -> None:
        # One statement, one namespace: a guard naming a value as the append does would set
        # the event's value (or take it). Checked on the SQL, once, at import.
        clashes = _bound_names(self.ctes + " " + self.sql) & _APPEND_NAMES
        if clashes:
            raise ValueError(f"the guard's values are named as the append's: {sorted(clashes)}")

    @cached_property
    def alone(self) -> TextClause:
        # The guard's SQL is the project's own (a constant); every value is bound.
        prefix = f"WITH {self.ctes} " if self.ctes else ""
        return text(prefix + self.sql).bindparams(*self.binds)

    @cached_property
    def with_append(self) -> TextClause:
        """PostgreSQL: the guard, then the append of its event, in one statement. The append
        runs once for the guard's row, after the guard took its row locks (the order every
        record transaction keeps); its columns are NULL where the database left the append to
        the recorder's own way."""
        prefix = f"{self.ctes}, " if self.ctes else ""
        return text(
            # The guard's SQL is the project's own (a constant); every value is bound.
            f"WITH {prefix}guard AS ({self.sql}) "  # noqa: S608
            f"SELECT guard.*, appended.* FROM guard LEFT JOIN LATERAL ({_APPEND_EVENT_SQL}) "
            "AS appended ON true"
        ).bindparams(*self.binds, bindparam("payload", type_=_EVENTS.c.payload.type))


def append_guarded(
    session: Session,
    guard: Guard,
    guard_params: Mapping[str, Any],
    *,
    stream: str,
    type: str,
    actor: str,
    job_id: str | None = None,
    step: str | None = None,
    registry_id: int | None = None,
    attempt: int | None = None,
    payload: dict[str, Any] | None = None,
) -> Mapping[str, Any] | None:
    """Run ``guard`` and, when it returns a row, append the event (as ``append`` does): the
    guard's row, or None when it returned none and nothing was appended.

    On PostgreSQL the two are one round trip (``Guard.with_append``); SQLite runs them one
    after the other.
    """
    unlinked, known = _unlinked(stream, type, actor, job_id, step, registry_id, attempt, payload)
    session.flush()
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        if guard.ctes:
            raise ValueError("a guard with data-modifying CTEs runs on PostgreSQL only")
        found = connection.execute(guard.alone, dict(guard_params)).first()
        if found is None:
            return None
        _append_unlinked(session, unlinked)
        return dict(found._mapping)
    params = {**_linked_params(unlinked, known), **guard_params}
    with _appending(stream):
        row = connection.execute(guard.with_append, params).first()
    if row is None:
        return None
    fields = row._mapping
    linked_row = tuple(fields[f"o_{name}"] for name in _LINKED_COLUMNS)
    if linked_row[0] is None:
        _append_unlinked(session, unlinked)
    else:
        _pending(session, Event(**_checked_link(unlinked, linked_row)))
    return {name: value for name, value in fields.items() if not name.startswith("o_")}


#: What ``pushworker_append_event`` answers, in its order (its columns are named ``o_<name>``).
_LINKED_COLUMNS = ("id", "seq", "prev_hash", "repository", "time", "hash")


def _unlinked(
    stream: str,
    type: str,
    actor: str,
    job_id: str | None,
    step: str | None,
    registry_id: int | None,
    attempt: int | None,
    payload: dict[str, Any] | None,
) -> tuple[dict[str, Any], bool]:
    """An event's fields as stored, but for what linking it fills in (id, seq, time, previous
    hash and hash; the repository when the payload names none), and whether its repository is
    known without the job's row."""
    payload = _checked_payload(payload)
    columns = _stored_columns(stream, type, actor, job_id, step, registry_id, attempt)
    named_repository = _named_repository(payload)
    unlinked: dict[str, Any] = {
        **columns, "payload": payload,
        "outcome": derive_outcome(columns["type"], payload), "lane": lane_of(columns["stream"]),
        "trace_id": current_trace_id(), "repository": named_repository,
    }  # fmt: skip
    return unlinked, named_repository is not None or columns["job_id"] is None


def _append_unlinked(session: Session, unlinked: dict[str, Any]) -> Event:
    """The recorder's own way: read the stream's and the lane's state (under the lane's lock),
    link, hash and insert."""
    stream, lane = unlinked["stream"], unlinked["lane"]
    connection = session.connection()
    state = _append_state(session, stream, lane, unlinked["job_id"])
    if connection.dialect.name == "sqlite":
        # SQLite would reuse the id of a deleted newest row (retention): ids only go up.
        newest = state.next_or_newest_id
        event_id = (newest if newest is not None else _newest_checkpoint_id(session)) + 1
    else:
        assert state.next_or_newest_id is not None, "nextval gives an id"
        event_id = state.next_or_newest_id
    values: dict[str, Any] = {
        **unlinked, "id": event_id, "seq": state.last_seq + 1, "time": utcnow(),
        "repository": unlinked["repository"] or state.job_repository,
        "prev_hash": _lane_head(session, lane, state.head_hash),
    }  # fmt: skip
    values["hash"] = chain_hash(values)
    try:
        # A Core insert, not a unit-of-work flush: an event is written once and never changed,
        # so the ORM's change tracking would be pure cost on the hottest path.
        connection.execute(_INSERT_EVENT, values)
    except IntegrityError:
        raise EventConflict(
            f"another writer appended event {values['seq']} of {stream} first"
        ) from None
    return _pending(session, Event(**values))


def _pending(session: Session, row: Event) -> Event:
    """``row`` (transient: a record of what was written, for logs and callers), logged and
    published once the session commits."""
    session.info.setdefault("pending_event_logs", []).append(row)
    return row


#: Called with each event's fields once its transaction committed (metrics, for example).
Subscriber = Callable[[dict[str, Any]], None]
_subscribers: list[Subscriber] = []


def subscribe(callback: Subscriber) -> None:
    """Have ``callback`` called with every event of this process, once the project's session
    that appended it committed."""
    _subscribers.append(callback)


def publish_committed(session: Session) -> None:
    """After a commit: log each event the session appended and hand it to the subscribers.

    An ``after_commit`` hook of the project's sessionmaker (``worker.store.db``).
    """
    for row in session.info.pop("pending_event_logs", []):
        fields = event_fields(row)
        for callback in _subscribers:
            try:
                callback(dict(fields))
            except Exception:  # an observer must never break the write path
                log.exception("event.subscriber_failed", subscriber=repr(callback))
        log.info(fields.pop("type"), **fields)


def forget_rolled_back(session: Session) -> None:
    """After a rollback: the events the session appended never happened; nothing is logged.

    An ``after_rollback`` hook of the project's sessionmaker (``worker.store.db``).
    """
    session.info.pop("pending_event_logs", None)
