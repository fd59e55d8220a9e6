"""The append-only event log: ``append`` and ``select``, nothing else.

Every appended event is also one structlog line with the same fields, written after the
transaction that stored it commits (a rolled-back event is not logged as if it happened).
Payloads pass an allow-list of keys, so a credential cannot be recorded by accident.
"""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker.errors import EventConflict, ValidationError
from worker.logs import get_logger
from worker.models import Event, utcnow

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
    }
)  # fmt: skip


def job_stream(job_id: str) -> str:
    return f"job/{job_id}"


def registry_stream(registry_id: int) -> str:
    return f"registry/{registry_id}"


def worker_actor() -> str:
    return f"worker:{socket.gethostname()}:{os.getpid()}"


def operator_actor(name: str | None = None) -> str:
    who = name or os.environ.get("PUSHWORKER_OPERATOR") or _login_name()
    return f"operator:{who}"


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


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
    """Append one event to ``stream`` with the next sequence number."""
    payload = dict(payload or {})
    unknown = set(payload) - ALLOWED_PAYLOAD_KEYS
    if unknown:
        raise ValidationError(f"event payload keys not allowed: {sorted(unknown)}")
    seq = (session.scalar(select(func.max(Event.seq)).where(Event.stream == stream)) or 0) + 1
    row = Event(
        stream=stream, seq=seq, job_id=job_id, time=utcnow(), type=type, step=step,
        registry_id=registry_id, attempt=attempt, actor=actor, payload=payload,
    )  # fmt: skip
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        raise EventConflict(f"another writer appended event {seq} of {stream} first") from None
    session.info.setdefault("pending_event_logs", []).append(row)
    return row


def select_events(
    session: Session,
    *,
    job_id: str | None = None,
    stream: str | None = None,
    registry_id: int | None = None,
    types: Sequence[str] | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after_id: int | None = None,
    limit: int | None = None,
    newest_first: bool = False,
) -> list[Event]:
    """Events matching every given filter, oldest first (or newest first)."""
    query = select(Event)
    if job_id is not None:
        query = query.where(Event.job_id == job_id)
    if stream is not None:
        query = query.where(Event.stream == stream)
    if registry_id is not None:
        query = query.where(Event.registry_id == registry_id)
    if types:
        query = query.where(Event.type.in_(list(types)))
    if actor is not None:
        query = query.where(Event.actor == actor)
    if since is not None:
        query = query.where(Event.time >= since)
    if until is not None:
        query = query.where(Event.time < until)
    if after_id is not None:
        query = query.where(Event.id > after_id)
    query = query.order_by(Event.id.desc() if newest_first else Event.id)
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def event_fields(row: Event) -> dict[str, Any]:
    """An event as plain data (for logs, ``--json`` output and exports)."""
    return {
        "id": row.id, "stream": row.stream, "seq": row.seq, "job_id": row.job_id,
        "time": row.time.isoformat(), "type": row.type, "step": row.step,
        "registry_id": row.registry_id, "attempt": row.attempt, "actor": row.actor,
        "payload": row.payload,
    }  # fmt: skip


#: Called with each event's fields once its transaction committed (metrics, for example).
Subscriber = Callable[[dict[str, Any]], None]
_subscribers: list[Subscriber] = []


def subscribe(callback: Subscriber) -> None:
    """Have ``callback`` called with every committed event of this process."""
    _subscribers.append(callback)


@sa_event.listens_for(Session, "after_commit")
def _log_committed(session: Session) -> None:
    for row in session.info.pop("pending_event_logs", []):
        fields = event_fields(row)
        for callback in _subscribers:
            try:
                callback(dict(fields))
            except Exception:  # an observer must never break the write path
                log.exception("event.subscriber_failed", subscriber=repr(callback))
        log.info(fields.pop("type"), **fields)


@sa_event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop("pending_event_logs", None)
