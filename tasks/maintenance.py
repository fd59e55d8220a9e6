"""Celery tasks: maintenance. ``pushworker.maintenance.reconcile`` runs on Celery beat's schedule
(``celeryconfig.beat_schedule``) and republishes jobs whose chain never reached a worker."""

from __future__ import annotations

from typing import Any

from tasks.app import app
from worker.core.queues import RECONCILE_TASK
from worker.core.settings import get_settings
from worker.reconcile import reconcile as reconcile_jobs

# A reconcile that waited longer than one beat interval is superseded by the next one: drop it
# rather than let a busy worker pile them up.
_EVERY = get_settings().reconcile_every


@app.task(name=RECONCILE_TASK, expires=_EVERY)
def reconcile() -> dict[str, Any]:
    return reconcile_jobs().to_dict()
