"""Start and stop real Celery worker processes for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from celery import Celery

from tests.support.stack import ROOT


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """Terminate a child process, and kill it if it does not exit within 30 s."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


class WorkerProcess:
    """``celery -A tasks.app worker`` as a child process, with its own environment and log."""

    def __init__(self, env: dict[str, str], log_path: Path, *, concurrency: int = 2,
                 queues: str = "pushworker", name: str | None = None) -> None:  # fmt: skip
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.name = name or f"w{os.getpid()}-{time.monotonic_ns()}@%h"
        self.command = [
            sys.executable, "-m", "celery", "-A", "tasks.app", "worker", "-c", str(concurrency),
            "-Q", queues, "-n", self.name, "--without-gossip", "--without-mingle", "-l", "INFO",
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def node(self) -> str:
        """The node name Celery answers pings with (``%h`` expanded)."""
        return self.name.replace("%h", socket.gethostname())

    def start(self, timeout: float = 90) -> WorkerProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        probe = Celery(broker=self.env["PUSHWORKER_BROKER_URL"])
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    pytest.fail(f"the worker exited at start:\n{self.log_text()[-3000:]}")
                if probe.control.ping(destination=[self.node], timeout=1.0):
                    return self
        finally:
            probe.close()
        self.stop()
        pytest.fail(f"the worker did not answer within {timeout} s:\n{self.log_text()[-3000:]}")

    def stop(self) -> None:
        stop_process(self.process)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def publish_via(broker_url: str, job_id: str, registry_id: int, queue: str = "pushworker") -> None:
    """Publish a job's chain on another broker than this process's configured one."""
    from celery import chain

    from worker.engine.steps import STEPS

    app = Celery(broker=broker_url)
    app.conf.task_serializer = "json"
    try:
        chain(
            *(
                app.signature(f"pushworker.step.{step}", args=(job_id, registry_id), immutable=True)
                for step in STEPS
            )
        ).apply_async(queue=queue)
    finally:
        app.close()
