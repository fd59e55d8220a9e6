"""The project's Celery app with a trace of every registry slot, for benchmark 7 (``--trace``).

    BENCH_SLOT_TRACE=DIR celery -A bench.slot_trace worker ...

``tasks.app`` unchanged, plus, in every pool process, one JSON line per call of what decides a
slot's life, in ``DIR/slots-<pid>.jsonl`` (``time.monotonic()``, which on Linux is one clock for
every process of the machine, so the lines join the benchmark's proxy timeline):

- ``acquire``: ``RedisFlowState.acquire`` (holder, waiter, granted; ``take`` false: only asked),
  where a slot is taken;
- ``release`` / ``hand_over``: where it is freed (and, for a hand-over, the waiters it was
  reserved for);
- ``claim``, ``record``: the runner's claim and record transactions;
- ``inspect``, ``push``: the Docker Engine's image inspect and push (with the target's
  repository, which is how the proxy names a push);
- ``head``: the registry HTTP API's manifest HEAD (the digest checks);
- ``lock``: SQLite's write lock, which every write transaction takes up front: when the wait
  for it began (``t0``), when it was taken (``t1``) and freed (``t2``).

``bench/slot_phases.py`` turns those lines and the proxy's timeline into where the time between
a slot's acquire and its release went. Nothing in ``worker/`` or ``tasks/`` changes on disk.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine

import worker.engine.pipeline as pipeline
import worker.seams.docker_engine as docker_engine
import worker.seams.limiter as limiter
import worker.seams.registry_http as registry_http
import worker.store.db as db
from tasks.app import app

TRACE_DIR = os.environ.get("BENCH_SLOT_TRACE")
_out: list[Any] = []


def _write(record: dict[str, Any]) -> None:
    if not _out:
        path = Path(TRACE_DIR or ".", f"slots-{os.getpid()}.jsonl")
        _out.append(path.open("a", buffering=1))
    _out[0].write(json.dumps(record) + "\n")


def _traced(
    kind: str, describe: Callable[[tuple[Any, ...], Any], dict[str, Any]], *, keywords: bool = False
) -> Any:
    def wrap(function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            result: Any = None
            try:
                result = function(*args, **kwargs)
                return result
            finally:
                record = {"kind": kind, "t0": started, "t1": time.monotonic()}
                # A description must never fail the call it describes.
                with suppress(Exception):
                    record.update(describe(args, result))
                    if keywords:
                        record.update({k: v for k, v in kwargs.items() if k in ("take", "wake")})
                _write(record)

        wrapper.__wrapped__ = function  # type: ignore[attr-defined]
        return wrapper

    return wrap


_lock: list[float] = []


def _lock_taken(take: Callable[[Any], None]) -> Callable[[Any], None]:
    """SQLite's write lock (every write transaction takes it up front): when this process
    began to wait for it and when it had it; ``_lock_freed`` writes the line at the commit or
    rollback that frees it."""

    def wrapper(raw: Any) -> None:
        started = time.monotonic()
        take(raw)
        _lock[:] = [started, time.monotonic()]

    return wrapper


def _lock_freed(*_args: Any) -> None:
    if _lock:
        _write({"kind": "lock", "t0": _lock[0], "t1": _lock[1], "t2": time.monotonic()})
        _lock.clear()


def _patch() -> None:
    db._take_write_lock = _lock_taken(db._take_write_lock)  # type: ignore[assignment]
    sa_event.listen(Engine, "commit", _lock_freed)
    sa_event.listen(Engine, "rollback", _lock_freed)
    state = limiter.RedisFlowState
    state.acquire = _traced(  # type: ignore[method-assign]
        "acquire",
        lambda a, r: {"holder": a[2], "waiter": a[3], "granted": bool(r and r.granted)},
        keywords=True,
    )(state.acquire)
    state.release = _traced("release", lambda a, r: {"holder": a[2]})(state.release)  # type: ignore[method-assign]
    state.hand_over = _traced(  # type: ignore[method-assign]
        "hand_over", lambda a, r: {"holder": a[2], "reserved": list(r or [])}
    )(state.hand_over)
    engine = docker_engine.DockerEngine
    engine.image = _traced("inspect", lambda a, r: {})(engine.image)  # type: ignore[method-assign]
    engine.push = _traced("push", lambda a, r: {"repository": a[1].repository})(engine.push)  # type: ignore[method-assign]
    http = registry_http.RegistryHTTP
    http.manifest_digest = _traced("head", lambda a, r: {"repository": a[1]})(  # type: ignore[method-assign]
        http.manifest_digest
    )
    runner = pipeline.StepRunner
    runner._claim = _traced("claim", lambda a, r: {"step": a[1], "job": a[2]})(runner._claim)  # type: ignore[method-assign]
    runner._record_success = _traced(  # type: ignore[method-assign]
        "record", lambda a, r: {"step": a[1], "job": a[2]}
    )(runner._record_success)


if TRACE_DIR:
    _patch()


__all__ = ["app"]
