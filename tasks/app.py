"""The Celery application. Configuration lives in ``celeryconfig.py``.

Worker start-up, in the main process: a worker started with ``PUSHWORKER_WORKER_HOST=<host>``
(one of ``PUSHWORKER_DOCKER_HOSTS``) also consumes ``pushworker.<host>``, the queue of jobs whose
image is on that host's Docker Engine; with ``PUSHWORKER_METRICS_PORT`` it collects Prometheus
metrics and serves them (``worker.metrics``).
"""

from __future__ import annotations

import threading
from typing import Any

import structlog
from celery import Celery
from celery.signals import (
    beat_init,
    celeryd_after_setup,
    setup_logging,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)

from worker import metrics
from worker.core import tracing
from worker.core.brokers import broker_kind, delayed_delivery_seconds
from worker.core.errors import PushWorkerError, ValidationError
from worker.core.logs import configure_logging, get_logger
from worker.core.queues import STEP_TASK_PREFIX
from worker.core.settings import DOCKER_HOSTS_ENV, WORKER_HOST_ENV, get_settings
from worker.jobs import check_docker_host
from worker.producer import start_tracing


class PushworkerCelery(Celery):  # type: ignore[misc]  # Celery is untyped
    """Celery, with delays in whole seconds on RabbitMQ (``delayed_delivery_seconds``): a retry
    or flow-control poll due in under a second would otherwise be refused by kombu's delayed
    delivery, and the step's message lost until reconcile."""

    def send_task(self, name: str, *args: Any, **options: Any) -> Any:
        # Task.apply_async passes (name, args, kwargs) positionally and the delay by keyword.
        if len(args) < 3 and broker_kind(str(self.conf.broker_url)) == "amqp":
            seconds = delayed_delivery_seconds(
                options.get("countdown"), options.get("eta"), self.now()
            )
            if seconds is not None:
                options["countdown"], options["eta"] = seconds, None
        return super().send_task(name, *args, **options)


app: Celery = PushworkerCelery("pushworker")
app.config_from_object("celeryconfig")
# Every task module, imported when the worker starts (and when a producer publishes).
app.conf.include = [
    "tasks.push", "tasks.submit", "tasks.maintenance", "tasks.health", "tasks.webhooks",
]  # fmt: skip

log = get_logger("pushworker.worker")


@setup_logging.connect
def _use_structlog(**_kwargs: object) -> None:
    # Celery's own logging setup is replaced so every line (ours and Celery's) is structured.
    configure_logging(get_settings().log_format)


def worker_host() -> str | None:
    """The named Docker host this worker pushes from (``PUSHWORKER_WORKER_HOST``), if any."""
    return get_settings().worker_host


@celeryd_after_setup.connect
def _consume_host_queue(sender: str, instance: Any, **_kwargs: object) -> None:
    host = worker_host()
    if host is None:
        return
    from worker.core.queues import queue_for

    try:
        check_docker_host(host)
    except PushWorkerError as error:
        # A worker nobody can send jobs to must not look healthy: refuse to start.
        log.error("worker.unknown_docker_host", worker_host=host, error=error.message,
                  hint=f"add {host} to {DOCKER_HOSTS_ENV} (the same list for producers and "
                  f"workers), or fix {WORKER_HOST_ENV}")  # fmt: skip
        raise SystemExit(2) from None
    queue = queue_for(host)
    queues = instance.app.amqp.queues
    # queues[name] declares it as producers do (a quorum queue on RabbitMQ, celeryconfig); a
    # bare name would be declared classic, and RabbitMQ refuses the producers' declaration.
    queues.select_add(queues[queue])
    log.info("worker.docker_host", worker_host=host, queue=queue, node=sender)


@worker_init.connect
def _start_metrics(**_kwargs: object) -> None:
    # In the main process, before the pool forks: the children inherit the collectors, and
    # every line they log says which Docker host it comes from.
    if host := worker_host():
        structlog.contextvars.bind_contextvars(worker_host=host)
    metrics.install()


@worker_init.connect
def _check_tracing(**_kwargs: object) -> None:
    # In the main process, before the pool forks: an OTEL_* value this installation cannot
    # honour stops the worker at start, not every pool process at its first job.
    try:
        tracing.requested_here()
    except ValidationError as error:
        _refuse_tracing(error)


def _refuse_tracing(error: ValidationError) -> None:
    log.error("worker.tracing_refused", error=error.message, hint=error.hint)
    raise SystemExit(2) from None


@worker_process_init.connect
def _trace_pool_process(**_kwargs: object) -> None:
    # Each pool process after the fork (the batch processor's thread is its own), and a solo
    # pool's only process; the main process only supervises and records no span.
    start_tracing("worker")


@worker_process_shutdown.connect
def _flush_traces(**_kwargs: object) -> None:
    # Pool processes end with os._exit, past atexit: the last job's spans are exported now.
    tracing.shutdown()


@beat_init.connect
def _trace_beat(**_kwargs: object) -> None:
    try:
        start_tracing("beat")
    except ValidationError as error:
        _refuse_tracing(error)  # Celery would log a receiver's error and go on untraced


@worker_ready.connect
def _serve_metrics(**_kwargs: object) -> None:
    metrics.serve()


@worker_ready.connect
def _take_over_dead_claims(**_kwargs: object) -> None:
    # A worker that starts where another died whole (SIGKILL, OOM, reboot) resumes its jobs now,
    # not after Redis' visibility timeout or beat's grace (worker.reconcile). In a thread: the
    # consumer must not wait for the database to answer.
    from worker.reconcile import take_over_dead_claims

    def run() -> None:
        try:
            take_over_dead_claims()
        except Exception:  # the next start, or beat's reconcile, tries again
            log.exception("worker.takeover_failed")

    threading.Thread(target=run, name="pushworker-takeover", daemon=True).start()


_STEP_PREFIX = STEP_TASK_PREFIX
_TASK_CONTEXT = ("job_id", "registry_id", "step")


@task_prerun.connect
def _bind_task(task: Any = None, args: Any = None, **_kwargs: object) -> None:
    # Celery's own lines about a step task (succeeded, retry, failed) name the job and registry
    # too; the step wrapper binds the same for the lines the step itself logs.
    name = str(getattr(task, "name", ""))
    if name.startswith(_STEP_PREFIX) and isinstance(args, list | tuple) and len(args) >= 2:
        structlog.contextvars.bind_contextvars(
            job_id=args[0], registry_id=args[1], step=name[len(_STEP_PREFIX) :]
        )


@task_postrun.connect
def _count_task(task: Any = None, state: str | None = None, **_kwargs: object) -> None:
    structlog.contextvars.unbind_contextvars(*_TASK_CONTEXT)
    if task is not None:
        metrics.observe_task(str(task.name), str(state or "UNKNOWN"))


@task_postrun.connect
def _drop_traceback(retval: Any = None, **_kwargs: object) -> None:
    # A task that ended by raising (Retry: a wait or a retry; Ignore: a chain stopped early; a
    # failure) leaves the exception as ``retval``. Its traceback holds Celery's tracing frame,
    # whose locals hold the exception: a reference cycle that only a full collection frees.
    # Most of its bytes are Celery's copy of each frame's code positions (billiard's einfo on
    # Python 3.11), tuples of ints the collector does not count, so it runs too rarely and a
    # pool process grew by ~100 MiB (docs/benchmarks.md, capacity model). Celery has logged and
    # copied the traceback by now: dropping it breaks the cycle, freed as the task returns.
    drop_tracebacks(retval)


def drop_tracebacks(error: object) -> None:
    """Clear the traceback of ``error`` and of the exceptions it was raised from or during."""
    seen: set[int] = set()
    while isinstance(error, BaseException) and id(error) not in seen:
        seen.add(id(error))
        error.__traceback__ = None
        error = error.__cause__ or error.__context__
