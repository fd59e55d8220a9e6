"""What the engine uses of each foreign system, as Protocols: the real seams
(``worker.seams.docker_engine.DockerEngine``, ``worker.seams.registry_http.RegistryHTTP``) and the
fakes of fast tests (``tests/support/fakes.py``) both satisfy them, checked by mypy."""

from __future__ import annotations

from typing import Protocol

from worker.core.credentials import Credential
from worker.core.reference import TargetReference
from worker.seams.docker_engine import LocalImage, ProgressCallback, PushResult
from worker.seams.limiter import AdaptiveCap, SlotGrant
from worker.seams.registry_http import Challenge
from worker.seams.skopeo import CopySource, RegistryAccess
from worker.seams.webhook_http import WebhookRequest, WebhookResult


class ContainerEngine(Protocol):
    """The Docker Engine that holds a job's source image and pushes it."""

    def ping(self) -> None: ...

    def image(self, reference: str) -> LocalImage | None: ...

    def tag(self, source: str, target: TargetReference) -> None: ...

    def login(self, registry_host: str, credential: Credential, *, reuse: bool = True) -> bool: ...

    def forget_logins(self, registry_host: str) -> None: ...

    def push(
        self,
        target: TargetReference,
        credential: Credential | None,
        on_progress: ProgressCallback | None = None,
    ) -> PushResult: ...


class ImageCopier(Protocol):
    """What copies a source that is not the Docker Engine (``worker.seams.skopeo.Skopeo``)."""

    def manifest_digest(self, source: CopySource) -> str: ...

    def copy(self, source: CopySource, destination: str, access: RegistryAccess) -> str: ...


class RegistryClient(Protocol):
    """A registry's HTTP API, with one credential (or none)."""

    def ping(self) -> Challenge: ...

    def check_credentials(self) -> Challenge: ...

    def manifest_digest(self, repository: str, tag: str) -> str | None: ...

    def close(self) -> None: ...


class FlowState(Protocol):
    """Per-registry flow-control state shared by every worker (``worker.seams.limiter``): leased
    slots, the waiters' order, the adaptive cap and the request rate."""

    def acquire(
        self,
        registry_id: int,
        holder: str,
        waiter: str,
        cap: int,
        *,
        lease: float,
        waiter_ttl: float,
        now: float | None = None,
        wake: bool = False,
        take: bool = True,
        message_id: str | None = None,
    ) -> SlotGrant: ...

    def hand_over(
        self,
        registry_id: int,
        holder: str,
        cap: int,
        *,
        reservation: float,
        waiter_ttl: float,
        most: int = 1,
        now: float | None = None,
    ) -> list[str]: ...

    def cancel_reservation(self, registry_id: int, waiter: str) -> None: ...

    def renew(
        self, registry_id: int, holder: str, *, lease: float, now: float | None = None
    ) -> bool: ...

    def release(self, registry_id: int, holder: str) -> None: ...

    def forget_waiter(self, registry_id: int, waiter: str) -> None: ...

    def supersede(self, registry_id: int, waiter: str, *, ttl: float) -> None: ...

    def take_superseded(self, registry_id: int, waiter: str, message_id: str) -> bool: ...

    def holders(self, registry_id: int, *, now: float | None = None) -> int: ...

    def adaptive_cap(self, registry_id: int) -> AdaptiveCap | None: ...

    def swap_cap(
        self,
        registry_id: int,
        expected: float | None,
        new: float | None,
        *,
        refused_at: int | None = None,
    ) -> bool: ...

    def first_rate_wait(self, registry_id: int, waiter: str, *, ttl: float) -> bool: ...

    def take_request(self, registry_id: int, per_second: float) -> float: ...


class WebhookSender(Protocol):
    """A webhook receiver (``worker.seams.webhook_http``): one signed POST per call, its outcome
    as a plain value."""

    def send(self, request: WebhookRequest) -> WebhookResult: ...
