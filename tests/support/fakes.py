"""Fakes of the two seams (Docker Engine, registry HTTP; they implement the Protocols of
``worker.seams.protocols``), an inline dispatcher and a recording one.

For fast unit tests of the pipeline's logic only; end-to-end tests use the real stack.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from worker.core.credentials import Credential
from worker.core.errors import AuthenticationError, PushWorkerError, SourceImageNotFound
from worker.core.reference import TargetReference
from worker.core.settings import Settings
from worker.engine.pipeline import Outcome, StepRunner
from worker.engine.steps import STEPS, Action, Step, StepContext, StepResult
from worker.jobs import cancel_job
from worker.seams.docker_engine import LocalImage, ProgressCallback, PushResult
from worker.seams.registry_http import Challenge, RegistryEndpoint
from worker.store.db import session_scope


@dataclass
class FakeWorld:
    """What the fake daemon and the fake registries hold, and what they will refuse."""

    images: dict[str, str] = field(default_factory=dict)  # reference -> image id
    repo_digests: dict[str, list[str]] = field(default_factory=dict)  # image id -> name@digest
    served: dict[str, str] = field(default_factory=dict)  # "host/repo:tag" -> digest
    #: host -> the error the registry answers with at login / push (None = accepts).
    login_errors: dict[str, PushWorkerError | None] = field(default_factory=dict)
    push_errors: dict[str, list[PushWorkerError]] = field(default_factory=dict)
    pushes: list[str] = field(default_factory=list)  # every push attempted, in order
    logins: list[str] = field(default_factory=list)
    #: Whether each login allowed the engine to reuse a recent one.
    login_reuse: list[bool] = field(default_factory=list)
    #: host -> what the registry's HTTP API answers when a credential is checked (None =
    #: accepts). Unset: a host whose engine refused a credential refuses it here too.
    check_errors: dict[str, PushWorkerError | None] = field(default_factory=dict)
    refused_by_engine: set[str] = field(default_factory=set)


class FakeEngine:
    def __init__(self, world: FakeWorld) -> None:
        self.world = world

    def ping(self) -> None:
        return None

    def image(self, reference: str) -> LocalImage | None:
        image = self.world.images.get(reference)
        if image is None:
            return None
        tags = frozenset(name for name, held in self.world.images.items() if held == image)
        return LocalImage(image, tags, frozenset(self.world.repo_digests.get(image, [])))

    def tag(self, source: str, target: TargetReference) -> None:
        if source not in self.world.images:
            raise SourceImageNotFound(f"no image {source}")
        self.world.images[str(target)] = self.world.images[source]

    def login(self, registry_host: str, credential: Credential, *, reuse: bool = True) -> bool:
        self.world.logins.append(registry_host)
        self.world.login_reuse.append(reuse)
        error = self.world.login_errors.get(registry_host)
        if error is not None:
            self._note_refusal(registry_host, error)
            raise error
        return True

    def forget_logins(self, registry_host: str) -> None:
        return None  # this engine remembers no login: each one is asked of the world

    def _note_refusal(self, host: str, error: PushWorkerError) -> None:
        if isinstance(error, AuthenticationError):
            self.world.refused_by_engine.add(host)

    def push(
        self,
        target: TargetReference,
        credential: Credential | None,
        on_progress: ProgressCallback | None = None,
    ) -> PushResult:
        self.world.pushes.append(str(target))
        queued = self.world.push_errors.get(target.host) or []
        if queued:
            self._note_refusal(target.host, queued[0])
            raise queued.pop(0)
        image = self.world.images[str(target)]
        digest = "sha256:" + hashlib.sha256(image.encode()).hexdigest()
        self.world.served[str(target)] = digest
        self.world.repo_digests.setdefault(image, []).append(f"{target.name}@{digest}")
        if on_progress:
            on_progress(100, 100, 1, 1)
        return PushResult(digest=digest, size=100)


#: What ``GET /v2/`` answers on every fake registry: no authentication asked.
OPEN = Challenge(200, "", {})


class FakeHttp:
    def __init__(self, world: FakeWorld, registry: RegistryEndpoint) -> None:
        self.world, self.host = world, registry.host

    def ping(self) -> Challenge:
        return OPEN

    def manifest_digest(self, repository: str, tag: str) -> str | None:
        return self.world.served.get(f"{self.host}/{repository}:{tag}")

    def check_credentials(self) -> Challenge:
        if self.host in self.world.check_errors:
            error = self.world.check_errors[self.host]
            if error is not None:
                raise error
        elif self.host in self.world.refused_by_engine:
            raise AuthenticationError(f"registry {self.host} rejected the credentials: HTTP 401")
        return OPEN

    def close(self) -> None:
        return None


class InlineDispatcher:
    """Runs a job's chain synchronously, the way the Celery chain would, retries included."""

    def __init__(self) -> None:
        self.runner: StepRunner | None = None
        self.chains: list[tuple[str, int]] = []

    def start_chain(self, job_id: str, registry_id: int) -> None:
        assert self.runner is not None
        self.chains.append((job_id, registry_id))
        for step in self.runner.steps:
            outcome = self.runner.run(step.name, job_id, registry_id)
            while outcome.action == "retry":
                outcome = self.runner.run(step.name, job_id, registry_id)
            if outcome.action == "stop":
                return


@dataclass
class RecordingDispatcher:
    """Records each chain it is asked to start instead of publishing it: no broker, no worker.
    ``then``, when set, runs in the worker's place (to finish the job at once, say)."""

    chains: list[tuple[str, int]] = field(default_factory=list)
    then: Callable[[str, int], object] | None = None

    def start_chain(self, job_id: str, registry_id: int) -> None:
        self.chains.append((job_id, registry_id))
        if self.then is not None:
            self.then(job_id, registry_id)


def wrap_action(
    name: str, wrap: Callable[[Action], Action], steps: tuple[Step, ...] = STEPS
) -> tuple[Step, ...]:
    """``steps`` with the action of the step called ``name`` replaced by ``wrap`` of it."""
    return tuple(
        dataclasses.replace(step, action=wrap(step.action)) if step.name == name else step
        for step in steps
    )


def cancelled_while_acting(
    job_id: str, then: Callable[[], PushWorkerError] | None = None
) -> Callable[[Action], Action]:
    """A wrapper for ``wrap_action``: the operator cancels the job (committed, a session of its
    own) while the step acts; the action then runs as it would, or raises ``then()``.

    Not for a ``local`` step (``Step.local``): its action runs inside its claim's transaction,
    which the cancel would wait for (on PostgreSQL, for ever)."""

    def wrap(action: Action) -> Action:
        def act(ctx: StepContext) -> StepResult:
            with session_scope() as session:
                cancel_job(session, job_id, actor="operator:tester", reason="wrong tag")
            if then is not None:
                raise then()
            return action(ctx)

        return act

    return wrap


def fake_runner(
    world: FakeWorld, settings: Settings, steps: tuple[Step, ...] = STEPS
) -> tuple[StepRunner, InlineDispatcher]:
    dispatcher = InlineDispatcher()
    engine = FakeEngine(world)
    runner = StepRunner(
        dispatcher=dispatcher,
        engine_factory=lambda: engine,
        settings=settings,
        http_factory=lambda registry, _credential, _timeout: FakeHttp(world, registry),
        steps=steps,
    )
    dispatcher.runner = runner
    return runner, dispatcher


__all__ = [
    "FakeWorld",
    "InlineDispatcher",
    "Outcome",
    "RecordingDispatcher",
    "fake_runner",
    "wrap_action",
]
