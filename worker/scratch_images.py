"""Distinct images built from nothing (``FROM scratch`` + ``COPY``), without any pull.

Used by the demo, the end-to-end tests and the benchmarks: random bytes make every image, and so
every layer, distinct, at any size.
"""

from __future__ import annotations

import io
import os
import tarfile

import docker


def build_scratch_image(
    client: docker.APIClient, tag: str, size: int, *, seed: bytes | None = None
) -> str:
    """Build ``tag`` holding one ``size``-byte file; return the image id."""
    payload = _blob(size, seed)
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        _add(tar, "Dockerfile", b"FROM scratch\nCOPY blob /blob\n")
        _add(tar, "blob", payload)
    context.seek(0)
    image_id = None
    for chunk in client.build(fileobj=context, custom_context=True, tag=tag, rm=True, decode=True):
        if "error" in chunk:
            raise RuntimeError(f"building {tag} failed: {chunk['error']}")
        aux = chunk.get("aux")
        if isinstance(aux, dict) and "ID" in aux:
            image_id = str(aux["ID"])
    if image_id is None:
        image_id = str(client.inspect_image(tag)["Id"])
    return image_id


def _blob(size: int, seed: bytes | None) -> bytes:
    if seed is None:
        return os.urandom(size)
    out = bytearray()
    block = seed
    while len(out) < size:
        block = _next_block(block)
        out += block
    return bytes(out[:size])


def _next_block(previous: bytes) -> bytes:
    import hashlib

    return hashlib.shake_256(previous).digest(65536)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
