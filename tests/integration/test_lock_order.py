"""On PostgreSQL, the pipeline never waits for a row while it holds a lock of the event log's
lanes.

An operator's cancel locks the job row and then waits for the job's lane (its ``job.cancelled``
event); a record transaction that held the lane and then waited for the job row would deadlock
with it. Every transaction of the pipeline therefore changes its rows first and appends after.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Connection, create_engine, text

from tests.support.fakes import FakeWorld, cancelled_while_acting, fake_runner, wrap_action
from tests.support.postgres import lock_waiters
from worker.core.errors import EventConflict
from worker.core.settings import Settings
from worker.engine.steps import STEP_NAMES, Action, StepContext, StepResult
from worker.jobs import PushRequest, create_job, retry_job
from worker.registries import RegistrySpec, create_registry
from worker.store.chain import LANES
from worker.store.db import session_scope
from worker.store.events import LANE_LOCK_CLASS
from worker.store.models import PushJob
from worker.store.queries import select_events
from worker.store.verify import verify

SOURCE = "app:build"


def _lanes_free(connection: Connection) -> bool:
    """Whether no other session holds a lane of the event log (taking each, in this
    connection's transaction, for as long as it lasts)."""
    free = connection.execute(
        text(
            "SELECT bool_and(pg_try_advisory_xact_lock(:cls, lane))"
            " FROM generate_series(0, :last) AS lane"
        ),
        {"cls": LANE_LOCK_CLASS, "last": LANES - 1},
    ).scalar()
    return bool(free)


def _queued_job() -> str:
    """A job queued for registry 5 (created here)."""
    with session_scope() as session:
        spec = RegistrySpec(name="r", url="https://reg.example.com", username="u", secret="pw")
        create_registry(session, spec, registry_id=5)
        job, _ = create_job(session, PushRequest(SOURCE, 5, "team/app", "v1", "t"), actor="t")
        return job.id


def _run_while_the_job_row_is_held(
    url: str, job_id: str, run: Callable[[], Any]
) -> tuple[list[Any], list[int], bool]:
    """``run`` in a thread while another transaction holds the job's row (as an operator's
    cancel does before it appends its event): what it returned, the sessions that waited for a
    lock, and whether every lane was free meanwhile (none held by ``run`` as it waited)."""
    holder = create_engine(url)
    outcome: list[Any] = []
    worker = threading.Thread(target=lambda: outcome.append(run()))
    try:
        with holder.connect() as other:
            other.execute(
                text("SELECT id FROM push_jobs WHERE id = :id FOR UPDATE"), {"id": job_id}
            )
            worker.start()
            waiting = lock_waiters(url, 10)
            chain_free = _lanes_free(other)
            other.rollback()
        worker.join(20)
    finally:
        worker.join(20)
        holder.dispose()
    return outcome, waiting, chain_free


@pytest.mark.parametrize("step", STEP_NAMES)
def test_a_record_transaction_waiting_for_the_job_row_holds_no_lane_lock(
    postgres_url: str, step: str
) -> None:
    job_id = _queued_job()
    acting, locked = threading.Event(), threading.Event()

    def act_then_wait(action: Action) -> Action:
        def act(ctx: StepContext) -> StepResult:
            acting.set()
            assert locked.wait(10)
            return action(ctx)

        return act

    world = FakeWorld(images={SOURCE: "sha256:image1"})
    runner, _ = fake_runner(world, Settings.from_env(), wrap_action(step, act_then_wait))
    for earlier in STEP_NAMES[: STEP_NAMES.index(step)]:
        assert runner.run(earlier, job_id, 5).action == "continue"

    outcome: list[Any] = []
    worker = threading.Thread(target=lambda: outcome.append(runner.run(step, job_id, 5)))
    worker.start()
    holder = create_engine(postgres_url)
    try:
        assert acting.wait(10)
        with holder.connect() as other:
            # Another transaction holds the job row, as an operator's cancel does before it
            # appends its event.
            other.execute(
                text("SELECT id FROM push_jobs WHERE id = :id FOR UPDATE"), {"id": job_id}
            )
            locked.set()
            # Only the last step's record transaction changes the job row and so waits here;
            # while it waits, it must not be holding any lane (the job's, a registry's).
            waiting = lock_waiters(postgres_url, 10 if step == STEP_NAMES[-1] else 1)
            chain_free = _lanes_free(other)
            other.rollback()
        worker.join(20)
    finally:
        locked.set()
        worker.join(20)
        holder.dispose()
    assert chain_free is True, f"a lane's lock was held while waiting (waiters: {waiting})"
    assert outcome and outcome[0].action == ("stop" if step == STEP_NAMES[-1] else "continue")
    if step == STEP_NAMES[-1]:
        assert waiting, "the last step's record transaction changes the job row"
        with session_scope() as session:
            finished = session.get(PushJob, job_id)
            assert finished is not None and finished.status == "succeeded"
    assert verify().ok


@pytest.mark.parametrize("step", STEP_NAMES)
def test_a_first_claim_waiting_for_the_job_row_holds_no_lane_lock(
    postgres_url: str, step: str
) -> None:
    """A step's first claim marks the job running and appends ``step.started`` in one statement:
    waiting for the job row an operator holds, it holds no lane yet (the job's row is changed
    before the append), and it goes on once the row is free."""
    job_id = _queued_job()
    world = FakeWorld(images={SOURCE: "sha256:image1"})
    runner, _ = fake_runner(world, Settings.from_env())
    for earlier in STEP_NAMES[: STEP_NAMES.index(step)]:
        assert runner.run(earlier, job_id, 5).action == "continue"
    outcome, waiting, chain_free = _run_while_the_job_row_is_held(
        postgres_url, job_id, lambda: runner.run(step, job_id, 5)
    )
    assert waiting, "the claim waits for the job row"
    assert chain_free is True, f"a lane's lock was held while waiting (waiters: {waiting})"
    assert outcome and outcome[0].action == ("stop" if step == STEP_NAMES[-1] else "continue")
    with session_scope() as session:
        types = [e.type for e in select_events(session, job_id=job_id)]
    assert types[-2:] == ["step.started", "step.succeeded"] or types[-1] == "job.succeeded"
    assert verify().ok


def test_a_retried_job_ending_by_its_earlier_push_holds_no_lane_lock_while_it_waits(
    postgres_url: str,
) -> None:
    """A job cancelled while its push ran, then retried, ends succeeded by that push (every
    step skipped as done): the delivery that marks it waits for the job row an operator holds
    without holding a lane (the row is changed before the skip and the success are appended)."""
    job_id = _queued_job()

    world = FakeWorld(images={SOURCE: "sha256:image1"})
    cancelling = wrap_action("push", cancelled_while_acting(job_id))
    runner, _ = fake_runner(world, Settings.from_env(), cancelling)
    for name in STEP_NAMES:
        runner.run(name, job_id, 5)
    with session_scope() as session:
        retry_job(session, job_id, actor="operator:tester", reason="the right tag after all")
    plain, _ = fake_runner(world, Settings.from_env())
    for name in STEP_NAMES[:-1]:
        assert plain.run(name, job_id, 5).action == "continue"
    outcome, waiting, chain_free = _run_while_the_job_row_is_held(
        postgres_url, job_id, lambda: plain.run("push", job_id, 5)
    )
    assert waiting, "marking the job succeeded waits for its row"
    assert chain_free is True, f"a lane's lock was held while waiting (waiters: {waiting})"
    assert outcome and (outcome[0].action, outcome[0].finished) == ("stop", True)
    with session_scope() as session:
        types = [e.type for e in select_events(session, job_id=job_id)]
    assert types[-2:] == ["step.skipped", "job.succeeded"]
    assert world.pushes == ["reg.example.com/team/app:v1"]
    assert verify().ok


def test_a_deadlock_the_database_breaks_is_a_retryable_conflict(postgres_url: str) -> None:
    """Two transactions that lock two rows in opposite orders: PostgreSQL aborts one of them,
    which surfaces as ``EventConflict`` (retryable, nothing written), not a raw driver error."""
    with session_scope() as session:
        for rid in (1, 2):
            spec = RegistrySpec(
                name=f"r{rid}", url=f"https://r{rid}.example.com", username="u", secret="pw"
            )
            create_registry(session, spec, registry_id=rid)
    both_hold_one = threading.Barrier(2)
    results: list[object] = []

    def lock_in_order(first: int, second: int) -> None:
        touch = text("UPDATE registries SET name = name WHERE id = :id")
        try:
            with session_scope() as session:
                session.execute(touch, {"id": first})
                both_hold_one.wait(10)
                session.execute(touch, {"id": second})
            results.append("committed")
        except EventConflict as exc:
            results.append(exc)

    threads = [threading.Thread(target=lock_in_order, args=order) for order in ((1, 2), (2, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(type(r).__name__ for r in results) == ["EventConflict", "str"]
    conflict = next(r for r in results if isinstance(r, EventConflict))
    assert conflict.retryable and "try again" in str(conflict)
