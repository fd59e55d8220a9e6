"""The project's Celery app with timing around its seams, for benchmark 4 and the profile.

    celery -A bench.instrumented worker ...

``tasks.app`` unchanged (same configuration, same tasks), plus, in every pool process, when
``BENCH_TRACE_DIR`` is set:

- spans (start and end, wall clock) of the Docker Engine calls (``worker.seams.docker_engine``), the
  registry HTTP requests (``worker.seams.registry_http``), each database transaction of a step
  (``worker.engine.pipeline.session_scope``), each commit, each event append, credential resolution,
  the step itself (``StepRunner.run``) and Celery's publishing of the chain's next message;
- the number and time of SQL statements;
- one JSON line per task in ``$BENCH_TRACE_DIR/trace-<pid>.jsonl``, written after the task;

and
- with ``BENCH_PROFILE_DIR``: a pyinstrument profile of the pool process while it runs tasks,
  from the moment the file ``$BENCH_PROFILE_DIR/on`` exists (so that warm-up is left out),
  written when the pool process exits (``profile-<pid>.txt``, ``.html``, ``.pyisession``).

The wrappers cost a ``time.time()`` pair and a list append per call (well under 0.1 ms a job).
Nothing in ``worker/`` or ``tasks/`` is modified on disk; the patches live in this process only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from celery.signals import (
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_process_shutdown,
)
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import worker.engine.pipeline as pipeline
import worker.engine.steps as steps
import worker.seams.docker_engine as docker_engine
import worker.seams.registry_http as registry_http
import worker.store.events as events
from tasks.app import app
from worker.core.credentials import resolve_credential
from worker.store.db import session_scope as session_scope_of_worker

TRACE_DIR = os.environ.get("BENCH_TRACE_DIR")
PROFILE_DIR = os.environ.get("BENCH_PROFILE_DIR")

_spans: list[tuple[str, float, float]] = []
_sql = {"n": 0, "seconds": 0.0}
_task: dict[str, Any] = {}
_profiler: list[Any] = []


def _timed(kind: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.time()
        try:
            return function(*args, **kwargs)
        finally:
            _spans.append((kind, started, time.time()))

    wrapper.__wrapped__ = function  # type: ignore[attr-defined]
    return wrapper


def _patch() -> None:
    engine_cls = docker_engine.DockerEngine
    for name, kind in [
        ("push", "docker.push"), ("login", "docker.login"), ("tag", "docker.tag"),
        ("image", "docker.inspect"),
        ("__init__", "docker.connect"),
    ]:  # fmt: skip
        setattr(engine_cls, name, _timed(kind, getattr(engine_cls, name)))
    http_cls = registry_http.RegistryHTTP
    http_cls._request = _timed("registry.http", http_cls._request)  # type: ignore[method-assign]
    http_cls.__init__ = _timed("registry.session", http_cls.__init__)  # type: ignore[method-assign]
    pipeline.StepRunner.run = _timed("step.run", pipeline.StepRunner.run)  # type: ignore[method-assign]
    events.append = _timed("events.append", events.append)
    # The appends behind a row change (a claim's, a success's): the change counts with them.
    events.append_guarded = _timed("events.append", events.append_guarded)
    steps.resolve_credential = _timed("credentials", resolve_credential)  # type: ignore[attr-defined]
    Session.commit = _timed("db.commit", Session.commit)  # type: ignore[method-assign]
    original_scope = session_scope_of_worker

    @contextmanager
    def session_scope(*args: Any, **kwargs: Any) -> Iterator[Session]:
        started = time.time()
        try:
            with original_scope(*args, **kwargs) as session:
                yield session
        finally:
            _spans.append(("db.tx", started, time.time()))

    pipeline.session_scope = session_scope  # type: ignore[attr-defined]
    app.send_task = _timed("celery.publish", app.send_task)

    @sa_event.listens_for(Engine, "before_cursor_execute")
    def _before(conn: Any, *_args: Any) -> None:
        conn.info.setdefault("bench_started", []).append(time.perf_counter())

    @sa_event.listens_for(Engine, "after_cursor_execute")
    def _after(conn: Any, *_args: Any) -> None:
        stack = conn.info.get("bench_started")
        if stack:
            _sql["n"] += 1
            _sql["seconds"] += time.perf_counter() - stack.pop()


if TRACE_DIR:
    _patch()


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _child_started(**_kwargs: object) -> None:
    if PROFILE_DIR:
        from pyinstrument import Profiler

        _profiler.append(Profiler(interval=0.0005))


@task_prerun.connect  # type: ignore[untyped-decorator]
def _prerun(task_id: str = "", task: Any = None, args: Any = (), **_kwargs: object) -> None:
    _spans.clear()
    _sql.update(n=0, seconds=0.0)
    _task.clear()
    _task.update(
        job=args[0] if args else None,
        task=getattr(task, "name", "?"),
        prerun=time.time(),
    )
    if _profiler and Path(PROFILE_DIR or "", "on").exists():  # warm-up tasks are not profiled
        _profiler[0].start()


@task_postrun.connect  # type: ignore[untyped-decorator]
def _postrun(state: str | None = None, **_kwargs: object) -> None:
    ended = time.time()
    if _profiler and _profiler[0].is_running:
        _profiler[0].stop()
    if not TRACE_DIR or not _task:
        return
    record = {
        **_task, "postrun": ended, "state": state, "pid": os.getpid(),
        "spans": list(_spans), "sql_n": _sql["n"], "sql_s": _sql["seconds"],
    }  # fmt: skip
    with Path(TRACE_DIR, f"trace-{os.getpid()}.jsonl").open("a") as trace:
        trace.write(json.dumps(record) + "\n")


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _write_profile(**_kwargs: object) -> None:
    if not _profiler:
        return
    profiler = _profiler[0]
    if profiler.is_running:
        profiler.stop()
    if profiler.last_session is None or not PROFILE_DIR:
        return
    base = Path(PROFILE_DIR, f"profile-{os.getpid()}")
    base.with_suffix(".txt").write_text(profiler.output_text(unicode=True, show_all=False))
    base.with_suffix(".html").write_text(profiler.output_html())
    base.with_suffix(".pyisession").write_text(json.dumps(profiler.last_session.to_json()))


__all__ = ["app"]
