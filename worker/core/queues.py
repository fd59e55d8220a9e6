"""The names producers and workers agree on over the broker: queues and task names.

One place, so that a queue or a task is never spelled twice: ``celeryconfig``, the Celery tasks,
the dispatcher, the message contract and the message guard all read them here.
"""

from __future__ import annotations

#: The default queue: jobs that name no Docker host, submissions and the periodic tasks.
DEFAULT_QUEUE = "pushworker"
#: The message contract's task (docs/producers.md).
SUBMIT_TASK = "pushworker.submit"
#: Celery beat's periodic tasks.
RECONCILE_TASK = "pushworker.maintenance.reconcile"
HEALTH_TASK = "pushworker.health.check_registries"
SEAL_TASK = "pushworker.maintenance.seal_events"
#: Webhook deliveries: a queue of their own, so a slow receiver never delays a push.
WEBHOOK_QUEUE = "pushworker.webhooks"
WEBHOOK_TASK = "pushworker.webhooks.deliver"
#: Every step task is this prefix plus the step's name (``worker.engine.steps.STEPS``).
STEP_TASK_PREFIX = "pushworker.step."


#: Jobs whose source is not the Docker Engine (another registry, an OCI layout, a docker-archive):
#: copied by skopeo, so their workers need no Docker socket (docs/sources.md).
SKOPEO_QUEUE = f"{DEFAULT_QUEUE}.skopeo"


def queue_for(docker_host: str | None, engine: str = "docker") -> str:
    """The queue of the worker attached to ``docker_host`` (the default queue for None); for
    ``engine`` ``skopeo`` (the non-Docker sources), the skopeo workers' queue, whatever the host."""
    if engine == "skopeo":
        return SKOPEO_QUEUE
    return f"{DEFAULT_QUEUE}.{docker_host}" if docker_host else DEFAULT_QUEUE


def step_task(step: str) -> str:
    """The Celery task name of a step."""
    return f"{STEP_TASK_PREFIX}{step}"
