"""The fallback policy, in one place: where a job goes when a registry refuses its credentials.

Only an ``AuthenticationError`` moves a job along its chain; the chain holds registry ids an
operator named explicitly. There is no default: with an empty chain an authentication failure
fails the job. Docker Hub takes part only as an explicit record of kind ``dockerhub`` in a chain.
"""

from __future__ import annotations

from worker.errors import AuthenticationError, FallbackExhausted, PushWorkerError
from worker.models import PushJob

#: Steps whose authentication failures may move a job to the next registry.
FALLBACK_STEPS = frozenset({"login", "push"})


def route(job: PushJob) -> list[int]:
    """Every registry the job may use, in order: the requested one, then its chain."""
    return [job.requested_registry_id, *job.fallback_chain]


def next_registry(job: PushJob, step: str, error: PushWorkerError) -> int | None:
    """The registry to fall back to, or None when the job must fail."""
    if step not in FALLBACK_STEPS or not isinstance(error, AuthenticationError):
        return None
    order = route(job)
    position = order.index(job.effective_registry_id) if job.effective_registry_id in order else -1
    return order[position + 1] if 0 <= position < len(order) - 1 else None


def final_auth_error(
    job: PushJob, registry_id: int, error: AuthenticationError, refusals: list[tuple[int, str]]
) -> AuthenticationError:
    """The error that ends a job on an authentication failure, saying exactly what to do."""
    if job.fallback_chain:
        return exhausted_error(job, refusals)
    return AuthenticationError(
        error.message,
        hint=f"set the credential of registry {registry_id} "
        f"(pushctl registry set-credential {registry_id}), "
        f"then retry the job (pushctl jobs retry {job.id})",
    )


def exhausted_error(job: PushJob, refusals: list[tuple[int, str]]) -> FallbackExhausted:
    """The error that ends a job whose every registry refused its credentials."""
    tried = "; ".join(f"registry {rid}: {message}" for rid, message in refusals)
    first = job.requested_registry_id
    return FallbackExhausted(
        f"every registry tried refused the credentials ({tried})",
        hint=f"fix the credential of registry {first} (pushctl registry set-credential {first}), "
        f"then retry the job (pushctl jobs retry {job.id})",
    )
