"""The target reference guard: what makes a push to an unintended host impossible.

The incident: an unqualified name resolves to Docker Hub (``docker.io``) under Docker's own rules.
Here the pushed reference is always built from the registry record's host, then parsed back with
docker-py's ``resolve_repository_name`` (the rules the daemon applies); if the host it resolves
to is not the registry's host, nothing is tagged or pushed.

Both sides of that comparison are in the canonical spelling of ``worker.core.hostnames``: a registry
host that is not (``Registry-1.Docker.IO.``, ``host:443``, a record stored before the rules) is
refused rather than compared, and so is a Docker host other than Docker Hub's own ``docker.io``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from docker.auth import resolve_repository_name
from docker.errors import InvalidRepository

from worker.core.errors import InvalidReference, InvalidRegistry, ReferenceHostMismatch
from worker.core.hostnames import canonical_host, is_docker_hostname

# Docker's distribution/reference grammar, ASCII only (Python's \w would admit unicode letters).
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_MAX_NAME = 255


@dataclass(frozen=True)
class TargetReference:
    """``host/repository:tag`` whose host is proven to be the registry's."""

    host: str
    repository: str
    tag: str

    @property
    def name(self) -> str:
        """The repository as the daemon names it: ``host/repository``."""
        return f"{self.host}/{self.repository}"

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


def validate_repository(repository: str) -> str:
    """A repository path with no host of its own, in Docker's grammar."""
    if not repository:
        raise InvalidReference("the repository is empty", hint="give a path such as team/app")
    if not repository.isascii():
        raise InvalidReference(
            f"repository {repository!r} contains non-ASCII characters",
            hint="use lower-case letters, digits and . _ - separators",
        )
    first = repository.split("/", 1)[0]
    if "/" in repository and ("." in first or ":" in first or first == "localhost"):
        raise InvalidReference(
            f"repository {repository!r} names a host of its own ({first})",
            hint="give the path only; the host always comes from the registry record",
        )
    if not _REPOSITORY.fullmatch(repository):
        raise InvalidReference(
            f"repository {repository!r} is not a valid Docker repository path",
            hint="use lower-case letters and digits, separated by '.', '_', '__', '-' or '/'",
        )
    return repository


def validate_tag(tag: str) -> str:
    if not _TAG.fullmatch(tag):
        raise InvalidReference(
            f"tag {tag!r} is not a valid Docker tag",
            hint="1 to 128 of A-Z a-z 0-9 _ . -, not starting with . or -",
        )
    return tag


def build_target(registry_host: str, repository: str, tag: str) -> TargetReference:
    """The reference to push, checked against Docker's own resolution rules."""
    check_registry_host(registry_host)
    validate_repository(repository)
    validate_tag(tag)
    target = TargetReference(registry_host, repository, tag)
    if len(target.name) > _MAX_NAME:
        raise InvalidReference(
            f"{target.name!r} is longer than Docker's {_MAX_NAME} characters",
            hint="shorten the repository path",
        )
    assert_resolves_to(target.name, registry_host, repository)
    return target


def assert_resolves_to(name: str, registry_host: str, repository: str) -> None:
    """Refuse ``name`` unless Docker resolves it to exactly (registry_host, repository)."""
    try:
        index, remote = resolve_repository_name(name)
    except InvalidRepository as exc:
        raise InvalidReference(f"{name!r} is not a valid reference: {exc}") from None
    check_registry_host(registry_host)
    expected = _index_name(registry_host)
    if index != expected or canonical_host(index) != expected or remote != repository:
        raise ReferenceHostMismatch(
            f"{name!r} would be pushed to {index!r}, not to the job's registry {expected!r}",
            hint="this push was refused before anything left the host; check the registry URL",
        )


def _index_name(host: str) -> str:
    # Docker spells every Docker Hub host "docker.io"; apply the same rule to the expectation.
    index, _ = resolve_repository_name(f"{host}/x")
    return str(index)


def check_registry_host(registry_host: str) -> str:
    """``registry_host`` if it is a registry host in canonical spelling; Docker's own hosts only
    as Docker Hub's ``docker.io`` (the one host a ``dockerhub`` record stores)."""
    hint = "correct the registry's URL: pushctl registry update ID --url URL"
    try:
        canonical = canonical_host(registry_host)
    except InvalidRegistry as exc:
        raise ReferenceHostMismatch(
            f"registry host {registry_host!r} is refused: {exc.message}", hint=hint
        ) from None
    if canonical != registry_host:
        raise ReferenceHostMismatch(
            f"registry host {registry_host!r} is not in its canonical spelling {canonical!r}",
            hint=hint,
        )
    if is_docker_hostname(canonical.partition(":")[0]) and canonical != "docker.io":
        raise ReferenceHostMismatch(
            f"registry host {registry_host!r} is Docker's; only a dockerhub record (docker.io) "
            "pushes there",
            hint=hint,
        )
    return registry_host
