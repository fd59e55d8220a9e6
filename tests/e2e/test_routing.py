"""Several Docker hosts on one machine: two real dockerd instances (separate sockets and data
roots), one worker each, and jobs routed to the worker whose engine holds their image.

Proof of where a job ran: the worker recorded in every step event (``worker:HOST:PID``, each of
these workers runs tasks in its own process), and each daemon's own ``push`` events.
"""

from __future__ import annotations

import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import docker
import pytest
import redis

from harness.images import daemon_pushes, new_image
from harness.worker import CeleryProcess
from tests.e2e.conftest import (
    ALTERNATIVE_ID,
    E2E,
    HARBOR_ID,
    password_of,
    served_digest,
    wait_for_job,
)
from worker.core.errors import ValidationError
from worker.core.settings import get_settings
from worker.producer import enqueue_push
from worker.store.db import session_scope
from worker.store.models import PushJob
from worker.store.queries import select_events

HOSTS = "builder-1,builder-2"


@dataclass
class Builders:
    api1: docker.APIClient
    api2: docker.APIClient
    worker1: CeleryProcess
    worker2: CeleryProcess


@pytest.fixture(scope="module")
def builders(e2e: E2E) -> Iterator[Builders]:
    e2e.stack.service("up", "dockerd-2")
    host2 = e2e.stack.env["PUSHWORKER_STACK_DOCKER_HOST_2"]
    common = {**e2e.env, "PUSHWORKER_DOCKER_HOSTS": HOSTS}
    worker1 = CeleryProcess(
        {**common, "DOCKER_HOST": e2e.stack.docker_host},
        e2e.workdir / "builder-1.log", host="builder-1", pool="solo", concurrency=1,
    ).spawn()  # fmt: skip
    worker2 = CeleryProcess(
        {**common, "DOCKER_HOST": host2}, e2e.workdir / "builder-2.log", host="builder-2",
        pool="solo", concurrency=1,
    ).spawn()  # fmt: skip
    try:
        worker1.wait_ready()
        worker2.wait_ready()
        yield Builders(e2e.api, docker.APIClient(base_url=host2), worker1, worker2)
    finally:
        worker1.stop()
        worker2.stop()


@pytest.fixture(autouse=True)
def _known_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSHWORKER_DOCKER_HOSTS", HOSTS)
    get_settings.cache_clear()


def push(image: str, host: str | None, fallback: list[int] | None = None) -> str:
    return enqueue_push(
        source_image=image, registry_id=HARBOR_ID, repository=f"routing/app-{uuid.uuid4().hex[:8]}",
        tag="1.0", requested_by="routing-test", docker_host=host, fallback=fallback,
    )  # fmt: skip


def actors(job_id: str) -> set[str]:
    """The workers that recorded the job's step events."""
    with session_scope() as session:
        return {
            e.actor for e in select_events(session, job_id=job_id) if e.type.startswith("step.")
        }


def on(worker: CeleryProcess) -> set[str]:
    return {f"worker:{socket.gethostname()}:{worker.pid}"}


def test_each_job_runs_on_the_worker_whose_engine_holds_its_image(
    e2e: E2E, builders: Builders
) -> None:
    image1, image2 = new_image(builders.api1), new_image(builders.api2)
    with pytest.raises(docker.errors.ImageNotFound):
        builders.api2.inspect_image(image1)
    with pytest.raises(docker.errors.ImageNotFound):
        builders.api1.inspect_image(image2)

    with daemon_pushes(builders.api1) as pushed1, daemon_pushes(builders.api2) as pushed2:
        job1_id, job2_id = push(image1, "builder-1"), push(image2, "builder-2")
        job1, job2 = wait_for_job(job1_id), wait_for_job(job2_id)

    assert (job1.status, job1.docker_host, job2.status, job2.docker_host) == (
        "succeeded", "builder-1", "succeeded", "builder-2",
    )  # fmt: skip
    assert actors(job1_id) == on(builders.worker1)
    assert actors(job2_id) == on(builders.worker2)
    assert pushed1.references == [job1.pushed_reference]
    assert pushed2.references == [job2.pushed_reference]
    for job in (job1, job2):
        assert job.pushed_reference is not None
        repository = job.pushed_reference.split("/", 1)[1].rsplit(":", 1)[0]
        assert served_digest(e2e.stack.tls, repository, "1.0") == job.digest


def test_the_fallback_chain_stays_on_the_jobs_host(e2e: E2E, builders: Builders) -> None:
    image = new_image(builders.api2)
    with password_of(HARBOR_ID, "not-the-password"), daemon_pushes(builders.api2) as pushed:
        job_id = push(image, "builder-2", fallback=[ALTERNATIVE_ID])
        job = wait_for_job(job_id)
    assert (job.status, job.effective_registry_id) == ("succeeded", ALTERNATIVE_ID)
    assert actors(job_id) == on(builders.worker2)
    assert pushed.references == [job.pushed_reference]
    assert str(job.pushed_reference).startswith(e2e.stack.plain.host + "/")


def test_an_image_is_found_only_through_its_own_host(builders: Builders) -> None:
    """The same job sent to the other engine fails there: routing is what makes jobs work."""
    image = new_image(builders.api1)
    job_id = push(image, "builder-2")
    job = wait_for_job(job_id)
    assert (job.status, job.error_code) == ("failed", "source_image_not_found")
    assert actors(job_id) == on(builders.worker2)


def test_a_job_for_an_unknown_host_is_refused(e2e: E2E, builders: Builders) -> None:
    image = new_image(builders.api1)
    with pytest.raises(ValidationError) as refused:
        push(image, "builder-9")
    assert refused.value.code == "unknown_docker_host"
    assert "'builder-9' is not a known Docker host (builder-1, builder-2)" in refused.value.message
    assert "PUSHWORKER_DOCKER_HOSTS" in str(refused.value)
    with pytest.raises(ValidationError, match="is not a Docker host name"):
        push(image, "Builder 1/../x")
    with session_scope() as session:
        assert session.query(PushJob).filter(PushJob.source_image == image).count() == 0
    broker = redis.Redis.from_url(e2e.broker_url)
    assert broker.llen("pushworker.builder-9") == 0


def test_a_worker_for_an_unconfigured_host_refuses_to_start(e2e: E2E) -> None:
    worker = CeleryProcess(
        {**e2e.env, "PUSHWORKER_DOCKER_HOSTS": HOSTS, "DOCKER_HOST": e2e.stack.docker_host},
        e2e.workdir / "builder-9.log", host="builder-9", pool="solo", concurrency=1,
    ).spawn()  # fmt: skip
    try:
        code = worker.wait_exit(timeout=60)
    except subprocess.TimeoutExpired:
        worker.stop()
        pytest.fail(f"the worker for builder-9 started:\n{worker.log_text()[-2000:]}")
    assert code != 0
    refusals = [
        line for line in worker.log_lines() if line.get("event") == "worker.unknown_docker_host"
    ]
    assert len(refusals) == 1 and refusals[0]["level"] == "error"
    assert "builder-1, builder-2" in refusals[0]["error"]
