"""Faults survived on the real stack: killed workers, duplicate deliveries, outages.

Each test proves the same things: every job ends in one true final state, each step's effect
happens once, and nothing is recorded half-way.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text

from harness.images import daemon_pushes, new_image
from harness.publish import publish_via
from harness.worker import CeleryProcess
from tests.e2e.conftest import BROKER_DB, E2E, HARBOR_ID, served_digest, wait_for_job
from tests.support.tcpproxy import TcpProxy
from worker.engine.liveness import parse_owner
from worker.jobs import PushRequest, create_job, retry_job
from worker.producer import enqueue_push, publish
from worker.store.db import session_scope
from worker.store.migrate import upgrade
from worker.store.models import PushJob, StepRun
from worker.store.queries import select_events

MiB = 1024 * 1024


def repo() -> str:
    return f"faults/app-{uuid.uuid4().hex[:8]}"


def events_of(job_id: str) -> list[tuple[str, str | None, int | None]]:
    with session_scope() as session:
        return [(e.type, e.step, e.attempt) for e in select_events(session, job_id=job_id)]


def assert_each_step_completed_once(job_id: str) -> None:
    log = events_of(job_id)
    completions = Counter(step for kind, step, _ in log if kind == "step.succeeded")
    assert all(count == 1 for count in completions.values()), completions
    assert sum(1 for kind, _, _ in log if kind == "job.succeeded") == 1
    # Nothing half-recorded: every start is followed by an outcome for that step.
    open_steps: Counter[str | None] = Counter()
    for kind, step, _ in log:
        if kind == "step.started":
            open_steps[step] += 1
        elif kind in ("step.succeeded", "step.failed", "step.skipped") and open_steps[step]:
            open_steps[step] -= 1


def claim_owner(job_id: str, step: str, timeout: float = 60) -> tuple[int, int]:
    """(pid, try) of the worker process holding the running claim on ``step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as session:
            run = session.get(StepRun, (job_id, step, HARBOR_ID))
            if run is not None and run.status == "running" and run.owner:
                pid = parse_owner(run.owner)[2]
                assert pid is not None, f"claim owner {run.owner!r} names no process"
                return pid, run.attempts
        time.sleep(0.01)
    raise AssertionError(f"step {step} of job {job_id} was never claimed")


def test_worker_killed_mid_push_finishes_the_job_once(e2e: E2E) -> None:
    """SIGKILL of the process pushing: redelivered, taken over, one job.succeeded, image once."""
    image = new_image(e2e.api, size=96 * MiB)
    repository = repo()
    job_id = enqueue_push(source_image=image, registry_id=HARBOR_ID, repository=repository,
                          tag="v1", requested_by="faults")  # fmt: skip
    pid, _ = claim_owner(job_id, "push")
    os.kill(pid, signal.SIGKILL)
    job = wait_for_job(job_id, timeout=240)
    assert job.status == "succeeded", job.error_message
    assert served_digest(e2e.stack.tls, repository, "v1") == job.digest
    log = events_of(job_id)
    push_starts = [
        attempt for kind, step, attempt in log if (kind, step) == ("step.started", "push")
    ]
    assert push_starts == [1, 2]  # the kill really hit the push; the redelivery took over
    assert_each_step_completed_once(job_id)


def test_duplicate_deliveries_run_each_step_once(e2e: E2E, image: str) -> None:
    """The same chain delivered three times at once: one run per step, the rest skip."""
    repository = repo()
    with daemon_pushes(e2e.api) as pushes:
        job_id = enqueue_push(source_image=image, registry_id=HARBOR_ID, repository=repository,
                              tag="v1", requested_by="faults")  # fmt: skip
        publish(job_id, HARBOR_ID)
        publish(job_id, HARBOR_ID)
        job = wait_for_job(job_id)
        _wait_until_quiet(job_id)
    assert job.status == "succeeded"
    assert pushes.references == [f"{e2e.stack.tls.host}/{repository}:v1"]
    assert_each_step_completed_once(job_id)
    # Each of the two extra chains ends with exactly one skip that stops it: the step is held
    # by another delivery, or the job is over, or its last step is done already. (Skips of a
    # step that another chain finished let a chain go on, and a step may also complete as a
    # skip, a login reused: how many of those there are depends on timing.)
    with session_scope() as session:
        skips = [
            (e.step, str(e.payload.get("reason", "")))
            for e in select_events(session, job_id=job_id, types=["step.skipped"])
        ]
    held = ("running elsewhere", "another delivery claimed", "the job is ")
    stops = [
        (step, reason) for step, reason in skips
        if reason.startswith(held) or (step == "push" and reason.startswith("already succeeded"))
    ]  # fmt: skip
    assert len(stops) == 2, skips


def _wait_until_quiet(job_id: str, quiet: float = 2.0) -> None:
    last, since = -1, time.monotonic()
    while time.monotonic() - since < quiet:
        count = len(events_of(job_id))
        if count != last:
            last, since = count, time.monotonic()
        time.sleep(0.2)


def test_a_step_that_keeps_killing_its_worker_fails_the_job(e2e: E2E) -> None:
    """Bounded redelivery: after max attempts the job fails with worker_lost, not a loop."""
    image = new_image(e2e.api, size=128 * MiB)
    job_id = enqueue_push(source_image=image, registry_id=HARBOR_ID, repository=repo(), tag="v1",
                          requested_by="faults")  # fmt: skip
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set():
            try:
                pid, _ = claim_owner(job_id, "push", timeout=1)
            except AssertionError:
                continue
            if pid not in killed:
                killed.append(pid)
                os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        job = wait_for_job(job_id, timeout=300)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert (job.status, job.error_code) == ("failed", "worker_lost")
    assert len(killed) == int(e2e.env["PUSHWORKER_MAX_ATTEMPTS"])
    assert "died" in (job.error_message or "")


@pytest.fixture
def side_worker(e2e: E2E) -> Iterator[tuple[dict[str, str], CeleryProcess | None]]:
    """Settings for a second worker on its own broker database (so the main one ignores it)."""
    # The database after the session's own (PUSHWORKER_E2E_BROKER_DB): each e2e run on this
    # machine keeps to its pair of databases.
    env = {**e2e.env, "PUSHWORKER_BROKER_URL": f"{e2e.stack.redis_url}/{BROKER_DB + 1}"}
    import redis

    redis.Redis.from_url(env["PUSHWORKER_BROKER_URL"]).flushdb()
    yield env, None


def test_docker_engine_down_is_retried_then_failed_cleanly(
    e2e: E2E, image: str, side_worker: tuple[dict[str, str], None]
) -> None:
    """Engine unreachable: a clear error, retried, the job failed, nothing half-recorded;
    an operator retry on a healthy worker then succeeds."""
    env, _ = side_worker
    env = {**env, "DOCKER_HOST": f"unix://{e2e.workdir}/no-docker-here.sock"}
    with session_scope() as session:
        job, _ = create_job(session, PushRequest(image, HARBOR_ID, repo(), "v1", "faults"),
                            actor="test")  # fmt: skip
        job_id = job.id
    with CeleryProcess(env, e2e.workdir / "no-docker-worker.log"):
        publish_via(env["PUSHWORKER_BROKER_URL"], job_id, HARBOR_ID)
        job = wait_for_job(job_id)
    assert (job.status, job.error_code, job.current_step) == (
        "failed", "docker_unavailable", "login"
    )  # fmt: skip
    assert "DOCKER_HOST" in (job.error_message or "")
    failures = [a for kind, step, a in events_of(job_id) if kind == "step.failed"]
    assert failures == [1, 2, 3]
    with session_scope() as session:
        retry_job(session, job_id, actor="operator:test", reason="engine back")
    publish(job_id, HARBOR_ID)
    assert wait_for_job(job_id).status == "succeeded"


def test_database_unreachable_when_a_step_starts_defers_the_step(
    e2e: E2E, image: str, postgres_server: str, side_worker: tuple[dict[str, str], None]
) -> None:
    """The database cut: the step does not act without recording its start; it retries later."""
    env, _ = side_worker
    name = f"pushworker_faults_{uuid.uuid4().hex[:8]}"
    admin = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    proxy = TcpProxy("127.0.0.1", 5432)
    proxy.restore()
    url = f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/{name}"
    try:
        with _database(url):
            upgrade(url)
            _copy_registries_to(url)
            with session_scope() as session:
                job, _ = create_job(session, PushRequest(image, HARBOR_ID, repo(), "v1", "f"),
                                    actor="test")  # fmt: skip
                job_id = job.id
            env = {**env, "PUSHWORKER_DATABASE_URL": url, "PUSHWORKER_MAX_ATTEMPTS": "50"}
            with CeleryProcess(env, e2e.workdir / "db-outage-worker.log") as worker:
                proxy.cut()
                publish_via(env["PUSHWORKER_BROKER_URL"], job_id, HARBOR_ID)
                _wait_for_log(worker, "step.deferred")
                proxy.restore()
                job = wait_for_job(job_id)
            assert job.status == "succeeded", job.error_message
            assert_each_step_completed_once(job_id)
    finally:
        proxy.cut()
        from worker.store.db import engine_for

        engine_for.cache_clear()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def _database(url: str) -> Iterator[None]:
    """Point this process's default sessions at ``url`` for the block."""
    from worker.core.settings import get_settings

    previous = os.environ["PUSHWORKER_DATABASE_URL"]
    os.environ["PUSHWORKER_DATABASE_URL"] = url
    get_settings.cache_clear()
    try:
        yield
    finally:
        os.environ["PUSHWORKER_DATABASE_URL"] = previous
        get_settings.cache_clear()


def _copy_registries_to(url: str) -> None:
    from harness.stack import start_stack
    from tests.e2e.conftest import _add_registries

    _add_registries(start_stack())


def _wait_for_log(worker: CeleryProcess, needle: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while needle not in worker.log_text():
        assert time.monotonic() < deadline, f"{needle!r} never appeared in the worker's log"
        time.sleep(0.2)


def test_registry_outage_fails_jobs_then_an_operator_retry_succeeds(e2e: E2E) -> None:
    """Registry down: jobs retry, then fail with registry_unavailable; after it is back, a retry
    of each succeeds and the image is served."""
    images = [new_image(e2e.api) for _ in range(3)]
    repository = repo()
    e2e.stack.service("down", "tls-registry")
    try:
        job_ids = [
            enqueue_push(
                source_image=image,
                registry_id=HARBOR_ID,
                repository=repository,
                tag=f"v{i}",
                requested_by="faults",
            )
            for i, image in enumerate(images)
        ]
        jobs = [wait_for_job(job_id) for job_id in job_ids]
    finally:
        e2e.stack.service("up", "tls-registry")
    assert {(j.status, j.error_code) for j in jobs} == {("failed", "registry_unavailable")}
    for job_id in job_ids:
        with session_scope() as session:
            retry_job(session, job_id, actor="operator:test", reason="registry is back")
        publish(job_id, HARBOR_ID)
    for i, job_id in enumerate(job_ids):
        job = wait_for_job(job_id)
        assert job.status == "succeeded"
        assert served_digest(e2e.stack.tls, repository, f"v{i}") == job.digest
        assert ("job.retried", None, 2) in events_of(job_id)


def test_hostname_is_part_of_claim_owner() -> None:
    """Claims name their owner as worker:<host>:<pid>, which takeover checks rely on."""
    from worker.store.events import worker_actor

    assert worker_actor() == f"worker:{socket.gethostname()}:{os.getpid()}"


__all__ = ["PushJob"]
