"""Bad input on the real stack: each case a specific error, nothing pushed, the worker unharmed."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import func, select

from harness.images import daemon_pushes
from tests.e2e.conftest import E2E, HARBOR_ID, wait_for_job
from worker.core.errors import (
    CredentialError,
    InvalidReference,
    InvalidRegistry,
    RegistryNotFound,
    ValidationError,
)
from worker.producer import enqueue_push
from worker.registries import RegistrySpec, create_registry
from worker.store.db import session_scope
from worker.store.models import PushJob

GOOD: dict[str, Any] = {
    "registry_id": HARBOR_ID,
    "repository": "bad-input/app",
    "tag": "v1",
    "requested_by": "bad-input",
}

CASES: list[tuple[str, dict[str, Any], type[Exception]]] = [
    ("upper case repository", {"repository": "Bad/App"}, InvalidReference),
    ("empty repository", {"repository": ""}, InvalidReference),
    ("repository too long", {"repository": "a/" * 200 + "b"}, InvalidReference),
    ("dot-dot path", {"repository": "bad/../etc"}, InvalidReference),
    ("shell metacharacters", {"repository": "bad/app;rm -rf /"}, InvalidReference),
    ("unicode look-alike", {"repository": "b\u0430d/app"}, InvalidReference),
    ("repository naming another host", {"repository": "evil.example.com/app"}, InvalidReference),
    ("repository naming Docker Hub", {"repository": "docker.io/library/app"}, InvalidReference),
    ("digest mismatch in tag", {"tag": "v1@sha256:" + "0" * 64}, InvalidReference),
    ("empty tag", {"tag": ""}, InvalidReference),
    ("tag too long", {"tag": "v" * 129}, InvalidReference),
    ("registry id that does not exist", {"registry_id": 4242}, RegistryNotFound),
    ("registry id that is not an integer", {"registry_id": "5"}, ValidationError),
    ("registry id that is a bool", {"registry_id": True}, ValidationError),
    ("oversized source image", {"source_image": "x" * 5000}, ValidationError),
    ("source image with whitespace", {"source_image": "app build"}, ValidationError),
    ("oversized requested_by", {"requested_by": "x" * 5000}, ValidationError),
    ("empty requested_by", {"requested_by": ""}, ValidationError),
    ("oversized idempotency key", {"idempotency_key": "k" * 5000}, ValidationError),
    ("fallback to an unknown registry", {"fallback": [4242]}, RegistryNotFound),
    ("fallback to itself", {"fallback": [HARBOR_ID]}, ValidationError),
]


def count_jobs() -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(PushJob)) or 0)


@pytest.mark.parametrize(("case", "change", "error"), CASES, ids=[c[0] for c in CASES])
def test_bad_requests_get_a_specific_error_and_create_nothing(
    e2e: E2E, image: str, case: str, change: dict[str, Any], error: type[Exception]
) -> None:
    before = count_jobs()
    request = {**GOOD, "source_image": image, **change}
    with daemon_pushes(e2e.api) as pushes, pytest.raises(error) as refused:
        enqueue_push(**request)
    assert str(refused.value)  # a message that says what is wrong
    assert count_jobs() == before
    assert pushes.references == []


def test_docker_hub_url_without_kind_dockerhub_is_refused(e2e: E2E) -> None:
    spec = RegistrySpec(
        name=f"hub-{uuid.uuid4().hex[:6]}",
        url="https://registry-1.docker.io",
        username="u",
        secret="p",
    )
    with pytest.raises(InvalidRegistry, match="Docker Hub"), session_scope() as session:
        create_registry(session, spec)


@pytest.mark.parametrize(
    "reference",
    # Inside the default namespace (REGISTRY_CREDENTIAL_*, /run/secrets), absent on the worker.
    ["env:REGISTRY_CREDENTIAL_TEST_UNSET_VARIABLE", "file:/run/secrets/pushworker-missing-pw"],
)
def test_credential_reference_missing_in_the_worker_fails_the_job_clearly(
    e2e: E2E, image: str, reference: str
) -> None:
    """A reference the worker cannot resolve: job failed at resolve_credentials, named, no push;
    and the worker goes on serving the next job."""
    with session_scope() as session:
        registry = create_registry(
            session,
            RegistrySpec(
                name=f"ref-{uuid.uuid4().hex[:6]}",
                url=e2e.stack.tls.url,
                username="u",
                credential_ref=reference,
            ),
        )
        registry_id = registry.id
    with daemon_pushes(e2e.api) as pushes:
        job = wait_for_job(
            enqueue_push(**{**GOOD, "source_image": image, "registry_id": registry_id})
        )
    assert (job.status, job.error_code, job.current_step) == (
        "failed",
        CredentialError.code,
        "resolve_credentials",
    )
    assert reference.split(":", 1)[1] in (job.error_message or "")
    assert pushes.references == []
    healthy = wait_for_job(
        enqueue_push(
            **{**GOOD, "source_image": image, "repository": f"bad-input/{uuid.uuid4().hex[:6]}"}
        )
    )
    assert healthy.status == "succeeded"
