"""The retry policy, in one place: what is retried, and after how long.

Retryable errors say so (``PushWorkerError.retryable``): the registry or the Docker Engine not
answering, the database away, a push that did not verify. Authentication and validation errors
are never retried: the same input fails the same way. Delays grow exponentially with full
jitter, and are capped well under the broker's visibility timeout so that a waiting retry is
never redelivered as a duplicate.
"""

from __future__ import annotations

import random

from worker.errors import PushWorkerError


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
