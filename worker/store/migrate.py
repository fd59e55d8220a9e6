"""Schema migrations, run on purpose (``pushctl db upgrade``), never implicitly at start-up."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.exc import OperationalError

from worker.core.errors import DatabaseUnavailable
from worker.core.settings import get_settings
from worker.store.db import make_engine, translate_error

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@contextmanager
def _database_errors() -> Iterator[None]:
    # Alembic connects by itself, outside worker.store.db's sessions: a database that does not
    # answer is translated here, so `pushctl db upgrade` says so (exit 10) instead of a
    # driver traceback.
    try:
        yield
    except OperationalError as exc:
        raise translate_error(exc) or DatabaseUnavailable(
            "the database refused the migration's connection",
            hint="check PUSHWORKER_DATABASE_URL",
        ) from None


def upgrade(url: str | None = None, revision: str = "head") -> None:
    url = url or get_settings().database_url
    with _database_errors():
        make_engine(url).dispose()  # creates the SQLite file's folder
        command.upgrade(alembic_config(url), revision)


def current(url: str | None = None) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url or get_settings().database_url)
    with _database_errors(), engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head() -> str | None:
    """The newest revision this code knows (what ``upgrade`` brings a database to)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS)).get_current_head()
