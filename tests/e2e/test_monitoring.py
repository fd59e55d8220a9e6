"""The monitoring files and ``pushctl doctor`` against a real prefork worker, a real beat and the
real stack.

- Every metric the alert rules and the Grafana dashboard read (tests/support/monitoring.py) is
  in what a worker serves on ``/metrics`` after real pushes: plain, a fallback after a refused
  login, one to a registry that does not answer, two to a registry capped at one push at once
  (the second waits), one answered 429 once (the registry's limit is lowered), and a registry
  health check.
- ``pushctl doctor``, run as operators run it, finds the worker on each queue, beat's runs, the
  credentials and the registries' health; with the Docker host's worker stopped, its queue
  fails and so does the exit code; with a broker nobody listens on, it says so without hanging.

The worker has a Docker host of its own (``monitoring-host``), as in test_metrics.py, so the
jobs here are its own; nothing shared is stopped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from harness.images import new_image
from harness.stack import free_port
from harness.worker import CeleryProcess
from tests.e2e.conftest import ALTERNATIVE_ID, E2E, HARBOR_ID, password_of, wait_for_job
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.monitoring import PROMETHEUS_OWN, names_read
from worker.core.queues import HEALTH_TASK, RECONCILE_TASK, SEAL_TASK
from worker.core.settings import get_settings
from worker.producer import enqueue_push
from worker.registries import RegistrySpec, create_registry, remove_registry
from worker.store import heartbeats
from worker.store.db import session_scope
from worker.store.queries import select_events

HOST = "monitoring-host"
QUEUE = f"pushworker.{HOST}"
DOWN_ID, CAPPED_ID, THROTTLING_ID = 81, 82, 83
#: Beat's intervals in this module: short, so that a real beat runs each task within seconds.
BEAT_ENV = {
    "PUSHWORKER_RECONCILE_EVERY": "2", "PUSHWORKER_HEALTH_EVERY": "4", "PUSHWORKER_SEAL_EVERY": "2",
}  # fmt: skip


@dataclass
class Scrape:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    @property
    def names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))


@dataclass
class MonitoringWorker:
    worker: CeleryProcess
    url: str
    env: dict[str, str]

    def scrape(self) -> Scrape:
        response = requests.get(self.url, timeout=10)
        response.raise_for_status()
        return Scrape({
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        })  # fmt: skip

    def scrape_until(self, ready: Callable[[Scrape], bool], timeout: float = 60) -> Scrape:
        deadline = time.monotonic() + timeout
        while True:
            scraped = self.scrape()
            if ready(scraped) or time.monotonic() > deadline:
                return scraped
            time.sleep(0.5)


@pytest.fixture(scope="module")
def monitoring(e2e: E2E) -> Iterator[MonitoringWorker]:
    port = free_port()
    directory = e2e.workdir / "monitoring-metrics"
    directory.mkdir()
    env = {
        **e2e.env, "PUSHWORKER_DOCKER_HOSTS": HOST, "DOCKER_HOST": e2e.stack.docker_host,
        "PUSHWORKER_METRICS_PORT": str(port), "PUSHWORKER_METRICS_ADDR": "127.0.0.1",
        "PROMETHEUS_MULTIPROC_DIR": str(directory), **BEAT_ENV,
    }  # fmt: skip
    worker = CeleryProcess(
        env, e2e.workdir / "monitoring-worker.log", host=HOST, pool="prefork", concurrency=2
    ).start()
    try:
        yield MonitoringWorker(worker, f"http://127.0.0.1:{port}/metrics", env)
    finally:
        worker.stop()


@pytest.fixture(autouse=True)
def _known_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSHWORKER_DOCKER_HOSTS", HOST)
    get_settings.cache_clear()


def push(e2e: E2E, registry_id: int, fallback: list[int] | None = None) -> str:
    return enqueue_push(
        source_image=new_image(e2e.api), registry_id=registry_id,
        repository=f"monitoring/app-{uuid.uuid4().hex[:8]}", tag="1",
        requested_by="monitoring-test", fallback=fallback, docker_host=HOST,
    )  # fmt: skip


def types_of(job_id: str) -> list[str]:
    with session_scope() as session:
        return [event.type for event in select_events(session, job_id=job_id)]


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.2)


def proxied_registry(e2e: E2E, registry_id: int, max_concurrent: int | None) -> FaultProxy:
    host, port = e2e.stack.plain.host.rsplit(":", 1)
    proxy = FaultProxy(host, int(port)).start()
    spec = RegistrySpec(
        name=f"monitoring-{registry_id}", url=proxy.url, username=e2e.stack.plain.user,
        secret=e2e.stack.plain.password, insecure=True, max_concurrent=max_concurrent,
    )  # fmt: skip
    with session_scope() as session:
        create_registry(session, spec, registry_id=registry_id)
    return proxy


def test_every_metric_the_alerts_and_the_dashboard_read_is_exported(
    e2e: E2E, monitoring: MonitoringWorker
) -> None:
    with session_scope() as session:
        create_registry(session, RegistrySpec(
            name="monitoring-nobody", url=f"http://127.0.0.1:{free_port()}", insecure=True,
            username="ci", secret="unused",
        ), registry_id=DOWN_ID)  # fmt: skip
    capped = proxied_registry(e2e, CAPPED_ID, max_concurrent=1)
    throttling = proxied_registry(e2e, THROTTLING_ID, max_concurrent=None)
    try:
        with password_of(HARBOR_ID, "not-the-password"):
            fallback = push(e2e, HARBOR_ID, fallback=[ALTERNATIVE_ID])
            assert wait_for_job(fallback).status == "succeeded"
        plain, unreachable = push(e2e, HARBOR_ID), push(e2e, DOWN_ID)
        # The first capped push holds the registry's only slot while its manifest is delayed;
        # the second, enqueued once the first push started, must wait for it.
        capped.add(Fault(method="PUT", path="/manifests/", delay=5))
        first = push(e2e, CAPPED_ID)
        wait_until(lambda: _push_started(first), 60, "the first capped push starting")
        second = push(e2e, CAPPED_ID)
        # One 429 on the first blob upload: the registry's limit is lowered, the push retried.
        throttling.add(Fault(method="POST", path="/blobs/uploads/", status=429,
                             retry_after="1", error_code="TOOMANYREQUESTS", times=1))  # fmt: skip
        throttled = push(e2e, THROTTLING_ID)
        for job in (plain, first, second, throttled):
            assert wait_for_job(job, timeout=180).status == "succeeded", types_of(job)
        assert wait_for_job(unreachable).error_code == "registry_unavailable"
        assert "step.waiting" in types_of(second)

        from tasks.app import app

        app.send_task(HEALTH_TASK, queue=QUEUE)
        app.send_task(RECONCILE_TASK, queue=QUEUE)
        needed = set(names_read()) - PROMETHEUS_OWN
        scraped = monitoring.scrape_until(
            lambda m: (
                needed <= m.names
                and (
                    m.value("pushworker_beat_last_run_timestamp_seconds", task=RECONCILE_TASK) or 0
                )
                > 0
            )
        )
    finally:
        capped.close()
        throttling.close()
        with session_scope() as session:
            for registry_id in (DOWN_ID, CAPPED_ID, THROTTLING_ID):
                remove_registry(session, registry_id)

    where = names_read()
    missing = {name: sorted(where[name]) for name in needed - scraped.names}
    assert missing == {}, "read by the alerts or the dashboard, not exported by the worker"
    # The families are there because these very jobs made them, with their labels.
    failures = "pushworker_job_failures_total"
    assert scraped.value(failures, registry=str(DOWN_ID), error_code="registry_unavailable") == 1
    waits = scraped.value("pushworker_step_waits_total", step="push", registry=str(CAPPED_ID))
    assert waits is not None and waits >= 1
    lowered = scraped.value(
        "pushworker_registry_limit_changes_total", registry=str(THROTTLING_ID),
        direction="throttled",
    )  # fmt: skip
    assert lowered is not None and lowered >= 1
    assert scraped.value("pushworker_database_up") == 1
    assert scraped.value("pushworker_queue_jobs", queue=QUEUE) == 0
    assert scraped.value("pushworker_registry_status", registry="5", status="healthy") == 1
    assert scraped.value("pushworker_beat_interval_seconds", task=RECONCILE_TASK) == 2


def _push_started(job_id: str) -> bool:
    with session_scope() as session:
        rows = select_events(session, job_id=job_id)
        return any(row.type == "step.started" and row.step == "push" for row in rows)


def doctor(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    """``pushctl doctor --json`` in a process of its own, as an operator runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "doctor", "--json", *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    data: dict[str, Any] = json.loads(result.stdout)
    return result.returncode, data


def by_name(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {finding["name"]: finding for finding in data["findings"]}


EXIT_CODES = {"ok": 0, "warn": 1, "fail": 2}


@pytest.fixture(scope="module")
def beat(e2e: E2E, monitoring: MonitoringWorker) -> Iterator[CeleryProcess]:
    """A real Celery beat on this session's broker, every 2 s and 4 s; the session's worker
    runs what it publishes on the default queue."""
    process = CeleryProcess(monitoring.env, e2e.workdir / "monitoring-beat" / "beat.log", beat=True)
    process.log_path.parent.mkdir()
    process.start()
    try:
        yield process
    finally:
        process.stop()


def test_doctor_finds_every_part_running(
    e2e: E2E, monitoring: MonitoringWorker, beat: CeleryProcess
) -> None:
    started = time.time()

    def beat_ran() -> bool:
        with session_scope() as session:
            runs = heartbeats.last_runs(session)
        return all(
            task in runs and runs[task].at.timestamp() > started
            for task in (RECONCILE_TASK, HEALTH_TASK, SEAL_TASK)
        )

    wait_until(beat_ran, 90, "beat's reconcile, health and seal runs")
    code, data = doctor(monitoring.env, "--timeout", "5")
    found = by_name(data)
    expected_ok = [
        "database", "migrations", "broker", "secret key", "credentials", "beat reconcile",
        "beat check_registries", "beat seal_events", "registry 4", "registry 5",
    ]  # fmt: skip
    for name in expected_ok:
        assert found[name]["status"] == "ok", found[name]
    assert found["queue pushworker"]["status"] == "ok"
    assert e2e.worker.node in found["queue pushworker"]["detail"]
    assert found[f"queue {QUEUE}"]["status"] == "ok"
    assert found[f"queue {QUEUE}"]["detail"] == f"consumed by 1 worker: {monitoring.worker.node}"
    # Registries other test modules of the session left behind may fail their health checks;
    # nothing else may.
    others = {
        name for name, finding in found.items()
        if finding["status"] != "ok" and not name.startswith("registry ")
    }  # fmt: skip
    assert others == set(), [found[name] for name in others]
    assert data["status"] == max(
        (f["status"] for f in data["findings"]), key=EXIT_CODES.__getitem__
    )
    assert code == EXIT_CODES[data["status"]]


def test_doctor_when_the_hosts_worker_is_stopped(
    e2e: E2E, monitoring: MonitoringWorker, beat: CeleryProcess
) -> None:
    monitoring.worker.stop()
    code, data = doctor(monitoring.env, "--timeout", "2")
    found = by_name(data)
    queue = found[f"queue {QUEUE}"]
    assert queue["status"] == "fail"
    assert queue["detail"].endswith("none consumes it")
    assert f"PUSHWORKER_WORKER_HOST={HOST}" in queue["fix"]
    assert found["queue pushworker"]["status"] == "ok"  # the session's worker still runs
    assert (code, data["status"]) == (2, "fail")


def test_doctor_with_a_broker_nobody_listens_on(e2e: E2E, monitoring: MonitoringWorker) -> None:
    env = {**monitoring.env, "PUSHWORKER_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    code, data = doctor(env, "--timeout", "1")
    found = by_name(data)
    assert found["broker"]["status"] == "fail"
    assert found["queue pushworker"] == {
        "name": "queue pushworker", "status": "warn",
        "detail": "not checked: the broker does not answer", "fix": None,
    }  # fmt: skip
    assert found["database"]["status"] == "ok"
    assert code == 2
