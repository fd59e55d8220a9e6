"""Test images and the daemon's own record of pushes.

Images are built from nothing (``FROM scratch`` + ``COPY``), without any pull: random bytes
make every image, and so every layer, distinct, at any size.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import docker


def new_image(api: docker.APIClient, size: int = 64 * 1024) -> str:
    """A freshly built, distinct image; returns its local reference."""
    reference = f"pushworker-test/src-{uuid.uuid4().hex[:12]}:latest"
    build_scratch_image(api, reference, size)
    return reference


def build_scratch_image(client: docker.APIClient, tag: str, size: int) -> str:
    """Build ``tag`` holding one file of ``size`` random bytes; return the image id."""
    payload = os.urandom(size)
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        add_file(tar, "Dockerfile", b"FROM scratch\nCOPY blob /blob\n")
        add_file(tar, "blob", payload)
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


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a regular file holding ``data`` to an archive being written."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


@dataclass
class PushLog:
    """Every push the daemon performed while the block ran (``docker events``)."""

    references: list[str] = field(default_factory=list)


@contextmanager
def daemon_pushes(api: docker.APIClient) -> Iterator[PushLog]:
    """Collect the daemon's ``push`` image events between entering and leaving the block."""
    # The daemon runs on this machine, so its clock is ours; events are filtered to the block
    # by their nanosecond timestamps, since the API's since/until take whole seconds.
    log = PushLog()
    start_ns = time.time_ns()
    yield log
    end_ns = time.time_ns()
    events = api.events(
        since=start_ns // 10**9 - 1,
        until=end_ns // 10**9 + 1,
        filters={"type": "image", "event": "push"},
        decode=True,
    )
    for event in events:
        if start_ns <= int(event["timeNano"]) <= end_ns:
            log.references.append(str(event.get("id") or event["Actor"]["ID"]))
