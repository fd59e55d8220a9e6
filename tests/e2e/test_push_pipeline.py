"""The push pipeline end to end: real worker, Redis, Docker Engine and registries."""

from __future__ import annotations

import uuid

import pytest
import requests
from sqlalchemy import func, select

from harness.images import daemon_pushes, new_image
from tests.e2e.conftest import E2E, HARBOR_ID, password_of, served_digest, wait_for_job
from worker.core.errors import InvalidReference, RegistryNotFound
from worker.producer import enqueue_push, publish
from worker.store.db import session_scope
from worker.store.models import PushJob
from worker.store.queries import select_events


def repo() -> str:
    return f"e2e/app-{uuid.uuid4().hex[:8]}"


def event_types(job_id: str) -> list[str]:
    with session_scope() as session:
        return [e.type for e in select_events(session, job_id=job_id)]


def test_smoke_docker_py_push_to_the_tls_registry(e2e: E2E, image: str) -> None:
    """The stack works: docker-py pushes with an explicit auth_config; the registry serves it."""
    tls = e2e.stack.tls
    repository = repo()
    e2e.api.tag(image, f"{tls.host}/{repository}", "v1")
    auth = {"username": tls.user, "password": tls.password}
    chunks = list(
        e2e.api.push(f"{tls.host}/{repository}", "v1", stream=True, decode=True, auth_config=auth)
    )
    assert not [c for c in chunks if "error" in c]
    digest = next(c["aux"]["Digest"] for c in chunks if "aux" in c)
    assert served_digest(tls, repository, "v1") == digest
    # And the registry really authenticates: without credentials it refuses.
    anonymous = requests.get(f"{tls.url}/v2/", verify=tls.ca_file, timeout=10)
    assert anonymous.status_code == 401


def test_happy_path_through_a_real_worker(e2e: E2E, image: str) -> None:
    """A job pushes once, to the named registry, records the digest it really serves."""
    repository = repo()
    with daemon_pushes(e2e.api) as pushes:
        job_id = enqueue_push(
            source_image=image,
            registry_id=HARBOR_ID,
            repository=repository,
            tag="v1",
            requested_by="e2e",
        )
        job = wait_for_job(job_id)
    assert (job.status, job.error_message) == ("succeeded", None)
    assert job.digest == served_digest(e2e.stack.tls, repository, "v1")
    assert pushes.references == [f"{e2e.stack.tls.host}/{repository}:v1"]
    assert normalised(event_types(job_id)) == (
        ["job.enqueued"] + ["step.started", "step.succeeded"] * 4 + ["job.succeeded"]
    )


def normalised(types: list[str]) -> list[str]:
    """The log with a reused login (step.skipped: the engine accepted the same credential for
    this registry minutes ago) read as the login's success; every other skip stays a skip."""
    login_outcome = 4  # job.enqueued, rc started, rc succeeded, login started, -> login outcome
    if len(types) > login_outcome and types[login_outcome] == "step.skipped":
        return [*types[:login_outcome], "step.succeeded", *types[login_outcome + 1 :]]
    return types


def test_wrong_password_fails_and_nothing_is_pushed_anywhere(e2e: E2E, image: str) -> None:
    """Login refused: the job fails with an authentication error; the daemon pushed nothing."""
    repository = repo()
    with password_of(HARBOR_ID, "wrong-password"), daemon_pushes(e2e.api) as pushes:
        job_id = enqueue_push(
            source_image=image,
            registry_id=HARBOR_ID,
            repository=repository,
            tag="v1",
            requested_by="e2e",
        )
        job = wait_for_job(job_id)
    assert (job.status, job.error_code, job.current_step) == (
        "failed",
        "authentication_failed",
        "login",
    )
    assert "set-credential 5" in (job.error_message or "")
    assert pushes.references == []
    assert served_digest(e2e.stack.tls, repository, "v1") is None
    assert "wrong-password" not in (job.error_message or "")


def test_rerunning_a_succeeded_job_skips_every_step(e2e: E2E, image: str) -> None:
    """Publishing a finished job's chain again pushes nothing and logs four skips."""
    job_id = enqueue_push(
        source_image=image, registry_id=HARBOR_ID, repository=repo(), tag="v1", requested_by="e2e"
    )
    wait_for_job(job_id)
    before = event_types(job_id)
    with daemon_pushes(e2e.api) as pushes:
        assert publish(job_id, HARBOR_ID)
        _wait_for_events(job_id, len(before) + 4)
    assert event_types(job_id)[len(before) :] == ["step.skipped"] * 4
    assert pushes.references == []


def test_a_new_job_for_an_image_the_registry_holds_skips_the_upload(e2e: E2E, image: str) -> None:
    """Same image, same tag, second job: the push step sees the digest served and skips."""
    repository = repo()
    first = enqueue_push(
        source_image=image,
        registry_id=HARBOR_ID,
        repository=repository,
        tag="v1",
        requested_by="e2e",
    )
    wait_for_job(first)
    with daemon_pushes(e2e.api) as pushes:
        second = enqueue_push(
            source_image=image,
            registry_id=HARBOR_ID,
            repository=repository,
            tag="v1",
            requested_by="e2e",
        )
        job = wait_for_job(second)
    assert job.status == "succeeded"
    assert pushes.references == []
    assert event_types(second)[-2:] == ["step.skipped", "job.succeeded"]
    # The engine's own tag list (one inspect) shows the target already names the image.
    with session_scope() as session:
        tag_ends = [
            e for e in select_events(session, job_id=second, types=["step.skipped"])
            if e.step == "tag"
        ]  # fmt: skip
    assert [e.payload["reason"] for e in tag_ends] == ["the target already names the source image"]


def count_jobs() -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(PushJob)) or 0)


@pytest.mark.parametrize(
    ("registry_id", "repository", "tag", "error"),
    [
        (99, "e2e/app", "v1", RegistryNotFound),
        (HARBOR_ID, "E2E/App", "v1", InvalidReference),
        (HARBOR_ID, "evil.example.com/app", "v1", InvalidReference),
        (HARBOR_ID, "e2e/app", "bad tag", InvalidReference),
    ],
)
def test_bad_requests_are_refused_before_anything_is_queued(
    e2e: E2E, image: str, registry_id: int, repository: str, tag: str, error: type[Exception]
) -> None:
    """Unknown registry, malformed reference, a repository naming another host: no job at all."""
    before = count_jobs()
    with daemon_pushes(e2e.api) as pushes, pytest.raises(error):
        enqueue_push(
            source_image=image,
            registry_id=registry_id,
            repository=repository,
            tag=tag,
            requested_by="e2e",
        )
    assert count_jobs() == before
    assert pushes.references == []


def test_missing_source_image_is_recorded_as_a_clear_failure(e2e: E2E) -> None:
    """A source image the engine does not hold fails the job at tag, with nothing pushed."""
    with daemon_pushes(e2e.api) as pushes:
        job_id = enqueue_push(
            source_image="pushworker-test/never-built:latest",
            registry_id=HARBOR_ID,
            repository=repo(),
            tag="v1",
            requested_by="e2e",
        )
        job = wait_for_job(job_id)
    assert (job.status, job.error_code, job.current_step) == (
        "failed",
        "source_image_not_found",
        "tag",
    )
    assert "never-built" in (job.error_message or "")
    assert pushes.references == []


def test_idempotency_key_returns_the_same_job(e2e: E2E) -> None:
    key = f"platform-build-{uuid.uuid4()}"
    image = new_image(e2e.api)
    ids = {
        enqueue_push(
            source_image=image,
            registry_id=HARBOR_ID,
            repository=repo(),
            tag="v1",
            requested_by="e2e",
            idempotency_key=key,
        )
        for _ in range(3)
    }
    assert len(ids) == 1
    assert wait_for_job(ids.pop()).status == "succeeded"


def _wait_for_events(job_id: str, count: int, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while len(event_types(job_id)) < count:
        assert time.monotonic() < deadline, f"job {job_id} has fewer than {count} events"
        time.sleep(0.2)
