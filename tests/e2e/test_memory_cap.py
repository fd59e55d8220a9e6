"""``PUSHWORKER_WORKER_MAX_MEMORY``: a pool process whose resident memory passed the cap is
replaced once its task ends, and jobs go on as if nothing happened. Here the cap is 1 MiB, so
every pool process is over it after its first task and every step runs in a fresh one: the
worst case of the safety net (each new process warms up in the background while it serves)."""

from __future__ import annotations

import time
import uuid

import pytest

from harness.images import new_image
from harness.worker import CeleryProcess
from tests.e2e.conftest import E2E, HARBOR_ID, served_digest, wait_for_job
from worker.core.settings import get_settings
from worker.producer import enqueue_push
from worker.store.db import session_scope
from worker.store.models import JobStatus
from worker.store.queries import select_events

HOST = "memory-cap-1"


@pytest.fixture(autouse=True)
def _known_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSHWORKER_DOCKER_HOSTS", HOST)
    get_settings.cache_clear()


def test_pool_processes_over_the_memory_cap_are_replaced_and_every_job_ends_once(
    e2e: E2E,
) -> None:
    """Two jobs through a worker capped at 1 MiB a pool process: both succeed, each step once
    (the usual ten events), the tags served at the recorded digests; the pool processes that
    ran them are gone, replaced by others (Celery says why in its log)."""
    env = {**e2e.env, "PUSHWORKER_DOCKER_HOSTS": HOST, "PUSHWORKER_WORKER_MAX_MEMORY": "1"}
    worker = CeleryProcess(
        env, e2e.workdir / "memory-cap.log", host=HOST, pool="prefork", concurrency=1,
        own_group=True,
    ).start()  # fmt: skip
    try:
        first_pool = set(worker.pids()) - {worker.pid}
        assert first_pool, "a prefork worker has a pool process"
        image = new_image(e2e.api)
        repository = f"memory-cap/app-{uuid.uuid4().hex[:8]}"
        jobs = []
        for tag in ("1.0", "1.1"):
            job_id = enqueue_push(
                source_image=image, registry_id=HARBOR_ID, repository=repository, tag=tag,
                requested_by="memory-cap-test", docker_host=HOST,
            )  # fmt: skip
            jobs.append(job_id)
        finished = [wait_for_job(job_id, timeout=180) for job_id in jobs]
        # The replacement of the process that ran the last step may still be under way.
        deadline = time.monotonic() + 30
        later_pool = set(worker.pids()) - {worker.pid}
        while (first_pool & later_pool or not later_pool) and time.monotonic() < deadline:
            time.sleep(0.2)
            later_pool = set(worker.pids()) - {worker.pid}
        log = worker.log_text()
    finally:
        worker.stop()
    runners: list[str] = []
    for job, tag in zip(finished, ("1.0", "1.1"), strict=True):
        assert job.status == JobStatus.SUCCEEDED, (job.error_code, job.error_message)
        with session_scope() as session:
            rows = select_events(session, job_id=job.id)
        types = [row.type for row in rows]
        assert types.count("job.succeeded") == 1, types
        assert types.count("step.started") == 4, types  # each step once: none ran twice
        runners += [row.actor for row in rows if row.type == "step.started"]
        assert served_digest(e2e.stack.tls, repository, tag) == job.digest
    # One pool process (concurrency 1), over the cap after every task: each of the eight steps
    # ran in a process of its own (the actor names the process: worker:<host>:<pid>@<start>).
    assert len(set(runners)) == len(runners) == 8, (runners, log[-3000:])
    assert not first_pool & later_pool, (first_pool, later_pool)
    assert later_pool, "the pool was refilled"
