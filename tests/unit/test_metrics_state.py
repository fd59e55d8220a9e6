"""What every worker exports from the shared database at scrape time (``StateCollector``), and
failed jobs counted by error code. Read on a throwaway SQLite database."""

from __future__ import annotations

from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import update

from worker.core.queues import HEALTH_TASK, RECONCILE_TASK, SEAL_TASK
from worker.core.settings import get_settings
from worker.jobs import PushRequest, create_job
from worker.metrics import Metrics, SharedState, StateCollector, read_state
from worker.registries import RegistrySpec, create_registry
from worker.store import events, heartbeats
from worker.store.db import session_scope
from worker.store.models import PushJob, WebhookDelivery, utcnow
from worker.webhooks import add_subscription


def scrape(collector: StateCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def test_failed_jobs_by_error_code() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for registry_id, code in ((5, "authentication_failed"), (5, "authentication_failed"),
                              (4, "registry_unavailable"), (4, None)):  # fmt: skip
        payload = {"error_code": code} if code else {}
        metrics.on_event({"type": "job.failed", "registry_id": registry_id, "payload": payload})
    metrics.on_event({"type": "job.succeeded", "registry_id": 5, "payload": {}})

    def failures(registry_id: str, code: str) -> float | None:
        labels = {"registry": registry_id, "error_code": code}
        return registry.get_sample_value("pushworker_job_failures_total", labels)

    assert failures("5", "authentication_failed") == 2
    assert failures("4", "registry_unavailable") == 1
    assert failures("4", "unknown") == 1


@pytest.fixture
def state_db(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSHWORKER_DOCKER_HOSTS", "builder-1,builder-2")
    get_settings.cache_clear()
    with session_scope() as session:
        for registry_id in (4, 5):
            spec = RegistrySpec(name=f"r{registry_id}", url=f"https://r{registry_id}.example.com",
                                username="u", secret="pw")  # fmt: skip
            create_registry(session, spec, registry_id=registry_id)


def queued_job(tag: str, docker_host: str | None, age: float, kind: str = "docker") -> None:
    with session_scope() as session:
        request = PushRequest("app:1", 5, "team/app", tag, "t", docker_host=docker_host)
        job, _ = create_job(session, request, actor="producer:t")
        job_id = job.id
    with session_scope() as session:
        # The row's last change: when it was queued (or retried).
        moment = utcnow() - timedelta(seconds=age)
        session.execute(
            update(PushJob).where(PushJob.id == job_id).values(updated_at=moment, source_kind=kind)
        )


def test_shared_state_from_the_database(state_db: None) -> None:
    now = utcnow()
    queued_job("a", None, 100)
    queued_job("b", None, 30)
    queued_job("c", "builder-1", 500)
    # A copied source runs on the skopeo queue, whatever its host (worker.jobs.route_of).
    queued_job("d", "builder-1", 50, kind="oci-layout")
    with session_scope() as session:
        add_subscription(
            session, "http://127.0.0.1:9/x", ["registry.health"], allow_private=True, actor="t"
        )
        events.append(
            session, stream=events.registry_stream(5), type="registry.health", actor="t",
            registry_id=5, payload={"status": "credentials_failing"},
        )  # fmt: skip
        heartbeats.beat(session, RECONCILE_TASK, "worker:h:1", at=now - timedelta(seconds=42))
    from worker.webhooks import plan

    assert plan() == 1  # the registry.health event above: one pending delivery
    with session_scope() as session:
        session.execute(update(WebhookDelivery).values(created_at=now - timedelta(seconds=600)))

    state = read_state(now)
    assert state.queues["pushworker"][0] == 2
    assert state.queues["pushworker"][1] == pytest.approx(100, abs=1)
    assert state.queues["pushworker.builder-1"][0] == 1
    assert state.queues["pushworker.builder-1"][1] == pytest.approx(500, abs=1)
    assert state.queues["pushworker.builder-2"] == (0, 0.0)
    assert state.queues["pushworker.skopeo"][0] == 1
    assert state.queues["pushworker.skopeo"][1] == pytest.approx(50, abs=1)
    assert (state.webhooks_pending, state.webhooks_dead) == (1, 0)
    assert state.webhook_oldest_pending == pytest.approx(600, abs=1)
    assert state.beats[RECONCILE_TASK] == pytest.approx(now.timestamp() - 42, abs=0.01)
    assert state.beats[HEALTH_TASK] == 0
    assert state.intervals == {RECONCILE_TASK: 60.0, HEALTH_TASK: 300.0, SEAL_TASK: 10.0}
    assert state.registries == {4: "unknown", 5: "credentials_failing"}

    scraped = scrape(StateCollector(lambda: state))
    get = scraped.get_sample_value
    assert get("pushworker_database_up") == 1
    assert get("pushworker_queue_jobs", {"queue": "pushworker"}) == 2
    assert get("pushworker_queue_jobs", {"queue": "pushworker.builder-2"}) == 0
    assert (
        get("pushworker_queue_oldest_age_seconds", {"queue": "pushworker.builder-1"})
        == (state.queues["pushworker.builder-1"][1])
    )
    assert get("pushworker_webhook_deliveries_pending") == 1
    assert get("pushworker_webhook_deliveries_dead") == 0
    assert get("pushworker_webhook_oldest_pending_age_seconds") == state.webhook_oldest_pending
    assert get("pushworker_beat_last_run_timestamp_seconds", {"task": HEALTH_TASK}) == 0
    assert get("pushworker_beat_interval_seconds", {"task": RECONCILE_TASK}) == 60
    status = "pushworker_registry_status"
    assert get(status, {"registry": "5", "status": "credentials_failing"}) == 1
    assert get(status, {"registry": "5", "status": "healthy"}) == 0
    assert get(status, {"registry": "4", "status": "unknown"}) == 1


def test_an_unreadable_database_is_database_up_0_and_nothing_else(state_db: None) -> None:
    def broken() -> SharedState:
        raise ConnectionError("the database does not answer")

    scraped = scrape(StateCollector(broken))
    assert scraped.get_sample_value("pushworker_database_up") == 0
    names = {metric.name for metric in scraped.collect()}
    assert names == {"pushworker_database_up"}


def test_the_real_reader_on_a_database_without_tables() -> None:
    # No migration ran: the read fails inside the collector, which still answers.
    scraped = scrape(StateCollector())
    assert scraped.get_sample_value("pushworker_database_up") == 0
