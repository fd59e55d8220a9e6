"""Celery task: webhook deliveries, on their own queue (``pushworker.webhooks``).

Each run plans deliveries from the event log (each subscription's cursor) and sends what is due
(``worker.webhooks``); a receiver that hangs holds a slot of the webhook worker only, never one a
push needs. Runs are started two ways:

- Celery beat, every ``PUSHWORKER_WEBHOOK_EVERY`` seconds: what guarantees that every committed
  event is planned, whatever else happens;
- a kick, for latency: in a worker process (not in producers, not in pushctl), once an event of a
  type some subscription wants has committed, a run is published at once, never retried; a
  failure to publish is only logged, as beat's next run covers it.
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_init

from tasks.app import app
from worker import webhooks
from worker.core.logs import get_logger
from worker.core.queues import WEBHOOK_QUEUE, WEBHOOK_TASK
from worker.core.settings import get_settings
from worker.store import events

log = get_logger("pushworker.webhooks")

# A run that waited longer than one beat interval is superseded by the next one: drop it rather
# than let a slow receiver pile them up.
_EVERY = get_settings().webhook_every


@app.task(name=WEBHOOK_TASK, expires=_EVERY, queue=WEBHOOK_QUEUE)
def deliver() -> dict[str, int]:
    return webhooks.run().to_dict()


def kick_on_commit(fields: dict[str, Any]) -> None:
    """An ``events.subscribe`` callback: start a run now if a subscription wants this event."""
    try:
        if str(fields.get("type")) in webhooks.wanted_types():
            deliver.apply_async(retry=False, expires=_EVERY)
    except Exception as exc:  # beat's next run plans the event anyway
        log.warning("webhook.kick_failed", failure=type(exc).__name__)


@worker_init.connect
def _kick_from_this_worker(**_kwargs: object) -> None:
    # In the worker's main process, before the pool forks: every pool process inherits it.
    events.subscribe(kick_on_commit)
