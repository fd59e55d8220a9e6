"""Fixtures shared by every test layer.

Unit tests use a throwaway SQLite file and fakes. Integration and end-to-end tests use the real
stack (``scripts/stack up``): if a service cannot be started, the run fails naming it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text

from harness.stack import Stack, StackError, start_stack
from tests.support.fakes import RecordingDispatcher
from worker.core.settings import get_settings
from worker.engine.dispatch import set_dispatcher
from worker.store.migrate import upgrade

#: What a fixture needs running, as markers (pyproject.toml lists them; docs/stack.md).
#: ``postgres_url`` and ``database_url``'s PostgreSQL half reach PostgreSQL through
#: ``postgres_server``; ``stack`` itself is left out, as every service fixture uses it.
FIXTURE_NEEDS: dict[str, tuple[str, ...]] = {
    "postgres_server": ("postgres",),
    "e2e": ("docker", "redis"),
}
#: Modules whose needs no fixture shows: test_compose runs the docker-compose binary itself.
MODULE_NEEDS: dict[str, tuple[str, ...]] = {"test_compose.py": ("compose",)}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        # The layer marker follows the folder, so a test cannot forget it.
        for layer in ("unit", "integration", "e2e"):
            if f"{os.sep}{layer}{os.sep}" in str(item.fspath):
                item.add_marker(getattr(pytest.mark, layer))
        # What a test needs follows the fixtures it uses, so a unit test that takes a PostgreSQL
        # database says so, and `-m "unit and not postgres and not compose"` needs no service.
        for need in sorted(_needs(item)):
            item.add_marker(getattr(pytest.mark, need))


def _needs(item: pytest.Item) -> set[str]:
    needs = set(MODULE_NEEDS.get(item.path.name, ()))
    fixtures: list[str] = getattr(item, "fixturenames", [])
    for fixture in fixtures:
        needs.update(FIXTURE_NEEDS.get(fixture, ()))
    # database_url takes PostgreSQL at run time (getfixturevalue), only for its postgresql case.
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("database_url") == "postgresql":
        needs.add("postgres")
    return needs


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Every test starts from known settings, never the developer's own."""
    monkeypatch.setenv("PUSHWORKER_DATABASE_URL", f"sqlite:///{tmp_path / 'pushworker.db'}")
    monkeypatch.setenv("PUSHWORKER_SECRET_KEY", Fernet.generate_key().decode())
    monkeypatch.setenv("PUSHWORKER_LOG_FORMAT", "json")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.docker/config.json of the host
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def use_database(monkeypatch: pytest.MonkeyPatch, url: str) -> str:
    """Point the settings (and so every default session) at ``url``."""
    monkeypatch.setenv("PUSHWORKER_DATABASE_URL", url)
    get_settings.cache_clear()
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'pushworker.db'}"
    upgrade(url)
    return use_database(monkeypatch, url)


@pytest.fixture(scope="session")
def stack() -> Stack:
    try:
        return start_stack()
    except StackError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def postgres_server(stack: Stack) -> str:
    if not stack.postgres_url:
        pytest.fail("PostgreSQL does not answer on 127.0.0.1:5432 (database test)", pytrace=False)
    return stack.postgres_url


@pytest.fixture
def postgres_url(postgres_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for one test, dropped afterwards."""
    name = f"pushworker_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = postgres_server.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield use_database(monkeypatch, url)
    from worker.store.db import engine_for

    engine_for(url).dispose()
    engine_for.cache_clear()
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each contract test runs on both backends."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def dispatched() -> Iterator[RecordingDispatcher]:
    """The process's dispatcher for one test: it records each chain instead of publishing it
    (no broker); the installed one is back afterwards."""
    recorder = RecordingDispatcher()
    set_dispatcher(recorder)
    yield recorder
    set_dispatcher(None)
