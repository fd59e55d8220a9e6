"""Checking the event log's hash chain: ``verify`` the database, ``verify_archive`` a
retention archive; ``ChainChecker`` is the check itself, fed one record at a time.

Both read in one consistent snapshot (``worker.store.db.read_snapshot``), streamed a few
thousand rows at a time as plain dicts rather than ORM objects, so memory stays flat at any size
of log. The chain, the choice of one global chain and what it does and does not prove are argued
in docs/event-log.md.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, select

from worker.core.errors import ValidationError
from worker.store.chain import GENESIS_HASH, chain_hash
from worker.store.db import read_snapshot
from worker.store.models import EventCheckpoint
from worker.store.queries import EventQuery, iter_records

#: How many problems a report keeps (it counts them all).
MAX_PROBLEMS = 100
#: How many recent hashes the verifier remembers to tell "reordered" from "removed".
_RECENT_HASHES = 10_000


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
        if chain_hash(record) != stored:
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


def read_checkpoints(connection: Connection) -> list[Any]:
    """Every retention checkpoint, oldest first."""
    table = EventCheckpoint.__table__
    return list(connection.execute(select(table).order_by(table.c.id)))


def verify(url: str | None = None, *, anchors: Mapping[int, str] | None = None) -> VerifyReport:
    """Check the whole chain that remains in the database, in one snapshot.

    ``anchors``: ``{event id: hash}`` recorded elsewhere earlier (``verify`` prints the head);
    each must still be there with that hash, unless retention pruned it. This is what catches a
    log whose newest events were cut off, or one re-hashed from end to end.
    """
    with read_snapshot(url) as connection:
        checkpoints = read_checkpoints(connection)
        latest = checkpoints[-1] if checkpoints else None
        start = latest.last_event_id if latest is not None else None
        checker = ChainChecker(
            latest.last_hash if latest is not None else GENESIS_HASH,
            prev_id=start,
            anchors=anchors,
        )
        confirmations: set[tuple[Any, Any]] = set()
        for record in iter_records(connection, EventQuery()):
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
    with read_snapshot(url) as connection:
        checkpoints = read_checkpoints(connection)
    matching = [c for c in checkpoints if c.last_hash == report.head_hash]
    if not matching:
        checker.add(None, "checkpoint", f"{path} does not end where any checkpoint ends")
        return checker.finish()
    index = checkpoints.index(matching[0])
    checkpoint = checkpoints[index]
    report.checkpoint = _checkpoint_fields(checkpoint)
    before = checkpoints[index - 1].last_hash if index > 0 else GENESIS_HASH
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
