"""A real webhook receiver for the end-to-end tests: an HTTP server process on loopback that
verifies every delivery with the ``standardwebhooks`` package's own verifier and records what it
got, one JSON line per request (when it arrived, then how it was answered).

``python -m tests.support.webhook_receiver --port P --secret-file F --record FILE --mode MODE``

Modes: ``ok`` (200), ``fail-first`` (500 to the first request of each ``webhook-id``, then 200),
``hang`` (never answers), ``hang-first`` (the first request of each ``webhook-id`` never
answers, later ones get 200). A delivery that does not verify gets 400.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError

from tests.support.serving import kill, start_listening

MODES = ("ok", "fail-first", "hang", "hang-first")


class _State:
    def __init__(self, secret: str, record: Path, mode: str) -> None:
        self.webhook = Webhook(secret)
        self.record = record
        self.mode = mode
        self.seen: set[str] = set()
        self.lock = threading.Lock()

    def write(self, line: dict[str, Any]) -> None:
        with self.lock, self.record.open("a") as out:
            out.write(json.dumps(line) + "\n")
            out.flush()

    def first_time(self, message_id: str) -> bool:
        with self.lock:
            first = message_id not in self.seen
            self.seen.add(message_id)
            return first


def _handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length).decode()
            headers = {key.lower(): value for key, value in self.headers.items()}
            message_id = headers.get("webhook-id", "")
            arrived = time.time()
            state.write({"stage": "arrived", "webhook_id": message_id, "time": arrived})
            try:
                payload = state.webhook.verify(body, headers)
                verified = True
            except WebhookVerificationError:
                payload, verified = None, False
            first = state.first_time(message_id)
            if not verified:
                status = 400
            elif state.mode == "hang" or (state.mode == "hang-first" and first):
                time.sleep(3600)
                return
            elif state.mode == "fail-first" and first:
                status = 500
            else:
                status = 200
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()
            state.write({
                "stage": "answered", "webhook_id": message_id, "status": status,
                "verified": verified, "payload": payload, "time": arrived,
                "headers": {k: v for k, v in headers.items() if k.startswith("webhook-")},
            })  # fmt: skip

        def log_message(self, format: str, *args: Any) -> None:
            return  # the record file is the log

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret-file", type=Path, required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--mode", choices=MODES, default="ok")
    options = parser.parse_args()
    state = _State(options.secret_file.read_text().strip(), options.record, options.mode)
    server = ThreadingHTTPServer(("127.0.0.1", options.port), _handler(state))
    server.daemon_threads = True
    server.serve_forever()


# --- for the tests -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Receiver:
    """The receiver as a child process: started, stopped, started again on the same port."""

    def __init__(self, workdir: Path, secret: str, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self.secret_file = workdir / f"receiver-{self.port}.secret"
        self.secret_file.write_text(secret)
        self.record = workdir / f"receiver-{self.port}.jsonl"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/push"

    def start(self, mode: str = "ok") -> Receiver:
        self.process = start_listening(
            "tests.support.webhook_receiver", self.port, "--secret-file", str(self.secret_file),
            "--record", str(self.record), "--mode", mode, what="webhook receiver",
        )  # fmt: skip
        return self

    def stop(self) -> None:
        kill(self.process)
        self.process = None

    def lines(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line]

    def answered(self) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line["stage"] == "answered"]

    def arrived(self) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line["stage"] == "arrived"]


if __name__ == "__main__":
    main()
