"""Where a push may go: a registry record's address, checked with today's rules at every use.

A record saved before a rule existed (a Docker Hub host spelled with a trailing dot, a dotless
host) is refused when a job is created, when a step is claimed, when a fallback is applied and
when the registry is probed, not trusted because it was once accepted. The spelling rules
themselves are ``worker.core.hostnames``; the operator-facing edits are ``worker.registries``.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from worker.core.errors import InvalidRegistry, PushWorkerError, RegistryNotFound
from worker.core.hostnames import DOCKER_HUB_HOSTS, parse_address
from worker.seams.registry_http import RegistryEndpoint
from worker.store.models import Registry, RegistryKind


@dataclass(frozen=True)
class RegistryAddress:
    url: str  # scheme://host[:port]
    host: str  # host[:port] as it prefixes references


def parse_registry_url(url: str, *, kind: str, insecure: bool) -> RegistryAddress:
    """Normalise a registry URL (``worker.core.hostnames``); refuse what would push somewhere other
    than meant: Docker Hub under another kind, plain HTTP unless insecure is explicit."""
    address = parse_address(url)
    shown = address.url
    if address.scheme == "http" and not insecure:
        raise InvalidRegistry(
            f"registry URL {shown!r} is plain HTTP",
            hint="use https://, or pass --insecure explicitly",
        )
    if address.is_docker_hub:
        if kind != RegistryKind.DOCKERHUB:
            raise InvalidRegistry(
                f"{address.hostname} is Docker Hub (or another host of Docker's), and a Docker "
                "Hub registry must say so",
                hint="use kind dockerhub if Docker Hub is really meant; it is never a default",
            )
        if (
            address.hostname not in DOCKER_HUB_HOSTS
            or address.port is not None
            or address.scheme != "https"
        ):
            raise InvalidRegistry(
                f"{shown!r} is not Docker Hub's registry address",
                hint="give https://registry-1.docker.io for kind dockerhub",
            )
        return RegistryAddress(url="https://registry-1.docker.io", host="docker.io")
    if kind == RegistryKind.DOCKERHUB:
        raise InvalidRegistry(f"kind dockerhub needs a Docker Hub URL, not {shown!r}")
    return RegistryAddress(url=address.url, host=address.host)


def checked_address(registry: Registry) -> RegistryAddress:
    """The stored address of ``registry``, checked again with today's rules before anything is
    sent to it: a record saved before a rule existed (a Docker Hub host spelled with a trailing
    dot, a dotless host) is refused at use, not trusted because it was once accepted."""
    fix = f"correct it: pushctl registry update {registry.id} --url URL; nothing was sent to it"
    try:
        if registry.kind not in {k.value for k in RegistryKind}:
            raise InvalidRegistry(f"unknown registry kind {registry.kind!r}")
        address = parse_registry_url(
            registry.url, kind=registry.kind, insecure=bool(registry.insecure)
        )
    except InvalidRegistry as exc:
        raise InvalidRegistry(
            f"registry {registry.id}'s stored address is refused: {exc.message}", hint=fix
        ) from None
    if (address.url, address.host) != (registry.url, registry.host):
        raise InvalidRegistry(
            f"registry {registry.id}'s stored address ({registry.url!r}, host "
            f"{registry.host!r}) is not the canonical {address.url!r} (host {address.host!r})",
            hint=fix,
        )
    return address


def target_refusal(registry: Registry | None, registry_id: int) -> PushWorkerError | None:
    """Why a step claimed for ``registry_id`` must not act, as the error that fails its job;
    None when it may act. Checked at every claim: a registry removed while the job waited, or a
    record that today's rules refuse, receives nothing."""
    if registry is None or registry.removed_at is not None:
        return RegistryNotFound(
            f"registry {registry_id} was removed after the job was queued; nothing was sent to it",
            hint="enqueue the push again, naming a registry of `pushctl registry list`",
        )
    try:
        checked_address(registry)
    except InvalidRegistry as exc:
        return exc
    return None


def unusable_reason(session: Session, registry_id: int) -> str | None:
    """Why a job must not be sent to ``registry_id`` now, or None when it may."""
    registry = session.get(Registry, registry_id)
    if registry is None:
        return f"registry {registry_id} does not exist"
    if registry.removed_at is not None:
        return f"registry {registry_id} was removed"
    try:
        checked_address(registry)
    except InvalidRegistry as exc:
        return exc.message
    return None


def endpoint_of(registry: Registry) -> RegistryEndpoint:
    """The plain values the registry HTTP seam takes, from a registry record."""
    return RegistryEndpoint(
        id=registry.id,
        url=registry.url,
        host=registry.host,
        ca_cert=registry.ca_cert,
        insecure=bool(registry.insecure),
    )
