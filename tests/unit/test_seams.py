"""The seams turn foreign errors into the project's tree; secrets never print."""

from __future__ import annotations

from typing import Any

import docker
import pytest

from worker.core.credentials import Credential, Secret
from worker.core.errors import (
    AuthenticationError,
    DockerError,
    RegistryError,
    RegistryTLSError,
    RegistryUnavailable,
)
from worker.core.logs import MASK, redact
from worker.core.reference import TargetReference
from worker.seams.classify import classify_registry_message
from worker.seams.docker_engine import (
    DockerEngine,
    _read_push_stream,
    without_environment_lookups,
)
from worker.seams.registry_http import parse_challenge

TARGET = TargetReference("127.0.0.1:5000", "team/app", "v1")


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        # Seen on this machine: docker-py's login with a wrong password (APIError 500).
        (
            "login attempt to http://127.0.0.1:5055/v2/ failed with status: 401 Unauthorized",
            AuthenticationError,
        ),
        ("unauthorized: authentication required", AuthenticationError),
        ("denied: requested access to the resource is denied", AuthenticationError),
        ('Get "https://registry-1.docker.io/v2/": context deadline exceeded', RegistryUnavailable),
        (
            "Get https://reg:5000/v2/: dial tcp 127.0.0.1:5000: connect: connection refused",
            RegistryUnavailable,
        ),
        ("x509: certificate signed by unknown authority", RegistryTLSError),
        ("manifest invalid: manifest invalid", RegistryError),
    ],
)
def test_registry_messages_are_classified(message: str, expected: type[Exception]) -> None:
    """Classification reads the registry's words, not the daemon's status code."""
    error = classify_registry_message(message, registry="r")
    assert type(error) is expected
    assert message in error.message


def test_error_chunk_in_push_stream_raises() -> None:
    """docker-py does not raise on a failed push; the seam does."""
    stream: list[dict[str, Any]] = [
        {"status": "The push refers to repository [127.0.0.1:5000/team/app]"},
        {
            "errorDetail": {"message": "unauthorized: authentication required"},
            "error": "unauthorized: authentication required",
        },
    ]
    with pytest.raises(AuthenticationError):
        _read_push_stream(iter(stream), TARGET, None)


def test_push_stream_yields_the_digest_and_progress() -> None:
    seen: list[tuple[int, int, int, int]] = []
    stream: list[dict[str, Any]] = [
        {"id": "abc", "status": "Pushing", "progressDetail": {"current": 5, "total": 10}},
        {"id": "abc", "status": "Pushed"},
        {"aux": {"Tag": "v1", "Digest": "sha256:" + "a" * 64, "Size": 524}},
    ]
    result = _read_push_stream(iter(stream), TARGET, lambda *a: seen.append(a))
    assert result.digest == "sha256:" + "a" * 64
    assert seen[-1] == (5, 10, 1, 1)


def test_push_stream_without_digest_is_an_error() -> None:
    with pytest.raises(DockerError, match="without reporting a digest"):
        _read_push_stream(iter([{"status": "done"}]), TARGET, None)


def test_secrets_do_not_print() -> None:
    """A credential that reaches a repr, an f-string or an exception prints masked."""
    credential = Credential("user", Secret("hunter2"), "secret")
    for text in (repr(credential), str(credential), f"{credential}", str(ValueError(credential))):
        assert "hunter2" not in text
    assert credential.auth_config() == {"username": "user", "password": "hunter2"}


def test_log_redaction_masks_credential_like_fields() -> None:
    event = {
        "event": "x",
        "password": "p",
        "nested": {"auth_config": {"password": "p"}},
        "registry_token": "t",
        "credential_source": "env:HARBOR_PW",
        "user": "bob",
    }
    out = redact(None, "info", event)
    assert out["password"] == MASK and out["registry_token"] == MASK
    assert out["nested"]["auth_config"] == MASK
    assert out["credential_source"] == "env:HARBOR_PW" and out["user"] == "bob"


def test_challenge_parsing() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://harbor/service/token",service="harbor-registry"'
    )
    assert scheme == "bearer"
    assert params == {"realm": "https://harbor/service/token", "service": "harbor-registry"}
    assert parse_challenge('Basic realm="Registry Realm"')[0] == "basic"


class _LoginCounter:
    """docker-py's APIClient, as far as ``DockerEngine.login`` uses it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._auth_configs: object = None

    def login(self, *, username: str, password: str, registry: str, reauth: bool) -> None:
        self.calls.append(f"{username}@{registry}")


def test_a_recent_login_is_reused_only_when_allowed() -> None:
    """The engine asks the daemon again for a new credential, another registry, after a
    refusal or when told not to reuse; otherwise a recent login stands."""
    api = _LoginCounter()
    engine = DockerEngine(api=api)  # no daemon: the client is the counter
    alice = Credential("alice", Secret("pw-1"), "secret")
    assert engine.login("reg:5000", alice) is True
    assert engine.login("reg:5000", alice) is False  # reused: the daemon is not asked
    assert engine.login("reg:5000", alice, reuse=False) is True
    assert engine.login("reg:5000", Credential("alice", Secret("pw-2"), "secret")) is True
    assert engine.login("other:5000", alice) is True
    engine.forget_logins("reg:5000")
    assert engine.login("reg:5000", alice) is True
    assert api.calls == ["alice@reg:5000"] * 3 + ["alice@other:5000", "alice@reg:5000"]


@pytest.mark.parametrize(
    ("base_url", "reads_environment"),
    [
        ("unix:///run/pushworker-test/docker.sock", False),
        ("tcp://127.0.0.1:2375", True),
        ("https://engine.example:2376", True),
    ],
)
def test_a_local_engine_client_skips_the_environment_lookups(
    base_url: str, reads_environment: bool
) -> None:
    # A fixed API version: docker-py then connects to nothing when the client is made.
    api = docker.APIClient(base_url=base_url, version="1.41")
    assert api.trust_env is True  # requests' default, which the seam turns off
    assert without_environment_lookups(api).trust_env is reads_environment
