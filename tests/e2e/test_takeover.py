"""A worker host that dies whole (main process and pool SIGKILLed, as an OOM kill or a reboot
does) loses nothing, and its jobs do not wait for Redis' visibility timeout (40 minutes here) or
for beat: the next worker that starts on the host takes over the dead claims at once.

No beat runs in this test, so nothing but the takeover at start can bring the job back within
the test's time.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from datetime import UTC, datetime

import pytest

from harness.images import new_image
from harness.worker import CeleryProcess
from tests.e2e.conftest import E2E, HARBOR_ID, served_digest, wait_for_job
from worker.core.brokers import broker_kind
from worker.core.settings import get_settings
from worker.engine.liveness import owner_is_dead, parse_owner
from worker.producer import enqueue_push
from worker.store.db import session_scope
from worker.store.models import JobStatus, PushJob, StepRun
from worker.store.queries import select_events

HOST = "takeover-1"


@pytest.fixture(autouse=True)
def _known_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSHWORKER_DOCKER_HOSTS", HOST)
    get_settings.cache_clear()


def start_worker(e2e: E2E, name: str) -> CeleryProcess:
    return CeleryProcess(
        {**e2e.env, "PUSHWORKER_DOCKER_HOSTS": HOST}, e2e.workdir / f"{name}.log", host=HOST,
        pool="prefork", concurrency=1, own_group=True,
    ).start()  # fmt: skip


def running_push_claim(job_id: str, timeout: float = 120) -> StepRun:
    """The push step's claim, as soon as a worker holds it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as session:
            run = session.get(StepRun, (job_id, "push", HARBOR_ID))
            if run is not None and run.status == "running":
                session.expunge(run)
                return run
        time.sleep(0.005)
    raise AssertionError(f"the push step of job {job_id} was never claimed")


def test_a_worker_killed_whole_mid_push_is_taken_over_by_the_next_start(e2e: E2E) -> None:
    """SIGKILL the whole worker process group while it pushes; start a new worker on the same
    host, with no beat: the job ends succeeded exactly once, and the log says who took it over
    from whom."""
    # Large enough that the push is still running when the kill lands (checked below).
    image = new_image(e2e.api, size=48 * 1024 * 1024)
    first = start_worker(e2e, "takeover-first")
    repository = f"takeover/app-{uuid.uuid4().hex[:8]}"
    job_id = enqueue_push(
        source_image=image, registry_id=HARBOR_ID, repository=repository, tag="1.0",
        requested_by="takeover-test", docker_host=HOST,
    )  # fmt: skip
    claim = running_push_claim(job_id)
    killed_at = datetime.now(UTC)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait_exit(timeout=30)
    with session_scope() as session:
        job = session.get(PushJob, job_id)
        assert job is not None and job.status == JobStatus.RUNNING, (
            f"the job must still be running when its worker dies, not {job and job.status}"
        )
    _, _, pid, mark = parse_owner(claim.owner)
    assert pid is not None and mark, f"the claim names its process and start: {claim.owner!r}"
    # The kill reaches the pool process on its own time: wait_exit saw the main process go.
    deadline = time.monotonic() + 10
    while not owner_is_dead(claim.owner):
        assert time.monotonic() < deadline, f"{claim.owner} was killed but still looks alive"
        time.sleep(0.05)

    second = start_worker(e2e, "takeover-second")
    ready_at = datetime.now(UTC)
    try:
        finished = wait_for_job(job_id, timeout=120)
    except AssertionError:
        pytest.fail(
            f"the job was not taken over; the new worker's log:\n{second.log_text()[-4000:]}"
        )
    finally:
        second.stop()
    assert finished.status == JobStatus.SUCCEEDED, (finished.error_code, finished.error_message)
    with session_scope() as session:
        rows = select_events(session, job_id=job_id)
    types = [row.type for row in rows]
    assert types.count("job.succeeded") == 1, types
    restarted = next(
        r.time for r in rows if (r.type, r.step, r.attempt) == ("step.started", "push", 2)
    )
    # How long the push waited for its worker's death to be noticed: the broker's redelivery
    # (RabbitMQ: at once, to the new worker) or the take-over at start (Redis, which would
    # otherwise wait out the visibility timeout). docs/deploy.md quotes these figures.
    print(
        f"\n{broker_kind(e2e.broker_url)}: the push restarted "
        f"{(restarted - killed_at).total_seconds():.2f} s after the kill, "
        f"{(restarted - ready_at).total_seconds():.2f} s after the new worker was ready"
    )
    takeovers = [row for row in rows if row.type == "job.republished"]
    assert len(takeovers) == 1, types
    reason = str(takeovers[0].payload["reason"])
    assert "taken over at worker start" in reason and str(claim.owner) in reason
    assert takeovers[0].actor.startswith("worker:"), takeovers[0].actor
    assert served_digest(e2e.stack.tls, repository, "1.0") == finished.digest
