"""A registry that throttles like a busy Harbor: a ``FaultProxy`` that counts concurrent pushes
and, when given a limit, answers 429 to the push that would go above it.

A push is counted per repository (each test job pushes its own): it opens at the first blob
upload (``POST /v2/<repo>/blobs/uploads/``) and closes when the registry answers its manifest
``PUT``. Requests of an open push always go through. The first upload of a push that would make
more than ``limit`` open pushes is answered ``429 TOOMANYREQUESTS`` (with ``Retry-After`` if
given), which the engine does not retry itself: the push fails, as a busy registry makes it fail.
A push that stops without its manifest (a failed push) is closed after ``idle`` seconds.
With ``hold`` the registry answers each push's manifest ``PUT`` that many seconds late, the push
open meanwhile: a registry slower per push than this machine (remote, busy), whose limit rather
than the machine's CPU bounds how fast pushes go, at no CPU cost here.

``max_open`` is the most pushes the registry saw at once; ``throttled`` the 429s it answered.
``timeline`` has, per repository, when its first request came, when its push opened and closed
(monotonic clock) and when its last request came (a benchmark's view of how much of a push is
spent before and after the registry counts it).
"""

from __future__ import annotations

import re
import threading
import time

from tests.support.faultproxy import Fault, FaultProxy

_PUSH_PATH = re.compile(r"^/v2/(.+?)/(blobs|manifests)/")


class ThrottleProxy(FaultProxy):
    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        limit: int | None = None,
        retry_after: str | None = None,
        idle: float = 10.0,
        hold: float = 0.0,
    ) -> None:
        super().__init__(target_host, target_port)
        self.limit, self.retry_after, self.idle, self.hold = limit, retry_after, idle, hold
        self._pushes: dict[str, float] = {}  # repository -> last request of its push
        self._count_lock = threading.Lock()
        self.max_open = 0
        self.throttled = 0
        self.opened = 0
        #: repository -> [first request, opened, closed, last request] (None: not yet).
        self.timeline: dict[str, list[float | None]] = {}
        self.gate = self._gate
        self.on_answer = self._answered

    def _gate(self, method: str, path: str) -> Fault | None:
        match = _PUSH_PATH.match(path)
        if match is None:
            return None
        repository, now = match.group(1), time.monotonic()
        with self._count_lock:
            marks = self.timeline.setdefault(repository, [now, None, None, now])
            marks[0] = now if marks[0] is None else marks[0]
            marks[3] = now
            for stale in [r for r, seen in self._pushes.items() if now - seen > self.idle]:
                del self._pushes[stale]
            if repository in self._pushes:
                self._pushes[repository] = now
                if self.hold and method == "PUT" and match.group(2) == "manifests":
                    return Fault(delay=self.hold)
                return None
            if not (method == "POST" and "/blobs/uploads/" in path):
                return None
            if self.limit is not None and len(self._pushes) >= self.limit:
                self.throttled += 1
                marks[0] = None  # the try that opens the push starts with its next request
                return Fault(status=429, retry_after=self.retry_after, error_code="TOOMANYREQUESTS")
            self._pushes[repository] = now
            self.timeline[repository][1] = now
            self.opened += 1
            self.max_open = max(self.max_open, len(self._pushes))
            return None

    def _answered(self, method: str, path: str, status: int) -> None:
        match = _PUSH_PATH.match(path)
        if match is None or method != "PUT" or match.group(2) != "manifests":
            return
        with self._count_lock:
            if self._pushes.pop(match.group(1), None) is not None:
                self.timeline[match.group(1)][2] = time.monotonic()

    def open_pushes(self) -> int:
        with self._count_lock:
            return len(self._pushes)
