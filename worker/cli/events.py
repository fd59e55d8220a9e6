"""``pushctl events``: read the event log; ``verify`` its hash chain, ``export`` it, ``prune`` it.

``pushctl events [filters]`` (no subcommand) lists events, as it always did.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from worker.cli.common import (
    _JSON,
    DAYS,
    ID,
    LIMIT,
    SINCE,
    TEXT,
    _echo_json,
    _events_table,
    _out,
    cli,
)
from worker.core.errors import StorageError
from worker.core.text import printable
from worker.store import events, export, queries, retention, seals, verify
from worker.store.chain import OUTCOMES
from worker.store.db import read_scope

F = TypeVar("F", bound=Callable[..., Any])

#: Exit code of ``verify`` when the chain does not hold (the storage errors' code).
VERIFY_FAILED_EXIT = StorageError.exit_code


def _filters(command: F) -> F:
    """The filter options shared by the listing and ``export``."""
    options = [
        click.option("--job", "job_id", type=TEXT, help="Only this job's events."),
        click.option("--registry", "registry_id", type=ID, help="Only events about this registry."),
        click.option(
            "--repository", type=TEXT, help="Only events about this repository, e.g. team/myapp."
        ),
        click.option(
            "--type",
            "types",
            type=TEXT,
            multiple=True,
            help="Only this type (repeatable), e.g. job.failed.",
        ),
        click.option(
            "--outcome",
            "outcomes",
            multiple=True,
            type=click.Choice(OUTCOMES),
            help="Only this outcome (repeatable).",
        ),
        click.option("--actor", type=TEXT, help="Only this actor, exactly (e.g. operator:alice)."),
        click.option("--since", type=SINCE, help="From then on."),
        click.option("--until", type=SINCE, help="Before then."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _query(
    job_id: str | None = None,
    registry_id: int | None = None,
    repository: str | None = None,
    types: tuple[str, ...] = (),
    outcomes: tuple[str, ...] = (),
    actor: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> queries.EventQuery:
    return queries.EventQuery(
        job_id=job_id, registry_id=registry_id, repository=repository, types=list(types) or None,
        outcomes=list(outcomes) or None, actor=actor, since=since, until=until,
    )  # fmt: skip


@cli.group("events", invoke_without_command=True)
@_filters
@click.option(
    "--limit",
    type=LIMIT,
    default=500,
    show_default=True,
    help="At most this many, oldest first (narrow with --since).",
)
@_JSON
@click.option("--jsonl", is_flag=True, help="Print one JSON object per line.")
@click.pass_context
def events_command(
    ctx: click.Context, /, limit: int, as_json: bool, jsonl: bool, **filters: Any
) -> None:
    """Read the event log, oldest first; or verify, export or prune it.

    \b
    Example:
      pushctl events --type job.failed --type fallback.applied --since 1d --jsonl
      pushctl events --registry 5 --outcome failed --since 24h
      pushctl events verify
      pushctl events export --format csv --repository team/myapp --output pushes.csv
      pushctl events prune --older-than 365 --archive events-2025.jsonl
    """
    if ctx.invoked_subcommand is not None:
        return
    if as_json and jsonl:
        raise click.UsageError("give --json or --jsonl, not both")
    query = _query(**filters)
    with read_scope() as session:
        rows = list(session.scalars(query.select(limit=limit)))
    if as_json:
        _echo_json([queries.event_fields(row) for row in rows])
    elif jsonl:
        for row in rows:
            click.echo(json.dumps(queries.event_fields(row), default=str))
    else:
        _out().print(_events_table(rows))


def _anchor(text: str) -> tuple[str, int, str]:
    """``ID:HASH`` (an event) or ``seal:ID:HASH`` (a seal) -> (kind, id, hash)."""
    kind, rest = ("seal", text[5:]) if text.lower().startswith("seal:") else ("event", text)
    number, sep, digest = rest.partition(":")
    digest = digest.strip().lower()
    number = number.strip()
    if not sep or not (number.isascii() and number.isdigit()) or len(digest) != 64:
        raise click.BadParameter(
            f"{printable(text)!r} is not ID:SHA256 or seal:ID:SHA256 (as printed by "
            "`events verify`)"
        )
    return kind, int(number), digest


@events_command.command("verify")
@click.option(
    "--anchor",
    "anchors",
    multiple=True,
    metavar="[seal:]ID:HASH",
    help="A seal (seal:ID:HASH) or an event (ID:HASH) recorded earlier, as `verify` prints "
    "them: it must still be there with that hash. Repeatable.",
)
@click.option(
    "--archive",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Verify this retention archive (JSON lines) instead, against its checkpoint.",
)
@_JSON
def verify_command(anchors: tuple[str, ...], archive: Path | None, as_json: bool) -> None:
    """Check the hash chains of the whole event log and its seals; name the first event that
    was altered, removed or reordered.

    Exits 0 when the chains hold, 10 when they do not. Prints the latest seal (id and hash):
    kept somewhere else, it is an anchor for a later `verify --anchor`, which then also
    catches newest events cut off together with the newest seals.

    \b
    Example:
      pushctl events verify --anchor "$(cat /secure/last-seal)"   # seal:ID:HASH
    """
    if archive is not None:
        report = verify.verify_archive(archive)
    else:
        parsed = [_anchor(text) for text in anchors]
        report = verify.verify(
            anchors={n: h for kind, n, h in parsed if kind == "event"},
            seal_anchors={n: h for kind, n, h in parsed if kind == "seal"},
        )
    if as_json:
        _echo_json(report.to_dict())
    else:
        _print_report(report, archive)
    if not report.ok:
        raise click.exceptions.Exit(VERIFY_FAILED_EXIT)


def _print_report(report: verify.VerifyReport, archive: Path | None) -> None:
    what = printable(archive) if archive is not None else "event log"
    start = "the genesis"
    if report.checkpoint is not None and archive is None:
        start = (
            f"checkpoint {report.checkpoint['id']} "
            f"(events up to {report.checkpoint['last_event_id']} pruned)"
        )
    span = f"events {report.first_id}..{report.head_id}" if report.checked else "no events"
    chains = f" in {len(report.heads)} chain(s)" if report.heads else ""
    if report.ok:
        click.echo(f"ok: {what}: {report.checked} {span}{chains}, chained from {start}")
    else:
        click.echo(f"FAILED: {what}: {report.problem_count} problem(s) in {report.checked} {span}")
        first = report.first_problem
        if first is not None:
            # The messages name stored types and values: escaped like every other output.
            click.echo(f"first: {printable(first.message)}")
        for problem in report.problems[1:]:
            click.echo(f"  also: {printable(problem.message)}")
        if report.problem_count > len(report.problems):
            click.echo(f"  ... and {report.problem_count - len(report.problems)} more")
    if report.seal is not None:
        click.echo(
            f"seal: seal:{report.seal['id']}:{report.seal['hash']} "
            f"(signature {report.seal['signature']})"
        )
    if report.head_id is not None:
        click.echo(f"head: {report.head_id}:{report.head_hash}")


@events_command.command("seal")
@click.option("--actor", type=TEXT, help="Who seals (default: operator:<login>).")
@_JSON
def seal_command(actor: str | None, as_json: bool) -> None:
    """Seal the heads of the log's chains now (beat does it every PUSHWORKER_SEAL_EVERY
    seconds); nothing is written when no chain moved since the latest seal.

    Prints the seal as seal:ID:HASH, an anchor for `events verify --anchor`.

    \b
    Example:
      pushctl events seal --json
    """
    report = seals.seal(actor=events.operator_actor(actor))
    if as_json:
        _echo_json(report.to_dict())
    elif report.id is None:
        click.echo("nothing to seal: the event log is empty")
    else:
        state = "sealed" if report.created else "unchanged since"
        click.echo(f"{state}: seal:{report.id}:{report.hash} ({report.lanes} chains)")


@events_command.command("export")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(list(export.EXPORT_FORMATS)),
    default="jsonl",
    show_default=True,
    help="JSON lines (one event per line), or CSV with the payload as JSON in one column.",
)
@_filters
@click.option(
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write here instead of standard output.",
)
def export_command(fmt: str, output: Path | None, **filters: Any) -> None:
    """Write every matching event, oldest first, with its hashes; streamed, any size.

    \b
    Example:
      pushctl events export --format jsonl --registry 5 --since 30d --output registry5.jsonl
    """
    query = _query(**filters)
    if output is None:
        count = export.export(sys.stdout, fmt, query)
        sys.stdout.flush()
    else:
        with output.open("w", encoding="utf-8", newline="") as out:
            count = export.export(out, fmt, query)
    click.echo(f"exported {count} events", err=True)


@events_command.command("prune")
@click.option(
    "--older-than",
    "older_than",
    type=DAYS,
    required=True,
    metavar="DAYS",
    help="Remove the events older than this many days.",
)
@click.option(
    "--archive",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write them to this new JSON-lines file first (never overwritten).",
)
@click.option("--discard", is_flag=True, help="Remove them without an archive, on purpose.")
@click.option("--actor", type=TEXT, help="Who prunes (default: operator:<login>).")
@_JSON
def prune_command(
    older_than: float, archive: Path | None, discard: bool, actor: str | None, as_json: bool
) -> None:
    """Retention: remove the oldest events, leaving a checkpoint so that `verify` still passes.

    The pruned events' chain is verified first; they are archived (JSON lines, the export
    format), then in one transaction a checkpoint is written, they are deleted and an
    events.pruned event records it all.

    \b
    Example:
      pushctl events prune --older-than 365 --archive /backup/events-2025.jsonl
    """
    if (archive is None) == (not discard):
        raise click.UsageError("give --archive FILE, or --discard to remove without an archive")
    report = retention.prune(
        older_than_days=older_than, archive=archive, actor=events.operator_actor(actor)
    )
    if as_json:
        _echo_json(report.to_dict())
    elif report.count == 0:
        click.echo(f"nothing to prune: no event older than {report.cutoff:%Y-%m-%d %H:%M:%SZ}")
    else:
        where = f" to {report.archived_to}" if report.archived_to else " (discarded)"
        click.echo(
            f"pruned {report.count} events ({report.first_event_id}..{report.last_event_id}){where}"
            f"; checkpoint at {report.last_event_id}:{report.last_hash}; "
            f"recorded as event {report.event_id}"
        )
