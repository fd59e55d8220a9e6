"""The step tasks of a push job, one per step of ``worker.engine.steps.STEPS``, made from that
list. Each takes (job_id, registry_id) and nothing secret; its name is
``worker.core.queues.step_task`` of the step's (producers and queued messages use it)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import structlog
from celery import Task
from celery.exceptions import Ignore

from tasks.app import app
from worker.core.queues import step_task
from worker.engine.dispatch import get_dispatcher
from worker.engine.pipeline import StepRunner, default_runner
from worker.engine.steps import STEP_NAMES


@lru_cache(maxsize=1)
def _runner() -> StepRunner:
    return default_runner(get_dispatcher())


def _run(task: Task, step: str, job_id: str, registry_id: int) -> dict[str, Any]:
    # Every line the step logs (ours, docker-py's, Celery's) names the job, step and registry.
    with structlog.contextvars.bound_contextvars(job_id=job_id, registry_id=registry_id, step=step):
        return _run_step(task, step, job_id, registry_id)


def _run_step(task: Task, step: str, job_id: str, registry_id: int) -> dict[str, Any]:
    outcome = _runner().run(
        step,
        job_id,
        registry_id,
        delivery_retries=task.request.retries,
        message_id=task.request.id,
    )
    if outcome.action == "retry":
        # The step counts its own tries in the database, so Celery's counter is not the bound.
        raise task.retry(countdown=outcome.countdown, max_retries=None)
    if outcome.action == "stop":
        # Ends this chain quietly: the job's state and events already say why.
        raise Ignore()
    return {"job_id": job_id, "step": step, "registry_id": registry_id}


def _step_task(step: str) -> Task:
    """Register the Celery task that runs ``step``."""

    def run(self: Task, job_id: str, registry_id: int) -> dict[str, Any]:
        return _run(self, step, job_id, registry_id)

    run.__name__ = run.__qualname__ = step
    run.__doc__ = f"The {step} step of a push job."
    # max_retries=None on the task: ``task.retry(max_retries=None)`` alone falls back to the
    # task's default of 3, and a step waiting for its registry's limit is re-queued many times.
    return app.task(bind=True, name=step_task(step), max_retries=None)(run)


#: The registered task of each step, by step name.
TASKS: dict[str, Task] = {name: _step_task(name) for name in STEP_NAMES}
