"""How a step's Celery task ends for each outcome of its run (tasks/push.py): the next step, a
retry, a stop (Celery's Ignore: the chain ends, the task counts as IGNORED), or the job's end,
a plain success."""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import pytest
from celery import states

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
