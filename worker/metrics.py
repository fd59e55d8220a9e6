"""Prometheus metrics of a worker: jobs, steps, retries, fallbacks, Celery tasks, registry health.

Fed by what already happens: every committed event (``events.subscribe``), Celery's
``task_postrun`` signal, and the registry health check. Nothing here is on the push path: a
metric that fails to update is logged and forgotten.

What every worker shares is read from the database when ``/metrics`` is scraped
(``StateCollector``): jobs waiting in each queue and the oldest one's age, the webhook backlog,
when beat's periodic tasks last ran, each registry's last recorded health. Every worker exports
the same values, so ``max`` over instances is right whichever worker answered; the alert rules
and the dashboard in ``deploy/`` use them (docs/operations.md, "Alerts and dashboard").

Celery's prefork pool runs tasks in child processes, so the numbers are kept with
prometheus_client's multiprocess mode: each process writes its own files in
``PROMETHEUS_MULTIPROC_DIR``, and the worker's main process serves the sum of them on
``PUSHWORKER_METRICS_PORT`` (``/metrics``). The directory must belong to one worker instance;
it is emptied when the worker starts. Without ``PROMETHEUS_MULTIPROC_DIR`` a fresh temporary
directory is used. Without ``PUSHWORKER_METRICS_PORT`` nothing is collected or served.

``python -m worker.metrics check`` is the container health check: it exits 0 when the local
endpoint answers.
"""

from __future__ import annotations

import os
import sys
import tempfile
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from worker.core.logs import get_logger
from worker.core.queues import (
    DEFAULT_QUEUE,
    HEALTH_TASK,
    RECONCILE_TASK,
    SEAL_TASK,
    SKOPEO_QUEUE,
    queue_for,
)
from worker.core.settings import METRICS_DIR_ENV, METRICS_PORT_ENV, Settings, get_settings
from worker.core.sources import SourceKind
from worker.store import events, heartbeats, queries
from worker.store.db import read_scope
from worker.store.models import JobStatus, PushJob, Registry, WebhookDelivery, utcnow

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

log = get_logger("pushworker.metrics")

#: Seconds: from a fast credential lookup to a long push.
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800)
CHECK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: Steps started but not finished that one process remembers (a crash can leave some behind).
MAX_OPEN_STEPS = 10_000
_STEP_ENDS = {"step.succeeded": "succeeded", "step.failed": "failed", "step.skipped": "skipped"}
_JOB_ENDS = {"job.succeeded": "succeeded", "job.failed": "failed", "job.cancelled": "cancelled"}


class Metrics:
    """The worker's metrics, and how events, tasks and health checks update them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # Imported here, not at module level: prometheus_client picks its storage (memory or
        # multiprocess files) when first imported, which must be after install() set it up.
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        reg = registry if registry is not None else REGISTRY
        self.jobs = Counter(
            "pushworker_jobs", "Jobs that ended, by outcome and registry (the last one tried).",
            ["outcome", "registry"], registry=reg,
        )  # fmt: skip
        self.steps = Counter(
            "pushworker_steps", "Steps that ended, by step, outcome and registry.",
            ["step", "outcome", "registry"], registry=reg,
        )  # fmt: skip
        self.step_seconds = Histogram(
            "pushworker_step_duration_seconds",
            "From step.started to its end, by step and outcome (event times).",
            ["step", "outcome"], buckets=STEP_BUCKETS, registry=reg,
        )  # fmt: skip
        self.retries = Counter(
            "pushworker_step_retries", "Step failures that will be retried, by error.",
            ["step", "registry", "error_code"], registry=reg,
        )  # fmt: skip
        self.fallbacks = Counter(
            "pushworker_fallbacks", "Fallbacks applied after an authentication refusal.",
            ["from_registry", "to_registry"], registry=reg,
        )  # fmt: skip
        self.job_failures = Counter(
            "pushworker_job_failures", "Jobs that failed, by registry (the last tried) and code.",
            ["registry", "error_code"], registry=reg,
        )  # fmt: skip
        self.pushed_bytes = Counter(
            "pushworker_pushed_bytes", "Size of the images pushed, by registry.",
            ["registry"], registry=reg,
        )  # fmt: skip
        self.tasks = Counter(
            "pushworker_celery_tasks", "Celery task runs, by task and end state.",
            ["task", "state"], registry=reg,
        )  # fmt: skip
        self.registry_healthy = Gauge(
            "pushworker_registry_healthy",
            "1 when the registry passed its last health check (dns, tcp, tls, v2, credentials).",
            ["registry"], multiprocess_mode="mostrecent", registry=reg,
        )  # fmt: skip
        self.registry_credentials_ok = Gauge(
            "pushworker_registry_credentials_ok",
            "0 when the registry's last health check failed on its credentials.",
            ["registry"], multiprocess_mode="mostrecent", registry=reg,
        )  # fmt: skip
        self.health_checks = Counter(
            "pushworker_registry_health_checks", "Registry health checks, by resulting status.",
            ["registry", "status"], registry=reg,
        )  # fmt: skip
        self.check_seconds = Histogram(
            "pushworker_registry_check_duration_seconds", "How long a registry health check took.",
            ["registry"], buckets=CHECK_BUCKETS, registry=reg,
        )  # fmt: skip
        # flow control: the adaptive limit (-1: no limit) and the waits it causes
        self.registry_limit = Gauge(
            "pushworker_registry_effective_limit",
            "Pushes a registry may take at once now: its cap, lowered after 429s (-1: none).",
            ["registry"], multiprocess_mode="mostrecent", registry=reg,
        )  # fmt: skip
        self.throttle_changes = Counter(
            "pushworker_registry_limit_changes", "Changes of a registry's effective limit.",
            ["registry", "direction"], registry=reg,
        )  # fmt: skip
        self.waits = Counter(
            "pushworker_step_waits", "Steps that waited for their registry's limit (one per wait).",
            ["step", "registry"], registry=reg,
        )  # fmt: skip
        self._open: OrderedDict[tuple[str, str, int], datetime] = OrderedDict()
        #: Where the processes' numbers are kept (multiprocess mode); None: in this process only.
        self.directory: str | None = None

    # --- event log ------------------------------------------------------------------------------

    def on_event(self, fields: dict[str, Any]) -> None:
        kind = fields.get("type", "")
        registry = _label(fields.get("registry_id"))
        payload = fields.get("payload") or {}
        if kind == "step.started":
            self._started(fields)
        elif kind in _STEP_ENDS:
            outcome = _STEP_ENDS[kind]
            step = str(fields.get("step"))
            self.steps.labels(step, outcome, registry).inc()
            started = self._open.pop(_step_key(fields), None)
            if started is not None:
                seconds = (_time(fields) - started).total_seconds()
                self.step_seconds.labels(step, outcome).observe(max(seconds, 0.0))
            if kind == "step.failed" and payload.get("will_retry"):
                code = str(payload.get("error_code", "unknown"))
                self.retries.labels(step, registry, code).inc()
            if kind == "step.succeeded" and step == "push" and payload.get("size"):
                self.pushed_bytes.labels(registry).inc(float(payload["size"]))
        elif kind == "fallback.applied":
            self.fallbacks.labels(
                _label(payload.get("from_registry_id")), _label(payload.get("to_registry_id"))
            ).inc()
        elif kind in _JOB_ENDS:
            self.jobs.labels(_JOB_ENDS[kind], registry).inc()
            if kind == "job.failed":
                code = str(payload.get("error_code") or "unknown")
                self.job_failures.labels(registry, code).inc()
        elif kind in ("registry.throttled", "registry.unthrottled"):
            limit = payload.get("effective_limit")
            self.registry_limit.labels(registry).set(-1 if limit is None else float(limit))
            self.throttle_changes.labels(registry, kind.removeprefix("registry.")).inc()
        elif kind == "step.waiting":
            self.waits.labels(str(fields.get("step")), registry).inc()

    def _started(self, fields: dict[str, Any]) -> None:
        self._open[_step_key(fields)] = _time(fields)
        while len(self._open) > MAX_OPEN_STEPS:
            self._open.popitem(last=False)

    # --- Celery and the health check ------------------------------------------------------------

    def on_task(self, task: str, state: str) -> None:
        self.tasks.labels(task, state).inc()

    def on_health(self, registry_id: int, status: str, seconds: float) -> None:
        registry = _label(registry_id)
        self.registry_healthy.labels(registry).set(1 if status == "healthy" else 0)
        credentials_ok = status != "credentials_failing"
        self.registry_credentials_ok.labels(registry).set(1 if credentials_ok else 0)
        self.health_checks.labels(registry, status).inc()
        self.check_seconds.labels(registry).observe(seconds)


def _label(value: object) -> str:
    return "" if value is None else str(value)


def _step_key(fields: dict[str, Any]) -> tuple[str, str, int]:
    return (str(fields.get("job_id")), str(fields.get("step")), int(fields.get("registry_id") or 0))


def _time(fields: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(fields["time"]))


# --- the worker process's metrics -------------------------------------------------------------

_active: list[Metrics] = []


def install() -> Metrics | None:
    """Start collecting in this worker (main process, before the pool forks); None when off.

    Sets up the multiprocess directory before prometheus_client is imported, then subscribes
    to the event log. Forked pool processes inherit both.
    """
    if _active:
        return _active[0]
    settings = get_settings()
    if settings.metrics_port is None:
        return None
    directory = settings.metrics_dir
    if directory:
        _empty(Path(directory))
    else:
        directory = tempfile.mkdtemp(prefix="pushworker-metrics-")
        # prometheus_client reads its variable itself (at import, in this process and the
        # forked ones), so the directory chosen here is handed to it there.
        os.environ[METRICS_DIR_ENV] = directory
    metrics = Metrics()
    metrics.directory = directory
    _active.append(metrics)
    events.subscribe(_guarded(metrics.on_event))
    return metrics


def serve() -> bool:
    """Serve ``/metrics`` from this (main) process: the sum over every pool process."""
    settings = get_settings()
    port = settings.metrics_port
    if port is None or not _active:
        return False
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    directory = _active[0].directory
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    registry.register(StateCollector())
    addr = settings.metrics_addr
    try:
        start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        log.error("metrics.unavailable", port=port, addr=addr, error=str(exc),
                  hint=f"free the port or set {METRICS_PORT_ENV} to another one")  # fmt: skip
        return False
    log.info("metrics.serving", port=port, addr=addr, directory=directory)
    return True


def observe_task(task: str, state: str) -> None:
    for metrics in _active:
        _guarded_call(metrics.on_task, task, state)


def observe_health(registry_id: int, status: str, seconds: float) -> None:
    for metrics in _active:
        _guarded_call(metrics.on_health, registry_id, status, seconds)


def _guarded(callback: events.Subscriber) -> events.Subscriber:
    def call(fields: dict[str, Any]) -> None:
        _guarded_call(callback, fields)

    return call


def _guarded_call(function: Any, *args: Any) -> None:
    try:
        function(*args)
    except Exception:  # a metric must never break a step or a health check
        log.exception("metrics.update_failed", function=getattr(function, "__name__", "?"))


def _empty(directory: Path) -> None:
    """Forget the files of an earlier run (counters would otherwise continue from them).

    Only prometheus_client's own files go (``counter_123.db``, ``gauge_mostrecent_123.db``):
    a directory shared with anything else by mistake loses nothing else.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for entry in directory.glob("*.db"):
        if entry.name.split("_", 1)[0] in _FILE_KINDS and entry.is_file():
            entry.unlink(missing_ok=True)


_FILE_KINDS = frozenset({"counter", "gauge", "histogram", "summary"})


# --- what every worker shares, read at scrape time -----------------------------------------------

#: Beat's periodic tasks whose last run is exported (and checked by ``pushctl doctor``).
BEAT_TASKS = (RECONCILE_TASK, HEALTH_TASK, SEAL_TASK)
#: A registry's status before its first health check is recorded.
UNKNOWN = "unknown"
REGISTRY_STATUSES = ("healthy", "unhealthy", "credentials_failing", UNKNOWN)
_PENDING, _DEAD = "pending", "dead"  # worker.webhooks.DeliveryStatus


def beat_intervals(settings: Settings) -> dict[str, float]:
    """Seconds between two runs of each of beat's tasks, as this deployment schedules them."""
    return {
        RECONCILE_TASK: settings.reconcile_every,
        HEALTH_TASK: settings.health_every,
        SEAL_TASK: settings.seal_every,
    }


@dataclass
class SharedState:
    """What ``StateCollector`` exports; times are Unix seconds, ages seconds."""

    #: queue -> (jobs queued, age of the oldest since it was last queued; 0 when none).
    queues: dict[str, tuple[int, float]] = field(default_factory=dict)
    webhooks_pending: int = 0
    webhook_oldest_pending: float = 0.0
    webhooks_dead: int = 0
    #: task -> its last recorded run (0: never).
    beats: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, float] = field(default_factory=dict)
    #: registry id -> the status of its last ``registry.health`` event (``unknown``: none).
    registries: dict[int, str] = field(default_factory=dict)


def read_state(now: datetime | None = None) -> SharedState:
    """Read ``SharedState`` from the database (a ``PushWorkerError`` when it does not answer)."""
    moment = now or utcnow()
    settings = get_settings()
    state = SharedState(intervals=beat_intervals(settings))
    # Every known queue is exported, empty ones at 0: an alert or a panel sees a queue before
    # its first job, and an empty queue is an age of 0, not a missing series.
    known = (DEFAULT_QUEUE, *(queue_for(host) for host in settings.docker_hosts), SKOPEO_QUEUE)
    for queue in known:
        state.queues[queue] = (0, 0.0)
    with read_scope() as session:
        queued = session.execute(
            select(PushJob.docker_host, PushJob.source_kind, func.count(),
                   func.min(PushJob.updated_at))
            .where(PushJob.status == JobStatus.QUEUED.value)
            .group_by(PushJob.docker_host, PushJob.source_kind)
        ).all()  # fmt: skip
        totals: dict[str, tuple[int, float]] = {}
        for host, kind, count, oldest in queued:
            # The queue the dispatcher picks (worker.jobs.route_of): copied sources go to skopeo.
            engine = SourceKind(kind).engine if kind in set(SourceKind) else "docker"
            queue = queue_for(host, engine)
            age = max((moment - oldest).total_seconds(), 0.0) if oldest else 0.0
            jobs, before = totals.get(queue, (0, 0.0))
            totals[queue] = (jobs + int(count), max(before, age))
        state.queues.update(totals)
        pending = session.execute(
            select(func.count(), func.min(WebhookDelivery.created_at)).where(
                WebhookDelivery.status == _PENDING
            )
        ).one()
        state.webhooks_pending = int(pending[0])
        if pending[1] is not None:
            state.webhook_oldest_pending = max((moment - pending[1]).total_seconds(), 0.0)
        state.webhooks_dead = int(
            session.scalar(
                select(func.count())
                .select_from(WebhookDelivery)
                .where(WebhookDelivery.status == _DEAD)
            )
            or 0
        )
        runs = heartbeats.last_runs(session)
        for task in BEAT_TASKS:
            state.beats[task] = runs[task].at.timestamp() if task in runs else 0.0
        registry_ids = session.scalars(
            select(Registry.id).where(Registry.removed_at.is_(None)).order_by(Registry.id)
        ).all()
        for registry_id in registry_ids:
            rows = queries.select_events(
                session, stream=events.registry_stream(registry_id), types=["registry.health"],
                newest_first=True, limit=1,
            )  # fmt: skip
            status = str(rows[0].payload.get("status")) if rows else UNKNOWN
            state.registries[registry_id] = status if status in REGISTRY_STATUSES else UNKNOWN
    return state


class StateCollector:
    """A prometheus_client collector reading ``SharedState`` at each scrape.

    ``pushworker_database_up`` says whether the read worked; when it did not, the other
    families are left out (an alert on them would otherwise see stale or invented values).
    """

    def __init__(self, read: Callable[[], SharedState] = read_state) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily(
            "pushworker_database_up", "1 when this worker read its database at this scrape."
        )
        try:
            state = self._read()
        except Exception as exc:  # a scrape must answer even when the database does not
            log.warning("metrics.state_unavailable", failure=type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily(
            "pushworker_queue_jobs", "Jobs queued (not started), by queue.", labels=["queue"]
        )
        age = GaugeMetricFamily(
            "pushworker_queue_oldest_age_seconds",
            "How long the oldest queued job of the queue has waited since it was queued or "
            "retried (0: none).",
            labels=["queue"],
        )
        for queue, (count, oldest) in sorted(state.queues.items()):
            jobs.add_metric([queue], count)
            age.add_metric([queue], oldest)
        yield jobs
        yield age
        yield GaugeMetricFamily(
            "pushworker_webhook_deliveries_pending", "Webhook deliveries still to send.",
            value=state.webhooks_pending,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "pushworker_webhook_oldest_pending_age_seconds",
            "Age of the oldest webhook delivery still to send (0: none).",
            value=state.webhook_oldest_pending,
        )
        yield GaugeMetricFamily(
            "pushworker_webhook_deliveries_dead",
            "Webhook deliveries given up on (dead), until redelivered.",
            value=state.webhooks_dead,
        )
        last = GaugeMetricFamily(
            "pushworker_beat_last_run_timestamp_seconds",
            "When Celery beat's task last completed a run (Unix time; 0: never recorded).",
            labels=["task"],
        )
        every = GaugeMetricFamily(
            "pushworker_beat_interval_seconds",
            "Seconds between two runs of beat's task, as configured.",
            labels=["task"],
        )
        for task in sorted(state.beats):
            last.add_metric([task], state.beats[task])
            every.add_metric([task], state.intervals.get(task, 0.0))
        yield last
        yield every
        status = GaugeMetricFamily(
            "pushworker_registry_status",
            "1 for the status of the registry's last recorded health check, 0 for the others "
            "(unknown: never checked).",
            labels=["registry", "status"],
        )
        for registry_id, current in sorted(state.registries.items()):
            for name in REGISTRY_STATUSES:
                status.add_metric([str(registry_id), name], 1 if name == current else 0)
        yield status


# --- health check of the endpoint (Dockerfile HEALTHCHECK) ------------------------------------


def check_endpoint(timeout: float = 5) -> str | None:
    """None when the local ``/metrics`` answers 200; otherwise what is wrong."""
    settings = get_settings()
    port = settings.metrics_port
    if port is None:
        return f"{METRICS_PORT_ENV} is not set: this process serves no metrics"
    addr = settings.metrics_addr
    host = "127.0.0.1" if addr in ("0.0.0.0", "::") else addr  # noqa: S104 - compared only
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = int(response.status)
    except OSError as exc:
        return f"{url}: {exc}"
    return None if status == 200 else f"{url}: HTTP {status}"


def main(argv: list[str]) -> int:
    if argv != ["check"]:
        print("usage: python -m worker.metrics check", file=sys.stderr)
        return 2
    problem = check_endpoint()
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
