"""The steps of a push job: what each does, as a plain function of a ``StepContext`` (no Celery,
no transactions), and ``STEPS``, the one list of them in order.

Each returns a ``StepResult``; a step that finds its effect already in place says so in
``noop`` (recorded as ``step.skipped``), which is what makes re-running a chain harmless.

``STEPS`` drives everything that depends on which steps exist: the Celery tasks
(``tasks/push.py``, one per step), the chain the dispatcher sends, the message guard's task
names, the claim leases and the fallback policy. Adding a step means adding it there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from worker.core.credentials import Credential, resolve_credential
from worker.core.errors import (
    AuthenticationError,
    PushVerificationFailed,
    RegistryError,
    RegistryMisbehaved,
    SourceImageNotFound,
)
from worker.core.reference import TargetReference, assert_resolves_to, build_target
from worker.core.settings import Settings
from worker.engine.targets import endpoint_of
from worker.seams.docker_engine import LocalImage, ProgressCallback
from worker.seams.protocols import ContainerEngine, RegistryClient
from worker.seams.registry_http import RegistryEndpoint, shared_client
from worker.store.models import PushJob, Registry

T = TypeVar("T")


#: Makes the registry HTTP client a step uses: by default the process's shared one
#: (``worker.seams.registry_http`` keeps them for their keep-alive connections), a fake in fast
#: tests.
HttpFactory = Callable[[RegistryEndpoint, Credential | None, float], RegistryClient]


@dataclass
class StepContext:
    job: PushJob
    registry: Registry
    engine: Callable[[], ContainerEngine]
    http_factory: HttpFactory = shared_client
    http_timeout: float = 10
    on_progress: ProgressCallback | None = None
    #: Which try of the step this is (1 for the first).
    attempt: int = 1

    def target(self) -> TargetReference:
        return build_target(self.registry.host, self.job.repository, self.job.tag)

    def credential(self) -> Credential | None:
        # Resolved in the step's own process, every time: secrets never travel between steps.
        return resolve_credential(self.registry)

    def http(self, credential: Credential | None) -> RegistryClient:
        return self.http_factory(endpoint_of(self.registry), credential, self.http_timeout)


@dataclass(frozen=True)
class StepResult:
    payload: dict[str, Any] = field(default_factory=dict)
    #: Why nothing had to be done, when the step's effect was already in place.
    noop: str | None = None


def resolve_credentials(ctx: StepContext) -> StepResult:
    credential = ctx.credential()
    ctx.target()  # a malformed reference fails here, before anything touches the registry
    if credential is None:
        return StepResult({"credential_source": "anonymous"})
    return StepResult({"credential_source": credential.source, "username": credential.username})


def login(ctx: StepContext) -> StepResult:
    credential = ctx.credential()
    if credential is None:
        # Anonymous: prove the registry answers and does not ask for credentials.
        ctx.http(None).check_credentials()
        return StepResult({"credential_source": "anonymous"})
    # A retry asks the registry again: the try before failed (in this process or another
    # one), so a login remembered from earlier proves nothing about now.
    fresh = ctx.attempt > 1
    engine = ctx.engine()
    address = _login_address(ctx.registry)
    if not _confirmed(ctx, credential, lambda: engine.login(address, credential, reuse=not fresh)):
        reason = "this worker's engine accepted the same credential for this registry recently"
        return StepResult({"username": credential.username}, noop=reason)
    return StepResult({"username": credential.username})


def _login_address(registry: Registry) -> str:
    return "https://index.docker.io/v1/" if registry.kind == "dockerhub" else registry.host


def tag(ctx: StepContext) -> StepResult:
    target = ctx.target()
    engine = ctx.engine()
    source = _source_image(ctx, engine)
    payload = {"reference": str(target), "image_id": source.id}
    if str(target) in source.tags:
        return StepResult(payload, noop="the target already names the source image")
    engine.tag(ctx.job.source_image, target)
    return StepResult(payload)


def push(ctx: StepContext) -> StepResult:
    target = ctx.target()
    # Re-checked right before the push, whatever happened since the tag step.
    assert_resolves_to(target.name, ctx.registry.host, ctx.job.repository)
    engine = ctx.engine()
    source = _source_image(ctx, engine)
    if str(target) not in source.tags:
        engine.tag(ctx.job.source_image, target)  # another job re-pointed the tag meanwhile
    credential = ctx.credential()
    http = ctx.http(credential)
    served = _digest_if_served(source, http, target)
    if served:
        payload = {"reference": str(target), "digest": served}
        return StepResult(payload, noop="the registry already serves this tag at the local digest")
    result = _confirmed(ctx, credential, lambda: engine.push(target, credential, ctx.on_progress))
    remote = http.manifest_digest(target.repository, target.tag)
    if remote != result.digest:
        raise PushVerificationFailed(
            f"registry {ctx.registry.host} serves {target} at {remote}, "
            f"not at the pushed digest {result.digest}",
            hint="another writer may have pushed the same tag; the step retries",
        )
    return StepResult({"reference": str(target), "digest": result.digest, "size": result.size})


def _confirmed(ctx: StepContext, credential: Credential | None, call: Callable[[], T]) -> T:
    """Run an engine call that authenticates (login, push); a refusal it reports counts only
    once the registry's own HTTP API refuses the same credential too.

    The engine's word alone is not enough: when its ``/v2/`` ping fails (a 5xx window) it goes
    on without credentials and then reports "unauthorized", and a fallback on that word would
    send the image to another registry because of an outage.
    """
    try:
        return call()
    except AuthenticationError as claim:
        raise _checked_refusal(ctx, credential, claim) from None


def _checked_refusal(
    ctx: StepContext, credential: Credential | None, claim: AuthenticationError
) -> RegistryError:
    """The error a refusal reported by the engine really is, once the registry was asked:

    * refused there too: the engine's AuthenticationError (confirmed; fallback may apply);
    * the check failed otherwise (unreachable, 5xx, 429, TLS): that error, never a refusal;
    * the credential works: RegistryMisbehaved (retried).

    Each carries both answers under ``observed`` (the registry's words, never the secret).
    """
    observed = {"engine": _brief(claim.message)}
    error: RegistryError
    try:
        ctx.http(credential).check_credentials()
    except AuthenticationError as answer:
        observed["registry"] = _brief(answer.message)
        error = claim
    except RegistryError as answer:
        observed["registry"] = _brief(f"{answer.code}: {answer.message}")
        error = answer
    else:
        observed["registry"] = "GET /v2/ accepted the credential"
        error = RegistryMisbehaved(
            f"the Docker Engine reported that registry {ctx.registry.host} refused the "
            f"credential ({_brief(claim.message)}), but the registry accepts it when asked "
            "directly: the registry (or a proxy in front of it) misbehaved",
            hint="the step retries; if it keeps happening, look at the registry's logs",
        )
    error.observed = {**error.observed, **observed}
    return error


def _brief(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _source_image(ctx: StepContext, engine: ContainerEngine) -> LocalImage:
    """The job's source image, with the tags and digests it has on the engine.

    The target counts as tagged only when the engine lists it among the source's own tags:
    a tag that names another image (re-pointed by another job) is not, and is tagged again.
    """
    source = engine.image(ctx.job.source_image)
    if source is None:
        raise SourceImageNotFound(
            f"the Docker Engine has no image {ctx.job.source_image!r}",
            hint="build or load the source image on this worker's engine, then retry the job",
        )
    return source


def _digest_if_served(
    source: LocalImage, http: RegistryClient, target: TargetReference
) -> str | None:
    """The digest, when the registry already serves the tag at a digest this image has there."""
    local = {
        entry.split("@", 1)[1] for entry in source.digests if entry.split("@", 1)[0] == target.name
    }
    if not local:
        return None
    remote = http.manifest_digest(target.repository, target.tag)
    return remote if remote in local else None


Action = Callable[[StepContext], StepResult]


def standard_lease(_settings: Settings) -> float:
    """Five minutes: a step that talks to the engine or the registry for longer has died."""
    return 300.0


def push_lease(settings: Settings) -> float:
    """A push may run as long as its timeout allows."""
    return settings.push_timeout


@dataclass(frozen=True)
class Step:
    """One step of a push job: its name (its Celery task is ``worker.core.queues.step_task`` of
    it), what it does, and the policies that depend on which step it is."""

    name: str
    action: Action
    #: How long a claim on this step stands before another worker may take the step over.
    lease: Callable[[Settings], float] = standard_lease
    #: Whether an authentication failure here moves the job to the next registry of its chain.
    may_fall_back: bool = False


#: The steps of every push job, in the order the chain runs them (part of the contract with
#: producers and operators).
STEPS: tuple[Step, ...] = (
    Step("resolve_credentials", resolve_credentials),
    Step("login", login, may_fall_back=True),
    Step("tag", tag),
    Step("push", push, lease=push_lease, may_fall_back=True),
)
STEP_NAMES: tuple[str, ...] = tuple(step.name for step in STEPS)
