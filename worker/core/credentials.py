"""Registry credentials: stored encrypted or referenced; resolved only in the step using them.

Secrets travel as ``Secret`` objects whose ``repr`` and ``str`` are masked, so a credential that
reaches a log line, an exception or a traceback by mistake prints as ``***``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from cryptography.fernet import Fernet, InvalidToken

from worker.core import credential_refs
from worker.core.errors import CredentialError, SecretKeyMissing
from worker.core.settings import Settings, get_settings


class CredentialKind(enum.StrEnum):
    """How a registry record holds its credential (the ``credential_kind`` column)."""

    SECRET = "secret"  # noqa: S105 - a kind name: the Fernet token is stored in the row
    ENV = "env"  # the name of an environment variable of the worker
    FILE = "file"  # the path of a file readable by the worker


class CredentialRecord(Protocol):
    """What credential handling reads of a registry record (``worker.store.models.Registry``
    is one); a Protocol, so that this bottom layer never imports the database's models."""

    @property
    def id(self) -> int | None: ...
    @property
    def name(self) -> str: ...
    @property
    def username(self) -> str | None: ...
    @property
    def auth_required(self) -> bool: ...
    @property
    def credential_kind(self) -> str | None: ...
    @property
    def credential_secret(self) -> str | None: ...
    @property
    def credential_ref(self) -> str | None: ...


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
            "or store a reference (env:NAME or file:PATH, see docs/deploy.md) instead",
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


def decrypt_secret(token: str, what: str, key: str | None = None) -> Secret:
    """A secret stored by ``encrypt_secret``; ``what`` names its owner in the error."""
    try:
        return Secret(_fernet(key).decrypt(token.encode()).decode())
    except InvalidToken:
        raise CredentialError(
            f"the stored secret of {what} cannot be decrypted with PUSHWORKER_SECRET_KEY",
            hint="the key changed since it was stored",
        ) from None


def parse_reference(reference: str, settings: Settings | None = None) -> tuple[CredentialKind, str]:
    """``env:NAME`` or ``file:PATH`` -> (kind, target), refused unless of that form and inside
    the credential namespace of ``settings`` (this process's by default)."""
    kind, sep, target = reference.partition(":")
    if not sep or kind not in (CredentialKind.ENV, CredentialKind.FILE) or not target.strip():
        raise CredentialError(
            f"credential reference {reference!r} is not of the form env:NAME or file:PATH"
        )
    target = target.strip()
    settings = settings or get_settings()
    if kind == CredentialKind.ENV:
        credential_refs.check_env_name(target, settings)
    else:
        credential_refs.check_file_path(target, settings)
    return CredentialKind(kind), target


def _where(registry: CredentialRecord) -> str:
    if registry.id is None:
        return f"registry {registry.name!r}"
    return f"registry {registry.id} ({registry.name})"


def check_credential_configured(registry: CredentialRecord) -> None:
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


def resolve_credential(registry: CredentialRecord, key: str | None = None) -> Credential | None:
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


def _read_password(registry: CredentialRecord, where: str, fix: str, key: str | None) -> str:
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
    if kind in (CredentialKind.ENV, CredentialKind.FILE):
        return _read_reference(CredentialKind(kind), registry.credential_ref or "", where, fix)
    raise CredentialError(f"{where} has no credential", hint=fix)


def _read_reference(kind: CredentialKind, target: str, where: str, fix: str) -> str:
    """Read a reference in this process, confined to its namespace (the authoritative check:
    the record may predate the confinement or have been saved with other settings)."""
    settings = get_settings()
    try:
        if kind == CredentialKind.ENV:
            return credential_refs.read_env(target, settings)
        return credential_refs.read_file(target, settings)
    except CredentialError as exc:
        raise CredentialError(
            f"{where}: {exc.message}",
            hint=f"{exc.hint}; or {fix}" if exc.hint else fix,
        ) from None
