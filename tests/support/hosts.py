"""Extra Celery processes for the several-hosts, metrics and health tests: a worker bound to a
named Docker host (its own queue, its own engine), and Celery beat.

Unlike the session's worker, each of these is waited for by its own node name, so that a reply
from another worker on the same broker does not pass for this one's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.stack import ROOT
from tests.support.worker import stop_process


class CeleryProcess:
    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        node: str = "",
        *,
        own_group: bool = False,
    ) -> None:
        self.argv, self.env, self.log_path, self.node = argv, env, log_path, node
        #: In a process group of its own, so a test can kill the worker whole (main + pool).
        self.own_group = own_group
        self.process: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "tasks.app", *self.argv],
                cwd=ROOT, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=self.own_group,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def wait_exit(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def exited(self) -> bool:
        return self.process is None or self.process.poll() is not None

    def stop(self) -> None:
        stop_process(self.process)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_lines(self) -> Iterator[dict[str, Any]]:
        """The JSON lines of the log (Celery's banner and other text are left out)."""
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    yield json.loads(line)
                except ValueError:
                    continue


def start_host_worker(
    env: dict[str, str],
    log_path: Path,
    *,
    host: str,
    queues: str | None = None,
    pool: str = "solo",
    concurrency: int = 1,
    wait: bool = True,
    own_group: bool = False,
) -> CeleryProcess:
    """A worker with ``PUSHWORKER_WORKER_HOST=host``; ``env`` holds its ``DOCKER_HOST``.

    With ``wait=False`` it is only spawned: call ``wait_ready`` (start several at once).
    """
    node = f"{host}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    argv = [
        "worker", "-P", pool, "-c", str(concurrency), "-n", node,
        "-Q", queues or f"pushworker.{host}",
        "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO",
    ]  # fmt: skip
    worker = CeleryProcess(
        argv, {**env, "PUSHWORKER_WORKER_HOST": host}, log_path, node=node, own_group=own_group
    )
    worker.spawn()
    if wait:
        wait_ready(worker)
    return worker


def wait_ready(worker: CeleryProcess, timeout: float = 90) -> None:
    """Until the worker's own node answers a ping (another worker's reply does not count)."""
    from celery import Celery

    node = worker.node
    probe = Celery(broker=worker.env["PUSHWORKER_BROKER_URL"])
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if worker.exited():
                pytest.fail(f"worker {node} exited at start:\n{worker.log_text()[-3000:]}")
            if probe.control.ping(destination=[node], timeout=1.0):
                return
    finally:
        probe.close()
    worker.stop()
    pytest.fail(f"worker {node} did not answer within {timeout} s:\n{worker.log_text()[-3000:]}")


def start_beat(env: dict[str, str], workdir: Path) -> CeleryProcess:
    """Celery beat with its schedule file in ``workdir``; it only publishes, so no wait."""
    argv = ["beat", "-s", str(workdir / "celerybeat-schedule"), "--max-interval", "1", "-l", "INFO"]
    beat = CeleryProcess(argv, env, workdir / "beat.log")
    beat.spawn()
    return beat


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
