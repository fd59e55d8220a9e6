"""Celery tasks: registry health, run by Celery beat (``PUSHWORKER_HEALTH_EVERY`` seconds)."""

from __future__ import annotations

from tasks.app import app
from worker import health
from worker.core.queues import HEALTH_TASK
from worker.core.settings import get_settings
from worker.store import events, heartbeats

# A check that waited longer than one beat interval is superseded by the next one: drop it
# rather than let a busy worker pile them up.
_EVERY = get_settings().health_every


@app.task(name=HEALTH_TASK, expires=_EVERY)
def check_registries() -> dict[str, str]:
    """Check every registry as ``pushctl registry test`` does; record each change of status."""
    results = health.check_registries(
        actor=events.worker_actor(), timeout=get_settings().http_timeout
    )
    # After the work, so a heartbeat says a run completed (pushctl doctor, the beat alerts).
    heartbeats.record(HEALTH_TASK, events.worker_actor())
    return {str(result.registry_id): result.status for result in results}
