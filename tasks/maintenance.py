"""Celery tasks: maintenance. ``pushworker.maintenance.reconcile`` runs on Celery beat's schedule
(``celeryconfig.beat_schedule``) and republishes jobs whose chain never reached a worker."""

from __future__ import annotations

import os
from typing import Any

from tasks.app import app
from worker.core.queues import RECONCILE_TASK
from worker.reconcile import reconcile as reconcile_jobs

# A reconcile that waited longer than one beat interval is superseded by the next one: drop it
# rather than let a busy worker pile them up.
_EVERY = float(os.environ.get("PUSHWORKER_RECONCILE_EVERY", "60"))


@app.task(name=RECONCILE_TASK, expires=_EVERY)
def reconcile() -> dict[str, Any]:
    return reconcile_jobs().to_dict()
