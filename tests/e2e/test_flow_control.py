"""Per-registry flow control on the real stack (issue 15): two real Celery worker processes of
concurrency 2 (4 workers) on real Redis, the real dockerd and the real plain registry behind
``ThrottleProxy`` (tests/support/throttleproxy.py), which counts the pushes it sees at once and,
when told to, answers 429 to a push above its limit, as a busy Harbor does.

Each job pushes its own repository, so the proxy can tell pushes apart. Figures measured by the
proxy (most pushes at once, 429s answered) are printed (``-s``) for docs/reliability.md.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator

import pytest

from harness.images import new_image
from harness.worker import CeleryProcess
from tests.e2e.conftest import E2E, HARBOR_ID, served_digest, wait_for_job
from tests.support.throttleproxy import ThrottleProxy
from worker.producer import enqueue_push
from worker.registries import RegistrySpec, create_registry
from worker.store.db import session_scope
from worker.store.models import PushJob
from worker.store.queries import select_events

TAG = "v1"
_ids = itertools.count(950)  # the e2e database is new for each session


@pytest.fixture(scope="module")
def two_workers(e2e: E2E) -> Iterator[list[CeleryProcess]]:
    """The session's worker (one process of 4) makes way for two processes of 2 each."""
    e2e.worker.stop()
    log = e2e.workdir / "flow-workers.log"
    workers = [
        CeleryProcess(e2e.env, log, concurrency=2, name=f"flow{i}-{uuid.uuid4().hex[:6]}@%h")
        for i in range(2)
    ]
    try:
        for worker in workers:
            worker.spawn()
        for worker in workers:
            worker.wait_ready()
        yield workers
    finally:
        for worker in workers:
            worker.stop()
        e2e.worker.start()


def _registry(e2e: E2E, proxy: ThrottleProxy, max_concurrent: int | None = None) -> int:
    registry_id = next(_ids)
    spec = RegistrySpec(
        name=f"flow-{registry_id}", url=proxy.url, kind="generic",
        username=e2e.stack.plain.user, secret=e2e.stack.plain.password, insecure=True,
        fallback_chain=[HARBOR_ID], max_concurrent=max_concurrent,
    )  # fmt: skip
    with session_scope() as session:
        create_registry(session, spec, registry_id=registry_id)
    return registry_id


def _proxy(e2e: E2E, limit: int | None = None, retry_after: str | None = None) -> ThrottleProxy:
    host, port = e2e.stack.plain.host.rsplit(":", 1)
    proxy = ThrottleProxy(host, int(port), limit=limit, retry_after=retry_after)
    proxy.start()
    return proxy


def _enqueue(images: list[str], registry_id: int, label: str) -> list[tuple[str, str]]:
    jobs = []
    for image in images:
        repository = f"flow/{label}-{uuid.uuid4().hex[:8]}"
        job_id = enqueue_push(
            source_image=image, registry_id=registry_id, repository=repository, tag=TAG,
            requested_by="flow-tests",
        )  # fmt: skip
        jobs.append((job_id, repository))
    return jobs


def _types(job_id: str) -> list[str]:
    with session_scope() as session:
        return [e.type for e in select_events(session, job_id=job_id)]


def _assert_succeeded(e2e: E2E, jobs: list[tuple[str, str]], timeout: float) -> list[PushJob]:
    done = [wait_for_job(job_id, timeout=timeout) for job_id, _ in jobs]
    for job, (job_id, repository) in zip(done, jobs, strict=True):
        types = _types(job_id)
        assert job.status == "succeeded", (job.error_code, job.error_message, types)
        assert "fallback.applied" not in types, types
        assert served_digest(e2e.stack.plain, repository, TAG) == job.digest
    return done


def test_a_registry_capped_at_2_never_sees_more_and_another_is_not_held_up(
    e2e: E2E, two_workers: list[CeleryProcess]
) -> None:
    """40 jobs to a registry capped at 2 and 10 to an uncapped one, enqueued together, on 4
    workers in 2 processes: the capped registry never sees more than 2 pushes at once; all 50
    succeed; the uncapped registry's jobs never wait and are all done before the capped queue
    drains."""
    capped_proxy, free_proxy = _proxy(e2e), _proxy(e2e)
    try:
        capped = _registry(e2e, capped_proxy, max_concurrent=2)
        free = _registry(e2e, free_proxy)
        capped_images = [new_image(e2e.api) for _ in range(40)]
        free_images = [new_image(e2e.api) for _ in range(10)]
        capped_jobs = _enqueue(capped_images[:20], capped, "capped")
        free_jobs = _enqueue(free_images, free, "free")
        capped_jobs += _enqueue(capped_images[20:], capped, "capped")
        capped_done = _assert_succeeded(e2e, capped_jobs, timeout=600)
        free_done = _assert_succeeded(e2e, free_jobs, timeout=60)
        print(
            f"\ncapped registry: most pushes at once {capped_proxy.max_open} (cap 2), "
            f"pushes {capped_proxy.opened}; uncapped: most at once {free_proxy.max_open}"
        )
        assert capped_proxy.max_open <= 2
        assert capped_proxy.opened == 40
        waited = sum(_types(job_id).count("step.waiting") for job_id, _ in capped_jobs)
        assert waited > 0  # the cap was met: jobs waited (re-queued), none failed for it
        for job_id, _ in free_jobs:
            assert "step.waiting" not in _types(job_id)
        last_free = max(job.finished_at for job in free_done if job.finished_at)
        last_capped = max(job.finished_at for job in capped_done if job.finished_at)
        assert last_free < last_capped
    finally:
        capped_proxy.close()
        free_proxy.close()


@pytest.mark.parametrize("retry_after", ["1", None], ids=["retry-after", "no-retry-after"])
def test_a_registry_answering_429_above_3_pushes_gets_every_job_through(
    e2e: E2E, two_workers: list[CeleryProcess], retry_after: str | None
) -> None:
    """A registry that answers 429 to a push above 3 at once, with no cap configured: the first
    429 lowers the registry's limit (registry.throttled), the throttled pushes are retried, not
    failed and never sent to the fallback; every job succeeds; the 429s are few."""
    proxy = _proxy(e2e, limit=3, retry_after=retry_after)
    try:
        registry_id = _registry(e2e, proxy)
        jobs = _enqueue([new_image(e2e.api) for _ in range(16)], registry_id, "busy")
        _assert_succeeded(e2e, jobs, timeout=600)
        with session_scope() as session:
            changes = select_events(
                session, stream=f"registry/{registry_id}",
                types=["registry.throttled", "registry.unthrottled"],
            )  # fmt: skip
            limits = [(e.type, e.payload["effective_limit"]) for e in changes]
        print(
            f"\n429 above 3 (Retry-After {retry_after}): {proxy.throttled} answered 429 for "
            f"{len(jobs)} jobs, {len(proxy.seen)} requests; most at once {proxy.max_open}; "
            f"limit changes {limits}"
        )
        assert proxy.max_open <= 3
        assert proxy.throttled <= len(jobs) // 2
        if proxy.throttled:
            assert limits and limits[0][0] == "registry.throttled"
    finally:
        proxy.close()
