"""Turns a registry's or daemon's words into the project's error tree.

The daemon reports registry failures as text (a login with a wrong password is an HTTP 500 from
the daemon whose message carries the registry's 401), so classification reads the message, not
the daemon's status code. Authentication comes first: it is the branch the fallback chain keys on.
"""

from __future__ import annotations

from worker.errors import (
    AuthenticationError,
    RegistryError,
    RegistryTLSError,
    RegistryUnavailable,
)

_AUTH_MARKERS = (
    "unauthorized",
    "authentication required",
    "401 unauthorized",
    "status: 401",
    "status: 403",
    "denied",
    "incorrect username or password",
    "forbidden",
)
_TLS_MARKERS = ("x509", "certificate", "tls: ", "ssl")
_UNAVAILABLE_MARKERS = (
    "connection refused",
    "no such host",
    "i/o timeout",
    "context deadline exceeded",
    "timeout",
    "timed out",
    "dial tcp",
    "connection reset",
    "no route to host",
    "network is unreachable",
    "eof",
    "502 bad gateway",
    "503 service unavailable",
    "504 gateway",
    "status: 50",
    "server misbehaving",
)


def classify_registry_message(message: str, *, registry: str) -> RegistryError:
    """The error for a registry failure described by ``message`` (the registry's own words)."""
    text = message.lower()
    words = message.strip()
    if any(marker in text for marker in _AUTH_MARKERS):
        return AuthenticationError(
            f"registry {registry} rejected the credentials: {words}",
            hint="check the registry's username and password (pushctl registry set-credential), "
            "then retry the job",
        )
    if any(marker in text for marker in _TLS_MARKERS):
        return RegistryTLSError(
            f"TLS with registry {registry} failed: {words}",
            hint="give the registry's CA bundle (pushctl registry update --ca-file) and make "
            "the Docker Engine trust it (/etc/docker/certs.d/HOST:PORT/ca.crt)",
        )
    if any(marker in text for marker in _UNAVAILABLE_MARKERS):
        return RegistryUnavailable(
            f"registry {registry} cannot be reached: {words}",
            hint="check that the registry is up and reachable from the worker; the step retries",
        )
    return RegistryError(f"registry {registry} refused: {words}")
