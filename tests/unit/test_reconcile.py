"""Reconcile's decisions on a throwaway SQLite log, with a broker that is a list (or refuses)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import datetime, timedelta

import pytest

from worker.core.settings import get_settings
from worker.engine.liveness import owner_is_dead, owner_of_this_process, parse_owner, start_mark
from worker.jobs import PushRequest, create_job, retry_job
from worker.reconcile import reconcile, take_over_dead_claims
from worker.registries import RegistrySpec, create_registry
from worker.store import events
from worker.store.db import session_scope
from worker.store.events import worker_actor
from worker.store.models import JobStatus, PushJob, StepRun, utcnow
from worker.store.queries import select_events

GRACE = 60.0


class Broker:
    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.sent: list[tuple[str, int]] = []

    def __call__(self, job_id: str, registry_id: int) -> bool:
        if self.up:
            self.sent.append((job_id, registry_id))
        return self.up


@pytest.fixture
def registry(sqlite_url: str) -> int:
    with session_scope() as session:
        spec = RegistrySpec(name="r5", url="https://r5.example.com", username="u", secret="pw")
        create_registry(session, spec, registry_id=5)
    return 5


def committed_job(tag: str = "v1") -> str:
    """A job committed as enqueue_push commits it, but never published (the broker was away)."""
    with session_scope() as session:
        job, _ = create_job(
            session, PushRequest("app:build", 5, "team/app", tag, "tester"), actor="producer:t"
        )
        return job.id


def later(seconds: float) -> datetime:
    return utcnow() + timedelta(seconds=seconds)


def types_of(job_id: str) -> list[str]:
    with session_scope() as session:
        return [e.type for e in select_events(session, job_id=job_id)]


def test_a_young_job_is_left_alone(registry: int) -> None:
    broker = Broker()
    job_id = committed_job()
    report = reconcile(grace=GRACE, publish=broker, now=later(GRACE - 5))
    assert report.republished == [] and broker.sent == []
    assert types_of(job_id) == ["job.enqueued"]


def test_an_unpublished_job_is_republished_once_then_waits(registry: int) -> None:
    """Published with a job.republished event; not again in a tight loop; later, after 2x grace."""
    broker = Broker()
    job_id = committed_job()
    first = reconcile(grace=GRACE, publish=broker, now=later(GRACE + 1), actor="worker:test")
    assert first.republished == [job_id] and broker.sent == [(job_id, 5)]
    with session_scope() as session:
        (event,) = select_events(session, job_id=job_id, types=["job.republished"])
        assert (event.actor, event.registry_id, event.attempt) == ("worker:test", 5, 1)
        assert event.payload["job_attempt"] == 1
        assert (
            "not started" in event.payload["reason"] and "job.enqueued" in event.payload["reason"]
        )
    # Right away, and again a grace period after the republish: the wait has doubled.
    assert reconcile(grace=GRACE, publish=broker).republished == []
    assert reconcile(grace=GRACE, publish=broker, now=later(GRACE + 1)).republished == []
    assert len(broker.sent) == 1
    assert reconcile(grace=GRACE, publish=broker, now=later(2 * GRACE + 1)).republished == [job_id]
    assert types_of(job_id) == ["job.enqueued", "job.republished", "job.republished"]


def test_the_wait_stops_doubling(registry: int) -> None:
    broker = Broker()
    job_id = committed_job()
    for _ in range(8):
        reconcile(grace=1.0, publish=broker, now=later(10_000))
    # Each run republished once: the events are all "now", the runs an hour later.
    assert len(broker.sent) == 8
    assert reconcile(grace=1.0, publish=broker, now=later(31)).republished == []
    assert reconcile(grace=1.0, publish=broker, now=later(33)).republished == [job_id]


def test_a_started_job_is_not_republished(registry: int) -> None:
    broker = Broker()
    job_id = committed_job()
    with session_scope() as session:
        events.append(
            session, stream=events.job_stream(job_id), type="step.started", actor="worker:w",
            job_id=job_id, step="resolve_credentials", registry_id=5, attempt=1,
        )  # fmt: skip
    assert reconcile(grace=GRACE, publish=broker, now=later(GRACE * 10)).republished == []


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_finished_jobs_are_never_republished(registry: int, status: JobStatus) -> None:
    broker = Broker()
    job_id = committed_job()
    with session_scope() as session:
        job = session.get(PushJob, job_id)
        assert job is not None
        job.status = status.value
    assert reconcile(grace=GRACE, publish=broker, now=later(GRACE * 10)).republished == []


def test_a_retried_job_counts_from_its_retry(registry: int) -> None:
    """A job failed after it started, then retried by an operator: the retry is the marker."""
    broker = Broker()
    job_id = committed_job()
    with session_scope() as session:
        events.append(
            session, stream=events.job_stream(job_id), type="step.started", actor="worker:w",
            job_id=job_id, step="login", registry_id=5, attempt=1,
        )  # fmt: skip
        job = session.get(PushJob, job_id)
        assert job is not None
        job.status = JobStatus.FAILED.value
    with session_scope() as session:
        retry_job(session, job_id, actor="operator:test", reason="password fixed")
    report = reconcile(grace=GRACE, publish=broker, now=later(GRACE + 1))
    assert report.republished == [job_id]
    with session_scope() as session:
        (event,) = select_events(session, job_id=job_id, types=["job.republished"])
        assert "job.retried" in event.payload["reason"] and event.payload["job_attempt"] == 2


def test_a_refusing_broker_stops_the_run_and_a_later_run_tries_again(registry: int) -> None:
    """Like job.enqueued, the event commits before the publish; a refused publish ends the run
    (the broker is away for every job), and the job is tried again after its (doubled) wait."""
    down = Broker(up=False)
    first, second = committed_job("v1"), committed_job("v2")
    report = reconcile(grace=GRACE, publish=down, now=later(GRACE + 1))
    assert report.republished == [] and report.deferred == [first]
    assert types_of(first) == ["job.enqueued", "job.republished"]
    assert types_of(second) == ["job.enqueued"]
    up = Broker()
    assert reconcile(grace=GRACE, publish=up, now=later(GRACE + 1)).republished == [second]
    assert reconcile(grace=GRACE, publish=up, now=later(2 * GRACE - 1)).republished == []
    later_run = reconcile(grace=GRACE, publish=up, now=later(2 * GRACE + 1))
    assert later_run.republished == [first, second]  # each after its one republish: 2x grace


def test_a_concurrent_append_makes_the_reconcile_back_off(
    registry: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the stream grew between the decision and the append (a worker started the job, or
    another reconcile republished it), nothing is recorded and nothing is published."""
    from worker import reconcile as module

    broker = Broker()
    job_id = committed_job()
    real_due = module._due

    def due_then_a_worker_starts(*args: object, **kwargs: object) -> object:
        decision = real_due(*args, **kwargs)  # type: ignore[arg-type]
        events.append(
            args[0], stream=events.job_stream(job_id), type="step.started",  # type: ignore[arg-type]
            actor="worker:w", job_id=job_id, step="resolve_credentials", registry_id=5, attempt=1,
        )  # fmt: skip
        return decision

    monkeypatch.setattr(module, "_due", due_then_a_worker_starts)
    report = reconcile(grace=GRACE, publish=broker, now=later(GRACE + 1))
    assert report.republished == [] and broker.sent == []
    assert types_of(job_id) == ["job.enqueued"]  # the whole transaction was rolled back


def test_the_grace_period_comes_from_the_settings(
    registry: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``grace``, reconcile waits PUSHWORKER_RECONCILE_GRACE (parsing and refusals of
    the variable: tests/unit/test_settings.py)."""
    monkeypatch.setenv("PUSHWORKER_RECONCILE_GRACE", "5")
    get_settings.cache_clear()
    broker = Broker()
    job_id = committed_job()
    assert reconcile(publish=broker, now=later(4)).republished == []
    assert reconcile(publish=broker, now=later(6)).republished == [job_id]


def _running_with_claim(owner: str, lease: timedelta) -> str:
    job_id = committed_job()
    with session_scope() as session:
        events.append(
            session, stream=events.job_stream(job_id), type="step.started", actor=owner,
            job_id=job_id, step="push", registry_id=5, attempt=1,
        )  # fmt: skip
        job = session.get(PushJob, job_id)
        assert job is not None
        job.status = JobStatus.RUNNING.value
        session.add(
            StepRun(job_id=job_id, step="push", registry_id=5, status="running", attempts=1,
                    owner=owner, lease_expires_at=utcnow() + lease, result={})
        )  # fmt: skip
    return job_id


def test_a_running_job_whose_worker_is_alive_is_left_alone(registry: int) -> None:
    """A long push on another host holds a live claim: no republish, however long it takes."""
    broker = Broker()
    _running_with_claim("worker:another-host:1", timedelta(hours=2))
    assert reconcile(grace=GRACE, publish=broker, now=later(GRACE * 10)).republished == []


def test_a_stalled_running_job_is_republished_once_per_wait(registry: int) -> None:
    """Running, no live claim (lease expired), no event for a grace period: its message was
    lost; republished once, and not again right away."""
    broker = Broker()
    job_id = _running_with_claim("worker:another-host:1", timedelta(seconds=-1))
    assert reconcile(grace=GRACE, publish=broker, now=later(GRACE + 1)).republished == [job_id]
    assert reconcile(grace=GRACE, publish=broker, now=later(GRACE + 2)).republished == []
    with session_scope() as session:
        types = [e.type for e in select_events(session, job_id=job_id)]
    assert types[-1] == "job.republished"


# --- taking over the claims of a worker that died whole ------------------------------------------


def _dead_pid() -> int:
    """The pid of a process of this host that has exited (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_worker_start_takes_over_the_claims_of_dead_processes_of_its_host(
    registry: int,
) -> None:
    """The claim's lease has hours left, but its owner process on this host is gone: the job is
    republished at once, with the reason; a second start finds nothing more to do."""
    broker = Broker()
    owner = f"worker:{socket.gethostname()}:{_dead_pid()}"
    job_id = _running_with_claim(owner, timedelta(hours=2))
    report = take_over_dead_claims(publish=broker)
    assert report.republished == [job_id] and broker.sent == [(job_id, 5)]
    with session_scope() as session:
        last = select_events(session, job_id=job_id)[-1]
    assert last.type == "job.republished"
    assert (
        "taken over at worker start" in last.payload["reason"] and owner in last.payload["reason"]
    )


def test_takeover_leaves_live_claims_and_other_hosts_alone(registry: int) -> None:
    """A claim held by a live process of this host, or by any process of another host (which
    cannot be probed from here), is not taken over."""
    broker = Broker()
    _running_with_claim(owner_of_this_process(worker_actor()), timedelta(hours=2))
    _running_with_claim(f"worker:another-host:{_dead_pid()}", timedelta(hours=2))
    assert take_over_dead_claims(publish=broker).republished == []
    assert broker.sent == []


def test_a_reused_pid_does_not_keep_a_dead_claim_alive(registry: int) -> None:
    """After a restart a new process can carry the dead owner's pid; its start mark differs, so
    the claim is recognised as dead (this very process stands in for the new one)."""
    broker = Broker()
    stale = f"{worker_actor()}@{start_mark(os.getpid())[:-1]}9999"
    assert owner_is_dead(stale) and not owner_is_dead(owner_of_this_process(worker_actor()))
    job_id = _running_with_claim(stale, timedelta(hours=2))
    assert take_over_dead_claims(publish=broker).republished == [job_id]


def test_claim_owners_name_the_process_and_its_start() -> None:
    """``worker:<host>:<pid>@<start mark>``: the actor auditors read, then what liveness needs."""
    owner = owner_of_this_process(worker_actor())
    kind, host, pid, mark = parse_owner(owner)
    assert (kind, host, pid) == ("worker", socket.gethostname(), os.getpid())
    assert mark and mark == start_mark(os.getpid())
    assert parse_owner("worker:h:12") == ("worker", "h", 12, "")
    assert parse_owner(None) == ("", "", None, "")
