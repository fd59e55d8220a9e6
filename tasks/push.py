"""The step tasks of a push job, one per step of ``worker.engine.steps.STEPS``, made from that
list. Each takes (job_id, registry_id) and nothing secret; its name is
``worker.core.queues.step_task`` of the step's (producers and queued messages use it)."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import structlog
from celery import Task, chain
from celery.exceptions import Ignore
from celery.signals import worker_process_init
from sqlalchemy import select

from tasks.app import app
from worker.core import tracing
from worker.core.logs import get_logger
from worker.core.queues import queue_for, step_task
from worker.core.settings import get_settings
from worker.engine.dispatch import get_dispatcher
from worker.engine.flow import WAKE_PREFIX
from worker.engine.pipeline import Outcome, StepRunner, default_runner
from worker.engine.steps import STEP_NAMES
from worker.jobs import route_of
from worker.producer import recorded_trace
from worker.store.db import default_engine, read_connection, reader_for
from worker.store.models import Registry

log = get_logger("pushworker.tasks")

#: How long one task goes on running the steps of waiters its releases handed slots to, before
#: it publishes them instead: its own message stays unacknowledged meanwhile, and its process
#: serves nothing else.
TAKE_OVER_BUDGET = 30.0


_RUNNER_LOCK = threading.Lock()
_built: list[StepRunner] = []


def _runner() -> StepRunner:
    """The process's step runner, built once (by the warm-up thread, or the first task: the
    lock keeps the two from building one each)."""
    if _built:
        return _built[0]
    with _RUNNER_LOCK:
        if not _built:
            runner = default_runner(get_dispatcher())
            if runner.flow is not None and runner.flow.wake is not None:
                # A released slot's next holder runs here (``_take_over``), not behind the queue.
                runner.flow.keep_handed = True
            _built.append(runner)
    return _built[0]


@worker_process_init.connect
def _warm_pool_process(**_kwargs: object) -> None:
    # A fresh pool process (at start, or replacing one that died or reached its task limit)
    # would build its clients and open its database connections during its first job. In a
    # thread: process init must end within Celery's timeout whatever the database does.
    def run() -> None:
        try:
            warm_up()
        except Exception:  # the first job builds what is missing, and says what fails
            log.warning("worker.warm_up_failed", exc_info=True)

    threading.Thread(target=run, name="pushworker-warm-up", daemon=True).start()


def warm_up() -> None:
    """What a fresh pool process's first job would otherwise pay for (100 ms and more): the
    step runner (Docker and registry clients, TLS contexts, credential key) and a first pooled
    connection to the database on each of its engines (the pragmas of SQLite's run on connect;
    nothing is begun, so no lock is taken)."""
    _runner()
    with default_engine().connect(), reader_for(get_settings().database_url).connect():
        pass


def _run(task: Task, step: str, job_id: str, registry_id: int) -> dict[str, Any]:
    # Every line the step logs (ours, docker-py's, Celery's) names the job, step and registry.
    with structlog.contextvars.bound_contextvars(job_id=job_id, registry_id=registry_id, step=step):
        return _run_step(task, step, job_id, registry_id)


def _run_step(task: Task, step: str, job_id: str, registry_id: int) -> dict[str, Any]:
    runner = _runner()
    try:
        with step_span(step, job_id, registry_id) as span:
            outcome = runner.run(
                step,
                job_id,
                registry_id,
                delivery_retries=task.request.retries,
                message_id=task.request.id,
            )
            tracing.set_attributes({"pushworker.step.next": outcome.action}, span)
    finally:
        _take_over(task, runner)
    if outcome.action == "retry":
        # The step counts its own tries in the database, so Celery's counter is not the bound.
        raise task.retry(countdown=outcome.countdown, max_retries=None)
    if outcome.action == "stop" and not outcome.finished:
        # Ends this chain quietly: the job's state and events already say why.
        raise Ignore()
    # A finished job's last step returns: Ignore would stop nothing more here, and Celery
    # copies the traceback of every Ignore, frame by frame, and pickles it to the main process
    # (1.5 ms of CPU and 37 KB a task, measured on a push task).
    return {"job_id": job_id, "step": step, "registry_id": registry_id}


def step_span(step: str, job_id: str, registry_id: int) -> Any:
    """The span of one run of a step: inside the Celery task's span, around claim, act and
    record. The job's events add to it (``worker.core.tracing.record_event``): the try, the
    digest, the bytes pushed, the outcome, the error code."""
    return tracing.span(
        f"step {step}",
        attributes={
            tracing.JOB_ID: job_id, tracing.STEP: step, tracing.REGISTRY_ID: registry_id,
            tracing.REGISTRY_HOST: _registry_host(registry_id) if tracing.enabled() else None,
        },
    )  # fmt: skip


def _registry_host(registry_id: int) -> str | None:
    """The registry's host, for the step's span (None when the database cannot say now: the
    step finds out and records why)."""
    try:
        # A read connection: one indexed select, without the SQLite write lock of a session.
        with read_connection() as connection:
            host = connection.execute(
                select(Registry.host).where(Registry.id == registry_id)
            ).scalar_one_or_none()
    except Exception:
        return None
    return str(host) if host is not None else None


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


def _take_over(task: Task, runner: StepRunner) -> None:
    """Run, here and now, the steps of the waiters this process's releases reserved slots for.

    A wake message is published behind every message already in the queue: while many jobs are
    in their first steps, it reached a worker about as late as a push takes, the slot reserved
    and idle meanwhile. Run here, the head of the queue starts its push at once. Only a waiter
    whose job runs on this message's queue (``queue_for(*route_of(job))``, as the dispatcher
    routes it) runs here; any other, or any after ``TAKE_OVER_BUDGET`` seconds, gets a wake
    message. What the step leaves to do (a retry after its countdown, the next step) is
    published as the waiter's own message would have been.
    """
    flow = runner.flow
    if flow is None:
        return
    queue = (task.request.delivery_info or {}).get("routing_key")
    started = time.monotonic()
    while handed := flow.take_handed():
        for registry_id, waiter in handed:
            job_id, _, step = waiter.rpartition(":")
            try:
                late = time.monotonic() - started > TAKE_OVER_BUDGET
                if queue is None or late or queue_for(*route_of(job_id)) != queue:
                    flow.wake_waiter(registry_id, waiter)
                    continue
                # In the waiter's trace, not in the trace of the job that released the slot.
                with (
                    structlog.contextvars.bound_contextvars(
                        job_id=job_id, registry_id=registry_id, step=step
                    ),
                    tracing.resumed(_traced(job_id), job_id, "flow.take_over"),
                ):
                    with step_span(step, job_id, int(registry_id)):
                        outcome = runner.run(
                            step, job_id, registry_id, message_id=WAKE_PREFIX + uuid.uuid4().hex
                        )
                    _follow_up(outcome, job_id, step, registry_id, queue)
            except Exception:
                # The reservation's lease frees the slot; the waiter's own message goes on.
                log.exception("flow.take_over_failed", job_id=job_id, step=step)


def _traced(job_id: str) -> str | None:
    return recorded_trace(job_id) if tracing.enabled() else None


def _follow_up(outcome: Outcome, job_id: str, step: str, registry_id: int, queue: str) -> None:
    """Publish what a step run by ``_take_over`` leaves to do: itself again after its countdown
    (a retry), or the steps after it (continue)."""
    if outcome.action == "stop":
        return
    index = STEP_NAMES.index(step) + (1 if outcome.action == "continue" else 0)
    names = STEP_NAMES[index:]
    if not names:
        return
    signatures = [
        app.signature(step_task(name), args=(job_id, registry_id), immutable=True, queue=queue)
        for name in names
    ]
    countdown = outcome.countdown if outcome.action == "retry" else 0.0
    chain(*signatures).apply_async(queue=queue, countdown=countdown)
