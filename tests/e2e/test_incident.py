"""The incident replayed on the real stack, and the fallback chain that makes it useful.

Registry 5 (TLS, non-default port) stands in for the Harbor at reg.cyfee.com:10443; registry 4
(plain HTTP) for the GitLab registry the report suggests as an alternative.
"""

from __future__ import annotations

import uuid

import pytest

from harness.images import daemon_pushes
from tests.e2e.conftest import (
    ALTERNATIVE_ID,
    E2E,
    HARBOR_ID,
    password_of,
    served_digest,
    wait_for_job,
)
from worker.core.errors import CredentialError
from worker.producer import enqueue_push
from worker.registries import RegistrySpec, create_registry
from worker.store.db import session_scope
from worker.store.queries import select_events


def repo() -> str:
    return f"incident/app-{uuid.uuid4().hex[:8]}"


def push(image: str, repository: str, fallback: list[int] | None = None) -> str:
    return enqueue_push(
        source_image=image, registry_id=HARBOR_ID, repository=repository, tag="072201",
        requested_by="web-platform", fallback=fallback,
    )  # fmt: skip


def test_registry_without_credential_is_refused_at_creation(e2e: E2E) -> None:
    """1. A Harbor record with a username and an empty auth_config cannot be saved."""
    spec = RegistrySpec(name="harbor-no-password", url=e2e.stack.tls.url, kind="harbor",
                        username="admin")  # fmt: skip
    with pytest.raises(CredentialError) as refused, session_scope() as session:
        create_registry(session, spec)
    assert "no credential" in refused.value.message
    assert "pushctl registry set-credential" in str(refused.value)


def test_wrong_password_without_chain_pushes_nowhere(e2e: E2E, image: str) -> None:
    """2. Wrong password, no chain: authentication error, and the daemon performed no push."""
    repository = repo()
    with password_of(HARBOR_ID, "not-the-password"), daemon_pushes(e2e.api) as pushes:
        job = wait_for_job(push(image, repository))
    assert (job.status, job.error_code) == ("failed", "authentication_failed")
    assert pushes.references == []  # not to docker.io, not anywhere
    assert served_digest(e2e.stack.tls, repository, "072201") is None
    assert served_digest(e2e.stack.plain, repository, "072201") is None
    local_names = [t for i in e2e.api.images() for t in (i.get("RepoTags") or [])]
    assert not [t for t in local_names if repository in t and not t.startswith("127.0.0.1:")]


def test_wrong_password_with_chain_lands_in_the_alternative(e2e: E2E, image: str) -> None:
    """3. Chain [4]: the image lands in 4, not in 5; the log tells the whole story."""
    repository = repo()
    with password_of(HARBOR_ID, "not-the-password"), daemon_pushes(e2e.api) as pushes:
        job_id = push(image, repository, fallback=[ALTERNATIVE_ID])
        job = wait_for_job(job_id)
    assert (job.status, job.effective_registry_id) == ("succeeded", ALTERNATIVE_ID)
    assert pushes.references == [f"{e2e.stack.plain.host}/{repository}:072201"]
    assert served_digest(e2e.stack.plain, repository, "072201") == job.digest
    assert served_digest(e2e.stack.tls, repository, "072201") is None
    with session_scope() as session:
        log = [(e.type, e.step, e.registry_id) for e in select_events(session, job_id=job_id)]
    assert ("step.failed", "login", HARBOR_ID) in log
    assert ("fallback.applied", "login", HARBOR_ID) in log
    assert log[-1] == ("job.succeeded", None, ALTERNATIVE_ID)
    assert log.index(("step.failed", "login", HARBOR_ID)) < log.index(
        ("step.succeeded", "push", ALTERNATIVE_ID)
    )


def test_chain_whose_alternative_also_refuses_fails_with_both_refusals(
    e2e: E2E, image: str
) -> None:
    """4. Both registries refuse: failed, and the error names both refusals."""
    repository = repo()
    with (
        password_of(HARBOR_ID, "not-the-password"),
        password_of(ALTERNATIVE_ID, "not-this-one-either"),
        daemon_pushes(e2e.api) as pushes,
    ):
        job = wait_for_job(push(image, repository, fallback=[ALTERNATIVE_ID]))
    assert (job.status, job.error_code) == ("failed", "fallback_exhausted")
    message = job.error_message or ""
    assert f"registry {HARBOR_ID}" in message and f"registry {ALTERNATIVE_ID}" in message
    assert f"set-credential {HARBOR_ID}" in message
    assert pushes.references == []
    for secret in ("not-the-password", "not-this-one-either"):
        assert secret not in message


def test_unreachable_registry_is_retried_and_never_falls_back(e2e: E2E, image: str) -> None:
    """5. Registry 5 stopped: retried with backoff, then failed; no fallback, no push."""
    repository = repo()
    e2e.stack.service("down", "tls-registry")
    try:
        with daemon_pushes(e2e.api) as pushes:
            job_id = push(image, repository, fallback=[ALTERNATIVE_ID])
            job = wait_for_job(job_id)
    finally:
        e2e.stack.service("up", "tls-registry")
    assert (job.status, job.error_code) == ("failed", "registry_unavailable")
    assert pushes.references == []
    with session_scope() as session:
        timeline = select_events(session, job_id=job_id)
    failures = [e for e in timeline if e.type == "step.failed"]
    types = [e.type for e in timeline]
    story = [(e.type, e.step, e.attempt, e.payload.get("error_code")) for e in timeline]
    assert [f.payload["will_retry"] for f in failures] == [True, True, False], story
    assert "fallback.applied" not in types
    assert served_digest(e2e.stack.plain, repository, "072201") is None
