"""Runs one step of one job against one registry, exactly once in effect.

A step goes through three phases:

1. claim (one transaction): memo check, job state check, then a claim row in ``step_runs`` and a
   ``step.started`` event. A step never acts without having recorded that it started. Whether
   the push's registry has a slot for it (``worker.engine.flow``) is asked just before, outside
   the transaction, so that no one waits for Redis while holding the database's write lock; a
   step that must wait is not claimed.
2. act (no transaction): the step's action from ``worker.engine.steps``, talking to Docker and the
   registry; the push holds its registry's slot around its upload alone (``StepContext.upload``).
3. record (one transaction): the outcome, with retry and fallback decided by
   ``worker.engine.retry`` and ``worker.engine.fallback``.

A ``local`` step (``Step.local``: resolving credentials, which talks to nothing outside the
worker's process and database) has all three in one transaction: it still records that it
started before its outcome, in the same commit; if its action fails, the transaction is rolled
back and the step takes the three phases above.

Which steps there are, their order and their leases come from ``worker.engine.steps.STEPS``.

Celery delivers at least once; the claim turns duplicates into ``step.skipped`` events, and a
step that already succeeded for this job and registry is skipped on any later delivery.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Literal, TypeVar

from sqlalchemy import update
from sqlalchemy.orm import Session, object_session

from worker.core.errors import (
    AuthenticationError,
    DatabaseUnavailable,
    EventConflict,
    FlowStateUnavailable,
    JobNotFound,
    PushWorkerError,
    RegistryThrottled,
    ThrottledPastDeadline,
    WorkerLost,
)
from worker.core.logs import get_logger
from worker.core.settings import Settings, get_settings
from worker.engine.dispatch import Dispatcher, StepWaker
from worker.engine.fallback import final_auth_error, plan_fallback
from worker.engine.flow import (
    SLOT_STEPS,
    WAKE_PREFIX,
    Admission,
    CapChange,
    FlowControl,
    SlotTaken,
    Upload,
    deadline_of,
)
from worker.engine.liveness import claim_is_dead, owner_of_this_process
from worker.engine.retry import retry_delay, should_retry
from worker.engine.steps import (
    STEPS,
    HttpFactory,
    Step,
    StepContext,
    StepResult,
    default_copier,
)
from worker.engine.targets import target_refusal, unusable_reason
from worker.seams.docker_engine import DockerEngine
from worker.seams.limiter import RedisFlowState
from worker.seams.protocols import ContainerEngine, ImageCopier
from worker.seams.registry_http import shared_client
from worker.store import claims, events, queries
from worker.store.db import read_scope, session_scope
from worker.store.models import JobStatus, PushJob, Registry, StepRun, StepStatus, utcnow

log = get_logger("pushworker.pipeline")
T = TypeVar("T")


@dataclass(frozen=True)
class Outcome:
    """What the Celery task should do next."""

    action: Literal["continue", "stop", "retry"]
    countdown: float = 0.0
    reason: str = ""
    #: The job succeeded with this step, its chain's last: the task ends as a plain success
    #: (a stop whose chain has nothing left to stop).
    finished: bool = False


@dataclass(frozen=True)
class _Claimed:
    job: PushJob
    registry: Registry
    tries: int
    #: The registry a promotion reads from (``registry`` sources), checked like the target.
    source_registry: Registry | None = None
    #: The claim row as it was before this claim took it (None: there was none), to give the
    #: claim back when the step must wait after all (``SlotTaken``).
    before: _ClaimRow | None = None


@dataclass(frozen=True)
class _ClaimRow:
    status: str
    attempts: int
    owner: str | None
    lease_expires_at: datetime | None


@dataclass
class StepRunner:
    dispatcher: Dispatcher
    engine_factory: Callable[[], ContainerEngine]
    settings: Settings
    http_factory: HttpFactory = shared_client
    #: The steps this runner knows, in chain order (tests hand in steps with other actions).
    steps: tuple[Step, ...] = STEPS
    #: Per-registry flow control (slots, rate, AIMD); None: no limits (no Redis broker).
    flow: FlowControl | None = None
    #: What copies the sources that are not the Docker Engine (skopeo; a fake in fast tests).
    copier_factory: Callable[[], ImageCopier] = default_copier

    def step(self, name: str) -> Step:
        """The step called ``name``; KeyError for a name not in ``steps``."""
        return {step.name: step for step in self.steps}[name]

    def _is_last(self, name: str) -> bool:
        return name == self.steps[-1].name

    def __post_init__(self) -> None:
        # A released slot is handed over through the dispatcher, when it can publish one step.
        flow = self.flow
        if flow is not None and flow.wake is None and isinstance(self.dispatcher, StepWaker):
            flow.wake = self.dispatcher.wake_step

    def run(
        self,
        step: str,
        job_id: str,
        registry_id: int,
        *,
        delivery_retries: int = 0,
        message_id: str | None = None,
    ) -> Outcome:
        actor = events.worker_actor()
        # Only a first delivery can be a wake message (a retried one is the waiter's own).
        wake_id = message_id if delivery_retries == 0 else None
        try:
            asked = self._ask_first(step, job_id, registry_id, wake_id, message_id)
            if isinstance(asked, Outcome):
                return asked
            if self.step(step).local:
                done = _with_conflict_retry(
                    lambda: self._run_local(step, job_id, registry_id, actor, wake_id)
                )
                if done is not None:
                    return done
                # The action failed and nothing of this try was kept: the way below claims
                # the step, runs it again and records why it fails.
            claimed = _with_conflict_retry(
                lambda: self._claim(step, job_id, registry_id, actor, wake_id, asked)
            )
        except DatabaseUnavailable:
            # Nothing recorded, nothing done: try the whole step again later.
            delay = self._delay(delivery_retries + 1)
            log.warning("step.deferred", job_id=job_id, step=step, reason="database unavailable")
            return Outcome("retry", delay, "database unavailable")
        except JobNotFound as error:
            log.error("step.orphaned", job_id=job_id, step=step, error=error.message)
            return Outcome("stop", reason=error.message)
        if isinstance(claimed, Outcome):
            return claimed
        slotted = self.flow is not None and step in SLOT_STEPS
        use = Upload()
        upload = (
            partial(self.flow.upload, claimed.registry, job_id, step, use)
            if self.flow is not None and slotted
            else nullcontext
        )
        context = self._context(claimed, job_id, step, registry_id, actor, upload)
        try:
            try:
                result = self.step(step).action(context)
            finally:
                # The slot is free by now: the limit changes its upload met (a 429, a success
                # at the limit) are recorded, and a step that never asked for it gives its
                # place in the queue on.
                for change in use.changes:
                    self._record_cap_change(change, actor)
                if slotted and not use.asked:
                    self._forget(claimed.registry, job_id, step)
        except SlotTaken as taken:
            wait = taken.admission
            return _with_conflict_retry(
                lambda: self._give_back(step, job_id, registry_id, claimed, wait, actor)
            )
        except PushWorkerError as exc:
            failure = exc
            outcome = _with_conflict_retry(
                lambda: self._record_failure(step, job_id, registry_id, failure, actor)
            )
            return self._ended_by_hand_over(outcome, claimed.registry, job_id, step, wake_id)
        except Exception as exc:
            log.exception("step.crashed", job_id=job_id, step=step)
            crash = PushWorkerError(f"step {step} crashed: {type(exc).__name__}")
            outcome = _with_conflict_retry(
                lambda: self._record_failure(step, job_id, registry_id, crash, actor)
            )
            return self._ended_by_hand_over(outcome, claimed.registry, job_id, step, wake_id)
        outcome = _with_conflict_retry(
            lambda: self._record_success(step, job_id, registry_id, result, actor, claimed.tries)
        )
        return self._ended_by_hand_over(outcome, claimed.registry, job_id, step, wake_id)

    def _context(
        self,
        claimed: _Claimed,
        job_id: str,
        step: str,
        registry_id: int,
        actor: str,
        upload: Callable[[], AbstractContextManager[None]] = nullcontext,
    ) -> StepContext:
        return StepContext(
            job=claimed.job,
            registry=claimed.registry,
            engine=self.engine_factory,
            http_factory=self.http_factory,
            http_timeout=self.settings.http_timeout,
            on_progress=_progress_recorder(job_id, step, registry_id, claimed.tries, actor),
            attempt=claimed.tries,
            copier=self.copier_factory,
            source_registry=claimed.source_registry,
            upload=upload,
        )

    def _run_local(
        self, step: str, job_id: str, registry_id: int, actor: str, wake_id: str | None
    ) -> Outcome | None:
        """A ``local`` step (``Step.local``: nothing outside this process and its database)
        claimed, run and recorded in one transaction: its ``step.started`` and its outcome
        commit together, one transaction a job fewer. None when the action failed: the
        transaction is rolled back, nothing of this try is kept, and the caller takes the way
        of every step (claim, act, record the failure)."""
        leaving: list[Registry | None] = []
        try:
            with session_scope() as session:
                claimed = self._claim_in(
                    step, job_id, registry_id, actor, wake_id, None, leaving, session=session
                )
                if isinstance(claimed, Outcome):
                    return claimed
                context = self._context(claimed, job_id, step, registry_id, actor)
                try:
                    result = self.step(step).action(context)
                except Exception:
                    raise _LocalStepFailed() from None
                return self._record_success(
                    step, job_id, registry_id, result, actor, claimed.tries, session=session
                )
        except _LocalStepFailed:
            return None
        finally:
            for registry in leaving:
                self._forget(registry, job_id, step)

    def _ended_by_hand_over(
        self, outcome: Outcome, registry: Registry, job_id: str, step: str, wake_id: str | None
    ) -> Outcome:
        """A hand-over's run (a wake message, or a take-over: ``WAKE_PREFIX`` ids) that ended
        its job leaves the message the waiter was re-queued under nothing to do: marked, it
        stops on arrival (``_ask_first``) instead of recording a skip. A run that goes on (a
        retry) leaves it as it is: it is the job's safety net if what carries the job on is
        lost."""
        if (
            self.flow is not None
            and outcome.action == "stop"
            and step in SLOT_STEPS
            and wake_id is not None
            and wake_id.startswith(WAKE_PREFIX)
        ):
            self._flow_call(self.flow.supersede, registry, job_id, step)
        return outcome

    # --- phase 1 --------------------------------------------------------------------------------

    def _ask_first(
        self,
        step: str,
        job_id: str,
        registry_id: int,
        wake_id: str | None,
        message_id: str | None = None,
    ) -> Admission | Outcome | None:
        """Flow control's answer for a step that takes a registry slot (the push), asked before
        the claim's transaction: Redis is not waited for while that transaction holds the
        database's write lock (SQLite's is one for everyone), and a poll that only waits again
        writes nothing at all. None: not asked (a step without a slot, whose rate, if any, the
        claim asks for; or a step that will not run: the claim says why, and asks itself if the
        state changed meanwhile); an Admission: granted, or refused with something to record
        (the first refusal of a wait, the deadline); an Outcome: the wait, nothing recorded;
        or the stop of a waiter's message a hand-over's run made pointless (``supersede``),
        nothing recorded either. ``wake_id``: the message's id when it may be a wake;
        ``message_id``: its id in any case (the waiter's, if it is re-queued)."""
        if self.flow is None or step not in SLOT_STEPS:
            return None
        with read_scope() as session:
            view = claims.load_for_claim(session, job_id, step, registry_id)
            job, registry = view.job, view.registry
            if job is None or registry is None:
                return None
            if not self._would_run(session, view, step):
                if message_id is not None and self._flow_call(
                    self.flow.superseded, registry, job_id, step, message_id
                ):
                    log.info("step.superseded", job_id=job_id, step=step,
                             reason="a hand-over's run ended the job")  # fmt: skip
                    return Outcome("stop", reason="superseded by a hand-over")
                return None
            try:
                admission = self.flow.admit(
                    registry, job_id, step, message_id=wake_id, requeued_as=message_id
                )
            except FlowStateUnavailable as unavailable:
                log.warning("step.deferred", job_id=job_id, step=step, reason=unavailable.message)
                return Outcome("retry", self._delay(1), unavailable.code)
            if admission.granted or admission.first or utcnow() >= deadline_of(job, self.settings):
                return admission
            if admission.woken:
                return Outcome("stop", reason="woken, no slot free: " + admission.reason)
            return self._countdown(job, admission)

    def _would_run(self, session: Session, view: claims.ClaimView, step: str) -> bool:
        """What the claim checks before it asks flow control, read without taking any lock."""
        job, run, registry = view.job, view.run, view.registry
        assert job is not None and registry is not None
        if run is not None and run.status == StepStatus.SUCCEEDED:
            return False
        if JobStatus(job.status).is_final or job.effective_registry_id != registry.id:
            return False
        if (
            step in SLOT_STEPS
            and run is not None
            and run.status == StepStatus.RUNNING
            and not claim_is_dead(run, utcnow())
        ):
            return False
        if target_refusal(registry, registry.id) is not None:
            return False
        source = job.source_registry_id
        return source is None or target_refusal(session.get(Registry, source), source) is None

    def _claim(
        self,
        step: str,
        job_id: str,
        registry_id: int,
        actor: str,
        message_id: str | None = None,
        asked: Admission | None = None,
    ) -> _Claimed | Outcome:
        # A step that will not run leaves its registry's queue once its skip is committed:
        # Redis is not waited for while the transaction holds the write lock.
        leaving: list[Registry | None] = []
        claimed = self._claim_in(step, job_id, registry_id, actor, message_id, asked, leaving)
        for registry in leaving:
            self._forget(registry, job_id, step)
        return claimed

    def _claim_in(
        self,
        step: str,
        job_id: str,
        registry_id: int,
        actor: str,
        message_id: str | None,
        asked: Admission | None,
        leaving: list[Registry | None],
        *,
        session: Session | None = None,
    ) -> _Claimed | Outcome:
        with _within(session) as session:
            view = claims.load_for_claim(session, job_id, step, registry_id)
            job, run = view.job, view.run
            if job is None:
                raise JobNotFound(f"job {job_id} does not exist")
            note = _Recorder(session, job_id, step, registry_id, actor)
            if run is not None and run.status == StepStatus.SUCCEEDED:
                leaving.append(view.registry)
                # A job whose last step succeeded already (cancelled while it pushed, then
                # retried) ends with it; its row is written before the events (lanes last).
                ends = (
                    self._is_last(step)
                    and not JobStatus(job.status).is_final
                    and job.effective_registry_id == registry_id
                    and _succeeded_by_memo(session, job_id, run)
                )
                note(
                    "step.skipped",
                    run.attempts,
                    reason="already succeeded for this job and registry",
                )
                if ends:
                    note("job.succeeded", None, **_memo_result(run))
                    return Outcome("stop", reason="job succeeded", finished=True)
                return Outcome("stop" if self._is_last(step) else "continue", reason="memo")
            if JobStatus(job.status).is_final:
                note("step.skipped", None, reason=f"the job is {job.status}")
                leaving.append(view.registry)
                return Outcome("stop", reason=f"job {job.status}")
            if job.effective_registry_id != registry_id:
                reason = f"superseded: the job moved to registry {job.effective_registry_id}"
                note("step.skipped", None, reason=reason)
                leaving.append(view.registry)
                return Outcome("stop", reason="superseded")
            if (
                self.flow is not None
                and step in SLOT_STEPS
                and run is not None
                and run.status == StepStatus.RUNNING
                and not claim_is_dead(run, utcnow())
            ):
                # Another delivery (a wake, or the waiter's own message) runs it: asked for a
                # slot, this one would only queue again behind a step that is done by then.
                note("step.skipped", None, reason=f"running elsewhere ({run.owner})")
                return Outcome("stop", reason="claimed elsewhere")
            # Checked before any claim: a registry removed while the job waited, or a stored
            # record today's address rules refuse, fails the job and is sent nothing.
            refusal = target_refusal(view.registry, registry_id)
            if refusal is not None:
                _mark_failed(job, refusal)
                note("job.failed", None, **refusal.to_payload())
                return Outcome("stop", reason=refusal.code)
            registry = view.registry
            assert registry is not None, "a job's registry row is never deleted"
            source_registry = None
            if job.source_registry_id is not None:
                # A promotion's source is read from: the same address rules apply to it.
                source_registry = session.get(Registry, job.source_registry_id)
                refusal = target_refusal(source_registry, job.source_registry_id)
                if refusal is not None:
                    _mark_failed(job, refusal)
                    note("job.failed", None, **refusal.to_payload())
                    return Outcome("stop", reason=refusal.code)
            if asked is None:
                admission = self._admit(note, job, registry, step, message_id)
            elif asked.granted:
                admission = asked
            else:
                admission = self._wait(note, job, registry, step, asked)
            if isinstance(admission, Outcome):
                return admission
            before = None if run is None else _ClaimRow(
                run.status, run.attempts, run.owner, run.lease_expires_at
            )  # fmt: skip
            claimed = self._claim_step(session, note, run, job, registry, step, actor)
            if isinstance(claimed, Outcome):
                return claimed
            return _Claimed(
                job=job,
                registry=registry,
                tries=claimed,
                source_registry=source_registry,
                before=before,
            )

    def _claim_step(
        self,
        session: Session,
        note: _Recorder,
        run: StepRun | None,
        job: PushJob,
        registry: Registry,
        step: str,
        actor: str,
    ) -> int | Outcome:
        """Take the claim: the try number, or why this delivery stops."""
        job_id, registry_id = job.id, registry.id
        # A run whose worker died is still RUNNING; one that recorded a failure is not (a
        # throttled step is retried up to its deadline, not bounded by max_attempts).
        died = run is not None and run.status == StepStatus.RUNNING
        tries, started = self._take_claim(session, run, job, step, registry_id, actor, note)
        if isinstance(tries, str):
            note("step.skipped", None, reason=tries)
            return Outcome("stop", reason="claimed elsewhere")
        if died and tries > self.settings.max_attempts:
            error = WorkerLost(
                f"step {step} was started {tries - 1} times and its worker died each time",
                hint="see the worker's logs for what kills it; then retry the job",
            )
            claims.finish_claim(session, job_id, step, registry_id, StepStatus.FAILED)
            self._fail_job(note, job, error, tries)
            return Outcome("stop", reason="worker lost")
        if run is not None:  # a first claim marked the job running as it was taken
            claims.mark_running(session, job, step)
        if not started:
            note("step.started", tries)
        return tries

    def _admit(
        self,
        note: _Recorder,
        job: PushJob,
        registry: Registry,
        step: str,
        message_id: str | None = None,
    ) -> Admission | Outcome | None:
        """Flow control before the claim: a free slot (asked: the upload takes it) and a
        request of the rate, or a wait (re-queued with a countdown, recorded once per wait,
        not a try), or the deadline passed."""
        if self.flow is None or not self.flow.applies(step):
            return None
        try:
            admission = self.flow.admit(registry, job.id, step, message_id=message_id)
        except FlowStateUnavailable as unavailable:
            log.warning("step.deferred", job_id=job.id, step=step, reason=unavailable.message)
            return Outcome("retry", self._delay(1), unavailable.code)
        if admission.granted:
            return admission
        return self._wait(note, job, registry, step, admission)

    def _wait(
        self,
        note: _Recorder,
        job: PushJob,
        registry: Registry,
        step: str,
        admission: Admission,
        *,
        given_back: int | None = None,
    ) -> Outcome:
        """A step refused by flow control waits: re-queued with a countdown (``step.waiting``
        recorded on the first refusal of a wait, and always for a claim ``given_back``: its
        try number), or fails its job past its deadline."""
        assert self.flow is not None
        if utcnow() >= deadline_of(job, self.settings):
            error = ThrottledPastDeadline(
                f"job waited for registry {registry.id} until its deadline: {admission.reason}",
                hint="raise the registry's limits or the job's --deadline, then retry the job",
            )
            self._flow_call(self.flow.forget, registry, job.id, step)
            _mark_failed(job, error)
            note("job.failed", None, **error.to_payload())
            return Outcome("stop", reason=error.code)
        if admission.woken:
            # A wake message that found no slot for it (its waiter's own message took the
            # reservation, or it expired): the waiter's own message waits, not this one.
            return Outcome("stop", reason="woken, no slot free: " + admission.reason)
        if admission.first and admission.kind == "rate":
            note("step.waiting", None, reason=admission.reason, limit=admission.limit,
                 rate_per_second=registry.rate_per_second)  # fmt: skip
        elif admission.first or given_back is not None:
            reason = admission.reason
            if given_back is not None:
                reason += (
                    "; the slot free when this step was claimed was taken before its upload: "
                    f"try {given_back} given back, not counted"
                )
            note("step.waiting", given_back, reason=reason, ahead=admission.ahead,
                 holders=admission.holders, limit=admission.limit)  # fmt: skip
        return self._countdown(job, admission)

    def _countdown(self, job: PushJob, admission: Admission) -> Outcome:
        """The wait of a step refused by flow control: its countdown, cut so that a long one
        still looks at the deadline on time."""
        left = (deadline_of(job, self.settings) - utcnow()).total_seconds()
        countdown = min(admission.countdown, max(left, 0.0) + 0.5)
        return Outcome("retry", countdown, "waiting: " + admission.reason)

    def _forget(self, registry: Registry | None, job_id: str, step: str) -> None:
        """A flow-controlled step that will not run: out of its registry's queue."""
        if self.flow is not None and registry is not None and step in SLOT_STEPS:
            self._flow_call(self.flow.forget, registry, job_id, step)

    def _give_back(
        self,
        step: str,
        job_id: str,
        registry_id: int,
        claimed: _Claimed,
        admission: Admission,
        actor: str,
    ) -> Outcome:
        """The slot ``admit`` found free went to another step before this one's upload: the
        claim goes back as it was (the try does not count) and the step waits like any step
        refused a slot, its ``step.waiting`` closing the ``step.started`` of the try it gave
        back."""
        with session_scope() as session:
            before, tries = claimed.before, claimed.tries
            session.execute(
                update(StepRun)
                .where(
                    StepRun.job_id == job_id, StepRun.step == step,
                    StepRun.registry_id == registry_id,
                    StepRun.status == StepStatus.RUNNING.value, StepRun.attempts == tries,
                )
                .values(
                    status=StepStatus.FAILED.value if before is None else before.status,
                    attempts=0 if before is None else before.attempts,
                    owner=None if before is None else before.owner,
                    lease_expires_at=None if before is None else before.lease_expires_at,
                )
                .execution_options(synchronize_session=False)
            )  # fmt: skip
            # Locked: the job's end (an operator's cancel during the action) is seen here and
            # stands; a job that ended neither waits nor fails.
            job = claims.load_job(session, job_id, lock=True)
            if job is None:
                raise JobNotFound(f"job {job_id} vanished while its step {step} waited")
            note = _Recorder(session, job_id, step, registry_id, actor)
            if not JobStatus(job.status).is_final:
                return self._wait(note, job, claimed.registry, step, admission, given_back=tries)
            reason = (
                f"the job is {job.status}; the slot free when this step was claimed was taken "
                f"before its upload: try {tries} given back"
            )
            note("step.skipped", tries, reason=reason)
            ended = Outcome("stop", reason=f"job {job.status}")
        # Out of the registry's queue once the skip is committed: Redis is not waited for while
        # the transaction holds the job's row (and SQLite's write lock).
        self._forget(claimed.registry, job_id, step)
        return ended

    def _flow_call(self, function: Callable[..., T], *args: object) -> T | None:
        """A flow-control bookkeeping call whose failure must not fail the step."""
        try:
            return function(*args)
        except FlowStateUnavailable as exc:
            log.warning("flow.unavailable", error=exc.message)
            return None

    def _record_cap_change(self, change: CapChange | None, actor: str) -> None:
        """A change of a registry's effective limit, on the registry's stream."""
        if change is None:
            return
        log.info(change.type, registry_id=change.registry_id, limit=change.limit,
                 previous_limit=change.previous_limit)  # fmt: skip
        try:
            with session_scope() as session:
                events.append(
                    session, stream=events.registry_stream(change.registry_id),
                    type=change.type, actor=actor, registry_id=change.registry_id,
                    payload=change.payload(),
                )  # fmt: skip
        except (DatabaseUnavailable, EventConflict):
            log.warning("flow.event_lost", type=change.type, registry_id=change.registry_id)

    def _take_claim(
        self,
        session: Session,
        run: StepRun | None,
        job: PushJob,
        step: str,
        registry_id: int,
        actor: str,
        note: _Recorder,
    ) -> tuple[int | str, bool]:
        """The try number of a claim we now hold, or why another worker holds it; and whether
        the step's ``step.started`` is appended already. A first claim also marks the job
        running at ``step``, and on PostgreSQL appends ``step.started`` in the same statement."""
        now = utcnow()
        lease = now + timedelta(seconds=self.step(step).lease(self.settings))
        job_id = job.id
        if run is None:
            owner = owner_of_this_process(actor)
            at_once = session.get_bind().dialect.name == "postgresql"

            def started(guard: events.Guard, params: dict[str, Any]) -> Mapping[str, Any] | None:
                return note.after(guard, params, "step.started", {}, 1)

            first = claims.take_first_claim(
                session, job, step, registry_id, owner, lease, started if at_once else None
            )
            if not first:
                return "another delivery claimed this step at the same moment", False
            return 1, at_once
        if run.status == StepStatus.RUNNING and not claim_is_dead(run, now):
            return f"running elsewhere ({run.owner})", False
        taken = session.execute(
            update(StepRun)
            .where(
                StepRun.job_id == job_id, StepRun.step == step,
                StepRun.registry_id == registry_id, StepRun.status == run.status,
                StepRun.attempts == run.attempts,
            )
            .values(status=StepStatus.RUNNING.value, attempts=run.attempts + 1,
                    owner=owner_of_this_process(actor), lease_expires_at=lease)
            .execution_options(synchronize_session=False)
        )  # fmt: skip
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            return "another delivery claimed this step at the same moment", False
        return run.attempts + 1, False  # the update matched the attempts we read

    # --- phase 3 --------------------------------------------------------------------------------

    # Every record transaction changes its rows before its first append, so that it never
    # waits for a row while holding the event chain's lock (docs/event-log.md).

    def _record_success(
        self,
        step: str,
        job_id: str,
        registry_id: int,
        result: StepResult,
        actor: str,
        tries: int,
        *,
        session: Session | None = None,
    ) -> Outcome:
        """Record a step's success (``tries``: the try its claim took) and say what follows."""
        with _within(session) as session:
            pinned = result.payload.get("source_digest")
            note = _Recorder(session, job_id, step, registry_id, actor)
            last = self._is_last(step)
            digest, reference = result.payload.get("digest"), result.payload.get("reference")
            if not pinned and (not last or session.get_bind().dialect.name == "postgresql"):
                # The common case in one round trip on PostgreSQL: the claim ends (and the last
                # step's job succeeds) and the step's event is appended in one statement, when
                # the claim is still this try's.
                guard, params = (
                    (claims.LAST_SUCCEEDED_CLAIM, claims.last_succeeded_claim_params)
                    if last
                    else (claims.SUCCEEDED_CLAIM, claims.succeeded_claim_params)
                )
                values = params(job_id, step, registry_id, tries, result.payload)
                ended = note.after(guard, values, *_success_event(result), tries)
                if ended is not None:
                    if ended["job_status"] is None:
                        raise JobNotFound(f"job {job_id} vanished while step {step} ran")
                    cancelled = ended["job_status"] == JobStatus.CANCELLED
                    return self._after_success(
                        note, last, cancelled, bool(last and ended["marked"]), digest, reference
                    )
            # The claim's try is the one that ended it (another delivery may have taken it over).
            ended_try, status = claims.finish_claim_with_status(
                session, job_id, step, registry_id, result.payload
            )
            if pinned:
                # The pin, once per job: every later step (and registry) copies this digest.
                session.execute(
                    update(PushJob)
                    .where(PushJob.id == job_id, PushJob.source_digest.is_(None))
                    .values(source_digest=pinned)
                    .execution_options(synchronize_session=False)
                )
            if status is None or ended_try is None:
                raise JobNotFound(f"job {job_id} or its claim on step {step} vanished")
            cancelled = status == JobStatus.CANCELLED
            succeeded = (
                last
                and not cancelled
                and claims.mark_succeeded(session, job_id, digest=digest, reference=reference)
            )
            type, payload = _success_event(result)
            note(type, ended_try, **payload)
            return self._after_success(note, last, cancelled, succeeded, digest, reference)

    def _after_success(
        self,
        note: _Recorder,
        last: bool,
        cancelled: bool,
        succeeded: bool,
        digest: Any,
        reference: Any,
    ) -> Outcome:
        """What follows a step's recorded success: the next step, or the job's end (its
        ``job.succeeded`` appended when the last step marked it succeeded)."""
        if cancelled or (last and not succeeded):
            return Outcome("stop", reason="job cancelled while the step ran")
        if not last:
            return Outcome("continue")
        note("job.succeeded", None, reference=reference, digest=digest)
        return Outcome("stop", reason="job succeeded", finished=True)

    def _record_failure(
        self, step: str, job_id: str, registry_id: int, error: PushWorkerError, actor: str
    ) -> Outcome:
        dispatch_to: int | None = None
        throttled = self._throttled_delay(error, step)
        with session_scope() as session:
            tries = claims.finish_claim(session, job_id, step, registry_id, StepStatus.FAILED)
            # Locked: a cancel committed while this is decided would be overwritten by the
            # job's failure (or followed by a fallback's chain).
            job = claims.load_job(session, job_id, lock=True)
            if job is None or tries is None:
                raise JobNotFound(f"job {job_id} or its claim on step {step} vanished")
            note = _Recorder(session, job_id, step, registry_id, actor)
            if JobStatus(job.status).is_final:
                # An operator cancelled the job while the step ran: the step's own outcome is
                # recorded, the job keeps its end, and nothing is retried or falls back.
                note("step.failed", tries, will_retry=False, **error.to_payload())
                return Outcome("stop", reason=f"job {job.status} while the step ran")
            # Each member is checked now, not when the job copied the chain: a removed one is
            # skipped (and named), never a target.
            plan = plan_fallback(
                job, self.step(step), error, lambda rid: unusable_reason(session, rid)
            )
            skipped = {"skipped": plan.skipped_payload()} if plan.skipped else {}
            fallback = plan.to
            if fallback is not None:
                job.effective_registry_id, job.current_step = fallback, None
                note("step.failed", tries, will_retry=False, **error.to_payload())
                note("fallback.applied", tries, from_registry_id=registry_id,
                     to_registry_id=fallback, reason=error.message, **skipped)  # fmt: skip
                dispatch_to = fallback
                outcome = Outcome("stop", reason="fallback")
            elif throttled is not None:
                if utcnow() >= deadline_of(job, self.settings):
                    final_error = ThrottledPastDeadline(
                        f"registry {registry_id} was still throttling when the job's deadline "
                        f"passed: {error.message}",
                        hint="raise the job's --deadline or lower the registry's limits, "
                        "then retry the job",
                    )
                    _mark_failed(job, final_error)
                    note("step.failed", tries, will_retry=False, **error.to_payload())
                    note("job.failed", tries, **final_error.to_payload())
                    outcome = Outcome("stop", reason=final_error.code)
                else:
                    # Waiting is not failing: retried up to the deadline, not max_attempts,
                    # after exactly the registry's Retry-After when it gave one.
                    delay = throttled
                    note("step.failed", tries, will_retry=True, retry_in=round(delay, 2),
                         **error.to_payload())  # fmt: skip
                    outcome = Outcome("retry", delay, error.code)
            elif should_retry(error, tries, self.settings.max_attempts):
                delay = self._delay(tries, error)
                note("step.failed", tries, will_retry=True, retry_in=round(delay, 2),
                     **error.to_payload())  # fmt: skip
                outcome = Outcome("retry", delay, error.code)
            else:
                final = error
                if isinstance(error, AuthenticationError):
                    refusals = [*_refusals(session, job), (registry_id, error.message)]
                    final = final_auth_error(job, registry_id, error, refusals, plan.skipped)
                _mark_failed(job, final)
                note("step.failed", tries, will_retry=False, **error.to_payload())
                note("job.failed", tries, **final.to_payload(), **skipped)
                outcome = Outcome("stop", reason=final.code)
        if dispatch_to is not None:
            self.dispatcher.start_chain(job_id, dispatch_to)
        return outcome

    def _throttled_delay(self, error: PushWorkerError, step: str) -> float | None:
        """With flow control on, the wait before retrying a throttled step (None: not one)."""
        if self.flow is None or type(error) is not RegistryThrottled:
            return None
        if error.retry_after is not None:
            # Honoured exactly, bounded only to stay under the broker's visibility timeout.
            return min(error.retry_after, self.settings.retry_max)
        return self.settings.flow_poll * self.flow.rng.uniform(1.0, 2.0)

    def _fail_job(self, note: _Recorder, job: PushJob, error: PushWorkerError, tries: int) -> None:
        _mark_failed(job, error)
        note("job.failed", tries, **error.to_payload())

    def _delay(self, tries: int, error: PushWorkerError | None = None) -> float:
        # The error may ask for a longer wait (a throttling registry's Retry-After).
        return retry_delay(error, tries, base=self.settings.retry_base, cap=self.settings.retry_max)


def _succeeded_by_memo(session: Session, job_id: str, run: StepRun) -> bool:
    """The job marked succeeded with its last step's earlier result (False: it was cancelled
    again meanwhile, which stands). A job cancelled while its push ran, then retried, finds
    every step done (a retry skips the steps that succeeded) and would otherwise stay queued
    for ever."""
    return claims.mark_succeeded(session, job_id, **_memo_result(run))


def _memo_result(run: StepRun) -> dict[str, Any]:
    return {"digest": run.result.get("digest"), "reference": run.result.get("reference")}


def _mark_failed(job: PushJob, error: PushWorkerError) -> None:
    # Conditional on the job not having ended since it was read: an operator's cancel that
    # committed meanwhile stands (EventConflict: the unit of work runs again and sees it).
    session = object_session(job)
    assert session is not None, "a job being failed belongs to the step's session"
    claims.mark_failed(session, job, code=error.code, message=str(error))


def _success_event(result: StepResult) -> tuple[str, dict[str, Any]]:
    """The type and payload of the event that records a step's success."""
    if result.noop:
        return "step.skipped", {"reason": result.noop, **result.payload}
    return "step.succeeded", dict(result.payload)


class _Recorder:
    """Appends events of one job with the step and registry filled in."""

    def __init__(self, session: Session, job_id: str, step: str, registry_id: int, actor: str):
        self.session, self.job_id, self.step = session, job_id, step
        self.registry_id, self.actor = registry_id, actor

    def __call__(self, type: str, attempt: int | None, **payload: object) -> None:
        events.append(self.session, **self._fields(type, attempt, payload))

    def after(
        self,
        guard: events.Guard,
        params: dict[str, Any],
        type: str,
        payload: dict[str, Any],
        attempt: int | None,
    ) -> Mapping[str, Any] | None:
        """The event appended once ``guard`` changed its row (``events.append_guarded``): the
        guard's row, or None when it changed nothing and nothing was appended."""
        fields = self._fields(type, attempt, payload)
        return events.append_guarded(self.session, guard, params, **fields)

    def _fields(self, type: str, attempt: int | None, payload: Mapping[str, Any]) -> Any:
        job_level = type.startswith("job.")
        return {
            "stream": events.job_stream(self.job_id), "type": type, "actor": self.actor,
            "job_id": self.job_id, "step": None if job_level else self.step,
            "registry_id": self.registry_id, "attempt": attempt, "payload": dict(payload),
        }  # fmt: skip


def _refusals(session: Session, job: PushJob) -> list[tuple[int, str]]:
    """The authentication refusals of the job's current run (since it was enqueued or retried)."""
    rows = queries.select_events(session, job_id=job.id)
    start = max((r.seq for r in rows if r.type in ("job.enqueued", "job.retried")), default=0)
    return [
        (r.registry_id or 0, str(r.payload.get("error_message", "")))
        for r in rows
        if r.seq > start
        and r.type == "step.failed"
        and r.payload.get("error_code") == AuthenticationError.code
    ]


def _progress_recorder(
    job_id: str, step: str, registry_id: int, tries: int, actor: str
) -> Callable[[int, int, int, int], None]:
    """Records push progress as ``step.progress`` events, at most one every two seconds."""
    last = [time.monotonic()]  # a push shorter than the interval records no progress

    def record(done: int, total: int, layers_done: int, layers: int) -> None:
        now = time.monotonic()
        if now - last[0] < 2.0:
            return
        last[0] = now
        try:
            with session_scope() as session:
                events.append(
                    session, stream=events.job_stream(job_id), type="step.progress", actor=actor,
                    job_id=job_id, step=step, registry_id=registry_id, attempt=tries,
                    payload={"bytes_pushed": done, "bytes_total": total,
                             "layers_done": layers_done, "layers_total": layers},
                )  # fmt: skip
        except (DatabaseUnavailable, EventConflict):
            pass  # progress is informative; losing one line must not fail a push

    return record


class _LocalStepFailed(Exception):
    """A local step's action failed inside its one transaction: roll it back."""


@contextmanager
def _within(session: Session | None) -> Iterator[Session]:
    """The caller's transaction when it gives one, else a transaction of its own."""
    if session is not None:
        yield session
        return
    with session_scope() as own:
        yield own


def _with_conflict_retry(work: Callable[[], T], attempts: int = 5) -> T:
    """Re-run a unit of work whose event append clashed with a concurrent writer."""
    for attempt in range(attempts):
        try:
            return work()
        except EventConflict:
            if attempt == attempts - 1:
                raise
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")


def default_runner(dispatcher: Dispatcher) -> StepRunner:
    settings = get_settings()
    return StepRunner(
        dispatcher=dispatcher,
        engine_factory=_cached_engine(settings),
        settings=settings,
        flow=_flow_control(settings),
    )


def _flow_control(settings: Settings) -> FlowControl | None:
    """Flow control through its Redis (the broker's, or ``PUSHWORKER_FLOW_REDIS_URL`` beside
    RabbitMQ); none when turned off. Settings refuse flow control on without a Redis."""
    if not settings.flow_control or settings.flow_redis_url is None:
        return None
    state = RedisFlowState(settings.flow_redis_url, timeout=settings.http_timeout)
    return FlowControl(state, settings)


def _cached_engine(settings: Settings) -> Callable[[], ContainerEngine]:
    """One Docker client per process, made on first use (not at import, not per step)."""
    holder: list[ContainerEngine] = []

    def get() -> ContainerEngine:
        if not holder:
            holder.append(DockerEngine(settings.docker_host))
        return holder[0]

    return get
