"""The event log's hash chains as pure functions: the canonical form of an event, its hash, its
lane.

No session and no I/O: the recorder (``worker.store.events``) and the checker
(``worker.store.verify``) both hash through here, so what is written and what is checked cannot
drift apart. A change to what is hashed is a new version, never an edit of an old one: migration
0003 keeps its own frozen copy of version 1, and ``tests/unit/test_migrations_frozen.py`` checks
that the two still agree (docs/event-log.md).

Version 1 (events before migration 0010, ``lane`` NULL): one global chain in ``id`` order, every
append serialised on one lock. Version 2: ``LANES`` chains; an event's lane is a function of its
stream (a stream is always in one lane), its ``prev_hash`` is the previous event *of its lane*,
and its hash also covers its ``id``, ``lane`` and ``trace_id``. Appenders of different lanes
never wait for each other; seals (``worker.store.seals``) tie the lanes' heads together.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, get_args

#: ``prev_hash`` of the very first event of a log.
GENESIS_HASH = "0" * 64
#: Version 1 of the canonical form (the global chain), part of what is hashed.
CHAIN_VERSION = 1
#: The fields a version-1 hash covers, besides the version (``id`` and ``hash`` are not hashed:
#: the order is held by ``prev_hash``, see docs/event-log.md).
HASHED_FIELDS = (
    "stream", "seq", "job_id", "time", "type", "step", "registry_id", "attempt", "actor",
    "payload", "repository", "outcome", "prev_hash",
)  # fmt: skip
#: Version 2: the lanes.
LANE_CHAIN_VERSION = 2
#: What a version-2 hash covers besides version 1's: the id (an event cannot be moved, not even
#: between lanes), the lane and the trace the event was recorded in.
LANE_HASHED_FIELDS = (*HASHED_FIELDS, "id", "lane", "trace_id")
#: How many lanes: enough that concurrent jobs rarely share one (two jobs in one lane wait for
#: each other's commit), few enough that a seal holding every lane's head stays small.
LANES = 64
#: The name of version 1's single chain wherever lanes are named (checkpoints, reports).
V1_LANE = "v1"

#: Event type suffixes (and a few whole types) -> the indexed ``outcome`` column.
_OUTCOME_OF_SUFFIX = {
    "succeeded": "succeeded",
    "failed": "failed",
    "skipped": "skipped",
    "cancelled": "cancelled",
}
_OUTCOME_OF_TYPE = {"fallback.applied": "fallback"}
#: Every value the ``outcome`` column takes (None aside): what a filter on it may name.
Outcome = Literal["cancelled", "failed", "fallback", "skipped", "succeeded"]
OUTCOMES: tuple[str, ...] = get_args(Outcome)


def canonical_time(moment: datetime | str) -> str:
    """``2026-11-27T22:30:38.623908Z``: UTC, always with microseconds."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lane_of(stream: str) -> int:
    """The lane every event of ``stream`` goes to: stable, spread evenly over ``LANES``."""
    digest = hashlib.sha256(stream.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:4], "big") % LANES


def lane_name(lane: int | None) -> str:
    """How a lane is named in checkpoints, seals and reports: ``"v1"`` or its number."""
    return V1_LANE if lane is None else str(lane)


def canonical_json(record: Mapping[str, Any]) -> bytes:
    """The bytes an event's hash is taken over: its hashed fields as JSON with sorted keys, no
    whitespace, ASCII only, the time as ISO UTC with microseconds. A record with a ``lane`` is
    version 2, one without (or with None) version 1."""
    if record.get("lane") is None:
        body = {name: record[name] for name in HASHED_FIELDS}
        body["v"] = CHAIN_VERSION
    else:
        body = {name: record.get(name) for name in LANE_HASHED_FIELDS}
        body["v"] = LANE_CHAIN_VERSION
    body["time"] = canonical_time(record["time"])
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


#: What an append on PostgreSQL leaves to the database, in the canonical form's (sorted) order:
#: the id, the previous hash, the repository (the job's, read there), the seq and the time (the
#: database's clock, read under the lane's lock) (``pushworker_append_event``, migration 0011).
LINKED_FIELDS = ("id", "prev_hash", "repository", "seq", "time")
#: Of those, the ones whose JSON is a string the parts hold the quotes of.
_QUOTED = ("prev_hash", "time")

_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
)

Parts = tuple[str, str, str, str, str, str]


def canonical_parts(record: Mapping[str, Any]) -> Parts:
    """``canonical_json(record)`` of a version-2 record, cut where the JSON values of
    ``LINKED_FIELDS`` go: ``parts[0] + id + parts[1] + prev_hash + parts[2] + repository +
    parts[3] + seq + parts[4] + time + parts[5]`` is the canonical form, each value as the
    canonical form writes it (the hash and the time between quotes already in the parts; the
    repository as JSON, quoted, or ``null``). What ``record`` holds for those fields is ignored.

    Built item by item as ``json`` builds a dict with sorted keys (``tests/unit/test_chain.py``
    checks the two agree on generated records).
    """
    if record.get("lane") is None:
        raise ValueError("only a version-2 record (one with a lane) is cut into parts")
    body = {name: record.get(name) for name in LANE_HASHED_FIELDS if name not in LINKED_FIELDS}
    body["v"] = LANE_CHAIN_VERSION
    names = sorted([*body, *LINKED_FIELDS])
    parts: list[str] = []
    current = "{"
    for index, name in enumerate(names):
        current += ("," if index else "") + _CANONICAL.encode(name) + ":"
        if name in LINKED_FIELDS:
            quote = '"' if name in _QUOTED else ""
            parts.append(current + quote)
            current = quote
        else:
            current += _CANONICAL.encode(body[name])
    parts.append(current + "}")
    first, second, third, fourth, fifth, sixth = parts
    return first, second, third, fourth, fifth, sixth


def chain_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``canonical_json(record)``; ``record`` must hold ``prev_hash``."""
    return hashlib.sha256(canonical_json(record)).hexdigest()


def derive_outcome(type: str, payload: Mapping[str, Any]) -> str | None:
    """The ``outcome`` column of an event of this type and payload."""
    if type == "registry.tested":
        return "succeeded" if payload.get("ok") else "failed"
    if type in _OUTCOME_OF_TYPE:
        return _OUTCOME_OF_TYPE[type]
    return _OUTCOME_OF_SUFFIX.get(type.rsplit(".", 1)[-1])
