"""Reconcile: publish jobs that were committed but whose chain never reached a worker.

``enqueue_push`` (and ``pushctl jobs retry``) commit the job first and publish after; when the
broker is away at that moment the job stays ``queued`` with no message anywhere. ``reconcile``
finds such jobs (status ``queued``, no step event since their last ``job.enqueued`` or
``job.retried``) once they are older than a grace period, and publishes their chain again, with a
``job.republished`` event.

A ``running`` job can stall the same way: a broker restarted without persistence drops the
message of its next step. Such a job (no live claim on any step, no event for a grace period)
is republished too; the steps that already succeeded are skipped, so the chain resumes where it
stopped.

Not in a tight loop: the ``job.republished`` event marks the time, and the next republish of the
same job waits for a longer time: the grace period doubled for each republish since the job was
enqueued or retried (60 s, 120 s, 240 s, ... capped at 32 times the grace period). A job whose
first message is merely waiting in a long queue therefore gets a few duplicates at most, and a
duplicate is harmless: each step claims its work, so a second delivery is a ``step.skipped``.

As with ``job.enqueued``, the event is committed first and the message published after it, so a
worker always finds the event before the steps it causes. If the broker refuses the message,
``worker.producer.publish`` logs ``job.publish_deferred``, the run stops there (the broker is away
for every job), and a later run tries again once the job's wait has passed.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from worker import producer
from worker.core.errors import EventConflict
from worker.core.logs import get_logger
from worker.core.settings import get_settings
from worker.engine.liveness import claim_is_dead, owner_is_dead
from worker.store import events, queries
from worker.store.db import session_scope
from worker.store.models import Event, JobStatus, PushJob, StepRun, StepStatus, utcnow

log = get_logger("pushworker.reconcile")

#: The wait before a republish doubles per earlier republish, at most this many times.
MAX_DOUBLINGS = 5
#: Jobs looked at per run, oldest first; the next run takes the rest.
BATCH = 200
REPUBLISHED = "job.republished"
_MARKERS = ("job.enqueued", "job.retried")
_STARTED = ("step.started", "step.skipped")

Publisher = Callable[[str, int], bool]


@dataclass(frozen=True)
class Due:
    """A queued job whose chain should be published again, and why."""

    job_id: str
    registry_id: int
    attempt: int
    last_seq: int
    reason: str


@dataclass
class ReconcileReport:
    republished: list[str] = field(default_factory=list)
    #: Jobs whose ``job.republished`` is recorded but whose message the broker refused (the run
    #: stopped there; a later run tries again once the job's wait has passed).
    deferred: list[str] = field(default_factory=list)
    #: Queued jobs looked at that were not due (still within their wait, or started meanwhile).
    waiting: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"republished": self.republished, "deferred": self.deferred, "waiting": self.waiting}


def reconcile(
    *,
    grace: float | None = None,
    now: datetime | None = None,
    publish: Publisher | None = None,
    actor: str | None = None,
    limit: int = BATCH,
) -> ReconcileReport:
    """Republish every queued job that never started within its wait; see the module's text.

    ``publish(job_id, registry_id)`` sends the chain and says whether the broker took it
    (``worker.producer.publish`` by default). ``now`` is for tests.
    """
    grace = get_settings().reconcile_grace if grace is None else grace
    candidates = [(job_id, None) for job_id in _candidates(now or utcnow(), grace, limit)]
    report = _republish(candidates, grace, now, publish, actor)
    if report.republished or report.deferred:
        log.info("reconcile.done", **report.to_dict())
    return report


def take_over_dead_claims(
    *, host: str | None = None, publish: Publisher | None = None, actor: str | None = None
) -> ReconcileReport:
    """Republish, now, every running job whose step was claimed by a process of this host that
    is gone (the worker was SIGKILLed whole, OOM-killed, or the machine rebooted).

    Called when a worker starts: the dead worker's messages are invisible in Redis until the
    visibility timeout (about 40 minutes) and beat's reconcile waits a grace period, but a
    process of the same host can tell at once that the claim's owner no longer runs
    (``worker.engine.liveness``). The republished chain skips the steps that succeeded and takes
    the dead claim, so the job resumes where it stopped; a message of the dead worker that comes
    back later finds the step done and records a skip. (RabbitMQ redelivers those messages as
    soon as the dead worker's connection drops: the take-over then sends a second copy, and the
    claim lets one of them act.)
    """
    host = host or socket.gethostname()
    candidates = [
        (job_id, f"taken over at worker start: {owner} died holding step {step}")
        for job_id, owner, step in _dead_claims_of(host)
    ]
    report = _republish(candidates, 0.0, None, publish, actor)
    if report.republished or report.deferred:
        log.info("reconcile.took_over", host=host, **report.to_dict())
    return report


def _republish(
    candidates: Sequence[tuple[str, str | None]],
    grace: float,
    now: datetime | None,
    publish: Publisher | None,
    actor: str | None,
) -> ReconcileReport:
    """For each ``(job id, reason)``: record ``job.republished`` if the job is due (the reason
    given, or the one its state explains), then publish its chain."""
    send = publish or producer.publish
    who = actor or events.worker_actor()
    report = ReconcileReport()
    for job_id, reason in candidates:
        try:
            due = _record(job_id, now or utcnow(), grace, who, reason=reason)
        except EventConflict:
            # Another reconcile, or a worker starting the job, got there first: nothing to do.
            report.waiting += 1
            continue
        if due is None:
            report.waiting += 1
            continue
        # After the commit, as enqueue_push does: the worker finds the event before the message.
        if not send(job_id, due.registry_id):
            report.deferred.append(job_id)
            log.warning("reconcile.deferred", job_id=job_id, reason="the broker is away")
            break  # it is away for every job: the next run tries again
        report.republished.append(job_id)
    return report


def _dead_claims_of(host: str) -> list[tuple[str, str, str]]:
    """``(job id, owner, step)`` of the running claims of jobs still running whose owner was a
    process of ``host`` that is gone; one per job."""
    with session_scope() as session:
        rows = session.execute(
            select(StepRun.job_id, StepRun.owner, StepRun.step)
            .join(PushJob, PushJob.id == StepRun.job_id)
            .where(
                StepRun.status == StepStatus.RUNNING.value,
                StepRun.owner.startswith(f"worker:{host}:", autoescape=True),
                PushJob.status == JobStatus.RUNNING.value,
            )
        ).all()
    dead: dict[str, tuple[str, str, str]] = {}
    for job_id, owner, step in rows:
        if owner_is_dead(owner):
            dead.setdefault(job_id, (job_id, owner, step))
    return list(dead.values())


def _record(
    job_id: str, now: datetime, grace: float, actor: str, *, reason: str | None = None
) -> Due | None:
    """In one transaction: decide whether the job is due, and if so append ``job.republished``."""
    with session_scope() as session:
        due = _due(session, job_id, now, grace)
        if due is None:
            return None
        row = events.append(
            session, stream=events.job_stream(job_id), type=REPUBLISHED, actor=actor,
            job_id=job_id, registry_id=due.registry_id, attempt=due.attempt,
            payload={"reason": reason or due.reason, "job_attempt": due.attempt},
        )  # fmt: skip
        if row.seq != due.last_seq + 1:  # something was appended since _due read the stream
            raise EventConflict(f"job {job_id} changed while it was reconciled")
        return due


def _candidates(now: datetime, grace: float, limit: int) -> list[str]:
    # A job created less than one grace period ago cannot be due: its marker is younger still.
    with session_scope() as session:
        query = (
            select(PushJob.id)
            .where(
                PushJob.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]),
                PushJob.created_at <= now - timedelta(seconds=grace),
            )
            .order_by(PushJob.created_at)
            .limit(limit)
        )
        return list(session.scalars(query))


def _due(session: Session, job_id: str, now: datetime, grace: float) -> Due | None:
    job = session.get(PushJob, job_id)
    if job is None:
        return None
    if job.status == JobStatus.RUNNING:
        return _stalled(session, job, now, grace)
    if job.status != JobStatus.QUEUED:
        return None
    stream = events.job_stream(job_id)
    last_seq = session.scalar(select(func.max(Event.seq)).where(Event.stream == stream)) or 0
    rows = queries.select_events(session, stream=stream, types=[*_MARKERS, *_STARTED, REPUBLISHED])
    start = max((i for i, row in enumerate(rows) if row.type in _MARKERS), default=None)
    since = rows[start + 1 :] if start is not None else rows
    if any(row.type in _STARTED for row in since):
        return None  # a worker got the chain; the job is on its way
    republished = [row for row in since if row.type == REPUBLISHED]
    marker = republished[-1] if republished else rows[start] if start is not None else None
    marked_at, marked_by = (marker.time, marker.type) if marker else (job.created_at, "creation")
    wait = grace * 2 ** min(len(republished), MAX_DOUBLINGS)
    elapsed = (now - marked_at).total_seconds()
    if elapsed < wait:
        return None
    reason = (
        f"queued and not started {elapsed:.0f} s after {marked_by} "
        f"(wait {wait:g} s); republish {len(republished) + 1}"
    )
    return Due(job_id, job.effective_registry_id, job.attempt, last_seq, reason)


def _stalled(session: Session, job: PushJob, now: datetime, grace: float) -> Due | None:
    """A running job with no live claim and no event for its wait: its next message was lost."""
    claims = session.scalars(
        select(StepRun).where(StepRun.job_id == job.id, StepRun.status == StepStatus.RUNNING.value)
    )
    if any(not claim_is_dead(claim, now) for claim in claims):
        return None  # a worker is on it
    stream = events.job_stream(job.id)
    rows = queries.select_events(session, stream=stream)
    if not rows:
        return None
    republished = 0
    for row in reversed(rows):
        if row.type != REPUBLISHED:
            break
        republished += 1
    wait = grace * 2 ** min(republished, MAX_DOUBLINGS)
    elapsed = (now - rows[-1].time).total_seconds()
    if elapsed < wait:
        return None
    reason = (
        f"running with no live claim and no event for {elapsed:.0f} s "
        f"(wait {wait:g} s); republish {republished + 1}"
    )
    return Due(job.id, job.effective_registry_id, job.attempt, rows[-1].seq, reason)
