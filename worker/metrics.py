"""Prometheus metrics of a worker: jobs, steps, retries, fallbacks, Celery tasks, registry health.

Fed by what already happens: every committed event (``events.subscribe``), Celery's
``task_postrun`` signal, and the registry health check. Nothing here is on the push path: a
metric that fails to update is logged and forgotten.

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
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.core.logs import get_logger
from worker.core.settings import METRICS_DIR_ENV, METRICS_PORT_ENV, get_settings
from worker.store import events

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

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
