"""Registry records are validated when saved: the incident's empty credential never gets in."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.core.credentials import resolve_credential
from worker.core.errors import (
    CredentialError,
    InvalidFallbackChain,
    InvalidRegistry,
    RegistryNotFound,
    SecretKeyMissing,
)
from worker.core.settings import get_settings
from worker.registries import (
    RegistrySpec,
    create_registry,
    get_registry,
    parse_registry_url,
    update_registry,
)
from worker.store.db import session_scope


def add(rid: int, **overrides: object) -> None:
    fields: dict[str, object] = {
        "name": f"r{rid}",
        "url": f"https://r{rid}.example.com",
        "username": "u",
        "secret": "pw",
    }
    fields.update(overrides)
    with session_scope() as session:
        create_registry(session, RegistrySpec(**fields), registry_id=rid)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "kind", "insecure", "expected_host"),
    [
        ("https://reg.cyfee.com:10443", "harbor", False, "reg.cyfee.com:10443"),
        ("reg.cyfee.com:10443", "harbor", False, "reg.cyfee.com:10443"),
        ("HTTPS://Reg.Example.COM/", "generic", False, "reg.example.com"),
        ("http://127.0.0.1:5001", "generic", True, "127.0.0.1:5001"),
        ("https://registry-1.docker.io", "dockerhub", False, "docker.io"),
    ],
)
def test_urls_normalise_to_the_reference_host(
    url: str, kind: str, insecure: bool, expected_host: str
) -> None:
    """The host a reference is built from comes from the URL, normalised."""
    assert parse_registry_url(url, kind=kind, insecure=insecure).host == expected_host


@pytest.mark.parametrize(
    ("url", "kind", "insecure", "message"),
    [
        ("https://registry-1.docker.io", "generic", False, "Docker Hub"),
        ("docker.io", "harbor", False, "Docker Hub"),
        ("https://reg.example.com", "dockerhub", False, "Docker Hub URL"),
        ("http://reg.example.com", "generic", False, "plain HTTP"),
        ("https://reg.example.com/project", "generic", False, "scheme://host"),
        ("https://user:pw@reg.example.com", "generic", False, "scheme://host"),
        ("ftp://reg.example.com", "generic", False, "https://"),
        ("https://reg.example.com:99999", "generic", False, "port"),
    ],
)
def test_bad_urls_are_refused(url: str, kind: str, insecure: bool, message: str) -> None:
    """Docker Hub only when named, HTTP only when insecure is explicit, no paths or userinfo."""
    with pytest.raises(InvalidRegistry, match=message):
        parse_registry_url(url, kind=kind, insecure=insecure)


def test_incident_registry_without_password_is_refused(sqlite_url: str) -> None:
    """Harbor id 5 with a username and no password (empty auth_config) is refused at creation."""
    with pytest.raises(CredentialError, match=r"registry 5 .*no credential"):
        add(5, url="https://reg.cyfee.com:10443", kind="harbor", username="admin", secret=None)
    with session_scope() as session, pytest.raises(RegistryNotFound):
        update_registry(session, 5, RegistrySpec())


def test_empty_secret_and_missing_username_are_refused(sqlite_url: str) -> None:
    with pytest.raises(InvalidRegistry, match="empty"):
        add(1, secret="")
    with pytest.raises(CredentialError, match="no username"):
        add(2, username=None)


def test_a_secret_cannot_be_stored_without_a_key(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storing a secret with no PUSHWORKER_SECRET_KEY is refused, saying how to fix it."""
    from worker.core.settings import get_settings

    monkeypatch.delenv("PUSHWORKER_SECRET_KEY")
    get_settings.cache_clear()
    with pytest.raises(SecretKeyMissing, match="PUSHWORKER_SECRET_KEY"):
        add(1)


def test_references_resolve_in_the_workers_environment_with_clear_errors(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reference inside the namespace is saved as given; resolving a missing variable or file
    names it. (Confinement itself: tests/unit/test_credential_refs.py.)"""
    monkeypatch.setenv("PUSHWORKER_CREDENTIALS_DIR", str(tmp_path))
    monkeypatch.delenv("PUSHWORKER_CREDENTIAL_ENV_PREFIX", raising=False)
    monkeypatch.delenv("REGISTRY_CREDENTIAL_NOT_SET_ANYWHERE", raising=False)
    get_settings.cache_clear()
    missing_file = tmp_path / "nonexistent-password"
    add(1, secret=None, credential_ref="env:REGISTRY_CREDENTIAL_NOT_SET_ANYWHERE")
    add(2, secret=None, credential_ref=f"file:{missing_file}")
    with session_scope() as session:
        # Saved as given: the kind and its target, not resolved (nothing to resolve yet).
        by_env, by_file = get_registry(session, 1), get_registry(session, 2)
        assert (by_env.credential_kind, by_env.credential_ref, by_env.credential_secret) == (
            "env",
            "REGISTRY_CREDENTIAL_NOT_SET_ANYWHERE",
            None,
        )
        assert (by_file.credential_kind, by_file.credential_ref, by_file.credential_secret) == (
            "file",
            str(missing_file),
            None,
        )
        with pytest.raises(CredentialError, match="REGISTRY_CREDENTIAL_NOT_SET_ANYWHERE"):
            resolve_credential(get_registry(session, 1))
        with pytest.raises(CredentialError, match=r"nonexistent-password.*cannot be read"):
            resolve_credential(get_registry(session, 2))
    with pytest.raises(CredentialError, match="env:NAME or file:PATH"):
        add(3, secret=None, credential_ref="vault:thing")


def test_anonymous_registry_needs_saying_so(sqlite_url: str) -> None:
    """A registry without credentials is accepted only when marked anonymous explicitly."""
    with pytest.raises(CredentialError, match=r"registry 1 .*has no username"):
        add(1, username=None, secret=None)
    add(1, username=None, secret=None, auth_required=False)
    with session_scope() as session:
        registry = get_registry(session, 1)
        assert registry.auth_required is False
        assert resolve_credential(registry) is None


def test_fallback_chains_are_checked_when_set(sqlite_url: str) -> None:
    """Unknown ids, self, duplicates and cycles are refused when the chain is set."""
    add(4)
    add(5, fallback_chain=[4])
    with pytest.raises(RegistryNotFound):
        add(6, fallback_chain=[99])
    with session_scope() as session:
        with pytest.raises(InvalidFallbackChain, match="own registry"):
            update_registry(session, 5, RegistrySpec(fallback_chain=[5]))
        with pytest.raises(InvalidFallbackChain, match="twice"):
            update_registry(session, 5, RegistrySpec(fallback_chain=[4, 4]))
        with pytest.raises(InvalidFallbackChain, match="cycle"):
            update_registry(session, 4, RegistrySpec(fallback_chain=[5]))


def test_names_are_unique(sqlite_url: str) -> None:
    add(1)
    with pytest.raises(InvalidRegistry, match="exists already"):
        add(2, name="r1")
