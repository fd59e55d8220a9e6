"""An HTTP/1.1 reverse proxy on 127.0.0.1 that makes a real registry misbehave on cue.

It sits in front of a plain-HTTP registry and forwards every request unchanged, the ``Host``
header included (the Distribution registry builds upload ``Location`` headers from it, so a
push keeps going through the proxy). A test adds ``Fault`` rules: for requests matching
(method, path regex), answer a status (with an optional ``Retry-After`` and a Distribution JSON
error body), answer slowly, or reset the connection (SO_LINGER 0), for the next N matching
requests or during a time window. The proxy records every request it saw and what it did.

Two details make dockerd usable through it: dockerd tries HTTPS first on an insecure
``127.0.0.1:PORT`` registry, so a connection whose first byte is a TLS handshake (0x16) is closed
at once (waiting for an HTTP request line would stall the engine for 10 s); and layers arrive
as chunked PATCH/PUT bodies on keep-alive connections, which are decoded and forwarded with a
``Content-Length``. Standard library only; one thread per connection.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

#: Headers that describe one hop's connection, not the message: never forwarded as they are.
_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
     "proxy-connection", "content-length"}
)  # fmt: skip
_REASONS = {429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}  # fmt: skip
_DEFAULT_CODES = {429: "TOOMANYREQUESTS", 503: "UNAVAILABLE"}


@dataclass
class Fault:
    """What to do with matching requests instead of (or before) forwarding them."""

    method: str = ".*"  # regex on the method
    path: str = ".*"  # regex on the path (query included), searched
    status: int | None = None  # answer this status instead of forwarding
    retry_after: str | None = None  # Retry-After header of that answer
    error_code: str | None = None  # Distribution error code of its JSON body
    delay: float = 0.0  # wait this long, then go on (forward or answer)
    reset: bool = False  # close the connection with a TCP reset instead of answering
    skip: int = 0  # let the first N matching requests through untouched
    times: int | None = None  # then act on the next N matching requests (None: no count limit)
    seconds: float | None = None  # then act for this long from the first one (None: no limit)
    hits: int = 0  # matching requests this rule acted on
    skipped: int = 0
    _until: float | None = field(default=None, repr=False)

    def active(self, now: float) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        return self._until is None or now < self._until

    def matches(self, method: str, path: str) -> bool:
        return bool(re.fullmatch(self.method, method) and re.search(self.path, path))


@dataclass(frozen=True)
class Seen:
    """One request the proxy received, and what it answered (``forwarded:STATUS``, ``500``,
    ``reset``)."""

    method: str
    path: str
    outcome: str


class FaultProxy:
    """The proxy; ``start()`` it, point a registry record at ``url``, add faults."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self.seen: list[Seen] = []
        self._closed = False
        #: Asked first for each request: a Fault to answer it with, or None (then the rules).
        self.gate: Callable[[str, str], Fault | None] | None = None
        #: Told each forwarded request's method, path and the registry's status.
        self.on_answer: Callable[[str, str, int], None] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> FaultProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    # --- rules ---------------------------------------------------------------------------------

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    @contextlib.contextmanager
    def fault(self, fault: Fault) -> Iterator[Fault]:
        self.add(fault)
        try:
            yield fault
        finally:
            with self._lock:
                if fault in self._faults:
                    self._faults.remove(fault)

    def requests(self, method: str = ".*", path: str = ".*") -> list[Seen]:
        with self._lock:
            return [
                s for s in self.seen if re.fullmatch(method, s.method) and re.search(path, s.path)
            ]

    def _take(self, method: str, path: str) -> Fault | None:
        """The first active rule for this request, counted as hit (or as skipped)."""
        now = time.monotonic()
        with self._lock:
            for fault in self._faults:
                if not (fault.active(now) and fault.matches(method, path)):
                    continue
                if fault.skipped < fault.skip:
                    fault.skipped += 1
                    continue
                if fault.seconds is not None and fault._until is None:
                    fault._until = now + fault.seconds  # the window opens with its first hit
                fault.hits += 1
                return fault
        return None

    def _record(self, method: str, path: str, outcome: str) -> None:
        with self._lock:
            self.seen.append(Seen(method, path, outcome))

    # --- connections ---------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream: http.client.HTTPConnection | None = None
        reader = client.makefile("rb")
        try:
            first = client.recv(1, socket.MSG_PEEK)
            if not first or first[0] == 0x16:  # a TLS ClientHello: we speak plain HTTP only
                return
            while True:
                request = _read_request(reader)
                if request is None:
                    return
                method, path, headers, body = request
                fault = (self.gate(method, path) if self.gate else None) or self._take(method, path)
                if fault is not None and fault.delay:
                    time.sleep(fault.delay)
                if fault is not None and fault.reset:
                    self._record(method, path, "reset")
                    _reset(client)
                    return
                if fault is not None and fault.status is not None:
                    self._record(method, path, str(fault.status))
                    client.sendall(_error_answer(method, fault))
                    continue
                upstream = upstream or http.client.HTTPConnection(*self.target, timeout=60)
                answer, upstream = _forward(upstream, self.target, method, path, headers, body)
                self._record(method, path, f"forwarded:{answer[0]}")
                if self.on_answer is not None:
                    self.on_answer(method, path, answer[0])
                client.sendall(_encode_answer(method, *answer))
        except OSError:
            return
        finally:
            if upstream is not None:
                upstream.close()
            with contextlib.suppress(OSError):
                reader.close()
                client.close()


Headers = list[tuple[str, str]]


def _read_request(reader: io.BufferedReader) -> tuple[str, str, Headers, bytes] | None:
    """One request from the client connection (None at EOF); a chunked body is decoded."""
    readline = reader.readline
    line = readline(65537)
    while line in (b"\r\n", b"\n"):  # tolerated between requests
        line = readline(65537)
    if not line:
        return None
    method, path, _version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers: Headers = []
    while (raw := readline(65537)) not in (b"\r\n", b"\n", b""):
        name, _, value = raw.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    fields = {name.lower(): value for name, value in headers}
    if "chunked" in fields.get("transfer-encoding", "").lower():
        body = _read_chunked(reader)
    else:
        body = reader.read(int(fields.get("content-length", "0") or 0))
    return method, path, headers, body


def _read_chunked(reader: io.BufferedReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line = reader.readline(65537)
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while reader.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        parts.append(reader.read(size))
        reader.readline(65537)


def _forward(
    upstream: http.client.HTTPConnection,
    target: tuple[str, int],
    method: str,
    path: str,
    headers: Headers,
    body: bytes,
) -> tuple[tuple[int, str, Headers, bytes], http.client.HTTPConnection]:
    """Send one request upstream (reconnecting once if the kept-alive connection went away)."""
    for attempt in range(2):
        try:
            upstream.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() not in _HOP_HEADERS:
                    upstream.putheader(name, value)
            if body or method in ("POST", "PUT", "PATCH"):
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body or None)
            response = upstream.getresponse()
            data = response.read()
            answer_headers = [(k, v) for k, v in response.getheaders()]
            return (response.status, response.reason, answer_headers, data), upstream
        except (http.client.HTTPException, OSError):
            upstream.close()
            if attempt == 1:
                raise
            upstream = http.client.HTTPConnection(*target, timeout=60)
    raise AssertionError("unreachable")


def _encode_answer(method: str, status: int, reason: str, headers: Headers, body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    for name, value in headers:
        lower = name.lower()
        # A HEAD answer keeps the upstream Content-Length (dockerd reads blob sizes from it).
        if lower in _HOP_HEADERS and not (method == "HEAD" and lower == "content-length"):
            continue
        lines.append(f"{name}: {value}")
    if method != "HEAD":
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: keep-alive")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if method == "HEAD" else head + body


def _error_answer(method: str, fault: Fault) -> bytes:
    status = fault.status or 500
    code = fault.error_code or _DEFAULT_CODES.get(status, "UNKNOWN")
    body = json.dumps(
        {"errors": [{"code": code, "message": f"injected {status}", "detail": None}]}
    ).encode()
    headers: Headers = [("Content-Type", "application/json"),
                        ("Docker-Distribution-Api-Version", "registry/2.0")]  # fmt: skip
    if fault.retry_after is not None:
        headers.append(("Retry-After", fault.retry_after))
    answer = _encode_answer(method, status, _REASONS.get(status, "Error"), headers, body)
    if method == "HEAD":  # no body, but say how long it would have been
        return answer.replace(b"\r\n\r\n", f"\r\nContent-Length: {len(body)}\r\n\r\n".encode(), 1)
    return answer


def _reset(client: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER on, timeout 0) instead of an orderly FIN."""
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
