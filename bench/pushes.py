"""Benchmarks 1 and 2: per-job time of the pipeline against ``docker tag && docker push``.

    eval "$(scripts/stack env)"; .venv/bin/python -m bench.pushes [--jobs 10] [--rounds 3]

1. New pushes: distinct images of 1 MiB (and ``--large-mib``, 50 MiB by default), each through
   the whole pipeline (enqueue -> four sub-tasks -> events -> digest verified), timed from the
   producer's call to the ``job.succeeded`` event, one job at a time; against a shell loop doing
   ``docker tag SRC DST && docker push DST`` per image after one ``docker login``.
2. Re-pushes: the same images again, which the registry already holds (a new job each, same
   repository and tag); against the same CLI commands, run again.

Rounds are interleaved: pipeline batch, CLI batch, pipeline batch... The CLI pushes its own
images (distinct from the pipeline's), so that every "new" push is new to the registry. The
per-job distributions are plotted to docs/benchmark-pushes.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench.common import (
    EXPECTED_NEW,
    CpuMeter,
    DockerCLI,
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

STEPS = ("resolve_credentials", "login", "tag", "push")
EXPECTED_REPUSH = [
    "job.enqueued",
    *["step.started", "step.succeeded"] * 2,
    *["step.started", "step.skipped"] * 2,
    "job.succeeded",
]


def pipeline_record(round_no: int, timing: JobTiming, expected: list[str]) -> dict[str, Any]:
    if timing.types != expected:
        raise RuntimeError(f"job {timing.job_id} has events {timing.types}, not {expected}")
    first_start = timing.first("step.started", STEPS[0])
    record: dict[str, Any] = {
        "round": round_no,
        "job_id": timing.job_id,
        "total": timing.total,
        "enqueue_call": timing.enqueue_returned - timing.enqueue_started,
        "to_first_step": first_start - timing.enqueue_started,
        "steps": {step: timing.step_seconds(step) for step in STEPS},
    }
    record["between_steps"] = (
        timing.first("job.succeeded") - first_start - sum(record["steps"].values())
    )
    return record


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = load_line()
    bench = setup("pushes", args)
    created: list[str] = []
    try:
        with phase("images"):
            small = args.size_mib * MiB
            large = args.large_mib * MiB
            plan = {
                "new": (small, args.jobs),
                "large": (large, args.large_jobs),
            }
            images: dict[tuple[str, str, int], list[str]] = {}
            for scenario, (size, count) in plan.items():
                if count <= 0:
                    continue
                for side in ("p", "c"):
                    for round_no in range(args.rounds):
                        prefix = f"{bench.run_id}-{scenario}-{side}{round_no}"
                        refs = make_images(bench.api, prefix, count, size)
                        images[(scenario, side, round_no)] = refs
                        created += refs
            warm = make_images(bench.api, f"{bench.run_id}-warm", args.warmup + 1, small)
            created += warm
        worker = bench.worker(concurrency=args.concurrency)
        watcher = JobWatcher(bench.database_url)
        cli = DockerCLI(bench)
        login_seconds = cli.login()
        with phase("warm-up (not measured)"):
            for source in warm[:-1]:
                run_one(watcher, source, repository_of(source))
            cli.tag_and_push(warm[-1], cli.target(warm[-1]))

        pipeline: dict[str, list[dict[str, Any]]] = {"new": [], "large": [], "repush": []}
        baseline: dict[str, list[dict[str, Any]]] = {"new": [], "large": [], "repush": []}
        cpu: dict[str, list[dict[str, float]]] = {}
        meter = CpuMeter(bench, worker)

        @contextmanager
        def measured_cpu(key: str, count: int) -> Iterator[None]:
            before = meter.snapshot()
            yield
            delta = CpuMeter.delta(before, meter.snapshot())
            cpu.setdefault(key, []).append({k: v / count for k, v in delta.items()})

        def pipeline_batch(scenario: str, sources: list[str], round_no: int) -> None:
            expected = EXPECTED_REPUSH if scenario == "repush" else EXPECTED_NEW
            with measured_cpu(f"{scenario}/pipeline", len(sources)):
                timings = [run_one(watcher, source, repository_of(source)) for source in sources]
            for timing in timings:
                pipeline[scenario].append(pipeline_record(round_no, timing, expected))

        def cli_batch(scenario: str, sources: list[str], round_no: int) -> None:
            with measured_cpu(f"{scenario}/cli", len(sources)):
                for source in sources:
                    tag_s, push_s = cli.tag_and_push(source, cli.target(source))
                    baseline[scenario].append(
                        {"round": round_no, "total": tag_s + push_s, "tag": tag_s, "push": push_s}
                    )

        for round_no in range(args.rounds):
            with phase(f"round {round_no + 1}/{args.rounds}"):
                for scenario in ("new", "large"):
                    if (scenario, "p", round_no) not in images:
                        continue
                    pipeline_batch(scenario, images[(scenario, "p", round_no)], round_no)
                    cli_batch(scenario, images[(scenario, "c", round_no)], round_no)
                # The images this round pushed as new: the registry holds them now.
                pipeline_batch("repush", images[("new", "p", round_no)], round_no)
                cli_batch("repush", images[("new", "c", round_no)], round_no)
        digests_ok = _verify_digests(watcher, pipeline)
        watcher.close()
        worker_log_bytes = worker.log_path.stat().st_size
        return {
            "args": vars(args),
            "cli_login": login_seconds,
            "pipeline": pipeline,
            "cli": baseline,
            "cpu": cpu,
            "digests_verified": digests_ok,
            "worker_log_bytes": worker_log_bytes,
            "report": lambda after: machine_lines(bench, load_before, after),
        }
    finally:
        remove_images(bench.api, target_references(bench.api, created))
        remove_images(bench.api, created)
        bench.close()


def _verify_digests(watcher: JobWatcher, pipeline: dict[str, list[dict[str, Any]]]) -> int:
    """Every job recorded the digest its push step verified against the registry."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from worker.store.models import PushJob

    ids = [r["job_id"] for records in pipeline.values() for r in records]
    with Session(watcher.engine) as session:
        rows = session.execute(select(PushJob.id, PushJob.digest).where(PushJob.id.in_(ids)))
        digests = {job_id: digest for job_id, digest in rows}
    missing = [job_id for job_id in ids if not (digests.get(job_id) or "").startswith("sha256:")]
    if missing:
        raise RuntimeError(f"{len(missing)} jobs have no verified digest, e.g. {missing[0]}")
    return len(ids)


GOALS = {"new": 1.0, "large": 1.0, "repush": 0.5}
LABELS = {
    "new": "new push, {size} MiB",
    "large": "new push, {large} MiB",
    "repush": "re-push, {size} MiB (registry has it)",
}


def report(results: dict[str, Any]) -> list[str]:
    args = results["args"]
    lines = [
        f"Command: `{command_line()}`",
        "",
        *results["report"](load_line()),
        f"- {args['rounds']} interleaved rounds; per round and side {args['jobs']} x "
        f"{args['size_mib']} MiB and {args['large_jobs']} x {args['large_mib']} MiB new pushes, "
        f"then the {args['jobs']} small images again (re-push); worker concurrency "
        f"{args['concurrency']}, jobs one at a time; {args['warmup']} warm-up jobs not counted",
        "- pipeline: `enqueue_push()` to the `job.succeeded` event (stamped in the last step's "
        "transaction); every job's events checked, and its digest verified by the push step "
        f"({results['digests_verified']} jobs)",
        f"- CLI: `docker tag && docker push` per image after one `docker login` "
        f"({ms(results['cli_login'])} ms, not counted)",
        "",
        "| benchmark | jobs/side | pipeline median (min-max) ms | CLI median (min-max) ms "
        "| ratio | ratio per round | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for scenario in ("new", "large", "repush"):
        p_records, c_records = results["pipeline"][scenario], results["cli"][scenario]
        if not p_records or not c_records:
            continue
        p = Stats.of([r["total"] for r in p_records])
        c = Stats.of([r["total"] for r in c_records])
        ratio = p.median / c.median
        rounds = paired_round_ratios(
            [(r["round"], r["total"]) for r in p_records],
            [(r["round"], r["total"]) for r in c_records],
        )
        goal = GOALS[scenario]
        label = LABELS[scenario].format(size=args["size_mib"], large=args["large_mib"])
        lines.append(
            f"| {label} | {p.n} | {p.ms()} ({p.range_ms()}) | {c.ms()} ({c.range_ms()}) "
            f"| **{ratio:.2f}** | {ratio_range(rounds)} | ≤ {goal} "
            f"{'met' if ratio <= goal else 'not met'} |"
        )
    lines += [
        "",
        "Where the pipeline's time goes (medians, ms; from the job's own events: step = "
        "`step.started` to `step.succeeded`/`skipped`, hops = the rest between the first "
        "`step.started` and `job.succeeded`, i.e. Celery handing on and the claim/record "
        "transactions around the steps):",
        "",
        "| benchmark | enqueue call | enqueue → 1st step | resolve | login | tag | push | hops "
        "| CLI tag | CLI push |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario in ("new", "large", "repush"):
        p_records, c_records = results["pipeline"][scenario], results["cli"][scenario]
        if not p_records or not c_records:
            continue

        def med(values: list[float]) -> str:
            return ms(statistics.median(values))

        steps = [med([r["steps"][s] for r in p_records]) for s in STEPS]
        label = LABELS[scenario].format(size=args["size_mib"], large=args["large_mib"])
        lines.append(
            f"| {label} | {med([r['enqueue_call'] for r in p_records])} "
            f"| {med([r['to_first_step'] for r in p_records])} | {' | '.join(steps)} "
            f"| {med([r['between_steps'] for r in p_records])} "
            f"| {med([r['tag'] for r in c_records])} | {med([r['push'] for r in c_records])} |"
        )
    lines += [
        "",
        "CPU per job (ms, median over batches; `producer` is this benchmark's process: the "
        "enqueue call and its polling for the job's end; dockerd and the registry are shared "
        "with whatever else runs on the stack):",
        "",
        "| benchmark | side | worker (of which main process) | producer | docker CLI | dockerd "
        "| registry | total |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, batches in results["cpu"].items():
        scenario, side = key.split("/")
        label = LABELS[scenario].format(size=args["size_mib"], large=args["large_mib"])
        parts = ["worker", "producer", "cli", "dockerd", "registry"]
        meds = {p: statistics.median([b[p] for b in batches]) for p in parts}
        total = statistics.median([sum(b[p] for p in parts) for b in batches])
        cells = " | ".join(ms(meds[p]) if meds[p] > 0.0005 else "-" for p in parts)
        if meds["worker"] > 0.0005:
            main_ms = ms(statistics.median([b["worker_main"] for b in batches]))
            cells = cells.replace(ms(meds["worker"]), f"{ms(meds['worker'])} ({main_ms})", 1)
        lines.append(f"| {label} | {side} | {cells} | {ms(total)} |")
    lines += ["", "![per-job times, pipeline vs CLI](benchmark-pushes.png)"]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10, help="small images per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=1)
    parser.add_argument("--large-mib", type=int, default=50)
    parser.add_argument("--large-jobs", type=int, default=2, help="0: no large images")
    parser.add_argument("--warmup", type=int, default=4, help="pipeline jobs before measuring")
    common_arguments(parser)
    args = parser.parse_args(argv)
    results = run(args)
    lines = report(results)
    write_section("Benchmarks 1 and 2: pushes and re-pushes", lines, print_only=args.no_report)
    data = {k: v for k, v in results.items() if k != "report"}
    path = save_results("pushes", data)
    print(f"bench: raw results in {path}", file=sys.stderr)
    if not args.no_report:
        from bench.plot import plot_pushes

        print(f"bench: plot {plot_pushes(data)}", file=sys.stderr)


if __name__ == "__main__":
    main()
