"""Benchmark: what tracing costs a job, off against on.

    eval "$(scripts/stack env)"; .venv/bin/python -m bench.tracing [--jobs 15] [--rounds 3]

Two workers of the project's own app, each alone on the broker in its turn: one with no OTEL_*
variable (tracing off: the OpenTelemetry API's no-op spans), one exporting every span over
OTLP/HTTP (``OTEL_EXPORTER_OTLP_ENDPOINT``, the default batch processor) to a receiver process on
loopback that decodes and stores them (``tests/support/otlp_receiver.py``, as the e2e test uses).
This process, the producer, is off or on with its worker. Rounds interleave: off, on, off, on...

Per job (new pushes of distinct 1 MiB images, one at a time): the time from ``enqueue_push()``
to the ``job.succeeded`` event; per round: the CPU time of the worker (its main process and pool
processes, from /proc) and of this process (the producer and its exporter), per job. Each
round's worker starts fresh and runs one warm-up job first, not counted.

First, in this process alone (``--in-process-jobs``): whole jobs through the producer and the
four steps' claim, act and record on the real database, the seams' own code in front of
stand-ins of docker-py's client and of the registry (``tests/support/stub_seams.py``), each step
in its step span as the Celery task runs it: the CPU time tracing adds to a job with nothing
else moving (its export to the receiver included), off and on interleaved.

Nothing is asserted: the figures are printed (``--no-report``) or appended to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from typing import Any

from bench.common import (
    EXPECTED_NEW,
    JobWatcher,
    MiB,
    Stats,
    command_line,
    common_arguments,
    cpu_seconds,
    load_line,
    machine_lines,
    make_images,
    ms,
    phase,
    remove_images,
    repository_of,
    run_one,
    save_results,
    setup,
    target_references,
    write_section,
)
from harness.worker import process_children
from tests.support.otlp_receiver import OtlpReceiver

SIDES = ("off", "on")


def _cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def _this_process_cpu() -> float:
    times = os.times()
    return times.user + times.system


def in_process(args: argparse.Namespace, otel: dict[str, str]) -> list[dict[str, Any]]:
    """CPU seconds per job of whole jobs run in this process, off and on, per round."""

    from tests.support.stub_seams import (
        HOST,
        PASSWORD,
        SOURCE,
        StubDockerApi,
        TracedChain,
        stub_http,
    )  # fmt: skip
    from worker.core import tracing
    from worker.core.settings import Settings
    from worker.engine.dispatch import set_dispatcher
    from worker.engine.pipeline import StepRunner
    from worker.producer import enqueue_push
    from worker.registries import RegistrySpec, create_registry
    from worker.seams.docker_engine import DockerEngine
    from worker.store.db import session_scope

    with session_scope() as session:
        spec = RegistrySpec(name="stub", url=f"https://{HOST}", username="u", secret=PASSWORD)
        create_registry(session, spec, registry_id=STUB_REGISTRY_ID)
    chain = TracedChain()
    engine = DockerEngine(api=StubDockerApi())
    chain.runner = StepRunner(
        dispatcher=chain, engine_factory=lambda: engine, settings=Settings.from_env(),
        http_factory=stub_http,
    )  # fmt: skip
    set_dispatcher(chain)
    measured: list[dict[str, Any]] = []
    try:
        for round_no in range(-1, args.rounds):  # round -1: a warm-up, not reported
            for side in SIDES:
                for key in otel:
                    os.environ.pop(key, None)
                if side == "on":
                    os.environ.update(otel)
                tracing.reset()
                cpu, wall = time.process_time(), time.perf_counter()
                for _ in range(args.in_process_jobs):
                    enqueue_push(
                        source_image=SOURCE, registry_id=STUB_REGISTRY_ID,
                        repository=f"bench/in-process-{uuid.uuid4().hex[:8]}", tag="v1",
                        requested_by="bench",
                    )  # fmt: skip
                tracing.force_flush()  # the export belongs to the cost
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                if round_no >= 0:
                    measured.append({
                        "round": round_no, "side": side,
                        "cpu_per_job": cpu / args.in_process_jobs,
                        "wall_per_job": wall / args.in_process_jobs,
                    })  # fmt: skip
    finally:
        set_dispatcher(None)
        for key in otel:
            os.environ.pop(key, None)
        tracing.reset()
    return measured


#: The stand-in registry of the in-process part (the bench's real one is 1).
STUB_REGISTRY_ID = 2


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = load_line()
    bench = setup("tracing", args)
    created: list[str] = []
    receiver = OtlpReceiver(bench.workdir).start()
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": "pushworker-bench",
    }
    from worker.core import tracing

    try:
        with phase("in process"):
            local = in_process(args, otel) if args.in_process_jobs else []
        per_round = args.jobs + 1  # one warm-up job each
        with phase("images"):
            sources = make_images(
                bench.api, f"{bench.run_id}-tr", args.rounds * len(SIDES) * per_round, MiB
            )
            created += sources
        watcher = JobWatcher(bench.database_url)
        jobs: list[dict[str, Any]] = []
        rounds: list[dict[str, Any]] = []
        batches = iter(range(0, len(sources), per_round))
        for round_no in range(args.rounds):
            for side in SIDES:
                batch = sources[next(batches) :][:per_round]
                extra = otel if side == "on" else {}
                # This process too: the producer's spans (and its exporter's work) count.
                for key in otel:
                    os.environ.pop(key, None)
                os.environ.update(extra)
                tracing.reset()
                with phase(f"round {round_no + 1}/{args.rounds}, tracing {side}"):
                    worker = bench.worker(
                        concurrency=args.concurrency, extra_env=extra,
                        label=f"{side}-{round_no}",
                    )  # fmt: skip
                    run_one(watcher, batch[0], repository_of(batch[0]))  # warm-up
                    pids = [worker.pid, *process_children(worker.pid)]
                    worker_before, producer_before = _cpu(pids), _this_process_cpu()
                    for source in batch[1:]:
                        timing = run_one(watcher, source, repository_of(source))
                        if timing.types != EXPECTED_NEW:
                            raise RuntimeError(f"job {timing.job_id} has events {timing.types}")
                        jobs.append({"round": round_no, "side": side, "job_id": timing.job_id,
                                     "total": timing.total})  # fmt: skip
                    tracing.force_flush()
                    worker_cpu = _cpu(pids) - worker_before
                    producer_cpu = _this_process_cpu() - producer_before
                    worker.stop()  # the pool processes export what they still hold
                    bench.workers.remove(worker)
                    rounds.append({
                        "round": round_no, "side": side, "jobs": args.jobs,
                        "worker_cpu_per_job": worker_cpu / args.jobs,
                        "producer_cpu_per_job": producer_cpu / args.jobs,
                    })  # fmt: skip
        tracing.reset()
        watcher.close()
        time.sleep(0.5)
        spans = receiver.spans()
        traced = {s["attributes"].get("pushworker.job.id") for s in spans}
        on_jobs = [j["job_id"] for j in jobs if j["side"] == "on"]
        off_jobs = [j["job_id"] for j in jobs if j["side"] == "off"]
        missing = [job for job in on_jobs if job not in traced]
        if missing or any(job in traced for job in off_jobs):
            raise RuntimeError(
                f"spans: {len(missing)} traced jobs without spans, or an untraced job with some"
            )
        return {
            "args": vars(args),
            "jobs": jobs,
            "rounds": rounds,
            "spans": len(spans),
            "in_process": local,
            "report": lambda after: machine_lines(bench, load_before, after),
        }
    finally:
        for key in otel:
            os.environ.pop(key, None)
        tracing.reset()
        receiver.stop()
        remove_images(bench.api, target_references(bench.api, created))
        remove_images(bench.api, created)
        bench.close()


def report(results: dict[str, Any]) -> list[str]:
    args, jobs, rounds = results["args"], results["jobs"], results["rounds"]
    lines = [
        f"Command: `{command_line()}`",
        "",
        *results["report"](load_line()),
        f"- {args['rounds']} interleaved rounds of {args['jobs']} jobs per side (new 1 MiB "
        f"pushes, one at a time; a fresh worker of concurrency {args['concurrency']} per round, "
        "its first job a warm-up not counted)",
        "- off: no OTEL_* variable; on: OTEL_EXPORTER_OTLP_ENDPOINT to an OTLP/HTTP receiver "
        f"process on loopback, default batch processor; {results['spans']} spans received, "
        "every traced job's, none of an untraced one",
        "",
        "| reading | off p50 (min-max) | on p50 (min-max) | on / off | per round (on / off) |",
        "|---|---|---|---|---|",
    ]
    totals = {side: Stats.of([j["total"] for j in jobs if j["side"] == side]) for side in SIDES}
    per_round = [
        (
            statistics.median([j["total"] for j in jobs if (j["round"], j["side"]) == (r, "on")]),
            statistics.median([j["total"] for j in jobs if (j["round"], j["side"]) == (r, "off")]),
        )
        for r in range(args["rounds"])
    ]
    off, on = totals["off"], totals["on"]
    lines.append(
        f"| job time, enqueue → `job.succeeded` (ms) | {off.ms()} ({off.range_ms()}) | "
        f"{on.ms()} ({on.range_ms()}) | **{on.median / off.median:.2f}** | "
        f"{', '.join(f'{a / b:.2f}' for a, b in per_round)} |"
    )
    for key, label in (
        ("worker_cpu_per_job", "worker CPU per job (ms; main + pool processes)"),
        ("producer_cpu_per_job", "producer CPU per job (ms; this process, its exporter too)"),
    ):
        by_side = {
            side: [r[key] for r in rounds if r["side"] == side] for side in SIDES
        }  # fmt: skip
        paired = [
            next(r[key] for r in rounds if (r["round"], r["side"]) == (n, "on"))
            / next(r[key] for r in rounds if (r["round"], r["side"]) == (n, "off"))
            for n in range(args["rounds"])
        ]
        med = {side: statistics.median(values) for side, values in by_side.items()}
        lines.append(
            f"| {label} | {ms(med['off'])} ({ms(min(by_side['off']))}-{ms(max(by_side['off']))}) "
            f"| {ms(med['on'])} ({ms(min(by_side['on']))}-{ms(max(by_side['on']))}) | "
            f"**{med['on'] / med['off']:.2f}** | {', '.join(f'{p:.2f}' for p in paired)} |"
        )
    local = results["in_process"]
    if local:
        lines += [
            "",
            f"In this process alone ({args['in_process_jobs']} jobs per side and round, "
            "producer and steps on the same SQLite database, docker-py's client and the "
            "registry stood in for; the export to the receiver counted):",
            "",
            "| reading | off p50 (min-max) | on p50 (min-max) | on - off | on / off per round |",
            "|---|---|---|---|---|",
        ]
        for key, label in (
            ("cpu_per_job", "CPU per job (ms)"),
            ("wall_per_job", "wall per job (ms)"),
        ):
            by_side = {side: [r[key] for r in local if r["side"] == side] for side in SIDES}
            med = {side: statistics.median(v) for side, v in by_side.items()}
            paired = [
                next(r[key] for r in local if (r["round"], r["side"]) == (n, "on"))
                / next(r[key] for r in local if (r["round"], r["side"]) == (n, "off"))
                for n in range(args["rounds"])
            ]
            lines.append(
                f"| {label} | {ms(med['off'])} ({ms(min(by_side['off']))}-"
                f"{ms(max(by_side['off']))}) | {ms(med['on'])} ({ms(min(by_side['on']))}-"
                f"{ms(max(by_side['on']))}) | **{ms(med['on'] - med['off'])}** | "
                f"{', '.join(f'{p:.2f}' for p in paired)} |"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=15, help="measured jobs per side per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--in-process-jobs", type=int, default=100,
        help="jobs per side and round of the in-process part (0: skip it)",
    )  # fmt: skip
    common_arguments(parser)
    args = parser.parse_args(argv)
    results = run(args)
    lines = report(results)
    write_section("Tracing: a job's cost, off against on", lines, print_only=args.no_report)
    path = save_results("tracing", {k: v for k, v in results.items() if k != "report"})
    print(f"bench: raw results in {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
