"""A real OTLP/HTTP trace receiver for the end-to-end tests: an HTTP server process on loopback
that decodes each ``ExportTraceServiceRequest`` (protobuf, gzip or not) with the
``opentelemetry-proto`` package and writes every span it holds as one JSON line.

``python -m tests.support.otlp_receiver --port P --record FILE``

A span's line: ``trace_id``, ``span_id``, ``parent_span_id`` (hex; "" for a root), ``name``,
``kind`` (``SPAN_KIND_...``), ``attributes`` and ``resource`` (plain values), ``events``
(name and attributes), ``links`` (trace and span ids), ``status`` (code name and message).
Anything but ``POST /v1/traces`` gets 404; a body that does not decode gets 400, as a collector
would answer.
"""

from __future__ import annotations

import argparse
import gzip
import json
import socket
import subprocess
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from tests.support.serving import kill, start_listening

TRACES_PATH = "/v1/traces"


def plain(value: AnyValue) -> Any:
    """An OTLP ``AnyValue`` as a JSON value."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [plain(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def attributes(pairs: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for pair in pairs:
        assert isinstance(pair, KeyValue)
        found[pair.key] = plain(pair.value)
    return found


def span_lines(request: ExportTraceServiceRequest) -> list[dict[str, Any]]:
    """Every span of an export request, as the JSON lines the record holds."""
    lines: list[dict[str, Any]] = []
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                lines.append({
                    "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(), "name": span.name,
                    "kind": Span.SpanKind.Name(span.kind),
                    "scope": scope_spans.scope.name,
                    "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                    "attributes": attributes(span.attributes),
                    "events": [{"name": e.name, "attributes": attributes(e.attributes)}
                               for e in span.events],
                    "links": [{"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex()}
                              for link in span.links],
                    "status": {"code": Status.StatusCode.Name(span.status.code),
                               "message": span.status.message},
                    "resource": resource,
                })  # fmt: skip
    return lines


def _decoded(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    return body


def _handler(record: Path, lock: threading.Lock) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            if self.path != TRACES_PATH:
                self._answer(404, b"")
                return
            try:
                request = ExportTraceServiceRequest.FromString(
                    _decoded(body, (self.headers.get("content-encoding") or "").lower())
                )
            except (DecodeError, OSError, zlib.error):
                self._answer(400, b"")
                return
            lines = span_lines(request)
            with lock, record.open("a") as out:
                for line in lines:
                    out.write(json.dumps(line) + "\n")
                out.flush()
            self._answer(200, ExportTraceServiceResponse().SerializeToString())

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return  # the record file is the log

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", type=Path, required=True)
    options = parser.parse_args()
    server = ThreadingHTTPServer(
        ("127.0.0.1", options.port), _handler(options.record, threading.Lock())
    )
    server.daemon_threads = True
    server.serve_forever()


# --- for the tests -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class OtlpReceiver:
    """The receiver as a child process; ``spans()`` reads what it recorded so far."""

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self.record = workdir / f"otlp-{self.port}.jsonl"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``OTEL_EXPORTER_OTLP_ENDPOINT``: the exporters add ``/v1/traces``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        self.process = start_listening(
            "tests.support.otlp_receiver", self.port, "--record", str(self.record),
            what="OTLP receiver",
        )  # fmt: skip
        return self

    def stop(self) -> None:
        kill(self.process)
        self.process = None

    def spans(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line]

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
