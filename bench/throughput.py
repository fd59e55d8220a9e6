"""Benchmarks 3 and 6: throughput of 200 jobs at worker concurrency 4 against the sequential CLI
loop, and the worker's memory meanwhile.

    eval "$(scripts/stack env)"; .venv/bin/python -m bench.throughput [--jobs 200] [--rounds 2]

Per round (interleaved): the pipeline gets ``--jobs`` distinct 1 MiB images enqueued at once
(a loop of ``enqueue_push()`` calls) and is timed from the first call to the last
``job.succeeded`` event; the CLI loop pushes as many other images one after the other
(``docker tag && docker push``); and, for context, the same loop run four at a time (what
``xargs -P4`` would do). While the pipeline runs, the resident memory (RSS) of each worker
process is sampled every 50 ms: the report gives each process's peak.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
    enqueue,
    load_line,
    machine_lines,
    make_images,
    ms,
    phase,
    remove_images,
    repository_of,
    rss_bytes,
    save_results,
    setup,
    target_references,
    write_section,
)
from harness.worker import CeleryProcess


class RssSampler:
    """Peak RSS of each of the worker's processes (main and pool), sampled every 50 ms."""

    def __init__(self, worker: CeleryProcess) -> None:
        self.worker = worker
        self.peaks: dict[int, int] = {}
        self.peak_sum = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def _sample(self) -> None:
        total = 0
        for pid in self.worker.pids():
            rss = rss_bytes(pid)
            total += rss
            self.peaks[pid] = max(self.peaks.get(pid, 0), rss)
        self.peak_sum = max(self.peak_sum, total)


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = load_line()
    bench = setup("throughput", args)
    created: list[str] = []
    try:
        sides = ["pipeline", "cli"] + (["cli_parallel"] if args.cli_parallel else [])
        plan = [
            (side, r)
            for r in range(args.rounds)
            for side in sides
            if side != "cli_parallel" or r == 0  # context, not a comparison: one round
        ]
        with phase(f"images ({len(plan)} x {args.jobs} x {args.size_mib} MiB)"):
            images = {
                (side, r): make_images(
                    bench.api, f"{bench.run_id}-tp-{side}{r}", args.jobs, args.size_mib * MiB
                )
                for side, r in plan
            }
            warm = make_images(bench.api, f"{bench.run_id}-tp-warm", args.warmup + 1, MiB)
            for refs in [*images.values(), warm]:
                created += refs
        worker = bench.worker(concurrency=args.concurrency)
        idle_rss = {pid: rss_bytes(pid) for pid in worker.pids()}
        watcher = JobWatcher(bench.database_url)
        cli = DockerCLI(bench)
        cli.login()
        meter = CpuMeter(bench, worker)
        with phase("warm-up (not measured)"):
            timings = [enqueue(s, repository_of(s)) for s in warm[:-1]]
            watcher.wait([t.job_id for t in timings])
            cli.tag_and_push(warm[-1], cli.target(warm[-1]))
        warm_rss = {pid: rss_bytes(pid) for pid in worker.pids()}

        rounds: list[dict[str, Any]] = []
        for round_no in range(args.rounds):
            result: dict[str, Any] = {"round": round_no}
            with phase(f"round {round_no + 1}/{args.rounds}: pipeline"):
                sources = images[("pipeline", round_no)]
                before = meter.snapshot()
                with RssSampler(worker) as rss:
                    started = time.time()
                    timings = [enqueue(s, repository_of(s)) for s in sources]
                    enqueued = time.time()
                    watcher.wait([t.job_id for t in timings], poll=0.05)
                cpu = CpuMeter.delta(before, meter.snapshot())
                watcher.fill_events(timings)
                _check(timings)
                ends = [t.first("job.succeeded") for t in timings]
                result["pipeline"] = {
                    "seconds": max(ends) - started,
                    "enqueue_seconds": enqueued - started,
                    "enqueue_calls": [t.enqueue_returned - t.enqueue_started for t in timings],
                    "job_latency": [t.total for t in timings],
                    "completions": [end - started for end in ends],
                    "rss_peaks": {str(pid): peak for pid, peak in rss.peaks.items()},
                    "rss_peak_sum": rss.peak_sum,
                    "cpu_per_job": {k: v / len(timings) for k, v in cpu.items()},
                }
            with phase(f"round {round_no + 1}/{args.rounds}: CLI loop"):
                result["cli"] = _cli_round(cli, images[("cli", round_no)], 1, meter)
            if ("cli_parallel", round_no) in images:
                with phase(f"round {round_no + 1}/{args.rounds}: CLI, {args.cli_parallel} at once"):
                    result["cli_parallel"] = _cli_round(
                        cli, images[("cli_parallel", round_no)], args.cli_parallel, meter
                    )
            rounds.append(result)
        watcher.close()
        return {
            "args": vars(args),
            "rounds": rounds,
            "idle_rss": {str(k): v for k, v in idle_rss.items()},
            "warm_rss": {str(k): v for k, v in warm_rss.items()},
            "main_pid": str(worker.pid),
            "completions": {
                side: [r[side]["completions"] for r in rounds if side in r] for side in sides
            },
            "report": lambda after: machine_lines(bench, load_before, after),
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
    sides = [s for s in ("pipeline", "cli", "cli_parallel") if s in rounds[0]]

    def having(side: str) -> list[dict[str, Any]]:
        return [r for r in rounds if side in r]

    names = {
        "pipeline": f"pipeline, concurrency {args['concurrency']}",
        "cli": "CLI loop, sequential (the baseline)",
        "cli_parallel": f"CLI loop, {args['cli_parallel']} at once (context; "
        f"{len(having('cli_parallel'))} round(s))",
    }
    lines = [
        f"Command: `{command_line()}`",
        "",
        *results["report"](load_line()),
        f"- {args['rounds']} interleaved rounds of {jobs} distinct {args['size_mib']} MiB images "
        "per side; pipeline timed from the first `enqueue_push()` to the last `job.succeeded`, "
        "all jobs enqueued at once; every job's events checked",
        "",
        "| side | seconds per round, median (min-max) | jobs/s (median) | speed-up vs CLI loop "
        "(median; per round) | goal |",
        "|---|---|---|---|---|",
    ]
    cli_seconds = [r["cli"]["seconds"] for r in rounds]
    for side in sides:
        seconds = [r[side]["seconds"] for r in having(side)]
        speedups = [r["cli"]["seconds"] / r[side]["seconds"] for r in having(side)]
        med = statistics.median(seconds)
        goal = ""
        if side == "pipeline":
            speedup = statistics.median(cli_seconds) / med
            goal = "≥ 2x " + ("met" if speedup >= 2 else "not met")
        lines.append(
            f"| {names[side]} | {med:.1f} ({min(seconds):.1f}-{max(seconds):.1f}) "
            f"| {jobs / med:.2f} | **{statistics.median(cli_seconds) / med:.2f}x** "
            f"({', '.join(f'{x:.2f}' for x in speedups)}) | {goal} |"
        )
    latency = Stats.of([x for r in rounds for x in r["pipeline"]["job_latency"]])
    calls = Stats.of([x for r in rounds for x in r["pipeline"]["enqueue_calls"]])
    enqueue_s = statistics.median([r["pipeline"]["enqueue_seconds"] for r in rounds])
    lines += [
        "",
        f"Under this load, a job's latency (enqueue → `job.succeeded`, queueing included) is "
        f"p50 {latency.ms()} ms, p90 {latency.ms('p90')} ms, max {latency.ms('maximum')} ms; "
        f"enqueueing the {jobs} jobs took {enqueue_s:.1f} s, one `enqueue_push()` call p50 "
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
        meds = {
            p: statistics.median([r[side]["cpu_per_job"][p] for r in having(side)]) for p in parts
        }
        main = statistics.median([r[side]["cpu_per_job"]["worker_main"] for r in having(side)])
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
        "",
        "![jobs finished over time](benchmark-throughput.png)",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size-mib", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument(
        "--cli-parallel",
        type=int,
        default=4,
        help="also run the CLI loop this many at once (0: not)",
    )
    common_arguments(parser)
    args = parser.parse_args(argv)
    results = run(args)
    lines = report(results)
    write_section("Benchmarks 3 and 6: throughput and worker memory", lines,
                  print_only=args.no_report)  # fmt: skip
    data = {k: v for k, v in results.items() if k != "report"}
    path = save_results("throughput", data)
    print(f"bench: raw results in {path}", file=sys.stderr)
    if not args.no_report:
        from bench.plot import plot_throughput

        print(f"bench: plot {plot_throughput(data)}", file=sys.stderr)


if __name__ == "__main__":
    main()
