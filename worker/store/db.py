"""Engines and sessions; database failures become ``DatabaseUnavailable`` here.

The project's sessions (``session_scope``) publish the events they appended once they commit
(``worker.store.events.publish_committed``): the hooks are on the project's sessionmaker, so a
Session made elsewhere in the process (a library's, a test's) is not hooked.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Dialect, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, InvalidatePoolError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from worker.core.errors import DatabaseUnavailable, EventConflict, PushWorkerError
from worker.core.settings import get_settings
from worker.store import events

#: deadlock_detected, serialization_failure
_RETRYABLE_SQLSTATES = ("40P01", "40001")


#: Every engine this process made, so that a forked child can drop the connections it inherits.
_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


def _forget_inherited_connections() -> None:
    # A child forked from a process that used the database (Celery's main process records
    # refused messages and takes over dead claims; it forks pool children whenever one is
    # replaced) inherits that process's pooled connections. Two processes talking on one
    # socket corrupt each other's transactions, so the child drops them without closing them
    # (closing would end the parent's sessions too) and opens its own (SQLAlchemy's advice for
    # os.fork: dispose(close=False) in the child).
    for engine in list(_ENGINES):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_inherited_connections)


def _tracked(engine: Engine) -> Engine:
    _ENGINES.add(engine)
    return engine


def make_engine(url: str) -> Engine:
    """An engine tuned for several worker processes sharing one database."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
        return _tracked(engine)
    engine = create_engine(url, pool_size=5, max_overflow=5)
    event.listen(engine, "checkin", _note_checkin)
    event.listen(engine, "checkout", partial(_ping_when_idle, engine.dialect))
    return _tracked(engine)


#: A pooled connection idle for longer than this is pinged before it is handed out. The
#: database may have restarted, or a firewall dropped the connection, while it sat in the pool;
#: a ping finds that out and the pool reconnects, instead of the first statement failing. A
#: connection used more recently is handed out as it is: a job's transactions follow each other
#: milliseconds apart, and SQLAlchemy's ``pool_pre_ping`` (a round trip at every checkout, eight
#: a job) cost each of them a round trip. Should one of those find the database gone, its
#: statement fails as it would in the middle of a transaction: ``DatabaseUnavailable``, and the
#: pool is invalidated, so the next checkout reconnects.
PING_AFTER_IDLE = 1.0


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info["pushworker_checked_in"] = time.monotonic()


def _ping_when_idle(dialect: Dialect, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    checked_in = record.info.get("pushworker_checked_in")
    if checked_in is None or time.monotonic() - checked_in < PING_AFTER_IDLE:
        return  # just connected, or used a moment ago
    try:
        alive = dialect.do_ping(dbapi_connection)
    except Exception as error:
        if (
            dialect.dbapi is not None
            and isinstance(error, dialect.dbapi.Error)
            and (dialect.is_disconnect(error, dbapi_connection, None))
        ):
            # The pool reconnects (every connection it holds predates the outage) and retries.
            raise InvalidatePoolError() from None
        raise
    if not alive:
        raise InvalidatePoolError()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the CLI read while workers write; foreign keys are off by default in SQLite.
    # The driver's own transaction handling is switched off so that "begin" below decides.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


#: How long a writer waits for SQLite's write lock before giving up.
SQLITE_LOCK_WAIT = 30.0
#: The longest pause between two tries for the lock.
_LOCK_RETRY_CAP = 0.004


def _sqlite_begin_immediate(connection: Any) -> None:
    # A deferred transaction that reads, then writes, fails at once with "database is locked"
    # when another process wrote in between; taking the write lock up front makes it wait.
    # The wait is ours rather than SQLite's busy handler, which sleeps up to 100 ms between
    # tries: with a producer and several workers each holding the lock for a millisecond or
    # two, those sleeps leave it idle while writers queue. Here a waiter tries again within
    # a few milliseconds (with jitter, so that waiters do not move in step).
    raw = connection.connection.driver_connection
    raw.execute("PRAGMA busy_timeout=0")
    try:
        _take_write_lock(raw)
    finally:
        raw.execute(f"PRAGMA busy_timeout={int(SQLITE_LOCK_WAIT * 1000)}")


def _take_write_lock(raw: sqlite3.Connection) -> None:
    deadline = time.monotonic() + SQLITE_LOCK_WAIT
    pause = 0.0005
    while True:
        try:
            raw.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
        if time.monotonic() >= deadline:
            raise DatabaseUnavailable(
                f"the database stayed locked by another writer for {SQLITE_LOCK_WAIT:.0f} s",
                hint="a long transaction holds SQLite's write lock; for many writers use "
                "PostgreSQL (PUSHWORKER_DATABASE_URL)",
            )
        time.sleep(pause * random.uniform(0.5, 1.5))
        pause = min(pause * 2, _LOCK_RETRY_CAP)


@lru_cache(maxsize=4)
def engine_for(url: str) -> Engine:
    return make_engine(url)


@lru_cache(maxsize=4)
def reader_for(url: str) -> Engine:
    """An engine for reads only: on SQLite, connections that read in a deferred transaction (a
    WAL snapshot that does not take the write lock, so a reader never makes a worker wait) and
    refuse to write (``query_only``); elsewhere the writers' engine."""
    if not url.startswith("sqlite"):
        return engine_for(url)
    engine = create_engine(url, connect_args={"timeout": 30})
    event.listen(engine, "connect", _sqlite_reader_pragmas)
    event.listen(engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN"))
    return _tracked(engine)


def _sqlite_reader_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA query_only=ON")
    cursor.close()


def default_engine() -> Engine:
    return engine_for(get_settings().database_url)


@lru_cache(maxsize=4)
def _sessionmaker(engine: Engine) -> sessionmaker[Session]:
    factory = sessionmaker(engine, expire_on_commit=False)
    # Listening on a sessionmaker hooks the sessions it makes, and only those.
    event.listen(factory, "after_commit", events.publish_committed)
    event.listen(factory, "after_rollback", events.forget_rolled_back)
    return factory


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """One transaction: committed on success, rolled back on error.

    A lost or refused connection surfaces as ``DatabaseUnavailable`` so that callers (and the
    retry policy) can tell it from a bug.
    """
    factory = _sessionmaker(engine or default_engine())
    session = factory()
    try:
        yield session
        session.commit()
    except OperationalError as exc:
        session.rollback()
        translated = translate_error(exc)
        if translated is None:
            raise
        raise translated from None
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def read_connection() -> Iterator[Connection]:
    """A Core connection for reads only (see ``reader_for``): for hot, one-statement reads,
    where a session's set-up costs more than the query."""
    try:
        with reader_for(get_settings().database_url).connect() as connection:
            yield connection
    except OperationalError as exc:
        translated = translate_error(exc)
        if translated is None:
            raise
        raise translated from None


@contextmanager
def read_snapshot(url: str | None = None) -> Iterator[Connection]:
    """A read-only connection in one consistent snapshot of the database: a plain read
    transaction on SQLite (WAL: writers are not blocked), REPEATABLE READ on PostgreSQL. For
    readers of the whole log (verify, export, retention), which stream through it."""
    url = url or get_settings().database_url
    if url.startswith("sqlite"):
        with reader_for(url).connect() as connection, connection.begin():
            yield connection
        return
    with engine_for(url).connect() as connection:
        connection = connection.execution_options(
            isolation_level="REPEATABLE READ", postgresql_readonly=True
        )
        with connection.begin():
            yield connection


@contextmanager
def read_scope() -> Iterator[Session]:
    """A session for reads only (writing through it fails): see ``reader_for``."""
    with session_scope(reader_for(get_settings().database_url)) as session:
        yield session


def translate_error(exc: OperationalError) -> PushWorkerError | None:
    """The project's error for this database failure, or None when it is not one of ours."""
    if getattr(exc.orig, "sqlstate", None) in _RETRYABLE_SQLSTATES:
        # PostgreSQL broke a deadlock (or a serialisation conflict) by aborting this
        # transaction: nothing of it was written, and running it again is safe.
        return EventConflict(
            "the database aborted this transaction to resolve a conflict with a concurrent "
            "writer; try again"
        )
    if _is_connection_error(exc):
        return DatabaseUnavailable(
            "the database does not answer", hint="check PUSHWORKER_DATABASE_URL"
        )
    return None


def _is_connection_error(exc: DBAPIError) -> bool:
    text = str(exc.orig).lower()
    markers = ("connection", "could not connect", "server closed", "unable to open", "timeout")
    return bool(exc.connection_invalidated) or any(marker in text for marker in markers)
