"""Auditing the event log: ``verify`` the hash chain, ``export`` it, ``prune`` it (retention).

All three stream: they read in one consistent snapshot through a server-side cursor (PostgreSQL)
or a plain read transaction (SQLite, WAL: writers are not blocked), a few thousand rows at a
time, as plain dicts rather than ORM objects, so memory stays flat at any size of log.

The chain, the choice of one global chain and what it does and does not prove are argued in
docs/event-log.md.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Connection, delete, func, select

from worker.core.errors import StorageError, ValidationError
from worker.core.settings import get_settings
from worker.core.text import printable
from worker.store import events
from worker.store.db import engine_for, reader_for, session_scope
from worker.store.models import Event, EventCheckpoint, utcnow

#: Rows fetched per round trip by the streaming readers.
PAGE_SIZE = 2000
#: How many problems a report keeps (it counts them all).
MAX_PROBLEMS = 100
#: How many recent hashes the verifier remembers to tell "reordered" from "removed".
_RECENT_HASHES = 10_000
#: The columns of an exported event, in order (``events.event_fields`` has the same keys).
EXPORT_FIELDS = (
    "id", "stream", "seq", "job_id", "time", "type", "step", "registry_id", "attempt", "actor",
    "payload", "repository", "outcome", "prev_hash", "hash",
)  # fmt: skip
EXPORT_FORMATS = ("jsonl", "csv")


# --- reading in one snapshot ------------------------------------------------------------------


@contextmanager
def reading(url: str | None = None) -> Iterator[Connection]:
    """A read-only connection in one consistent snapshot of the database."""
    url = url or get_settings().database_url
    if url.startswith("sqlite"):
        with reader_for(url).connect() as connection, connection.begin():
            yield connection
        return
    with engine_for(url).connect() as connection:
        connection = connection.execution_options(
            isolation_level="REPEATABLE READ", postgresql_readonly=True
        )
        with connection.begin():
            yield connection


def iter_records(connection: Connection, query: events.EventQuery) -> Iterator[dict[str, Any]]:
    """The events matching ``query``, oldest first, as export records, streamed."""
    table = Event.__table__
    statement = (
        select(*(table.c[name] for name in EXPORT_FIELDS))
        .where(*query.clauses())
        .order_by(table.c.id)
    )
    result = connection.execution_options(yield_per=PAGE_SIZE).execute(statement)
    for row in result:
        record = dict(row._mapping)
        record["time"] = record["time"].isoformat()
        yield record


# --- verify -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One place where the chain does not hold, named by the event where it shows."""

    event_id: int | None
    #: ``altered``, ``removed``, ``reordered``, ``unexpected``, ``checkpoint``, ``anchor``
    kind: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"event_id": self.event_id, "kind": self.kind, "message": self.message}


@dataclass
class VerifyReport:
    checked: int = 0
    first_id: int | None = None
    head_id: int | None = None
    head_hash: str | None = None
    #: The checkpoint the remaining chain starts from (None: from the genesis hash).
    checkpoint: dict[str, Any] | None = None
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    @property
    def first_problem(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "first_id": self.first_id,
            "head_id": self.head_id,
            "head_hash": self.head_hash,
            "checkpoint": self.checkpoint,
            "problem_count": self.problem_count,
            "problems": [problem.to_dict() for problem in self.problems],
        }


class ChainChecker:
    """Feeds on records in id order and finds where the chain does not hold.

    Per record: its fields must hash to its stored ``hash`` (else *altered*), and its
    ``prev_hash`` must be the previous record's ``hash`` (else the link is broken). A broken link
    is *reordered* when ``prev_hash`` names another record of the log (a recent one, or one that
    comes later), and *removed* when it names none: the record it followed is gone (or was
    altered and re-hashed). After a problem the checker resynchronises on the stored hash, so
    that every separate change is reported.
    """

    def __init__(
        self,
        expected_prev: str | None,
        *,
        prev_id: int | None = None,
        anchors: Mapping[int, str] | None = None,
    ) -> None:
        #: None: accept whatever the first record follows (an archive read on its own).
        self.expected = expected_prev
        self.prev_id = prev_id
        self.first_prev: str | None = None
        self.anchors = dict(anchors or {})
        self.report = VerifyReport()
        self._recent: OrderedDict[str, int] = OrderedDict()
        self._pending: dict[str, tuple[int, int | None]] = {}
        #: A heap of (-position, order, kind, message): the last one is dropped first.
        self._found: list[tuple[int, int, str, str]] = []
        self._count = 0

    def feed(self, record: Mapping[str, Any]) -> None:
        event_id = int(record["id"])
        stored, prev = str(record["hash"]), str(record["prev_hash"])
        report = self.report
        if report.first_id is None:
            report.first_id = event_id
            self.first_prev = prev
            if self.expected is None:
                self.expected = prev
        report.checked += 1
        if events.chain_hash(record) != stored:
            self.add(
                event_id,
                "altered",
                f"event {event_id} ({record['type']}) was altered: its fields do not hash to its "
                "stored hash",
            )
        elif prev != self.expected:
            self._broken_link(event_id, prev)
        if event_id in self.anchors and self.anchors.pop(event_id) != stored:
            self.add(event_id, "anchor", f"event {event_id} does not have its anchored hash")
        later = self._pending.pop(stored, None)
        if later is not None:
            moved, _ = later
            self.add(
                moved,
                "reordered",
                f"event {moved} is out of order: it follows event {event_id}, which comes after it",
            )
        self._recent[stored] = event_id
        if len(self._recent) > _RECENT_HASHES:
            self._recent.popitem(last=False)
        self.expected, self.prev_id = stored, event_id
        report.head_id, report.head_hash = event_id, stored

    def _broken_link(self, event_id: int, prev: str) -> None:
        earlier = self._recent.get(prev)
        if earlier is not None:
            self.add(
                event_id,
                "reordered",
                f"event {event_id} is out of order: it follows event {earlier}, "
                f"not event {self.prev_id}",
            )
        else:
            self._pending[prev] = (event_id, self.prev_id)
            if len(self._pending) > _RECENT_HASHES:  # reorders are local: settle the oldest
                oldest = next(iter(self._pending))
                self._removed(*self._pending.pop(oldest))

    def _removed(self, event_id: int, predecessor: int | None) -> None:
        after = f"event {predecessor}" if predecessor is not None else "the start of the log"
        self.add(
            event_id,
            "removed",
            f"the chain breaks before event {event_id}: the event it follows is not in the "
            f"log (removed after {after}, or {after} was altered and re-hashed)",
        )

    def add(self, event_id: int | None, kind: str, message: str) -> None:
        """Count a problem; keep the first ``MAX_PROBLEMS`` by position (bounded memory)."""
        self._count += 1
        entry = (-(event_id if event_id is not None else 2**62), -self._count, kind, message)
        if len(self._found) < MAX_PROBLEMS:
            heapq.heappush(self._found, entry)
        elif entry > self._found[0]:
            heapq.heapreplace(self._found, entry)

    def finish(self, *, anchors_before: int | None = None) -> VerifyReport:
        """The report; ``anchors_before``: anchors at or below this id were pruned, not lost."""
        for event_id, predecessor in self._pending.values():
            self._removed(event_id, predecessor)
        self._pending.clear()
        for event_id in sorted(self.anchors):
            if anchors_before is None or event_id > anchors_before:
                self.add(event_id, "anchor", f"anchored event {event_id} is not in the log")
        self.anchors.clear()
        ordered = sorted(self._found, reverse=True)
        self.report.problem_count = self._count
        self.report.problems = [
            Problem(None if -key == 2**62 else -key, kind, message)
            for key, _, kind, message in ordered
        ]
        return self.report


def _checkpoint_fields(checkpoint: Any) -> dict[str, Any]:
    return {
        "id": checkpoint.id,
        "first_event_id": checkpoint.first_event_id,
        "last_event_id": checkpoint.last_event_id,
        "last_hash": checkpoint.last_hash,
        "count": checkpoint.count,
        "cutoff": checkpoint.cutoff.isoformat(),
        "archived_to": checkpoint.archived_to,
        "archive_sha256": checkpoint.archive_sha256,
        "time": checkpoint.time.isoformat(),
        "actor": checkpoint.actor,
    }


def _checkpoints(connection: Connection) -> list[Any]:
    table = EventCheckpoint.__table__
    return list(connection.execute(select(table).order_by(table.c.id)))


def verify(url: str | None = None, *, anchors: Mapping[int, str] | None = None) -> VerifyReport:
    """Check the whole chain that remains in the database, in one snapshot.

    ``anchors``: ``{event id: hash}`` recorded elsewhere earlier (``verify`` prints the head);
    each must still be there with that hash, unless retention pruned it. This is what catches a
    log whose newest events were cut off, or one re-hashed from end to end.
    """
    with reading(url) as connection:
        checkpoints = _checkpoints(connection)
        latest = checkpoints[-1] if checkpoints else None
        start = latest.last_event_id if latest is not None else None
        checker = ChainChecker(
            latest.last_hash if latest is not None else events.GENESIS_HASH,
            prev_id=start,
            anchors=anchors,
        )
        confirmations: set[tuple[Any, Any]] = set()
        for record in iter_records(connection, events.EventQuery()):
            if latest is not None and record["id"] <= latest.last_event_id:
                checker.add(
                    record["id"],
                    "unexpected",
                    f"event {record['id']} should not exist: checkpoint {latest.id} pruned every "
                    f"event up to {latest.last_event_id}",
                )
                continue
            checker.feed(record)
            if record["type"] == "events.pruned":
                payload = record["payload"] or {}
                confirmations.add((payload.get("last_event_id"), payload.get("last_hash")))
        _check_checkpoints(checker, checkpoints, confirmations)
        report = checker.finish(anchors_before=start)
        report.checkpoint = _checkpoint_fields(latest) if latest is not None else None
        return report


def _check_checkpoints(
    checker: ChainChecker, checkpoints: list[Any], confirmations: set[tuple[Any, Any]]
) -> None:
    previous = 0
    for checkpoint in checkpoints:
        if checkpoint.last_event_id <= previous:
            checker.add(
                None,
                "checkpoint",
                f"checkpoint {checkpoint.id} goes back to event {checkpoint.last_event_id}",
            )
        previous = checkpoint.last_event_id
    if checkpoints:
        latest = checkpoints[-1]
        if (latest.last_event_id, latest.last_hash) not in confirmations:
            checker.add(
                None,
                "checkpoint",
                f"checkpoint {latest.id} (events up to {latest.last_event_id}) is not confirmed "
                "by an events.pruned event of the chain: it was not written by retention",
            )


def verify_archive(path: Path, url: str | None = None) -> VerifyReport:
    """Check a retention archive: its own chain, and that it ends where a checkpoint of the
    database says the pruned events ended (and starts where the one before it ended)."""
    digest = hashlib.sha256()
    checker = ChainChecker(None)
    try:
        with path.open("rb") as archive:
            for number, line in enumerate(archive, 1):
                digest.update(line)
                try:
                    record = json.loads(line)
                except ValueError:
                    checker.add(None, "altered", f"line {number} of {path} is not JSON")
                    continue
                checker.feed(record)
    except OSError as exc:
        raise ValidationError(f"cannot read {path}: {exc.strerror or exc}") from None
    report = checker.report
    with reading(url) as connection:
        checkpoints = _checkpoints(connection)
    matching = [c for c in checkpoints if c.last_hash == report.head_hash]
    if not matching:
        checker.add(None, "checkpoint", f"{path} does not end where any checkpoint ends")
        return checker.finish()
    index = checkpoints.index(matching[0])
    checkpoint = checkpoints[index]
    report.checkpoint = _checkpoint_fields(checkpoint)
    before = checkpoints[index - 1].last_hash if index > 0 else events.GENESIS_HASH
    if checker.first_prev != before:
        checker.add(
            report.first_id,
            "removed",
            f"{path} does not start where the previous checkpoint ended: events are missing "
            f"before event {report.first_id}",
        )
    if report.first_id != checkpoint.first_event_id or report.checked != checkpoint.count:
        checker.add(
            None,
            "checkpoint",
            f"{path} holds {report.checked} events from {report.first_id}; checkpoint "
            f"{checkpoint.id} says {checkpoint.count} from {checkpoint.first_event_id}",
        )
    if checkpoint.archive_sha256 and checkpoint.archive_sha256 != digest.hexdigest():
        checker.add(None, "altered", f"{path} is not the file retention wrote (SHA-256 differs)")
    return checker.finish()


# --- export -------------------------------------------------------------------------------------


def jsonl_line(record: Mapping[str, Any]) -> str:
    # ASCII only: JSON escapes C0 controls anyway, but would write DEL and the C1 controls
    # (U+009B is a CSI on some terminals) raw; escaped, an export on a terminal is inert.
    return json.dumps(record, separators=(",", ":"), ensure_ascii=True, default=str)


def write_records(out: IO[str], records: Iterable[Mapping[str, Any]], fmt: str) -> int:
    """Write ``records`` as JSON lines or CSV (payload as JSON in one column); the count."""
    count = 0
    if fmt == "jsonl":
        for record in records:
            out.write(jsonl_line(record) + "\n")
            count += 1
        return count
    if fmt != "csv":
        raise ValidationError(f"unknown export format {fmt!r}; use one of {EXPORT_FORMATS}")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(EXPORT_FIELDS)
    for record in records:
        row = dict(record)
        row["payload"] = json.dumps(row["payload"], sort_keys=True, separators=(",", ":"))
        writer.writerow([_csv_cell(row[name]) for name in EXPORT_FIELDS])
        count += 1
    return count


def _csv_cell(value: object) -> object:
    # CSV is read by people and spreadsheets: control characters in text (rows written before
    # they were refused at the entry points) are shown as escapes, never written raw.
    if value is None:
        return ""
    return printable(value) if isinstance(value, str) else value


def export(
    out: IO[str], fmt: str, query: events.EventQuery | None = None, url: str | None = None
) -> int:
    """Stream the events matching ``query`` to ``out``; how many were written."""
    if fmt not in EXPORT_FORMATS:
        raise ValidationError(f"unknown export format {fmt!r}; use one of {EXPORT_FORMATS}")
    with reading(url) as connection:
        return write_records(out, iter_records(connection, query or events.EventQuery()), fmt)


# --- retention ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneReport:
    cutoff: datetime
    count: int = 0
    first_event_id: int | None = None
    last_event_id: int | None = None
    last_hash: str | None = None
    archived_to: str | None = None
    archive_sha256: str | None = None
    #: The ``events.pruned`` event that records this pruning.
    event_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "cutoff": self.cutoff.isoformat(),
            "count": self.count,
            "first_event_id": self.first_event_id,
            "last_event_id": self.last_event_id,
            "last_hash": self.last_hash,
            "archived_to": self.archived_to,
            "archive_sha256": self.archive_sha256,
            "event_id": self.event_id,
        }


def prune(
    *,
    older_than_days: float,
    archive: Path | None,
    actor: str,
    url: str | None = None,
    now: datetime | None = None,
) -> PruneReport:
    """Remove the oldest events, those older than ``older_than_days``, leaving a checkpoint.

    What goes is always a prefix of the chain (by id): the events before the first one that is
    not older than the cutoff. Its chain is verified first (pruning must not destroy the
    evidence of a change); then it is written to ``archive`` (JSON lines, the export format;
    None: discarded on purpose), and in one transaction a checkpoint is written, the events are
    deleted and an ``events.pruned`` event is appended.
    """
    if older_than_days < 0:
        raise ValidationError("--older-than must not be negative")
    url = url or get_settings().database_url
    cutoff = (now or utcnow()) - timedelta(days=older_than_days)
    if archive is not None and archive.exists():
        raise ValidationError(f"{archive} exists already; archives are never overwritten")
    with reading(url) as connection:
        checkpoints = _checkpoints(connection)
        latest = checkpoints[-1] if checkpoints else None
        start = latest.last_event_id if latest is not None else 0
        first_kept = connection.scalar(select(func.min(Event.id)).where(Event.time >= cutoff))
        bound = select(func.max(Event.id))
        if first_kept is not None:
            bound = bound.where(Event.id < first_kept)
        last_id = connection.scalar(bound)
        if last_id is None or last_id <= start:
            return PruneReport(cutoff=cutoff)
        if connection.scalar(select(func.count()).where(Event.id <= start)):
            raise StorageError(
                f"refusing to prune: events up to {start} should have been pruned already",
                hint="run `pushctl events verify` and investigate before pruning",
            )
        query = events.EventQuery(after_id=start)
        records = (r for r in iter_records(connection, query) if r["id"] <= last_id)
        checker = ChainChecker(
            latest.last_hash if latest is not None else events.GENESIS_HASH, prev_id=start or None
        )
        partial = archive.with_name(archive.name + ".partial") if archive is not None else None
        sha = _write_segment(records, checker, partial)
    segment = checker.finish()
    try:
        if not segment.ok:
            first = segment.first_problem
            raise StorageError(
                f"refusing to prune: the chain does not verify ({first.message if first else ''})",
                hint="run `pushctl events verify` and investigate before pruning",
            )
        return _commit_prune(url, cutoff, latest, segment, archive, partial, sha, actor)
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)


def _write_segment(
    records: Iterable[dict[str, Any]], checker: ChainChecker, partial: Path | None
) -> str | None:
    if partial is None:
        for record in records:
            checker.feed(record)
        return None
    digest = hashlib.sha256()
    try:
        with partial.open("x", encoding="utf-8") as out:
            for record in records:
                checker.feed(record)
                line = (jsonl_line(record) + "\n").encode("utf-8")
                digest.update(line)
                out.write(line.decode("utf-8"))
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        raise ValidationError(f"cannot write {partial}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def _commit_prune(
    url: str,
    cutoff: datetime,
    latest: Any,
    segment: VerifyReport,
    archive: Path | None,
    partial: Path | None,
    sha: str | None,
    actor: str,
) -> PruneReport:
    assert segment.first_id is not None and segment.head_id is not None
    assert segment.head_hash is not None
    archived_to = str(archive.resolve()) if archive is not None else None
    renamed = False
    try:
        with session_scope(engine_for(url)) as session:
            events.lock_chain(session)
            now_latest = session.scalar(select(func.max(EventCheckpoint.id)))
            if now_latest != (latest.id if latest is not None else None):
                raise StorageError("another prune ran meanwhile", hint="run the prune again")
            start = latest.last_event_id if latest is not None else 0
            last_hash = session.scalar(select(Event.hash).where(Event.id == segment.head_id))
            count = session.scalar(
                select(func.count()).where(Event.id > start, Event.id <= segment.head_id)
            )
            if last_hash != segment.head_hash or count != segment.checked:
                raise StorageError(
                    f"the events up to {segment.head_id} changed while they were archived",
                    hint="run `pushctl events verify`",
                )
            if archive is not None and partial is not None:
                if archive.exists():
                    raise ValidationError(f"{archive} exists already")
                partial.rename(archive)
                renamed = True
            session.add(
                EventCheckpoint(
                    first_event_id=segment.first_id, last_event_id=segment.head_id,
                    last_hash=segment.head_hash, count=segment.checked, cutoff=cutoff,
                    archived_to=archived_to, archive_sha256=sha, time=utcnow(), actor=actor,
                )
            )  # fmt: skip
            session.flush()
            pruned = events.append(
                session,
                stream=events.AUDIT_STREAM,
                type="events.pruned",
                actor=actor,
                payload={
                    "first_event_id": segment.first_id,
                    "last_event_id": segment.head_id,
                    "last_hash": segment.head_hash,
                    "count": segment.checked,
                    "cutoff": cutoff.isoformat(),
                    "archived_to": archived_to,
                    "archive_sha256": sha,
                },
            )
            event_id = pruned.id
            # After the append: the log is never empty, its newest id never goes back.
            session.execute(
                delete(Event)
                .where(Event.id <= segment.head_id)
                .execution_options(synchronize_session=False)
            )
    except BaseException:
        if renamed and archive is not None:
            archive.unlink(missing_ok=True)
        raise
    return PruneReport(
        cutoff=cutoff, count=segment.checked, first_event_id=segment.first_id,
        last_event_id=segment.head_id, last_hash=segment.head_hash, archived_to=archived_to,
        archive_sha256=sha, event_id=event_id,
    )  # fmt: skip
