"""The SQL of ``worker.engine.pipeline``'s hot path: step claims (``step_runs``) and the job state
changes around them (the job runs, the job succeeded).

Every step of every job runs these, twice per step, so the statements are built once, here:
SQLAlchemy memoises a statement's cache key on the statement object, and a statement built per
call pays for that key (a walk of its whole tree) on every execution. Where the ORM's identity
map and change tracking buy nothing (a row written once per phase), they are Core statements.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, func, select, text, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from worker.core.errors import EventConflict
from worker.store.events import Guard
from worker.store.models import JobStatus, PushJob, Registry, StepRun, StepStatus, utcnow

_RUNS = cast(Table, StepRun.__table__)

#: The job, its claim on the step (if any) and the registry, in one round trip.
_FOR_CLAIM = (
    select(PushJob, StepRun, Registry)
    .select_from(PushJob)
    .outerjoin(
        StepRun,
        and_(
            StepRun.job_id == PushJob.id,
            StepRun.step == bindparam("step"),
            StepRun.registry_id == bindparam("registry_id"),
        ),
    )
    .outerjoin(Registry, Registry.id == bindparam("registry_id"))
    .where(PushJob.id == bindparam("job_id"))
)

_JOB = select(PushJob).where(PushJob.id == bindparam("job_id"))
#: The job, its row locked until the transaction ends (PostgreSQL; SQLite's write transactions
#: hold the database's lock from their start).
_JOB_LOCKED = _JOB.with_for_update()
_JOBS = cast(Table, PushJob.__table__)
_NOW_TYPE = _JOBS.c.started_at.type

#: The statuses a job ends in. A step marks its job running or failed only while it is in none
#: of them: the step read the job without a lock, and an operator's cancel committed since then
#: must stand, not be overwritten.
_FINAL = tuple(status.value for status in JobStatus if status.is_final)
#: The same condition in the text statements (the enum's own values, no input).
_NOT_FINAL_SQL = "status NOT IN (" + ", ".join(f"'{value}'" for value in _FINAL) + ")"

#: A step starts: the job runs (since the first step that started), at this step; no row when
#: the job ended meanwhile.
_MARK_RUNNING = (
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("job_id"), _JOBS.c.status.not_in(_FINAL))
    .values(
        status=JobStatus.RUNNING.value,
        started_at=func.coalesce(
            _JOBS.c.started_at, bindparam("now", type_=_JOBS.c.started_at.type)
        ),
        current_step=bindparam("step"),
        updated_at=bindparam("now"),
    )
    .returning(_JOBS.c.id)
)

#: A job fails; no row when it ended after it was read (an operator's cancel stands).
_MARK_FAILED = (
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("job_id"), _JOBS.c.status.not_in(_FINAL))
    .values(
        status=JobStatus.FAILED.value,
        error_code=bindparam("code"),
        error_message=bindparam("message"),
        finished_at=bindparam("now", type_=_NOW_TYPE),
        updated_at=bindparam("now", type_=_NOW_TYPE),
    )
    .returning(_JOBS.c.id)
)

#: The last step succeeded; an operator's cancel that came first stands.
_MARK_SUCCEEDED = (
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("job_id"), _JOBS.c.status != JobStatus.CANCELLED.value)
    .values(
        status=JobStatus.SUCCEEDED.value,
        digest=bindparam("digest"),
        pushed_reference=bindparam("reference"),
        error_code=None,
        error_message=None,
        current_step=None,
        finished_at=bindparam("now"),
        updated_at=bindparam("now"),
    )
    .returning(_JOBS.c.id)
)

#: A first claim that loses a race inserts nothing (no exception, no savepoint to roll back),
#: and returns no row: what the drivers report as ``rowcount`` here differs, RETURNING does not.
#: Text, in the one spelling SQLite and PostgreSQL share: the dialects' ``insert()`` with
#: ``on_conflict_do_nothing()`` has no cache key, so SQLAlchemy compiled it anew for every claim
#: (0.1-0.2 ms each, four a job). The column list and types come from the model.
_COLUMNS = [column.name for column in _RUNS.columns]


def _insert_claim_sql(prefix: str = "") -> str:
    """The first claim's insert, its values bound as ``:<prefix><column>``."""
    return (
        # The model's own table and column names; every value is bound.
        f"INSERT INTO {_RUNS.name} ({', '.join(_COLUMNS)}) "  # noqa: S608
        f"VALUES ({', '.join(':' + prefix + name for name in _COLUMNS)}) "
        f"ON CONFLICT DO NOTHING RETURNING {_RUNS.c.attempts.name}"
    )


_INSERT_CLAIM_SQL = _insert_claim_sql()


def _claim_statement(sql: str) -> Any:
    """``sql`` with the claim row's values bound as the model types them, returning the try."""
    typed = (bindparam(c.name, type_=c.type) for c in _RUNS.columns)
    return text(sql).bindparams(*typed).columns(_RUNS.c.attempts)


_INSERT_CLAIM = _claim_statement(_INSERT_CLAIM_SQL)
#: PostgreSQL: a first claim, the job marked running and the step's ``step.started`` appended in
#: one statement (``append_guarded``): the claim and the job's row change first (the guard reads
#: both, so both are made before the append takes its lane's lock), and only when the claim was
#: inserted. Its values are the claim's, bound as ``c_<column>`` (the append's are not renamed).
FIRST_CLAIM = Guard(
    "SELECT claim.attempts, job.marked FROM claim "
    "CROSS JOIN (SELECT count(*) AS marked FROM marked) AS job",
    tuple(bindparam("c_" + column.name, type_=column.type) for column in _RUNS.columns),
    ctes=(
        # The model's own table and column names; every value is bound.
        f"claim AS ({_insert_claim_sql('c_')}), "  # noqa: S608
        f"marked AS (UPDATE {_JOBS.name} SET status = :c_running, "
        "started_at = coalesce(started_at, :c_updated_at), current_step = :c_step, "
        "updated_at = :c_updated_at WHERE id = :c_job_id AND EXISTS (SELECT 1 FROM claim) "
        f"AND {_NOT_FINAL_SQL} RETURNING 1)"
    ),
)


def _finish(*, with_result: bool) -> Any:
    values: dict[str, Any] = {
        "status": bindparam("status"), "owner": None, "lease_expires_at": None,
        "updated_at": bindparam("now"),
    }  # fmt: skip
    if with_result:
        values["result"] = bindparam("result")
    return (
        update(_RUNS)
        .where(
            _RUNS.c.job_id == bindparam("k_job_id"),
            _RUNS.c.step == bindparam("k_step"),
            _RUNS.c.registry_id == bindparam("k_registry_id"),
        )
        .values(**values)
        .returning(_RUNS.c.attempts)
    )


#: Ends a claim (with the step's result, or keeping the last one), returning its try number.
_FINISH_WITH_RESULT = _finish(with_result=True)
_FINISH_KEEPING_RESULT = _finish(with_result=False)
#: The same with the step's result, returning the job's status as well: a step's success reads
#: it in the same round trip (whether an operator cancelled the job while the step ran).
_FINISH_WITH_STATUS = _FINISH_WITH_RESULT.returning(
    select(_JOBS.c.status).where(_JOBS.c.id == bindparam("k_job_id")).scalar_subquery()
)


#: A step's success ended its claim, in the statement that records it (``append_guarded``): the
#: claim finished with the step's result when it is still the try that ran (``k_attempts``: a
#: claim taken over meanwhile is left to ``finish_claim_with_status``), returning that try and
#: the job's status. Text, in the spelling SQLite and PostgreSQL share; the names are the
#: model's.
SUCCEEDED_CLAIM = Guard(
    f"UPDATE {_RUNS.name} SET status = :status, owner = NULL, lease_expires_at = NULL, "  # noqa: S608
    "result = :result, updated_at = :now WHERE job_id = :k_job_id AND step = :k_step "
    "AND registry_id = :k_registry_id AND attempts = :k_attempts "
    f"RETURNING attempts, (SELECT status FROM {_JOBS.name} WHERE id = :k_job_id) AS job_status",
    (
        bindparam("status", type_=_RUNS.c.status.type),
        bindparam("result", type_=_RUNS.c.result.type),
        bindparam("now", type_=_RUNS.c.updated_at.type),
    ),
)

#: PostgreSQL: the last step's success, ``SUCCEEDED_CLAIM`` and the job marked succeeded (unless
#: an operator's cancel came first, as ``_MARK_SUCCEEDED``) before the step's event is appended
#: (``append_guarded``; the guard reads the job's change, so it is made before the append takes
#: its lane's lock). ``marked``: 1 when the job was marked succeeded, else 0.
LAST_SUCCEEDED_CLAIM = Guard(
    "SELECT finished.attempts, finished.job_status, job.marked FROM finished "
    "CROSS JOIN (SELECT count(*) AS marked FROM marked) AS job",
    (*SUCCEEDED_CLAIM.binds, bindparam("k_digest"), bindparam("k_reference")),
    ctes=(
        # The model's own table and column names; every value is bound.
        f"finished AS ({SUCCEEDED_CLAIM.sql}), "  # noqa: S608
        f"marked AS (UPDATE {_JOBS.name} SET status = :k_succeeded, digest = :k_digest, "
        "pushed_reference = :k_reference, error_code = NULL, error_message = NULL, "
        "current_step = NULL, finished_at = :now, updated_at = :now "
        "WHERE id = :k_job_id AND status <> :k_cancelled AND EXISTS (SELECT 1 FROM finished) "
        "RETURNING 1)"
    ),
)


def succeeded_claim_params(
    job_id: str, step: str, registry_id: int, tries: int, result: dict[str, Any]
) -> dict[str, Any]:
    """``SUCCEEDED_CLAIM``'s values for try ``tries`` of a step that succeeded with ``result``."""
    params = _finish_params(job_id, step, registry_id, StepStatus.SUCCEEDED, result)
    return {**params, "k_attempts": tries}


def last_succeeded_claim_params(
    job_id: str, step: str, registry_id: int, tries: int, result: dict[str, Any]
) -> dict[str, Any]:
    """``LAST_SUCCEEDED_CLAIM``'s values: ``SUCCEEDED_CLAIM``'s and the job's digest and
    reference (``result``'s)."""
    return {
        **succeeded_claim_params(job_id, step, registry_id, tries, result),
        "k_digest": result.get("digest"), "k_reference": result.get("reference"),
        "k_succeeded": JobStatus.SUCCEEDED.value, "k_cancelled": JobStatus.CANCELLED.value,
    }  # fmt: skip


@dataclass(frozen=True)
class ClaimView:
    job: PushJob | None
    run: StepRun | None
    registry: Registry | None


def load_for_claim(session: Session, job_id: str, step: str, registry_id: int) -> ClaimView:
    params = {"job_id": job_id, "step": step, "registry_id": registry_id}
    row = session.execute(_FOR_CLAIM, params).first()
    if row is None:
        return ClaimView(None, None, None)
    return ClaimView(job=row[0], run=row[1], registry=row[2])


def load_job(session: Session, job_id: str, *, lock: bool = False) -> PushJob | None:
    """The job; with ``lock``, its row locked until the transaction ends, so that what is
    decided from its status (an operator's cancel that came first stands) is not undone by a
    writer committing meanwhile."""
    statement = _JOB_LOCKED if lock else _JOB
    return session.execute(statement, {"job_id": job_id}).scalar_one_or_none()


def mark_running(session: Session, job: PushJob, step: str) -> None:
    """The job runs at ``step`` (written at once; ``job`` is brought up to date).

    Raises ``EventConflict`` when the job ended after it was read (an operator's cancel, say):
    the caller's transaction is rolled back and its work done again, which then sees the end."""
    now = utcnow()
    params = {"job_id": job.id, "step": step, "now": now}
    if session.connection().execute(_MARK_RUNNING, params).first() is None:
        raise _ended_meanwhile(job.id, step)
    _marked_running(job, step, now)


def _ended_meanwhile(job_id: str, step: str) -> EventConflict:
    return EventConflict(f"job {job_id} ended (a cancel, say) before step {step} could start")


def _marked_running(job: PushJob, step: str, now: datetime) -> None:
    """``job`` as the database now has it after it was marked running at ``step``."""
    set_committed_value(job, "status", JobStatus.RUNNING.value)
    set_committed_value(job, "started_at", job.started_at or now)
    set_committed_value(job, "current_step", step)
    set_committed_value(job, "updated_at", now)


def mark_failed(session: Session, job: PushJob, *, code: str, message: str) -> None:
    """The job failed (written at once; ``job`` is brought up to date).

    Raises ``EventConflict`` when the job ended after it was read (an operator's cancel): the
    caller's transaction is rolled back and its work done again, which then sees the end."""
    now = utcnow()
    params = {"job_id": job.id, "code": code, "message": message, "now": now}
    if session.connection().execute(_MARK_FAILED, params).first() is None:
        raise EventConflict(f"job {job.id} ended (a cancel, say) before its failure was recorded")
    for name, value in (
        ("status", JobStatus.FAILED.value), ("error_code", code), ("error_message", message),
        ("finished_at", now), ("updated_at", now),
    ):  # fmt: skip
        set_committed_value(job, name, value)


def mark_succeeded(session: Session, job_id: str, *, digest: Any, reference: Any) -> bool:
    """The job succeeded; False when it was cancelled meanwhile (or is gone)."""
    params = {"job_id": job_id, "digest": digest, "reference": reference, "now": utcnow()}
    return session.connection().execute(_MARK_SUCCEEDED, params).first() is not None


def take_first_claim(
    session: Session,
    job: PushJob,
    step: str,
    registry_id: int,
    owner: str,
    lease: datetime,
    started: Callable[[Guard, dict[str, Any]], Mapping[str, Any] | None] | None = None,
) -> bool:
    """Claim a step nobody has claimed yet and mark the job running at it (``job`` is brought
    up to date); False, with nothing changed, when another delivery got there first.

    Raises ``EventConflict`` when the job ended after it was read (``mark_running``): the claim
    (and its event) must then be rolled back with the caller's transaction.

    ``started`` (PostgreSQL only), when given, appends the step's started event behind the
    claim, in its statement: it is called with ``FIRST_CLAIM`` and its values and answers what
    ``append_guarded`` does (None: the claim was not taken, nothing was appended).
    """
    now = utcnow()
    values: dict[str, Any] = {
        "job_id": job.id, "step": step, "registry_id": registry_id,
        "status": StepStatus.RUNNING.value, "attempts": 1, "owner": owner,
        "lease_expires_at": lease, "result": {}, "updated_at": now,
    }  # fmt: skip
    connection = session.connection()
    if started is not None:
        params = {f"c_{name}": value for name, value in values.items()}
        row = started(FIRST_CLAIM, {**params, "c_running": JobStatus.RUNNING.value})
        if row is None:
            return False
        if not row["marked"]:
            raise _ended_meanwhile(job.id, step)
        _marked_running(job, step, now)
        return True
    if connection.execute(_INSERT_CLAIM, values).first() is None:
        return False
    mark_running(session, job, step)
    return True


def finish_claim(
    session: Session,
    job_id: str,
    step: str,
    registry_id: int,
    status: StepStatus,
    result: dict[str, Any] | None = None,
) -> int | None:
    """Mark the claim finished (storing ``result`` when given); its try number, or None when
    the claim row is gone."""
    params = _finish_params(job_id, step, registry_id, status, result)
    statement = _FINISH_KEEPING_RESULT if result is None else _FINISH_WITH_RESULT
    attempts = session.connection().execute(statement, params).scalar_one_or_none()
    return None if attempts is None else int(attempts)


def finish_claim_with_status(
    session: Session, job_id: str, step: str, registry_id: int, result: dict[str, Any]
) -> tuple[int | None, str | None]:
    """A succeeded step's claim finished with ``result``: its try number and the job's status,
    read in the same statement; (None, None) when the claim row is gone."""
    params = _finish_params(job_id, step, registry_id, StepStatus.SUCCEEDED, result)
    row = session.connection().execute(_FINISH_WITH_STATUS, params).first()
    if row is None:
        return None, None
    attempts, status = row
    return int(attempts), None if status is None else str(status)


def _finish_params(
    job_id: str, step: str, registry_id: int, status: StepStatus, result: dict[str, Any] | None
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "k_job_id": job_id, "k_step": step, "k_registry_id": registry_id,
        "status": status.value, "now": utcnow(),
    }  # fmt: skip
    if result is not None:
        params["result"] = result
    return params
