"""Benchmark 4: orchestration overhead per job, against a bare chain of four no-op Celery tasks.

    eval "$(scripts/stack env)"; .venv/bin/python -m bench.overhead [--jobs 10] [--rounds 3]

Pipeline side: new pushes of distinct 1 MiB images, one job at a time, through a worker that
runs the project's own app with timing wrappers around its seams (``bench/instrumented.py``).
Per job: the time from ``enqueue_push()`` to the ``job.succeeded`` event, minus the daemon's own
push time, which is the wall time of ``DockerEngine.push`` (the push request to the daemon until
the last chunk of its stream). Two other readings are given beside it: minus the push step's
whole duration (``step.started`` -> ``step.succeeded`` of ``push``, which needs no wrappers but
also removes the step's own checks), and minus every call to the daemon and to the registry
(what is left is Celery, the database and Python).

Baseline: a bare Celery app (``bench/noop_app.py``) with four no-op tasks chained, on the same
broker, same worker concurrency and delivery settings; from ``apply_async`` to the fourth task.
Rounds are interleaved: pipeline batch, bare-chain batch, and so on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import (
    EXPECTED_NEW,
    JobTiming,
    JobWatcher,
    MiB,
    Stats,
    command_line,
    common_arguments,
    load_line,
    machine_lines,
    make_images,
    ms,
    paired_round_ratios,
    phase,
    ratio_range,
    remove_images,
    repository_of,
    run_one,
    save_results,
    setup,
    target_references,
    write_section,
)

DOCKER_KINDS = ("docker.push", "docker.login", "docker.tag", "docker.inspect", "docker.connect")


def load_traces(trace_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Task records by job id, in the order the tasks started."""
    jobs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in trace_dir.glob("trace-*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("job"):
                jobs[record["job"]].append(record)
    for records in jobs.values():
        records.sort(key=lambda r: r["prerun"])
    return jobs


def span_sum(records: list[dict[str, Any]], *kinds: str) -> float:
    return float(
        sum(end - start for r in records for kind, start, end in r["spans"] if kind in kinds)
    )


def breakdown(timing: JobTiming, records: list[dict[str, Any]]) -> dict[str, float]:
    """Where one job's time went, in seconds."""
    if [r["task"].rsplit(".", 1)[-1] for r in records] != [
        "resolve_credentials", "login", "tag", "push",
    ]:  # fmt: skip
        raise RuntimeError(f"job {timing.job_id}: unexpected tasks {[r['task'] for r in records]}")
    total = timing.total
    daemon_push = span_sum(records, "docker.push")
    docker_all = span_sum(records, *DOCKER_KINDS)
    registry = span_sum(records, "registry.http", "registry.session")
    step_run = span_sum(records, "step.run")
    in_tasks = sum(r["postrun"] - r["prerun"] for r in records)
    hops = (
        records[0]["prerun"]
        - timing.enqueue_returned
        + sum(
            later["prerun"] - earlier["postrun"] for earlier, later in itertools.pairwise(records)
        )
    )
    db_tx = span_sum(records, "db.tx")
    return {
        "total": total,
        "daemon_push": daemon_push,
        "overhead": total - daemon_push,
        "overhead_step_based": total - timing.step_seconds("push"),
        "own": total - docker_all - registry,
        "enqueue_call": timing.enqueue_returned - timing.enqueue_started,
        "hops": hops,
        "celery_in_task": in_tasks - step_run,
        "celery_publish": span_sum(records, "celery.publish"),
        "db_tx": db_tx,
        "db_commit": span_sum(records, "db.commit"),
        "events_append": span_sum(records, "events.append"),
        "sql_statements": float(sum(r["sql_n"] for r in records)),
        "sql_seconds": sum(r["sql_s"] for r in records),
        "transactions": float(sum(1 for r in records for s in r["spans"] if s[0] == "db.tx")),
        "docker_other": docker_all - daemon_push,
        "docker_login": span_sum(records, "docker.login"),
        "docker_inspect": span_sum(records, "docker.inspect"),
        "docker_calls": float(sum(1 for r in records for s in r["spans"] if s[0] in DOCKER_KINDS)),
        "registry_http": registry,
        "registry_requests": float(
            sum(1 for r in records for s in r["spans"] if s[0] == "registry.http")
        ),
        "credentials": span_sum(records, "credentials"),
        "step_python": step_run - db_tx - docker_all - registry - span_sum(records, "credentials"),
        "after_event": records[-1]["postrun"] - timing.first("job.succeeded"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = load_line()
    bench = setup("overhead", args)
    created: list[str] = []
    try:
        trace_dir = bench.workdir / "trace"
        trace_dir.mkdir()
        with phase("images"):
            sources = make_images(
                bench.api, f"{bench.run_id}-oh", args.rounds * args.jobs + args.warmup, MiB
            )
            created += sources
        bench.worker(
            "bench.instrumented", concurrency=args.concurrency,
            extra_env={"BENCH_TRACE_DIR": str(trace_dir)}, label="pipeline",
        )  # fmt: skip
        bench.worker("bench.noop_app", concurrency=args.concurrency, queue="bench-noop",
                     label="noop")  # fmt: skip
        import bench.noop_app as noop  # after setup(): the broker URL is in the environment

        watcher = JobWatcher(bench.database_url)

        def chain_once() -> float:
            token = uuid.uuid4().hex
            started = time.time()
            noop.start(token)
            return noop.wait(token) - started

        with phase("warm-up (not measured)"):
            for source in sources[: args.warmup]:
                run_one(watcher, source, repository_of(source))
            for _ in range(args.chains):
                chain_once()
        measured = sources[args.warmup :]
        timings: list[tuple[int, JobTiming]] = []
        chains: list[tuple[int, float]] = []
        for round_no in range(args.rounds):
            with phase(f"round {round_no + 1}/{args.rounds}"):
                for source in measured[round_no * args.jobs : (round_no + 1) * args.jobs]:
                    timing = run_one(watcher, source, repository_of(source))
                    if timing.types != EXPECTED_NEW:
                        raise RuntimeError(f"job {timing.job_id} has events {timing.types}")
                    timings.append((round_no, timing))
                for _ in range(args.chains):
                    chains.append((round_no, chain_once()))
        watcher.close()
        for worker in bench.workers:
            worker.stop()  # flushes nothing more, but ends the trace files
        traces = load_traces(trace_dir)
        jobs = [
            {"round": round_no, "job_id": t.job_id, **breakdown(t, traces[t.job_id])}
            for round_no, t in timings
        ]
        return {
            "args": vars(args),
            "jobs": jobs,
            "chains": [{"round": r, "total": v} for r, v in chains],
            "report": lambda after: machine_lines(bench, load_before, after),
        }
    finally:
        remove_images(bench.api, target_references(bench.api, created))
        remove_images(bench.api, created)
        bench.close()


ROWS = [
    ("enqueue_call", "producer call `enqueue_push()` (job row + event commit, publish)"),
    ("hops", "Celery hand-offs: publish -> worker -> pool process, x4 (gaps between tasks)"),
    ("celery_in_task", "Celery inside the pool process, outside the step (incl. next publish)"),
    ("db_tx", "database transactions of the steps (claim + record, x4)"),
    (
        "events_append",
        "  of which event appends (`events.append`, and `append_guarded` with the "
        "claim's or the success's row change it follows)",
    ),
    ("db_commit", "  of which commits"),
    ("sql_seconds", "  of which SQL statement execution"),
    ("docker_login", "daemon: login (the daemon authenticates against the registry)"),
    ("docker_inspect", "daemon: image inspects"),
    ("docker_other", "daemon: all calls but the push"),
    ("registry_http", "registry HTTP (digest check after the push, incl. TLS set-up)"),
    ("credentials", "credential resolution (Fernet decrypt), x3"),
    ("step_python", "the rest of the steps (Python: references, guards, logging)"),
    ("daemon_push", "daemon: the push itself (excluded from the overhead)"),
]


def report(results: dict[str, Any]) -> list[str]:
    args = results["args"]
    jobs, chains = results["jobs"], results["chains"]
    bare = Stats.of([c["total"] for c in chains])
    lines = [
        f"Command: `{command_line()}`",
        "",
        *results["report"](load_line()),
        f"- {args['rounds']} interleaved rounds of {args['jobs']} pipeline jobs (new 1 MiB "
        f"pushes, one at a time) and {args['chains']} bare chains; worker concurrency "
        f"{args['concurrency']} on both sides; {args['warmup']} warm-up jobs not counted",
        "- pipeline worker: `bench/instrumented.py` (the project's app with timing wrappers; "
        "about 40 wrapped calls a job, each a `time.time()` pair)",
        "- overhead = enqueue → `job.succeeded` minus the wall time of `DockerEngine.push` "
        "(the daemon's push); baseline = `apply_async` of the bare chain → its 4th task ran",
        "",
        "| reading | n | pipeline p50 (min-max) ms | pipeline p90 | bare chain p50 "
        "(min-max) ms | bare p90 | ratio p50 | ratio per round | goal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, label in [
        ("overhead", "**job time - daemon push time** (the issue's definition)"),
        ("overhead_step_based", "job time - push step (`step.started`→`step.succeeded`)"),
        ("own", "job time - every daemon and registry call (Celery + DB + Python)"),
        ("total", "whole job, for reference"),
    ]:
        values = [j[key] for j in jobs]
        s = Stats.of(values)
        rounds = paired_round_ratios(
            [(j["round"], j[key]) for j in jobs], [(c["round"], c["total"]) for c in chains]
        )
        ratio = s.median / bare.median
        goal = "≤ 2.0 " + ("met" if ratio <= 2 else "not met") if key == "overhead" else ""
        lines.append(
            f"| {label} | {s.n} | {s.ms()} ({s.range_ms()}) | {s.ms('p90')} | {bare.ms()} "
            f"({bare.range_ms()}) | {bare.ms('p90')} | **{ratio:.2f}** | {ratio_range(rounds)} "
            f"| {goal} |"
        )
    lines += [
        "",
        "Where a job's time goes (medians over jobs; the parts overlap where indented and do "
        "not sum exactly to the total):",
        "",
        "| part | ms per job (median) | share of the overhead |",
        "|---|---|---|",
    ]
    overhead = statistics.median([j["overhead"] for j in jobs])
    for key, label in ROWS:
        value = statistics.median([j[key] for j in jobs])
        share = "" if key == "daemon_push" else f"{value / overhead:.0%}"
        lines.append(f"| {label} | {ms(value)} | {share} |")
    counts = {
        key: statistics.median([j[key] for j in jobs])
        for key in ("sql_statements", "transactions", "docker_calls", "registry_requests")
    }
    lines += [
        "",
        f"Per job (medians): {counts['transactions']:.0f} step transactions, "
        f"{counts['sql_statements']:.0f} SQL statements, {counts['docker_calls']:.0f} daemon "
        f"calls, {counts['registry_requests']:.0f} registry HTTP requests, 10 events. "
        f"The `job.succeeded` event is stamped "
        f"{ms(statistics.median([j['after_event'] for j in jobs]))} ms before the last task "
        "ends (its commit and Celery's ack): the job times above leave that out.",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10, help="pipeline jobs per round")
    parser.add_argument("--chains", type=int, default=30, help="bare chains per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=4)
    common_arguments(parser)
    args = parser.parse_args(argv)
    results = run(args)
    lines = report(results)
    write_section("Benchmark 4: orchestration overhead", lines, print_only=args.no_report)
    path = save_results("overhead", {k: v for k, v in results.items() if k != "report"})
    print(f"bench: raw results in {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
