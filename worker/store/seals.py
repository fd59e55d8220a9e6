"""Seals: the heads of every lane of the event log at one moment, chained one to the next.

Appends of different lanes do not wait for each other (``worker.store.events``), so no single
hash names "the log as it is now". A seal does: it records each lane's newest event (id and
hash) and the hash of the seal before it, and is hashed itself. ``verify`` then finds every head
of the latest seal in the log with its hash, so a lane's tail cannot be cut off below it, and
the seal's hash is the one value to keep elsewhere (``verify --anchor seal:ID:HASH``): every
seal is also a log line with its hash, which shipped logs keep. Seals are signed with a key
derived from the secret key (``worker.core.signing``), which the database does not hold.

One writer at a time (the housekeeping lock, shared with retention); appenders never wait for a
seal. A seal is taken only when some lane moved since the previous one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, literal, select, union_all
from sqlalchemy.orm import Session

from worker.core.logs import get_logger
from worker.core.settings import get_settings
from worker.core.signing import seal_key
from worker.store import events
from worker.store.chain import GENESIS_HASH, LANES, canonical_time, lane_name
from worker.store.db import engine_for, session_scope
from worker.store.models import Event, EventSeal, utcnow

log = get_logger("pushworker.events")

#: Version of a seal's canonical form, part of what is hashed.
SEAL_VERSION = 1


def seal_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 of a seal's canonical JSON: its id, time, heads and the previous seal's hash."""
    body = {
        "id": record["id"],
        "time": canonical_time(record["time"]),
        "heads": {lane: [int(head[0]), str(head[1])] for lane, head in record["heads"].items()},
        "prev_hash": record["prev_hash"],
        "v": SEAL_VERSION,
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _heads_query() -> Any:
    """Every lane's newest event in one statement: one index lookup per lane."""
    table = Event.__table__
    per_lane = [
        select(literal(lane).label("lane"), table.c.id, table.c.hash)
        .where(table.c.lane == lane)
        .order_by(table.c.id.desc())
        .limit(1)
        .subquery()
        .select()
        for lane in range(LANES)
    ]
    return union_all(*per_lane)


_HEADS_QUERY = _heads_query()


def lane_heads(connection: Connection) -> dict[str, list[Any]]:
    """``{lane name: [id, hash]}`` of every lane that holds an event."""
    return {
        lane_name(int(row.lane)): [int(row.id), str(row.hash)]
        for row in connection.execute(_HEADS_QUERY)
    }


@dataclass(frozen=True)
class SealReport:
    #: The new seal's id and hash, or the latest one's when nothing moved.
    id: int | None
    hash: str | None
    created: bool
    lanes: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "hash": self.hash, "created": self.created, "lanes": self.lanes}


def _latest(session: Session) -> EventSeal | None:
    return session.scalars(select(EventSeal).order_by(EventSeal.id.desc()).limit(1)).first()


def seal(*, actor: str, url: str | None = None) -> SealReport:
    """Seal the lanes' heads as they are (if any moved since the latest seal)."""
    url = url or get_settings().database_url
    with session_scope(engine_for(url)) as session:
        events.lock_chain(session)
        previous = _latest(session)
        heads = dict(previous.heads) if previous is not None else {}
        # Retention may have pruned a lane empty: it keeps its last sealed head.
        heads.update(lane_heads(session.connection()))
        if previous is not None and heads == previous.heads:
            return SealReport(previous.id, previous.hash, False, len(heads))
        if not heads:
            return SealReport(None, None, False, 0)
        newest = session.scalar(select(func.max(EventSeal.id)))
        record: dict[str, Any] = {
            "id": int(newest or 0) + 1,
            "time": utcnow(),
            "heads": heads,
            "prev_hash": previous.hash if previous is not None else GENESIS_HASH,
        }
        record["hash"] = seal_hash(record)
        key = seal_key(get_settings().secret_key)
        signature = key.sign(record["hash"]) if key is not None else None
        session.add(
            EventSeal(
                actor=actor, signature=signature, key_id=key.key_id if key else None, **record
            )
        )
    log.info("events.sealed", seal_id=record["id"], seal_hash=record["hash"], lanes=len(heads))
    return SealReport(record["id"], record["hash"], True, len(heads))


def read_seals(connection: Connection) -> list[Any]:
    """Every seal, oldest first."""
    table = EventSeal.__table__
    return list(connection.execute(select(table).order_by(table.c.id)))
