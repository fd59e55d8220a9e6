"""Sessions: read-only scopes on SQLite neither wait for writers nor write."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from worker.db import default_engine, read_scope, session_scope
from worker.models import Registry
from worker.registries import RegistrySpec, create_registry


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
