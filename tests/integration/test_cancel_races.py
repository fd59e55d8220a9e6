"""On PostgreSQL (READ COMMITTED), an operator's cancel that commits while a worker is between
reading a job and writing it stands: no step starts after it, and no end overwrites it or is
overwritten by it.

SQLite cannot interleave these: every write transaction holds the database's lock from its
BEGIN, so the other writer waits for the whole of it. The races are PostgreSQL's alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.support.fakes import FakeWorld, fake_runner
from tests.support.postgres import lock_waiters
from worker.core.errors import AuthenticationError, InvalidStateTransition, RegistryNotFound
from worker.core.settings import Settings
from worker.engine.fallback import plan_fallback
from worker.engine.steps import STEP_NAMES
from worker.jobs import PushRequest, cancel_job, create_job
from worker.registries import RegistrySpec, create_registry
from worker.store import claims
from worker.store.db import session_scope
from worker.store.models import PushJob, StepRun, utcnow
from worker.store.queries import select_events
from worker.store.verify import verify

SOURCE = "app:build"
TARGET = "reg.example.com/team/app:v1"


@pytest.fixture
def job_id(postgres_url: str) -> str:
    with session_scope() as session:
        spec = RegistrySpec(name="r", url="https://reg.example.com", username="u", secret="pw")
        create_registry(session, spec, registry_id=5)
        job, _ = create_job(session, PushRequest(SOURCE, 5, "team/app", "v1", "t"), actor="t")
        return job.id


@pytest.fixture
def world() -> FakeWorld:
    return FakeWorld(images={SOURCE: "sha256:image1"})


def _cancelling_first(job_id: str, write: Callable[..., Any]) -> Callable[..., Any]:
    """``write`` that, the first time it is called, lets an operator's cancel commit (another
    connection) just before it: after the worker read the job, before it writes it."""
    done: list[bool] = []

    def racing(*args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(True)
            with session_scope() as other:
                cancel_job(other, job_id, actor="operator:tester", reason="stop it")
        return write(*args, **kwargs)

    return racing


def _after_cancel(job_id: str) -> list[tuple[str, str | None]]:
    with session_scope() as session:
        rows = select_events(session, job_id=job_id)
    types = [(row.type, row.step) for row in rows]
    return types[types.index(("job.cancelled", None)) + 1 :]


@pytest.mark.parametrize("step", STEP_NAMES)
def test_a_cancel_between_the_claims_read_and_its_write_stands(
    job_id: str, world: FakeWorld, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step's first claim: the cancel commits after the claim read the job (still queued or
    running) and before the claim marks it running. The claim is undone and read again: the
    step is skipped as cancelled, nothing of it runs, and the job stays cancelled."""
    runner, _ = fake_runner(world, Settings.from_env())
    position = STEP_NAMES.index(step)
    for name in STEP_NAMES[:position]:
        assert runner.run(name, job_id, 5).action == "continue"
    monkeypatch.setattr(
        claims, "take_first_claim", _cancelling_first(job_id, claims.take_first_claim)
    )
    outcome = runner.run(step, job_id, 5)
    assert (outcome.action, outcome.reason) == ("stop", "job cancelled")
    with session_scope() as session:
        job = session.get(PushJob, job_id)
        assert job is not None and job.status == "cancelled"
        assert session.get(StepRun, (job_id, step, 5)) is None  # the claim was rolled back
    assert _after_cancel(job_id) == [("step.skipped", step)]
    assert world.pushes == []
    assert verify().ok


def test_a_cancel_before_a_later_claim_marks_the_job_stands(
    job_id: str, world: FakeWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later claim (the step failed once and is tried again): the cancel commits after the
    claim read the job, before it marks the job running again. The same: undone, skipped."""
    runner, _ = fake_runner(world, Settings.from_env())
    for name in STEP_NAMES[:-1]:
        assert runner.run(name, job_id, 5).action == "continue"
    with session_scope() as session:  # the push's first try, failed and due again
        session.add(
            StepRun(
                job_id=job_id, step="push", registry_id=5, status="failed", attempts=1,
                owner=None, lease_expires_at=None, result={}, updated_at=utcnow(),
            )
        )  # fmt: skip
    monkeypatch.setattr(claims, "mark_running", _cancelling_first(job_id, claims.mark_running))
    outcome = runner.run("push", job_id, 5)
    assert (outcome.action, outcome.reason) == ("stop", "job cancelled")
    with session_scope() as session:
        job = session.get(PushJob, job_id)
        claim = session.get(StepRun, (job_id, "push", 5))
        assert job is not None and job.status == "cancelled"
        assert claim is not None and (claim.status, claim.attempts) == ("failed", 1)
    assert _after_cancel(job_id) == [("step.skipped", "push")]
    assert world.pushes == []


def test_a_cancel_before_a_refused_target_fails_the_job_stands(
    job_id: str, world: FakeWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim finds its registry refused (removed while the job waited) and would fail the
    job; the cancel commits between the claim's read and that write. The job stays cancelled:
    the failure is not written over it."""
    from worker.engine import pipeline

    def removed(registry: Any, registry_id: int) -> Any:
        return RegistryNotFound(f"registry {registry_id} was removed after the job was queued")

    monkeypatch.setattr(pipeline, "target_refusal", _cancelling_first(job_id, removed))
    runner, _ = fake_runner(world, Settings.from_env())
    outcome = runner.run(STEP_NAMES[0], job_id, 5)
    assert (outcome.action, outcome.reason) == ("stop", "job cancelled")
    with session_scope() as session:
        job = session.get(PushJob, job_id)
        assert job is not None and (job.status, job.error_code) == ("cancelled", None)
    assert _after_cancel(job_id) == [("step.skipped", STEP_NAMES[0])]


def test_a_cancel_while_a_failure_is_decided_waits_for_the_decision(
    postgres_url: str, world: FakeWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The login is refused and the worker decides what follows (here: the job's fallback)
    while an operator cancels. The job row is locked for the decision, so the cancel lands
    after it: the log never shows a decision made after ``job.cancelled`` on what was read
    before it."""
    from worker.engine import pipeline

    with session_scope() as session:
        for rid, host in ((5, "reg.example.com"), (4, "alt.example.com")):
            spec = RegistrySpec(name=f"r{rid}", url=f"https://{host}", username="u", secret="pw")
            create_registry(session, spec, registry_id=rid)
        request = PushRequest(SOURCE, 5, "team/app", "v1", "t", fallback=[4])
        job_id = create_job(session, request, actor="t")[0].id
    world.login_errors["reg.example.com"] = AuthenticationError(
        "registry reg.example.com rejected the credentials: unauthorized"
    )
    cancelled: list[BaseException | None] = []

    def operator() -> None:
        try:
            with session_scope() as session:
                cancel_job(session, job_id, actor="operator:tester", reason="stop it")
            cancelled.append(None)
        except BaseException as error:  # checked below
            cancelled.append(error)

    thread = threading.Thread(target=operator)

    def plan_while_cancelling(*args: Any, **kwargs: Any) -> Any:
        thread.start()
        # The cancel either commits at once (nothing held the row) or waits for the row.
        thread.join(2)
        if thread.is_alive():
            assert lock_waiters(postgres_url, 5), "the cancel is neither done nor waiting"
        return plan_fallback(*args, **kwargs)

    monkeypatch.setattr(pipeline, "plan_fallback", plan_while_cancelling)
    runner, _ = fake_runner(world, Settings.from_env())
    chains: list[tuple[str, int]] = []
    runner.dispatcher = _Recording(chains)
    for name in STEP_NAMES[:2]:
        runner.run(name, job_id, 5)
    thread.join(10)
    assert cancelled == [None]
    with session_scope() as session:
        job = session.get(PushJob, job_id)
        assert job is not None and job.status == "cancelled"
        types = [row.type for row in select_events(session, job_id=job_id)]
    assert types[-3:] == ["step.failed", "fallback.applied", "job.cancelled"]
    assert chains == [(job_id, 4)]  # decided before the cancel; the chain's claims skip


class _Recording:
    """A dispatcher that writes chains down instead of running them."""

    def __init__(self, chains: list[tuple[str, int]]) -> None:
        self.chains = chains

    def start_chain(self, job_id: str, registry_id: int) -> None:
        self.chains.append((job_id, registry_id))


@pytest.fixture
def holder(postgres_url: str) -> Iterator[Any]:
    """A connection of its own, for a transaction the test holds open."""
    engine = create_engine(postgres_url)
    connection = engine.connect()
    yield connection
    connection.close()
    engine.dispose()


def test_a_cancel_waits_for_a_job_ending_meanwhile_and_does_not_overwrite_it(
    job_id: str, holder: Any, postgres_url: str
) -> None:
    """The job's last step marks it succeeded (its transaction still open) as an operator
    cancels it: the cancel waits for that transaction, then refuses (the job is succeeded),
    instead of overwriting the success with "cancelled"."""
    with session_scope() as session:
        job = claims.load_job(session, job_id)
        assert job is not None
        claims.mark_running(session, job, "push")
    holder.execute(
        text("UPDATE push_jobs SET status = 'succeeded', current_step = NULL WHERE id = :id"),
        {"id": job_id},
    )
    refused: list[BaseException] = []

    def operator() -> None:
        try:
            with session_scope() as session:
                cancel_job(session, job_id, actor="operator:tester", reason="stop it")
        except BaseException as error:  # the thread's outcome, checked below
            refused.append(error)

    thread = threading.Thread(target=operator)
    thread.start()
    try:
        assert lock_waiters(postgres_url, 10), "the cancel never waited for the job's row"
    finally:
        holder.commit()
        thread.join(10)
    assert not thread.is_alive()
    assert len(refused) == 1 and isinstance(refused[0], InvalidStateTransition), refused
    assert "is succeeded already" in str(refused[0])
    with session_scope() as session:
        job = session.get(PushJob, job_id)
        assert job is not None and job.status == "succeeded"
        assert "job.cancelled" not in [row.type for row in select_events(session, job_id=job_id)]
