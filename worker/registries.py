"""Registry records: create, update, validate. A record that cannot authenticate is refused here,
when it is saved, not later when a push needs it (the incident's empty ``auth_config``).

Every registry edit runs serialised with every other (``_lock_registries``): a name checked
free, an id picked, a fallback chain checked for cycles are still true when the edit commits.
What the database would refuse anyway (a unique name or id, a value it cannot store) is
translated here, at its boundary, into the same ``InvalidRegistry`` a check would raise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import func, select, text
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session

from worker.core.credentials import (
    CredentialKind,
    check_credential_configured,
    encrypt_secret,
    parse_reference,
)
from worker.core.errors import (
    InvalidFallbackChain,
    InvalidRegistry,
    RegistryNotFound,
)
from worker.core.hostnames import DOCKER_HUB_HOSTS
from worker.core.text import refuse_control
from worker.engine.targets import RegistryAddress, checked_address, parse_registry_url
from worker.store import events
from worker.store.models import Registry, RegistryKind, utcnow

__all__ = [
    "DOCKER_HUB_HOSTS",
    "RegistryAddress",
    "RegistrySpec",
    "checked_address",
    "parse_registry_url",
]

#: The key of the PostgreSQL advisory lock that serialises registry edits ("pushregs"). Taken
#: first in an edit's transaction, before the event chain's lock (``worker.store.events``).
REGISTRY_LOCK_KEY = int.from_bytes(b"pushregs", "big")
#: Registry ids are 32-bit on every backend (``registries.id`` is an INTEGER).
MAX_REGISTRY_ID = 2**31 - 1
#: Column widths of the text fields (``worker.store.models.Registry``).
_MAX_LENGTHS = {"name": 100, "username": 200, "credential_ref": 500}
#: Line breaks and tabs are part of a PEM bundle; every other control character is refused.
_PEM_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@dataclass
class RegistrySpec:
    """What an operator gives to create or update a registry; None leaves a field unchanged."""

    name: str | None = None
    url: str | None = None
    kind: str | None = None
    username: str | None = None
    secret: str | None = None
    credential_ref: str | None = None
    ca_cert: str | None = None
    insecure: bool | None = None
    auth_required: bool | None = None
    fallback_chain: list[int] | None = None
    #: Flow control: at most this many pushes at once, across every worker; 0 clears the cap.
    max_concurrent: int | None = None
    #: Flow control: at most this many registry steps (login, push) per second; 0 clears it.
    rate_per_second: float | None = None


def get_registry(session: Session, registry_id: int, *, include_removed: bool = False) -> Registry:
    registry = session.get(Registry, registry_id)
    if registry is None or (registry.removed_at is not None and not include_removed):
        raise RegistryNotFound(
            f"registry {registry_id} does not exist", hint="see `pushctl registry list`"
        )
    return registry


def list_registries(session: Session, *, include_removed: bool = False) -> list[Registry]:
    query = select(Registry).order_by(Registry.id)
    if not include_removed:
        query = query.where(Registry.removed_at.is_(None))
    return list(session.scalars(query))


def create_registry(
    session: Session,
    spec: RegistrySpec,
    *,
    registry_id: int | None = None,
    actor: str | None = None,
) -> Registry:
    if not spec.name or not spec.url:
        raise InvalidRegistry("a registry needs a name and a URL")
    _lock_registries(session)
    registry = Registry(
        id=_new_id(session, registry_id), fallback_chain=[], auth_required=True, insecure=False
    )
    registry.kind = RegistryKind.GENERIC.value
    _apply(session, registry, spec)
    with _stored(registry):
        session.add(registry)
        session.flush()
    _audit(session, registry, "registry.created", actor)
    return registry


def update_registry(
    session: Session, registry_id: int, spec: RegistrySpec, *, actor: str | None = None
) -> Registry:
    _lock_registries(session)
    registry = get_registry(session, registry_id)
    _apply(session, registry, spec)
    with _stored(registry):
        session.flush()
    limits = spec.max_concurrent is not None or spec.rate_per_second is not None
    replaced = spec.secret is not None or spec.credential_ref is not None
    _audit(session, registry, "registry.updated", actor, limits=limits, credential=replaced)
    return registry


def remove_registry(session: Session, registry_id: int, *, actor: str | None = None) -> Registry:
    """Remove a registry, and take it out of every other registry's fallback chain (each such
    change recorded as ``registry.updated``), so that no stored chain still names it."""
    _lock_registries(session)
    registry = get_registry(session, registry_id)
    registry.removed_at = utcnow()
    holders = [get_registry(session, rid) for rid in chains_naming(session, registry_id)]
    for other in holders:
        # A new list: the JSON column notices only assignment, not changes in place.
        other.fallback_chain = [rid for rid in other.fallback_chain if rid != registry_id]
    session.flush()
    _audit(session, registry, "registry.removed", actor)
    for other in holders:
        reason = f"registry {registry_id} was removed, so it left this fallback chain"
        _audit(session, other, "registry.updated", actor, reason=reason)
    return registry


def chains_naming(session: Session, registry_id: int) -> list[int]:
    """The registries (not removed) whose fallback chain names ``registry_id``."""
    return [
        other.id
        for other in list_registries(session)
        if other.id != registry_id and registry_id in (other.fallback_chain or [])
    ]


def job_chain(session: Session, registry: Registry, requested: list[int] | None) -> list[int]:
    """The fallback chain a new job copies: the one it asked for, else the registry's stored
    one, checked either way (removed or unusable members are refused, never copied), after the
    registry's own stored address."""
    checked_address(registry)
    chain = list(registry.fallback_chain or []) if requested is None else requested
    try:
        return validate_chain(session, registry.id, chain)
    except (InvalidFallbackChain, RegistryNotFound) as exc:
        if requested is not None:
            raise
        # The operator's stored chain, not the producer's request, is what must change.
        raise InvalidFallbackChain(
            f"the stored fallback chain of registry {registry.id}: {exc.message}",
            hint=f"set it again: pushctl registry update {registry.id} --fallback IDS",
        ) from None


def _lock_registries(session: Session) -> None:
    """Serialise registry edits: on PostgreSQL a transaction-level advisory lock taken before
    anything is read (SQLite's writers are serialised by ``BEGIN IMMEDIATE``, ``worker.store.db``).

    Two edits that each checked a chain against the other's old state made a cycle
    (201 -> [202], 202 -> [201]); two adds of one name both found it free."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": REGISTRY_LOCK_KEY})


def _new_id(session: Session, registry_id: int | None) -> int:
    """The id of a new registry: the one asked for, if free, else the next after every stored
    one (removed ones included: an id is never reused, so old events keep their meaning).

    Picked under the registry lock, not by PostgreSQL's sequence, which explicit ids (``--id``)
    never advance."""
    if registry_id is None:
        return int(session.scalar(select(func.max(Registry.id))) or 0) + 1
    if isinstance(registry_id, bool) or not 1 <= registry_id <= MAX_REGISTRY_ID:
        raise InvalidRegistry(
            f"registry id {registry_id} is out of range",
            hint=f"give an id from 1 to {MAX_REGISTRY_ID}, or none for the next free one",
        )
    taken = session.get(Registry, registry_id)
    if taken is not None:
        removed = ", removed" if taken.removed_at is not None else ""
        raise InvalidRegistry(
            f"registry id {registry_id} is taken (by {taken.name!r}{removed})",
            hint="choose another --id, or leave it out for the next free one",
        )
    return registry_id


@contextmanager
def _stored(registry: Registry) -> Iterator[None]:
    """What the database refuses on a flush of ``registry``, as ``InvalidRegistry``. The checks
    before it (under the registry lock) make these rare; this keeps a concurrent writer that
    bypasses them from surfacing as a raw database error. Values are never echoed."""
    try:
        yield
    except IntegrityError as exc:
        detail = str(exc.orig).lower()
        if "name" in detail:
            message = f"a registry named {registry.name!r} exists already"
        elif "pkey" in detail or "registries.id" in detail or "primary" in detail:
            message = f"registry id {registry.id} is taken"
        else:
            message = "the registry conflicts with a stored one"
        raise InvalidRegistry(message, hint="see `pushctl registry list --all`") from None
    except DataError:
        raise InvalidRegistry(
            "a registry field holds a value the database cannot store",
            hint="give plain text of the documented lengths, without NUL bytes",
        ) from None


def _audit(
    session: Session,
    registry: Registry,
    type: str,
    actor: str | None,
    reason: str | None = None,
    *,
    limits: bool = False,
    credential: bool = False,
) -> None:
    """Operator changes to a registry are events too: who changed what, never the secret."""
    payload: dict[str, object] = {
        "registry_name": registry.name,
        "registry_host": registry.host,
        "fallback_chain": list(registry.fallback_chain),
        "credential_source": credential_description(registry),
    }
    if limits or registry.max_concurrent is not None or registry.rate_per_second is not None:
        # Flow control: the limits in force after the change (None: no limit).
        payload["max_concurrent"] = registry.max_concurrent
        payload["rate_per_second"] = registry.rate_per_second
    if credential:
        # That the credential changed, and to what kind of source; never the secret itself.
        payload["credential_replaced"] = True
    if reason is not None:
        payload["reason"] = reason
    events.append(
        session,
        stream=events.registry_stream(registry.id),
        type=type,
        actor=actor or events.operator_actor(),
        registry_id=registry.id,
        payload=payload,
    )


def credential_description(registry: Registry) -> str:
    """How the registry authenticates, never the secret: anonymous, secret, env:NAME, file:PATH."""
    if not registry.auth_required:
        return "anonymous"
    if registry.credential_kind == CredentialKind.SECRET:
        return "secret"
    return f"{registry.credential_kind}:{registry.credential_ref}"


def _refuse_bad_text(spec: RegistrySpec) -> None:
    """Control characters (NUL, ESC, newlines) in any field are refused, naming the field and
    never echoing the value (it may be a secret); over-long ones too, before the database."""
    fields = {
        "the registry name": spec.name,
        "the registry URL": spec.url,
        "the registry kind": spec.kind,
        "the username": spec.username,
        "the password": spec.secret,
        "the credential reference": spec.credential_ref,
    }
    for field, value in fields.items():
        if value is not None:
            refuse_control(field, value)
    for attribute, limit in _MAX_LENGTHS.items():
        value = getattr(spec, attribute)
        if value is not None and len(value.strip()) > limit:
            raise InvalidRegistry(f"the {attribute.replace('_', ' ')} is longer than {limit}")
    if spec.ca_cert is not None and _PEM_CONTROL.search(spec.ca_cert):
        raise InvalidRegistry(
            "the CA bundle contains a control character",
            hint="give a PEM file (text with line breaks only)",
        )


def _apply(session: Session, registry: Registry, spec: RegistrySpec) -> None:
    _refuse_bad_text(spec)
    if spec.name is not None:
        _check_unique_name(session, spec.name.strip(), registry.id)
        registry.name = spec.name.strip()
    if spec.kind is not None:
        if spec.kind not in {k.value for k in RegistryKind}:
            kinds = ", ".join(k.value for k in RegistryKind)
            raise InvalidRegistry(f"unknown registry kind {spec.kind!r}; use one of {kinds}")
        registry.kind = spec.kind
    if spec.insecure is not None:
        registry.insecure = spec.insecure
    if spec.auth_required is not None:
        registry.auth_required = spec.auth_required
    if spec.url is not None or spec.kind is not None or spec.insecure is not None:
        address = parse_registry_url(
            spec.url or registry.url, kind=registry.kind, insecure=registry.insecure
        )
        registry.url, registry.host = address.url, address.host
    if spec.username is not None:
        registry.username = spec.username.strip() or None
    if spec.ca_cert is not None:
        registry.ca_cert = _check_ca(spec.ca_cert)
    _apply_credential(registry, spec)
    if spec.fallback_chain is not None:
        registry.fallback_chain = validate_chain(session, registry.id, spec.fallback_chain)
    _apply_limits(registry, spec)
    # Refuse a record that cannot authenticate now, not when a push needs it (the incident).
    check_credential_configured(registry)


def _apply_limits(registry: Registry, spec: RegistrySpec) -> None:
    """Flow-control limits: a whole number of pushes >= 1 and a rate > 0; 0 clears either."""
    cap = spec.max_concurrent
    if cap is not None:
        if isinstance(cap, bool) or not isinstance(cap, int) or not 0 <= cap <= 10_000:
            raise InvalidRegistry(
                f"max concurrent pushes must be a whole number from 1 to 10000 (0 clears it), "
                f"not {cap!r}"
            )
        registry.max_concurrent = cap or None
    rate = spec.rate_per_second
    if rate is not None:
        if isinstance(rate, bool) or not isinstance(rate, int | float):
            raise InvalidRegistry(f"the request rate must be a number per second, not {rate!r}")
        if not math.isfinite(rate) or not 0 <= rate <= 100_000:
            raise InvalidRegistry(
                f"the request rate must be > 0 and at most 100000 per second (0 clears it), "
                f"not {rate!r}"
            )
        registry.rate_per_second = float(rate) or None


#: Seconds per unit of a written rate (``10/s``, ``600/m``, ``2/h``).
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_max_concurrent(text: str) -> int:
    """A written cap on concurrent pushes: a whole number from 1 to 10000, or ``none`` (or 0)
    for no cap (returned as 0, which clears it). The CLI and the console read it alike."""
    value = text.strip().lower()
    if value == "none":
        return 0
    if not re.fullmatch(r"[0-9]{1,5}", value) or int(value) > 10_000:
        raise InvalidRegistry(
            f"max concurrent pushes must be a whole number from 1 to 10000, or none; not {text!r}"
        )
    return int(value)


def parse_rate(text: str) -> float:
    """A written request rate: ``10/s``, ``600/m``, ``2/h`` (a bare number is per second), or
    ``none`` (or 0) for no limit (returned as 0.0, which clears it); in requests per second."""
    value = text.strip().lower()
    if value == "none":
        return 0.0
    match = re.fullmatch(r"([0-9]{1,6}(?:\.[0-9]{1,6})?)(?:/([smh]))?", value)
    if match is None:
        raise InvalidRegistry(f"give a rate like 10/s, 600/m or 2/h, or none; not {text!r}")
    rate = float(match.group(1)) / _RATE_UNITS[match.group(2) or "s"]
    if not (math.isfinite(rate) and rate <= 100_000):
        raise InvalidRegistry(f"the rate must be at most 100000/s, not {text!r}")
    return rate


def _apply_credential(registry: Registry, spec: RegistrySpec) -> None:
    if spec.secret is not None and spec.credential_ref is not None:
        raise InvalidRegistry("give either a secret or a credential reference, not both")
    if spec.secret is not None:
        if not spec.secret:
            raise InvalidRegistry("the secret is empty")
        registry.credential_kind = CredentialKind.SECRET.value
        registry.credential_secret = encrypt_secret(spec.secret)
        registry.credential_ref = None
    elif spec.credential_ref is not None:
        kind, target = parse_reference(spec.credential_ref)
        registry.credential_kind = kind.value
        registry.credential_ref = target
        registry.credential_secret = None


def _check_unique_name(session: Session, name: str, own_id: int | None) -> None:
    if not name:
        raise InvalidRegistry("the registry name is empty")
    clash = session.scalar(select(Registry).where(Registry.name == name))
    if clash is not None and clash.id != own_id:
        raise InvalidRegistry(f"a registry named {name!r} exists already (id {clash.id})")


def _check_ca(pem: str) -> str | None:
    if not pem.strip():
        return None
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise InvalidRegistry("the CA bundle is not a PEM certificate")
    return pem


def validate_chain(session: Session, registry_id: int | None, chain: list[int]) -> list[int]:
    """A fallback chain is checked when it is set, never first discovered broken when used:
    each member exists, is not removed and has a usable address; no repeats, no cycle."""
    if len(set(chain)) != len(chain):
        raise InvalidFallbackChain(f"fallback chain {chain} names a registry twice")
    if registry_id is not None and registry_id in chain:
        raise InvalidFallbackChain(f"fallback chain {chain} names its own registry {registry_id}")
    for member in chain:
        stored = session.get(Registry, member)
        if stored is None or stored.removed_at is not None:
            gone = "does not exist" if stored is None else "was removed"
            raise RegistryNotFound(
                f"registry {member} {gone} (named in fallback chain {chain})",
                hint="name only registries of `pushctl registry list`, in order",
            )
        try:
            checked_address(stored)
        except InvalidRegistry as exc:
            raise InvalidFallbackChain(
                f"fallback chain {chain} names registry {member}, which cannot be used: "
                f"{exc.message}",
                hint=exc.hint,
            ) from None
        if registry_id is not None and _reaches(session, member, registry_id, set()):
            raise InvalidFallbackChain(
                f"fallback chain {chain} makes a cycle: registry {member} falls back "
                f"to {registry_id}"
            )
    return list(chain)


def _reaches(session: Session, start: int, target: int, seen: set[int]) -> bool:
    if start in seen:
        return False
    seen.add(start)
    registry = session.get(Registry, start)
    for member in registry.fallback_chain if registry else []:
        if member == target or _reaches(session, member, target, seen):
            return True
    return False
