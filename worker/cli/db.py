"""``pushctl db`` and ``pushctl config``: the schema and the settings."""

from __future__ import annotations

import click

from worker.cli.common import (
    _echo_json,
    _out,
    _table,
    cli,
)
from worker.core.credentials import new_key
from worker.core.settings import get_settings, mask_url_password
from worker.store import migrate


@cli.group()
def db() -> None:
    """The database schema.

    \b
    Example:
      pushctl db upgrade
    """


@db.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the schema to the newest revision.

    \b
    Example:
      PUSHWORKER_DATABASE_URL=postgresql+psycopg://pw@db/pw pushctl db upgrade
    """
    migrate.upgrade()
    url = mask_url_password(get_settings().database_url)
    click.echo(f"database {url} is at revision {migrate.current()}")


@cli.group("config", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def config(ctx: click.Context, as_json: bool) -> None:
    """Show the settings (secrets masked).

    \b
    Example:
      pushctl config --json
    """
    if ctx.invoked_subcommand is not None:
        return
    shown = get_settings().masked()
    if as_json:
        _echo_json(shown)
    else:
        _out().print(_table(("setting", "value"), shown.items()))


@config.command("new-key")
def config_new_key() -> None:
    """Print a new Fernet key for PUSHWORKER_SECRET_KEY.

    \b
    Example:
      export PUSHWORKER_SECRET_KEY="$(pushctl config new-key)"
    """
    click.echo(new_key())
