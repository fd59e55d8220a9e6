"""Retention: ``prune`` removes the oldest events, leaving a checkpoint where the chain was cut
and an ``events.pruned`` event that confirms it (docs/event-log.md).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select

from worker.core.errors import StorageError, ValidationError
from worker.core.settings import get_settings
from worker.store import events
from worker.store.db import engine_for, read_snapshot, session_scope
from worker.store.export import jsonl_line
from worker.store.models import Event, EventCheckpoint, utcnow
from worker.store.queries import EventQuery, iter_records
from worker.store.verify import (
    ChainChecker,
    VerifyReport,
    checkpoint_heads,
    heads_digest,
    read_checkpoints,
    read_epoch,
)


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
    with read_snapshot(url) as connection:
        checkpoints = read_checkpoints(connection)
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
        query = EventQuery(after_id=start)
        records = (r for r in iter_records(connection, query) if r["id"] <= last_id)
        epoch = read_epoch(connection)
        checker = ChainChecker(checkpoint_heads(latest), root=epoch.v1_last_hash)
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
        heads = {lane: [head[0], head[1]] for lane, head in checker.heads.items()}
        return _commit_prune(url, cutoff, latest, segment, heads, archive, partial, sha, actor)
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
    heads: dict[str, list[Any]],
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
                    heads=heads,
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
                    "heads_sha256": heads_digest(heads),
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
