"""Seals of the event log on the real stack: Celery beat schedules them, the session's worker
takes them (signed with the key derived from its secret key), each is a log line with its hash,
and a pushed job's last event is named by a seal within a few seconds (docs/event-log.md).

The log is shared by the session's tests, so nothing is tampered with here: the tamper tests are
tests/integration/test_audit.py.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest

from harness.worker import CeleryProcess
from tests.e2e.conftest import E2E, HARBOR_ID, wait_for_job
from worker.producer import enqueue_push
from worker.store import verify
from worker.store.chain import lane_name
from worker.store.db import session_scope
from worker.store.models import EventSeal
from worker.store.queries import select_events


@pytest.fixture(scope="module")
def beat(e2e: E2E) -> Iterator[CeleryProcess]:
    workdir = e2e.workdir / "beat-seals"
    workdir.mkdir()
    env = {
        **e2e.env, "PUSHWORKER_SEAL_EVERY": "1", "PUSHWORKER_HEALTH_EVERY": "3600",
        "PUSHWORKER_RECONCILE_EVERY": "3600",
    }  # fmt: skip
    process = CeleryProcess(env, workdir / "beat.log", beat=True).start()
    try:
        yield process
    finally:
        process.stop()


def _sealed_head(lane: str) -> tuple[int, EventSeal] | None:
    with session_scope() as session:
        seal = session.query(EventSeal).order_by(EventSeal.id.desc()).first()
        if seal is None or lane not in seal.heads:
            return None
        return int(seal.heads[lane][0]), seal


def test_beat_seals_a_pushed_jobs_last_event(e2e: E2E, image: str, beat: CeleryProcess) -> None:
    job_id = enqueue_push(
        source_image=image, registry_id=HARBOR_ID, repository=f"e2e/seal-{uuid.uuid4().hex[:8]}",
        tag="v1", requested_by="e2e",
    )  # fmt: skip
    assert wait_for_job(job_id).status == "succeeded"
    with session_scope() as session:
        last = select_events(session, job_id=job_id)[-1]
    lane = lane_name(last.lane)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = _sealed_head(lane)
        if found is not None and found[0] >= last.id:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"no seal named event {last.id} (lane {lane}) within 30 s")
    seal = found[1]
    assert seal.actor.startswith("worker:") and seal.signature and seal.key_id
    report = verify.verify()
    assert report.ok, report.to_dict()
    assert report.seal is not None and report.seal["signature"] == "verified"
    # The seal's hash is in the worker's log lines too: a copy outside the database.
    logged = [
        json.loads(line) for line in e2e.worker_log.read_text().splitlines()
        if line.startswith("{") and '"events.sealed"' in line
    ]  # fmt: skip
    assert any(line.get("seal_hash") == seal.hash for line in logged)
