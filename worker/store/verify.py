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
from worker.core.settings import get_settings
from worker.core.signing import SealKey, seal_key
from worker.store.chain import GENESIS_HASH, V1_LANE, chain_hash, lane_name
from worker.store.db import read_snapshot
from worker.store.models import EventCheckpoint, EventEpoch
from worker.store.queries import EventQuery, iter_records
from worker.store.seals import read_seals, seal_hash

#: How many problems a report keeps (it counts them all).
MAX_PROBLEMS = 100
#: How many recent hashes the verifier remembers to tell "reordered" from "removed".
_RECENT_HASHES = 10_000


@dataclass(frozen=True)
class Problem:
    """One place where the chain does not hold, named by the event where it shows."""

    event_id: int | None
    #: ``altered``, ``removed``, ``reordered``, ``unexpected``, ``checkpoint``, ``anchor``,
    #: ``sealed`` (an event a seal names is gone or changed), ``seal`` (a seal was altered)
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
    #: Each chain's last record checked: ``{lane name: [id, hash]}``.
    heads: dict[str, list[Any]] = field(default_factory=dict)
    #: The latest seal, as checked (None: the log has none yet).
    seal: dict[str, Any] | None = None
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
            "heads": self.heads,
            "seal": self.seal,
            "checkpoint": self.checkpoint,
            "problem_count": self.problem_count,
            "problems": [problem.to_dict() for problem in self.problems],
        }


#: Where a chain starts: ``(id of the event it follows, or None; that event's hash)``.
Head = tuple[int | None, str]


class ChainChecker:
    """Feeds on records in id order and finds where the chains do not hold.

    Each lane (and version 1's global chain, ``"v1"``) is checked on its own. Per record: its
    fields must hash to its stored ``hash`` (else *altered*; a version-2 hash covers the id and
    the lane too, so an event moved in the order or to another lane is altered), and its
    ``prev_hash`` must be the hash of its lane's previous record (else the link is broken). A
    broken link is *reordered* when ``prev_hash`` names another record of the log (a recent one,
    or one that comes later), and *removed* when it names none: the record it followed is gone
    (or was altered and re-hashed). After a problem the checker resynchronises on the stored
    hash, so that every separate change is reported.

    ``heads``: where each chain starts (a checkpoint's heads); a lane not in it starts at
    ``root`` (the lanes' root), version 1 at the genesis hash. ``heads`` None: accept whatever
    each chain's first record follows (an archive read on its own); ``first_prevs`` says what.
    """

    def __init__(
        self,
        heads: Mapping[str, Head] | None,
        *,
        root: str | None = None,
        anchors: Mapping[int, str] | None = None,
        sealed: Mapping[int, tuple[str, str]] | None = None,
    ) -> None:
        self.open = heads is None
        #: ``{event id: (hash, what sealed it)}``: events a seal or the epoch names, which must
        #: be in the log with that hash (unless retention pruned them).
        self.sealed = dict(sealed or {})
        self.heads: dict[str, Head] = dict(heads or {})
        self.root = root
        #: Each chain's first record's ``prev_hash`` (what an archive starts from).
        self.first_prevs: dict[str, str] = {}
        self.anchors = dict(anchors or {})
        self.report = VerifyReport()
        self._recent: OrderedDict[str, int] = OrderedDict()
        self._pending: dict[str, tuple[int, int | None]] = {}
        #: A heap of (-position, order, kind, message): the last one is dropped first.
        self._found: list[tuple[int, int, str, str]] = []
        self._count = 0

    def _start(self, lane: str, prev: str) -> Head:
        if self.open:
            return (None, prev)
        if lane == V1_LANE:
            return (None, GENESIS_HASH)
        return (None, self.root if self.root is not None else GENESIS_HASH)

    def feed(self, record: Mapping[str, Any]) -> None:
        event_id = int(record["id"])
        stored, prev = str(record["hash"]), str(record["prev_hash"])
        lane = lane_name(record.get("lane"))
        report = self.report
        if report.first_id is None:
            report.first_id = event_id
        if lane not in self.first_prevs:
            self.first_prevs[lane] = prev
        head = self.heads.get(lane)
        if head is None:
            head = self._start(lane, prev)
        prev_id, expected = head
        report.checked += 1
        if chain_hash(record) != stored:
            self.add(
                event_id,
                "altered",
                f"event {event_id} ({record['type']}) was altered: its fields do not hash to its "
                "stored hash",
            )
        elif prev != expected:
            self._broken_link(event_id, prev, prev_id)
        if event_id in self.anchors and self.anchors.pop(event_id) != stored:
            self.add(event_id, "anchor", f"event {event_id} does not have its anchored hash")
        if event_id in self.sealed:
            sealed_hash, by = self.sealed.pop(event_id)
            if sealed_hash != stored:
                self.add(event_id, "sealed", f"event {event_id} does not have the hash {by} names")
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
        self.heads[lane] = (event_id, stored)
        report.head_id, report.head_hash = event_id, stored
        report.heads[lane] = [event_id, stored]

    def _broken_link(self, event_id: int, prev: str, prev_id: int | None) -> None:
        earlier = self._recent.get(prev)
        if earlier is not None:
            self.add(
                event_id,
                "reordered",
                f"event {event_id} is out of order: it follows event {earlier}, "
                f"not event {prev_id}",
            )
        else:
            self._pending[prev] = (event_id, prev_id)
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
        for event_id, (_, by) in sorted(self.sealed.items()):
            if anchors_before is None or event_id > anchors_before:
                self.add(
                    event_id,
                    "sealed",
                    f"event {event_id}, which {by} names, is not in the log (the tail of its "
                    "chain was cut off)",
                )
        self.sealed.clear()
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


def checkpoint_heads(checkpoint: Any) -> dict[str, Head]:
    """Where each chain resumes after ``checkpoint`` (none: from the start). A checkpoint from
    before the lanes names only the version-1 chain's head."""
    if checkpoint is None:
        return {}
    if checkpoint.heads is None:
        return {V1_LANE: (int(checkpoint.last_event_id), str(checkpoint.last_hash))}
    return {lane: (int(head[0]), str(head[1])) for lane, head in checkpoint.heads.items()}


def heads_digest(heads: Mapping[str, Any] | None) -> str | None:
    """SHA-256 of a checkpoint's heads as canonical JSON (what its ``events.pruned`` records)."""
    if heads is None:
        return None
    body = {lane: [int(head[0]), str(head[1])] for lane, head in heads.items()}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class Epoch:
    """Where version 1 ended and the lanes began (``EventEpoch``)."""

    v1_last_id: int | None
    v1_last_hash: str


def read_epoch(connection: Connection) -> Epoch:
    table = EventEpoch.__table__
    row = connection.execute(select(table).where(table.c.version == 2)).first()
    if row is None:
        raise ValidationError(
            "the event log has no lanes' root (event_epochs): run `pushctl db upgrade`"
        )
    return Epoch(row.v1_last_id, row.v1_last_hash)


def _signature_state(seal: Any, key: SealKey | None) -> str:
    if seal.signature is None:
        return "unsigned"
    if key is None:
        return "not checked: no secret key here"
    if seal.key_id != key.key_id:
        return "not checked: signed with another key"
    return "verified"


def _seal_fields(seal: Any, key: SealKey | None) -> dict[str, Any]:
    return {
        "id": seal.id, "hash": seal.hash, "time": seal.time.isoformat(), "actor": seal.actor,
        "lanes": len(seal.heads), "signature": _signature_state(seal, key),
    }  # fmt: skip


def check_seals(checker: ChainChecker, seals: list[Any], key: SealKey | None = None) -> None:
    """Each seal hashes to its stored hash, links to the one before it and (when this process
    holds the key that signed it) carries a valid signature; no seal after a signed one is
    unsigned; no lane's head goes back. The latest seal's heads are handed to ``checker``: they
    must be in the log."""
    prev_hash: str = GENESIS_HASH
    previous_heads: dict[str, list[Any]] = {}
    signed_before: int | None = None
    for seal in seals:
        record = {
            "id": seal.id,
            "time": seal.time,
            "heads": seal.heads,
            "prev_hash": seal.prev_hash,
        }
        if seal_hash(record) != seal.hash:
            checker.add(None, "seal", f"seal {seal.id} was altered: it does not hash to its hash")
        elif seal.prev_hash != prev_hash:
            checker.add(
                None, "seal", f"seal {seal.id} does not follow the seal before it (one is missing)"
            )
        if (
            key is not None
            and _signature_state(seal, key) == "verified"
            and not key.verifies(seal.hash, seal.signature)
        ):
            checker.add(
                None,
                "seal",
                f"seal {seal.id} does not carry a valid signature: it was forged or re-hashed",
            )
        if seal.signature is None and signed_before is not None:
            checker.add(
                None,
                "seal",
                f"seal {seal.id} is unsigned, after seal {signed_before} was signed: forged?",
            )
        if seal.signature is not None:
            signed_before = seal.id
        for lane, head in previous_heads.items():
            now = seal.heads.get(lane)
            if now is None or int(now[0]) < int(head[0]):
                checker.add(None, "seal", f"seal {seal.id} takes lane {lane} back")
        prev_hash, previous_heads = seal.hash, seal.heads
    if seals and key is not None and seals[-1].signature is None:
        checker.add(
            None,
            "seal",
            f"the latest seal ({seals[-1].id}) is unsigned although a secret key is configured "
            "here: a worker with the key signs every seal it takes, so it was forged (or the "
            "workers run without PUSHWORKER_SECRET_KEY)",
        )
    if seals:
        latest = seals[-1]
        for lane, head in latest.heads.items():
            checker.sealed[int(head[0])] = (str(head[1]), f"seal {latest.id} (lane {lane})")


def verify(
    url: str | None = None,
    *,
    anchors: Mapping[int, str] | None = None,
    seal_anchors: Mapping[int, str] | None = None,
) -> VerifyReport:
    """Check every chain that remains in the database, and the seals, in one snapshot.

    ``anchors``: ``{event id: hash}`` recorded elsewhere earlier; each must still be there with
    that hash, unless retention pruned it. ``seal_anchors``: ``{seal id: hash}`` likewise (what
    ``verify`` prints): a seal kept elsewhere catches a log whose newest events were cut off
    together with its newest seals, or one re-hashed from end to end.
    """
    with read_snapshot(url) as connection:
        checkpoints = read_checkpoints(connection)
        latest = checkpoints[-1] if checkpoints else None
        start = latest.last_event_id if latest is not None else None
        epoch = read_epoch(connection)
        sealed: dict[int, tuple[str, str]] = {}
        if epoch.v1_last_id is not None:
            sealed[epoch.v1_last_id] = (epoch.v1_last_hash, "the lanes' root (event_epochs)")
        checker = ChainChecker(
            checkpoint_heads(latest), root=epoch.v1_last_hash, anchors=anchors, sealed=sealed
        )
        seals = read_seals(connection)
        key = seal_key(get_settings().secret_key)
        check_seals(checker, seals, key)
        _check_seal_anchors(checker, seals, seal_anchors or {})
        confirmations: set[tuple[Any, Any, Any]] = set()
        for record in iter_records(connection, EventQuery()):
            if latest is not None and record["id"] <= latest.last_event_id:
                checker.add(
                    record["id"],
                    "unexpected",
                    f"event {record['id']} should not exist: checkpoint {latest.id} pruned every "
                    f"event up to {latest.last_event_id}",
                )
                continue
            if record["lane"] is None and record["id"] > (epoch.v1_last_id or 0):
                checker.add(
                    record["id"],
                    "unexpected",
                    f"event {record['id']} is in the version-1 chain but was recorded after the "
                    "lanes began (written by a worker older than migration 0010?)",
                )
                continue
            checker.feed(record)
            if record["type"] == "events.pruned":
                payload = record["payload"] or {}
                confirmations.add(
                    (
                        payload.get("last_event_id"),
                        payload.get("last_hash"),
                        payload.get("heads_sha256"),
                    )
                )
        _check_checkpoints(checker, checkpoints, confirmations)
        report = checker.finish(anchors_before=start)
        report.checkpoint = _checkpoint_fields(latest) if latest is not None else None
        report.seal = _seal_fields(seals[-1], key) if seals else None
        return report


def _check_seal_anchors(
    checker: ChainChecker, seals: list[Any], seal_anchors: Mapping[int, str]
) -> None:
    by_id = {seal.id: seal.hash for seal in seals}
    for seal_id, expected in sorted(seal_anchors.items()):
        found = by_id.get(seal_id)
        if found is None:
            checker.add(None, "anchor", f"anchored seal {seal_id} is not in the log")
        elif found != expected:
            checker.add(None, "anchor", f"seal {seal_id} does not have its anchored hash")


def _check_checkpoints(
    checker: ChainChecker, checkpoints: list[Any], confirmations: set[tuple[Any, Any, Any]]
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
        confirmed = (latest.last_event_id, latest.last_hash, heads_digest(latest.heads))
        if confirmed not in confirmations:
            checker.add(
                None,
                "checkpoint",
                f"checkpoint {latest.id} (events up to {latest.last_event_id}) is not confirmed "
                "by an events.pruned event of the chain: it was not written by retention",
            )


def verify_archive(path: Path, url: str | None = None) -> VerifyReport:
    """Check a retention archive: its own chains, and that each starts where the checkpoint
    before it left that chain and ends where its own checkpoint says."""
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
        epoch = read_epoch(connection)
    matching = [
        c
        for c in checkpoints
        if (c.last_event_id, c.last_hash) == (report.head_id, report.head_hash)
    ]
    if not matching:
        checker.add(None, "checkpoint", f"{path} does not end where any checkpoint ends")
        return checker.finish()
    index = checkpoints.index(matching[0])
    checkpoint = checkpoints[index]
    report.checkpoint = _checkpoint_fields(checkpoint)
    before = checkpoint_heads(checkpoints[index - 1] if index > 0 else None)
    for lane, first_prev in checker.first_prevs.items():
        start = before.get(lane)
        if start is not None:
            expected = start[1]
        else:
            expected = GENESIS_HASH if lane == V1_LANE else epoch.v1_last_hash
        if first_prev != expected:
            checker.add(
                report.first_id,
                "removed",
                f"{path} does not start where the previous checkpoint left chain {lane}: events "
                "are missing before it",
            )
    after = checkpoint_heads(checkpoint)
    for lane, (event_id, event_hash) in report.heads.items():
        if after.get(lane) != (event_id, event_hash):
            checker.add(
                event_id,
                "checkpoint",
                f"{path} ends chain {lane} at event {event_id}; checkpoint {checkpoint.id} "
                "does not",
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
