"""The one seam in front of docker-py. Nothing else in the project imports ``docker``'s client.

It turns docker-py's exceptions and its error-carrying push stream into the project's errors,
passes ``auth_config`` explicitly on every registry call (never the host's ~/.docker/config.json),
and never lets a credential reach a message.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import docker
import requests
from docker import auth as docker_auth
from docker.errors import APIError, DockerException, ImageNotFound
from opentelemetry.trace import SpanKind

from worker.core import tracing
from worker.core.credentials import Credential
from worker.core.errors import (
    AuthenticationError,
    DockerError,
    DockerUnavailable,
    PushWorkerError,
    SourceImageNotFound,
)
from worker.core.reference import TargetReference
from worker.seams.classify import classify_registry_message

#: Called with (bytes pushed, bytes to push, layers done, layers seen) while a push runs.
ProgressCallback = Callable[[int, int, int, int], None]


@dataclass(frozen=True)
class LocalImage:
    """One image on the engine, as one inspect reports it."""

    id: str
    #: Every ``name:tag`` that names this image here.
    tags: frozenset[str]
    #: ``name@digest`` for every registry this image was pushed to or pulled from.
    digests: frozenset[str]


@dataclass(frozen=True)
class PushResult:
    digest: str
    size: int | None


class DockerEngine:
    """A Docker Engine, reached through docker-py's low-level API client."""

    def __init__(
        self, base_url: str | None = None, *, timeout: float = 300, api: Any = None
    ) -> None:
        """Connect to ``base_url`` (else ``DOCKER_HOST`` and the rest of the environment), or use
        ``api``, a docker-py ``APIClient`` (or a stand-in for it) made elsewhere."""
        self._api = api if api is not None else _connect(base_url, timeout)
        self._forget_host_auth()
        self._logins: dict[tuple[str, str], float] = {}

    def _forget_host_auth(self) -> None:
        # docker-py loads ~/.docker/config.json (and credential helpers) at construction; stale
        # entries there must never authenticate a push, so the client starts with none.
        self._api._auth_configs = docker_auth.AuthConfig({})

    def ping(self) -> None:
        with _translated("ping"):
            self._api.ping()

    def image(self, reference: str) -> LocalImage | None:
        """The image ``reference`` names on this engine (its id, tags and digests), or None.

        One inspect answers all three, so a step asks once instead of once per question.
        """
        try:
            with _translated("inspect"):
                found = self._api.inspect_image(reference)
        except SourceImageNotFound:
            return None
        return LocalImage(
            id=str(found["Id"]),
            tags=frozenset(found.get("RepoTags") or ()),
            digests=frozenset(found.get("RepoDigests") or ()),
        )

    def tag(self, source: str, target: TargetReference) -> None:
        with _span("docker tag", target.host, target.repository), _translated("tag"):
            self._api.tag(source, target.name, target.tag, force=True)

    #: How long a login this engine accepted is trusted for the next job with the same
    #: credential. The push itself always authenticates with its explicit auth_config, so a
    #: credential revoked meanwhile still fails there (and clears the memo).
    LOGIN_REUSE_SECONDS = 300.0

    def login(self, registry_host: str, credential: Credential, *, reuse: bool = True) -> bool:
        """Ask the daemon to authenticate against the registry; False when ``reuse`` allows it
        and a login with the same credential succeeded on this engine within
        ``LOGIN_REUSE_SECONDS``."""
        key = _login_key(registry_host, credential)
        proved_at = self._logins.get(key)
        recent = proved_at is not None and time.monotonic() - proved_at < self.LOGIN_REUSE_SECONDS
        if reuse and recent:
            return False
        self._logins.pop(key, None)
        self._login(registry_host, credential)
        self._logins[key] = time.monotonic()
        return True

    def forget_logins(self, registry_host: str) -> None:
        """Drop remembered logins to a registry that has just refused a credential."""
        for key in [k for k in self._logins if k[0] == registry_host]:
            del self._logins[key]

    def _login(self, registry_host: str, credential: Credential) -> None:
        with _span("docker login", registry_host), _translated("log in to", registry=registry_host):
            try:
                self._api.login(
                    username=credential.username,
                    password=credential.password.reveal(),
                    registry=registry_host,
                    reauth=True,
                )
            finally:
                self._forget_host_auth()

    def push(
        self,
        target: TargetReference,
        credential: Credential | None,
        on_progress: ProgressCallback | None = None,
    ) -> PushResult:
        """Push and read the whole stream; an ``error`` chunk raises (docker-py does not)."""
        # An explicit, possibly empty, auth_config: docker-py falls back to host state on None.
        auth_config = credential.auth_config() if credential else {}
        try:
            with (
                _span("docker push", target.host, target.repository),
                _translated("push to", registry=target.host),
            ):
                stream = self._api.push(
                    target.name, tag=target.tag, stream=True, decode=True, auth_config=auth_config
                )
                return _read_push_stream(stream, target, on_progress)
        except AuthenticationError:
            self.forget_logins(target.host)
            raise


def _span(name: str, registry_host: str, repository: str | None = None) -> Any:
    """A client span of one daemon call about a registry: the host and repository only (the
    call's auth_config is never an attribute)."""
    return tracing.span(
        name,
        kind=SpanKind.CLIENT,
        attributes={tracing.REGISTRY_HOST: registry_host, tracing.REPOSITORY: repository},
    )


def _connect(base_url: str | None, timeout: float) -> Any:
    with _translated("connect to"):
        if base_url:
            api = docker.APIClient(base_url=base_url, version="auto", timeout=int(timeout))
        else:
            api = docker.from_env(version="auto", timeout=int(timeout)).api
    return without_environment_lookups(api)


def without_environment_lookups(api: Any) -> Any:
    """``api`` told not to read proxies and ``.netrc`` from the environment on every call when
    it talks to a local engine (a Unix socket, a named pipe, ssh: docker-py's ``http+docker://``
    address). requests reads both per request (its proxy lookup walks ``os.environ``), about
    half a millisecond of CPU a daemon call here (five a job), for settings that cannot apply
    to a socket. An engine over TCP keeps them: a proxy there may be wanted."""
    if str(getattr(api, "base_url", "")).startswith("http+docker://"):
        api.trust_env = False
    return api


def _login_key(registry_host: str, credential: Credential) -> tuple[str, str]:
    # A digest, so the memo never holds the secret itself.
    material = f"{credential.username}\0{credential.password.reveal()}".encode()
    return registry_host, hashlib.sha256(material).hexdigest()


def _read_push_stream(
    stream: Iterator[dict[str, Any]], target: TargetReference, on_progress: ProgressCallback | None
) -> PushResult:
    progress = _Progress(on_progress)
    result: PushResult | None = None
    for chunk in stream:
        if "error" in chunk or "errorDetail" in chunk:
            detail = chunk.get("errorDetail") or {}
            message = str(detail.get("message") or chunk.get("error") or "unknown error")
            raise classify_registry_message(message, registry=target.host)
        aux = chunk.get("aux")
        if isinstance(aux, dict) and aux.get("Digest"):
            result = PushResult(digest=str(aux["Digest"]), size=aux.get("Size"))
        progress.update(chunk)
    progress.flush()
    if result is None:
        raise DockerError(f"the push of {target} ended without reporting a digest")
    tracing.set_attributes({tracing.DIGEST: result.digest, tracing.BYTES_PUSHED: progress.pushed})
    return result


class _Progress:
    """Sums per-layer progress from the stream and reports it at most twice a second."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self._callback = callback
        self._layers: dict[str, tuple[int, int]] = {}
        self._done: set[str] = set()
        self._last = 0.0

    @property
    def pushed(self) -> int:
        """Bytes uploaded so far, over every layer (a layer the registry had counts none)."""
        return sum(
            total if layer in self._done else current
            for layer, (current, total) in self._layers.items()
        )

    def update(self, chunk: dict[str, Any]) -> None:
        if not chunk.get("id"):
            return
        layer = str(chunk["id"])
        status = str(chunk.get("status", ""))
        detail = chunk.get("progressDetail") or {}
        if detail.get("total"):
            self._layers[layer] = (int(detail.get("current", 0)), int(detail["total"]))
        if status in ("Pushed", "Layer already exists", "Mounted from"):
            self._done.add(layer)
        if self._callback is None:
            return
        now = time.monotonic()
        if now - self._last >= 0.5:
            self._last = now
            self.flush()

    def flush(self) -> None:
        if self._callback is None:
            return
        current = sum(c for c, _ in self._layers.values())
        total = sum(t for _, t in self._layers.values())
        self._callback(current, total, len(self._done), len(self._done | set(self._layers)))


@contextmanager
def _translated(action: str, *, registry: str | None = None) -> Iterator[None]:
    """Re-raise docker-py and transport errors as the project's own."""
    try:
        yield
    except PushWorkerError:
        raise
    except ImageNotFound as exc:
        raise SourceImageNotFound(
            f"the Docker Engine has no image {_explain(exc)}",
            hint="build or pull the source image on this worker's engine first",
        ) from None
    except APIError as exc:
        if registry is not None and (exc.status_code or 0) >= 400:
            raise classify_registry_message(_explain(exc), registry=registry) from None
        raise DockerError(f"the Docker Engine refused to {action}: {_explain(exc)}") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise DockerUnavailable(
            f"the Docker Engine does not answer ({type(exc).__name__})",
            hint="check that dockerd runs and DOCKER_HOST points to it; the step retries",
        ) from None
    except DockerException as exc:
        raise DockerUnavailable(
            f"the Docker Engine cannot be used: {exc}",
            hint="check that dockerd runs and DOCKER_HOST points to it; the step retries",
        ) from None


def _explain(exc: APIError) -> str:
    return str(exc.explanation or exc)
