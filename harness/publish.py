"""A job's chain published on a broker of the caller's choice, as the producer would publish it.

For tests that give a worker another broker than this process's configured one.
"""

from __future__ import annotations

from celery import Celery, chain

from worker.core.queues import DEFAULT_QUEUE, step_task
from worker.engine.steps import STEP_NAMES


def publish_via(broker_url: str, job_id: str, registry_id: int, queue: str = DEFAULT_QUEUE) -> None:
    """Publish the step chain of ``job_id`` for ``registry_id`` on ``broker_url``."""
    app = Celery(broker=broker_url)
    app.conf.task_serializer = "json"
    try:
        signatures = (
            app.signature(step_task(step), args=(job_id, registry_id), immutable=True)
            for step in STEP_NAMES
        )
        chain(*signatures).apply_async(queue=queue)
    finally:
        app.close()
