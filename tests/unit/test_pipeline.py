"""The step pipeline's logic (claims, memo, retry, fallback): fake seams, a real event log on
both supported databases (SQLite and PostgreSQL)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import update
from sqlalchemy.orm import Session

from tests.support.fakes import FakeWorld, cancelled_while_acting, fake_runner, wrap_action
from worker.core.errors import AuthenticationError, CredentialError, RegistryUnavailable
from worker.core.settings import Settings
from worker.engine.steps import STEP_NAMES, STEPS, Action, Step, StepContext, StepResult
from worker.jobs import PushRequest, create_job, retry_job
from worker.registries import RegistrySpec, create_registry
from worker.store.claims import take_first_claim
from worker.store.db import session_scope
from worker.store.events import Guard, append_guarded
from worker.store.models import PushJob, StepRun, utcnow
from worker.store.queries import select_events

HARBOR = "reg.example.com:10443"
GITLAB = "gitlab.example.com"
SOURCE = "app:build"


def auth_refused(host: str) -> AuthenticationError:
    return AuthenticationError(f"registry {host} rejected the credentials: unauthorized")


@pytest.fixture
def registries(database_url: str) -> None:
    with session_scope() as session:
        for rid, host in ((4, GITLAB), (5, HARBOR), (6, "alt.example.com")):
            spec = RegistrySpec(name=f"r{rid}", url=f"https://{host}", username="u", secret="pw")
            create_registry(session, spec, registry_id=rid)


@pytest.fixture
def world() -> FakeWorld:
    return FakeWorld(images={SOURCE: "sha256:image1"})


def run_job(world: FakeWorld, fallback: list[int] | None = None, attempts: int = 3) -> str:
    test_settings = dataclasses.replace(
        Settings.from_env(), max_attempts=attempts, retry_base=0.0, retry_max=0.0
    )
    _, dispatcher = fake_runner(world, test_settings)
    request = PushRequest(SOURCE, 5, "team/app", "v1", "tester", fallback=fallback)
    with session_scope() as session:
        job, _ = create_job(session, request, actor="producer:tester")
        job_id = job.id
    dispatcher.start_chain(job_id, 5)
    return job_id


def job_and_types(job_id: str) -> tuple[PushJob, list[str]]:
    with session_scope() as session:
        job = session.get(PushJob, job_id)
        assert job is not None
        return job, [e.type for e in select_events(session, job_id=job_id)]


def test_happy_path_pushes_once_to_the_named_registry(registries: None, world: FakeWorld) -> None:
    """A job runs its four steps in order and ends succeeded with the pushed digest."""
    job_id = run_job(world)
    job, types = job_and_types(job_id)
    assert job.status == "succeeded"
    assert world.pushes == [f"{HARBOR}/team/app:v1"]
    assert job.digest == world.served[f"{HARBOR}/team/app:v1"]
    assert types == ["job.enqueued"] + ["step.started", "step.succeeded"] * 4 + ["job.succeeded"]


def test_rerunning_a_succeeded_chain_skips_every_step(registries: None, world: FakeWorld) -> None:
    """Running a finished job's chain again pushes nothing and records four skips."""
    job_id = run_job(world)
    _, before = job_and_types(job_id)
    _, dispatcher = fake_runner(world, Settings.from_env())
    dispatcher.start_chain(job_id, 5)
    _, after = job_and_types(job_id)
    assert after[len(before) :] == ["step.skipped"] * 4
    assert len(world.pushes) == 1


def test_auth_failure_without_chain_fails_and_pushes_nothing(
    registries: None, world: FakeWorld
) -> None:
    """The incident's path: login refused, no chain -> failed, no push anywhere."""
    world.login_errors[HARBOR] = auth_refused(HARBOR)
    job, types = job_and_types(run_job(world))
    assert job.status == "failed"
    assert job.error_code == "authentication_failed"
    assert "set-credential" in (job.error_message or "")
    assert world.pushes == []
    assert types[-1] == "job.failed"
    assert "fallback.applied" not in types


def test_auth_failure_falls_back_along_the_explicit_chain(
    registries: None, world: FakeWorld
) -> None:
    """With chain [4], a refusal at 5 moves the job to 4, and only 4 receives a push."""
    world.login_errors[HARBOR] = auth_refused(HARBOR)
    job, types = job_and_types(run_job(world, fallback=[4]))
    assert job.status == "succeeded"
    assert (job.requested_registry_id, job.effective_registry_id) == (5, 4)
    assert world.pushes == [f"{GITLAB}/team/app:v1"]
    assert (
        types.index("step.failed") < types.index("fallback.applied") < types.index("job.succeeded")
    )


def test_auth_failure_at_push_also_falls_back(registries: None, world: FakeWorld) -> None:
    """A refusal reported inside the push stream counts like a refused login."""
    world.push_errors[HARBOR] = [auth_refused(HARBOR)]
    job, _ = job_and_types(run_job(world, fallback=[4]))
    assert job.status == "succeeded"
    assert world.pushes == [f"{HARBOR}/team/app:v1", f"{GITLAB}/team/app:v1"]


def test_exhausted_chain_reports_every_refusal(registries: None, world: FakeWorld) -> None:
    """When every registry refuses, the error names each one and what to do."""
    world.login_errors[HARBOR] = auth_refused(HARBOR)
    world.login_errors[GITLAB] = auth_refused(GITLAB)
    job, _ = job_and_types(run_job(world, fallback=[4]))
    assert job.status == "failed"
    assert job.error_code == "fallback_exhausted"
    assert "registry 5" in (job.error_message or "") and "registry 4" in (job.error_message or "")
    assert "pushctl jobs retry" in (job.error_message or "")
    assert world.pushes == []


def test_unreachable_registry_is_retried_then_fails_without_fallback(
    registries: None, world: FakeWorld
) -> None:
    """RegistryUnavailable follows the retry policy and never the fallback chain."""
    world.push_errors[HARBOR] = [RegistryUnavailable("connection refused")] * 5
    job_id = run_job(world, fallback=[4], attempts=3)
    job, types = job_and_types(job_id)
    assert job.status == "failed"
    assert job.error_code == "registry_unavailable"
    assert "fallback.applied" not in types
    assert world.pushes == [f"{HARBOR}/team/app:v1"] * 3
    with session_scope() as session:
        failed = [e for e in select_events(session, job_id=job_id) if e.type == "step.failed"]
    assert [e.payload["will_retry"] for e in failed] == [True, True, False]


def test_missing_source_image_fails_clearly(registries: None, world: FakeWorld) -> None:
    """A source image the engine lacks fails the job at tag, with nothing pushed."""
    world.images.clear()
    job, _ = job_and_types(run_job(world))
    assert (job.status, job.error_code, job.current_step) == (
        "failed",
        "source_image_not_found",
        "tag",
    )
    assert world.pushes == []


def _claimed_elsewhere(job_id: str, owner: str, attempts: int = 1) -> None:
    with session_scope() as session:
        session.add(
            StepRun(
                job_id=job_id,
                step="resolve_credentials",
                registry_id=5,
                status="running",
                attempts=attempts,
                owner=owner,
                lease_expires_at=utcnow() + timedelta(hours=1),
                result={},
            )
        )


def _queued_job() -> str:
    with session_scope() as session:
        job, _ = create_job(session, PushRequest(SOURCE, 5, "team/app", "v1", "t"), actor="t")
        return job.id


def test_a_step_held_by_a_live_worker_is_skipped(registries: None, world: FakeWorld) -> None:
    """A duplicate delivery does not run a step another live worker holds."""
    job_id = _queued_job()
    _claimed_elsewhere(job_id, "worker:another-host:4242")
    runner, _ = fake_runner(world, Settings.from_env())
    outcome = runner.run("resolve_credentials", job_id, 5)
    assert outcome.action == "stop"
    _, types = job_and_types(job_id)
    assert types[-1] == "step.skipped"


def test_a_claim_of_a_dead_local_worker_is_taken_over(registries: None, world: FakeWorld) -> None:
    """A step whose worker on this host died is run by the redelivery."""
    import socket

    job_id = _queued_job()
    _claimed_elsewhere(job_id, f"worker:{socket.gethostname()}:999999")
    runner, _ = fake_runner(world, Settings.from_env())
    assert runner.run("resolve_credentials", job_id, 5).action == "continue"


def test_redelivery_of_a_step_that_keeps_killing_its_worker_is_bounded(
    registries: None, world: FakeWorld
) -> None:
    """After max attempts of dead claims, the job fails with worker_lost instead of looping."""
    import socket

    job_id = _queued_job()
    test_settings = dataclasses.replace(Settings.from_env(), max_attempts=3)
    _claimed_elsewhere(job_id, f"worker:{socket.gethostname()}:999999", attempts=3)
    runner, _ = fake_runner(world, test_settings)
    assert runner.run("resolve_credentials", job_id, 5).action == "stop"
    job, _ = job_and_types(job_id)
    assert (job.status, job.error_code) == ("failed", "worker_lost")
    with session_scope() as session:
        claim = session.get(StepRun, (job_id, "resolve_credentials", 5))
        assert claim is not None
        assert (claim.status, claim.owner, claim.attempts) == ("failed", None, 4)


def test_of_two_first_claims_at_once_only_one_is_taken(registries: None) -> None:
    """The loser of a race for a step nobody held yet learns it lost, and changes nothing: not
    the claim, and not the job the winner marked running at its step."""
    job_id = _queued_job()
    lease = utcnow() + timedelta(minutes=5)
    with session_scope() as session:
        job = session.get(PushJob, job_id)
        assert job is not None and job.status == "queued"
        assert take_first_claim(session, job, "tag", 5, "worker:a:1", lease)
        assert (job.status, job.current_step) == ("running", "tag")  # brought up to date
    with session_scope() as session:
        job = session.get(PushJob, job_id)
        assert job is not None and (job.status, job.current_step) == ("running", "tag")
        started = job.started_at
        assert started is not None
        job.current_step = "login"  # what the winner's next step would have written
    with session_scope() as session:
        job = session.get(PushJob, job_id)
        assert job is not None
        assert not take_first_claim(session, job, "tag", 5, "worker:b:2", lease)
    with session_scope() as session:
        claim = session.get(StepRun, (job_id, "tag", 5))
        assert claim is not None
        assert (claim.owner, claim.attempts, claim.status) == ("worker:a:1", 1, "running")
        job = session.get(PushJob, job_id)
        assert job is not None
        assert (job.status, job.current_step, job.started_at) == ("running", "login", started)


def test_a_first_claim_appends_its_started_event_only_when_taken(
    registries: None, database_url: str
) -> None:
    """PostgreSQL takes a first claim, marks the job running and appends ``step.started`` in one
    statement: the winner's event is there, the loser appends nothing and changes nothing.
    SQLite refuses the one-statement way (the pipeline uses it on PostgreSQL only)."""
    job_id = _queued_job()
    lease = utcnow() + timedelta(minutes=5)

    def started_by(
        session: Session, owner: str
    ) -> Callable[[Guard, dict[str, Any]], Mapping[str, Any] | None]:
        def started(guard: Guard, params: dict[str, Any]) -> Mapping[str, Any] | None:
            return append_guarded(
                session, guard, params, stream=f"job/{job_id}", type="step.started",
                actor=owner, job_id=job_id, step="tag", registry_id=5, attempt=1,
            )  # fmt: skip

        return started

    if database_url.startswith("sqlite"):
        with pytest.raises(ValueError, match="PostgreSQL only"), session_scope() as session:
            job = session.get(PushJob, job_id)
            assert job is not None
            take_first_claim(
                session, job, "tag", 5, "worker:a:1", lease, started_by(session, "w:a")
            )
        return
    marked: list[tuple[object, ...]] = []  # the job as each claim left it
    for owner, wins in (("worker:a:1", True), ("worker:b:2", False)):
        with session_scope() as session:
            job = session.get(PushJob, job_id)
            assert job is not None
            started = started_by(session, owner)
            taken = take_first_claim(session, job, "tag", 5, owner, lease, started)
            assert taken is wins
        with session_scope() as session:
            job = session.get(PushJob, job_id)
            assert job is not None
            marked.append((job.status, job.current_step, job.started_at, job.updated_at))
    assert marked[0][:2] == ("running", "tag")
    assert marked[1] == marked[0]  # the loser's later clock left no trace on the job
    with session_scope() as session:
        claim = session.get(StepRun, (job_id, "tag", 5))
        assert claim is not None and (claim.owner, claim.attempts) == ("worker:a:1", 1)
        rows = select_events(session, job_id=job_id)
    assert [(r.type, r.actor) for r in rows] == [
        ("job.enqueued", "t"), ("step.started", "worker:a:1"),
    ]  # fmt: skip


OUTCOMES = st.sampled_from(["accept", "refuse_login", "refuse_push"])


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    chain=st.permutations([4, 6]).flatmap(lambda p: st.integers(0, 2).map(lambda n: list(p[:n]))),
    outcomes=st.fixed_dictionaries({5: OUTCOMES, 4: OUTCOMES, 6: OUTCOMES}),
)
def test_pushes_only_ever_go_to_chain_hosts_in_chain_order(
    registries: None, chain: list[int], outcomes: dict[int, str]
) -> None:
    """For any chain and any mix of refusals, every push names a chain host, in chain order."""
    hosts = {5: HARBOR, 4: GITLAB, 6: "alt.example.com"}
    world = FakeWorld(images={SOURCE: "sha256:image1"})
    for rid, outcome in outcomes.items():
        if outcome == "refuse_login":
            world.login_errors[hosts[rid]] = auth_refused(hosts[rid])
        elif outcome == "refuse_push":
            world.push_errors[hosts[rid]] = [auth_refused(hosts[rid])]
    job, _ = job_and_types(run_job(world, fallback=chain))
    route = [hosts[r] for r in [5, *chain]]
    pushed_hosts = [reference.split("/", 1)[0] for reference in world.pushes]
    assert all(host in route for host in pushed_hosts)
    assert pushed_hosts == sorted(pushed_hosts, key=route.index)
    accepting = [r for r in [5, *chain] if outcomes[r] == "accept"]
    if accepting:
        assert (job.status, job.effective_registry_id) == ("succeeded", accepting[0])
    else:
        assert job.status == "failed"


def test_step_order_is_resolve_login_tag_push() -> None:
    """The chain's order is part of the contract with producers and operators."""
    assert STEP_NAMES == ("resolve_credentials", "login", "tag", "push")


def test_each_claim_is_leased_for_its_steps_time(registries: None, world: FakeWorld) -> None:
    """A claim stands for the lease its step names: the push for the push timeout, the others
    for five minutes; another worker takes a step over only after that."""
    test_settings = dataclasses.replace(Settings.from_env(), push_timeout=5000)
    leases: dict[str, float] = {}

    def measured(name: str, action: Action) -> Action:
        def act(ctx: StepContext) -> StepResult:
            with session_scope() as session:
                claim = session.get(StepRun, (ctx.job.id, name, 5))
                assert claim is not None and claim.lease_expires_at is not None
                left = _naive_utc(claim.lease_expires_at) - _naive_utc(utcnow())
                leases[name] = left.total_seconds()
            return action(ctx)

        return act

    steps = STEPS
    for name in STEP_NAMES:
        steps = wrap_action(name, functools.partial(measured, name), steps)
    _, dispatcher = fake_runner(world, test_settings, steps)
    dispatcher.start_chain(_queued_job(), 5)
    assert set(leases) == set(STEP_NAMES)
    for name, left in leases.items():
        assert abs(left - (5000 if name == "push" else 300)) < 30, name


def _naive_utc(moment: datetime) -> datetime:
    # SQLite gives back naive UTC times, PostgreSQL aware ones.
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def test_a_step_added_to_the_list_runs_in_its_place(registries: None, world: FakeWorld) -> None:
    """The runner and the chain follow the list of steps: a step added before the push runs
    there, is claimed and recorded like the others."""
    ran: list[str] = []

    def verify(ctx: StepContext) -> StepResult:
        ran.append(ctx.job.id)
        return StepResult()

    steps = (*STEPS[:-1], Step("verify", verify), STEPS[-1])
    _, dispatcher = fake_runner(world, Settings.from_env(), steps)
    job_id = _queued_job()
    dispatcher.start_chain(job_id, 5)
    job, _ = job_and_types(job_id)
    assert job.status == "succeeded" and ran == [job_id]
    with session_scope() as session:
        started = [
            e.step for e in select_events(session, job_id=job_id) if e.type == "step.started"
        ]
    assert started == ["resolve_credentials", "login", "tag", "verify", "push"]


def test_a_tag_already_in_place_is_recorded_as_skipped(registries: None, world: FakeWorld) -> None:
    """The engine already lists the target among the source's tags: nothing to tag."""
    target = f"{HARBOR}/team/app:v1"
    world.images[target] = world.images[SOURCE]
    job_id = run_job(world)
    with session_scope() as session:
        tag_events = [e for e in select_events(session, job_id=job_id) if e.step == "tag"]
    assert [e.type for e in tag_events] == ["step.started", "step.skipped"]
    assert tag_events[-1].payload["reason"] == "the target already names the source image"


def test_a_target_tag_repointed_before_the_push_is_tagged_again(
    registries: None, world: FakeWorld
) -> None:
    """Between the tag and push steps another image took the target name: the push step
    points it back at the job's source image, so the registry gets the job's image."""
    target = f"{HARBOR}/team/app:v1"
    runner, _ = fake_runner(world, Settings.from_env())
    job_id = _queued_job()
    for step in ("resolve_credentials", "login", "tag"):
        assert runner.run(step, job_id, 5).action == "continue"
    world.images[target] = "sha256:another-image"
    last = runner.run("push", job_id, 5)
    assert (last.action, last.finished) == ("stop", True)  # the task returns: nothing follows
    job, _ = job_and_types(job_id)
    assert job.status == "succeeded"
    assert world.images[target] == world.images[SOURCE]
    expected = "sha256:" + hashlib.sha256(world.images[SOURCE].encode()).hexdigest()
    assert world.served[target] == job.digest == expected


# Not the local step: its claim, action and record are one transaction, nobody can take it over.
@pytest.mark.parametrize("step", [s.name for s in STEPS if not s.local])
def test_a_success_after_a_take_over_is_recorded_with_the_try_that_holds_the_claim(
    registries: None, world: FakeWorld, step: str
) -> None:
    """Another delivery took the claim over while the step acted (its lease ran out): the
    success ends the claim and is recorded with the try that holds it, as ever, on both ways a
    success is recorded (one statement for the claim's own try, or the claim read back)."""
    job_id = _queued_job()

    def taken_over(action: Action) -> Action:
        def act(ctx: StepContext) -> StepResult:
            with session_scope() as session:
                session.execute(
                    update(StepRun)
                    .where(StepRun.job_id == job_id, StepRun.step == step)
                    .values(attempts=StepRun.attempts + 1, owner="worker:another-host:4242")
                )
            return action(ctx)

        return act

    runner, _ = fake_runner(world, Settings.from_env(), wrap_action(step, taken_over))
    outcomes = [runner.run(name, job_id, 5) for name in STEP_NAMES]
    assert [o.action for o in outcomes] == ["continue"] * (len(STEP_NAMES) - 1) + ["stop"]
    with session_scope() as session:
        run = session.get(StepRun, (job_id, step, 5))
        assert run is not None and (run.status, run.attempts, run.owner) == ("succeeded", 2, None)
        rows = select_events(session, job_id=job_id)
    ended = [(r.type, r.attempt) for r in rows if r.step == step and r.type != "step.started"]
    assert ended == [("step.succeeded", 2)]
    job, types = job_and_types(job_id)
    assert job.status == "succeeded" and types[-1] == "job.succeeded"


@pytest.mark.parametrize("step", ["tag", "push"])
def test_a_cancel_while_a_step_runs_stands(registries: None, world: FakeWorld, step: str) -> None:
    """The operator cancels while the step acts: the step's own outcome is recorded, the job
    stays cancelled (it never turns succeeded) and the chain stops there."""
    job_id = _queued_job()

    cancelling = wrap_action(step, cancelled_while_acting(job_id))
    runner, _ = fake_runner(world, Settings.from_env(), cancelling)
    position = STEP_NAMES.index(step)
    outcomes = [runner.run(name, job_id, 5) for name in STEP_NAMES[: position + 1]]
    assert [o.action for o in outcomes] == ["continue"] * position + ["stop"]
    assert not outcomes[-1].finished  # a stop the task reports as such (Celery's Ignore)
    job, types = job_and_types(job_id)
    assert (job.status, job.digest) == ("cancelled", None)
    assert types[-3:] == ["step.started", "job.cancelled", "step.succeeded"]
    # A redelivered push does nothing either: skipped as cancelled, or as done already.
    later = runner.run("push", job_id, 5)
    assert (later.action, later.reason) == ("stop", "memo" if step == "push" else "job cancelled")


def test_a_login_retried_after_a_failure_asks_the_registry_again(
    registries: None, world: FakeWorld
) -> None:
    """The first try may reuse a login this engine proved recently; a retry never does, in
    whichever process it lands: the try before failed, so an earlier success proves nothing."""
    job_id = _queued_job()
    runner, _ = fake_runner(world, Settings.from_env())
    assert runner.run("resolve_credentials", job_id, 5).action == "continue"
    world.login_errors[HARBOR] = RegistryUnavailable(f"registry {HARBOR} does not answer")
    assert runner.run("login", job_id, 5).action == "retry"
    world.login_errors.pop(HARBOR)
    assert runner.run("login", job_id, 5).action == "continue"
    assert world.login_reuse == [True, False]


# --- a local step: claimed, run and recorded in one transaction ---------------------------------


def test_resolving_credentials_is_one_transaction_and_records_as_before(
    registries: None, world: FakeWorld
) -> None:
    """The local step (``Step.local``) commits its claim, ``step.started``, result and
    ``step.succeeded`` together: one transaction where a step that talks to a daemon or a
    registry takes two (claim, then record). Its claim row and events are those of any step."""
    assert [s.name for s in STEPS if s.local] == ["resolve_credentials"]
    job_id = _queued_job()
    from sqlalchemy import event

    from worker.store.db import default_engine

    runner, _ = fake_runner(world, Settings.from_env())
    commits: list[str] = []

    def count(_connection: object) -> None:
        commits.append("commit")

    event.listen(default_engine(), "commit", count)
    try:
        assert runner.run("resolve_credentials", job_id, 5).action == "continue"
        local = len(commits)
        assert runner.run("login", job_id, 5).action == "continue"
        remote = len(commits) - local
    finally:
        event.remove(default_engine(), "commit", count)
    assert (local, remote) == (1, 2)
    _, types = job_and_types(job_id)
    assert types == ["job.enqueued"] + ["step.started", "step.succeeded"] * 2
    with session_scope() as session:
        claim = session.get(StepRun, (job_id, "resolve_credentials", 5))
        assert claim is not None
        assert (claim.status, claim.attempts, claim.owner) == ("succeeded", 1, None)
        assert claim.result == {"credential_source": "secret", "username": "u"}


@pytest.mark.parametrize("failure", ["refused", "crash"])
def test_a_local_step_that_fails_keeps_nothing_of_its_one_transaction(
    registries: None, world: FakeWorld, failure: str
) -> None:
    """A local step whose action fails rolls its transaction back and runs as any other step:
    one try recorded (not two), ``step.started`` then ``step.failed``, the job failed with the
    action's own error (a crash: ``step ... crashed``)."""
    calls: list[int] = []

    def failing(action: Action) -> Action:
        def run(ctx: StepContext) -> StepResult:
            calls.append(ctx.attempt)
            if failure == "crash":
                raise KeyError("boom")
            raise CredentialError("credential store refused")

        return run

    steps = wrap_action("resolve_credentials", failing)
    runner, _ = fake_runner(world, dataclasses.replace(Settings.from_env(), max_attempts=1), steps)
    job_id = _queued_job()
    assert runner.run("resolve_credentials", job_id, 5).action == "stop"
    job, types = job_and_types(job_id)
    assert types == ["job.enqueued", "step.started", "step.failed", "job.failed"]
    assert job.status == "failed"
    expected = "step resolve_credentials crashed: KeyError" if failure == "crash" else (
        "credential store refused"
    )  # fmt: skip
    assert job.error_message == expected
    # Run in the one transaction (rolled back), then again claimed as try 1.
    assert calls == [1, 1]
    with session_scope() as session:
        claim = session.get(StepRun, (job_id, "resolve_credentials", 5))
        assert claim is not None and (claim.status, claim.attempts) == ("failed", 1)


@pytest.mark.parametrize("step", ["login", "push"])
def test_a_step_that_fails_after_a_cancel_leaves_the_job_cancelled(
    registries: None, world: FakeWorld, step: str
) -> None:
    """The operator cancels while the step acts, and the registry then refuses the credential:
    the step's failure is recorded, but the job stays cancelled (not failed), and its fallback
    chain is not taken: nothing is sent to another registry."""
    request = PushRequest(SOURCE, 5, "team/app", "v1", "t", fallback=[4])
    with session_scope() as session:
        job, _ = create_job(session, request, actor="t")
        job_id = job.id

    refused = cancelled_while_acting(job_id, then=lambda: auth_refused(HARBOR))
    runner, dispatcher = fake_runner(world, Settings.from_env(), wrap_action(step, refused))
    position = STEP_NAMES.index(step)
    outcomes = [runner.run(name, job_id, 5) for name in STEP_NAMES[: position + 1]]
    assert [o.action for o in outcomes] == ["continue"] * position + ["stop"]
    assert outcomes[-1].reason == "job cancelled while the step ran"
    job, types = job_and_types(job_id)
    assert (job.status, job.error_code, job.effective_registry_id) == ("cancelled", None, 5)
    assert types[-3:] == ["step.started", "job.cancelled", "step.failed"]
    with session_scope() as session:
        rows = select_events(session, job_id=job_id)
    assert rows[-1].payload["will_retry"] is False
    assert {row.registry_id for row in rows} == {5}  # no step ran against registry 4
    assert world.pushes == [] and world.logins.count(GITLAB) == 0
    assert dispatcher.chains == []  # no chain started for the fallback


def test_a_job_cancelled_while_it_pushed_then_retried_ends_succeeded(
    registries: None, world: FakeWorld
) -> None:
    """A cancel that came while the push ran leaves the push done and the job cancelled; a
    retry then skips every step (they succeeded) and the job ends succeeded with that push's
    digest, without pushing again (it used to stay queued for ever)."""
    job_id = _queued_job()

    cancelling = wrap_action("push", cancelled_while_acting(job_id))
    runner, _ = fake_runner(world, Settings.from_env(), cancelling)
    for name in STEP_NAMES:
        runner.run(name, job_id, 5)
    job, _ = job_and_types(job_id)
    assert job.status == "cancelled"
    with session_scope() as session:
        retry_job(session, job_id, actor="operator:tester", reason="it was the right tag")
    plain, _ = fake_runner(world, Settings.from_env())
    outcomes = [plain.run(name, job_id, 5) for name in STEP_NAMES]
    assert [o.reason for o in outcomes[:-1]] == ["memo"] * 3
    assert (outcomes[-1].action, outcomes[-1].finished) == ("stop", True)
    job, types = job_and_types(job_id)
    pushed = f"{HARBOR}/team/app:v1"
    assert (job.status, job.digest, job.pushed_reference) == (
        "succeeded", world.served[pushed], pushed,
    )  # fmt: skip
    assert types[-6:] == ["job.retried", *["step.skipped"] * 4, "job.succeeded"]
    assert world.pushes == [pushed]
    # Delivered again, the chain finds the job ended: nothing more is appended after the skips.
    again = plain.run("push", job_id, 5)
    assert (again.action, again.reason) == ("stop", "memo")
    _, after = job_and_types(job_id)
    assert after[len(types) :] == ["step.skipped"]


def test_a_stale_delivery_for_a_registry_the_job_left_does_not_end_it(
    registries: None, world: FakeWorld
) -> None:
    """The push succeeded at the fallback registry while the job was being cancelled; the retry
    starts again at the requested registry. A late delivery of the push for the fallback
    registry, done already there, does not end the retried job: only the chain it runs now
    does, through the same fallback, without pushing again."""
    world.login_errors[HARBOR] = auth_refused(HARBOR)
    request = PushRequest(SOURCE, 5, "team/app", "v1", "t", fallback=[4])
    with session_scope() as session:
        job, _ = create_job(session, request, actor="t")
        job_id = job.id

    _, dispatcher = fake_runner(
        world, Settings.from_env(), wrap_action("push", cancelled_while_acting(job_id))
    )
    dispatcher.start_chain(job_id, 5)  # refused at 5, falls back to 4, pushes there
    job, _ = job_and_types(job_id)
    assert (job.status, job.effective_registry_id) == ("cancelled", 4)
    with session_scope() as session:
        retry_job(session, job_id, actor="operator:tester", reason="it was right")
    plain, plain_dispatcher = fake_runner(world, Settings.from_env())
    stale = plain.run("push", job_id, 4)
    assert (stale.action, stale.reason, stale.finished) == ("stop", "memo", False)
    job, _ = job_and_types(job_id)
    assert (job.status, job.effective_registry_id) == ("queued", 5)
    plain_dispatcher.start_chain(job_id, 5)
    job, types = job_and_types(job_id)
    pushed = f"{GITLAB}/team/app:v1"
    assert (job.status, job.pushed_reference) == ("succeeded", pushed)
    assert types[-2:] == ["step.skipped", "job.succeeded"]
    assert world.pushes == [pushed]
