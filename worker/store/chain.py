"""The event log's hash chain as pure functions: the canonical form of an event and its hash.

No session and no I/O: the recorder (``worker.store.events``) and the checker
(``worker.store.verify``) both hash through here, so what is written and what is checked cannot
drift apart. A change to what is hashed is a new ``CHAIN_VERSION``, never an edit of version 1:
migration 0003 keeps its own frozen copy of version 1, and
``tests/unit/test_migrations_frozen.py`` checks that the two still agree (docs/event-log.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, get_args

#: ``prev_hash`` of the very first event of a log.
GENESIS_HASH = "0" * 64
#: Version of the canonical form, part of what is hashed.
CHAIN_VERSION = 1
#: The fields an event's hash covers, besides the version (``id`` and ``hash`` are not hashed:
#: the order is held by ``prev_hash``, see docs/event-log.md).
HASHED_FIELDS = (
    "stream", "seq", "job_id", "time", "type", "step", "registry_id", "attempt", "actor",
    "payload", "repository", "outcome", "prev_hash",
)  # fmt: skip

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


def canonical_json(record: Mapping[str, Any]) -> bytes:
    """The bytes an event's hash is taken over: its hashed fields as JSON with sorted keys, no
    whitespace, ASCII only, the time as ISO UTC with microseconds."""
    body = {name: record[name] for name in HASHED_FIELDS}
    body["time"] = canonical_time(record["time"])
    body["v"] = CHAIN_VERSION
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


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
