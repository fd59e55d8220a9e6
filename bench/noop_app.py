"""A bare Celery app: four no-op tasks chained, configured like the pipeline's (benchmark 4).

    celery -A bench.noop_app worker -Q bench-noop ...

Same broker (``PUSHWORKER_BROKER_URL``), same delivery settings as ``celeryconfig`` (JSON, late
acks, prefetch 1, no result backend). The fourth task stamps the time it ran and hands it to the
producer through a Redis list, which is how the benchmark knows when the chain ended.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache
from typing import Any

import redis
from celery import Celery, chain

QUEUE = "bench-noop"
TASK = "bench.noop.step"
LENGTH = 4

app = Celery("bench-noop", broker=os.environ.get("PUSHWORKER_BROKER_URL"))
app.conf.update(
    result_backend=None,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=QUEUE,
    task_routes={"bench.noop.*": {"queue": QUEUE}},
    broker_connection_retry_on_startup=True,
    worker_send_task_events=False,
)


@lru_cache(maxsize=1)
def _redis() -> redis.Redis:
    return redis.Redis.from_url(str(app.conf.broker_url))


def done_key(token: str) -> str:
    return f"bench:noop:done:{token}"


@app.task(name=TASK)  # type: ignore[untyped-decorator]
def step(token: str, index: int) -> None:
    if index == LENGTH - 1:
        finished = time.time()
        _redis().rpush(done_key(token), repr(finished))


def start(token: str) -> None:
    """Publish one chain of the four no-op tasks, as CeleryDispatcher publishes a job's."""
    signatures = [
        app.signature(TASK, args=(token, index), immutable=True, queue=QUEUE)
        for index in range(LENGTH)
    ]
    chain(*signatures).apply_async(queue=QUEUE)


def wait(token: str, timeout: float = 60) -> float:
    """The time the chain's last task ran."""
    found: Any = _redis().blpop([done_key(token)], timeout=int(timeout))
    if found is None:
        raise TimeoutError(f"the no-op chain {token} did not finish within {timeout} s")
    return float(found[1])
