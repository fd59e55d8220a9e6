"""Flow control: the Redis slot limiter (its Lua scripts run by a real Redis, database 14:
fakeredis cannot run Lua without ``lupa``, which is not installed) and the engine's policy
(waiting, deadline, AIMD) through the real pipeline with fake Docker and registry seams."""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.fakes import FakeWorld, InlineDispatcher, fake_runner
from worker.core.errors import (
    FlowStateUnavailable,
    PushVerificationFailed,
    RegistryThrottled,
    RegistryUnavailable,
)
from worker.core.settings import Settings
from worker.engine.flow import WAKE_PREFIX, FlowControl
from worker.engine.pipeline import StepRunner
from worker.jobs import PushRequest, create_job
from worker.registries import RegistrySpec, create_registry
from worker.seams.limiter import RESERVED, RedisFlowState, rate_item
from worker.store.db import session_scope
from worker.store.models import PushJob, Registry, utcnow
from worker.store.queries import select_events

pytestmark = pytest.mark.redis

# A stock Redis has databases 0-15; 14 is this file's alone (e2e uses 11 and 12, benches 7).
REDIS_DB = int(os.environ.get("PUSHWORKER_TEST_FLOW_REDIS_DB", "14"))
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
HOST = "reg.example.com:10443"
SOURCE = "app:build"


@pytest.fixture
def state() -> Iterator[RedisFlowState]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield RedisFlowState(REDIS_URL)
    client.flushdb()


# --- the limiter -------------------------------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.integers(0, 7)),
        st.tuples(st.just("wake"), st.integers(0, 7)),
        st.tuples(st.just("release"), st.integers(0, 7)),
        st.tuples(st.just("hand_over"), st.integers(0, 7)),
        st.tuples(st.just("renew"), st.integers(0, 7)),
        st.tuples(st.just("advance"), st.floats(0.0, 15.0)),
    ),
    max_size=60,
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cap=st.integers(1, 4), ops=OPS)
def test_never_more_than_the_cap_under_any_interleaving_and_lease_expiry(
    state: RedisFlowState, cap: int, ops: list[tuple[str, float]]
) -> None:
    """A model of leases, reservations and the queue decides every answer: granted exactly when
    the holder holds a slot, a slot is reserved for it, or one is free; a hand-over reserves
    free slots for the first waiters in the order they were first refused; a wake message never
    joins the queue; a reservation not taken by its lease's end frees the slot and drops its
    waiter; renewed only while alive; never more than ``cap`` holders, reservations included."""
    redis.Redis.from_url(REDIS_URL).flushdb()
    lease, reservation, now = 10.0, 3.0, 1_000_000.0
    alive: dict[str, float] = {}  # holder or "reserved:<waiter>" -> lease expiry
    queue: dict[str, float] = {}  # waiter -> first refusal
    for op, arg in ops:
        holder = f"h{int(arg)}"
        for member in [m for m, until in alive.items() if until <= now]:
            del alive[member]
            if member.startswith(RESERVED):
                queue.pop(member.removeprefix(RESERVED), None)
        if op in ("acquire", "wake"):
            wake = op == "wake"
            grant = state.acquire(7, holder, holder, cap, lease=lease, waiter_ttl=1e12, now=now,
                                  wake=wake)  # fmt: skip
            kept = RESERVED + holder in alive
            expected = holder in alive or kept or len(alive) < cap
            assert grant.granted == expected
            if grant.granted:
                alive.pop(RESERVED + holder, None)
                alive[holder] = now + lease
                queue.pop(holder, None)
            elif not wake:
                assert grant.first_refusal == (holder not in queue)
                queue.setdefault(holder, now)
                order = sorted(queue, key=lambda w: (queue[w], w))
                assert grant.ahead == order.index(holder)
            assert grant.holders == len(alive)
        elif op == "release":
            state.release(7, holder)
            alive.pop(holder, None)
        elif op == "hand_over":
            reserved = state.hand_over(
                7, holder, cap, reservation=reservation, waiter_ttl=1e12, most=2, now=now
            )
            alive.pop(holder, None)
            expected_reserved: list[str] = []
            for waiter in sorted(queue, key=lambda w: (queue[w], w)):
                if len(expected_reserved) >= 2 or len(alive) >= cap:
                    break
                if RESERVED + waiter not in alive:
                    alive[RESERVED + waiter] = now + reservation
                    expected_reserved.append(waiter)
            assert reserved == expected_reserved
        elif op == "renew":
            renewed = state.renew(7, holder, lease=lease, now=now)
            assert renewed == (holder in alive)
            if renewed:
                alive[holder] = now + lease
        else:
            now += arg
        assert len(alive) <= cap
        assert state.holders(7, now=now) == len({h for h, u in alive.items() if u > now})


def test_a_dead_holders_slot_frees_by_lease(state: RedisFlowState) -> None:
    t = 5_000.0
    assert state.acquire(1, "dead", "w-dead", 1, lease=30, waiter_ttl=30, now=t).granted
    assert not state.acquire(1, "next", "w-next", 1, lease=30, waiter_ttl=30, now=t + 29).granted
    assert state.acquire(1, "next", "w-next", 1, lease=30, waiter_ttl=30, now=t + 30.5).granted


def test_waiters_are_counted_in_order_and_a_wait_is_first_once(state: RedisFlowState) -> None:
    t = 9_000.0
    assert state.acquire(2, "a", "job-a", 1, lease=30, waiter_ttl=30, now=t).granted
    b1 = state.acquire(2, "b", "job-b", 1, lease=30, waiter_ttl=30, now=t + 1)
    c1 = state.acquire(2, "c", "job-c", 1, lease=30, waiter_ttl=30, now=t + 2)
    b2 = state.acquire(2, "b2", "job-b", 1, lease=30, waiter_ttl=30, now=t + 3)
    assert (b1.granted, b1.ahead, b1.first_refusal) == (False, 0, True)
    assert (c1.ahead, c1.first_refusal) == (1, True)
    assert (b2.ahead, b2.first_refusal) == (0, False)
    # b stops asking: after the waiters' ttl it no longer counts ahead of c
    c2 = state.acquire(2, "c", "job-c", 1, lease=60, waiter_ttl=20, now=t + 29)
    assert (c2.granted, c2.ahead) == (False, 0)


def test_a_released_slot_is_reserved_for_the_first_waiter(state: RedisFlowState) -> None:
    """hand_over gives the freed slot to the head of the queue: a newcomer and a later waiter are
    refused while the reservation stands, the first waiter's message takes it (a wake message
    included); a wake message with no slot for it does not join the queue."""
    t = 20_000.0

    def ask(holder: str, waiter: str, at: float, wake: bool = False) -> tuple[bool, int]:
        grant = state.acquire(4, holder, waiter, 1, lease=30, waiter_ttl=60, now=at, wake=wake)
        return grant.granted, grant.ahead

    assert ask("a", "job-a:push", t) == (True, 0)
    assert ask("b", "job-b:push", t + 1) == (False, 0)
    assert ask("c", "job-c:push", t + 2) == (False, 1)
    # A wake message for d (no reservation, no free slot) is refused and does not queue.
    assert ask("d", "job-d:push", t + 2.5, wake=True) == (False, 0)
    assert state.hand_over(4, "a", 1, reservation=3, waiter_ttl=60, now=t + 3) == ["job-b:push"]
    assert state.holders(4, now=t + 3) == 1  # the reservation counts: the cap holds
    assert ask("new", "job-new:push", t + 3.1) == (False, 2)  # queues behind b and c
    assert ask("c2", "job-c:push", t + 3.2) == (False, 1)  # the slot is kept for b
    assert ask("b-wake", "job-b:push", t + 3.3, wake=True) == (True, 0)
    assert state.holders(4, now=t + 3.3) == 1
    # b's own (polling) message would have taken it too; now it finds the slot taken by b.
    assert state.hand_over(4, "b-wake", 1, reservation=3, waiter_ttl=60, now=t + 4) == [
        "job-c:push"
    ]
    assert ask("c3", "job-c:push", t + 4.1) == (True, 0)  # the waiter's own message
    state.forget_waiter(4, "job-new:push")
    assert state.hand_over(4, "c3", 1, reservation=3, waiter_ttl=60, now=t + 5) == []


def test_an_untaken_reservation_frees_the_slot_and_drops_its_waiter(
    state: RedisFlowState,
) -> None:
    t = 30_000.0
    assert state.acquire(5, "a", "job-a:push", 1, lease=30, waiter_ttl=60, now=t).granted
    assert not state.acquire(5, "b", "job-b:push", 1, lease=30, waiter_ttl=60, now=t).granted
    assert not state.acquire(5, "c", "job-c:push", 1, lease=30, waiter_ttl=60, now=t + 1).granted
    assert state.hand_over(5, "a", 1, reservation=3, waiter_ttl=60, now=t + 2) == ["job-b:push"]
    # b never comes (its job was cancelled, its wake message lost): after 3 s the slot is free
    # and b no longer heads the queue, c does.
    late = state.acquire(5, "c2", "job-c:push", 1, lease=30, waiter_ttl=60, now=t + 5.5)
    assert late.granted
    assert state.hand_over(5, "c2", 1, reservation=3, waiter_ttl=60, now=t + 6) == []


def test_a_waiter_polling_at_its_longest_countdown_keeps_its_place(state: RedisFlowState) -> None:
    """The fallback countdown of the queue's tail is long; the waiter must still count as live
    when it asks again (else it loses its place and records a second step.waiting)."""
    flow = FlowControl(state, Settings.from_env(), rng=_MaxJitter())
    longest = flow._poll(ahead=10_000, limit=1)
    ttl = flow._waiter_ttl()
    t = 40_000.0
    assert state.acquire(6, "a", "job-a:push", 1, lease=1e6, waiter_ttl=ttl, now=t).granted
    first = state.acquire(6, "b", "job-b:push", 1, lease=1e6, waiter_ttl=ttl, now=t + 1)
    again = state.acquire(6, "b2", "job-b:push", 1, lease=1e6, waiter_ttl=ttl, now=t + 1 + longest)
    assert first.first_refusal and not again.first_refusal


class _MaxJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return max(a, b)


def test_a_rate_wait_is_first_once(state: RedisFlowState) -> None:
    assert state.first_rate_wait(6, "job-a:push", ttl=10)
    assert not state.first_rate_wait(6, "job-a:push", ttl=10)
    assert state.first_rate_wait(6, "job-b:push", ttl=10)


def test_rate_items() -> None:
    assert (rate_item(10).amount, rate_item(10).multiples) == (10, 1)
    assert (rate_item(0.5).amount, rate_item(0.5).multiples) == (1, 2)
    assert (rate_item(2.7).amount, rate_item(2.7).multiples) == (2, 1)


def test_the_rate_refuses_the_request_over_it_and_says_how_long(state: RedisFlowState) -> None:
    assert state.take_request(3, 2) == 0.0
    assert state.take_request(3, 2) == 0.0
    wait = state.take_request(3, 2)
    assert 0 < wait <= 1.0


# --- AIMD --------------------------------------------------------------------------------------


def _registry(max_concurrent: int | None) -> Registry:
    return Registry(
        id=11, name="r", url=f"https://{HOST}", host=HOST, max_concurrent=max_concurrent
    )


def test_a_429_halves_the_limit_and_successes_raise_it_back(state: RedisFlowState) -> None:
    clock = [100.0]
    flow = FlowControl(state, Settings.from_env(), clock=lambda: clock[0])
    registry = _registry(8)
    assert flow.limit(registry) == 8
    for holder in "abcdefgh":  # 8 pushes running when the registry answers 429
        assert state.acquire(11, holder, holder, 8, lease=60, waiter_ttl=30).granted
    down = flow.on_throttled(registry, "429")
    assert down is not None and (down.previous_limit, down.limit) == (8, 4)
    # a second 429 right after (in flight at the old limit) does not lower it again
    assert flow.on_throttled(registry, "429") is None
    assert flow.limit(registry) == 4
    for holder in "abcdefgh":
        state.release(11, holder)
    assert flow.on_success(registry) is None  # no push in flight: the limit was not met
    assert flow.limit(registry) == 4
    for holder in "abcdefgh":  # demand enough to fill any limit up to the cap
        assert state.acquire(11, holder, holder, 8, lease=60, waiter_ttl=30).granted
    changes = []
    successes = 0
    while state.adaptive_cap(registry.id) is not None:
        successes += 1
        change = flow.on_success(registry)
        if change is not None:
            changes.append((change.type, change.previous_limit, change.limit))
    assert changes == [
        ("registry.unthrottled", 4, 5),
        ("registry.unthrottled", 5, 6),
        ("registry.unthrottled", 6, 7),
        ("registry.unthrottled", 7, 8),
    ]
    assert state.adaptive_cap(registry.id) is None  # back at its configured cap: no state left
    # one step per "limit" successes (4 + 5 + 6), then 8 times slower below the refused 8 (7 * 8)
    assert 4 + 5 + 6 + 7 * 8 <= successes <= 4 + 5 + 6 + 7 * 8 + 1  # + 1: float rounding


def test_a_429_right_after_an_increase_still_lowers_the_limit(state: RedisFlowState) -> None:
    """The cooldown follows a decrease only: every success raises the cap a little, and a 429
    just after one must not be ignored (that would let the limit climb over the registry's)."""
    flow = FlowControl(state, Settings.from_env())
    registry = _registry(None)
    for holder in "abcdefgh":
        assert state.acquire(11, holder, holder, 1_000_000, lease=60, waiter_ttl=30).granted
    assert flow.on_throttled(registry, "429") is not None  # 8 refused: the limit is 4
    state.swap_cap(11, 4.0, 4.9)  # successes since raised it; the last decrease is recent
    assert flow.on_throttled(registry, "429") is None  # the cooldown after the decrease
    cap = state.adaptive_cap(11)
    assert cap is not None
    redis.Redis.from_url(REDIS_URL).hset(
        "pushworker:flow:11:aimd", "decreased_at", repr(cap.decreased_at - 60)
    )
    state.swap_cap(11, 4.9, 5.0)  # an increase just now: it does not restart the cooldown
    down = flow.on_throttled(registry, "429")
    assert down is not None and (down.previous_limit, down.limit) == (5, 2)


def test_an_uncapped_registry_is_capped_at_half_the_concurrency_it_refused(
    state: RedisFlowState,
) -> None:
    flow = FlowControl(state, Settings.from_env())
    registry = _registry(None)
    for holder in "abcdef":
        assert state.acquire(11, holder, holder, 1_000_000, lease=30, waiter_ttl=30).granted
    down = flow.on_throttled(registry, "429")
    assert down is not None and (down.previous_limit, down.limit) == (None, 3)


# --- through the pipeline ----------------------------------------------------------------------


@pytest.fixture
def registry_5(sqlite_url: str) -> None:
    with session_scope() as session:
        spec = RegistrySpec(name="r5", url=f"https://{HOST}", username="u", secret="pw")
        create_registry(session, spec, registry_id=5)
        row = session.get(Registry, 5)
        assert row is not None
        row.max_concurrent = 1


def _runner(
    world: FakeWorld, state: RedisFlowState, flow_poll: float = 1.0
) -> tuple[StepRunner, InlineDispatcher]:
    test_settings = dataclasses.replace(
        Settings.from_env(), max_attempts=2, retry_base=0.0, retry_max=0.0, flow_poll=flow_poll
    )
    runner, dispatcher = fake_runner(world, test_settings)
    runner.flow = FlowControl(state, test_settings)
    return runner, dispatcher


def _job() -> str:
    with session_scope() as session:
        job, _ = create_job(session, PushRequest(SOURCE, 5, "team/app", "v1", "t"), actor="t")
        return job.id


def _types(job_id: str) -> list[str]:
    with session_scope() as session:
        return [e.type for e in select_events(session, job_id=job_id)]


def test_a_push_without_a_slot_waits_without_a_try_then_runs(
    registry_5: None, state: RedisFlowState
) -> None:
    world = FakeWorld(images={SOURCE: "sha256:image1"})
    runner, _ = _runner(world, state)
    job_id = _job()
    for step in ("resolve_credentials", "login", "tag"):
        assert runner.run(step, job_id, 5).action == "continue"
    assert state.acquire(5, "other", "other-job", 1, lease=30, waiter_ttl=30).granted
    first = runner.run("push", job_id, 5)
    second = runner.run("push", job_id, 5)
    assert first.action == second.action == "retry"
    assert first.reason == "waiting: registry 5 at its limit of 1, 0 ahead"
    assert _types(job_id).count("step.waiting") == 1  # once per wait
    assert world.pushes == []
    state.release(5, "other")
    assert runner.run("push", job_id, 5).action == "stop"
    types = _types(job_id)
    assert types[-3:] == ["step.started", "step.succeeded", "job.succeeded"]
    assert types.count("step.started") == 4  # the waits were not tries
    assert state.holders(5) == 0  # the slot was released


def test_a_released_slot_goes_to_the_first_waiter_at_once(
    registry_5: None, state: RedisFlowState
) -> None:
    """A push that ends hands its slot over: reserved for the first waiter, whose step is
    published at once (here: recorded) under a wake message id; the next waiter polling is
    refused meanwhile; the wake message takes the slot and runs. A wake message that finds no
    slot for it stops quietly and does not queue; a retried delivery of it waits as usual."""
    world = FakeWorld(images={SOURCE: "sha256:image1"})
    runner, _ = _runner(world, state)
    woken: list[tuple[str, str, int, str]] = []
    assert runner.flow is not None
    runner.flow.wake = lambda *args: woken.append(args)
    registry = Registry(id=5, name="r5", url=f"https://{HOST}", host=HOST, max_concurrent=1)
    first, second = _job(), _job()
    for job_id in (first, second):
        for step in ("resolve_credentials", "login", "tag"):
            assert runner.run(step, job_id, 5).action == "continue"
    assert state.acquire(5, "other", "other-job", 1, lease=30, waiter_ttl=30).granted
    assert runner.run("push", second, 5).action == "retry"  # the first waiter
    assert runner.run("push", first, 5).action == "retry"  # the second one
    runner.flow.release(registry, "other")
    assert [(j, s, r) for j, s, r, _ in woken] == [(second, "push", 5)]
    assert woken[0][3].startswith(WAKE_PREFIX)
    # The slot is kept for the second job: the first one's poll is refused.
    assert runner.run("push", first, 5).action == "retry"
    assert world.pushes == []
    assert runner.run("push", second, 5, message_id=woken[0][3]).action == "stop"
    assert _types(second)[-1] == "job.succeeded"
    # Its release handed the slot to the first job, which its wake message takes.
    assert [(j, s) for j, s, _, _ in woken] == [(second, "push"), (first, "push")]
    assert runner.run("push", first, 5, message_id=woken[1][3]).action == "stop"
    assert _types(first)[-1] == "job.succeeded"
    assert _types(first).count("step.waiting") == 1  # once per wait
    assert state.holders(5) == 0
    # A wake message with no slot for it stops, with no event, no try and no place in the queue.
    assert state.acquire(5, "x", "other-job", 1, lease=30, waiter_ttl=30).granted
    third = _job()
    for step in ("resolve_credentials", "login", "tag"):
        assert runner.run(step, third, 5).action == "continue"
    before = _types(third)
    stray = WAKE_PREFIX + "stray"
    stopped = runner.run("push", third, 5, message_id=stray)
    assert stopped.action == "stop" and stopped.reason.startswith("woken, no slot free")
    assert _types(third) == before
    assert not state.acquire(5, "probe", "probe", 1, lease=30, waiter_ttl=30).ahead
    # A retried delivery (delivery_retries > 0) is the waiter's own: it waits, never stops.
    assert runner.run("push", third, 5, delivery_retries=1, message_id=stray).action == "retry"
    assert _types(third).count("step.waiting") == 1


def test_a_released_slot_can_be_kept_for_the_releasing_process_to_run(
    registry_5: None, state: RedisFlowState
) -> None:
    """With ``keep_handed`` (the Celery worker, tasks/push.py), a release reserves the slot for
    the first waiter and hands the waiter to this process instead of publishing a message: its
    step then runs here, on the reservation, ahead of any other waiter's poll."""
    world = FakeWorld(images={SOURCE: "sha256:image1"})
    runner, _ = _runner(world, state)
    published: list[tuple[str, str, int, str]] = []
    assert runner.flow is not None
    runner.flow.wake = lambda *args: published.append(args)
    runner.flow.keep_handed = True
    first, second, third = _job(), _job(), _job()
    for job_id in (first, second, third):
        for step in ("resolve_credentials", "login", "tag"):
            assert runner.run(step, job_id, 5).action == "continue"
    assert runner.run("push", first, 5).action == "stop"  # the slot was free: no wait
    assert runner.flow.take_handed() == []
    assert state.acquire(5, "other", "other-job", 1, lease=30, waiter_ttl=30).granted
    assert runner.run("push", second, 5).action == "retry"
    assert runner.run("push", third, 5).action == "retry"
    registry = Registry(id=5, name="r5", url=f"https://{HOST}", host=HOST, max_concurrent=1)
    runner.flow.release(registry, "other")
    assert runner.flow.take_handed() == [(5, f"{second}:push")]
    assert published == []
    assert runner.run("push", third, 5).action == "retry"  # kept for the second job
    outcome = runner.run("push", second, 5, message_id=WAKE_PREFIX + "here")
    assert outcome.action == "stop" and _types(second)[-1] == "job.succeeded"
    # Its own release handed the slot on to the third job, again to this process.
    assert runner.flow.take_handed() == [(5, f"{third}:push")]
    assert published == []


def _waiting_behind_a_hand_over(
    world: FakeWorld, state: RedisFlowState, own: str
) -> tuple[StepRunner, str, str]:
    """A job whose push waits under its own message id ``own``, then a released slot handed
    over to it: the runner, the job and the wake message's id."""
    runner, _ = _runner(world, state)
    woken: list[tuple[str, str, int, str]] = []
    assert runner.flow is not None
    runner.flow.wake = lambda *args: woken.append(args)
    job_id = _job()
    for step in ("resolve_credentials", "login", "tag"):
        assert runner.run(step, job_id, 5).action == "continue"
    assert state.acquire(5, "other", "other-job", 1, lease=30, waiter_ttl=30).granted
    assert runner.run("push", job_id, 5, message_id=own).action == "retry"
    registry = Registry(id=5, name="r5", url=f"https://{HOST}", host=HOST, max_concurrent=1)
    runner.flow.release(registry, "other")
    assert [(j, s) for j, s, _, _ in woken] == [(job_id, "push")]
    return runner, job_id, woken[0][3]


@pytest.mark.parametrize("ending", ["succeeded", "failed"])
def test_the_waiters_own_message_stops_unrecorded_once_a_hand_over_ended_its_job(
    registry_5: None, state: RedisFlowState, ending: str
) -> None:
    """The message a waiter was re-queued under arrives after the hand-over's run (a wake
    message, or a take-over) ended the job: it stops without a transaction and without a
    ``step.skipped`` (issue 15: 0.81 such deliveries a job, each a transaction). Only that
    message, and once: another delivery of the ended step records its skip as before."""
    world = FakeWorld(images={SOURCE: "sha256:image1"})
    if ending == "failed":  # not retryable: the job fails at once
        world.push_errors[HOST] = [PushVerificationFailed("digest mismatch")]
        world.push_errors[HOST][0].retryable = False
    runner, job_id, wake = _waiting_behind_a_hand_over(world, state, own="own-1")
    assert runner.run("push", job_id, 5, message_id=wake).action == "stop"
    assert _types(job_id)[-1] == f"job.{ending}"
    before = _types(job_id)
    outcome = runner.run("push", job_id, 5, delivery_retries=1, message_id="own-1")
    assert (outcome.action, outcome.reason) == ("stop", "superseded by a hand-over")
    assert _types(job_id) == before
    # The mark was taken: a duplicate of that message, or any other, records its skip.
    for message in ("own-1", "another"):
        assert runner.run("push", job_id, 5, delivery_retries=1, message_id=message).action == (
            "stop"
        )
    assert _types(job_id)[len(before) :] == ["step.skipped", "step.skipped"]


def test_the_waiters_own_message_stays_while_the_hand_overs_run_goes_on(
    registry_5: None, state: RedisFlowState
) -> None:
    """A hand-over's run that ends in a retry leaves the job going on: the waiter's own message
    is not marked, and runs the step (its next try) like any delivery."""
    world = FakeWorld(images={SOURCE: "sha256:image1"})
    world.push_errors[HOST] = [RegistryUnavailable("connection reset")]
    runner, job_id, wake = _waiting_behind_a_hand_over(world, state, own="own-2")
    assert runner.run("push", job_id, 5, message_id=wake).action == "retry"
    outcome = runner.run("push", job_id, 5, delivery_retries=1, message_id="own-2")
    assert outcome.action == "stop"
    types = _types(job_id)
    assert types[-3:] == ["step.started", "step.succeeded", "job.succeeded"]
    assert world.pushes.count(world.pushes[-1]) == 2  # the failed try and this one


class _MarksUnreachable(RedisFlowState):
    """The real state, except that the marks of ``supersede`` cannot be written or read."""

    def supersede(self, registry_id: int, waiter: str, *, ttl: float) -> None:
        raise FlowStateUnavailable("the flow-control state in Redis is unreachable: test")

    def take_superseded(self, registry_id: int, waiter: str, message_id: str) -> bool:
        raise FlowStateUnavailable("the flow-control state in Redis is unreachable: test")


def test_without_the_marks_the_waiters_own_message_records_its_skip_as_before(
    registry_5: None, state: RedisFlowState
) -> None:
    """Redis unreachable for the marks: the hand-over's run still ends the job, and the waiter's
    own message takes the database's way (``step.skipped``), never an error."""
    world = FakeWorld(images={SOURCE: "sha256:image1"})
    runner, job_id, wake = _waiting_behind_a_hand_over(world, state, own="own-4")
    assert runner.flow is not None
    runner.flow.state = _MarksUnreachable(REDIS_URL)
    assert runner.run("push", job_id, 5, message_id=wake).action == "stop"
    before = _types(job_id)
    assert before[-1] == "job.succeeded"
    outcome = runner.run("push", job_id, 5, delivery_retries=1, message_id="own-4")
    assert outcome.action == "stop" and outcome.reason != "superseded by a hand-over"
    assert _types(job_id)[len(before) :] == ["step.skipped"]


def test_only_a_hand_overs_run_marks_the_waiters_message(
    registry_5: None, state: RedisFlowState
) -> None:
    """The waiter's own message taking the slot itself marks nothing: a stray duplicate of it
    still records its skip."""
    world = FakeWorld(images={SOURCE: "sha256:image1"})
    runner, job_id, _ = _waiting_behind_a_hand_over(world, state, own="own-3")
    assert runner.run("push", job_id, 5, delivery_retries=1, message_id="own-3").action == "stop"
    before = _types(job_id)
    assert before[-1] == "job.succeeded"
    assert runner.run("push", job_id, 5, delivery_retries=2, message_id="own-3").action == "stop"
    assert _types(job_id)[len(before) :] == ["step.skipped"]


def test_a_slot_reserved_for_a_step_that_will_not_run_goes_to_the_next_waiter(
    registry_5: None, state: RedisFlowState
) -> None:
    """A waiter whose job ended meanwhile (here: cancelled) gives its reservation on at once,
    instead of leaving the slot idle until the reservation's lease ends."""
    world = FakeWorld(images={SOURCE: "sha256:image1"})
    runner, _ = _runner(world, state)
    assert runner.flow is not None
    runner.flow.wake = lambda *args: None
    runner.flow.keep_handed = True
    second, third = _job(), _job()
    for job_id in (second, third):
        for step in ("resolve_credentials", "login", "tag"):
            assert runner.run(step, job_id, 5).action == "continue"
    assert state.acquire(5, "other", "other-job", 1, lease=30, waiter_ttl=30).granted
    assert runner.run("push", second, 5).action == "retry"
    assert runner.run("push", third, 5).action == "retry"
    registry = Registry(id=5, name="r5", url=f"https://{HOST}", host=HOST, max_concurrent=1)
    runner.flow.release(registry, "other")
    assert runner.flow.take_handed() == [(5, f"{second}:push")]
    with session_scope() as session:
        job = session.get(PushJob, second)
        assert job is not None
        job.status = "cancelled"
    assert runner.run("push", second, 5, message_id=WAKE_PREFIX + "x").action == "stop"
    assert runner.flow.take_handed() == [(5, f"{third}:push")]
    assert runner.run("push", third, 5, message_id=WAKE_PREFIX + "y").action == "stop"
    assert _types(third)[-1] == "job.succeeded"


def test_a_rate_wait_is_recorded_once_as_step_waiting(
    registry_5: None, state: RedisFlowState
) -> None:
    world = FakeWorld(images={SOURCE: "sha256:image1"})
    runner, _ = _runner(world, state)
    with session_scope() as session:
        row = session.get(Registry, 5)
        assert row is not None
        row.rate_per_second = 0.5  # one request per 2 s
    first, second = _job(), _job()
    for job_id in (first, second):
        assert runner.run("resolve_credentials", job_id, 5).action == "continue"
    assert runner.run("login", first, 5).action == "continue"
    waits = [runner.run("login", second, 5) for _ in range(2)]
    assert [w.action for w in waits] == ["retry", "retry"]
    assert waits[0].reason == "waiting: registry 5 at its rate of 0.5/s"
    with session_scope() as session:
        recorded = select_events(session, job_id=second, types=["step.waiting"])
        assert [(e.step, e.payload["reason"], e.payload["rate_per_second"]) for e in recorded] == [
            ("login", "registry 5 at its rate of 0.5/s", 0.5)
        ]


def test_waiting_past_the_deadline_fails_the_job_with_its_own_code(
    registry_5: None, state: RedisFlowState
) -> None:
    world = FakeWorld(images={SOURCE: "sha256:image1"})
    runner, _ = _runner(world, state)
    job_id = _job()
    with session_scope() as session:
        job = session.get(PushJob, job_id)
        assert job is not None
        job.deadline_at = utcnow() - timedelta(seconds=1)
    assert state.acquire(5, "other", "other-job", 1, lease=30, waiter_ttl=30).granted
    assert runner.run("push", job_id, 5).action == "stop"
    with session_scope() as session:
        job = session.get(PushJob, job_id)
        assert job is not None and job.error_code == "throttled_past_deadline"
    assert world.pushes == []


def test_a_throttled_push_is_retried_past_max_attempts_and_lowers_the_limit(
    registry_5: None, state: RedisFlowState
) -> None:
    world = FakeWorld(images={SOURCE: "sha256:image1"})
    world.push_errors[HOST] = [RegistryThrottled("429 too many requests", retry_after=0.0)] * 5
    _, dispatcher = _runner(world, state, flow_poll=0.0)
    with session_scope() as session:
        row = session.get(Registry, 5)
        assert row is not None
        row.max_concurrent = 4
    job_id = _job()
    dispatcher.start_chain(job_id, 5)
    types = _types(job_id)
    assert types[-1] == "job.succeeded"
    assert types.count("step.failed") == 5  # max_attempts is 2: throttling is not failing
    with session_scope() as session:
        changes = select_events(
            session, stream="registry/5", types=["registry.throttled", "registry.unthrottled"]
        )
        seen = [
            (e.type, e.payload["previous_limit"], e.payload["effective_limit"]) for e in changes
        ]
    # the 429 met one push in flight: limit 1 (one decrease, the next 429s within the cooldown
    # change nothing); the registry refused 1 push at once, so one success probes only slowly
    assert seen == [("registry.throttled", 4, 1)]


# --- metrics and the command line --------------------------------------------------------------


def test_limit_changes_and_waits_become_metrics() -> None:
    from prometheus_client import CollectorRegistry

    from worker.metrics import Metrics

    collected = CollectorRegistry()
    metrics = Metrics(collected)
    for kind, limit in (("registry.throttled", 2), ("registry.unthrottled", None)):
        metrics.on_event({"type": kind, "registry_id": 5, "payload": {"effective_limit": limit}})
        gauge = collected.get_sample_value("pushworker_registry_effective_limit", {"registry": "5"})
        assert gauge == (-1 if limit is None else limit)
    metrics.on_event({"type": "step.waiting", "registry_id": 5, "step": "push", "payload": {}})
    waits = collected.get_sample_value(
        "pushworker_step_waits_total", {"step": "push", "registry": "5"}
    )
    assert waits == 1


def test_limits_are_set_shown_audited_and_cleared_from_the_command_line(sqlite_url: str) -> None:
    import json

    from click.testing import CliRunner

    from worker.cli import cli
    from worker.store.migrate import upgrade

    upgrade()
    runner = CliRunner()
    add = ["registry", "add", "h", "https://reg.example.com", "--username", "u"]
    added = runner.invoke(
        cli, [*add, "--password-stdin", "--no-test", "--max-concurrent", "2", "--rate", "600/m"],
        input="pw\n",
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    shown = json.loads(runner.invoke(cli, ["registry", "show", "1", "--json"]).output)
    assert (shown["max_concurrent"], shown["rate_per_second"]) == (2, 10.0)
    for bad in (["--max-concurrent", "-1"], ["--max-concurrent", "2.5"], ["--rate", "0x"]):
        refused = runner.invoke(cli, ["registry", "update", "1", "--no-test", *bad])
        assert refused.exit_code == 2, refused.output
    cleared = runner.invoke(
        cli, ["registry", "update", "1", "--no-test", "--max-concurrent", "none", "--rate", "none"]
    )
    assert cleared.exit_code == 0, cleared.output
    with session_scope() as session:
        updates = select_events(session, stream="registry/1", types=["registry.updated"])
        assert [(e.payload["max_concurrent"], e.payload["rate_per_second"]) for e in updates] == [
            (None, None)
        ]


def test_a_step_task_may_be_requeued_any_number_of_times() -> None:
    """A wait re-queues the task (``task.retry``) again and again: Celery's default of 3
    retries would end it (MaxRetriesExceededError) and leave the job running with no message."""
    from tasks.push import TASKS

    assert {name: task.max_retries for name, task in TASKS.items()} == dict.fromkeys(TASKS)


def test_a_job_may_name_its_own_deadline(registry_5: None) -> None:
    from worker.core.errors import ValidationError

    with session_scope() as session:
        request = PushRequest(SOURCE, 5, "team/app", "v1", "t", deadline=600)
        job, _ = create_job(session, request, actor="t")
        assert job.deadline_at is not None
        assert 590 < (job.deadline_at - utcnow()).total_seconds() <= 600
        enqueued = select_events(session, job_id=job.id, types=["job.enqueued"])
        assert enqueued[0].payload["deadline_at"] == job.deadline_at.isoformat()
    for bad in (0, -1, float("nan"), 8 * 86400, True):
        with pytest.raises(ValidationError), session_scope() as session:
            create_job(
                session, PushRequest(SOURCE, 5, "team/app", "v2", "t", deadline=bad), actor="t"
            )


def test_a_retried_job_gets_its_deadline_window_again(registry_5: None) -> None:
    from worker.jobs import retry_job

    with session_scope() as session:
        job, _ = create_job(session, PushRequest(SOURCE, 5, "team/app", "v1", "t"), actor="t")
        job.created_at = utcnow() - timedelta(hours=3)  # failed long ago
        job.status, job.error_code = "failed", "throttled_past_deadline"
        job_id = job.id
    with session_scope() as session:
        retried = retry_job(session, job_id, actor="operator:t", reason="limits raised")
        assert retried.deadline_at is not None
        window = (retried.deadline_at - utcnow()).total_seconds()
        assert 3590 < window <= 3600  # PUSHWORKER_FLOW_DEADLINE from the retry, not the creation


def test_the_message_contract_takes_a_deadline() -> None:
    from worker.contract import request_from_call
    from worker.core.errors import InvalidMessage

    base = {
        "source_image": "app:build", "registry_id": 5, "repository": "team/app", "tag": "v1",
        "requested_by": "t", "idempotency_key": "k-1",
    }  # fmt: skip
    assert request_from_call([{**base, "deadline": 90}], {})["deadline"] == 90
    for bad in (0, -5, 604801, "60", True):
        with pytest.raises(InvalidMessage):
            request_from_call([{**base, "deadline": bad}], {})
