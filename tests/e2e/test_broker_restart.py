"""A broker that restarts without persistence, with jobs queued and running: none is lost."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from harness.images import new_image
from harness.publish import publish_via
from harness.worker import CeleryProcess
from tests.e2e.conftest import E2E, HARBOR_ID, served_digest, wait_for_job
from tests.e2e.test_faults import assert_each_step_completed_once
from worker.jobs import PushRequest, create_job
from worker.reconcile import reconcile
from worker.store.db import session_scope
from worker.store.models import JobStatus, PushJob
from worker.store.queries import select_events

MiB = 1024 * 1024


class RedisServer:
    """A redis-server of this test's own, which it can kill and start again on the same port."""

    def __init__(self, workdir: str) -> None:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed", pytrace=False)
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.workdir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail("the test's redis-server did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def own_redis(e2e: E2E) -> Iterator[RedisServer]:
    server = RedisServer(str(e2e.workdir))
    server.start()
    yield server
    server.kill()


def statuses(job_ids: list[str]) -> list[str]:
    with session_scope() as session:
        return [session.get(PushJob, job_id).status for job_id in job_ids]  # type: ignore[union-attr]


def test_broker_restart_loses_no_job(e2e: E2E, own_redis: RedisServer) -> None:
    """Redis killed and restarted empty while jobs are queued and running: reconcile republishes
    what the broker dropped, and every job reaches succeeded exactly once."""
    images = [new_image(e2e.api, size=24 * MiB) for _ in range(6)]
    job_ids = []
    with session_scope() as session:
        for i, image in enumerate(images):
            job, _ = create_job(
                session,
                PushRequest(image, HARBOR_ID, "restart/app", f"v{i}", "faults"),
                actor="test",
            )
            job_ids.append(job.id)
    env = {**e2e.env, "PUSHWORKER_BROKER_URL": own_redis.url}
    with CeleryProcess(env, e2e.workdir / "restart-worker.log", concurrency=2):
        for job_id in job_ids:
            publish_via(own_redis.url, job_id, HARBOR_ID)
        _wait_until(lambda: JobStatus.RUNNING.value in statuses(job_ids))
        own_redis.kill()
        own_redis.start()
        assert JobStatus.QUEUED.value in statuses(job_ids) or JobStatus.RUNNING.value in statuses(
            job_ids
        )

        def republish(job_id: str, registry_id: int) -> bool:
            publish_via(own_redis.url, job_id, registry_id)
            return True

        deadline = time.monotonic() + 240
        while not all(JobStatus(s).is_final for s in statuses(job_ids)):
            assert time.monotonic() < deadline, f"jobs not final: {statuses(job_ids)}"
            reconcile(grace=3, publish=republish)
            time.sleep(1)
    with session_scope() as session:
        republished = [
            e
            for job_id in job_ids
            for e in select_events(session, job_id=job_id)
            if e.type == "job.republished"
        ]
    print(f"broker restart: {len(republished)} republished of {len(job_ids)} jobs")
    assert republished  # the restart really dropped messages, and reconcile recovered them
    for i, job_id in enumerate(job_ids):
        job = wait_for_job(job_id, timeout=5)
        assert job.status == "succeeded", job.error_message
        assert served_digest(e2e.stack.tls, "restart/app", f"v{i}") == job.digest
        assert_each_step_completed_once(job_id)


def _wait_until(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.05)
