"""What a task that ends by raising costs a prefork pool process in memory, with Celery alone.

A bare Celery app (this module) with one prefork child runs batches of tasks that return, raise
``Ignore``, or retry once (``Retry``), and the child's RSS is read after each batch; then the
same with the exception's traceback dropped in ``task_postrun`` (what tasks/app.py does) and with
a full ``gc.collect()`` after every task. It shows the mechanism behind the pool's growth that
docs/benchmarks.md describes (capacity model, "Workers"): each raising task leaves a reference
cycle the collector is slow to find. Prints a table; writes nothing to docs/benchmarks.md.

    .venv/bin/python -m bench.celery_raise [--tasks 1500] [--batches 4] [--broker-db 9]
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import Ignore
from celery.signals import task_postrun

ROOT = Path(__file__).resolve().parent.parent
MODE = os.environ.get("CELERY_RAISE_MODE", "")

app = Celery("celery_raise", broker=os.environ.get("CELERY_RAISE_BROKER", "redis://"))
app.conf.task_ignore_result = True
app.conf.worker_prefetch_multiplier = 1
app.conf.task_acks_late = True


# Named explicitly: the driver runs as __main__, the worker imports bench.celery_raise.
@app.task(bind=True, name="celery_raise.returns")  # type: ignore[untyped-decorator]
def returns(self: Task) -> dict[str, int]:
    return {"ok": 1}


@app.task(bind=True, name="celery_raise.ignores")  # type: ignore[untyped-decorator]
def ignores(self: Task) -> None:
    raise Ignore()


@app.task(bind=True, name="celery_raise.retries_once", max_retries=None)  # type: ignore[untyped-decorator]
def retries_once(self: Task) -> dict[str, int]:
    if self.request.retries < 1:
        raise self.retry(countdown=0)
    return {"ok": 1}


if MODE == "drop":
    # What tasks/app.py's ``_drop_traceback`` does, written here again on purpose: importing
    # tasks.app would connect the project's handlers (that one included) in every mode.

    @task_postrun.connect(weak=False)  # type: ignore[untyped-decorator]
    def _drop(retval: Any = None, **_: object) -> None:
        if isinstance(retval, BaseException):
            retval.__traceback__ = None

elif MODE == "collect":

    @task_postrun.connect(weak=False)  # type: ignore[untyped-decorator]
    def _collect(**_: object) -> None:
        gc.collect()


TASKS = {"returns": returns, "ignores": ignores, "retries once": retries_once}


def _child_rss(pid: int) -> int:
    """MiB of the worker's pool process."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    child = children.stdout.split()[0]
    status = Path(f"/proc/{child}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024


def _run(name: str, mode: str, broker: str, tasks: int, batches: int) -> list[int]:
    client = redis.Redis.from_url(broker)
    client.flushdb()
    env = {**os.environ, "CELERY_RAISE_MODE": mode, "CELERY_RAISE_BROKER": broker}
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench.celery_raise", "worker", "-c", "1",
         "-l", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(4)
        sizes = [_child_rss(worker.pid)]
        task = TASKS[name]
        for _ in range(batches):
            for _ in range(tasks):
                task.delay()
            while int(client.llen("celery")) > 0:  # type: ignore[arg-type]
                time.sleep(0.2)
            time.sleep(1.0)  # the last tasks end
            sizes.append(_child_rss(worker.pid))
        # The queue drains as well when the worker refuses the tasks: count what it ran.
        stats = app.control.inspect(timeout=5).stats() or {}
        ran = sum(node.get("total", {}).get(task.name, 0) for node in stats.values())
        if ran < tasks * batches:
            raise SystemExit(f"the worker ran {ran} of {tasks * batches} {task.name} tasks")
        return sizes
    finally:
        worker.terminate()
        worker.wait()
        client.flushdb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1500, help="tasks per batch")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--broker-db", type=int, default=9, help="Redis database (flushed)")
    args = parser.parse_args()
    base = os.environ.get("PUSHWORKER_STACK_REDIS_URL", "redis://127.0.0.1:6379")
    broker = f"{base}/{args.broker_db}"
    app.conf.broker_url = broker
    print(f"pool process RSS in MiB: at start, then after each batch of {args.tasks} tasks")
    print(
        "| task | as Celery leaves it | traceback dropped in task_postrun | gc.collect() a task |"
    )
    print("|---|---|---|---|")
    for name in TASKS:
        cells = [
            " -> ".join(str(size) for size in _run(name, mode, broker, args.tasks, args.batches))
            for mode in ("", "drop", "collect")
        ]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
