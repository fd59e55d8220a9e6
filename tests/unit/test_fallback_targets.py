"""A removed (or otherwise unusable) registry is never a target: not when a job copies its
chain, not when a fallback is applied, not when a step is claimed. Fake seams (they record every
login and push the pipeline attempts), a real event log on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import update

from tests.support.fakes import FakeWorld, InlineDispatcher, fake_runner
from worker.core.errors import (
    AuthenticationError,
    InvalidFallbackChain,
    PushWorkerError,
    ValidationError,
)
from worker.core.settings import Settings
from worker.engine.fallback import plan_fallback
from worker.engine.steps import STEP_NAMES, STEPS, Step
from worker.jobs import PushRequest, create_job
from worker.registries import RegistrySpec, create_registry, remove_registry
from worker.store.db import session_scope
from worker.store.models import PushJob, Registry, utcnow
from worker.store.queries import select_events

SOURCE = "app:build"
HOSTS = {5: "reg.example.com:10443", 4: "gitlab.example.com", 6: "alt.example.com"}


@pytest.fixture
def registries(database_url: str) -> None:
    with session_scope() as session:
        for rid, host in HOSTS.items():
            spec = RegistrySpec(name=f"r{rid}", url=f"https://{host}", username="u", secret="pw")
            create_registry(session, spec, registry_id=rid)


def refuse_login(world: FakeWorld, rid: int) -> None:
    host = HOSTS[rid]
    world.login_errors[host] = AuthenticationError(f"registry {host} rejected the credentials")


def queue(fallback: list[int] | None) -> tuple[str, InlineDispatcher, FakeWorld]:
    """A job for registry 5, recorded but not yet run (as if it waited in the queue)."""
    world = FakeWorld(images={SOURCE: "sha256:image1"})
    test_settings = dataclasses.replace(
        Settings.from_env(), max_attempts=2, retry_base=0.0, retry_max=0.0
    )
    _, dispatcher = fake_runner(world, test_settings)
    with session_scope() as session:
        job, _ = create_job(
            session, PushRequest(SOURCE, 5, "team/app", "v1", "t", fallback=fallback), actor="t"
        )
        return job.id, dispatcher, world


def mark_removed(*ids: int, removed: bool = True) -> None:
    """Set ``removed_at`` directly: a removal the job's copied chain does not know about."""
    with session_scope() as session:
        session.execute(
            update(Registry)
            .where(Registry.id.in_(ids))
            .values(removed_at=utcnow() if removed else None)
        )


def outcome(job_id: str) -> tuple[PushJob, list[tuple[str, dict[str, object]]]]:
    with session_scope() as session:
        job = session.get(PushJob, job_id)
        assert job is not None
        return job, [(e.type, e.payload) for e in select_events(session, job_id=job_id)]


def test_a_registry_removed_after_queueing_is_skipped_by_the_fallback(registries: None) -> None:
    """Chain [4, 6], 4 removed while the job waits, 5 refuses: the job lands in 6; 4 gets no
    login and no push, and fallback.applied names it as skipped."""
    job_id, dispatcher, world = queue([4, 6])
    with session_scope() as session:
        remove_registry(session, 4)
    refuse_login(world, 5)
    dispatcher.start_chain(job_id, 5)
    job, log = outcome(job_id)
    assert (job.status, job.effective_registry_id) == ("succeeded", 6)
    assert HOSTS[4] not in world.logins
    assert world.pushes == [f"{HOSTS[6]}/team/app:v1"]
    applied = [payload for kind, payload in log if kind == "fallback.applied"]
    assert applied == [
        {
            "from_registry_id": 5,
            "to_registry_id": 6,
            "reason": f"registry {HOSTS[5]} rejected the credentials",
            "skipped": [{"registry_id": 4, "reason": "registry 4 was removed"}],
        }
    ]


def test_no_usable_registry_left_fails_the_job_naming_the_removed_one(registries: None) -> None:
    """Chain [4], 4 removed, 5 refuses: failed (fallback_exhausted), nothing pushed anywhere,
    and the error says 4 was removed and sent nothing."""
    job_id, dispatcher, world = queue([4])
    mark_removed(4)
    refuse_login(world, 5)
    dispatcher.start_chain(job_id, 5)
    job, log = outcome(job_id)
    assert (job.status, job.error_code) == ("failed", "fallback_exhausted")
    assert "registry 4 was removed (skipped, nothing sent to it)" in (job.error_message or "")
    assert world.pushes == [] and world.logins == [HOSTS[5]]
    failed = [payload for kind, payload in log if kind == "job.failed"]
    assert failed[0]["skipped"] == [{"registry_id": 4, "reason": "registry 4 was removed"}]


def test_a_step_claimed_for_a_removed_registry_fails_the_job(registries: None) -> None:
    """5 removed while its job waited: the first claim fails the job (registry_not_found) and
    no step acts: no login, no tag, no push."""
    job_id, dispatcher, world = queue(None)
    mark_removed(5)
    dispatcher.start_chain(job_id, 5)
    job, log = outcome(job_id)
    assert (job.status, job.error_code) == ("failed", "registry_not_found")
    assert "registry 5 was removed after the job was queued" in (job.error_message or "")
    assert (world.logins, world.pushes) == ([], [])
    assert [kind for kind, _ in log] == ["job.enqueued", "job.failed"]


ODD_SPELLINGS = [
    ("https://registry-1.docker.io.", "registry-1.docker.io."),
    ("https://Index.Docker.IO:443", "index.docker.io:443"),
    ("https://myregistry", "myregistry"),
    ("https://::1:5000", "::1:5000"),
    ("https://reg.example.com:443", "reg.example.com:443"),
]


@pytest.mark.parametrize(("url", "host"), ODD_SPELLINGS)
def test_a_stored_record_refused_by_todays_rules_gets_nothing(
    registries: None, url: str, host: str
) -> None:
    """A record stored before the address rules (written directly, as an old one would be):
    a job waiting for it fails at its first claim; a chain naming it skips it; a new job for it
    is refused. It never receives a login or a push."""
    job_id, dispatcher, world = queue(None)
    chained_id, chained_dispatcher, chained_world = queue([4, 6])
    with session_scope() as session:
        session.execute(update(Registry).where(Registry.id == 5).values(url=url, host=host))
        session.execute(update(Registry).where(Registry.id == 4).values(url=url, host=host))
    dispatcher.start_chain(job_id, 5)
    job, _ = outcome(job_id)
    assert (job.status, job.error_code) == ("failed", "invalid_registry")
    assert "stored address is refused" in (job.error_message or "") or "canonical" in (
        job.error_message or ""
    )
    assert (world.logins, world.pushes) == ([], [])
    # Registry 5 now is the odd record, so the chained job fails at its first claim too; its
    # chain member 4 (also odd) is checked when a fallback would reach it:
    chained_dispatcher.start_chain(chained_id, 5)
    assert outcome(chained_id)[0].status == "failed"
    assert host not in chained_world.logins and chained_world.pushes == []
    with pytest.raises(ValidationError), session_scope() as session:
        create_job(session, PushRequest(SOURCE, 5, "team/app", "v2", "t"), actor="t")


def test_an_odd_chain_member_is_skipped_when_the_fallback_reaches_it(registries: None) -> None:
    """Chain [4, 6] where 4 became an odd record after the job was queued: 5 refuses, 4 is
    skipped (named), 6 gets the push."""
    job_id, dispatcher, world = queue([4, 6])
    with session_scope() as session:
        session.execute(
            update(Registry)
            .where(Registry.id == 4)
            .values(url="https://docker.io.", host="docker.io.")
        )
    refuse_login(world, 5)
    dispatcher.start_chain(job_id, 5)
    job, log = outcome(job_id)
    assert (job.status, job.effective_registry_id) == ("succeeded", 6)
    assert "docker.io." not in world.logins and "docker.io" not in world.logins
    (applied,) = [payload for kind, payload in log if kind == "fallback.applied"]
    skipped = applied["skipped"]
    assert isinstance(skipped, list) and skipped[0]["registry_id"] == 4
    assert "stored address is refused" in skipped[0]["reason"]


def test_a_stored_chain_naming_a_removed_registry_is_refused_at_job_creation(
    registries: None,
) -> None:
    """A chain stored before removals cleaned chains is checked when a job would copy it."""
    with session_scope() as session:
        session.execute(update(Registry).where(Registry.id == 5).values(fallback_chain=[4]))
    mark_removed(4)
    with pytest.raises(InvalidFallbackChain, match="stored fallback chain of registry 5"):
        queue(None)
    with pytest.raises(PushWorkerError, match="was removed"):
        queue([4])


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    chain=st.permutations([4, 6]).flatmap(lambda p: st.integers(0, 2).map(lambda n: list(p[:n]))),
    removed=st.sets(st.sampled_from([4, 6])),
    refusing=st.sets(st.sampled_from([5, 4, 6])),
)
def test_removed_registries_never_receive_anything(
    registries: None, chain: list[int], removed: set[int], refusing: set[int]
) -> None:
    """For any chain, any registries removed after the job was queued and any refusals: no
    login or push ever names a removed registry's host; the job ends on the first usable
    accepting registry of its route, or fails."""
    job_id, dispatcher, world = queue(chain)
    mark_removed(*removed)
    try:
        for rid in refusing:
            refuse_login(world, rid)
        dispatcher.start_chain(job_id, 5)
        job, _ = outcome(job_id)
    finally:
        mark_removed(*removed, removed=False)
    touched = {*world.logins, *(ref.split("/", 1)[0] for ref in world.pushes)}
    assert not touched & {HOSTS[rid] for rid in removed}
    if 5 in removed:
        assert (job.status, job.error_code) == ("failed", "registry_not_found")
        return
    usable = [rid for rid in [5, *chain] if rid not in removed]
    target = next((rid for rid in usable if rid not in refusing), None)
    if target is None:
        assert job.status == "failed"
    else:
        assert (job.status, job.effective_registry_id) == ("succeeded", target)


@pytest.mark.parametrize("step", STEPS, ids=STEP_NAMES)
def test_only_the_steps_that_say_so_move_a_job(step: Step) -> None:
    """An authentication failure moves a job along its chain at the steps whose entry in the
    list of steps allows it (login and push), and at no other."""
    job = PushJob(requested_registry_id=5, effective_registry_id=5, fallback_chain=[4])
    plan = plan_fallback(job, step, AuthenticationError("refused"), lambda _rid: None)
    assert plan.to == (4 if step.name in ("login", "push") else None)
