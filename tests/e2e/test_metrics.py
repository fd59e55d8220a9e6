"""Prometheus metrics of a real prefork worker, scraped over HTTP after a few real jobs.

The worker has a Docker host of its own (``metrics-host``, on the stack's engine), so that it
runs exactly the jobs of this test and its counts can be predicted: two plain pushes, one that
falls back from registry 5 to 4 after a refused login, and one to a registry that does not
answer, retried twice before the job fails.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from harness.images import new_image
from harness.stack import free_port
from harness.worker import CeleryProcess
from tests.e2e.conftest import ALTERNATIVE_ID, E2E, HARBOR_ID, password_of, wait_for_job
from worker.core.settings import get_settings
from worker.producer import enqueue_push
from worker.registries import RegistrySpec, create_registry, remove_registry
from worker.store.db import session_scope

HOST = "metrics-host"
DOWN_ID = 71  # a registry nobody listens for


@dataclass
class Scraped:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)


@dataclass
class MetricsWorker:
    worker: CeleryProcess
    url: str

    def scrape(self) -> Scraped:
        response = requests.get(self.url, timeout=10)
        response.raise_for_status()
        samples = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        }
        return Scraped(samples)

    def scrape_until(self, ready: Callable[[Scraped], bool], timeout: float = 15) -> Scraped:
        """A job's last counts land just after its status does (after-commit hooks, postrun)."""
        deadline = time.monotonic() + timeout
        while True:
            scraped = self.scrape()
            if ready(scraped) or time.monotonic() > deadline:
                return scraped
            time.sleep(0.2)


@pytest.fixture(scope="module")
def metrics_worker(e2e: E2E) -> Iterator[MetricsWorker]:
    port = free_port()
    directory = e2e.workdir / "metrics"
    directory.mkdir()
    env = {
        **e2e.env, "PUSHWORKER_DOCKER_HOSTS": HOST, "DOCKER_HOST": e2e.stack.docker_host,
        "PUSHWORKER_METRICS_PORT": str(port), "PUSHWORKER_METRICS_ADDR": "127.0.0.1",
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
    }  # fmt: skip
    # Prefork with two processes: the endpoint must sum what each of them counted.
    worker = CeleryProcess(
        env, e2e.workdir / "metrics-worker.log", host=HOST, pool="prefork", concurrency=2
    ).start()
    with session_scope() as session:
        create_registry(session, RegistrySpec(
            name="nobody-listens", url=f"http://127.0.0.1:{free_port()}", insecure=True,
            username="ci", secret="unused",
        ), registry_id=DOWN_ID)  # fmt: skip
    try:
        yield MetricsWorker(worker, f"http://127.0.0.1:{port}/metrics")
    finally:
        worker.stop()
        with session_scope() as session:
            remove_registry(session, DOWN_ID)


@pytest.fixture(autouse=True)
def _known_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSHWORKER_DOCKER_HOSTS", HOST)
    get_settings.cache_clear()


def push(e2e: E2E, registry_id: int, fallback: list[int] | None = None) -> str:
    return enqueue_push(
        source_image=new_image(e2e.api), registry_id=registry_id,
        repository=f"metrics/app-{uuid.uuid4().hex[:8]}", tag="1", requested_by="metrics-test",
        fallback=fallback, docker_host=HOST,
    )  # fmt: skip


def test_counts_after_a_few_jobs(e2e: E2E, metrics_worker: MetricsWorker) -> None:
    before = metrics_worker.scrape()
    assert before.value("pushworker_jobs_total", outcome="succeeded", registry="5") == 0

    # The fallback job first and alone: the plain ones must not meet the wrong password.
    with password_of(HARBOR_ID, "not-the-password"):
        fallback = push(e2e, HARBOR_ID, fallback=[ALTERNATIVE_ID])
        assert wait_for_job(fallback).status == "succeeded"
    plain = [push(e2e, HARBOR_ID), push(e2e, HARBOR_ID)]
    unreachable = push(e2e, DOWN_ID)
    assert [wait_for_job(job).status for job in plain] == ["succeeded", "succeeded"]
    assert wait_for_job(unreachable).error_code == "registry_unavailable"

    tasks = "pushworker_celery_tasks_total"
    m = metrics_worker.scrape_until(
        lambda m: (
            m.value(tasks, task="pushworker.step.push", state="SUCCESS") == 3
            and m.value(tasks, task="pushworker.step.login", state="IGNORED") == 2
            and m.value("pushworker_jobs_total", outcome="failed", registry=str(DOWN_ID)) == 1
        )
    )
    assert m.value("pushworker_jobs_total", outcome="succeeded", registry="5") == 2
    assert m.value("pushworker_jobs_total", outcome="succeeded", registry="4") == 1
    assert m.value("pushworker_jobs_total", outcome="failed", registry=str(DOWN_ID)) == 1
    assert m.value("pushworker_fallbacks_total", from_registry="5", to_registry="4") == 1
    # PUSHWORKER_MAX_ATTEMPTS=3: two failures that will be retried, then the job fails.
    retries = ("pushworker_step_retries_total", "login", str(DOWN_ID), "registry_unavailable")
    assert m.value(retries[0], step=retries[1], registry=retries[2], error_code=retries[3]) == 2
    assert m.value("pushworker_steps_total", step="login", outcome="failed", registry="5") == 1
    assert m.value(
        "pushworker_steps_total", step="login", outcome="failed", registry=str(DOWN_ID)
    ) == 3  # fmt: skip
    # Step durations: one observation per step that started and ended.
    hist = "pushworker_step_duration_seconds"
    assert m.value(f"{hist}_count", step="push", outcome="succeeded") == 3
    assert m.value(f"{hist}_count", step="resolve_credentials", outcome="succeeded") == 5
    assert m.value(f"{hist}_count", step="login", outcome="failed") == 4
    assert m.value(f"{hist}_sum", step="push", outcome="succeeded") > 0
    assert m.value(f"{hist}_bucket", step="push", outcome="succeeded", le="+Inf") == 3
    assert m.value("pushworker_pushed_bytes_total", registry="5") > 0
    # Celery's own view of the same work (task_postrun), summed over both pool processes. A
    # succeeded job's last task returns (SUCCESS); a chain stopped early ends with Ignore (the
    # job's state is in the database): IGNORED.
    assert m.value(tasks, task="pushworker.step.push", state="SUCCESS") == 3
    assert m.value(tasks, task="pushworker.step.login", state="SUCCESS") == 3
    assert m.value(tasks, task="pushworker.step.login", state="RETRY") == 2
    assert m.value(tasks, task="pushworker.step.login", state="IGNORED") == 2


def test_registry_health(e2e: E2E, metrics_worker: MetricsWorker) -> None:
    from tasks.app import app

    app.send_task("pushworker.health.check_registries", queue=f"pushworker.{HOST}")
    ids = [str(HARBOR_ID), str(ALTERNATIVE_ID), str(DOWN_ID)]
    count = "pushworker_registry_check_duration_seconds_count"
    m = metrics_worker.scrape_until(
        lambda m: all(m.value(count, registry=r) == 1 for r in ids), timeout=60
    )
    assert [m.value(count, registry=r) for r in ids] == [1, 1, 1], "not checked within 60 s"
    healthy, credentials = "pushworker_registry_healthy", "pushworker_registry_credentials_ok"
    assert [m.samples.get((healthy, frozenset({("registry", r)}))) for r in ids] == [1, 1, 0]
    assert [m.samples.get((credentials, frozenset({("registry", r)}))) for r in ids] == [1, 1, 1]
    assert m.value(
        "pushworker_registry_health_checks_total", registry=str(DOWN_ID), status="unhealthy"
    ) == 1  # fmt: skip
