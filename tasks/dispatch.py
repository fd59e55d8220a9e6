"""Starting a job's chain on the broker: the four step tasks, by name, with ids only."""

from __future__ import annotations

from functools import lru_cache

from celery import chain

from worker.steps import STEPS

QUEUE = "pushworker"


class CeleryDispatcher:
    def start_chain(self, job_id: str, registry_id: int) -> None:
        # Imported here: tasks.app imports the task modules, which import this one.
        from tasks.app import app

        signatures = [
            app.signature(f"pushworker.step.{step}", args=(job_id, registry_id), immutable=True)
            for step in STEPS
        ]
        chain(*signatures).apply_async(queue=QUEUE)


@lru_cache(maxsize=1)
def celery_dispatcher() -> CeleryDispatcher:
    return CeleryDispatcher()
