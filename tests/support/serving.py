"""Test servers that run as their own process (the webhook and OTLP receivers): started with
``python -m``, ready once their port takes a connection, stopped with SIGKILL (a receiver that
dies at any moment is what the tests want to survive anyway)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from harness.stack import ROOT


def start_listening(module: str, port: int, *args: str, what: str) -> subprocess.Popen[bytes]:
    """``python -m module --port PORT *args``, returned once it listens on ``port``."""
    process = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), *args], cwd=ROOT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"the {what} exited at start") from None
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"the {what} did not listen on {port}")


def kill(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.kill()
        process.wait(timeout=10)
