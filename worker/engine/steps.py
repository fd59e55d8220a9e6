"""The steps of a push job: what each does, as a plain function of a ``StepContext`` (no Celery,
no transactions), and ``STEPS``, the one list of them in order.

Each returns a ``StepResult``; a step that finds its effect already in place says so in
``noop`` (recorded as ``step.skipped``), which is what makes re-running a chain harmless.

``STEPS`` drives everything that depends on which steps exist: the Celery tasks
(``tasks/push.py``, one per step), the chain the dispatcher sends, the message guard's task
names, the claim leases and the fallback policy. Adding a step means adding it there.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

from worker.core.credentials import Credential, resolve_credential
from worker.core.errors import (
    AuthenticationError,
    PushVerificationFailed,
    RegistryError,
    RegistryMisbehaved,
    SourceAuthenticationFailed,
    SourceImageNotFound,
    ValidationError,
)
from worker.core.reference import (
    TargetReference,
    assert_resolves_to,
    build_target,
    check_registry_host,
    validate_repository,
)
from worker.core.settings import Settings, get_settings
from worker.core.sources import Source, SourceKind, docker_source, parse_source, resolve_path
from worker.engine.targets import endpoint_of
from worker.seams.docker_engine import LocalImage, ProgressCallback
from worker.seams.protocols import ContainerEngine, ImageCopier, RegistryClient
from worker.seams.registry_http import RegistryEndpoint, shared_client
from worker.seams.skopeo import CopySource, RegistryAccess, Skopeo
from worker.store.models import PushJob, Registry

T = TypeVar("T")


#: Makes the registry HTTP client a step uses: by default the process's shared one
#: (``worker.seams.registry_http`` keeps them for their keep-alive connections), a fake in fast
#: tests.
HttpFactory = Callable[[RegistryEndpoint, Credential | None, float], RegistryClient]


def default_copier() -> ImageCopier:
    """skopeo as the settings say (``PUSHWORKER_SKOPEO``, ``PUSHWORKER_PUSH_TIMEOUT``)."""
    settings = get_settings()
    return Skopeo(settings.skopeo, timeout=settings.push_timeout)


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
    #: What copies a source that is not the Docker Engine (never made for a ``docker`` job).
    copier: Callable[[], ImageCopier] = default_copier
    #: The registry a promotion reads from, loaded and checked with the claim.
    source_registry: Registry | None = None
    #: Held around the requests the registry counts as a push, and nothing else (flow control's
    #: slot, ``worker.engine.flow.FlowControl.upload``).
    upload: Callable[[], AbstractContextManager[object]] = nullcontext

    def source(self) -> Source:
        """The job's source, parsed again from what the job stores."""
        if self.job.source_kind == SourceKind.DOCKER:
            return docker_source(self.job.source_image)
        source = parse_source(self.job.source_image)
        if source.kind != self.job.source_kind:
            raise ValidationError(f"job {self.job.id}'s source does not match its kind")
        return source

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
    if ctx.job.source_kind != SourceKind.DOCKER:
        return _resolve_copy(ctx)
    credential = ctx.credential()
    ctx.target()  # a malformed reference fails here, before anything touches the registry
    if credential is None:
        return StepResult({"credential_source": "anonymous"})
    return StepResult({"credential_source": credential.source, "username": credential.username})


def login(ctx: StepContext) -> StepResult:
    if ctx.job.source_kind != SourceKind.DOCKER:
        return _login_copy(ctx)
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
    if ctx.job.source_kind != SourceKind.DOCKER:
        return pin(ctx)
    target = ctx.target()
    engine = ctx.engine()
    source = _source_image(ctx, engine)
    payload = {"reference": str(target), "image_id": source.id}
    if str(target) in source.tags:
        return StepResult(payload, noop="the target already names the source image")
    engine.tag(ctx.job.source_image, target)
    return StepResult(payload)


def push(ctx: StepContext) -> StepResult:
    if ctx.job.source_kind != SourceKind.DOCKER:
        return _push_copy(ctx)
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
    with ctx.upload():
        result = _confirmed(
            ctx, credential, lambda: engine.push(target, credential, ctx.on_progress)
        )
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
    return _asked_directly(
        claim, lambda: ctx.http(credential).check_credentials(), AuthenticationError,
        what=f"the Docker Engine reported that registry {ctx.registry.host}",
    )  # fmt: skip


def _asked_directly(
    claim: RegistryError,
    check: Callable[[], object],
    refusal: type[RegistryError],
    *,
    what: str,
) -> RegistryError:
    """A refusal a tool reported (the Docker Engine, skopeo), checked by asking the registry
    itself (``check``: its ``/v2/`` with the same credential). One mechanism for every side
    that can fall back or fail a job on a refusal; see ``_checked_refusal``."""
    observed = {"engine": _brief(claim.message)}
    error: RegistryError
    try:
        check()
    except refusal as answer:
        observed["registry"] = _brief(answer.message)
        error = claim
    except RegistryError as answer:
        observed["registry"] = _brief(f"{answer.code}: {answer.message}")
        error = answer
    else:
        observed["registry"] = "GET /v2/ accepted the credential"
        error = RegistryMisbehaved(
            f"{what} refused the credential ({_brief(claim.message)}), but the registry "
            "accepts it when asked directly: the registry (or a proxy in front of it) "
            "misbehaved",
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


# --- sources other than the Docker Engine: the same four steps, with skopeo -------------------
#
# resolve_credentials resolves both sides' credentials; login proves both against the registries'
# own /v2/ (a refusal there is the registry's word, so the destination's may fall back); the tag
# step becomes the pin: the source resolved to an immutable digest, recorded on the job; push
# copies that digest and then checks the destination's tag serves exactly it.


def _source_registry(ctx: StepContext) -> Registry:
    registry = ctx.source_registry
    if registry is None:
        raise ValidationError(f"job {ctx.job.id}'s source registry was not loaded")
    return registry


def _source_credential(ctx: StepContext) -> Credential | None:
    return resolve_credential(_source_registry(ctx))


def _source_name(ctx: StepContext, source: Source) -> str:
    """``host/repository`` of a promotion's source, through the same guard as a destination:
    Docker's own rules must resolve it to the source record's host and nothing else."""
    registry = _source_registry(ctx)
    if registry.id != source.registry_id:
        raise ValidationError(f"job {ctx.job.id}'s source registry is not the one it names")
    host = check_registry_host(registry.host)
    repository = validate_repository(source.repository or "")
    name = f"{host}/{repository}"
    assert_resolves_to(name, host, repository)
    return name


def _copy_source(ctx: StepContext, source: Source, digest: str | None = None) -> CopySource:
    """The source as skopeo names it; a registry's at ``digest`` when given (the pin)."""
    if source.kind is SourceKind.REGISTRY:
        name = _source_name(ctx, source)
        ref = (
            f"@{digest}" if digest else (f"@{source.digest}" if source.digest else f":{source.tag}")
        )
        access = RegistryAccess(endpoint_of(_source_registry(ctx)), _source_credential(ctx))
        return CopySource("docker", name + ref, access)
    path = resolve_path(source, get_settings())
    return CopySource("oci" if source.kind is SourceKind.OCI_LAYOUT else "docker-archive", path)


def _resolve_copy(ctx: StepContext) -> StepResult:
    source = ctx.source()
    credential = ctx.credential()
    ctx.target()  # a malformed destination fails here, before anything is read or sent
    payload: dict[str, Any] = {
        "source": str(source),
        "credential_source": credential.source if credential else "anonymous",
    }
    if credential is not None:
        payload["username"] = credential.username
    if source.kind is SourceKind.REGISTRY:
        _source_name(ctx, source)
        src = _source_credential(ctx)
        payload["source_registry_id"] = source.registry_id
        payload["source_credential_source"] = src.source if src else "anonymous"
        if src is not None:
            payload["source_username"] = src.username
    else:
        _copy_source(ctx, source)  # the path: inside PUSHWORKER_SOURCES_DIR, of the right type
    return StepResult(payload)


def _login_copy(ctx: StepContext) -> StepResult:
    """Both registries asked directly: their own answer is the confirmation, so a destination
    refusal here is an AuthenticationError (the fallback chain may apply) and a source refusal
    is a SourceAuthenticationFailed (it never does)."""
    credential = ctx.credential()
    ctx.http(credential).check_credentials()
    payload: dict[str, Any] = {
        "credential_source": credential.source if credential else "anonymous"
    }
    source = ctx.source()
    if source.kind is SourceKind.REGISTRY:
        _check_source_credential(ctx)
        payload["source_registry_id"] = source.registry_id
    return StepResult(payload)


def _source_http(ctx: StepContext) -> RegistryClient:
    registry = _source_registry(ctx)
    return ctx.http_factory(endpoint_of(registry), _source_credential(ctx), ctx.http_timeout)


def _check_source_credential(ctx: StepContext) -> None:
    try:
        _source_http(ctx).check_credentials()
    except AuthenticationError as refused:
        registry = _source_registry(ctx)
        error = SourceAuthenticationFailed(
            f"source {refused.message}",
            hint=f"set the credential of registry {registry.id} "
            f"(pushctl registry set-credential {registry.id}), then retry the job",
        )
        error.observed = dict(refused.observed)
        raise error from None


_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def pin(ctx: StepContext) -> StepResult:
    """The tag step of a copied source: its source resolved to an immutable digest, once per job
    (a fallback to another destination copies the same digest)."""
    source = ctx.source()
    target = ctx.target()
    payload: dict[str, Any] = {"action": "pin", "source": str(source), "reference": str(target)}
    if ctx.job.source_digest:
        payload["source_digest"] = ctx.job.source_digest
        return StepResult(payload, noop="the job's source is pinned already")
    if source.kind is SourceKind.REGISTRY:
        # The source registry's own answer (one HEAD on a kept-alive connection, not a skopeo
        # process): the copy reads by this digest, and skopeo checks what it reads against it.
        _source_name(ctx, source)
        reference = source.digest or source.tag or ""
        found = _source_http(ctx).manifest_digest(source.repository or "", reference)
        if found is None:
            raise SourceImageNotFound(
                f"registry {source.registry_id} has no image {source}",
                hint="check the source's repository and tag or digest",
            )
        digest = found
    else:
        digest = ctx.copier().manifest_digest(_copy_source(ctx, source))
    if not _DIGEST.fullmatch(digest):
        # It becomes part of what skopeo reads and of the job's record: only a real digest.
        raise RegistryMisbehaved(
            f"the source {source} resolved to {_brief(digest, 100)!r}, which is not a sha256 "
            "digest",
            hint="the step retries; if it persists, the source registry is not a registry",
        )
    if source.digest and digest != source.digest:
        raise PushVerificationFailed(
            f"registry {source.registry_id} serves {source} with the digest {digest}",
            hint="the step retries; if it persists, the source registry rewrites manifests",
        )
    payload["source_digest"] = digest
    return StepResult(payload)


def _push_copy(ctx: StepContext) -> StepResult:
    source = ctx.source()
    target = ctx.target()
    assert_resolves_to(target.name, ctx.registry.host, ctx.job.repository)
    pinned = ctx.job.source_digest
    if not pinned:
        raise ValidationError(f"job {ctx.job.id} reached push without a pinned source digest")
    credential = ctx.credential()
    http = ctx.http(credential)
    payload = {"reference": str(target), "digest": pinned, "source_digest": pinned}
    if http.manifest_digest(target.repository, target.tag) == pinned:
        return StepResult(payload, noop="the registry already serves this tag at the pinned digest")
    access = RegistryAccess(endpoint_of(ctx.registry), credential)
    copier = ctx.copier()
    if source.kind is SourceKind.REGISTRY:
        # Read by digest: whatever the source's tag names by now, the pinned image is copied.
        copy = _copy_source(ctx, source, pinned)
        with ctx.upload():
            copied = _confirmed_copy(
                ctx, credential, lambda: copier.copy(copy, str(target), access)
            )
    else:
        # A file can change after the pin: it is first copied under its pinned digest (skopeo
        # refuses when the digest differs, and the tag is untouched), then tagged from there.
        by_digest = f"{target.name}@{pinned}"
        local = _copy_source(ctx, source)
        stored = CopySource("docker", by_digest, access)

        def tag_stored() -> str:
            try:
                return copier.copy(stored, str(target), access)
            except SourceAuthenticationFailed as refused:  # its "source" is the destination
                raise AuthenticationError(refused.message, hint=refused.hint) from None

        with ctx.upload():
            _confirmed_copy(ctx, credential, lambda: copier.copy(local, by_digest, access))
            copied = _confirmed(ctx, credential, tag_stored)
    remote = http.manifest_digest(target.repository, target.tag)
    if copied != pinned or remote != pinned:
        raise PushVerificationFailed(
            f"registry {ctx.registry.host} serves {target} at {remote} after a copy that "
            f"reported {copied}, not at the pinned digest {pinned}",
            hint="another writer may have pushed the same tag; the step retries",
        )
    return StepResult(payload)


def _confirmed_copy(ctx: StepContext, credential: Credential | None, call: Callable[[], T]) -> T:
    """A copy whose refusal counts only once the refusing registry's /v2/ refuses too
    (``_confirmed``), for the destination and for a promotion's source alike."""
    try:
        return _confirmed(ctx, credential, call)
    except SourceAuthenticationFailed as claim:
        raise _checked_source_refusal(ctx, claim) from None


def _checked_source_refusal(ctx: StepContext, claim: SourceAuthenticationFailed) -> RegistryError:
    return _asked_directly(
        claim, lambda: _check_source_credential(ctx), SourceAuthenticationFailed,
        what=f"skopeo reported that source registry {_source_registry(ctx).host}",
    )  # fmt: skip


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
    #: Whether the action touches nothing outside the worker's process and database (no
    #: daemon, no registry, no copier; only the job's rows, the credential store and files
    #: under the worker's own directories): such a step is claimed, run and recorded in one
    #: transaction (``StepRunner._run_local``); a failure rolls it back and the step runs as
    #: any other, claim first.
    local: bool = False


#: The steps of every push job, in the order the chain runs them (part of the contract with
#: producers and operators).
STEPS: tuple[Step, ...] = (
    Step("resolve_credentials", resolve_credentials, local=True),
    Step("login", login, may_fall_back=True),
    Step("tag", tag),
    Step("push", push, lease=push_lease, may_fall_back=True),
)
STEP_NAMES: tuple[str, ...] = tuple(step.name for step in STEPS)
