"""Schema migrations, run on purpose (``pushctl db upgrade``), never implicitly at start-up."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from worker.config import get_settings
from worker.db import make_engine

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    url = url or get_settings().database_url
    make_engine(url).dispose()  # creates the SQLite file's folder
    command.upgrade(alembic_config(url), revision)


def current(url: str | None = None) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url or get_settings().database_url)
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
