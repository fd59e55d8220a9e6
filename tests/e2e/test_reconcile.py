"""Reconcile end to end: a job committed while the broker was away reaches the real worker."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.e2e.conftest import E2E, served_digest, wait_for_job
from tests.e2e.test_producer_contract import ensure_registry
from worker.jobs import PushRequest, create_job
from worker.reconcile import reconcile
from worker.store.db import session_scope
from worker.store.queries import select_events

RECONCILE_ID = 51  # a registry of this module's own (the harness's are 4 and 5)
GRACE = 1.0


@pytest.fixture
def registry(e2e: E2E) -> int:
    return ensure_registry(RECONCILE_ID, "reconcile-tls", e2e.stack.tls)


def test_a_job_committed_while_the_broker_was_away_is_republished_once(
    e2e: E2E, registry: int, image: str
) -> None:
    """Committed exactly as enqueue_push commits it, never published (the broker was 'down'):
    reconcile publishes it once the grace period has passed, the worker pushes it, and a second
    reconcile right away publishes nothing more."""
    repository = f"reconcile/app-{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        job, _ = create_job(
            session, PushRequest(image, RECONCILE_ID, repository, "v1", "reconcile-e2e"),
            actor="producer:reconcile-e2e",
        )  # fmt: skip
        job_id = job.id
    assert reconcile(grace=GRACE).republished.count(job_id) == 0  # not yet: within the grace
    time.sleep(GRACE + 0.2)
    assert job_status(job_id) == "queued"  # nothing published it meanwhile

    first = reconcile(grace=GRACE)
    second = reconcile(grace=GRACE)
    assert job_id in first.republished
    assert job_id not in second.republished

    done = wait_for_job(job_id)
    assert (done.status, done.error_message) == ("succeeded", None)
    assert done.digest == served_digest(e2e.stack.tls, repository, "v1")
    assert job_id not in reconcile(grace=GRACE).republished  # finished jobs are left alone
    with session_scope() as session:
        rows = select_events(session, job_id=job_id)
    types = [row.type for row in rows]
    assert types[:3] == ["job.enqueued", "job.republished", "step.started"]
    assert types.count("job.republished") == 1 and types[-1] == "job.succeeded"
    assert rows[1].actor.startswith("worker:") and rows[1].registry_id == RECONCILE_ID


def job_status(job_id: str) -> str:
    from worker.store.models import PushJob

    with session_scope() as session:
        job = session.get(PushJob, job_id)
        assert job is not None
        return job.status
