"""A fresh pool process warms up in the background: its step runner is built and its database
connections are open before its first job asks for them (tasks/push.py)."""

from __future__ import annotations

import time

import pytest
from celery.signals import worker_process_init

import tasks.push
from worker.core.settings import get_settings
from worker.store.db import default_engine, reader_for


def _pooled(url: str) -> tuple[int, int]:
    writer, reader = default_engine().pool, reader_for(url).pool
    return writer.checkedin(), reader.checkedin()  # type: ignore[attr-defined]


def test_warm_up_builds_the_runner_and_opens_the_connections(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tasks.push, "_built", [])
    default_engine().dispose()
    reader_for(sqlite_url).dispose()
    assert _pooled(sqlite_url) == (0, 0)
    tasks.push.warm_up()
    assert len(tasks.push._built) == 1
    assert tasks.push._runner() is tasks.push._built[0]  # built once, then reused
    assert _pooled(sqlite_url) == (1, 1)
    # Nothing was begun: the write lock is free for a writer right away.
    with default_engine().begin() as connection:
        connection.exec_driver_sql("SELECT 1")


def test_a_new_pool_process_warms_up_in_a_thread(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tasks.push, "_built", [])
    worker_process_init.send(sender=None)
    deadline = time.monotonic() + 10
    while not tasks.push._built and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tasks.push._built, "the warm-up thread did not build the step runner"


def test_a_failing_warm_up_is_logged_not_raised(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The database away at start: the pool process lives on; its first job says what fails."""
    monkeypatch.setenv("PUSHWORKER_DATABASE_URL", "postgresql+psycopg://u@127.0.0.1:1/none")
    get_settings.cache_clear()
    monkeypatch.setattr(tasks.push, "_built", [])
    worker_process_init.send(sender=None)
    deadline, seen = time.monotonic() + 20, ""
    while "worker.warm_up_failed" not in seen:
        assert time.monotonic() < deadline, f"no warm_up_failed line in {seen!r}"
        time.sleep(0.05)
        captured = capsys.readouterr()
        seen += captured.out + captured.err
