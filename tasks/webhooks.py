"""Celery task: webhook deliveries, on their own queue (``pushworker.webhooks``), run by Celery
beat every ``PUSHWORKER_WEBHOOK_EVERY`` seconds. Each run plans deliveries from the event log
(each subscription's cursor) and sends what is due (``worker.webhooks``); a receiver that hangs
holds a slot of the webhook worker only, never one a push needs."""

from __future__ import annotations

from tasks.app import app
from worker import webhooks
from worker.core.queues import WEBHOOK_QUEUE, WEBHOOK_TASK
from worker.core.settings import get_settings

# A run that waited longer than one beat interval is superseded by the next one: drop it rather
# than let a slow receiver pile them up.
_EVERY = get_settings().webhook_every


@app.task(name=WEBHOOK_TASK, expires=_EVERY, queue=WEBHOOK_QUEUE)
def deliver() -> dict[str, int]:
    return webhooks.run().to_dict()
