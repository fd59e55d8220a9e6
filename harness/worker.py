"""Celery worker and beat processes as children, for the tests, the benchmarks and the demo.

One launcher for every use: the session's worker, a worker bound to a named Docker host (its own
queue, its own engine), a worker in a process group of its own (killed whole), a benchmark's
worker running another app module, and Celery beat.
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

from celery import Celery

from harness.stack import ROOT


class WorkerNotReady(RuntimeError):
    """The worker exited at start, or did not answer a ping in time; the message ends with its
    log."""


class CeleryProcess:
    """``celery -A <app> worker`` (or ``beat``) as a child process, with its own environment and
    log.

    A worker is waited for by its own node name, so that a reply from another worker on the same
    broker does not pass for this one's. Beat only publishes: nothing to wait for.
    """

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        *,
        app: str = "tasks.app",
        pool: str | None = None,
        concurrency: int = 2,
        queues: str | None = None,
        host: str | None = None,
        name: str | None = None,
        own_group: bool = False,
        beat: bool = False,
    ) -> None:
        """``pool`` None is Celery's default (prefork). ``host`` runs the worker for that Docker
        host (``PUSHWORKER_WORKER_HOST``; ``env`` holds its ``DOCKER_HOST``), on its queue unless
        ``queues`` says otherwise. ``own_group``: in a process group of its own, so that a test
        can kill the worker whole (main and pool). ``beat``: Celery beat instead of a worker,
        its schedule file beside the log."""
        self.env = {**os.environ, **env, **({"PUSHWORKER_WORKER_HOST": host} if host else {})}
        self.log_path = log_path
        self.own_group = own_group
        self.name = name or f"{host or 'w'}-{uuid.uuid4().hex[:8]}@%h"
        self.beat = beat
        if beat:
            schedule = str(log_path.parent / "celerybeat-schedule")
            argv = ["beat", "-s", schedule, "--max-interval", "1", "-l", "INFO"]
        else:
            argv = [
                "worker", *(["-P", pool] if pool else []), "-c", str(concurrency),
                "-Q", queues or (f"pushworker.{host}" if host else "pushworker"), "-n", self.name,
                "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO",
            ]  # fmt: skip
        self.command = [sys.executable, "-m", "celery", "-A", app, *argv]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def node(self) -> str:
        """The node name the worker answers pings with (``%h`` expanded)."""
        return self.name.replace("%h", socket.gethostname())

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def pids(self) -> list[int]:
        """The main process and its pool processes (and theirs)."""
        return [self.pid, *process_children(self.pid)]

    def spawn(self) -> CeleryProcess:
        """Start the process without waiting for it (start several, then ``wait_ready`` each)."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=self.own_group,
            )  # fmt: skip
        return self

    def wait_ready(self, timeout: float = 90) -> CeleryProcess:
        """Until the worker's own node answers a ping; stops it and raises if it does not."""
        probe = Celery(broker=self.env["PUSHWORKER_BROKER_URL"])
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.exited():
                    raise WorkerNotReady(
                        f"worker {self.node} exited at start:\n{self.log_text()[-3000:]}"
                    )
                if probe.control.ping(destination=[self.node], timeout=1.0):
                    return self
        finally:
            probe.close()
        self.stop()
        raise WorkerNotReady(
            f"worker {self.node} did not answer within {timeout} s:\n{self.log_text()[-3000:]}"
        )

    def start(self, timeout: float = 90) -> CeleryProcess:
        """Spawn, and for a worker wait until it answers."""
        self.spawn()
        return self if self.beat else self.wait_ready(timeout)

    def wait_exit(self, timeout: float) -> int:
        assert self.process is not None, "not started"
        return self.process.wait(timeout=timeout)

    def exited(self) -> bool:
        return self.process is None or self.process.poll() is not None

    def stop(self) -> None:
        """Terminate the main process (Celery stops its pool), and kill it if it does not exit
        within 30 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

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

    def __enter__(self) -> CeleryProcess:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def process_children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (children first), from ``/proc``; empty once it is gone."""
    try:
        direct = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return direct + [grand for child in direct for grand in process_children(child)]
