"""The web console through the ASGI app (no browser, no broker): sign-in and its cookie, CSRF on
every form, roles checked on the server, the security headers, output escaped, actions recorded
as ``console:<token name>``. The browser tests are tests/e2e/test_console.py."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from tests.support.fakes import RecordingDispatcher
from worker import producer
from worker.api.app import create_app
from worker.api.console.sessions import COOKIE
from worker.core.credentials import decrypt_secret
from worker.registries import RegistrySpec, create_registry
from worker.store import events
from worker.store.db import session_scope
from worker.store.models import Event, JobStatus, PushJob, Registry
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
    script = client.get("/console/static/htmx-2.0.11.min.js")
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


# --- registries: editing and credentials (admin only), throttling, progress --------------------


@pytest.fixture
def probed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The connection test after a credential is replaced, without a network: a passing report."""
    from worker.api.console import routes
    from worker.probe import Check, ConnectionReport

    tested: list[int] = []

    def check(registry: Any) -> ConnectionReport:
        tested.append(registry.id)
        checks = [
            Check(name, True, 1.0, "ok") for name in ("dns", "tcp", "tls", "v2", "credentials")
        ]
        return ConnectionReport(registry.id, registry.url, checks)

    monkeypatch.setattr(routes, "check_registry", check)
    return tested


def test_an_admin_edits_a_registry_and_the_edit_is_recorded_as_theirs(client: TestClient) -> None:
    name, csrf = sign_in(client, "admin")
    page = client.get("/console/registries/5")
    assert page.status_code == 200 and 'id="edit"' in page.text
    form = {"csrf": csrf, "name": "r5", "url": "https://r5.example.com", "username": "u",
            "fallback": "", "max_concurrent": "2", "rate": "600/m"}  # fmt: skip
    done = client.post("/console/registries/5/edit", data=form, follow_redirects=False)
    assert done.status_code == 303, done.text
    with session_scope() as session:
        registry = session.get(Registry, 5)
        assert registry is not None
        assert (registry.max_concurrent, registry.rate_per_second) == (2, 10.0)
        updated = session.scalars(
            select(Event).where(Event.type == "registry.updated").order_by(Event.id.desc())
        ).first()
        assert updated is not None and updated.actor == f"console:{name}"
    assert "at most 2 pushes at once" in client.get("/console/registries/5").text
    # Bad input: a specific message, nothing changed.
    bad = client.post("/console/registries/5/edit", data={**form, "max_concurrent": "lots"})
    assert bad.status_code == 422 and "max concurrent pushes must be a whole number" in bad.text
    bad = client.post("/console/registries/5/edit", data={**form, "fallback": "4; drop"})
    assert bad.status_code == 422 and "fallback chain is registry ids" in bad.text
    with session_scope() as session:
        registry = session.get(Registry, 5)
        assert registry is not None and registry.max_concurrent == 2


def test_a_credential_is_replaced_tested_and_never_shown(
    client: TestClient, probed: list[int]
) -> None:
    new_secret = f"s3cret-{uuid.uuid4().hex}"
    name, csrf = sign_in(client, "admin")
    done = client.post(
        "/console/registries/5/credential",
        data={"csrf": csrf, "username": "robot", "password": new_secret}, follow_redirects=False,
    )  # fmt: skip
    assert done.status_code == 303, done.text
    assert probed == [5]
    with session_scope() as session:
        registry = session.get(Registry, 5)
        assert registry is not None and registry.username == "robot"
        assert registry.credential_secret and new_secret not in registry.credential_secret
        assert decrypt_secret(registry.credential_secret, "r5").reveal() == new_secret
        rows = session.scalars(select(Event).where(Event.registry_id == 5)).all()
        assert {"registry.updated", "registry.tested"} <= {event.type for event in rows}
        replaced = [e for e in rows if e.type == "registry.updated"][-1]
        assert replaced.payload["credential_replaced"] is True
        assert all(new_secret not in json.dumps(event.payload) for event in rows)
        assert f"console:{name}" in {event.actor for event in rows}
    for path in ("/console/registries/5", "/console/registries", "/console/events?registry=5"):
        assert new_secret not in client.get(path).text
    assert "user robot" in client.get("/console/registries/5").text
    neither = client.post("/console/registries/5/credential", data={"csrf": csrf})
    assert neither.status_code == 422 and "either a new password or a credential reference" in (
        neither.text
    )


def test_only_an_admin_may_edit_registries_whatever_the_page_showed(
    client: TestClient, probed: list[int]
) -> None:
    for role in ("operator", "auditor"):
        _, csrf = sign_in(client, role)
        page = client.get("/console/registries/5")
        assert page.status_code == 200
        assert 'id="edit"' not in page.text and 'id="credential-form"' not in page.text
        edit = client.post("/console/registries/5/edit", data={"csrf": csrf, "name": "taken",
                           "url": "https://evil.example.com", "max_concurrent": "1"})  # fmt: skip
        assert edit.status_code == 403 and "may not edit registries" in edit.text
        replace = client.post("/console/registries/5/credential",
                              data={"csrf": csrf, "password": "hand-made"})  # fmt: skip
        assert replace.status_code == 403
    _, csrf = sign_in(client, "admin")
    no_csrf = client.post("/console/registries/5/edit", data={"name": "x", "url": "https://x.io"})
    assert no_csrf.status_code == 403
    assert probed == []
    with session_scope() as session:
        registry = session.get(Registry, 5)
        assert registry is not None and registry.url == "https://r5.example.com"
        assert decrypt_secret(registry.credential_secret or "", "r5").reveal() == "pw"


def test_throttling_shows_on_the_overview_and_registry_pages(client: TestClient) -> None:
    sign_in(client, "operator")
    with session_scope() as session:
        events.append(
            session, stream=events.registry_stream(5), type="registry.throttled",
            actor="worker:test", registry_id=5,
            payload={"previous_limit": 4, "effective_limit": 2, "max_concurrent": 4,
                     "reason": "429 Too Many Requests"},
        )  # fmt: skip
    overview = client.get("/console/fragments/overview").text
    assert "throttled to 2" in overview
    assert "throttled to 2 at once" in client.get("/console/registries/5").text
    with session_scope() as session:
        events.append(
            session, stream=events.registry_stream(5), type="registry.unthrottled",
            actor="worker:test", registry_id=5,
            payload={"previous_limit": 2, "effective_limit": 4, "max_concurrent": 4,
                     "reason": "back at its configured limit"},
        )  # fmt: skip
    assert "throttled to" not in client.get("/console/fragments/overview").text


def test_a_running_push_shows_its_progress_until_the_step_ends(client: TestClient) -> None:
    job_id = producer.enqueue_push(
        source_image="img", registry_id=5, repository="team/app", tag="progress",
        requested_by="platform:test",
    )  # fmt: skip

    def note(kind: str, payload: dict[str, Any] | None = None) -> None:
        with session_scope() as session:
            events.append(
                session, stream=events.job_stream(job_id), type=kind, actor="worker:test",
                job_id=job_id, step="push", registry_id=5, attempt=1, payload=payload or {},
            )  # fmt: skip

    with session_scope() as session:
        session.execute(
            update(PushJob).where(PushJob.id == job_id).values(status=JobStatus.RUNNING.value)
        )
    sign_in(client, "operator")
    note("step.started")
    note("step.progress", {"bytes_pushed": 1_500_000, "bytes_total": 3_000_000,
                           "layers_done": 1, "layers_total": 2})  # fmt: skip
    live = client.get(f"/console/fragments/jobs/{job_id}")
    assert 'id="push-progress"' in live.text and "1.5 MB / 3.0 MB, layers 1/2" in live.text
    assert '<progress value="1500000" max="3000000">' in live.text
    assert "HX-Refresh" not in live.headers
    note("step.succeeded", {"digest": "sha256:" + "1" * 64})
    assert 'id="push-progress"' not in client.get(f"/console/fragments/jobs/{job_id}").text
    with session_scope() as session:
        session.execute(
            update(PushJob).where(PushJob.id == job_id).values(status=JobStatus.SUCCEEDED.value)
        )
    ended = client.get(f"/console/fragments/jobs/{job_id}")
    assert ended.headers["HX-Refresh"] == "true"  # the whole page again, with its final actions


def test_a_refreshing_part_sends_an_ended_session_to_the_sign_in_page(client: TestClient) -> None:
    answer = client.get(
        "/console/fragments/overview", headers={"HX-Request": "true"}, follow_redirects=False
    )
    assert answer.status_code == 401 and answer.headers["HX-Redirect"] == "/console/signin"


def test_an_unknown_outcome_filter_is_a_clear_error(client: TestClient) -> None:
    sign_in(client, "auditor")
    answer = client.get("/console/events?outcome=failed,faild")
    assert answer.status_code == 422 and "unknown outcome &#39;faild&#39;" in answer.text
    assert client.get("/console/events?outcome=failed,fallback").status_code == 200
