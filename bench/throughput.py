"""Benchmarks 3 and 6: throughput of 40 jobs at worker concurrency 4 against four parallel CLI
loops, and the worker's memory meanwhile.

    eval "$(scripts/stack env)"; .venv/bin/python -m bench.throughput [--jobs 40] [--rounds 3]
        [--registry tls|plain|both] [--database sqlite|postgres] [--docker-cli PATH]

Per round and registry (interleaved, orders alternating): the pipeline gets ``--jobs`` distinct
1 MiB images enqueued at once (a loop of ``enqueue_push()`` calls) and is timed from the first
call to the last ``job.succeeded`` event; the baseline pushes as many other images with
``--cli-parallel`` (4) loops of ``docker tag && docker push`` at once (what ``xargs -P4`` would
do), with the newest ``docker`` CLI on the machine (or ``--docker-cli``);
``--cli-sequential`` adds one plain loop for context. While the pipeline runs, the resident
memory (RSS) of each worker process is sampled every 50 ms: the report gives each process's peak.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.common import (
    EXPECTED_NEW,
    REGISTRY_IDS,
    CpuMeter,
    DockerCLI,
    JobTiming,
    JobWatcher,
    MiB,
    RssSampler,
    Stats,
    baseline_arguments,
    chosen_cli,
    command_line,
    common_arguments,
    enqueue,
    load_line,
    machine_lines,
    make_images,
    ms,
    phase,
    registry_kinds,
    remove_images,
    repository_of,
    rss_bytes,
    save_results,
    setup,
    target_references,
    write_section,
)


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = load_line()
    kinds = registry_kinds(args.registry)
    binary = chosen_cli(args.docker_cli)
    bench = setup("throughput", args, kinds)
    created: list[str] = []
    try:
        sides = ["pipeline", "cli_parallel"] + (["cli"] if args.cli_sequential else [])
        plan = [(side, r, kind) for r in range(args.rounds) for kind in kinds for side in sides]
        with phase(f"images ({len(plan)} x {args.jobs} x {args.size_mib} MiB)"):
            size = args.size_mib * MiB
            images = {
                (side, r, kind): make_images(
                    bench.api, f"{bench.run_id}-tp-{kind}-{side}{r}", args.jobs, size
                )
                for side, r, kind in plan
            }
            warm = {
                kind: make_images(bench.api, f"{bench.run_id}-tp-{kind}-warm", args.warmup + 1, MiB)
                for kind in kinds
            }
            for refs in [*images.values(), *warm.values()]:
                created += refs
        worker = bench.worker(concurrency=args.concurrency)
        idle_rss = {pid: rss_bytes(pid) for pid in worker.pids()}
        watcher = JobWatcher(bench.database_url)
        clis = {kind: DockerCLI(bench, binary, bench.registries[kind].endpoint) for kind in kinds}
        for cli in clis.values():
            cli.login()
        meter = CpuMeter(bench, worker)
        with phase("warm-up (not measured)"):
            for kind in kinds:
                timings = [
                    enqueue(s, repository_of(s), registry_id=REGISTRY_IDS[kind])
                    for s in warm[kind][:-1]
                ]
                watcher.wait([t.job_id for t in timings])
                clis[kind].tag_and_push(warm[kind][-1], clis[kind].target(warm[kind][-1]))
        warm_rss = {pid: rss_bytes(pid) for pid in worker.pids()}

        def pipeline_round(kind: str, round_no: int) -> dict[str, Any]:
            sources = images[("pipeline", round_no, kind)]
            before = meter.snapshot()
            with RssSampler(worker) as rss:
                started = time.time()
                timings = [
                    enqueue(s, repository_of(s), registry_id=REGISTRY_IDS[kind]) for s in sources
                ]
                enqueued = time.time()
                watcher.wait([t.job_id for t in timings], poll=0.05)
            cpu = CpuMeter.delta(before, meter.snapshot())
            watcher.fill_events(timings)
            _check(timings)
            ends = [t.first("job.succeeded") for t in timings]
            return {
                "seconds": max(ends) - started,
                "enqueue_seconds": enqueued - started,
                "enqueue_calls": [t.enqueue_returned - t.enqueue_started for t in timings],
                "job_latency": [t.total for t in timings],
                "completions": [end - started for end in ends],
                "rss_peaks": {str(pid): peak for pid, peak in rss.peaks.items()},
                "rss_peak_sum": rss.peak_sum,
                "cpu_per_job": {k: v / len(timings) for k, v in cpu.items()},
            }

        rounds: list[dict[str, Any]] = []
        for round_no in range(args.rounds):
            # Registry order and side order alternate from round to round.
            for kind in kinds if round_no % 2 == 0 else tuple(reversed(kinds)):
                result: dict[str, Any] = {"round": round_no, "registry": kind}
                order = sides if round_no % 2 == 0 else list(reversed(sides))
                for side in order:
                    label = f"round {round_no + 1}/{args.rounds}, {kind}: {side}"
                    with phase(label):
                        if side == "pipeline":
                            result[side] = pipeline_round(kind, round_no)
                        else:
                            parallel = args.cli_parallel if side == "cli_parallel" else 1
                            result[side] = _cli_round(
                                clis[kind], images[(side, round_no, kind)], parallel, meter
                            )
                rounds.append(result)
        watcher.close()
        return {
            "args": vars(args),
            "registries": list(kinds),
            "cli_binary": {"path": binary.path, "version": binary.version},
            "rounds": rounds,
            "idle_rss": {str(k): v for k, v in idle_rss.items()},
            "warm_rss": {str(k): v for k, v in warm_rss.items()},
            "main_pid": str(worker.pid),
            "completions": {
                side: [r[side]["completions"] for r in rounds if side in r] for side in sides
            },
            "report": lambda after: machine_lines(bench, load_before, after, binary),
        }
    finally:
        remove_images(bench.api, target_references(bench.api, created))
        remove_images(bench.api, created)
        bench.close()


def _check(timings: list[JobTiming]) -> None:
    wrong = [t for t in timings if t.types != EXPECTED_NEW]
    if wrong:
        raise RuntimeError(f"{len(wrong)} jobs have unexpected events, e.g. {wrong[0].types}")


def _cli_round(
    cli: DockerCLI, sources: list[str], parallel: int, meter: CpuMeter
) -> dict[str, Any]:
    before = meter.snapshot()
    started = time.time()
    ends: list[float] = []

    def one(source: str) -> None:
        cli.tag_and_push(source, cli.target(source))
        ends.append(time.time())

    if parallel == 1:
        for source in sources:
            one(source)
    else:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            list(pool.map(one, sources))
    cpu = CpuMeter.delta(before, meter.snapshot())
    return {
        "seconds": max(ends) - started,
        "completions": [end - started for end in ends],
        "cpu_per_job": {k: v / len(sources) for k, v in cpu.items()},
    }


def report(results: dict[str, Any]) -> list[str]:
    args = results["args"]
    rounds = results["rounds"]
    jobs = args["jobs"]
    cli = results["cli_binary"]
    sides = [s for s in ("pipeline", "cli_parallel", "cli") if s in rounds[0]]
    names = {
        "pipeline": f"pipeline, concurrency {args['concurrency']}",
        "cli_parallel": f"CLI, {args['cli_parallel']} parallel loops (the baseline)",
        "cli": "CLI loop, sequential (context)",
    }

    def spread(values: list[float], digits: int = 2) -> str:
        return f"{min(values):.{digits}f}..{max(values):.{digits}f}"

    lines = [
        f"Command: `{command_line()}`",
        "",
        *results["report"](load_line()),
        f"- {args['rounds']} interleaved rounds per registry (side order and registry order "
        f"alternate) of {jobs} distinct {args['size_mib']} MiB images per side; pipeline timed "
        "from the first `enqueue_push()` to the last `job.succeeded`, all jobs enqueued at once "
        "by one producer loop; every job's events checked",
        f"- baseline: `{cli['path']} tag && {cli['path']} push` ({cli['version']}), "
        f"{args['cli_parallel']} loops at once (what `xargs -P{args['cli_parallel']}` does), "
        "from the first start to the last push's end",
        "- seconds: median of the rounds (min..max of the rounds); speed-up = baseline seconds / "
        "side seconds, of the medians (per-round speed-ups min..max)",
        "",
        "| registry | side | seconds (rounds) | jobs/s | speed-up vs parallel CLI (rounds) "
        "| goal |",
        "|---|---|---|---|---|---|",
    ]
    for kind in results.get("registries", ["tls"]):
        of_kind = [r for r in rounds if r.get("registry", "tls") == kind]
        base = [r["cli_parallel"]["seconds"] for r in of_kind]
        for side in sides:
            seconds = [r[side]["seconds"] for r in of_kind]
            speedups = [r["cli_parallel"]["seconds"] / r[side]["seconds"] for r in of_kind]
            med = statistics.median(seconds)
            speedup = statistics.median(base) / med
            goal = ""
            if side == "pipeline":
                goal = "≥ 1.0x " + ("met" if speedup >= 1.0 else "not met")
            lines.append(
                f"| {kind} | {names[side]} | {med:.2f} ({spread(seconds)}) | {jobs / med:.2f} "
                f"| **{speedup:.2f}x** ({spread(speedups)}) | {goal} |"
            )
    latency = Stats.of([x for r in rounds for x in r["pipeline"]["job_latency"]])
    calls = Stats.of([x for r in rounds for x in r["pipeline"]["enqueue_calls"]])
    enqueue_s = statistics.median([r["pipeline"]["enqueue_seconds"] for r in rounds])
    lines += [
        "",
        f"Under this load, a job's latency (enqueue → `job.succeeded`, queueing included) is "
        f"p50 {latency.ms()} ms, p90 {latency.ms('p90')} ms, max {latency.ms('maximum')} ms; "
        f"enqueueing the {jobs} jobs took {enqueue_s:.2f} s, one `enqueue_push()` call p50 "
        f"{calls.ms()} ms, p99 {calls.ms('p99')} ms (the worker writing to the same database "
        "meanwhile).",
        "",
        "CPU per job (ms, median over rounds; dockerd and the registry are shared with whatever "
        "else runs on the stack):",
        "",
        "| side | worker (main process) | producer | docker CLI | dockerd | registry | total |",
        "|---|---|---|---|---|---|---|",
    ]
    for side in sides:
        parts = ["worker", "producer", "cli", "dockerd", "registry"]
        having = [r for r in rounds if side in r]
        meds = {p: statistics.median([r[side]["cpu_per_job"][p] for r in having]) for p in parts}
        main = statistics.median([r[side]["cpu_per_job"]["worker_main"] for r in having])
        cells = [ms(meds[p]) if meds[p] > 0.0005 else "-" for p in parts]
        if meds["worker"] > 0.0005:
            cells[0] = f"{ms(meds['worker'])} ({ms(main)})"
        lines.append(f"| {names[side]} | {' | '.join(cells)} | {ms(sum(meds.values()))} |")

    # Benchmark 6: memory.
    main_pid = results["main_pid"]
    peaks: dict[str, list[int]] = {}
    for r in rounds:
        for pid, peak in r["pipeline"]["rss_peaks"].items():
            peaks.setdefault(pid, []).append(peak)
    mib = 2**20
    lines += [
        "",
        "Benchmark 6, worker memory (RSS) under this benchmark: peak per process over all rounds, "
        "against the same process idle after start and after the warm-up:",
        "",
        "| process | idle after start MiB | after warm-up MiB | peak under load MiB |",
        "|---|---|---|---|",
    ]
    ordered = [main_pid, *sorted(p for p in peaks if p != main_pid)]
    for index, pid in enumerate(p for p in ordered if p in peaks):
        name = "main (Celery consumer)" if pid == main_pid else f"pool process {index}"
        idle = results["idle_rss"].get(pid, 0) / mib
        warm = results["warm_rss"].get(pid, 0) / mib
        lines.append(f"| {name} | {idle:.1f} | {warm:.1f} | {max(peaks[pid]) / mib:.1f} |")
    peak_sum = max(r["pipeline"]["rss_peak_sum"] for r in rounds) / mib
    lines += [
        f"| **all worker processes together** | {sum(results['idle_rss'].values()) / mib:.1f} "
        f"| {sum(results['warm_rss'].values()) / mib:.1f} | **{peak_sum:.1f}** |",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument(
        "--cli-parallel", type=int, default=4,
        help="the baseline: this many CLI loops at once (default 4, the worker's concurrency)",
    )  # fmt: skip
    parser.add_argument("--cli-sequential", action="store_true",
                        help="also time one sequential CLI loop per round (context)")  # fmt: skip
    parser.add_argument("--plot", action="store_true",
                        help="also redraw docs/benchmark-throughput.png")  # fmt: skip
    common_arguments(parser)
    baseline_arguments(parser)
    args = parser.parse_args(argv)
    if args.rounds < 3:
        print("bench: fewer than 3 rounds give no honest spread", file=sys.stderr)
    results = run(args)
    lines = report(results)
    write_section(
        f"Benchmarks 3 and 6: throughput and worker memory against "
        f"{results['cli_binary']['path']} {results['cli_binary']['version']}, {args.database}, "
        f"registry {args.registry}",
        lines, print_only=args.no_report,
    )  # fmt: skip
    data = {k: v for k, v in results.items() if k != "report"}
    path = save_results("throughput", data)
    print(f"bench: raw results in {path}", file=sys.stderr)
    if args.plot:
        from bench.plot import plot_throughput

        print(f"bench: plot {plot_throughput(data)}", file=sys.stderr)


if __name__ == "__main__":
    main()
