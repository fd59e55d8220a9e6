"""Where a job's image comes from: its source, as a spec that producers, ``pushctl push --from``
and the HTTP API all write the same way.

``docker:IMAGE``
    an image on the worker's Docker Engine: today's push (``source_image=IMAGE`` still says
    the same). The kind is never guessed: ``registry:5000/app:1`` is a registry record's
    image, and the image of a Docker host called ``registry`` is ``docker:registry:5000/app:1``.
``registry:ID/REPOSITORY:TAG`` or ``registry:ID/REPOSITORY@sha256:HEX``
    an image in another registry record: a promotion. The reference guard applies to it as to
    a destination (``worker.core.reference``): the host always comes from record ``ID``.
``oci-layout:PATH``
    an OCI image layout directory on the worker's filesystem.
``docker-archive:PATH``
    a ``docker save`` tarball on the worker's filesystem.

A PATH is confined to ``PUSHWORKER_SOURCES_DIR`` the way a credential file is confined to its
directory (``worker.core.credential_refs``): a relative PATH is taken inside it, ``..`` and
symlinks are resolved and must stay inside. It is checked when a job is created (``check_path``:
a clear error for the producer) and again by the worker right before it reads (``resolve_path``:
the authoritative check, since the producer may run on another host with other settings).

Error texts name the spec's parts and settings, never anything read from a file.
"""

from __future__ import annotations

import enum
import os
import re
import stat
from dataclasses import dataclass

from worker.core.errors import InvalidReference, SourceImageNotFound, ValidationError
from worker.core.paths import strictly_inside
from worker.core.reference import validate_repository, validate_tag
from worker.core.settings import Settings
from worker.core.text import CONTROL

SOURCES_DIR_SETTING = "PUSHWORKER_SOURCES_DIR"
#: The longest spec: it is stored whole in the job's ``source_image`` column.
MAX_SPEC = 300
#: The largest registry id (an ``Integer`` column on every backend).
MAX_ID = 2**31 - 1

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_ID = re.compile(r"[1-9][0-9]{0,9}")
#: Unicode's own line and paragraph separators, bidirectional overrides and zero-width marks:
#: not control characters to ``worker.core.text``, but they make a path print as another one.
_INVISIBLE = re.compile(r"[\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


class SourceKind(enum.StrEnum):
    DOCKER = "docker"
    REGISTRY = "registry"
    OCI_LAYOUT = "oci-layout"
    DOCKER_ARCHIVE = "docker-archive"

    @property
    def engine(self) -> str:
        """Which engine copies this kind: ``docker`` (the daemon) or ``skopeo``. Also the name
        of the kind's queue suffix (``worker.core.queues``)."""
        return "docker" if self is SourceKind.DOCKER else "skopeo"

    @property
    def is_file(self) -> bool:
        return self in (SourceKind.OCI_LAYOUT, SourceKind.DOCKER_ARCHIVE)


#: The engine kinds, in a stable order.
ENGINE_KINDS = ("docker", "skopeo")


@dataclass(frozen=True)
class Source:
    """A parsed source spec; ``str()`` is its canonical spelling (what a job stores)."""

    kind: SourceKind
    #: ``docker``: the image on the engine.
    image: str | None = None
    #: ``registry``: the registry record, the repository in it and a tag or a digest.
    registry_id: int | None = None
    repository: str | None = None
    tag: str | None = None
    digest: str | None = None
    #: ``oci-layout``/``docker-archive``: the path as given (confined at every use).
    path: str | None = None

    def __str__(self) -> str:
        if self.kind is SourceKind.DOCKER:
            return f"docker:{self.image}"
        if self.kind is SourceKind.REGISTRY:
            ref = f"@{self.digest}" if self.digest else f":{self.tag}"
            return f"registry:{self.registry_id}/{self.repository}{ref}"
        return f"{self.kind.value}:{self.path}"

    @property
    def stored(self) -> str:
        """What the job's ``source_image`` column holds: a Docker image as before (so jobs and
        their readers are unchanged), any other kind as its canonical spec."""
        return self.image if self.kind is SourceKind.DOCKER and self.image else str(self)


def _refuse_hidden(spec: str) -> None:
    found = CONTROL.search(spec) or _INVISIBLE.search(spec)
    if found is not None:
        raise ValidationError(
            f"source contains a control or invisible character (U+{ord(found.group()):04X} at "
            f"position {found.start()})",
            hint="give the source as plain printable text",
        )


def parse_source(spec: object) -> Source:
    """The source ``spec`` names, checked for everything that does not need the filesystem;
    ``ValidationError`` (``InvalidReference`` for a registry reference) otherwise."""
    if not isinstance(spec, str):
        raise ValidationError(f"source must be a string, not {type(spec).__name__}")
    if not 1 <= len(spec) <= MAX_SPEC:
        raise ValidationError(f"source must be 1 to {MAX_SPEC} characters")
    _refuse_hidden(spec)
    try:
        spec.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError("source is not valid Unicode (a lone surrogate)") from None
    prefix, colon, rest = spec.partition(":")
    kinds = {kind.value: kind for kind in SourceKind}
    if not colon or prefix not in kinds:
        raise ValidationError(
            f"source {spec!r} does not start with a kind",
            hint="start it with docker:, registry:, oci-layout: or docker-archive:",
        )
    kind = kinds[prefix]
    if kind is SourceKind.DOCKER:
        return _docker(rest)
    if kind is SourceKind.REGISTRY:
        return _registry(rest)
    return Source(kind, path=_path(kind, rest))


def docker_source(image: str) -> Source:
    """The source of a job that names a ``source_image``: an image on the Docker Engine."""
    return _docker(image)


def _docker(image: str) -> Source:
    if not image or not image.isascii() or any(c.isspace() for c in image):
        raise ValidationError(f"source image {image!r} is not an image reference")
    return Source(SourceKind.DOCKER, image=image)


def _registry(rest: str) -> Source:
    usage = "write registry:ID/REPOSITORY:TAG or registry:ID/REPOSITORY@sha256:HEX"
    registry, slash, reference = rest.partition("/")
    if not slash or not _ID.fullmatch(registry) or int(registry) > MAX_ID:
        raise InvalidReference(
            f"source registry:{rest!r} does not start with a registry id", hint=usage
        )
    if "@" in reference:
        repository, _, digest = reference.partition("@")
        if not _DIGEST.fullmatch(digest):
            raise InvalidReference(
                f"source digest {digest!r} is not sha256: and 64 lower-case hex digits", hint=usage
            )
        validate_repository(repository)
        return Source(SourceKind.REGISTRY, registry_id=int(registry), repository=repository,
                      digest=digest)  # fmt: skip
    repository, colon, tag = reference.rpartition(":")
    if not colon or "/" in tag:
        raise InvalidReference(
            f"source registry:{rest!r} names neither a tag nor a digest",
            hint=f"{usage}; a promotion never implies :latest",
        )
    validate_repository(repository)
    validate_tag(tag)
    return Source(SourceKind.REGISTRY, registry_id=int(registry), repository=repository, tag=tag)


def _path(kind: SourceKind, path: str) -> str:
    if not path:
        raise ValidationError(f"source {kind.value}: names no path", hint=f"{kind.value}:PATH")
    if ":" in path:
        # skopeo reads the first ':' after the path as the start of an image name in it.
        raise ValidationError(
            f"source path {path!r} contains ':'", hint="rename the file or directory"
        )
    return path


# --- the filesystem: confined to PUSHWORKER_SOURCES_DIR ------------------------------------------


def _sources_dir(settings: Settings) -> str:
    directory = settings.sources_dir
    if directory is None:
        raise ValidationError(
            f"file sources are turned off: {SOURCES_DIR_SETTING} is not set",
            hint=f"set {SOURCES_DIR_SETTING} to the directory the worker may read images from",
        )
    if "\0" in directory or not os.path.isabs(directory):
        raise ValidationError(
            f"{SOURCES_DIR_SETTING} is {directory!r}, not an absolute directory, so no file "
            "source can be read",
            hint=f"set {SOURCES_DIR_SETTING} to an absolute path",
        )
    return os.path.normpath(directory)


def _outside(source: Source, settings: Settings) -> ValidationError:
    return ValidationError(
        f"source path {source.path!r} is outside the sources directory {settings.sources_dir}",
        hint=f"put the image in that directory, or set {SOURCES_DIR_SETTING} for the deployment",
    )


def confined_path(source: Source, settings: Settings) -> str:
    """The source's path, lexically inside the directory (a relative path is taken in it)."""
    if not source.kind.is_file or source.path is None:
        raise ValidationError(f"source {source} is not a file source")
    directory = _sources_dir(settings)
    candidate = os.path.normpath(os.path.join(directory, source.path))  # absolute replaces it
    if not strictly_inside(candidate, directory):
        raise _outside(source, settings)
    return candidate


def check_path(source: Source, settings: Settings) -> None:
    """Refuse a file source outside the directory when a job is created. The path may exist only
    on the worker's host; where it exists here too, its symlinks must stay inside."""
    candidate = confined_path(source, settings)
    if os.path.lexists(candidate):
        resolved = os.path.realpath(candidate)
        if not strictly_inside(resolved, os.path.realpath(_sources_dir(settings))):
            raise _outside(source, settings)


def resolve_path(source: Source, settings: Settings) -> str:
    """The real path the worker reads, after symlinks, inside the directory and of the right
    type (a directory with an ``oci-layout`` file; a regular file): ``ValidationError`` when it
    is outside or of another type, ``SourceImageNotFound`` when it is not there."""
    candidate = confined_path(source, settings)
    resolved = os.path.realpath(candidate)
    if not strictly_inside(resolved, os.path.realpath(_sources_dir(settings))):
        raise _outside(source, settings)
    if ":" in resolved:
        # Checked in the spec already; a link inside the directory (or the directory itself)
        # could still bring one in, and skopeo would cut the path there.
        raise ValidationError(
            f"source {source} resolves to a path with ':', which skopeo cannot be given",
            hint=f"rename the file, link or {SOURCES_DIR_SETTING} so that no ':' remains",
        )
    try:
        mode = os.stat(resolved).st_mode
    except OSError as exc:
        raise SourceImageNotFound(
            f"source {source} cannot be read ({exc.strerror or type(exc).__name__})",
            hint=f"put the image at that path on the worker's host ({SOURCES_DIR_SETTING})",
        ) from None
    if source.kind is SourceKind.OCI_LAYOUT:
        if not stat.S_ISDIR(mode) or not os.path.isfile(os.path.join(resolved, "oci-layout")):
            raise ValidationError(
                f"source {source} is not an OCI image layout (a directory with an oci-layout "
                "file and index.json)"
            )
    elif not stat.S_ISREG(mode):
        raise ValidationError(f"source {source} is not a regular file (a docker save tarball)")
    return resolved
