"""A job's chain published on a broker of the caller's choice, as the producer would publish it.

For tests that give a worker another broker than this process's configured one. The Celery app
takes the broker's settings from ``worker.core.brokers``, as ``celeryconfig`` does: on RabbitMQ a
publisher that declared the queue otherwise than the worker (a classic queue instead of a quorum
queue) would be refused.
"""

from __future__ import annotations

from celery import Celery, chain

from worker.core.brokers import celery_broker_options
from worker.core.queues import DEFAULT_QUEUE, queue_for, step_task
from worker.core.settings import get_settings
from worker.engine.steps import STEP_NAMES
from worker.jobs import docker_host_of


def broker_app(broker_url: str) -> Celery:
    """A Celery app that publishes to ``broker_url`` with the worker's settings for it."""
    app = Celery(broker=broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=DEFAULT_QUEUE,
        **celery_broker_options(broker_url, get_settings().push_timeout),
    )
    return app


def publish_via(broker_url: str, job_id: str, registry_id: int, queue: str = DEFAULT_QUEUE) -> None:
    """Publish the step chain of ``job_id`` for ``registry_id`` on ``broker_url``."""
    app = broker_app(broker_url)
    try:
        _chain(app, job_id, registry_id, queue).apply_async(queue=queue)
    finally:
        app.close()


def _chain(app: Celery, job_id: str, registry_id: int, queue: str) -> chain:
    return chain(
        app.signature(step_task(step), args=(job_id, registry_id), immutable=True, queue=queue)
        for step in STEP_NAMES
    )


class BrokerDispatcher:
    """``tasks.dispatch.CeleryDispatcher``'s ``start_chain`` on a broker of the caller's choice
    (``worker.engine.dispatch.set_dispatcher``), for tests whose worker uses another broker than
    the one this process imported ``tasks.app`` with. Routes the jobs of Docker Engine sources."""

    def __init__(self, broker_url: str) -> None:
        self.app = broker_app(broker_url)

    def start_chain(self, job_id: str, registry_id: int) -> None:
        # Jobs whose image is on a Docker Engine: the default queue, or their host's.
        queue = queue_for(docker_host_of(job_id))
        _chain(self.app, job_id, registry_id, queue).apply_async(queue=queue)

    def close(self) -> None:
        self.app.close()
