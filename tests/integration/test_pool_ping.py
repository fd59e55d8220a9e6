"""PostgreSQL connections in the pool: pinged when they sat idle, not at every checkout
(``worker.store.db.PING_AFTER_IDLE``)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from worker.core.errors import DatabaseUnavailable
from worker.store import db
from worker.store.db import engine_for, session_scope


def _backend_pids(url: str) -> list[int]:
    """The server processes of this test database's connections (the pool's)."""
    admin = create_engine(url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            return list(connection.scalars(
                text("SELECT pid FROM pg_stat_activity WHERE datname = :name"),
                {"name": url.rsplit("/", 1)[1]},
            ))  # fmt: skip
    finally:
        admin.dispose()


def _kill_backends(url: str) -> None:
    """What a database restart does to the pool's connections: the server ends them."""
    admin = create_engine(url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = :name AND pid <> pg_backend_pid()"),
                {"name": url.rsplit("/", 1)[1]},
            )  # fmt: skip
    finally:
        admin.dispose()


def _one(url: str) -> int:
    with session_scope() as session:
        return int(session.scalar(text("SELECT 1")) or 0)


def _counting_pings(url: str, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    dialect = engine_for(url).dialect
    pings: list[float] = []
    real = dialect.do_ping

    def ping(dbapi_connection: Any) -> bool:
        pings.append(time.monotonic())
        return real(dbapi_connection)

    monkeypatch.setattr(dialect, "do_ping", ping)
    return pings


def test_a_connection_used_a_moment_ago_is_not_pinged(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pings = _counting_pings(postgres_url, monkeypatch)
    monkeypatch.setattr(db, "PING_AFTER_IDLE", 60.0)
    for _ in range(5):
        assert _one(postgres_url) == 1
    assert pings == []


def test_a_connection_that_sat_idle_is_pinged(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pings = _counting_pings(postgres_url, monkeypatch)
    monkeypatch.setattr(db, "PING_AFTER_IDLE", 0.05)
    assert _one(postgres_url) == 1
    assert pings == []  # a new connection is not pinged
    time.sleep(0.1)
    assert _one(postgres_url) == 1
    assert len(pings) == 1


def test_an_idle_connection_the_server_ended_is_replaced_unnoticed(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database restart while the pool's connections sat idle: the ping finds them dead, the
    pool reconnects, and the transaction runs as if nothing happened."""
    monkeypatch.setattr(db, "PING_AFTER_IDLE", 0.05)
    assert _one(postgres_url) == 1
    before = _backend_pids(postgres_url)
    _kill_backends(postgres_url)
    time.sleep(0.1)
    assert _one(postgres_url) == 1
    assert not set(_backend_pids(postgres_url)) & set(before)


def test_a_connection_ended_right_after_its_use_fails_once_then_reconnects(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window the ping no longer covers: the first transaction fails as a lost connection
    does mid-transaction (the project's error, which the pipeline retries), and the next one
    runs on a new connection."""
    monkeypatch.setattr(db, "PING_AFTER_IDLE", 60.0)
    assert _one(postgres_url) == 1
    _kill_backends(postgres_url)
    with pytest.raises(DatabaseUnavailable):
        _one(postgres_url)
    assert _one(postgres_url) == 1
