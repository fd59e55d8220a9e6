"""Registry records: create, update, validate. A record that cannot authenticate is refused here,
when it is saved, not later when a push needs it (the incident's empty ``auth_config``)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker import events
from worker.credentials import check_credential_configured, encrypt_secret, parse_reference
from worker.errors import InvalidFallbackChain, InvalidRegistry, RegistryNotFound
from worker.models import CredentialKind, Registry, RegistryKind, utcnow

DOCKER_HUB_HOSTS = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)


@dataclass(frozen=True)
class RegistryAddress:
    url: str  # scheme://host[:port]
    host: str  # host[:port] as it prefixes references


def parse_registry_url(url: str, *, kind: str, insecure: bool) -> RegistryAddress:
    """Normalise a registry URL; refuse what would push somewhere other than meant."""
    text = url.strip()
    if "://" not in text:
        text = f"https://{text}"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise InvalidRegistry(f"registry URL {url!r} must use https:// (or http:// if insecure)")
    if not parts.hostname:
        raise InvalidRegistry(f"registry URL {url!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise InvalidRegistry(
            f"registry URL {url!r} must be scheme://host[:port] only",
            hint="put project paths in the job's repository, credentials in set-credential",
        )
    if parts.scheme == "http" and not insecure:
        raise InvalidRegistry(
            f"registry URL {url!r} is plain HTTP",
            hint="use https://, or pass --insecure explicitly",
        )
    try:
        port = parts.port
    except ValueError:
        raise InvalidRegistry(f"registry URL {url!r} has an invalid port") from None
    hostname = parts.hostname.lower()
    host = f"{hostname}:{port}" if port else hostname
    if hostname in DOCKER_HUB_HOSTS:
        if kind != RegistryKind.DOCKERHUB:
            raise InvalidRegistry(
                f"{hostname} is Docker Hub, and a Docker Hub registry must say so",
                hint="use kind dockerhub if Docker Hub is really meant; it is never a default",
            )
        return RegistryAddress(url="https://registry-1.docker.io", host="docker.io")
    if kind == RegistryKind.DOCKERHUB:
        raise InvalidRegistry(f"kind dockerhub needs a Docker Hub URL, not {url!r}")
    return RegistryAddress(url=f"{parts.scheme}://{host}", host=host)


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
    registry = Registry(id=registry_id, fallback_chain=[], auth_required=True, insecure=False)
    registry.kind = RegistryKind.GENERIC.value
    _apply(session, registry, spec)
    session.add(registry)
    session.flush()
    _audit(session, registry, "registry.created", actor)
    return registry


def update_registry(
    session: Session, registry_id: int, spec: RegistrySpec, *, actor: str | None = None
) -> Registry:
    registry = get_registry(session, registry_id)
    _apply(session, registry, spec)
    session.flush()
    _audit(session, registry, "registry.updated", actor)
    return registry


def remove_registry(session: Session, registry_id: int, *, actor: str | None = None) -> Registry:
    registry = get_registry(session, registry_id)
    registry.removed_at = utcnow()
    _audit(session, registry, "registry.removed", actor)
    return registry


def _audit(session: Session, registry: Registry, type: str, actor: str | None) -> None:
    """Operator changes to a registry are events too: who changed what, never the secret."""
    events.append(
        session,
        stream=events.registry_stream(registry.id),
        type=type,
        actor=actor or events.operator_actor(),
        registry_id=registry.id,
        payload={
            "registry_name": registry.name,
            "registry_host": registry.host,
            "fallback_chain": list(registry.fallback_chain),
            "credential_source": _credential_description(registry),
        },
    )


def _credential_description(registry: Registry) -> str:
    if not registry.auth_required:
        return "anonymous"
    if registry.credential_kind == CredentialKind.SECRET:
        return "secret"
    return f"{registry.credential_kind}:{registry.credential_ref}"


def _apply(session: Session, registry: Registry, spec: RegistrySpec) -> None:
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
    # Refuse a record that cannot authenticate now, not when a push needs it (the incident).
    check_credential_configured(registry)


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
    """A fallback chain is checked when it is set, never first discovered broken when used."""
    if len(set(chain)) != len(chain):
        raise InvalidFallbackChain(f"fallback chain {chain} names a registry twice")
    if registry_id is not None and registry_id in chain:
        raise InvalidFallbackChain(f"fallback chain {chain} names its own registry {registry_id}")
    for member in chain:
        get_registry(session, member)
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
