"""Sessions on SQLite: writers wait their turn for the write lock (and say so when it never
comes); read-only scopes neither wait for writers nor write."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import OperationalError

from worker.core.errors import DatabaseUnavailable
from worker.core.settings import get_settings
from worker.jobs import PushRequest, create_job, docker_host_of
from worker.registries import RegistrySpec, create_registry
from worker.store import db
from worker.store.db import default_engine, read_scope, session_scope
from worker.store.models import Registry


@pytest.fixture
def one_registry(sqlite_url: str) -> None:
    with session_scope() as session:
        spec = RegistrySpec(name="r", url="https://reg.example.com", username="u", secret="pw")
        create_registry(session, spec, registry_id=1)


def test_a_read_scope_does_not_wait_for_a_writer_holding_the_lock(one_registry: None) -> None:
    """A worker's open write transaction (BEGIN IMMEDIATE) does not hold up a reader."""
    with default_engine().connect() as writer, writer.begin() as transaction:
        # The writers' engine began with BEGIN IMMEDIATE: this connection holds the lock.
        writer.exec_driver_sql("UPDATE registries SET name = 'held' WHERE id = 1")
        started = time.monotonic()
        with read_scope() as session:
            count = session.scalar(select(func.count()).select_from(Registry))
            name = session.scalar(select(Registry.name))
        waited = time.monotonic() - started
        transaction.rollback()
    assert (count, name) == (1, "r")  # the last committed state, not the writer's
    # A writer-style session would have waited out the busy timeout (30 s) here.
    assert waited < 10


def test_a_read_scope_refuses_to_write(one_registry: None) -> None:
    with pytest.raises(OperationalError, match="readonly"), read_scope() as session:
        registry = session.get(Registry, 1)
        assert registry is not None
        registry.name = "renamed"
        session.flush()
    with read_scope() as session:
        assert session.get(Registry, 1).name == "r"  # type: ignore[union-attr]


def _hold_write_lock(path: str, seconds: float, released: list[float]) -> threading.Thread:
    """Another process's writer: holds SQLite's write lock for ``seconds``."""
    holding = threading.Event()

    def hold() -> None:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        holding.set()
        time.sleep(seconds)
        released.append(time.monotonic())
        other.execute("COMMIT")
        other.close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert holding.wait(10)
    return thread


def test_a_writer_waits_for_the_write_lock_and_takes_it_once_free(
    one_registry: None, sqlite_url: str
) -> None:
    released: list[float] = []
    holder = _hold_write_lock(sqlite_url.split("///", 1)[1], 0.3, released)
    with session_scope() as session:
        session.execute(text("UPDATE registries SET name = 'renamed' WHERE id = 1"))
        acquired = time.monotonic()
    holder.join(10)
    assert released and acquired >= released[0]
    with read_scope() as session:
        assert session.scalar(select(Registry.name)) == "renamed"


def test_a_write_lock_held_too_long_is_a_clear_error(
    one_registry: None, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "SQLITE_LOCK_WAIT", 0.2)
    released: list[float] = []
    holder = _hold_write_lock(sqlite_url.split("///", 1)[1], 1.0, released)
    try:
        too_long = pytest.raises(DatabaseUnavailable, match="stayed locked by another writer")
        with too_long, session_scope() as session:
            session.execute(text("UPDATE registries SET name = 'renamed' WHERE id = 1"))
    finally:
        holder.join(10)
    with session_scope() as session:  # the connection is usable again, with its full wait
        session.execute(text("UPDATE registries SET name = 'later' WHERE id = 1"))
    with read_scope() as session:
        assert session.scalar(select(Registry.name)) == "later"


def test_a_jobs_docker_host_is_read_without_the_write_lock(
    one_registry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What every publish reads to pick the queue: the job's own Docker host, or None."""
    monkeypatch.setenv("PUSHWORKER_DOCKER_HOSTS", "builder-1")
    get_settings.cache_clear()
    to_builder = PushRequest("app:1", 1, "team/app", "v1", "t", docker_host="builder-1")
    with session_scope() as session:
        routed, _ = create_job(session, to_builder, actor="t")
        default, _ = create_job(session, PushRequest("app:1", 1, "team/app", "v2", "t"), actor="t")
    with default_engine().connect() as writer, writer.begin():
        writer.exec_driver_sql("UPDATE registries SET name = 'held' WHERE id = 1")  # holds it
        assert docker_host_of(routed.id) == "builder-1"
        assert docker_host_of(default.id) is None
        assert docker_host_of("no-such-job") is None
