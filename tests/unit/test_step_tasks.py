"""How a step's Celery task ends for each outcome of its run (tasks/push.py): the next step, a
retry, a stop (Celery's Ignore: the chain ends, the task counts as IGNORED), or the job's end,
a plain success; and that a task ended by an exception leaves no reference cycle behind
(tasks/app.py ``_drop_traceback``)."""

from __future__ import annotations

import gc
import pickle
from dataclasses import dataclass
from typing import Any

import pytest
from celery import states
from celery.app.trace import build_tracer

import tasks.app
import tasks.push
from worker.engine.pipeline import Outcome

JOB = "0aaf5721-44ca-4900-91a6-962e617b6046"


@dataclass
class _Runner:
    """Stands in for the step runner: answers every run with ``outcome``."""

    outcome: Outcome
    flow: None = None

    def run(self, step: str, job_id: str, registry_id: int, **_: object) -> Outcome:
        return self.outcome


def _apply(monkeypatch: pytest.MonkeyPatch, step: str, outcome: Outcome) -> tuple[str, object]:
    monkeypatch.setattr(tasks.push, "_built", [_Runner(outcome)])
    result = tasks.push.TASKS[step].apply(args=(JOB, 5), throw=False)
    return result.state, result.result


def test_a_finished_jobs_last_step_is_a_plain_success(monkeypatch: pytest.MonkeyPatch) -> None:
    state, value = _apply(
        monkeypatch, "push", Outcome("stop", reason="job succeeded", finished=True)
    )
    assert state == states.SUCCESS
    assert value == {"job_id": JOB, "step": "push", "registry_id": 5}
    assert len(pickle.dumps(value)) < 200  # what a pool process sends its main process


@pytest.mark.parametrize("reason", ["superseded", "claimed elsewhere", "fallback"])
def test_any_other_stop_ends_the_chain_as_ignored(
    monkeypatch: pytest.MonkeyPatch, reason: str
) -> None:
    state, _ = _apply(monkeypatch, "login", Outcome("stop", reason=reason))
    assert state == states.IGNORED


def test_continue_returns_for_the_chain_to_go_on(monkeypatch: pytest.MonkeyPatch) -> None:
    state, value = _apply(monkeypatch, "tag", Outcome("continue"))
    assert (state, value) == (states.SUCCESS, {"job_id": JOB, "step": "tag", "registry_id": 5})


@pytest.mark.parametrize(
    "outcome", [Outcome("stop", reason="superseded"), Outcome("retry", countdown=5.0)]
)
def test_a_task_ended_by_ignore_or_retry_leaves_no_cycle_behind(
    monkeypatch: pytest.MonkeyPatch, outcome: Outcome
) -> None:
    """The exception a task ends with holds, through its traceback, Celery's tracing frame,
    which holds the exception: a cycle of thousands of objects (the frames' copied code
    positions) that only a full collection frees, and a pool process grew by ~100 MiB with them.
    Traced as a pool process traces it, nothing of the kind is left for the collector."""
    monkeypatch.setattr(tasks.push, "_built", [_Runner(outcome)])
    task = tasks.push.TASKS["login"]._get_current_object()
    monkeypatch.setattr(task, "apply_async", lambda *a, **k: None)  # the retry's publish
    tracer = build_tracer(task.name, task, app=task.app, eager=False)
    request: dict[str, Any] = {"id": "m-1", "delivery_info": {"routing_key": "pushworker"}}
    assert tracer("m-1", (JOB, 5), {}, request).info.state in (states.IGNORED, states.RETRY)
    gc.collect()
    gc.disable()
    try:
        traced = tracer("m-2", (JOB, 5), {}, {**request, "id": "m-2"})
        assert len(pickle.dumps(traced.retval)) > 10_000  # Celery's copy of the traceback
        del traced
        assert gc.collect() < 100, "the task's end left a reference cycle for the collector"
    finally:
        gc.enable()


def test_drop_tracebacks_follows_the_chain_of_causes() -> None:
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise ValueError("outer") from inner
    except ValueError as outer:
        error = outer
    assert error.__traceback__ is not None and error.__cause__ is not None
    tasks.app.drop_tracebacks(error)
    assert error.__traceback__ is None and error.__cause__.__traceback__ is None
    tasks.app.drop_tracebacks("not an exception")  # a task's ordinary return value
