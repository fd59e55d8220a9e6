"""Webhook delivery latency: from a job's ``job.succeeded`` event to the receiver.

    eval "$(scripts/stack env)"; .venv/bin/python -m bench.webhook_latency [--jobs 40]

A push worker, a webhook worker (queue ``pushworker.webhooks``, concurrency 2) and Celery beat
(``PUSHWORKER_WEBHOOK_EVERY``, 2 s by default, as deployed; the push worker also kicks a run
when a wanted event commits), on this benchmark's own database
and broker database; one subscription to ``job.succeeded`` whose receiver is the tests' receiver
process on loopback (``tests/support/webhook_receiver.py``: it verifies every signature with
``standardwebhooks`` and records when each request arrived). Jobs are enqueued one every
``--spacing`` seconds. Latency = the receiver's arrival time of the (first verified, 2xx)
delivery minus the ``time`` of the ``job.succeeded`` event it carries; both clocks are this
machine's. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from typing import Any

from bench.common import (
    Stats,
    command_line,
    common_arguments,
    load_line,
    machine_lines,
    make_images,
    phase,
    repository_of,
    save_results,
    setup,
    write_section,
)
from harness.worker import CeleryProcess


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = load_line()
    bench = setup("webhooks", args)
    webhook_env = {"PUSHWORKER_WEBHOOK_EVERY": str(args.every)}
    beat: CeleryProcess | None = None
    receiver = None
    try:
        from bench.common import JobWatcher, enqueue
        from tests.support.webhook_receiver import Receiver, free_port
        from worker.store.db import session_scope
        from worker.webhooks import add_subscription

        bench.worker(concurrency=args.concurrency, extra_env=webhook_env)
        bench.worker(queue="pushworker.webhooks", concurrency=2, extra_env=webhook_env,
                     label="webhooks")  # fmt: skip
        beat = CeleryProcess({**bench.env, **webhook_env}, bench.workdir / "beat.log", beat=True)
        beat.start()
        port = free_port()
        with session_scope() as session:
            _subscription, secret = add_subscription(
                session, f"http://127.0.0.1:{port}/hooks", ["job.succeeded"],
                allow_private=True, actor="operator:bench",
            )  # fmt: skip
        receiver = Receiver(bench.workdir, secret, port=port).start()
        images = make_images(bench.api, bench.run_id, args.jobs, 64 * 1024)
        watcher = JobWatcher(bench.database_url)
        jobs: list[str] = []
        with phase(f"{args.jobs} pushes, one every {args.spacing} s"):
            for image in images:
                jobs.append(enqueue(image, repository_of(image)).job_id)
                time.sleep(args.spacing)
            watcher.wait(jobs)
        with phase("deliveries"):
            arrivals = _wait_for_deliveries(receiver, set(jobs), timeout=300)
        latencies = sorted(arrivals.values())
        stats = Stats.of(latencies)
        load_after = load_line()
        data = {
            "jobs": args.jobs, "every": args.every, "spacing": args.spacing,
            "latency": stats.to_dict(), "database": bench.database,
        }  # fmt: skip
        path = save_results("webhook_latency", data)
        lines = [
            f"Command: `{command_line()}`; results: `{path.relative_to(path.parents[2])}`.",
            "",
            f"{args.jobs} pushes, one every {args.spacing} s; beat runs the webhook task every "
            f"{args.every} s; one subscription (`job.succeeded`), its receiver on loopback "
            "verifying each signature. From the `job.succeeded` event to the receiver:",
            "",
            "| deliveries | p50 ms | p90 ms | p99 ms | min-max ms |",
            "|---|---|---|---|---|",
            f"| {stats.n} | {stats.ms()} | {stats.ms('p90')} | {stats.ms('p99')} | "
            f"{stats.range_ms()} |",
            "",
            "The push worker kicks a delivery run when the event commits (tasks.webhooks), so "
            "the latency is the kick's trip through the broker, the webhook worker's planning "
            "and one loopback POST; beat's run every interval is the fallback.",
            "",
            *machine_lines(bench, load_before, load_after),
        ]
        write_section("Webhook delivery latency", lines, print_only=args.no_report)
        watcher.close()
        return data
    finally:
        if receiver is not None:
            receiver.stop()
        if beat is not None:
            beat.stop()
        bench.close()


def _wait_for_deliveries(receiver: Any, jobs: set[str], *, timeout: float) -> dict[str, float]:
    """``{job id: seconds from its job.succeeded event to the receiver}``."""
    deadline = time.monotonic() + timeout
    found: dict[str, float] = {}
    while time.monotonic() < deadline:
        for line in receiver.answered():
            payload = line.get("payload")
            if not (line["verified"] and line["status"] == 200 and payload):
                continue
            job_id = payload["data"]["job_id"]
            if job_id in jobs and job_id not in found:
                event_time = datetime.fromisoformat(payload["data"]["time"]).timestamp()
                found[job_id] = line["time"] - event_time
        if len(found) == len(jobs):
            return found
        time.sleep(0.2)
    raise TimeoutError(f"{len(jobs) - len(found)} deliveries did not arrive within {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    common_arguments(parser)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--spacing", type=float, default=0.5, help="seconds between enqueues")
    parser.add_argument("--every", type=float, default=2.0, help="PUSHWORKER_WEBHOOK_EVERY")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
