"""Heartbeats of the periodic tasks: when each last ran, and where (``models.Heartbeat``).

A run overwrites its task's row: the table stays one row per task, however long beat runs.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from worker.core.errors import PushWorkerError
from worker.core.logs import get_logger
from worker.store.db import session_scope
from worker.store.models import Heartbeat, utcnow

log = get_logger("pushworker.heartbeats")


def beat(session: Session, task: str, actor: str, at: datetime | None = None) -> None:
    """Record that ``task`` ran now (or at ``at``), by ``actor``."""
    row = session.get(Heartbeat, task)
    moment = at or utcnow()
    if row is None:
        session.add(Heartbeat(task=task, at=moment, actor=actor))
    else:
        row.at, row.actor = moment, actor


def last_runs(session: Session) -> dict[str, Heartbeat]:
    """``{task: its heartbeat}`` for every task that ever recorded one."""
    return {row.task: row for row in session.scalars(select(Heartbeat))}


def record(task: str, actor: str) -> bool:
    """``beat`` in a transaction of its own, after the task's work; False (and a warning line)
    when it could not be written. The task's own work is done either way: a missed heartbeat
    only makes beat look late until the next run records one."""
    try:
        with session_scope() as session:
            beat(session, task, actor)
    except (PushWorkerError, SQLAlchemyError) as exc:
        log.warning("heartbeat.not_recorded", task=task, failure=type(exc).__name__)
        return False
    return True
