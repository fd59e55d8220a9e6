"""The HTTP API through a real uvicorn process, on the real stack (worker, Redis, dockerd,
registries): a push asked for over HTTP is pushed; every route answers each role as docs/api.md
says (allowed, or 403; no token or a wrong one: 401); errors have their code, message and hint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from harness.images import daemon_pushes
from harness.stack import ROOT, free_port
from tests.e2e.conftest import ALTERNATIVE_ID, E2E, HARBOR_ID, served_digest
from worker.tokens import create_token, revoke_token

ROLES = ("producer", "operator", "auditor", "admin")


@dataclass
class ApiServer:
    url: str
    tokens: dict[str, str]
    names: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes]

    def client(self, role: str | None = None, token: str | None = None) -> httpx.Client:
        headers = {}
        if role is not None or token is not None:
            headers["Authorization"] = f"Bearer {token or self.tokens[role or '']}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_api(env: dict[str, str], log_path: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """``pushctl api serve`` in a child process; returns once /healthz answers."""
    port = free_port()
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "api", "serve", "--port", str(port)],
            cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the API exited at start:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return url, process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.terminate()
    raise AssertionError(f"the API did not answer within 60 s:\n{log_path.read_text()[-3000:]}")


@contextmanager
def serving_api(e2e: E2E, prefix: str = "e2e") -> Iterator[ApiServer]:
    """A token of each role and ``pushctl api serve`` on ``e2e``'s environment."""
    suffix = uuid.uuid4().hex[:6]
    tokens: dict[str, str] = {}
    names: dict[str, str] = {}
    for role in ROLES:
        names[role] = f"{prefix}-{role}-{suffix}"
        scope = [HARBOR_ID, ALTERNATIVE_ID] if role == "producer" else None
        tokens[role], _ = create_token(names[role], role, actor="operator:e2e", registry_ids=scope)
    log_path = e2e.workdir / f"api-{suffix}.log"
    url, process = start_api(e2e.env, log_path)
    try:
        yield ApiServer(url, tokens, names, log_path, process)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def api_server(e2e: E2E) -> Iterator[ApiServer]:
    with serving_api(e2e) as server:
        yield server


def _push_body(image: str, repository: str, **extra: object) -> dict[str, object]:
    return {"source_image": image, "registry_id": HARBOR_ID, "repository": repository,
            "tag": "v1", **extra}  # fmt: skip


def test_a_push_through_the_api_is_pushed_and_followed_to_its_end(
    e2e: E2E, api_server: ApiServer, image: str
) -> None:
    """POST /v1/pushes (201, then 200 for the same key), the job's events as SSE until it ends,
    GET /v1/jobs/{id}: the registry serves what the job recorded; the actor is the token."""
    repository = f"e2e/api-{uuid.uuid4().hex[:8]}"
    key = f"api-{uuid.uuid4().hex}"
    with api_server.client("producer") as client, daemon_pushes(e2e.api) as pushes:
        created = client.post(
            "/v1/pushes", json=_push_body(image, repository, requested_by="platform:user-42"),
            headers={"Idempotency-Key": key},
        )  # fmt: skip
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        again = client.post(
            "/v1/pushes", json=_push_body(image, repository), headers={"Idempotency-Key": key}
        )
        assert (again.status_code, again.json()["id"]) == (200, job_id)
        reused = client.post(
            "/v1/pushes", json={**_push_body(image, repository), "tag": "v2"},
            headers={"Idempotency-Key": key},
        )  # fmt: skip
        assert (reused.status_code, reused.json()["code"]) == (409, "idempotency_key_reused")
        assert job_id not in reused.text
        streamed: list[tuple[str, dict[str, object]]] = []
        with client.stream("GET", f"/v1/jobs/{job_id}/events/stream") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            kind = ""
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    kind = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    streamed.append((kind, json.loads(line.split(":", 1)[1])))
        shown = client.get(f"/v1/jobs/{job_id}").json()
    job = shown["job"]
    assert (job["status"], job["requested_by"]) == ("succeeded", "platform:user-42")
    assert job["digest"] == served_digest(e2e.stack.tls, repository, "v1")
    assert pushes.references == [f"{e2e.stack.tls.host}/{repository}:v1"]
    types = [kind for kind, _ in streamed]
    assert types[0] == "job.enqueued" and types[-1] == "job.succeeded", types
    assert [event["id"] for _, event in streamed] == [event["id"] for event in shown["events"]]
    assert shown["events"][0]["actor"] == f"token:{api_server.names['producer']}"


# --- the role x route matrix -------------------------------------------------------------------

MISSING_JOB = "00000000-0000-4000-8000-000000000000"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    allowed: frozenset[str]
    body: object = None
    headers: tuple[tuple[str, str], ...] = ()
    #: What an allowed role gets (a missing job: 404 proves it got past authorisation).
    status: int = 200


ROUTES = [
    Route("POST", "/v1/pushes", frozenset({"producer", "admin"}),
          body={"source_image": "has space", "registry_id": HARBOR_ID, "repository": "e2e/m",
                "tag": "v1"},
          headers=(("Idempotency-Key", "matrix"),), status=422),
    Route("GET", "/v1/jobs", frozenset(ROLES)),
    Route("GET", "/v1/jobs/{job}", frozenset(ROLES)),
    Route("GET", "/v1/jobs/{job}/events/stream", frozenset(ROLES)),
    Route("POST", f"/v1/jobs/{MISSING_JOB}/retry", frozenset({"operator", "admin"}),
          body={"reason": "matrix"}, status=404),
    Route("POST", f"/v1/jobs/{MISSING_JOB}/cancel", frozenset({"operator", "admin"}),
          body={"reason": "matrix"}, status=404),
    Route("GET", "/v1/events", frozenset({"operator", "auditor", "admin"})),
    Route("GET", "/v1/registries", frozenset(ROLES)),
    Route("POST", f"/v1/registries/{HARBOR_ID}/test", frozenset({"operator", "admin"})),
]  # fmt: skip


@pytest.fixture(scope="module")
def finished_job(api_server: ApiServer) -> str:
    """A job of the producer token that has ended (its image does not exist: it fails at tag)."""
    with api_server.client("producer") as client:
        response = client.post(
            "/v1/pushes",
            json=_push_body(f"pushworker-test/absent-{uuid.uuid4().hex[:8]}:x", "e2e/matrix"),
            headers={"Idempotency-Key": f"matrix-{uuid.uuid4().hex}"},
        )
        assert response.status_code == 201, response.text
        job_id = str(response.json()["id"])
        with client.stream("GET", f"/v1/jobs/{job_id}/events/stream") as stream:
            for _ in stream.iter_lines():
                pass  # the stream ends when the job has
    return job_id


def _call(client: httpx.Client, route: Route, job_id: str) -> httpx.Response:
    path = route.path.replace("{job}", job_id)
    if route.body is None:
        return client.request(route.method, path, headers=dict(route.headers))
    return client.request(route.method, path, json=route.body, headers=dict(route.headers))


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_each_role_on_each_route(api_server: ApiServer, finished_job: str, route: Route) -> None:
    for role in ROLES:
        with api_server.client(role) as client:
            response = _call(client, route, finished_job)
        expected = route.status if role in route.allowed else 403
        assert response.status_code == expected, (role, response.text)
        if expected == 403:
            body = response.json()
            assert body["code"] == "forbidden" and role in body["message"] and body["hint"]
    for token in (None, "pwk_1_" + "A" * 43, "not-a-token"):
        with api_server.client(token=token) as client:
            response = _call(client, route, finished_job)
        assert response.status_code == 401, response.text
        assert response.json()["code"] == ("unauthenticated" if token is None else "invalid_token")
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_health_and_openapi_need_no_token(api_server: ApiServer) -> None:
    with api_server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready", "database": "ok", "broker": "ok"}
        paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/pushes", "/v1/jobs", "/v1/events", "/v1/registries"} <= set(paths)


# --- errors, limits, pagination ------------------------------------------------------------------


def test_refusals_say_what_to_change(api_server: ApiServer) -> None:
    with api_server.client("producer") as producer, api_server.client("admin") as admin:
        key = {"Idempotency-Key": f"e-{uuid.uuid4().hex}"}
        cases = [
            (admin.post("/v1/pushes", json=_push_body("a:b", "x/y", registry_id=999), headers=key),
             404, "registry_not_found"),
            (producer.post("/v1/pushes", json=_push_body("a:b", "x/y", registry_id=9), headers=key),
             403, "forbidden"),
            (producer.post("/v1/pushes", json=_push_body("a:b", "x/y", fallback=[9]), headers=key),
             403, "forbidden"),
            (admin.post("/v1/pushes", json=_push_body("a:b", "x/y", password="s3cret"),
                        headers=key), 422, "invalid_message"),
            (admin.post("/v1/pushes", json=_push_body("a:b", "x/y", requested_by="a\x1b[2Jb"),
                        headers=key), 422, "invalid_message"),
            (admin.post("/v1/pushes", json=_push_body("a:b", "x/y")), 422, "invalid_input"),
            (admin.post("/v1/pushes", content=b"{not json", headers={
                **key, "Content-Type": "application/json"}), 422, "invalid_input"),
            (admin.post("/v1/pushes", json=_push_body("a:b", "x" * 70_000), headers=key),
             413, "request_too_large"),
            (admin.post(f"/v1/jobs/{MISSING_JOB}/retry", json={}), 422, "invalid_input"),
            (admin.post("/v1/jobs/a%1Bb/cancel", json={"reason": "x"}), 422, "invalid_input"),
            (admin.get("/v1/jobs", params={"cursor": "garbage"}), 422, "invalid_input"),
            (admin.get("/v1/nothing"), 404, "not_found"),
        ]  # fmt: skip
    for response, status, code in cases:
        body = response.json()
        assert (response.status_code, body["code"]) == (status, code), response.text
        assert body["message"] and set(body) == {"code", "message", "hint"}
    assert "s3cret" not in cases[3][0].text and "\x1b" not in cases[4][0].text


def test_jobs_and_events_page_with_cursors_and_stream_as_ndjson(
    api_server: ApiServer, finished_job: str
) -> None:
    with api_server.client("admin") as admin, api_server.client("producer") as producer:
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 1, **({"cursor": cursor} if cursor else {})}
            page = producer.get("/v1/jobs", params=params).json()
            seen += [job["id"] for job in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert finished_job in seen and len(seen) == len(set(seen))
        everyone = admin.get("/v1/jobs", params={"limit": 500}).json()["items"]
        assert {job["id"] for job in everyone} >= set(seen)
        first = admin.get("/v1/events", params={"job": finished_job, "limit": 2}).json()
        rest = admin.get(
            "/v1/events", params={"job": finished_job, "cursor": first["next_cursor"]}
        ).json()
        paged = [event["id"] for event in first["items"] + rest["items"]]
        streamed = admin.get(
            "/v1/events", params={"job": finished_job}, headers={"Accept": "application/x-ndjson"}
        )
    assert streamed.headers["content-type"].startswith("application/x-ndjson")
    assert [json.loads(line)["id"] for line in streamed.text.splitlines()] == paged
    assert rest["next_cursor"] is None and paged == sorted(paged) and len(paged) > 2


def test_mutations_are_events_of_the_token_and_revoked_tokens_are_refused(
    api_server: ApiServer, finished_job: str
) -> None:
    token, _ = create_token(f"e2e-short-{uuid.uuid4().hex[:6]}", "operator", actor="operator:e2e")
    with api_server.client(token=token) as client:
        retried = client.post(f"/v1/jobs/{finished_job}/retry", json={"reason": "from the API"})
        assert retried.status_code == 200, retried.text
        cancelled = client.post(f"/v1/jobs/{finished_job}/cancel", json={"reason": "enough"})
        assert cancelled.status_code in (200, 409), cancelled.text  # it may have failed already
        tested = client.post(f"/v1/registries/{HARBOR_ID}/test")
        assert tested.json()["ok"] is True
        listed = client.get("/v1/registries").json()
    with api_server.client("auditor") as auditor:
        mine = auditor.get("/v1/events", params={"actor": f"token:{_name(token)}"}).json()
    assert {"job.retried", "registry.tested"} <= {event["type"] for event in mine["items"]}
    retried_event = next(e for e in mine["items"] if e["type"] == "job.retried")
    assert retried_event["payload"]["reason"] == "from the API"
    harbor = next(r for r in listed if r["id"] == HARBOR_ID)
    assert harbor["credential"] == "secret" and "password" not in json.dumps(listed).lower()
    revoke_token(_name(token), actor="operator:e2e")
    with api_server.client(token=token) as client:
        assert client.get("/v1/jobs").status_code == 401
    assert token not in api_server.log_text()


def _name(token: str) -> str:
    from worker.tokens import list_tokens

    token_id = int(token.split("_")[1])
    return next(info.name for info in list_tokens() if info.id == token_id)


def test_the_event_stream_resumes_after_last_event_id(
    api_server: ApiServer, finished_job: str
) -> None:
    """A client that reconnects with Last-Event-ID gets the events after it, none twice."""
    with api_server.client("auditor") as client:
        every = [event["id"] for event in client.get(f"/v1/jobs/{finished_job}").json()["events"]]
        ids: list[int] = []
        headers = {"Last-Event-ID": str(every[1])}
        with client.stream(
            "GET", f"/v1/jobs/{finished_job}/events/stream", headers=headers
        ) as stream:
            ids += [int(line[3:]) for line in stream.iter_lines() if line.startswith("id:")]
    # The job may have been retried by an earlier test and still run: later events may follow.
    expected = [event_id for event_id in every if event_id > every[1]]
    assert expected and ids[: len(expected)] == expected and ids == sorted(set(ids))


def test_readyz_names_what_is_away(e2e: E2E) -> None:
    """An API whose broker does not answer is alive (/healthz) and not ready (/readyz 503)."""
    env = {**e2e.env, "PUSHWORKER_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    url, process = start_api(env, e2e.workdir / f"api-nobroker-{uuid.uuid4().hex[:6]}.log")
    try:
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
        ready = httpx.get(f"{url}/readyz", timeout=30)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert ready.status_code == 503
    body = ready.json()
    assert (body["status"], body["database"]) == ("unavailable", "ok")
    assert body["broker"].startswith("unavailable")
