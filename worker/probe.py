"""The registry connection test, like Harbor's "Test Connection": dns, tcp, tls, v2, credentials.

Each check is timed and says what to do when it fails. The first failure stops the test: the
operator sees the lowest broken layer instead of a pile of its consequences. Details are built
from host names, certificate fields and the registry's own words, never from credentials.

The dns check starts with the stored address itself (``worker.engine.targets.checked_address``):
a record that today's rules refuse is never looked up or connected to.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import certifi
from cryptography import x509
from sqlalchemy.orm import Session

from worker.core.credentials import Credential, resolve_credential
from worker.core.errors import (
    AuthenticationError,
    CredentialError,
    InvalidRegistry,
    PushWorkerError,
    RegistryError,
    RegistryTLSError,
    RegistryUnavailable,
)
from worker.core.hostnames import parse_address
from worker.core.logs import get_logger
from worker.engine.targets import checked_address, endpoint_of
from worker.seams.registry_http import Challenge, RegistryHTTP
from worker.store import events
from worker.store.models import Event, Registry

log = get_logger("pushworker.connection_test")

CHECKS = ("dns", "tcp", "tls", "v2", "credentials")
#: A certificate closer than this to its expiry is reported (the check still passes).
EXPIRY_WARNING_DAYS = 14


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    latency_ms: float | None
    detail: str
    #: What to do about a failure; None when the check passed or did not run.
    fix: str | None = None
    #: True when the check did not run: an earlier one failed, or it does not apply (tls on http).
    skipped: bool = False
    #: The ``worker.core.errors`` code of a failure, which the CLI turns into its exit code.
    error_code: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ConnectionReport:
    registry_id: int
    url: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def failure(self) -> Check | None:
        """The check that failed (there is at most one: the test stops there)."""
        return next((c for c in self.checks if not c.ok and not c.skipped), None)

    @property
    def error_code(self) -> str | None:
        failure = self.failure
        return failure.error_code if failure else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "registry_id": self.registry_id,
            "url": self.url,
            "ok": self.ok,
            "checks": [check.to_dict() for check in self.checks],
        }


class _Failed(Exception):
    def __init__(self, detail: str, fix: str, code: str) -> None:
        super().__init__(detail)
        self.detail, self.fix, self.code = detail, fix, code


class _NotApplicable(Exception):
    pass


def test_registry(
    registry: Registry,
    credential: Credential | None,
    *,
    timeout: float = 10,
    credential_problem: CredentialError | None = None,
) -> ConnectionReport:
    """Run the checks in order against ``registry``, stopping at the first failure.

    ``credential_problem`` is why ``credential`` is None when the registry needs one (an unset
    environment variable, say), so that the credentials check can name the real cause.
    """
    probe = _Probe(registry, credential, credential_problem, timeout)
    steps: list[tuple[str, Callable[[], str]]] = [
        ("dns", probe.dns),
        ("tcp", probe.tcp),
        ("tls", probe.tls),
        ("v2", probe.v2),
        ("credentials", probe.credentials),
    ]
    checks: list[Check] = []
    for name, step in steps:
        if checks and not checks[-1].ok:
            not_run = "not run: an earlier check failed"
            checks.append(Check(name, ok=False, latency_ms=None, detail=not_run, skipped=True))
        else:
            checks.append(_timed(name, step))
    return ConnectionReport(registry_id=registry.id, url=registry.url, checks=checks)


# pytest collects test_* functions wherever they are imported; this one is not a test.
test_registry.__test__ = False  # type: ignore[attr-defined]


def check_registry(registry: Registry, *, timeout: float = 10) -> ConnectionReport:
    """``test_registry`` with the registry's stored credential, resolved in this process."""
    try:
        credential, problem = resolve_credential(registry), None
    except CredentialError as exc:
        credential, problem = None, exc
    return test_registry(registry, credential, timeout=timeout, credential_problem=problem)


def record_test(session: Session, registry_id: int, report: ConnectionReport, actor: str) -> Event:
    """Append the report to the registry's stream as a ``registry.tested`` event."""
    return events.append(
        session,
        stream=events.registry_stream(registry_id),
        type="registry.tested",
        actor=actor,
        registry_id=registry_id,
        payload={"ok": report.ok, "checks": [check.to_dict() for check in report.checks]},
    )


def _timed(name: str, step: Callable[[], str]) -> Check:
    start = time.perf_counter()
    try:
        detail = step()
    except _NotApplicable as skip:
        return Check(name, ok=True, latency_ms=None, detail=str(skip), skipped=True)
    except _Failed as failure:
        return Check(
            name, False, _ms(start), failure.detail, fix=failure.fix, error_code=failure.code
        )
    except Exception as exc:
        # A bug or an unforeseen library error: report it without its text, which could quote
        # anything (the test must never echo a credential).
        log.warning("connection_test.crashed", check=name, error=type(exc).__name__)
        detail = f"unexpected {type(exc).__name__} during the {name} check"
        fix = "see pushctl's log on stderr; this is a bug in pushworker"
        return Check(name, False, _ms(start), detail, fix=fix, error_code=PushWorkerError.code)
    return Check(name, True, _ms(start), detail)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)


class _Probe:
    """The checks of one test run; later checks read what earlier ones learned."""

    def __init__(
        self,
        registry: Registry,
        credential: Credential | None,
        credential_problem: CredentialError | None,
        timeout: float,
    ) -> None:
        self.registry, self.credential = registry, credential
        self.credential_problem, self.timeout = credential_problem, timeout
        # Set by ``address`` (the first thing ``dns`` does): nothing connects before it ran.
        self.scheme, self.hostname, self.port = "", "", 0
        self.challenge: Challenge | None = None

    # --- network layers -------------------------------------------------------------------------

    def address(self) -> None:
        """The stored address, checked with the rules of today before anything is sent: a
        record saved before them (``https://registry-1.docker.io.`` as a generic registry, a
        dotless host, ``https://::1:5000``) fails here, with no lookup and no connection."""
        try:
            checked = checked_address(self.registry)
        except InvalidRegistry as exc:
            raise _Failed(exc.message, exc.hint or "", exc.code) from None
        # The URL, not registry.host: Docker Hub's host is "docker.io", its API another name.
        parsed = parse_address(checked.url)
        self.scheme, self.hostname, self.port = parsed.scheme, parsed.hostname, parsed.connect_port

    def dns(self) -> str:
        self.address()
        try:
            infos = socket.getaddrinfo(self.hostname, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise _Failed(
                f"{self.hostname} does not resolve: {exc.strerror}",
                f"check the host name (pushctl registry update {self.registry.id} --url URL) "
                "and this host's DNS",
                RegistryUnavailable.code,
            ) from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        return f"{self.hostname} -> {', '.join(addresses)}"

    def tcp(self) -> str:
        with self._connect() as sock:
            peer = sock.getpeername()
        return f"connected to {peer[0]}:{peer[1]}"

    def tls(self) -> str:
        if self.scheme != "https":
            raise _NotApplicable("not applicable: plain HTTP")
        try:
            context = self._tls_context()
            with (
                self._connect() as raw,
                context.wrap_socket(raw, server_hostname=self.hostname) as tls,
            ):
                der, version = tls.getpeercert(binary_form=True), tls.version()
        except ssl.SSLCertVerificationError as exc:
            raise _Failed(
                f"the registry's certificate is not trusted: {exc.verify_message}",
                self._ca_fix(),
                RegistryTLSError.code,
            ) from None
        except ssl.SSLError as exc:
            raise _Failed(
                f"TLS handshake failed: {exc.reason or type(exc).__name__}",
                f"if port {self.port} speaks plain HTTP, use an http:// URL with --insecure; "
                f"otherwise {self._ca_fix()}",
                RegistryTLSError.code,
            ) from None
        except OSError as exc:  # reset or timed out during the handshake
            raise _Failed(
                f"TLS handshake with {self.hostname}:{self.port}: "
                f"{'no answer' if isinstance(exc, TimeoutError) else exc.strerror or 'failed'}",
                "check that the registry is up and that the port speaks TLS",
                RegistryUnavailable.code,
            ) from None
        return f"{version}, {_describe_certificate(der)}{self._unverified_note()}"

    def _connect(self) -> socket.socket:
        try:
            return socket.create_connection((self.hostname, self.port), timeout=self.timeout)
        except OSError as exc:
            reason = "no answer" if isinstance(exc, TimeoutError) else exc.strerror or "failed"
            raise _Failed(
                f"TCP connection to {self.hostname}:{self.port}: {reason}",
                f"check that the registry runs and listens on port {self.port}, and that this "
                "host may reach it (firewall, proxy)",
                RegistryUnavailable.code,
            ) from None

    def _tls_context(self) -> ssl.SSLContext:
        # The same trust as the HTTP checks and the worker (requests): the registry's own CA,
        # else certifi's bundle; verification is off only for a registry marked insecure.
        if self.registry.insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        if self.registry.ca_cert:
            return ssl.create_default_context(cadata=self.registry.ca_cert)
        return ssl.create_default_context(cafile=certifi.where())

    def _ca_fix(self) -> str:
        return (
            "give the CA that signed the registry's certificate: "
            f"pushctl registry update {self.registry.id} --ca-file PATH"
        )

    def _unverified_note(self) -> str:
        return " (not verified: the registry is marked insecure)" if self.registry.insecure else ""

    # --- the registry API -----------------------------------------------------------------------

    def v2(self) -> str:
        http = RegistryHTTP(endpoint_of(self.registry), None, timeout=self.timeout)
        try:
            self.challenge = http.ping()
        except RegistryError as exc:
            raise self._http_failure(exc) from None
        finally:
            http.close()
        return _describe_challenge(self.challenge)

    def credentials(self) -> str:
        assert self.challenge is not None, "v2 ran first"
        if not self.registry.auth_required:
            return self._anonymous()
        if self.credential is None:
            raise self._missing_credential()
        http = RegistryHTTP(endpoint_of(self.registry), self.credential, timeout=self.timeout)
        try:
            challenge = http.check_credentials()
        except AuthenticationError as exc:
            raise _Failed(
                exc.message,
                f"set the right password: pushctl registry set-credential {self.registry.id}",
                exc.code,
            ) from None
        except RegistryError as exc:
            raise self._http_failure(exc) from None
        finally:
            http.close()
        who = f"user {self.credential.username} ({self.credential.source})"
        if challenge.status == 200:
            return f"/v2/ needs no credentials; {who} not checked"
        if challenge.scheme == "bearer":
            return f"{who} accepted: token issued by {challenge.params.get('realm', '?')}"
        return f"{who} accepted ({challenge.scheme.capitalize() or 'no'} authentication)"

    def _anonymous(self) -> str:
        challenge = self.challenge
        assert challenge is not None
        if challenge.status == 200:
            return "anonymous access: /v2/ answers 200 without credentials"
        raise _Failed(
            f"the registry is marked anonymous but asks for credentials "
            f"(HTTP {challenge.status}, {challenge.scheme.capitalize() or 'no'} challenge)",
            f"give it a credential: pushctl registry set-credential {self.registry.id}",
            AuthenticationError.code,
        )

    def _missing_credential(self) -> _Failed:
        problem = self.credential_problem
        if problem is None:
            problem = CredentialError(f"registry {self.registry.id} has no credential")
        fix = problem.hint or f"pushctl registry set-credential {self.registry.id}"
        return _Failed(problem.message, fix, problem.code)

    def _http_failure(self, exc: RegistryError) -> _Failed:
        if isinstance(exc, RegistryTLSError):
            fix = self._ca_fix()
        elif isinstance(exc, RegistryUnavailable):
            fix = "check that the registry is up and reachable from this host"
        else:
            fix = (
                f"check that {self.registry.url} is the registry's API address "
                "(GET /v2/ must answer 200 or 401)"
            )
        return _Failed(exc.message, fix, exc.code)


def _describe_challenge(challenge: Challenge) -> str:
    if challenge.status == 200:
        return "HTTP 200: /v2/ asks for no credentials"
    scheme = challenge.scheme.capitalize() or "no"
    params = challenge.params
    where = f"realm {params['realm']}" if params.get("realm") else "no realm"
    service = f", service {params['service']}" if params.get("service") else ""
    return f"HTTP {challenge.status}, {scheme} challenge, {where}{service}"


def _describe_certificate(der: bytes | None) -> str:
    if not der:
        return "no certificate presented"
    cert = x509.load_der_x509_certificate(der)
    expires = cert.not_valid_after_utc
    days = (expires - datetime.now(UTC)).days
    soon = " - renew it soon" if days < EXPIRY_WARNING_DAYS else ""
    return (
        f"subject {cert.subject.rfc4514_string()}, issuer {cert.issuer.rfc4514_string()}, "
        f"expires {expires:%Y-%m-%d} (in {days} days{soon})"
    )
