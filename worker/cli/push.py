"""``pushctl push``: queue a push, and with ``--wait`` follow its events until it ends."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click
from rich.text import Text

from worker import producer
from worker.cli.common import (
    _JSON,
    FALLBACK,
    ID,
    SECONDS,
    TEXT,
    _echo_json,
    _fail,
    _out,
    cli,
    event_line,
    exit_code_for,
    job_fields,
)
from worker.core.text import printable
from worker.jobs import get_job
from worker.store import events, queries
from worker.store.db import read_scope
from worker.store.models import Event, JobStatus

WAIT_TIMEOUT_EXIT = 124
INTERRUPTED_EXIT = 130  # the shell's own code for Ctrl-C
POLL_SECONDS = 0.3


@dataclass
class _Follow:
    """What ``push --wait`` has seen so far."""

    job_id: str
    last_id: int = 0
    job: dict[str, Any] | None = None

    def poll(self) -> list[Event]:
        with read_scope() as session:
            rows = queries.select_events(session, job_id=self.job_id, after_id=self.last_id)
            self.job = job_fields(get_job(session, self.job_id))
        if rows:
            self.last_id = rows[-1].id
        return rows

    @property
    def final(self) -> bool:
        return self.job is not None and JobStatus(self.job["status"]).is_final

    def state(self) -> str:
        job = self.job or {}
        step = f", step {job['current_step']}" if job.get("current_step") else ""
        return f"job {self.job_id}: {job.get('status', 'queued')}{step}"


def _follow(
    follow: _Follow,
    timeout: float | None,
    show: Callable[[Event], None],
    on_state: Callable[[str], None],
) -> bool:
    """Poll until the job is final (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        for row in follow.poll():
            show(row)
        on_state(follow.state())
        if follow.final:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)


def _wait_for(job_id: str, timeout: float | None, as_json: bool) -> None:
    follow = _Follow(job_id)
    seen: list[dict[str, Any]] = []
    console = _out()
    try:
        if as_json:
            finished = _follow(
                follow, timeout, lambda r: seen.append(queries.event_fields(r)), lambda _s: None
            )
        elif console.is_terminal:
            with console.status(follow.state()) as status:
                finished = _follow(
                    follow,
                    timeout,
                    lambda r: console.print(event_line(r)),
                    lambda s: status.update(Text(s)),
                )
        else:
            finished = _follow(
                follow, timeout, lambda r: click.echo(event_line(r).plain), lambda _s: None
            )
    except KeyboardInterrupt:
        _fail(f"stopped following; the job goes on: `pushctl jobs show {job_id}`", INTERRUPTED_EXIT)
    if as_json:
        # "job_id" first, as without --wait, so scripts read the id the same way either way.
        _echo_json({"job_id": job_id, "job": follow.job, "events": seen})
    _finish_wait(follow, finished, timeout)


def _finish_wait(follow: _Follow, finished: bool, timeout: float | None) -> None:
    job = follow.job or {}
    if not finished:
        _fail(
            f"job {follow.job_id} is still {job.get('status')} after {timeout:g} s; "
            f"follow it with `pushctl jobs show {follow.job_id}`",
            WAIT_TIMEOUT_EXIT,
        )
    if job.get("status") == JobStatus.SUCCEEDED:
        click.echo(
            printable(
                f"job {follow.job_id} succeeded: {job.get('pushed_reference')}@{job.get('digest')}"
            ),
            err=True,
        )
        return
    message = job.get("error_message") or f"the job is {job.get('status')}"
    _fail(
        f"error: job {follow.job_id} {job.get('status')}: {message}",
        exit_code_for(job.get("error_code")),
    )


@cli.command("push")
@click.argument("source", type=TEXT, required=False)
@click.option(
    "--from",
    "source_spec",
    type=TEXT,
    metavar="SPEC",
    help="Copy from elsewhere instead of a local image: registry:ID/REPO:TAG (or @sha256:...), "
    "oci-layout:PATH, docker-archive:PATH (docs/sources.md).",
)
@click.option("--registry", "registry_id", type=ID, required=True, help="Registry id to push to.")
@click.option(
    "--repository", type=TEXT, required=True, help="Repository path in the registry, e.g. team/app."
)
@click.option("--tag", type=TEXT, required=True, help="Tag to push.")
@click.option("--fallback", type=FALLBACK, help="Registry ids to try if credentials are refused.")
@click.option(
    "--idempotency-key",
    type=TEXT,
    help="The same key returns the first job instead of a new one.",
)
@click.option("--requested-by", type=TEXT, help="Who asks [operator:$USER].")
@click.option("--docker-host", type=TEXT, help="The named Docker host whose engine holds SOURCE.")
@click.option("--wait", is_flag=True, help="Follow the job's events until it ends.")
@click.option(
    "--deadline",
    type=SECONDS,
    help="Seconds the job may wait for the registry's limits before it fails "
    "[PUSHWORKER_FLOW_DEADLINE].",
)
@click.option(
    "--timeout",
    type=SECONDS,
    help="With --wait: give up after SECONDS (exit 124).",
)
@_JSON
def push(
    source: str | None,
    source_spec: str | None,
    registry_id: int,
    repository: str,
    tag: str,
    fallback: list[int] | None,
    idempotency_key: str | None,
    requested_by: str | None,
    docker_host: str | None,
    wait: bool,
    deadline: float | None,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Queue a push of local image SOURCE (or of --from SPEC) to a registry; --wait follows it
    to the end.

    \b
    Example:
      pushctl push app:1.4 --registry 3 --repository team/app --tag 1.4 --wait --timeout 600
      pushctl push --from registry:3/team/app@sha256:... --registry 5 --repository team/app \\
          --tag 1.4 --wait
    """
    if timeout is not None and not wait:
        raise click.UsageError("--timeout needs --wait")
    if (source is None) == (source_spec is None):
        raise click.UsageError("give either SOURCE (a local image) or --from SPEC, not both")
    job_id = producer.enqueue_push(
        source_image=source,
        source=source_spec,
        registry_id=registry_id,
        repository=repository,
        tag=tag,
        requested_by=requested_by or events.operator_actor(),
        fallback=fallback,
        idempotency_key=idempotency_key,
        docker_host=docker_host,
        deadline=deadline,
    )
    if not wait:
        if as_json:
            _echo_json({"job_id": job_id})
        else:
            click.echo(job_id)
        return
    if not as_json:
        click.echo(f"job {job_id} queued", err=True)
    _wait_for(job_id, timeout, as_json)
