"""Registry health on Celery beat's schedule, on the real stack: a registry stopped between
scheduled checks is one ``registry.health`` event and one error line, and its recovery one more
event; a registry whose password is missing is seen by the health check, before any push.

Celery beat runs for real (every second here); the session's worker runs the checks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.worker import CeleryProcess
from tests.e2e.conftest import E2E, HARBOR_ID
from worker.registries import RegistrySpec, create_registry, remove_registry, update_registry
from worker.store.db import session_scope
from worker.store.events import registry_stream
from worker.store.models import Event
from worker.store.queries import select_events

MISSING_ID = 62
UNSET_VARIABLE = "PUSHWORKER_E2E_NEVER_SET_PASSWORD"


@pytest.fixture(scope="module")
def beat(e2e: E2E) -> Iterator[CeleryProcess]:
    workdir = e2e.workdir / "beat"
    workdir.mkdir()
    env = {**e2e.env, "PUSHWORKER_HEALTH_EVERY": "1", "PUSHWORKER_RECONCILE_EVERY": "3600"}
    process = CeleryProcess(env, workdir / "beat.log", beat=True).start()
    try:
        yield process
    finally:
        process.stop()


class WorkerLog:
    """The session worker's JSON lines, from a point on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size

    def lines(self) -> list[dict[str, Any]]:
        with self.path.open("rb") as log:
            log.seek(self.offset)
            text = log.read().decode(errors="replace")
        found = []
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    continue
        return found

    def checks(self) -> int:
        return sum(1 for line in self.lines() if line.get("event") == "health.checked")

    def errors(self, registry_id: int) -> list[dict[str, Any]]:
        return [
            line for line in self.lines()
            if line.get("level") == "error" and line.get("registry_id") == registry_id
        ]  # fmt: skip

    def named(self, event: str, registry_id: int) -> list[dict[str, Any]]:
        return [
            line for line in self.lines()
            if line.get("event") == event and line.get("registry_id") == registry_id
        ]  # fmt: skip


def health_events(registry_id: int) -> list[Event]:
    with session_scope() as session:
        return select_events(
            session, stream=registry_stream(registry_id), types=["registry.health"]
        )


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout} s")


def settle(log: WorkerLog, checks: int = 2) -> None:
    """Let a few more scheduled checks run: a duplicate event or line would show now."""
    target = log.checks() + checks
    wait_until(lambda: log.checks() >= target, f"{checks} more scheduled health checks")


def test_an_outage_is_one_event_and_one_error_line_and_its_end_one_more_event(
    e2e: E2E, beat: CeleryProcess
) -> None:
    start = WorkerLog(e2e.worker_log)
    wait_until(lambda: start.checks() >= 1, "a first scheduled health check")
    wait_until(
        lambda: [e.payload["status"] for e in health_events(HARBOR_ID)][-1:] == ["healthy"],
        "registry 5 recorded as healthy",
    )
    before = len(health_events(HARBOR_ID))
    log = WorkerLog(e2e.worker_log)

    e2e.stack.service("down", "tls-registry")
    try:
        wait_until(lambda: len(health_events(HARBOR_ID)) > before, "the outage recorded")
        settle(log)
        outage = health_events(HARBOR_ID)[before:]
        assert len(outage) == 1
        assert outage[0].payload["status"] == "unhealthy"
        assert outage[0].payload["previous_status"] == "healthy"
        assert outage[0].payload["error_code"] == "registry_unavailable"
        assert outage[0].actor.startswith("worker:")
        errors = log.errors(HARBOR_ID)
        assert [line["event"] for line in errors] == ["registry.unhealthy"]
        assert "registry 5 (harbor" in errors[0]["message"]
        assert errors[0]["hint"]
    finally:
        e2e.stack.service("up", "tls-registry")

    wait_until(lambda: len(health_events(HARBOR_ID)) > before + 1, "the recovery recorded")
    settle(log)
    recovery = health_events(HARBOR_ID)[before + 1 :]
    assert [(e.payload["status"], e.payload["previous_status"]) for e in recovery] == [
        ("healthy", "unhealthy")
    ]
    assert len(log.errors(HARBOR_ID)) == 1  # the recovery is an info line
    assert len(log.named("registry.recovered", HARBOR_ID)) == 1


def test_a_missing_password_is_seen_before_any_push(e2e: E2E, beat: CeleryProcess) -> None:
    """The incident's empty credential: the health check reports it, naming what to fix."""
    log = WorkerLog(e2e.worker_log)
    plain = e2e.stack.plain
    with session_scope() as session:
        create_registry(session, RegistrySpec(
            name="missing-password", url=plain.url, insecure=True, username=plain.user,
            credential_ref=f"env:REGISTRY_CREDENTIAL_{UNSET_VARIABLE}",  # in the namespace
        ), registry_id=MISSING_ID)  # fmt: skip
    try:
        wait_until(lambda: len(health_events(MISSING_ID)) == 1, "the credential failure recorded")
        settle(log)
        [failing] = health_events(MISSING_ID)
        assert failing.payload["status"] == "credentials_failing"
        assert failing.payload["error_code"] == "credential_unavailable"
        errors = log.errors(MISSING_ID)
        assert [line["event"] for line in errors] == ["registry.credentials_failing"]
        assert UNSET_VARIABLE in errors[0]["message"]

        with session_scope() as session:
            update_registry(session, MISSING_ID, RegistrySpec(secret=plain.password))
        wait_until(lambda: len(health_events(MISSING_ID)) == 2, "the fixed credential recorded")
        settle(log)
        statuses = [e.payload["status"] for e in health_events(MISSING_ID)]
        assert statuses == ["credentials_failing", "healthy"]
        assert len(log.errors(MISSING_ID)) == 1
    finally:
        with session_scope() as session:
            remove_registry(session, MISSING_ID)
