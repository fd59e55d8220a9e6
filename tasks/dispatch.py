"""The Celery dispatcher: a job's chain on the broker, the step tasks by name, with ids only.

Registered as the ``celery`` entry point of ``pushworker.dispatchers`` (pyproject.toml), which
``worker.engine.dispatch.get_dispatcher`` loads by name: the layers below never import this one.

An image exists only on the Docker Engine that built it, so a job that names its Docker host
(``PushJob.docker_host``) is sent to that host's queue, ``pushworker.<host>``, which only the
worker started with ``PUSHWORKER_WORKER_HOST=<host>`` (and that engine's ``DOCKER_HOST``)
consumes. A job that names no host goes to the default queue, ``pushworker``. A job whose
source is not the Docker Engine goes to ``pushworker.skopeo``, whose workers need no Docker socket.
"""

from __future__ import annotations

from celery import chain

from tasks.app import app
from worker.core import tracing
from worker.core.queues import queue_for, step_task
from worker.engine.steps import STEP_NAMES
from worker.jobs import route_of
from worker.producer import recorded_trace


class CeleryDispatcher:
    def start_chain(self, job_id: str, registry_id: int) -> None:
        # Read from the job, not passed in: every caller (enqueue, fallback, operator retry,
        # reconcile) sends the chain to the same engine, whichever path it comes from.
        queue = queue_for(*route_of(job_id))
        # Each step carries the queue: a chain's later steps are published by the worker that
        # ran the step before, from the signature's own options.
        signatures = [
            app.signature(step_task(name), args=(job_id, registry_id), immutable=True, queue=queue)
            for name in STEP_NAMES
        ]
        chain(*signatures).apply_async(queue=queue)

    def wake_step(self, job_id: str, step: str, registry_id: int, message_id: str) -> None:
        """Publish ``step`` (and the steps after it) of a job waiting for its registry now, under
        ``message_id``: flow control's hand-over of a released slot. The waiter's own message still
        waits with its countdown; whichever comes second finds the step done or claimed."""
        queue = queue_for(*route_of(job_id))
        names = STEP_NAMES[STEP_NAMES.index(step) :]
        signatures = [
            app.signature(step_task(name), args=(job_id, registry_id), immutable=True, queue=queue)
            for name in names
        ]
        signatures[0].set(task_id=message_id)
        # Published by the worker of another job (the one that released the slot): the
        # message carries the waiter's own trace, not that one's.
        recorded = recorded_trace(job_id) if tracing.enabled() else None
        with tracing.resumed(recorded, job_id, "flow.wake"):
            chain(*signatures).apply_async(queue=queue)
