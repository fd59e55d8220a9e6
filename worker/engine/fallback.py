"""The fallback policy, in one place: where a job goes when a registry refuses its credentials.

Only an ``AuthenticationError`` moves a job along its chain; the chain holds registry ids an
operator named explicitly. There is no default: with an empty chain an authentication failure
fails the job. Docker Hub takes part only as an explicit record of kind ``dockerhub`` in a chain.

A job copies its chain when it is created; each member is checked again when the job would move
to it (``plan_fallback``): one removed since, or whose stored address today's rules refuse, is
skipped and named in the job's events, never sent anything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from worker.core.errors import AuthenticationError, FallbackExhausted, PushWorkerError
from worker.engine.steps import Step
from worker.store.models import PushJob


def route(job: PushJob) -> list[int]:
    """Every registry the job may use, in order: the requested one, then its chain."""
    return [job.requested_registry_id, *job.fallback_chain]


@dataclass(frozen=True)
class FallbackPlan:
    """Where a job goes after an authentication failure, and the chain members passed over."""

    #: The registry to run the job on next; None when the job must fail.
    to: int | None
    #: ``(registry id, why)`` of each member skipped on the way (removed, unusable address).
    skipped: tuple[tuple[int, str], ...] = ()

    def skipped_payload(self) -> list[dict[str, object]]:
        """The skipped members as an event payload value."""
        return [{"registry_id": rid, "reason": why} for rid, why in self.skipped]


#: Why a registry may not be a target now (``worker.engine.targets.unusable_reason``), or None.
Unusable = Callable[[int], str | None]


def plan_fallback(
    job: PushJob, step: Step, error: PushWorkerError, unusable: Unusable
) -> FallbackPlan:
    """The next usable registry of the job's chain after the one that refused, checked now:
    a registry removed (or made unusable) since the job copied its chain is never a target.
    Only a step that says so (``Step.may_fall_back``) moves a job."""
    if not step.may_fall_back or not isinstance(error, AuthenticationError):
        return FallbackPlan(None)
    order = route(job)
    if job.effective_registry_id not in order:
        return FallbackPlan(None)
    skipped: list[tuple[int, str]] = []
    for candidate in order[order.index(job.effective_registry_id) + 1 :]:
        why = unusable(candidate)
        if why is None:
            return FallbackPlan(candidate, tuple(skipped))
        skipped.append((candidate, why))
    return FallbackPlan(None, tuple(skipped))


def final_auth_error(
    job: PushJob,
    registry_id: int,
    error: AuthenticationError,
    refusals: list[tuple[int, str]],
    skipped: Sequence[tuple[int, str]] = (),
) -> AuthenticationError:
    """The error that ends a job on an authentication failure, saying exactly what to do."""
    if job.fallback_chain:
        return exhausted_error(job, refusals, skipped)
    return AuthenticationError(
        error.message,
        hint=f"set the credential of registry {registry_id} "
        f"(pushctl registry set-credential {registry_id}), "
        f"then retry the job (pushctl jobs retry {job.id})",
    )


def exhausted_error(
    job: PushJob, refusals: list[tuple[int, str]], skipped: Sequence[tuple[int, str]] = ()
) -> FallbackExhausted:
    """The error that ends a job whose every registry refused its credentials (those of its
    chain that could not be used are named, and were sent nothing)."""
    tried = "; ".join(f"registry {rid}: {message}" for rid, message in refusals)
    passed = "; ".join(f"{why} (skipped, nothing sent to it)" for _rid, why in skipped)
    first = job.requested_registry_id
    return FallbackExhausted(
        f"every registry tried refused the credentials ({tried})"
        + (f"; not tried: {passed}" if passed else ""),
        hint=f"fix the credential of registry {first} (pushctl registry set-credential {first}), "
        f"then retry the job (pushctl jobs retry {job.id})",
    )
