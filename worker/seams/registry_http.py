"""The one seam in front of the registry HTTP API (Distribution v2, Harbor, GitLab).

Like Harbor's "Test Connection": ``GET /v2/``, read the ``WWW-Authenticate`` challenge, then Basic
credentials or a Bearer token fetched from the realm. Credentials are only ever sent to this
registry's own scheme and host (and to the token realm it names).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from opentelemetry.trace import SpanKind
from requests.auth import HTTPBasicAuth

from worker.core import tracing
from worker.core.credentials import Credential
from worker.core.errors import (
    AuthenticationError,
    RegistryError,
    RegistryTLSError,
    RegistryUnavailable,
)
from worker.seams.classify import classify_http, parse_retry_after

MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    ]
)
_PARAM = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Challenge:
    """What ``GET /v2/`` without credentials said."""

    status: int
    scheme: str  # "basic", "bearer" or "" (no authentication asked)
    params: dict[str, str]


def parse_challenge(header: str | None) -> tuple[str, dict[str, str]]:
    if not header:
        return "", {}
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_PARAM.findall(rest))


@dataclass(frozen=True)
class RegistryEndpoint:
    """What this seam needs to know of a registry: plain values, never a database row."""

    #: The registry's id, for messages.
    id: int
    #: ``scheme://host[:port]``, canonical (``worker.core.hostnames``).
    url: str
    #: ``host[:port]`` as it prefixes references.
    host: str
    #: PEM bundle of the CA that signs the registry's certificate, if not a public one.
    ca_cert: str | None = None
    #: Skip TLS verification of an https:// registry (an operator's explicit choice).
    insecure: bool = False


class RegistryHTTP:
    """HTTP access to one registry, with its TLS settings and (optionally) its credential."""

    def __init__(
        self, registry: RegistryEndpoint, credential: Credential | None, *, timeout: float = 10
    ) -> None:
        self.base = registry.url
        self.label = f"{registry.id} ({registry.host})"
        self.credential = credential
        self.timeout = timeout
        self.http = requests.Session()
        self.http.trust_env = False  # no proxy or netrc from the host's environment
        self.http.verify = _verify_setting(registry)
        self._tokens: dict[str, str] = {}
        self._takes_basic = False

    def close(self) -> None:
        self.http.close()

    # --- requests with error translation -------------------------------------------------------

    def _request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        # A client span per request: method, address, the URL without query or userinfo, the
        # status. Never a header: the Authorization of a Basic or Bearer request is a secret.
        with tracing.span(
            method.upper(), kind=SpanKind.CLIENT, attributes=tracing.http_client_attributes(
                method, url)
        ) as span:  # fmt: skip
            response = self._send(method, url, **kwargs)
            tracing.set_attributes({"http.response.status_code": response.status_code}, span)
            if response.status_code >= 400:
                # As the semantic conventions say for a client, even for an expected answer (a
                # 401 challenge before the credential is sent).
                tracing.failed(span, str(response.status_code))
            return response

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        kwargs.setdefault("allow_redirects", False)
        try:
            return self.http.request(method, url, **kwargs)
        except requests.exceptions.SSLError as exc:
            raise RegistryTLSError(
                f"TLS with registry {self.label} failed: {_first_line(exc)}",
                hint="give the registry's CA bundle (pushctl registry update --ca-file)",
            ) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise RegistryUnavailable(
                f"registry {self.label} cannot be reached: {type(exc).__name__}",
                hint="check that it is up and reachable from the worker; the step retries",
            ) from None

    def ping(self) -> Challenge:
        """``GET /v2/`` without credentials."""
        response = self._request("GET", f"{self.base}/v2/")
        scheme, params = parse_challenge(response.headers.get("WWW-Authenticate"))
        if response.status_code not in (200, 401):
            raise self._refusal(response)
        return Challenge(response.status_code, scheme, params)

    def check_credentials(self) -> Challenge:
        """Prove the credential against ``/v2/``; AuthenticationError when refused.

        Always asks the registry anew (no cached token): the answer confirms or refutes a
        refusal the engine just reported, so it must be about the credential as it is now.
        """
        self._tokens.pop("", None)
        challenge = self.ping()
        if challenge.status == 200:
            return challenge
        response = self._authorized("GET", f"{self.base}/v2/", challenge, scope=None)
        if response.status_code != 200:
            raise self._refusal(response)
        return challenge

    def manifest_digest(self, repository: str, tag: str) -> str | None:
        """The digest the registry serves for ``repository:tag``, or None if it has none."""
        url = f"{self.base}/v2/{repository}/manifests/{tag}"
        headers = {"Accept": MANIFEST_TYPES}
        # Once the registry said it takes Basic, this client sends the credential up front and
        # saves the 401 round trip on every later request.
        preemptive = self._basic() if self._takes_basic and self.credential else None
        response = self._request("HEAD", url, headers=headers, auth=preemptive)
        if response.status_code == 401:
            challenge = Challenge(401, *parse_challenge(response.headers.get("WWW-Authenticate")))
            self._takes_basic = challenge.scheme == "basic"
            self._tokens.pop(f"repository:{repository}:pull", None)  # an expired token
            response = self._authorized(
                "HEAD", url, challenge, scope=f"repository:{repository}:pull", headers=headers
            )
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._refusal(response)
        return response.headers.get("Docker-Content-Digest")

    # --- authentication -------------------------------------------------------------------------

    def _authorized(
        self, method: str, url: str, challenge: Challenge, *, scope: str | None, **kwargs: Any
    ) -> requests.Response:
        if self.credential is None:
            raise AuthenticationError(
                f"registry {self.label} asks for credentials and this registry has none",
                hint="set its credential (pushctl registry set-credential)",
            )
        if challenge.scheme == "bearer":
            token = self._bearer_token(challenge, scope)
            headers = {**kwargs.pop("headers", {}), "Authorization": f"Bearer {token}"}
            return self._request(method, url, headers=headers, **kwargs)
        return self._request(method, url, auth=self._basic(), **kwargs)

    def _basic(self) -> HTTPBasicAuth:
        assert self.credential is not None
        return HTTPBasicAuth(self.credential.username, self.credential.password.reveal())

    def _bearer_token(self, challenge: Challenge, scope: str | None) -> str:
        key = scope or ""
        if key in self._tokens:
            return self._tokens[key]
        realm = challenge.params.get("realm", "")
        if urlsplit(realm).scheme not in ("https", "http"):
            raise RegistryError(f"registry {self.label} named an unusable token realm {realm!r}")
        params = {"service": challenge.params.get("service", "")}
        if scope:
            params["scope"] = scope
        response = self._request("GET", realm, params=params, auth=self._basic())
        if response.status_code != 200:
            raise self._refusal(response)
        body = response.json()
        token = body.get("token") or body.get("access_token")
        if not token:
            raise RegistryError(f"the token service of registry {self.label} returned no token")
        self._tokens[key] = str(token)
        return str(token)

    def _refusal(self, response: requests.Response) -> RegistryError:
        """The error for a non-success answer, from its status, error codes and Retry-After."""
        codes, messages = _registry_errors(response)
        status = f"HTTP {response.status_code}"
        words = f"{status} {'; '.join(messages)}" if messages else status
        return classify_http(
            response.status_code,
            codes,
            words,
            registry=self.label,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )


def _registry_errors(response: requests.Response) -> tuple[list[str], list[str]]:
    """The Distribution error codes of the body, and each error as ``CODE: message``.

    Anything but the documented ``{"errors": [{"code", "message"}]}`` shape (HTML from a
    proxy, a HEAD without body, JSON of another shape) yields no codes: the status decides.
    """
    try:
        body = response.json()
    except ValueError:
        return [], []
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list):
        return [], []
    codes: list[str] = []
    messages: list[str] = []
    for entry in errors:
        if not isinstance(entry, dict):
            continue
        code, message = str(entry.get("code") or ""), str(entry.get("message") or "")
        codes.append(code)
        messages.append(f"{code}: {message}".strip(": ")[:300])
    return codes, messages


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


def _verify_setting(registry: RegistryEndpoint) -> bool | str:
    """requests' ``verify``: the registry's CA bundle when it has one."""
    if registry.insecure and registry.url.startswith("https://"):
        return False
    if registry.ca_cert:
        return str(_ca_file(registry.ca_cert))
    return True


def _ca_file(pem: str) -> Path:
    # requests wants a path; a content-addressed file is written once and shared by processes.
    digest = hashlib.sha256(pem.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"pushworker-ca-{digest}.pem"
    if not path.exists():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(pem)
        tmp.replace(path)
    return path


#: Clients kept per process, most recently used last.
_MAX_SHARED = 16
_shared: dict[tuple[RegistryEndpoint, str, float], RegistryHTTP] = {}


def shared_client(
    endpoint: RegistryEndpoint, credential: Credential | None, timeout: float
) -> RegistryHTTP:
    """This process's client for ``endpoint`` and ``credential``, reused across jobs so that its
    keep-alive connection (and TLS session) is too; the least recently used is closed when more
    than a few registries are in use."""
    key = (endpoint, _credential_digest(credential), timeout)
    client = _shared.pop(key, None) or RegistryHTTP(endpoint, credential, timeout=timeout)
    _shared[key] = client
    while len(_shared) > _MAX_SHARED:
        _shared.pop(next(iter(_shared))).close()
    return client


def _credential_digest(credential: Credential | None) -> str:
    # A digest, so the key never holds the secret itself.
    if credential is None:
        return ""
    material = f"{credential.username}\0{credential.password.reveal()}".encode()
    return hashlib.sha256(material).hexdigest()
