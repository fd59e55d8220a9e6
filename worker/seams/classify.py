"""Turns a registry's or daemon's words into the project's error tree.

Two sources, best first:

* **Structured signals** (``classify_http``): our own HTTP calls to the registry have a status
  code, the Distribution error codes of the JSON body (``TOOMANYREQUESTS``, ``UNAVAILABLE``,
  ``DENIED``, ``UNAUTHORIZED``, ``NAME_UNKNOWN``...) and ``Retry-After``.
* **The daemon's text** (``classify_registry_message``): the Docker Engine reports registry
  failures only as text (a login with a wrong password is an HTTP 500 from the daemon whose
  message carries the registry's 401), so it is read through ``DAEMON_RULES``, an ordered table.

Order matters and is deliberate: throttling and server failures come *before* authentication.
During a 5xx window the daemon goes on without credentials and then reports "unauthorized",
so a message that also says 5xx/429 is an outage, never a refused credential. Even a pure
"unauthorized" from the daemon is only a *claim*: ``worker.engine.steps`` confirms it against the
registry's HTTP API before it may count as a refusal (and move a job to its fallback).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from worker.core.errors import (
    AuthenticationError,
    RegistryError,
    RegistryThrottled,
    RegistryTLSError,
    RegistryUnavailable,
)

_RETRY_HINT = "check that the registry is up and reachable from the worker; the step retries"
_THROTTLE_HINT = "the registry limits request rates; the step retries after the time it asks"
_AUTH_HINT = (
    "check the registry's username and password (pushctl registry set-credential), "
    "then retry the job"
)
_TLS_HINT = (
    "give the registry's CA bundle (pushctl registry update --ca-file) and make "
    "the Docker Engine trust it (/etc/docker/certs.d/HOST:PORT/ca.crt)"
)


def _throttled(registry: str, words: str, retry_after: float | None = None) -> RegistryError:
    return RegistryThrottled(
        f"registry {registry} is throttling requests: {words}",
        hint=_THROTTLE_HINT,
        retry_after=retry_after,
    )


def _unavailable(registry: str, words: str) -> RegistryError:
    return RegistryUnavailable(f"registry {registry} cannot be reached: {words}", hint=_RETRY_HINT)


def _refused(registry: str, words: str) -> RegistryError:
    return AuthenticationError(
        f"registry {registry} rejected the credentials: {words}", hint=_AUTH_HINT
    )


def _tls(registry: str, words: str) -> RegistryError:
    return RegistryTLSError(f"TLS with registry {registry} failed: {words}", hint=_TLS_HINT)


def _other(registry: str, words: str) -> RegistryError:
    return RegistryError(f"registry {registry} refused: {words}")


@dataclass(frozen=True)
class Rule:
    """One line of the daemon-text table: the first rule whose pattern matches decides."""

    pattern: re.Pattern[str]
    make: Callable[[str, str], RegistryError]
    #: Why this rule sits where it does (read by people, printed by the table test).
    why: str


def _rule(pattern: str, make: Callable[[str, str], RegistryError], why: str) -> Rule:
    return Rule(re.compile(pattern, re.IGNORECASE), make, why)


#: The daemon's (and docker-py's) words -> error, first match wins.
DAEMON_RULES: tuple[Rule, ...] = (
    _rule(
        r"toomanyrequests|too many requests|status:? ?429\b|\b429 too many",
        _throttled,
        "HTTP 429 / TOOMANYREQUESTS: retry later, whatever else the text says",
    ),
    _rule(
        r"status:? ?5\d\d\b|\b5\d\d (internal server error|bad gateway|service unavailable"
        r"|gateway time-?out)|internal server error|bad gateway|service unavailable"
        r"|gateway time-?out|\bunavailable: |server misbehaving",
        _unavailable,
        "HTTP 5xx / UNAVAILABLE: the registry failed, the credential was not judged",
    ),
    _rule(
        r"unauthorized|authentication required|status:? ?40[13]\b|\bdenied\b"
        r"|incorrect username or password|forbidden",
        _refused,
        "a refusal, as the engine words it (the step confirms it over HTTP before it counts)",
    ),
    _rule(
        r"x509|certificate|\btls: |\bssl\b",
        _tls,
        "the TLS handshake failed",
    ),
    _rule(
        r"connection refused|no such host|i/o timeout|context deadline exceeded|timeout"
        r"|timed out|dial tcp|connection reset|broken pipe|no route to host"
        r"|network is unreachable|\beof\b",
        _unavailable,
        "the network: the registry could not be reached",
    ),
)


def classify_registry_message(message: str, *, registry: str) -> RegistryError:
    """The error for a registry failure the engine describes only in ``message``."""
    words = message.strip()
    for rule in DAEMON_RULES:
        if rule.pattern.search(words):
            return rule.make(registry, words)
    return _other(registry, words)


# --- structured signals: our own HTTP calls -----------------------------------------------------

_THROTTLE_CODES = frozenset({"TOOMANYREQUESTS"})
_UNAVAILABLE_CODES = frozenset({"UNAVAILABLE"})
_AUTH_CODES = frozenset({"UNAUTHORIZED", "DENIED"})


def classify_http(
    status: int,
    codes: Iterable[str],
    words: str,
    *,
    registry: str,
    retry_after: float | None = None,
) -> RegistryError:
    """The error for an HTTP answer of the registry that is not a success.

    ``codes`` are the Distribution error codes of the body. Status and codes are read together,
    most transient first: 429/TOOMANYREQUESTS, then 5xx/UNAVAILABLE, then 401/403/UNAUTHORIZED/
    DENIED, then anything else (a plain refusal such as 404/NAME_UNKNOWN, never retried).
    """
    found = {code.upper() for code in codes}
    if status == 429 or found & _THROTTLE_CODES:
        return _throttled(registry, words, retry_after)
    if status >= 500 or found & _UNAVAILABLE_CODES:
        return _unavailable(registry, words)
    if status in (401, 403) or found & _AUTH_CODES:
        return _refused(registry, words)
    return _other(registry, words)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from ``Retry-After`` (delta-seconds or an HTTP date); None when absent or unusable.

    A date in the past means "now" (0); the caller bounds large values by its own maximum.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
