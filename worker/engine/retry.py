"""The retry policy, in one place: what is retried, and after how long.

Retryable errors say so (``PushWorkerError.retryable``): the registry or the Docker Engine not
answering (network, HTTP 5xx), the registry throttling (HTTP 429), a registry that reported a
credential refused and then accepted it (``registry_misbehaved``), the database away, a push that
did not verify. Authentication and validation errors are never retried: the same input fails
the same way.

Delays grow exponentially with full jitter. A throttled registry's ``Retry-After`` is honoured:
the delay is the larger of the backoff and what the registry asked for. Every delay, the
registry's wish included, is bounded by ``PUSHWORKER_RETRY_MAX`` (300 s by default), which stays
far under Redis' visibility timeout (``PUSHWORKER_PUSH_TIMEOUT`` + 600 s, 40 minutes by
default, worker/core/brokers.py): a waiting retry is never redelivered as a duplicate, and a
registry asking for an hour cannot park a job past it. (On RabbitMQ a countdown waits in the
broker's delayed-delivery queues, with no such bound.)
"""

from __future__ import annotations

import random

from worker.core.errors import PushWorkerError, RegistryThrottled


def should_retry(error: PushWorkerError, tries: int, max_attempts: int) -> bool:
    """True when ``error`` is transient and the step has been tried fewer than max times."""
    return error.retryable and tries < max_attempts


def backoff_delay(
    tries: int, *, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Seconds before try ``tries + 1``: uniform in [base/2, min(cap, base * 2**(tries-1))]."""
    ceiling = min(cap, base * 2 ** max(tries - 1, 0))
    low = min(base / 2, ceiling)
    return (rng or random).uniform(low, ceiling)


def retry_delay(
    error: PushWorkerError | None,
    tries: int,
    *,
    base: float,
    cap: float,
    rng: random.Random | None = None,
) -> float:
    """Seconds before retrying after ``error``: max(backoff, the registry's Retry-After),
    never more than ``cap``."""
    delay = backoff_delay(tries, base=base, cap=cap, rng=rng)
    asked = error.retry_after if isinstance(error, RegistryThrottled) else None
    if asked is not None:
        delay = max(delay, min(asked, cap))
    return min(delay, cap)
