"""``pushctl events``: read the event log."""

from __future__ import annotations

import json
from datetime import datetime

import click

from worker import events
from worker.cli.common import (
    _JSON,
    SINCE,
    _echo_json,
    _events_table,
    _out,
    cli,
)
from worker.db import session_scope


@cli.command("events")
@click.option("--job", "job_id", help="Only this job's events.")
@click.option("--registry", "registry_id", type=int, help="Only events about this registry.")
@click.option(
    "--type", "types", multiple=True, help="Only this type (repeatable), e.g. job.failed."
)
@click.option("--actor", help="Only this actor, exactly (e.g. operator:alice).")
@click.option("--since", type=SINCE, help="From then on.")
@click.option("--until", type=SINCE, help="Before then.")
@click.option(
    "--limit",
    type=int,
    default=500,
    show_default=True,
    help="At most this many, oldest first (narrow with --since).",
)
@_JSON
@click.option("--jsonl", is_flag=True, help="Print one JSON object per line.")
def events_command(
    job_id: str | None,
    registry_id: int | None,
    types: tuple[str, ...],
    actor: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    as_json: bool,
    jsonl: bool,
) -> None:
    """Read the event log, oldest first.

    \b
    Example:
      pushctl events --type job.failed --type fallback.applied --since 1d --jsonl
    """
    if as_json and jsonl:
        raise click.UsageError("give --json or --jsonl, not both")
    with session_scope() as session:
        rows = events.select_events(
            session,
            job_id=job_id,
            registry_id=registry_id,
            types=list(types) or None,
            actor=actor,
            since=since,
            until=until,
            limit=limit,
        )
    if as_json:
        _echo_json([events.event_fields(row) for row in rows])
    elif jsonl:
        for row in rows:
            click.echo(json.dumps(events.event_fields(row), default=str))
    else:
        _out().print(_events_table(rows))
