"""The four steps for sources other than the Docker Engine, with a fake copier and fake
registries on a real event log: the pin is recorded once and copied by digest, a source that
moves after the pin changes nothing, a destination refusal may fall back and a source refusal
never does; job creation refuses what can never work, before anything is recorded."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.support.fakes import (
    FakeEngine,
    FakeHttp,
    FakeWorld,
    InlineDispatcher,
    RecordingDispatcher,
)
from worker.api.app import create_app
from worker.contract import handle_submission
from worker.core.errors import (
    AuthenticationError,
    InvalidReference,
    InvalidRegistry,
    PushWorkerError,
    RegistryNotFound,
    ValidationError,
)
from worker.core.queues import SKOPEO_QUEUE, queue_for
from worker.core.settings import Settings, get_settings
from worker.engine.pipeline import StepRunner
from worker.jobs import PushRequest, create_job, route_of
from worker.registries import RegistrySpec, create_registry
from worker.seams.skopeo import CopySource, RegistryAccess
from worker.store.db import session_scope
from worker.store.models import PushJob
from worker.store.queries import select_events
from worker.tokens import create_token

DEST, ORIGIN, ALT = "reg.example.com:10443", "origin.example.com", "alt.example.com"


class FakeCopier:
    """Sources by skopeo name -> manifest digest; copies recorded and applied to the world."""

    def __init__(self, world: FakeWorld) -> None:
        self.world = world
        self.digests: dict[str, str] = {}
        self.copies: list[tuple[str, str]] = []
        self.refusals: dict[str, PushWorkerError] = {}  # destination host -> error at copy

    def manifest_digest(self, source: CopySource) -> str:
        return self.digests[str(source)]

    def copy(self, source: CopySource, destination: str, access: RegistryAccess) -> str:
        self.copies.append((str(source), destination))
        refusal = self.refusals.get(access.endpoint.host)
        if refusal is not None:
            self.world.refused_by_engine.add(access.endpoint.host)
            raise refusal
        _, at, digest = str(source).partition("@")
        copied = digest if at else self.digests[str(source)]
        if ":" in destination.rsplit("/", 1)[1]:
            self.world.served[destination] = copied
        return copied


def digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def registries(database_url: str) -> None:
    with session_scope() as session:
        for rid, host in ((3, ORIGIN), (4, ALT), (5, DEST)):
            spec = RegistrySpec(name=f"r{rid}", url=f"https://{host}", username="u", secret="pw")
            create_registry(session, spec, registry_id=rid)


@pytest.fixture
def sources_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "sources"
    (directory / "app").mkdir(parents=True)
    (directory / "app" / "oci-layout").write_text("{}")
    # Read by job creation and by the steps alike, as in the producer's and the worker's process.
    monkeypatch.setenv("PUSHWORKER_SOURCES_DIR", str(directory))
    get_settings.cache_clear()
    return directory


def runner_for(world: FakeWorld, copier: FakeCopier) -> StepRunner:
    settings = dataclasses.replace(
        Settings.from_env(), max_attempts=2, retry_base=0.0, retry_max=0.0
    )
    dispatcher = InlineDispatcher()

    def no_engine() -> FakeEngine:
        raise AssertionError("a copied source never needs the Docker Engine")

    runner = StepRunner(
        dispatcher=dispatcher,
        engine_factory=no_engine,
        settings=settings,
        http_factory=lambda registry, _credential, _timeout: FakeHttp(world, registry),
        copier_factory=lambda: copier,
    )
    dispatcher.runner = runner
    return runner


def enqueue(source: str, fallback: list[int] | None = None, tag: str = "v1") -> str:
    request = PushRequest("", 5, "team/app", tag, "tester", fallback=fallback, source=source)
    with session_scope() as session:
        job, _ = create_job(session, request, actor="producer:tester")
        return job.id


def run(runner: StepRunner, job_id: str) -> tuple[PushJob, list[dict[str, object]]]:
    assert isinstance(runner.dispatcher, InlineDispatcher)
    with session_scope() as session:
        registry = session.get(PushJob, job_id)
        assert registry is not None
        start = registry.effective_registry_id
    runner.dispatcher.start_chain(job_id, start)
    with session_scope() as session:
        job = session.get(PushJob, job_id)
        assert job is not None
        session.expunge(job)
        found = [{"type": e.type, "step": e.step, **(e.payload or {})}
                 for e in select_events(session, job_id=job_id)]  # fmt: skip
    return job, found


def test_a_promotion_pins_the_source_and_copies_that_digest(registries: None) -> None:
    world = FakeWorld()
    copier = FakeCopier(world)
    pinned = digest("index-1")
    world.served[f"{ORIGIN}/team/app:1.0"] = pinned  # what the source registry answers
    job_id = enqueue("registry:3/team/app:1.0")
    runner = runner_for(world, copier)
    # The source's tag moves after the pin: the push still copies the pinned digest.
    original_pin = runner.step("tag").action

    def pin_then_move(ctx):  # type: ignore[no-untyped-def]
        result = original_pin(ctx)
        world.served[f"{ORIGIN}/team/app:1.0"] = digest("index-2")
        return result

    runner.steps = tuple(
        dataclasses.replace(s, action=pin_then_move) if s.name == "tag" else s for s in runner.steps
    )
    job, found = run(runner, job_id)
    assert job.status == "succeeded", found
    assert job.source_digest == pinned and job.digest == pinned
    assert copier.copies == [(f"docker://{ORIGIN}/team/app@{pinned}", f"{DEST}/team/app:v1")]
    assert world.served[f"{DEST}/team/app:v1"] == pinned
    pin = next(e for e in found if e["type"] == "step.succeeded" and e["step"] == "tag")
    assert pin["action"] == "pin" and pin["source_digest"] == pinned
    assert found[0]["source"] == "registry:3/team/app:1.0" and found[0]["source_registry_id"] == 3


def test_a_source_the_registry_does_not_serve_fails_the_job_unread(registries: None) -> None:
    world = FakeWorld()
    copier = FakeCopier(world)
    job_id = enqueue("registry:3/team/app:missing")
    job, _ = run(runner_for(world, copier), job_id)
    assert job.status == "failed" and job.error_code == "source_image_not_found"
    assert copier.copies == [] and job.source_digest is None


def test_a_source_registry_that_answers_no_digest_is_never_copied_from(registries: None) -> None:
    world = FakeWorld()
    world.served[f"{ORIGIN}/team/app:1.0"] = "sha256:x\x1b]0;title\x07 --src-creds=a:b"
    copier = FakeCopier(world)
    job, _ = run(runner_for(world, copier), enqueue("registry:3/team/app:1.0"))
    assert job.status == "failed" and job.error_code == "registry_misbehaved"
    assert copier.copies == [] and job.source_digest is None


def test_a_file_source_is_copied_by_digest_then_tagged(registries: None, sources_dir: Path) -> None:
    world = FakeWorld()
    copier = FakeCopier(world)
    pinned = digest("layout")
    copier.digests[f"oci:{sources_dir / 'app'}"] = pinned
    job_id = enqueue("oci-layout:app")
    job, found = run(runner_for(world, copier), job_id)
    assert job.status == "succeeded", found
    assert copier.copies == [
        (f"oci:{sources_dir / 'app'}", f"{DEST}/team/app@{pinned}"),
        (f"docker://{DEST}/team/app@{pinned}", f"{DEST}/team/app:v1"),
    ]
    # Run again: the registry serves the tag at the pinned digest, nothing is copied.
    copier.copies.clear()
    job_id = enqueue("oci-layout:app")
    job, found = run(runner_for(world, copier), job_id)
    assert job.status == "succeeded" and copier.copies == []
    assert any(e["type"] == "step.skipped" and "already serves" in str(e["reason"])
               for e in found if e["step"] == "push")  # fmt: skip


def test_a_destination_refusal_falls_back(registries: None) -> None:
    world = FakeWorld(check_errors={DEST: AuthenticationError(f"{DEST} rejected: HTTP 401")})
    copier = FakeCopier(world)
    pinned = digest("index")
    world.served[f"{ORIGIN}/team/app:{pinned}"] = pinned
    job_id = enqueue(f"registry:3/team/app@{pinned}", fallback=[4])
    job, found = run(runner_for(world, copier), job_id)
    assert job.status == "succeeded", found
    assert job.effective_registry_id == 4
    assert "fallback.applied" in [e["type"] for e in found]
    assert copier.copies == [(f"docker://{ORIGIN}/team/app@{pinned}", f"{ALT}/team/app:v1")]


def test_a_source_refusal_never_falls_back(registries: None) -> None:
    world = FakeWorld(check_errors={ORIGIN: AuthenticationError(f"{ORIGIN} rejected: HTTP 401")})
    copier = FakeCopier(world)
    job_id = enqueue("registry:3/team/app:1.0", fallback=[4])
    job, found = run(runner_for(world, copier), job_id)
    assert job.status == "failed"
    assert job.error_code == "source_authentication_failed"
    assert job.effective_registry_id == 5
    assert "fallback.applied" not in [e["type"] for e in found]
    assert copier.copies == []


def test_a_refusal_skopeo_reports_counts_only_when_the_registry_confirms(
    registries: None,
) -> None:
    world = FakeWorld(check_errors={DEST: None})  # /v2/ accepts the credential
    copier = FakeCopier(world)
    world.served[f"{ORIGIN}/team/app:1.0"] = digest("i")
    copier.refusals[DEST] = AuthenticationError(f"registry {DEST} rejected: unauthorized")
    job_id = enqueue("registry:3/team/app:1.0", fallback=[4])
    job, found = run(runner_for(world, copier), job_id)
    assert job.status == "failed" and job.error_code == "registry_misbehaved"
    assert "fallback.applied" not in [e["type"] for e in found]


def test_routing_sends_copied_sources_to_the_skopeo_queue(registries: None) -> None:
    copied = enqueue("registry:3/team/app:1.0")
    assert route_of(copied) == (None, "skopeo")
    assert queue_for(*route_of(copied)) == SKOPEO_QUEUE
    assert queue_for(*route_of("no-such-job")) == "pushworker"


@pytest.mark.parametrize(
    ("source", "error", "words"),
    [
        ("registry:9/team/app:1", RegistryNotFound, "9"),
        ("registry:3/evil.example.com/app:1", InvalidReference, "names a host of its own"),
        ("oci-layout:app", ValidationError, "PUSHWORKER_SOURCES_DIR is not set"),
        ("oci-layout:../app", ValidationError, "PUSHWORKER_SOURCES_DIR is not set"),
        ("app:build", ValidationError, "does not start with a kind"),
    ],
)
def test_job_creation_refuses_sources_that_cannot_work(
    registries: None, source: str, error: type[PushWorkerError], words: str
) -> None:
    with pytest.raises(error) as refused:
        enqueue(source)
    assert words in str(refused.value)
    with session_scope() as session:
        assert session.query(PushJob).count() == 0


def test_a_source_and_an_image_together_are_refused(registries: None) -> None:
    request = PushRequest("app:1", 5, "team/app", "v1", "t", source="registry:3/team/app:1")
    with session_scope() as session, pytest.raises(ValidationError, match="not both"):
        create_job(session, request, actor="t")
    request = PushRequest("", 5, "team/app", "v1", "t", docker_host="b1",
                          source="registry:3/team/app:1")  # fmt: skip
    with session_scope() as session, pytest.raises(ValidationError, match="uses none"):
        create_job(session, request, actor="t")


def test_a_source_registry_removed_after_enqueue_fails_the_job_unread(registries: None) -> None:
    from worker.registries import remove_registry

    world = FakeWorld()
    copier = FakeCopier(world)
    job_id = enqueue("registry:3/team/app:1.0")
    with session_scope() as session:
        remove_registry(session, 3, actor="t")
    job, _ = run(runner_for(world, copier), job_id)
    assert job.status == "failed" and job.error_code == "registry_not_found"
    assert copier.copies == []


def test_the_guard_refuses_a_source_record_with_a_docker_hub_host(registries: None) -> None:
    """A source record whose stored host today's rules refuse is never read from."""
    with session_scope() as session:
        from worker.store.models import Registry

        record = session.get(Registry, 3)
        assert record is not None
        record.host, record.url = "registry-1.docker.io.", "https://registry-1.docker.io."
    with pytest.raises(InvalidRegistry, match="registry 3's stored address is refused"):
        enqueue("registry:3/team/app:1.0")


# --- the message contract and the HTTP API ------------------------------------------------------


def test_the_contract_takes_a_source_instead_of_an_image(
    registries: None, dispatched: RecordingDispatcher
) -> None:
    base = {"registry_id": 5, "repository": "team/app", "tag": "1", "requested_by": "p"}
    accepted = handle_submission(
        [{**base, "source": "registry:3/team/app:1.0", "idempotency_key": "k1"}], {},
        submission_id=str(uuid.uuid4()),
    )  # fmt: skip
    assert accepted.accepted and accepted.job_id is not None
    assert route_of(accepted.job_id) == (None, "skopeo")
    for body, words in (
        ({**base, "idempotency_key": "k2"}, "missing field(s) 'source_image' (or 'source'"),
        ({**base, "idempotency_key": "k3", "source": "registry:3/a:1", "source_image": "a:1"},
         "give only one of the fields 'source_image' and 'source'"),
        ({**base, "idempotency_key": "k4", "source": "oci:x"}, "does not start with a kind"),
    ):  # fmt: skip
        rejected = handle_submission([body], {}, submission_id=str(uuid.uuid4()))
        assert not rejected.accepted
        with session_scope() as session:
            event = select_events(session, stream=rejected.stream)[0]
        assert words in event.payload["error_message"], event.payload
    assert len(dispatched.chains) == 1


def test_the_api_takes_a_source_and_scopes_its_registry(
    registries: None, dispatched: RecordingDispatcher
) -> None:
    narrow, _ = create_token("narrow", "producer", actor="operator:t", registry_ids=[5])
    wide, _ = create_token("wide", "producer", actor="operator:t", registry_ids=[3, 5])
    body = {"source": "registry:3/team/app:1.0", "registry_id": 5, "repository": "team/app",
            "tag": "1"}  # fmt: skip
    with TestClient(create_app()) as client:
        asking = {"Authorization": f"Bearer {narrow}", "Idempotency-Key": "a"}
        refused = client.post("/v1/pushes", json=body, headers=asking)
        assert refused.status_code == 403 and "registry 3" in refused.json()["message"]
        headers = {"Authorization": f"Bearer {wide}", "Idempotency-Key": "b"}
        made = client.post("/v1/pushes", json=body, headers=headers)
        assert made.status_code == 201, made.text
        job = made.json()
        assert (job["source_kind"], job["source_image"]) == ("registry", body["source"])
        again = client.post("/v1/pushes", json=body, headers=headers)
        assert again.status_code == 200 and again.json()["id"] == job["id"]
        other = client.post("/v1/pushes", json={**body, "source": "registry:3/team/app:2.0"},
                            headers=headers)  # fmt: skip
        assert other.status_code == 409
    assert dispatched.chains == [(job["id"], 5)]
