"""Flow control's slot covers the push's upload and nothing else: asked for before the step's
claim, taken after the claim has committed and the image was inspected, released as soon as the
engine's push returns (before the digest check and before the outcome is recorded), and never
left held on any way out. The real pipeline and a real Redis (as in test_flow.py), fakes of
Docker and the registry that write down when they are called."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import sqlite3
import time
from datetime import timedelta
from typing import Any, cast

import pytest

import worker.engine.pipeline as pipeline
from tests.support.fakes import FakeEngine, FakeHttp, FakeWorld
from tests.unit.test_flow import HOST, SOURCE, _job, _runner, _types, registry_5, state
from worker.core.credentials import Credential
from worker.core.errors import DatabaseUnavailable, RegistryThrottled, RegistryUnavailable
from worker.core.reference import TargetReference
from worker.core.settings import get_settings
from worker.engine.flow import FlowControl
from worker.engine.pipeline import Outcome, StepRunner
from worker.jobs import cancel_job
from worker.seams.docker_engine import LocalImage, ProgressCallback, PushResult
from worker.seams.limiter import RESERVED, RedisFlowState, SlotGrant
from worker.seams.registry_http import RegistryEndpoint
from worker.store.db import engine_for, read_scope, reader_for, session_scope
from worker.store.models import PushJob, StepRun, utcnow
from worker.store.queries import select_events

pytestmark = pytest.mark.redis

__all__ = ["registry_5", "state"]  # fixtures, used by name

Log = list[tuple[Any, ...]]


def _recorded(job_id: str, step: str, type_: str) -> bool:
    """Whether ``type_`` of ``step`` is committed: read on a connection of its own (a reader's,
    which never waits for the write lock), which sees only what other transactions committed."""
    with read_scope() as session:
        rows = select_events(session, job_id=job_id, types=[type_])
        return any(row.step == step for row in rows)


def _write_locked() -> bool:
    """Whether some transaction holds SQLite's write lock now (as every write transaction of
    the worker does from its start): another connection cannot begin one at once."""
    path = get_settings().database_url.removeprefix("sqlite:///")
    connection = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError:
        return True
    finally:
        connection.close()  # closing rolls the empty transaction back
    return False


class RecordingState(RedisFlowState):
    """The real Redis state; each ask, take and release written down, with whether the push's
    claim (``step.started``) and its outcome (``step.succeeded``) were committed by then."""

    def __init__(self, url: str, log: Log, job_id: str) -> None:
        super().__init__(url)
        self.log, self.job_id = log, job_id

    def acquire(self, *args: Any, **kwargs: Any) -> SlotGrant:
        grant = super().acquire(*args, **kwargs)
        if kwargs.get("take", True):
            self.log.append(("take", _recorded(self.job_id, "push", "step.started")))
        else:
            self.log.append(("ask", _recorded(self.job_id, "push", "step.started")))
            self.log.append(("write lock held", _write_locked()))
        return grant

    def forget_waiter(self, registry_id: int, waiter: str) -> None:
        self.log.append(("forget", _write_locked()))
        super().forget_waiter(registry_id, waiter)

    def hand_over(self, registry_id: int, holder: str, *args: Any, **kwargs: Any) -> list[str]:
        self._released(holder)
        return super().hand_over(registry_id, holder, *args, **kwargs)

    def release(self, registry_id: int, holder: str) -> None:
        self._released(holder)
        super().release(registry_id, holder)

    def _released(self, holder: str) -> None:
        if holder:  # "" only hands free slots over (a step that never asked)
            self.log.append(("release", _recorded(self.job_id, "push", "step.succeeded")))


class RecordingEngine(FakeEngine):
    def __init__(self, world: FakeWorld, log: Log) -> None:
        super().__init__(world)
        self.log = log
        #: Called in place of the push when set (to fail it, or to block it).
        self.instead: Any = None
        #: Called when the image is inspected (a test takes the slot there).
        self.on_inspect: Any = None

    def image(self, reference: str) -> LocalImage | None:
        self.log.append(("inspect",))
        if self.on_inspect is not None:
            self.on_inspect()
        return super().image(reference)

    def push(
        self,
        target: TargetReference,
        credential: Credential | None,
        on_progress: ProgressCallback | None = None,
    ) -> PushResult:
        self.log.append(("push",))
        if self.instead is not None:
            self.instead()
        return super().push(target, credential, on_progress)


class RecordingHttp(FakeHttp):
    def __init__(self, world: FakeWorld, registry: RegistryEndpoint, log: Log) -> None:
        super().__init__(world, registry)
        self.log = log
        self.answer: Any = None

    def manifest_digest(self, repository: str, tag: str) -> str | None:
        self.log.append(("head",))
        if self.answer is not None:
            return str(self.answer())
        return super().manifest_digest(repository, tag)


def _recording_runner(
    state: RedisFlowState, job_id: str
) -> tuple[StepRunner, RecordingState, RecordingEngine, RecordingHttp, Log]:
    """A runner whose Redis state, engine and registry write down what happens, in order; the
    job's first three steps done, nothing written down yet."""
    world = FakeWorld(images={SOURCE: "sha256:image1"})
    runner, _ = _runner(world, state)
    log: Log = []
    recording = RecordingState(state.url, log, job_id)
    runner.flow = FlowControl(recording, runner.settings)
    engine = RecordingEngine(world, log)
    http = RecordingHttp(world, RegistryEndpoint(id=5, url=f"https://{HOST}", host=HOST), log)
    runner.engine_factory = lambda: engine
    runner.http_factory = lambda _registry, _credential, _timeout: http
    for step in ("resolve_credentials", "login", "tag"):
        assert runner.run(step, job_id, 5).action == "continue"
    log.clear()
    return runner, recording, engine, http, log


def _held(state: RedisFlowState) -> list[bytes]:
    """Every member of registry 5's slots (holders and reservations), expired or not."""
    import redis

    members = redis.Redis.from_url(state.url).zrange("pushworker:flow:5:slots", 0, -1)
    return list(cast(list[bytes], members))


def test_the_slot_is_taken_after_the_claim_commits_and_freed_before_the_digest_check(
    registry_5: None, state: RedisFlowState
) -> None:
    """The order a push goes through: asked before its claim (step.started not yet written),
    the image inspected, the slot taken with the claim already committed, the upload, the slot
    released before the digest check and before step.succeeded is written."""
    job_id = _job()
    runner, _, _, _, log = _recording_runner(state, job_id)
    assert runner.run("push", job_id, 5).action == "stop"
    assert log == [
        ("ask", False),  # before the claim: no step.started yet
        ("write lock held", False),  # Redis is not waited for inside a write transaction
        ("inspect",),
        ("take", True),  # the claim's transaction committed before the slot was taken
        ("push",),
        ("release", False),  # the outcome not recorded yet
        ("head",),  # the digest check, with the slot already free
    ]
    assert _types(job_id)[-2:] == ["step.succeeded", "job.succeeded"]
    assert _held(state) == []


def test_a_tag_the_registry_serves_already_takes_no_slot_and_gives_its_place_on(
    registry_5: None, state: RedisFlowState
) -> None:
    """A push the registry needs nothing for (it serves the tag at the image's digest) never
    takes a slot; a slot kept for it goes on to the next waiter at once."""
    first, second = _job(), _job()  # the same target: the second finds it served
    runner, _, _, _, log = _recording_runner(state, first)
    assert runner.run("push", first, 5).action == "stop"
    for step in ("resolve_credentials", "login", "tag"):
        assert runner.run(step, second, 5).action == "continue"
    waiter = _job()
    for step in ("resolve_credentials", "login", "tag"):
        assert runner.run(step, waiter, 5).action == "continue"
    assert runner.flow is not None
    handed: list[tuple[str, str, int, str]] = []
    runner.flow.wake = lambda *args: handed.append(args)
    assert state.acquire(5, "other", "other-job", 1, lease=30, waiter_ttl=30).granted
    assert runner.run("push", second, 5).action == "retry"
    assert runner.run("push", waiter, 5).action == "retry"
    runner.flow.release(_registry_row(), "other")  # reserved for the second job
    assert _held(state) == [f"{RESERVED}{second}:push".encode()]
    log.clear()
    outcome = runner.run("push", second, 5, message_id="flow-wake-1")
    assert outcome.action == "stop"
    assert _types(second)[-2:] == ["step.skipped", "job.succeeded"]
    assert ("take", True) not in log and ("push",) not in log
    # Its reservation went on to the next waiter at once, not after its lease.
    assert [job for job, *_ in handed] == [second, waiter]
    assert _held(state) == [f"{RESERVED}{waiter}:push".encode()]


def _registry_row() -> Any:
    from worker.store.models import Registry

    return Registry(id=5, name="r5", url=f"https://{HOST}", host=HOST, max_concurrent=1)


def _crash() -> None:
    raise RuntimeError("the engine's client broke")


def _unreachable() -> None:
    raise RegistryUnavailable("registry unreachable: connection refused")


def _throttled() -> None:
    raise RegistryThrottled("429 too many requests", retry_after=0.0)


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("push fails", "step.failed"),
        ("push throttled", "step.failed"),
        ("push crashes", "step.failed"),
        ("digest differs", "step.failed"),
        ("digest check unreachable", "step.failed"),
        ("outcome not recorded", None),
    ],
)
def test_no_way_out_of_a_push_leaves_its_slot_held(
    registry_5: None,
    state: RedisFlowState,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    expected: str | None,
) -> None:
    """Whatever fails, in the upload or after the slot was released early (the digest check,
    recording the outcome), the registry's slot is free afterwards: another holder takes it at
    once (cap 1), with no lease to wait for."""
    job_id = _job()
    runner, _, engine, http, log = _recording_runner(state, job_id)
    if where == "push fails":
        engine.instead = _unreachable
    elif where == "push throttled":
        engine.instead = _throttled
    elif where == "push crashes":
        engine.instead = _crash
    elif where == "digest differs":
        http.answer = lambda: "sha256:" + "0" * 64
    elif where == "digest check unreachable":
        http.answer = _unreachable
    if where == "outcome not recorded":

        def unrecorded(*_args: object) -> Outcome:
            raise DatabaseUnavailable("the database went away")

        monkeypatch.setattr(runner, "_record_success", unrecorded)
        with pytest.raises(DatabaseUnavailable):
            runner.run("push", job_id, 5)
    else:
        runner.run("push", job_id, 5)
    assert ("take", True) in log and ("release", False) in log
    if where.startswith("digest"):
        assert log.index(("release", False)) < log.index(("head",))  # freed before the check
    if expected is not None:
        assert expected in _types(job_id)[-2:]
    assert _held(state) == []
    assert state.acquire(5, "next", "next-job", 1, lease=30, waiter_ttl=30).granted


def test_a_poll_that_only_waits_again_writes_nothing(
    registry_5: None, state: RedisFlowState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push refused a slot records its wait once; its next polls, refused again, open no
    write transaction at all (a read, and Redis asked outside any lock)."""
    job_id = _job()
    runner, _, _, _, _ = _recording_runner(state, job_id)
    assert state.acquire(5, "other", "other-job", 1, lease=30, waiter_ttl=30).granted
    assert runner.run("push", job_id, 5).action == "retry"
    assert _types(job_id)[-1] == "step.waiting"
    writes: list[str] = []
    original = session_scope

    def counted(*args: Any, **kwargs: Any) -> Any:
        writes.append("write transaction")
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "session_scope", counted)
    for _ in range(3):
        assert runner.run("push", job_id, 5).action == "retry"
    assert writes == []
    assert _types(job_id).count("step.waiting") == 1


def test_a_delivery_of_a_push_done_already_leaves_the_queue_after_its_skip_is_committed(
    registry_5: None, state: RedisFlowState
) -> None:
    """A waiter's own message, due after its push ran elsewhere, records its skip and leaves
    the registry's queue; Redis is told with no write transaction open."""
    job_id = _job()
    runner, _, _, _, log = _recording_runner(state, job_id)
    assert runner.run("push", job_id, 5).action == "stop"
    log.clear()
    assert runner.run("push", job_id, 5).action == "stop"
    assert _types(job_id)[-1] == "step.skipped"
    assert ("forget", False) in log and ("forget", True) not in log


def test_a_slot_taken_between_the_claim_and_the_upload_gives_the_claim_back(
    registry_5: None, state: RedisFlowState
) -> None:
    """The slot was free when asked, and another worker takes it while this step claims and
    inspects: the step pushes nothing, gives its claim back (its try does not count), records
    the wait after its step.started and waits in the queue; once the slot is free again its
    push runs as try 1."""
    job_id = _job()
    runner, _, engine, _, log = _recording_runner(state, job_id)
    engine.on_inspect = lambda: state.acquire(5, "other", "other-job", 1, lease=30, waiter_ttl=30)
    outcome = runner.run("push", job_id, 5)
    assert outcome.action == "retry" and outcome.reason.startswith("waiting: registry 5")
    assert ("push",) not in log
    assert _types(job_id)[-2:] == ["step.started", "step.waiting"]
    with session_scope() as session:
        waited = select_events(session, job_id=job_id, types=["step.waiting"])[-1]
        assert waited.attempt == 1
        assert waited.payload["reason"].endswith("try 1 given back, not counted")
        run = session.get(StepRun, (job_id, "push", 5))
        assert run is not None and (run.status, run.attempts) == ("failed", 0)
    assert _held(state) == [b"other"]  # nothing of this step's
    engine.on_inspect = None
    state.release(5, "other")
    assert runner.run("push", job_id, 5).action == "stop"
    with session_scope() as session:
        started = select_events(session, job_id=job_id, types=["step.started"])
        assert [e.attempt for e in started if e.step == "push"] == [1, 1]
    assert _types(job_id)[-1] == "job.succeeded"
    assert _held(state) == []


@pytest.mark.parametrize("deadline_passed", [False, True])
def test_a_slot_taken_after_a_cancel_gives_the_claim_back_and_stops(
    registry_5: None, state: RedisFlowState, deadline_passed: bool
) -> None:
    """As above, but the operator cancels the job while the step inspects (and, in one case,
    the job's deadline has passed by then): the claim is given back and the step stops there,
    its try closed by a skip, and it leaves the registry's queue once that is committed. It
    neither waits nor fails the job over the cancel (past the deadline that used to end in a
    conflict raised on every try)."""
    job_id = _job()
    runner, _, engine, _, log = _recording_runner(state, job_id)

    def cancelled_and_taken() -> None:
        with session_scope() as session:
            cancel_job(session, job_id, actor="operator:tester", reason="wrong tag")
            if deadline_passed:
                job = session.get(PushJob, job_id)
                assert job is not None
                job.deadline_at = utcnow() - timedelta(seconds=5)
        state.acquire(5, "other", "other-job", 1, lease=30, waiter_ttl=30)

    engine.on_inspect = cancelled_and_taken
    outcome = runner.run("push", job_id, 5)
    assert (outcome.action, outcome.reason) == ("stop", "job cancelled")
    assert ("push",) not in log
    assert _types(job_id)[-3:] == ["step.started", "job.cancelled", "step.skipped"]
    with session_scope() as session:
        skipped = select_events(session, job_id=job_id, types=["step.skipped"])[-1]
        assert skipped.attempt == 1 and skipped.payload["reason"].endswith("try 1 given back")
        run = session.get(StepRun, (job_id, "push", 5))
        assert run is not None and (run.status, run.attempts) == ("failed", 0)
        job = session.get(PushJob, job_id)
        assert job is not None and (job.status, job.error_code) == ("cancelled", None)
    assert _held(state) == [b"other"]  # nothing of this step's in the slots
    # Out of the queue, with no write transaction open (Redis is not waited for under it).
    assert ("forget", False) in log and ("forget", True) not in log


def _push_until_killed(ready: Any, job_id: str) -> None:
    """In a child process: the push step, whose upload blocks until the process is killed."""
    engine_for.cache_clear()  # the parent's connections are not this process's
    reader_for.cache_clear()
    state = RedisFlowState(_url())
    world = FakeWorld(images={SOURCE: "sha256:image1"})
    runner, _ = _runner(world, state)
    assert runner.flow is not None
    runner.flow.settings = dataclasses.replace(runner.flow.settings, flow_lease=1.0)
    engine = RecordingEngine(world, [])

    def block() -> None:
        ready.set()
        time.sleep(3600)

    engine.instead = block
    runner.engine_factory = lambda: engine
    runner.run("push", job_id, 5)


def _url() -> str:
    from tests.unit.test_flow import REDIS_URL

    return REDIS_URL


def test_a_slot_held_by_a_process_killed_in_its_upload_frees_by_its_lease(
    registry_5: None, state: RedisFlowState
) -> None:
    """A worker process SIGKILLed during its upload releases nothing: its slot stays held
    (cap 1: another is refused) until its lease runs out, then it is free. Never leaked."""
    job_id = _job()
    runner, _ = _runner(FakeWorld(images={SOURCE: "sha256:image1"}), state)
    for step in ("resolve_credentials", "login", "tag"):
        assert runner.run(step, job_id, 5).action == "continue"
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    child = context.Process(target=_push_until_killed, args=(ready, job_id))
    child.start()
    try:
        assert ready.wait(30), "the child's upload never started"
        assert len(_held(state)) == 1
        os.kill(child.pid or 0, signal.SIGKILL)
        child.join(10)
        assert not state.acquire(5, "next", "next-job", 1, lease=30, waiter_ttl=30).granted
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and state.holders(5) > 0:
            time.sleep(0.1)
        assert state.acquire(5, "next2", "next-job-2", 1, lease=30, waiter_ttl=30).granted
    finally:
        if child.is_alive():
            child.kill()
            child.join(5)


def test_a_step_that_fails_before_its_upload_leaves_no_place_and_no_slot(
    registry_5: None, state: RedisFlowState
) -> None:
    """A push that fails before it asks for its slot (its source image is gone) holds no slot,
    and a slot kept for it goes on rather than idling until its reservation ends."""
    job_id, waiter = _job(), _job()
    runner, _, engine, _, log = _recording_runner(state, job_id)
    for step in ("resolve_credentials", "login", "tag"):
        assert runner.run(step, waiter, 5).action == "continue"
    assert runner.flow is not None
    handed: list[tuple[str, str, int, str]] = []
    runner.flow.wake = lambda *args: handed.append(args)
    assert state.acquire(5, "other", "other-job", 1, lease=30, waiter_ttl=30).granted
    assert runner.run("push", job_id, 5).action == "retry"
    assert runner.run("push", waiter, 5).action == "retry"
    runner.flow.release(_registry_row(), "other")
    assert [job for job, *_ in handed] == [job_id]
    del engine.world.images[SOURCE]
    log.clear()
    runner.run("push", job_id, 5, message_id="flow-wake-2")
    assert ("take", True) not in log
    assert _types(job_id)[-1] == "job.failed"
    assert [job for job, *_ in handed] == [job_id, waiter]
    assert _held(state) == [f"{RESERVED}{waiter}:push".encode()]
