"""API tokens: create (shown once), list, revoke, verify.

A token reads ``pwk_<id>_<secret>``: a recognisable prefix (secret scanners and people can tell
it apart), the id of its row (so a lookup reads one row, never every hash) and 32 random bytes
(``secrets.token_urlsafe``). Only an argon2id hash of the whole token is stored.

Why argon2 and not an HMAC with a server key: no second secret to distribute to every API
process and to rotate; a copy of the database reveals no token. The secret has 256 bits of
entropy, so the hash does not need to slow down guessing; its cost is set low (one pass over
8 MiB, about 4 ms) because every request verifies one.

Verification takes the same path for every refusal: an unknown id, a malformed token, a revoked
or expired one are each checked against a hash (a fixed dummy one when there is no row), and
argon2's own comparison is constant-time. Creating and revoking are events
(``token.created``, ``token.revoked``) naming the token, its role and scope, never the token or
its hash.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import argon2
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Row, bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker.core.errors import NotFound, ValidationError
from worker.core.text import refuse_control
from worker.jobs import MAX_ID, check_id
from worker.store import events
from worker.store.db import read_connection, read_scope, session_scope
from worker.store.models import ApiToken, utcnow

PREFIX = "pwk_"
ROLES = ("producer", "operator", "auditor", "admin")
#: ``token:`` + name fits the events' 200-character actor column.
MAX_NAME = 100
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_TOKEN = re.compile(r"pwk_([1-9][0-9]{0,9})_([A-Za-z0-9_-]{43})")
#: ``last_used_at`` is written at most this often per token (a write per request would take
#: SQLite's write lock on every read).
LAST_USED_EVERY = timedelta(minutes=1)

#: The hash of a row whose token is being made (replaced in the same transaction).
_PENDING = "-"
_HASHER = argon2.PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
#: Checked when there is no row to check against, so that a refusal takes as long either way.
_DUMMY_HASH = _HASHER.hash(PREFIX + "0_" + "A" * 43)


@dataclass(frozen=True)
class Principal:
    """Who a verified token speaks for."""

    token_id: int
    name: str
    role: str
    #: The registries a producer may push to; None: any.
    registry_ids: tuple[int, ...] | None

    @property
    def actor(self) -> str:
        return f"token:{self.name}"

    def may_use_registry(self, registry_id: int) -> bool:
        return self.registry_ids is None or registry_id in self.registry_ids


@dataclass(frozen=True)
class TokenInfo:
    """A token as listed: everything but the token and its hash."""

    id: int
    name: str
    role: str
    registry_ids: list[int] | None
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= utcnow():
            return "expired"
        return "active"

    def to_dict(self) -> dict[str, object]:
        def iso(moment: datetime | None) -> str | None:
            return moment.isoformat() if moment else None

        return {
            "id": self.id, "name": self.name, "role": self.role, "state": self.state,
            "registry_ids": self.registry_ids, "created_at": iso(self.created_at),
            "created_by": self.created_by, "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at), "last_used_at": iso(self.last_used_at),
        }  # fmt: skip


def _info(row: ApiToken) -> TokenInfo:
    scope = list(row.registry_ids) if row.registry_ids is not None else None
    return TokenInfo(
        row.id, row.name, row.role, scope, row.created_at, row.created_by, row.expires_at,
        row.revoked_at, row.last_used_at,
    )  # fmt: skip


def _stream(token_id: int) -> str:
    return f"tokens/{token_id}"


def check_name(name: object) -> str:
    if not isinstance(name, str):
        raise ValidationError("a token name must be text")
    refuse_control("the token name", name)
    if not NAME.fullmatch(name):
        raise ValidationError(
            "a token name is 1 to 100 of A-Z, a-z, 0-9, '.', '_' and '-', starting with a "
            "letter or digit",
            hint="e.g. platform-prod",
        )
    return name


def check_role(role: object) -> str:
    if role not in ROLES:
        raise ValidationError(f"the role must be one of {', '.join(ROLES)}")
    return str(role)


def create_token(
    name: str,
    role: str,
    *,
    actor: str,
    registry_ids: list[int] | None = None,
    expires_at: datetime | None = None,
) -> tuple[str, TokenInfo]:
    """A new token: ``(the token, shown once and never again; what is stored of it)``."""
    check_name(name)
    check_role(role)
    if registry_ids is not None:
        registry_ids = [check_id("registry", member) for member in registry_ids]
        if not registry_ids:
            raise ValidationError("--registry names no registry", hint="e.g. --registry 5,7")
        if role != "producer":
            raise ValidationError(
                "only producer tokens are limited to registries",
                hint="leave out --registry, or use --role producer",
            )
    if expires_at is not None and expires_at <= utcnow():
        raise ValidationError("the token would expire before it is used")
    secret = secrets.token_urlsafe(32)
    with session_scope() as session:
        if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
            raise ValidationError(
                f"a token named {name!r} exists already",
                hint="choose another name, or `pushctl tokens revoke` the old one first",
            )
        row = ApiToken(
            name=name, role=role, registry_ids=registry_ids, token_hash=_PENDING,
            created_by=actor, expires_at=expires_at,
        )  # fmt: skip
        try:
            with session.begin_nested():
                session.add(row)
                session.flush()
        except IntegrityError:
            raise ValidationError(f"a token named {name!r} exists already") from None
        token = f"{PREFIX}{row.id}_{secret}"
        row.token_hash = _HASHER.hash(token)
        payload: dict[str, object] = {"name": name, "role": role}
        if registry_ids is not None:
            payload["registry_ids"] = registry_ids
        if expires_at is not None:
            payload["expires_at"] = expires_at.isoformat()
        events.append(
            session, stream=_stream(row.id), type="token.created", actor=actor, payload=payload
        )
        session.flush()
        info = _info(row)
    return token, info


def list_tokens() -> list[TokenInfo]:
    with read_scope() as session:
        return [_info(row) for row in session.scalars(select(ApiToken).order_by(ApiToken.id))]


def revoke_token(name: str, *, actor: str, reason: str | None = None) -> TokenInfo:
    """Revoke the token named ``name``: refused from the next request on."""
    check_name(name)
    with session_scope() as session:
        row = session.scalar(select(ApiToken).where(ApiToken.name == name))
        if row is None:
            raise NotFound(f"no token named {name!r}", hint="see `pushctl tokens list`")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            payload: dict[str, object] = {"name": name, "role": row.role}
            if reason:
                payload["reason"] = refuse_control("the reason", reason)
            events.append(
                session, stream=_stream(row.id), type="token.revoked", actor=actor,
                payload=payload,
            )  # fmt: skip
        session.flush()
        return _info(row)


def verify_token(token: str) -> Principal | None:
    """Who ``token`` speaks for, or None (unknown, malformed, revoked or expired).

    Every call reads the token's row by id (so a revocation or expiry counts from the next
    request). A token not verified before in this process, or any wrong one, is checked against
    the row's argon2 hash (or a dummy hash: every refusal takes that path); a token this process
    already verified against the same stored hash is recognised by its SHA-256 instead, compared
    in constant time, which saves the argon2 pass on every later request.
    """
    match = _TOKEN.fullmatch(token) if isinstance(token, str) and len(token) < 200 else None
    token_id = int(match.group(1)) if match else 0
    row = _row(token_id) if 0 < token_id <= MAX_ID else None
    stored = row.token_hash if row is not None else _DUMMY_HASH
    digest = hashlib.sha256(token.encode("utf-8", "replace")).digest() if match else b""
    seen = _VERIFIED.get(token_id) if row is not None and match is not None else None
    good: bool
    if seen is not None and seen[0] == stored and hmac.compare_digest(seen[1], digest):
        good = True
    else:
        try:
            good = _HASHER.verify(stored, token if match else PREFIX + "0_" + "B" * 43)
        except (VerificationError, InvalidHashError):
            good = False
    if row is None or not good or match is None:
        return None
    if len(_VERIFIED) >= _VERIFIED_MAX:
        _VERIFIED.clear()
    _VERIFIED[token_id] = (stored, digest)
    now = utcnow()
    if row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now):
        return None
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_EVERY:
        _touch(token_id, now)
    return Principal(
        token_id, row.name, row.role,
        tuple(row.registry_ids) if row.registry_ids is not None else None,
    )  # fmt: skip


def token_usable(token_id: int) -> bool:
    """Whether the token with this id is still neither revoked nor expired (one read by id):
    what a session opened with it checks on each request, so a revocation ends the session."""
    row = _row(token_id) if 0 < token_id <= MAX_ID else None
    return (
        row is not None
        and row.revoked_at is None
        and (row.expires_at is None or row.expires_at > utcnow())
    )


#: Tokens this process verified: id -> (the stored hash it verified against, its SHA-256).
_VERIFIED: dict[int, tuple[str, bytes]] = {}
_VERIFIED_MAX = 10_000
_TABLE = ApiToken.__table__
_ROW = select(
    *(
        _TABLE.c[name]
        for name in ("name", "role", "registry_ids", "token_hash", "expires_at", "revoked_at",
                     "last_used_at")
    )
).where(_TABLE.c.id == bindparam("token_id"))  # fmt: skip


def _row(token_id: int) -> Row[Any] | None:
    with read_connection() as connection:
        return connection.execute(_ROW, {"token_id": token_id}).first()


def _touch(token_id: int, now: datetime) -> None:
    try:
        with session_scope() as session:
            _mark_used(session, token_id, now)
    except Exception:  # noqa: S110 - bookkeeping; never a reason to refuse a valid token
        pass


def _mark_used(session: Session, token_id: int, now: datetime) -> None:
    session.execute(
        update(ApiToken)
        .where(ApiToken.id == token_id)
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )
