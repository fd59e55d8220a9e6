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
