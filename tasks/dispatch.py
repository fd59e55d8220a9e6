"""Starting a job's chain on the broker: the four step tasks, by name, with ids only.

An image exists only on the Docker Engine that built it, so a job that names its Docker host
(``PushJob.docker_host``) is sent to that host's queue, ``pushworker.<host>``, which only the
worker started with ``PUSHWORKER_WORKER_HOST=<host>`` (and that engine's ``DOCKER_HOST``)
consumes. A job that names no host goes to the default queue, ``pushworker``.
"""

from __future__ import annotations

from functools import lru_cache

from celery import chain

from worker.engine.steps import STEPS
from worker.jobs import docker_host_of

#: The default queue: jobs that name no Docker host, and the periodic tasks.
DEFAULT_QUEUE = "pushworker"
QUEUE = DEFAULT_QUEUE


def queue_for(docker_host: str | None) -> str:
    """The queue of the worker attached to ``docker_host`` (the default queue for None)."""
    return f"{DEFAULT_QUEUE}.{docker_host}" if docker_host else DEFAULT_QUEUE


class CeleryDispatcher:
    def start_chain(self, job_id: str, registry_id: int) -> None:
        # Imported here: tasks.app imports the task modules, which import this one.
        from tasks.app import app

        # Read from the job, not passed in: every caller (enqueue, fallback, operator retry,
        # reconcile) sends the chain to the same engine, whichever path it comes from.
        queue = queue_for(docker_host_of(job_id))
        # Each step carries the queue: a chain's later steps are published by the worker that
        # ran the step before, from the signature's own options.
        signatures = [
            app.signature(
                f"pushworker.step.{step}", args=(job_id, registry_id), immutable=True, queue=queue
            )
            for step in STEPS
        ]
        chain(*signatures).apply_async(queue=queue)


@lru_cache(maxsize=1)
def celery_dispatcher() -> CeleryDispatcher:
    return CeleryDispatcher()
