"""Reading the event log: the filters every reader shares (``EventQuery``), events as ORM rows
(``select_events``) or streamed as plain records (``iter_records``), and an event as plain data
(``event_fields``). Nothing here writes (appending is ``worker.store.events``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, func, select
from sqlalchemy.orm import Session

from worker.store.models import Event

#: Rows fetched per round trip by the streaming reader.
PAGE_SIZE = 2000
#: The fields of an event as plain data, in order (an export's columns; ``event_fields`` has
#: the same keys).
RECORD_FIELDS = (
    "id", "stream", "seq", "job_id", "time", "type", "step", "registry_id", "attempt", "actor",
    "payload", "repository", "outcome", "prev_hash", "hash", "lane", "trace_id",
)  # fmt: skip


@dataclass(frozen=True)
class EventQuery:
    """The filters every reader of the log shares (select, export, the CLI); each is optional
    and they combine with AND."""

    job_id: str | None = None
    stream: str | None = None
    registry_id: int | None = None
    repository: str | None = None
    types: Sequence[str] | None = None
    outcomes: Sequence[str] | None = None
    actor: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after_id: int | None = None

    def clauses(self) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = []
        if self.job_id is not None:
            where.append(Event.job_id == self.job_id)
        if self.stream is not None:
            where.append(Event.stream == self.stream)
        if self.registry_id is not None:
            where.append(Event.registry_id == self.registry_id)
        if self.repository is not None:
            where.append(Event.repository == self.repository)
        if self.types:
            where.append(_equal_or_in(Event.type, self.types))
        if self.outcomes:
            where.append(_equal_or_in(Event.outcome, self.outcomes))
        if self.actor is not None:
            where.append(Event.actor == self.actor)
        if self.since is not None:
            where.append(Event.time >= self.since)
        if self.until is not None:
            where.append(Event.time < self.until)
        if self.after_id is not None:
            where.append(Event.id > self.after_id)
        return where

    def select(self, *, newest_first: bool = False, limit: int | None = None) -> Select[Any]:
        """Oldest first (or newest first): in id order, which is the chain's; in time order
        when the query has a time bound and no ``after_id``.

        The two orders agree within a lane (an event's id and time are taken under its lane's
        lock) unless the hosts' clocks disagree, and across lanes to within the moments two
        appends overlapped; ordering a time range by time lets the database read it straight from
        a time index and stop at ``limit``, where id order would make SQLite scan the table.
        """
        query = select(Event).where(*self.clauses())
        by_time = (self.since is not None or self.until is not None) and self.after_id is None
        order = [Event.time, Event.id] if by_time else [Event.id]
        query = query.order_by(*(column.desc() for column in order) if newest_first else order)
        return query.limit(limit) if limit is not None else query


def _equal_or_in(column: Any, values: Sequence[str]) -> ColumnElement[bool]:
    # One value as "=": the planner then uses the index's next column for the time range.
    values = list(values)
    return column == values[0] if len(values) == 1 else column.in_(values)  # type: ignore[no-any-return]


def select_events(
    session: Session,
    *,
    job_id: str | None = None,
    stream: str | None = None,
    registry_id: int | None = None,
    repository: str | None = None,
    types: Sequence[str] | None = None,
    outcomes: Sequence[str] | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after_id: int | None = None,
    limit: int | None = None,
    newest_first: bool = False,
) -> list[Event]:
    """Events matching every given filter, oldest first (or newest first; see
    ``EventQuery.select`` for the order)."""
    query = EventQuery(
        job_id=job_id, stream=stream, registry_id=registry_id, repository=repository,
        types=types, outcomes=outcomes, actor=actor, since=since, until=until, after_id=after_id,
    )  # fmt: skip
    return list(session.scalars(query.select(newest_first=newest_first, limit=limit)))


def latest_of_types(
    session: Session, streams: Sequence[str], types: Sequence[str]
) -> dict[tuple[str, str], Event]:
    """The newest event of each of ``types`` in each of ``streams``, keyed ``(stream, type)``,
    in one query: the console's overview asks this for every registry at once.

    Within one stream ``seq`` grows with ``id``, so the newest is the highest ``seq``; the
    grouped ``max(seq)`` reads each stream's own range of ``UNIQUE(stream, seq)``, however
    long ago its last such event was and however many events came after it in other streams.
    """
    if not streams or not types:
        return {}
    newest = (
        select(Event.stream, Event.type, func.max(Event.seq).label("seq"))
        .where(Event.stream.in_(list(streams)), Event.type.in_(list(types)))
        .group_by(Event.stream, Event.type)
        .subquery()
    )
    rows = session.scalars(
        select(Event).join(
            newest,
            (Event.stream == newest.c.stream) & (Event.seq == newest.c.seq),
        )
    )
    return {(row.stream, row.type): row for row in rows}


def iter_records(connection: Connection, query: EventQuery) -> Iterator[dict[str, Any]]:
    """The events matching ``query``, oldest first, as plain records (the shape of
    ``event_fields``), streamed ``PAGE_SIZE`` rows at a time: memory stays flat at any size of
    log (verify, export and retention read through here)."""
    table = Event.__table__
    statement = (
        select(*(table.c[name] for name in RECORD_FIELDS))
        .where(*query.clauses())
        .order_by(table.c.id)
    )
    result = connection.execution_options(yield_per=PAGE_SIZE).execute(statement)
    for row in result:
        record = dict(row._mapping)
        record["time"] = record["time"].isoformat()
        yield record


def event_fields(row: Event) -> dict[str, Any]:
    """An event as plain data (for logs, ``--json`` output and exports).

    The hashes are part of it: a log line or an export line carries its link of the chain, so
    logs shipped elsewhere are a copy of the chain to compare with (docs/event-log.md).
    """
    return {
        "id": row.id, "stream": row.stream, "seq": row.seq, "job_id": row.job_id,
        "time": row.time.isoformat(), "type": row.type, "step": row.step,
        "registry_id": row.registry_id, "attempt": row.attempt, "actor": row.actor,
        "payload": row.payload, "repository": row.repository, "outcome": row.outcome,
        "prev_hash": row.prev_hash, "hash": row.hash, "lane": row.lane, "trace_id": row.trace_id,
    }  # fmt: skip
