"""What the engine uses of each foreign system, as Protocols: the real seams
(``worker.seams.docker_engine.DockerEngine``, ``worker.seams.registry_http.RegistryHTTP``) and the
fakes of fast tests (``tests/support/fakes.py``) both satisfy them, checked by mypy."""

from __future__ import annotations

from typing import Protocol

from worker.core.credentials import Credential
from worker.core.reference import TargetReference
from worker.seams.docker_engine import LocalImage, ProgressCallback, PushResult
from worker.seams.registry_http import Challenge


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


class RegistryClient(Protocol):
    """A registry's HTTP API, with one credential (or none)."""

    def ping(self) -> Challenge: ...

    def check_credentials(self) -> Challenge: ...

    def manifest_digest(self, repository: str, tag: str) -> str | None: ...

    def close(self) -> None: ...
