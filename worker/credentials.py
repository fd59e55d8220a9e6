"""Registry credentials: stored encrypted or referenced; resolved only in the step using them.

Secrets travel as ``Secret`` objects whose ``repr`` and ``str`` are masked, so a credential that
reaches a log line, an exception or a traceback by mistake prints as ``***``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from worker.config import get_settings
from worker.errors import CredentialError, SecretKeyMissing
from worker.models import CredentialKind, Registry


class Secret:
    """A string that will not print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class Credential:
    username: str
    password: Secret
    source: str  # "secret", "env:NAME" or "file:PATH": what the event log may say about it

    def auth_config(self) -> dict[str, str]:
        """docker-py's ``auth_config``: passed explicitly on every push and login."""
        return {"username": self.username, "password": self.password.reveal()}


def _fernet(key: str | None = None) -> Fernet:
    key = key if key is not None else get_settings().secret_key
    if not key:
        raise SecretKeyMissing(
            "no secret key is configured, so a secret cannot be stored or read",
            hint="set PUSHWORKER_SECRET_KEY (make one with `pushctl config new-key`), "
            "or store a reference such as env:NAME or file:PATH instead",
        )
    try:
        return Fernet(key.encode())
    except ValueError:
        raise SecretKeyMissing(
            "PUSHWORKER_SECRET_KEY is not a valid Fernet key",
            hint="make one with `pushctl config new-key`",
        ) from None


def new_key() -> str:
    return Fernet.generate_key().decode()


def encrypt_secret(secret: str, key: str | None = None) -> str:
    return _fernet(key).encrypt(secret.encode()).decode()


def parse_reference(reference: str) -> tuple[CredentialKind, str]:
    """``env:NAME`` or ``file:PATH`` -> (kind, target); anything else is refused."""
    kind, sep, target = reference.partition(":")
    if not sep or kind not in (CredentialKind.ENV, CredentialKind.FILE) or not target.strip():
        raise CredentialError(
            f"credential reference {reference!r} is not of the form env:NAME or file:PATH"
        )
    return CredentialKind(kind), target.strip()


def _where(registry: Registry) -> str:
    if registry.id is None:
        return f"registry {registry.name!r}"
    return f"registry {registry.id} ({registry.name})"


def check_credential_configured(registry: Registry) -> None:
    """Refuse a registry record that cannot authenticate, without reading any secret.

    Used when a record is saved and when a job is enqueued. A reference (``env:``/``file:``) is
    only resolved by the worker, in its own environment, when a step needs it.
    """
    if not registry.auth_required:
        return
    where = _where(registry)
    fix = "give one with `pushctl registry set-credential`"
    if not registry.username:
        raise CredentialError(f"{where} has no username", hint=fix)
    if registry.credential_kind == CredentialKind.SECRET and registry.credential_secret:
        return
    if registry.credential_kind in (CredentialKind.ENV, CredentialKind.FILE) and (
        registry.credential_ref
    ):
        return
    raise CredentialError(
        f"{where} has no credential (no password, token or reference)",
        hint=f"{fix}, or mark the registry anonymous if it really takes pushes without one",
    )


def resolve_credential(registry: Registry, key: str | None = None) -> Credential | None:
    """The registry's credential, read now; None for a registry that takes anonymous pushes.

    Raises ``CredentialError`` naming what is missing and where to fix it.
    """
    if not registry.auth_required:
        return None
    where = _where(registry)
    fix = f"set it with `pushctl registry set-credential {registry.id}`"
    if not registry.username:
        raise CredentialError(f"{where} has no username", hint=fix)
    password = _read_password(registry, where, fix, key)
    if not password:
        raise CredentialError(f"{where} has an empty password", hint=fix)
    source = registry.credential_kind or ""
    if registry.credential_kind != CredentialKind.SECRET:
        source = f"{registry.credential_kind}:{registry.credential_ref}"
    return Credential(registry.username, Secret(password), source)


def _read_password(registry: Registry, where: str, fix: str, key: str | None) -> str:
    kind = registry.credential_kind
    if kind == CredentialKind.SECRET:
        if not registry.credential_secret:
            raise CredentialError(f"{where} has no stored secret", hint=fix)
        try:
            return _fernet(key).decrypt(registry.credential_secret.encode()).decode()
        except InvalidToken:
            raise CredentialError(
                f"the stored secret of {where} cannot be decrypted with PUSHWORKER_SECRET_KEY",
                hint=f"the key changed since it was stored; {fix}",
            ) from None
    if kind == CredentialKind.ENV:
        name = registry.credential_ref or ""
        value = os.environ.get(name)
        if value is None:
            raise CredentialError(
                f"{where} reads its password from environment variable {name}, "
                "which is not set in the worker's environment",
                hint=f"export {name} for the worker, or {fix}",
            )
        return value
    if kind == CredentialKind.FILE:
        path = Path(registry.credential_ref or "")
        try:
            return path.read_text().strip("\r\n")
        except OSError as exc:
            raise CredentialError(
                f"{where} reads its password from {path}, which cannot be read "
                f"({exc.strerror or type(exc).__name__})",
                hint=f"create the file for the worker's user, or {fix}",
            ) from None
    raise CredentialError(f"{where} has no credential", hint=fix)
