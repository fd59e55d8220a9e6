"""Test images and the daemon's own record of pushes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
import docker

from worker.scratch_images import build_scratch_image


def new_image(api: docker.APIClient, size: int = 64 * 1024) -> str:
    """A freshly built, distinct image; returns its local reference."""
    reference = f"pushworker-test/src-{uuid.uuid4().hex[:12]}:latest"
    build_scratch_image(api, reference, size)
    return reference


@dataclass
class PushLog:
    """Every push the daemon performed while the block ran (``docker events``)."""

    references: list[str] = field(default_factory=list)


@contextmanager
def daemon_pushes(api: docker.APIClient) -> Iterator[PushLog]:
    """Collect the daemon's ``push`` image events between entering and leaving the block."""
    log = PushLog()
    since = _daemon_time(api)
    yield log
    until = _daemon_time(api) + 1
    events = api.events(
        since=since, until=until, filters={"type": "image", "event": "push"}, decode=True
    )
    for event in events:
        log.references.append(str(event.get("id") or event.get("Actor", {}).get("ID", "")))


def _daemon_time(api: docker.APIClient) -> int:
    # The daemon runs on this machine: its clock is ours. One second of slack each way.
    del api
    return int(time.time()) - 1
