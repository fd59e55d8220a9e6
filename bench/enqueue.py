"""Benchmark 5: latency of the producer API, ``worker.producer.enqueue_push()``.

    eval "$(scripts/stack env)"; .venv/bin/python -m bench.enqueue [--calls 100] [--rounds 5]

Each call validates the request, commits the job row and its ``job.enqueued`` event, then
publishes the job's chain on the broker. Timed per call, split into the database part and the
publish (``worker.producer._publish``, timed by wrapping it in this process). No worker consumes
the queue (the messages are dropped at the end), so this is the producer alone; benchmark 3
reports the same call while a busy worker writes to the same database.

Interleaved with the floor of any Celery producer: ``apply_async`` of a bare chain of four
tasks on the same broker (``bench/noop_app.py``), nothing consuming it either.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from typing import Any

from bench.common import (
    BENCH_REGISTRY_ID,
    Stats,
    command_line,
    common_arguments,
    load_line,
    machine_lines,
    save_results,
    setup,
    write_section,
)


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = load_line()
    bench = setup("enqueue", args)
    try:
        import bench.noop_app as noop  # after setup(): the broker URL is in the environment
        import worker.producer as client

        publish_times: list[float] = []
        # enqueue_push() publishes through _publish (publish() is reconcile's way, which first
        # reads the run's trace): the wrapper sits where the call goes.
        real_publish = client._publish

        def timed_publish(job_id: str, registry_id: int) -> bool:
            started = time.perf_counter()
            try:
                return real_publish(job_id, registry_id)
            finally:
                publish_times.append(time.perf_counter() - started)

        client._publish = timed_publish
        run_id = uuid.uuid4().hex[:8]
        counter = iter(range(10**9))

        def enqueue_once() -> tuple[float, float]:
            n = next(counter)
            started = time.perf_counter()
            client.enqueue_push(
                source_image=f"pushworker-bench/enqueue-{run_id}:latest",
                registry_id=BENCH_REGISTRY_ID, repository=f"bench/enqueue-{run_id}-{n}",
                tag="v1", requested_by="bench:enqueue", idempotency_key=f"{run_id}-{n}",
            )  # fmt: skip
            return time.perf_counter() - started, publish_times[-1]

        def bare_once() -> float:
            started = time.perf_counter()
            noop.start(uuid.uuid4().hex)
            return time.perf_counter() - started

        for _ in range(args.warmup):
            enqueue_once()
            bare_once()
        calls: list[dict[str, float]] = []
        bare: list[dict[str, float]] = []
        for round_no in range(args.rounds):
            for _ in range(args.calls):
                total, publish = enqueue_once()
                calls.append({"round": round_no, "total": total, "publish": publish})
            for _ in range(args.calls):
                bare.append({"round": round_no, "total": bare_once()})
        client._publish = real_publish
        return {
            "args": vars(args),
            "calls": calls,
            "bare": bare,
            "report": lambda after: machine_lines(bench, load_before, after),
        }
    finally:
        bench.close()


def report(results: dict[str, Any]) -> list[str]:
    args = results["args"]
    calls = results["calls"]
    total = Stats.of([c["total"] for c in calls])
    publish = Stats.of([c["publish"] for c in calls])
    database = Stats.of([c["total"] - c["publish"] for c in calls])
    bare = Stats.of([b["total"] for b in results["bare"]])
    lines = [
        f"Command: `{command_line()}`",
        "",
        *results["report"](load_line()),
        f"- {args['rounds']} interleaved rounds of {args['calls']} `enqueue_push()` calls "
        f"(distinct repositories, each with an idempotency key) and {args['calls']} bare "
        f"`apply_async` of a four-task chain; {args['warmup']} warm-up calls of each not "
        "counted; no worker running",
        "",
        "| what | n | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
    ]
    for label, s in [
        ("**`enqueue_push()`**, whole call", total),
        ("  validation + job row + `job.enqueued` event, committed", database),
        ("  publish (`_publish`: the job's route read back, the chain sent)", publish),
        ("bare chain of 4 no-op tasks, `apply_async` (the floor)", bare),
    ]:
        lines.append(
            f"| {label} | {s.n} | {s.ms()} | {s.ms('p90')} | {s.ms('p99')} | {s.ms('maximum')} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=100, help="calls per round and side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=20)
    common_arguments(parser)
    args = parser.parse_args(argv)
    results = run(args)
    write_section("Benchmark 5: enqueue latency", report(results), print_only=args.no_report)
    path = save_results("enqueue", {k: v for k, v in results.items() if k != "report"})
    print(f"bench: raw results in {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
