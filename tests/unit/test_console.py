"""The web console through the ASGI app (no browser, no broker): sign-in and its cookie, CSRF on
every form, roles checked on the server, the security headers, output escaped, actions recorded
as ``console:<token name>``. The browser tests are tests/e2e/test_console.py."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from tests.support.fakes import RecordingDispatcher
from worker import producer
from worker.api.app import create_app
from worker.api.console.sessions import COOKIE
from worker.registries import RegistrySpec, create_registry
from worker.store.db import session_scope
from worker.store.models import Event, JobStatus, PushJob
from worker.tokens import create_token, revoke_token

XSS = '<script>window.pwned=1</script><img src=x onerror="window.pwned=1">'


@pytest.fixture
def client(sqlite_url: str, dispatched: RecordingDispatcher) -> Iterator[TestClient]:
    with session_scope() as session:
        spec = RegistrySpec(name="r5", url="https://r5.example.com", username="u", secret="pw")
        create_registry(session, spec, registry_id=5)
    with TestClient(create_app(), base_url="http://testserver") as test_client:
        yield test_client


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, html[:500]
    return found.group(1)


def sign_in(client: TestClient, role: str) -> tuple[str, str]:
    """Sign in with a new token of ``role``; the token's name and the session's CSRF token."""
    name = f"{role}-{uuid.uuid4().hex[:6]}"
    token, _ = create_token(name, role, actor="operator:test")
    nonce = _csrf(client.get("/console/signin").text)
    answer = client.post(
        "/console/signin", data={"csrf": nonce, "token": token}, follow_redirects=False
    )
    assert answer.status_code == 303, answer.text
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=28800" in cookie
    assert token not in cookie and "Secure" not in cookie  # plain HTTP here
    return name, _csrf(client.get("/console/jobs").text)


def failed_job(requested_by: str = "platform:test") -> str:
    job_id = producer.enqueue_push(
        source_image="img", registry_id=5, repository="team/app",
        tag=f"t{uuid.uuid4().hex[:8]}", requested_by=requested_by,
    )  # fmt: skip
    with session_scope() as session:
        session.execute(
            update(PushJob)
            .where(PushJob.id == job_id)
            .values(status=JobStatus.FAILED.value, error_code="auth_failed")
        )
    return job_id


def test_pages_need_a_session_and_carry_a_strict_policy(client: TestClient) -> None:
    answer = client.get("/console/jobs", follow_redirects=False)
    assert (answer.status_code, answer.headers["location"]) == (303, "/console/signin")
    policy = answer.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert answer.headers["x-frame-options"] == "DENY"
    assert client.post("/console/events/verify", data={}).status_code == 401


def test_a_wrong_token_is_refused_and_sign_in_needs_its_form_token(client: TestClient) -> None:
    nonce = _csrf(client.get("/console/signin").text)
    answer = client.post("/console/signin", data={"csrf": nonce, "token": "pwk_1_" + "A" * 43})
    assert answer.status_code == 401 and COOKIE not in answer.headers.get("set-cookie", "")
    token, _ = create_token("someone", "admin", actor="operator:test")
    answer = client.post("/console/signin", data={"csrf": "forged", "token": token})
    assert answer.status_code == 403
    producer_token, _ = create_token("platform", "producer", actor="operator:test")
    answer = client.post("/console/signin", data={"csrf": nonce, "token": producer_token})
    assert answer.status_code == 403 and COOKIE not in answer.headers.get("set-cookie", "")


def test_every_page_renders_for_an_admin(client: TestClient) -> None:
    sign_in(client, "admin")
    failed_job()
    pages = ("/console/", "/console/jobs", "/console/registries", "/console/events",
             "/console/fragments/overview", "/console/jobs?status=failed&since=1h")  # fmt: skip
    for path in pages:
        answer = client.get(path)
        assert answer.status_code == 200, (path, answer.text[:500])
        assert answer.headers["server-timing"].startswith("app;dur=")
    script = client.get("/console/static/console.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    exported = client.get("/console/events/export?format=csv&type=job.enqueued")
    assert exported.status_code == 200 and exported.text.startswith("id,")


def test_a_retry_needs_the_csrf_token_a_reason_and_a_role_that_may(client: TestClient) -> None:
    job_id = failed_job()
    _, auditor_csrf = sign_in(client, "auditor")
    # A hand-made POST with the auditor's valid CSRF token: the server refuses the role.
    refused = client.post(
        f"/console/jobs/{job_id}/retry", data={"csrf": auditor_csrf, "reason": "x"}
    )
    assert refused.status_code == 403 and "may not retry or cancel jobs" in refused.text
    name, csrf = sign_in(client, "operator")
    assert client.post(f"/console/jobs/{job_id}/retry", data={"reason": "x"}).status_code == 403
    assert (
        client.post(f"/console/jobs/{job_id}/retry", data={"csrf": csrf, "reason": " "}).status_code
        == 422
    )
    done = client.post(
        f"/console/jobs/{job_id}/retry", data={"csrf": csrf, "reason": "password fixed"},
        follow_redirects=False,
    )  # fmt: skip
    assert done.status_code == 303
    with session_scope() as session:
        retried = session.scalars(
            select(Event).where(Event.job_id == job_id, Event.type == "job.retried")
        ).one()
        assert (retried.actor, retried.payload["reason"]) == (f"console:{name}", "password fixed")
        signed_in = session.scalars(select(Event).where(Event.type == "console.signed_in")).all()
        assert f"console:{name}" in {event.actor for event in signed_in}


def test_bulk_retry_previews_then_retries_exactly_the_previewed(client: TestClient) -> None:
    first, second = failed_job("bulk"), failed_job("bulk")
    _, csrf = sign_in(client, "operator")
    preview = client.post("/console/jobs/bulk-retry", data={"csrf": csrf, "requester": "bulk"})
    assert preview.status_code == 200 and first in preview.text and second in preview.text
    ids = re.search(r'name="ids" value="([^"]+)"', preview.text)
    assert ids is not None
    done = client.post(
        "/console/jobs/bulk-retry",
        data={"csrf": csrf, "confirm": "1", "ids": ids.group(1), "reason": "bulk fix"},
    )
    assert done.status_code == 200 and "Retried 2" in done.text


def test_hostile_text_renders_as_text(client: TestClient) -> None:
    job_id = failed_job(XSS)
    with session_scope() as session:  # a row written before control characters were refused
        session.execute(update(PushJob).where(PushJob.id == job_id).values(tag="v1\x1b[2J"))
    sign_in(client, "admin")
    for path in (f"/console/jobs/{job_id}", "/console/jobs"):
        html = client.get(path).text
        assert "<script>window.pwned" not in html and "<img src=x" not in html
        assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in html
        assert "\x1b" not in html
    assert "v1\\x1b[2J" in client.get(f"/console/jobs/{job_id}").text


def test_revoking_the_token_ends_its_session(client: TestClient) -> None:
    name, _ = sign_in(client, "operator")
    assert client.get("/console/jobs", follow_redirects=False).status_code == 200
    revoke_token(name, actor="operator:test")
    assert client.get("/console/jobs", follow_redirects=False).status_code == 303


def test_sign_out_ends_the_session(client: TestClient) -> None:
    _, csrf = sign_in(client, "auditor")
    assert (
        client.post("/console/signout", data={"csrf": csrf}, follow_redirects=False).status_code
        == 303
    )
    assert client.get("/console/", follow_redirects=False).status_code == 303
