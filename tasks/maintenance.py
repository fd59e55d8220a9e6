"""Celery tasks: maintenance, on Celery beat's schedule (``celeryconfig.beat_schedule``):
``reconcile`` republishes jobs whose chain never reached a worker; ``seal_events`` seals the
event log's chains (``worker.store.seals``)."""

from __future__ import annotations

from typing import Any

from tasks.app import app
from worker.core.queues import RECONCILE_TASK, SEAL_TASK
from worker.core.settings import get_settings
from worker.reconcile import reconcile as reconcile_jobs
from worker.store import events, heartbeats, seals

# A reconcile that waited longer than one beat interval is superseded by the next one: drop it
# rather than let a busy worker pile them up.
_EVERY = get_settings().reconcile_every


@app.task(name=RECONCILE_TASK, expires=_EVERY)
def reconcile() -> dict[str, Any]:
    report = reconcile_jobs().to_dict()
    # After the work, so a heartbeat says a run completed (pushctl doctor, the beat alerts).
    heartbeats.record(RECONCILE_TASK, events.worker_actor())
    return report


@app.task(name=SEAL_TASK, expires=get_settings().seal_every)
def seal_events() -> dict[str, Any]:
    # Superseded by the next run when late, like reconcile: a seal names the heads as they are.
    report = seals.seal(actor=events.worker_actor()).to_dict()
    heartbeats.record(SEAL_TASK, events.worker_actor())
    return report
