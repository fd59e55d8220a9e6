"""Docker host names and queues, the metrics fed by events, and the health statuses: the pure
parts, without services (the real thing is in tests/e2e/test_routing, test_metrics, test_health)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from worker.core.errors import ValidationError
from worker.core.queues import queue_for
from worker.core.settings import get_settings
from worker.health import CREDENTIALS_FAILING, HEALTHY, UNHEALTHY, status_of
from worker.jobs import check_docker_host
from worker.metrics import Metrics, check_endpoint
from worker.probe import Check, ConnectionReport


def test_known_hosts_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSHWORKER_DOCKER_HOSTS", " builder-1, builder-2,,builder-1 ")
    get_settings.cache_clear()
    assert check_docker_host("builder-2") == "builder-2"
    with pytest.raises(ValidationError, match=r"'builder-3' is not a known Docker host") as refused:
        check_docker_host("builder-3")
    assert refused.value.code == "unknown_docker_host"
    for bad in ("", "Builder-1", "a b", "-x", "x/y", "x" * 64):
        with pytest.raises(ValidationError, match="is not a Docker host name") as refused:
            check_docker_host(bad)
        assert refused.value.code == "unknown_docker_host"


def test_no_hosts_configured_refuses_every_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PUSHWORKER_DOCKER_HOSTS", raising=False)
    get_settings.cache_clear()
    with pytest.raises(ValidationError) as refused:
        check_docker_host("builder-1")
    assert "none are configured" in refused.value.message
    assert refused.value.code == "unknown_docker_host"
    assert refused.value.exit_code == 2  # a validation error for pushctl


def test_queues() -> None:
    assert queue_for(None) == "pushworker"
    assert queue_for("builder-1") == "pushworker.builder-1"


# --- metrics --------------------------------------------------------------------------------------


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def event(kind: str, seconds: float = 0, step: str | None = "push", registry: int = 5,
          **payload: Any) -> dict[str, Any]:  # fmt: skip
    return {
        "type": kind, "job_id": "j1", "step": step, "registry_id": registry,
        "time": (T0 + timedelta(seconds=seconds)).isoformat(), "payload": payload,
    }  # fmt: skip


def value(collected: CollectorRegistry, name: str, **labels: str) -> float:
    return collected.get_sample_value(name, labels) or 0.0


def test_events_become_counts_and_durations() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for fields in (
        event("step.started", 0, step="login"),
        event("step.failed", 1.5, step="login", will_retry=True, error_code="registry_unavailable"),
        event("step.started", 3, step="login"),
        event("step.succeeded", 3.25, step="login"),
        event("step.started", 4),
        event("step.succeeded", 14, size=1000),
        event("job.succeeded", 14, step=None),
        event("fallback.applied", 15, step="login", from_registry_id=5, to_registry_id=4),
        event("step.skipped", 16, step="tag"),  # a duplicate delivery: never started here
        event("job.failed", 17, step=None, registry=4),
    ):
        metrics.on_event(fields)
    hist = "pushworker_step_duration_seconds"
    assert value(registry, f"{hist}_sum", step="login", outcome="failed") == 1.5
    assert value(registry, f"{hist}_sum", step="login", outcome="succeeded") == 0.25
    assert value(registry, f"{hist}_sum", step="push", outcome="succeeded") == 10
    assert value(registry, f"{hist}_count", step="tag", outcome="skipped") == 0
    assert (
        value(registry, "pushworker_steps_total", step="tag", outcome="skipped", registry="5") == 1
    )
    retries = {"step": "login", "registry": "5", "error_code": "registry_unavailable"}
    assert value(registry, "pushworker_step_retries_total", **retries) == 1
    assert value(registry, "pushworker_jobs_total", outcome="succeeded", registry="5") == 1
    assert value(registry, "pushworker_jobs_total", outcome="failed", registry="4") == 1
    assert value(registry, "pushworker_fallbacks_total", from_registry="5", to_registry="4") == 1
    assert value(registry, "pushworker_pushed_bytes_total", registry="5") == 1000


def test_health_and_tasks() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.on_health(5, HEALTHY, 0.02)
    metrics.on_health(4, CREDENTIALS_FAILING, 0.03)
    metrics.on_task("pushworker.step.push", "IGNORED")
    assert value(registry, "pushworker_registry_healthy", registry="5") == 1
    assert value(registry, "pushworker_registry_healthy", registry="4") == 0
    assert value(registry, "pushworker_registry_credentials_ok", registry="4") == 0
    assert value(registry, "pushworker_registry_credentials_ok", registry="5") == 1
    checks = {"registry": "4", "status": CREDENTIALS_FAILING}
    assert value(registry, "pushworker_registry_health_checks_total", **checks) == 1
    tasks = {"task": "pushworker.step.push", "state": "IGNORED"}
    assert value(registry, "pushworker_celery_tasks_total", **tasks) == 1


def test_endpoint_check_without_a_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PUSHWORKER_METRICS_PORT", raising=False)
    get_settings.cache_clear()
    assert "PUSHWORKER_METRICS_PORT is not set" in str(check_endpoint())


@pytest.mark.parametrize(
    ("addr", "url"),
    [
        ("", "http://127.0.0.1:9/metrics"),
        ("0.0.0.0", "http://127.0.0.1:9/metrics"),  # noqa: S104 - compared only
        ("::", "http://127.0.0.1:9/metrics"),
        ("::1", "http://[::1]:9/metrics"),
    ],
)
def test_endpoint_check_asks_the_configured_address(
    monkeypatch: pytest.MonkeyPatch, addr: str, url: str
) -> None:
    """The check asks the port and address the endpoint was told to use (an any-address bind is
    asked on the loopback); nothing listens on port 9 here, so the answer names the URL."""
    monkeypatch.setenv("PUSHWORKER_METRICS_PORT", "9")
    monkeypatch.setenv("PUSHWORKER_METRICS_ADDR", addr)
    get_settings.cache_clear()
    assert str(check_endpoint(timeout=2)).startswith(f"{url}: ")


# --- health statuses ------------------------------------------------------------------------------


def report(failed: str | None, code: str | None = None) -> ConnectionReport:
    checks = []
    failing = False
    for name in ("dns", "tcp", "tls", "v2", "credentials"):
        if failing:
            checks.append(Check(name, False, None, "not run", skipped=True))
        elif name == failed:
            checks.append(Check(name, False, 1.0, "failed", fix="fix it", error_code=code))
            failing = True
        else:
            checks.append(Check(name, True, 1.0, "ok"))
    return ConnectionReport(registry_id=5, url="https://r.example", checks=checks)


@pytest.mark.parametrize(
    ("failed", "code", "status"),
    [
        (None, None, HEALTHY),
        ("tcp", "registry_unavailable", UNHEALTHY),
        ("tls", "registry_tls_error", UNHEALTHY),
        ("credentials", "authentication_failed", CREDENTIALS_FAILING),
        ("credentials", "credential_unavailable", CREDENTIALS_FAILING),
        ("credentials", "secret_key_missing", CREDENTIALS_FAILING),
        # The registry went away between v2 and credentials: an outage, not a password problem.
        ("credentials", "registry_unavailable", UNHEALTHY),
    ],
)
def test_status_of_a_report(failed: str | None, code: str | None, status: str) -> None:
    assert status_of(report(failed, code)) == status
