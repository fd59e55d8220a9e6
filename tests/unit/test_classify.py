"""Classification of registry failures: the daemon-text table, the structured HTTP mapping, the
retry delay, and the step helper that confirms a refusal before it counts."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from tests.support.fakes import FakeEngine, FakeWorld
from worker.core.credentials import Credential, Secret
from worker.core.errors import (
    AuthenticationError,
    RegistryError,
    RegistryMisbehaved,
    RegistryThrottled,
    RegistryTLSError,
    RegistryUnavailable,
)
from worker.engine.retry import retry_delay
from worker.engine.steps import StepContext, _confirmed
from worker.seams.classify import (
    DAEMON_RULES,
    classify_http,
    classify_registry_message,
    parse_retry_after,
)
from worker.seams.registry_http import Challenge, RegistryEndpoint, RegistryHTTP
from worker.store.models import PushJob, Registry

P = "127.0.0.1:45725"

# Every text below was produced on the real stack (dockerd 20.10 + Distribution 2.8 behind
# tests/support/faultproxy.py), except where marked as from public sources.
DAEMON_MESSAGES: list[tuple[str, type[RegistryError]]] = [
    # login (docker-py APIError 500 carrying the registry's answer to GET /v2/)
    (f"login attempt to http://{P}/v2/ failed with status: 401 Unauthorized", AuthenticationError),
    (f"login attempt to http://{P}/v2/ failed with status: 500 Internal Server Error",
     RegistryUnavailable),
    (f"login attempt to http://{P}/v2/ failed with status: 502 Bad Gateway", RegistryUnavailable),
    (f"login attempt to http://{P}/v2/ failed with status: 503 Service Unavailable",
     RegistryUnavailable),
    (f"login attempt to http://{P}/v2/ failed with status: 429 Too Many Requests",
     RegistryThrottled),
    (f'Get "http://{P}/v2/": read tcp 127.0.0.1:35900->{P}: read: connection reset by peer',
     RegistryUnavailable),
    # push stream errors
    ("unauthorized: authentication required", AuthenticationError),  # also after a failed ping
    ("received unexpected HTTP status: 500 Internal Server Error", RegistryUnavailable),
    ("received unexpected HTTP status: 503 Service Unavailable", RegistryUnavailable),
    ("received unexpected HTTP status: 502 Bad Gateway", RegistryUnavailable),
    ("toomanyrequests: injected 429", RegistryThrottled),
    (f'Put "http://{P}/v2/faults/app-1/manifests/v1": read tcp 127.0.0.1:36364->{P}: read: '
     "connection reset by peer", RegistryUnavailable),
    # public sources: Docker Hub's rate limit, Harbor's permission refusal
    ("toomanyrequests: Rate exceeded", RegistryThrottled),
    ("toomanyrequests: You have reached your pull rate limit.", RegistryThrottled),
    ("denied: requested access to the resource is denied", AuthenticationError),
    # the engine's network and TLS failures
    ('Get "https://registry-1.docker.io/v2/": context deadline exceeded', RegistryUnavailable),
    ("Get https://reg:5000/v2/: dial tcp 127.0.0.1:5000: connect: connection refused",
     RegistryUnavailable),
    ("x509: certificate signed by unknown authority", RegistryTLSError),
    ("manifest invalid: manifest invalid", RegistryError),
    # both words at once: the 5xx/429 wins over "unauthorized"
    ("unauthorized: received unexpected HTTP status: 503 Service Unavailable",
     RegistryUnavailable),
    ("toomanyrequests: unauthorized clients are rate limited", RegistryThrottled),
]  # fmt: skip


@pytest.mark.parametrize(("message", "expected"), DAEMON_MESSAGES)
def test_daemon_messages_are_classified(message: str, expected: type[RegistryError]) -> None:
    """Each message seen from the engine maps to exactly its class, and keeps its words."""
    error = classify_registry_message(message, registry="r")
    assert type(error) is expected
    assert message in error.message


def test_every_rule_of_the_table_is_exercised() -> None:
    """No rule of DAEMON_RULES is dead: some recorded message is decided by each one."""
    deciding = set()
    for message, _ in DAEMON_MESSAGES:
        deciding.add(next((i for i, r in enumerate(DAEMON_RULES) if r.pattern.search(message)), -1))
    assert set(range(len(DAEMON_RULES))) <= deciding


@given(
    prefix=st.sampled_from(["unauthorized: ", "authentication required ", "denied: ", ""]),
    transient=st.sampled_from(
        ["status: 500", "status: 502 Bad Gateway", "503 Service Unavailable", "status: 504",
         "toomanyrequests", "429 Too Many Requests", "Internal Server Error"]
    ),
)  # fmt: skip
def test_a_refusal_word_never_hides_a_5xx_or_429(prefix: str, transient: str) -> None:
    """Whatever refusal word the text also carries, a 5xx/429 in it is never authentication."""
    error = classify_registry_message(f"{prefix}{transient}", registry="r")
    assert not isinstance(error, AuthenticationError)
    assert isinstance(error, RegistryUnavailable) and error.retryable


# --- the structured mapping of our own HTTP calls -----------------------------------------------

HTTP_CASES: list[tuple[int, list[str], type[RegistryError]]] = [
    (429, [], RegistryThrottled),
    (429, ["TOOMANYREQUESTS"], RegistryThrottled),
    (500, [], RegistryUnavailable),
    (502, [], RegistryUnavailable),
    (503, ["UNAVAILABLE"], RegistryUnavailable),
    (504, [], RegistryUnavailable),
    (507, [], RegistryUnavailable),
    (401, ["UNAUTHORIZED"], AuthenticationError),
    (401, [], AuthenticationError),
    (403, ["DENIED"], AuthenticationError),
    (400, ["DENIED"], AuthenticationError),
    (403, ["TOOMANYREQUESTS"], RegistryThrottled),  # the code says throttled, whatever the status
    (400, ["UNAVAILABLE"], RegistryUnavailable),
    (404, ["NAME_UNKNOWN"], RegistryError),
    (404, ["MANIFEST_UNKNOWN"], RegistryError),
    (400, ["MANIFEST_INVALID"], RegistryError),
    (405, ["UNSUPPORTED"], RegistryError),
    (500, ["UNAUTHORIZED"], RegistryUnavailable),  # a 5xx is never a refusal
]


@pytest.mark.parametrize(("status", "codes", "expected"), HTTP_CASES)
def test_http_answers_are_classified_by_status_and_code(
    status: int, codes: list[str], expected: type[RegistryError]
) -> None:
    error = classify_http(status, codes, f"HTTP {status}", registry="r")
    assert type(error) is expected


def _response(status: int, body: bytes, headers: dict[str, str]) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = body
    response.headers.update(headers)
    return response


def _http() -> RegistryHTTP:
    return RegistryHTTP(RegistryEndpoint(9, "http://reg:5000", "reg:5000", insecure=True), None)


@pytest.mark.parametrize(
    ("status", "body", "headers", "expected", "retry_after"),
    [
        (429, b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}',
         {"Retry-After": "7"}, RegistryThrottled, 7.0),
        (503, b"<html>Service Unavailable</html>", {}, RegistryUnavailable, None),
        (502, b"", {}, RegistryUnavailable, None),
        (401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}', {},
         AuthenticationError, None),
        (404, b'{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known"}]}', {},
         RegistryError, None),
        (429, b'{"errors": "not a list"}', {"Retry-After": "soon"}, RegistryThrottled, None),
        (400, b'[1, 2]', {}, RegistryError, None),
    ],
)  # fmt: skip
def test_registry_http_refusals_read_status_body_and_retry_after(
    status: int,
    body: bytes,
    headers: dict[str, str],
    expected: type[RegistryError],
    retry_after: float | None,
) -> None:
    """``RegistryHTTP`` turns an answer into an error from its status, the body's Distribution
    codes (any body shape tolerated) and Retry-After."""
    error = _http()._refusal(_response(status, body, headers))
    assert type(error) is expected
    assert error.message.startswith("registry 9 (reg:5000) ") and f"HTTP {status}" in error.message
    if isinstance(error, RegistryThrottled):
        assert error.retry_after == retry_after
        assert error.to_payload().get("retry_after") == retry_after


def test_retry_after_takes_seconds_and_http_dates() -> None:
    now = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now=now) == 120.0
    assert (
        parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now) == 30
    )
    assert parse_retry_after(format_datetime(now - timedelta(hours=1), usegmt=True), now=now) == 0
    for unusable in (None, "", "soon", "-5", "1.5e9x"):
        assert parse_retry_after(unusable, now=now) is None


@given(
    tries=st.integers(1, 10),
    asked=st.one_of(st.none(), st.floats(0, 10_000, allow_nan=False)),
    base=st.floats(0.01, 10),
    cap=st.floats(0.01, 600),
    seed=st.integers(0, 2**32 - 1),
)
def test_retry_delay_honours_retry_after_within_the_cap(
    tries: int, asked: float | None, base: float, cap: float, seed: int
) -> None:
    """delay = max(backoff, Retry-After), never above the cap (far under the visibility timeout)."""
    error = RegistryThrottled("throttled", retry_after=asked)
    delay = retry_delay(error, tries, base=base, cap=cap, rng=random.Random(seed))
    backoff = retry_delay(None, tries, base=base, cap=cap, rng=random.Random(seed))
    assert delay <= cap
    assert delay >= backoff
    if asked is not None:
        assert delay >= min(asked, cap)


# --- a refusal counts only once the registry confirms it ----------------------------------------


class _Check:
    """A registry HTTP client whose credential check answers ``answer`` (None: accepted)."""

    def __init__(self, answer: RegistryError | None) -> None:
        self.answer, self.calls = answer, 0

    def ping(self) -> Challenge:
        return Challenge(401, "basic", {})

    def check_credentials(self) -> Challenge:
        self.calls += 1
        if self.answer is not None:
            raise self.answer
        return self.ping()

    def manifest_digest(self, repository: str, tag: str) -> str | None:
        return None

    def close(self) -> None:
        return None


def _ctx(check: _Check) -> StepContext:
    registry = Registry(id=9, name="r", url="http://reg:5000", host="reg:5000", insecure=True)
    return StepContext(
        job=PushJob(),
        registry=registry,
        engine=lambda: FakeEngine(FakeWorld()),
        http_factory=lambda _endpoint, _credential, _timeout: check,
    )


CLAIM = "registry reg:5000 rejected the credentials: unauthorized: authentication required"


@pytest.mark.parametrize(
    ("answer", "expected", "registry_says"),
    [
        (AuthenticationError("registry 9 rejected the credentials: HTTP 401"),
         AuthenticationError, "registry 9 rejected the credentials: HTTP 401"),
        (RegistryUnavailable("registry 9 cannot be reached: HTTP 500"), RegistryUnavailable,
         "registry_unavailable: registry 9 cannot be reached: HTTP 500"),
        (RegistryThrottled("registry 9 is throttling requests: HTTP 429", retry_after=3),
         RegistryThrottled, "registry_throttled: registry 9 is throttling requests: HTTP 429"),
        (RegistryTLSError("TLS with registry 9 failed: x509"), RegistryTLSError,
         "registry_tls_error: TLS with registry 9 failed: x509"),
        (None, RegistryMisbehaved, "GET /v2/ accepted the credential"),
    ],
)  # fmt: skip
def test_an_engine_refusal_is_confirmed_over_http(
    answer: RegistryError | None, expected: type[RegistryError], registry_says: str
) -> None:
    """The engine says "unauthorized": the step's error is what the registry's own API says
    about the same credential, with both answers under ``observed`` and no secret."""
    check = _Check(answer)
    credential = Credential("user", Secret("hunter2"), "secret")

    def refused() -> None:
        raise AuthenticationError(CLAIM)

    with pytest.raises(RegistryError) as raised:
        _confirmed(_ctx(check), credential, refused)
    error = raised.value
    assert type(error) is expected and check.calls == 1
    assert error.observed == {"engine": CLAIM, "registry": registry_says}
    assert error.to_payload()["observed"] == error.observed
    assert "hunter2" not in str(error.to_payload())
    assert error.retryable == (
        expected is not AuthenticationError and expected is not RegistryTLSError
    )


def test_other_engine_errors_are_not_checked() -> None:
    """Only a claimed refusal is checked; an outage the engine reports passes unchanged."""
    check = _Check(None)

    def down() -> None:
        raise RegistryUnavailable("registry reg:5000 cannot be reached: status: 503")

    with pytest.raises(RegistryUnavailable):
        _confirmed(_ctx(check), None, down)
    assert check.calls == 0
    assert _confirmed(_ctx(check), None, lambda: "done") == "done"
