"""``pushctl tokens``: API tokens (create, list, revoke). A token is printed once, at creation."""

from __future__ import annotations

import re
from datetime import datetime

import click

from worker.cli.common import (
    _JSON,
    FALLBACK,
    TEXT,
    _echo_json,
    _out,
    _table,
    _when,
    cli,
    parse_since,
)
from worker.core.text import printable
from worker.store import events
from worker.store.models import utcnow
from worker.tokens import ROLES, create_token, list_tokens, revoke_token


class ExpiresType(click.ParamType[datetime]):
    """``90d``, ``12h``, ``1w`` from now."""

    name = "90d|12h|1w"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        text = str(value).strip().lower()
        if not _DURATION.fullmatch(text):
            self.fail(f"{printable(value)!r} is not a duration such as 90d, 12h or 1w", param, ctx)
        now = utcnow()
        return now + (now - parse_since(text, now=now))


#: One or more of a number and a unit: 90d, 1w, 1d12h.
_DURATION = re.compile(r"(?:[0-9]{1,9}[smhdw])+")


@cli.group()
def tokens() -> None:
    """API tokens: create (printed once), list, revoke.

    \b
    Example:
      pushctl tokens create platform --role producer --registry 5 --expires 90d
    """


@tokens.command("create")
@click.argument("name", type=TEXT)
@click.option("--role", type=click.Choice(ROLES), required=True, help="What the token may do.")
@click.option("--registry", "registry_ids", type=FALLBACK, help="Producer: only these, e.g. 5,7.")
@click.option("--expires", type=ExpiresType(), help="Expires that long from now, e.g. 90d.")
@click.option("--actor", type=TEXT, help="Who creates it [operator:$USER].")
@_JSON
def tokens_create(
    name: str,
    role: str,
    registry_ids: list[int] | None,
    expires: datetime | None,
    actor: str | None,
    as_json: bool,
) -> None:
    """Create a token and print it, once: only a hash of it is kept.

    \b
    Example:
      pushctl tokens create ci --role producer --registry 5,7 --expires 90d
    """
    token, info = create_token(
        name, role, actor=events.operator_actor(actor), registry_ids=registry_ids,
        expires_at=expires,
    )  # fmt: skip
    if as_json:
        _echo_json({**info.to_dict(), "token": token})
        return
    click.echo(token)
    scope = f", registries {info.registry_ids}" if info.registry_ids is not None else ""
    until = f", expires {_when(info.expires_at)}" if info.expires_at else ""
    click.echo(
        printable(f"token {info.name} ({info.role}{scope}{until}): shown once, store it now"),
        err=True,
    )


@tokens.command("list")
@_JSON
def tokens_list(as_json: bool) -> None:
    """List tokens (never the tokens themselves).

    \b
    Example:
      pushctl tokens list --json
    """
    rows = list_tokens()
    if as_json:
        _echo_json([row.to_dict() for row in rows])
        return
    columns = ("name", "role", "state", "registries", "created (UTC)", "by", "expires", "last used")
    _out().print(
        _table(
            columns,
            (
                [
                    r.name,
                    r.role,
                    r.state,
                    ",".join(map(str, r.registry_ids)) if r.registry_ids is not None else "any",
                    _when(r.created_at),
                    r.created_by,
                    _when(r.expires_at),
                    _when(r.last_used_at),
                ]
                for r in rows
            ),
        )
    )


@tokens.command("revoke")
@click.argument("name", type=TEXT)
@click.option("--reason", type=TEXT, help="Why (recorded in the event log).")
@click.option("--actor", type=TEXT, help="Who revokes it [operator:$USER].")
def tokens_revoke(name: str, reason: str | None, actor: str | None) -> None:
    """Revoke a token: refused from the next request on.

    \b
    Example:
      pushctl tokens revoke ci --reason "leaked in a build log"
    """
    info = revoke_token(name, actor=events.operator_actor(actor), reason=reason)
    click.echo(printable(f"token {info.name} revoked at {_when(info.revoked_at)}"))


__all__ = ["tokens"]
