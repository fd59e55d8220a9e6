"""Images written byte by byte, without a network or a daemon: an OCI image layout holding a
two-platform image index, and a ``docker save``-style archive.

Nothing can be pulled on the project's machines, and ``docker build`` makes single-platform
images only; a multi-arch index has to be written by hand. Every blob is content-addressed, so a
test knows the digests the registry must serve before anything is copied.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
PLATFORMS = (("linux", "amd64"), ("linux", "arm64"))


@dataclass(frozen=True)
class OciImage:
    """A layout on disk and the digests in it."""

    path: Path
    #: The image index's digest: what a copy with digests preserved serves under the tag.
    index_digest: str
    #: ``os/architecture`` -> that platform's manifest digest.
    manifests: dict[str, str]


@dataclass(frozen=True)
class ArchiveImage:
    path: Path
    #: The image's config digest (its image id): the same wherever the image is copied.
    config_digest: str


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def _layer_tar(name: str, payload: bytes) -> bytes:
    """An uncompressed layer holding one file, with fixed metadata (same bytes every time)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(payload), 0, 0o644
        tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _config(os_name: str, arch: str, diff_id: str) -> bytes:
    return _canonical(
        {
            "architecture": arch,
            "os": os_name,
            "config": {"Cmd": ["/payload"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    )


def random_payload(size: int, seed: bytes | None = None) -> bytes:
    """``size`` bytes: random (``os.urandom``), or derived from ``seed`` to be reproducible."""
    if seed is None:
        return os.urandom(size)
    out = bytearray()
    block = hashlib.sha256(seed).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:size])


def write_oci_layout(
    path: Path,
    *,
    layer_bytes: int = 4096,
    seed: bytes | None = None,
    platforms: tuple[tuple[str, str], ...] = PLATFORMS,
) -> OciImage:
    """Write an OCI image layout at ``path``: one image index of a manifest per platform (by
    default two: linux/amd64, linux/arm64), each with its own config and one gzip layer of
    ``layer_bytes`` random bytes. Fresh random content unless ``seed`` is given."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> dict[str, Any]:
        digest = _digest(data)
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return {"digest": digest, "size": len(data)}

    entries: list[dict[str, Any]] = []
    manifests: dict[str, str] = {}
    for os_name, arch in platforms:
        platform_seed = None if seed is None else seed + f"/{os_name}/{arch}".encode()
        layer = _layer_tar("payload", random_payload(layer_bytes, platform_seed))
        # Level 1: random bytes do not compress anyway, and 50 MiB at level 9 takes seconds.
        compressed = gzip.compress(layer, compresslevel=1, mtime=0)
        layer_ref = {"mediaType": LAYER, **put(compressed)}
        config_ref = {"mediaType": CONFIG, **put(_config(os_name, arch, _digest(layer)))}
        manifest = put(
            _canonical(
                {
                    "schemaVersion": 2,
                    "mediaType": MANIFEST,
                    "config": config_ref,
                    "layers": [layer_ref],
                }
            )
        )
        manifests[f"{os_name}/{arch}"] = manifest["digest"]
        entries.append(
            {"mediaType": MANIFEST, **manifest, "platform": {"os": os_name, "architecture": arch}}
        )
    index = put(_canonical({"schemaVersion": 2, "mediaType": INDEX, "manifests": entries}))
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (path / "index.json").write_bytes(
        _canonical({"schemaVersion": 2, "manifests": [{"mediaType": INDEX, **index}]})
    )
    return OciImage(path=path, index_digest=index["digest"], manifests=manifests)


def write_docker_archive(
    path: Path,
    *,
    layer_bytes: int = 4096,
    repo_tag: str = "source/app:1",
    seed: bytes | None = None,
) -> ArchiveImage:
    """Write a ``docker save`` tarball (manifest.json, the config, one uncompressed layer) of
    a linux/amd64 image at ``path``."""
    layer = _layer_tar("payload", random_payload(layer_bytes, seed))
    config = _config("linux", "amd64", _digest(layer))
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    layer_name = hashlib.sha256(layer).hexdigest() + "/layer.tar"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [repo_tag], "Layers": [layer_name]}])
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (
            (config_name, config),
            (layer_name, layer),
            ("manifest.json", manifest.encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return ArchiveImage(path=path, config_digest=_digest(config))
