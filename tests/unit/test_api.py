"""The HTTP API's own rules, in process (the routes themselves run through a real uvicorn
process in tests/e2e/test_api.py): every error of the tree has one status, the push body is the
message contract's, chunked bodies are limited too, cursors are checked, a query parameter a
route does not declare is refused."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import pytest
from fastapi.testclient import TestClient

from worker.api.app import BodyLimit, create_app
from worker.api.errors import STATUS_BY_EXIT_CODE, status_for
from worker.api.models import api_push_schema
from worker.api.routes import _decode_cursor, _encode_cursor, _moment
from worker.contract import push_request_schema
from worker.core.errors import PushWorkerError, ValidationError
from worker.tokens import create_token


def _tree() -> list[type[PushWorkerError]]:
    found, pending = [], [PushWorkerError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("cls", _tree(), ids=lambda cls: cls.code)
def test_every_error_has_one_status_by_its_family(cls: type[PushWorkerError]) -> None:
    assert cls.exit_code in STATUS_BY_EXIT_CODE, f"{cls.code}: exit code {cls.exit_code} unmapped"
    status = status_for(cls.__new__(cls))
    # What the caller must change (input, a missing thing, a credential, a job's state) is 4xx;
    # what is wrong on this side or beyond it (a bug, a registry, the engine, the database) 5xx.
    caller_must_change = cls.exit_code in (2, 3, 4, 5)
    assert (400 <= status < 500) == caller_must_change, (cls.code, status)


def test_the_push_body_is_the_contracts_without_the_key() -> None:
    contract, api = push_request_schema(), api_push_schema()
    assert set(api["properties"]) == set(contract["properties"]) - {"idempotency_key"}
    for name, schema in api["properties"].items():
        assert schema == contract["properties"][name], name
    assert set(api["required"]) == set(contract["required"]) - {"idempotency_key", "requested_by"}
    assert api["additionalProperties"] is False


def test_cursors_round_trip_and_anything_else_is_refused() -> None:
    cursor = _encode_cursor("2026-01-01T00:00:00+00:00", "abc")
    assert _decode_cursor(cursor, 2) == ["2026-01-01T00:00:00+00:00", "abc"]
    for bad in ("garbage", "", "!!!!", _encode_cursor("one"), "e30"):
        with pytest.raises(ValidationError, match="cursor"):
            _decode_cursor(bad, 2)


def test_moments_are_durations_or_iso_times() -> None:
    assert _moment("since", None) is None
    moment = _moment("since", "2026-01-31T12:00:00")
    assert moment is not None and moment.tzinfo is not None
    assert _moment("since", "1h30m") is not None
    for bad in ("0.5", "yesterday", "1y"):
        with pytest.raises(ValidationError, match="duration"):
            _moment("since", bad)
    with pytest.raises(ValidationError, match="too long ago"):
        _moment("since", "999999999w")


def test_a_chunked_body_over_the_limit_is_refused_before_the_app_reads_it_all() -> None:
    seen: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            seen.append(len(message.get("body", b"")))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    chunks = [{"type": "http.request", "body": b"x" * 600, "more_body": True}] * 5
    chunks.append({"type": "http.request", "body": b"", "more_body": False})
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return chunks.pop(0)

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "headers": [(b"transfer-encoding", b"chunked")]}
    asyncio.run(BodyLimit(app, limit=1024)(scope, receive, send))
    assert sent[0]["status"] == 413 and b"request_too_large" in sent[1]["body"]
    assert sum(seen) <= 1024 + 600


def test_a_query_parameter_the_route_does_not_declare_is_refused(sqlite_url: str) -> None:
    token, _ = create_token("query-admin", "admin", actor="operator:test")
    with TestClient(create_app()) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        routes = [
            ("GET", "/v1/events"), ("GET", "/v1/jobs"), ("GET", "/v1/registries"),
            ("GET", "/healthz"), ("POST", "/v1/jobs/0000/cancel"),
        ]  # fmt: skip
        for method, path in routes:
            for query, named in (("foo=1", "'foo'"), ("=al", "'' (no name)"), ("al", "'al'")):
                answer = client.request(method, f"{path}?{query}", json={"reason": "r"})
                assert answer.status_code == 422, (method, path, query, answer.text)
                error = answer.json()
                assert set(error) == {"code", "message", "hint"}
                assert error["code"] == "invalid_input"
                assert error["message"] == f"unknown query parameter {named}", error
        # Beside known parameters too, and naming no value.
        answer = client.get("/v1/events?limit=2&type=a&lmit=SECRET")
        assert answer.status_code == 422 and "'lmit'" in answer.json()["message"]
        assert "SECRET" not in answer.text and "limit" in answer.json()["hint"]
        # What the routes declare still works (repeated, in dependencies' parameters too).
        for path in ("/v1/events?limit=2&type=a&type=b&since=1h", "/v1/jobs?limit=1&status=failed",
                     "/v1/registries", "/healthz"):  # fmt: skip
            answer = client.get(path)
            assert answer.status_code == 200, (path, answer.text)
        # The document says 422 (with the error body) for every route, so the answer is one it
        # describes.
        for path, operations in create_app().openapi()["paths"].items():
            for method, operation in operations.items():
                content = operation["responses"]["422"]["content"]["application/json"]
                assert content["schema"] == {"$ref": "#/components/schemas/ErrorBody"}, (
                    method, path,
                )  # fmt: skip


def test_an_outcome_filter_names_a_recorded_outcome_or_is_refused(sqlite_url: str) -> None:
    """An unknown outcome matched nothing and answered 200 with no events, which reads as "no
    such events"; it is a 422 naming the outcomes the log records (the console says the same)."""
    token, _ = create_token("outcome-auditor", "auditor", actor="operator:test")
    with TestClient(create_app()) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        for outcome in ("failed", "fallback"):
            assert client.get(f"/v1/events?outcome={outcome}").status_code == 200
        for bad in ("faild", "1.183382740308864e+165", "FAILED"):
            answer = client.get(f"/v1/events?outcome={bad}&outcome=failed")
            assert answer.status_code == 422, (bad, answer.text)
            assert answer.json()["code"] == "invalid_input"
