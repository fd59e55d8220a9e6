"""``pushctl jobs``: list, show, retry and cancel push jobs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click
from rich.text import Text

from worker import producer
from worker.cli.common import (
    _JSON,
    ID,
    LIMIT,
    SINCE,
    TEXT,
    _echo_json,
    _events_table,
    _key_values,
    _out,
    _table,
    cli,
    job_fields,
)
from worker.core.errors import PushWorkerError
from worker.core.text import printable
from worker.jobs import cancel_job, get_job, list_jobs, retry_job
from worker.store import events, queries
from worker.store.db import read_scope, session_scope
from worker.store.models import JobStatus


@cli.group()
def jobs() -> None:
    """Push jobs: list, show, retry, cancel.

    \b
    Example:
      pushctl jobs list --status failed --since 2h
    """


_STATUSES = click.Choice([status.value for status in JobStatus])


def _job_row(job: dict[str, Any]) -> list[object]:
    requested, effective = job["requested_registry_id"], job["effective_registry_id"]
    registries = str(requested) if requested == effective else f"{requested}->{effective}"
    target = f"{job['source_image']} -> {job['repository']}:{job['tag']}"
    created = job["created_at"][:19].replace("T", " ")
    return [
        job["id"],
        job["status"],
        created,
        registries,
        target,
        job["current_step"],
        job["attempt"],
        job["error_code"],
    ]


@jobs.command("list")
@click.option("--status", type=_STATUSES, help="Only jobs in this status.")
@click.option("--registry", "registry_id", type=ID, help="Only jobs requested for this registry.")
@click.option("--since", type=SINCE, help="Only jobs created since then.")
@click.option(
    "--limit", type=LIMIT, default=50, show_default=True, help="At most this many, newest first."
)
@_JSON
def jobs_list(
    status: str | None, registry_id: int | None, since: datetime | None, limit: int, as_json: bool
) -> None:
    """List jobs, newest first.

    \b
    Example:
      pushctl jobs list --status failed --registry 3 --since 2h
    """
    with read_scope() as session:
        rows = [
            job_fields(job)
            for job in list_jobs(
                session, status=status, registry_id=registry_id, since=since, limit=limit
            )
        ]
    if as_json:
        _echo_json(rows)
        return
    columns = ("id", "status", "created (UTC)", "registry", "image", "step", "try", "error")
    _out().print(_table(columns, (_job_row(job) for job in rows)))


@jobs.command("show")
@click.argument("job_id", metavar="JOB", type=TEXT)
@_JSON
def jobs_show(job_id: str, as_json: bool) -> None:
    """Show a job and its event timeline.

    \b
    Example:
      pushctl jobs show 5f0c...
    """
    with read_scope() as session:
        job = job_fields(get_job(session, job_id))
        rows = queries.select_events(session, job_id=job_id)
        timeline = [queries.event_fields(row) for row in rows]
    waiting = _waiting(job, timeline)
    if as_json:
        _echo_json({"job": job, "events": timeline, "waiting": waiting})
        return
    console = _out()
    console.print(_key_values(job))
    if waiting is not None:
        reason = printable(str(waiting["reason"]))
        console.print(Text(f"waiting: {reason} (since {waiting['since']})"), soft_wrap=True)
    console.print(_events_table(rows, with_job=False))


def _waiting(job: dict[str, Any], timeline: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Why an unfinished job waits (flow control): its last event is a ``step.waiting``."""
    if job["status"] in ("succeeded", "failed", "cancelled") or not timeline:
        return None
    last = timeline[-1]
    if last["type"] != "step.waiting":
        return None
    return {"reason": last["payload"].get("reason"), "since": last["time"], "step": last["step"]}


def _retry_one(job_id: str, reason: str, actor: str) -> str:
    with session_scope() as session:
        job = retry_job(session, job_id, actor=actor, reason=reason)
        registry_id, attempt = job.requested_registry_id, job.attempt
    # Published after the commit, so the worker finds the job queued (the producer's own order).
    published = producer.publish(job_id, registry_id)
    note = "" if published else " (broker unreachable: the reconcile task will publish it)"
    return f"job {job_id} queued again as attempt {attempt} on registry {registry_id}{note}"


@jobs.command("retry")
@click.argument("job_id", metavar="[JOB]", required=False, type=TEXT)
@click.option("--status", type=_STATUSES, help="Bulk: jobs in this status [failed].")
@click.option("--registry", "registry_id", type=ID, help="Bulk: jobs requested for this registry.")
@click.option("--since", type=SINCE, help="Bulk: jobs created since then.")
@click.option(
    "--limit", type=LIMIT, default=100, show_default=True, help="Bulk: at most this many."
)
@click.option("--reason", type=TEXT, required=True, help="Why (recorded in the event log).")
@click.option("--actor", type=TEXT, help="Who retries [operator:$USER].")
def jobs_retry(
    job_id: str | None,
    status: str | None,
    registry_id: int | None,
    since: datetime | None,
    limit: int,
    reason: str,
    actor: str | None,
) -> None:
    """Retry one failed or cancelled job, or every job a selection matches.

    Steps that already succeeded are skipped. Bulk selection defaults to --status failed.

    \b
    Example:
      pushctl jobs retry --registry 3 --since 2h --reason "password fixed"
    """
    bulk = status is not None or registry_id is not None or since is not None
    if job_id and bulk:
        raise click.UsageError(
            "name a JOB or select jobs with --status/--registry/--since, not both"
        )
    who = events.operator_actor(actor)
    if job_id:
        click.echo(printable(_retry_one(job_id, reason, who)))  # errors: via _Pushctl
        return
    if not bulk:
        raise click.UsageError(
            "name a JOB, or select jobs with --status, --registry and/or --since"
        )
    with read_scope() as session:
        selected = [
            job.id
            for job in list_jobs(
                session,
                status=status or JobStatus.FAILED.value,
                registry_id=registry_id,
                since=since,
                limit=limit,
            )
        ]
    _retry_many(selected, reason, who)


def _retry_many(job_ids: list[str], reason: str, actor: str) -> None:
    """One line per job; a job that cannot be retried does not stop the others."""
    errors: list[PushWorkerError] = []
    for job_id in job_ids:
        try:
            click.echo(printable(f"✓ {_retry_one(job_id, reason, actor)}"))
        except PushWorkerError as exc:
            errors.append(exc)
            click.echo(printable(f"✗ job {job_id}: {exc.message}"), err=True)
    click.echo(f"{len(job_ids) - len(errors)} of {len(job_ids)} selected job(s) retried", err=True)
    if errors:
        raise click.exceptions.Exit(errors[0].exit_code)


@jobs.command("cancel")
@click.argument("job_id", metavar="JOB", type=TEXT)
@click.option("--reason", type=TEXT, help="Why (recorded in the event log).")
@click.option("--actor", type=TEXT, help="Who cancels [operator:$USER].")
def jobs_cancel(job_id: str, reason: str | None, actor: str | None) -> None:
    """Cancel a queued or running job: steps not yet started are skipped.

    \b
    Example:
      pushctl jobs cancel 5f0c... --reason "wrong tag"
    """
    with session_scope() as session:
        job = cancel_job(session, job_id, actor=events.operator_actor(actor), reason=reason)
        status = job.status
    click.echo(printable(f"job {job_id} {status}"))
