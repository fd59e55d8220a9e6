"""The fleet's ceiling on PostgreSQL: how event appends and whole jobs scale with the number of
writing processes, for the event log in lanes against the single global chain it replaced.

    .venv/bin/python -m bench.fleet [--processes 1,2,4,8,16] [--seconds 10] [--rounds 3]

Each process writes as fast as it can for a fixed window, against one PostgreSQL database of
the stack's server (one per variant, migrated by that variant's own code):

- ``append``: one event per transaction (``worker.store.events.append``), eleven to a stream
  like a job's;
- ``pipeline``: ``create_job`` and the four steps (``worker.engine.pipeline.StepRunner``,
  inline) against fakes of Docker and the registry (``tests/support/fakes.py``): a real job's
  database work (nine transactions, eleven events) with the network taken out.

The baseline is the project's own code from before the lanes (the parent of the commit that
added migration 0010, extracted with ``git archive``), run the same way in the same rounds,
interleaved. ``pg_stat_activity`` is sampled every 20 ms: the share of the benchmark's busy
sessions that wait on an advisory lock (the chain's or a lane's). Nothing is asserted: the
numbers are reported in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    Stats,
    _create_pg_database,
    _drop_pg_database,
    command_line,
    load_line,
    machine,
    save_results,
    write_section,
)
from harness.stack import stack_env

VARIANTS = ("lanes", "global-chain")
LABELS = {
    "lanes": "lanes (this code)",
    "global-chain": "one global chain (the code before the lanes)",
}
MODES = ("append", "pipeline")
#: Events per stream in the append mode, as many as a job records.
EVENTS_PER_STREAM = 11


def _quiet_logs() -> None:
    import structlog

    # The event log lines are not what is measured here.
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())


def _use_code(code_root: str | None, url: str) -> None:
    """Import ``worker`` (and ``tests``) from ``code_root`` in this fresh process."""
    if code_root is not None:
        sys.path.insert(0, code_root)
    os.environ["PUSHWORKER_DATABASE_URL"] = url


def _prepare(code_root: str | None, url: str) -> None:
    _use_code(code_root, url)
    _quiet_logs()
    from worker.registries import RegistrySpec, create_registry
    from worker.store.db import session_scope
    from worker.store.migrate import upgrade

    upgrade(url)
    with session_scope() as session:
        spec = RegistrySpec(name="r", url="https://reg.example.com", username="u", secret="pw")
        create_registry(session, spec, registry_id=1)


def _writer(
    code_root: str | None, url: str, mode: str, seconds: float, start: Any, out: Any
) -> None:
    _use_code(code_root, url)
    _quiet_logs()
    from tests.support.fakes import FakeWorld, fake_runner
    from worker.core.settings import get_settings
    from worker.jobs import PushRequest, create_job
    from worker.store import db, events

    if code_root is not None and not str(events.__file__).startswith(code_root):
        raise RuntimeError(f"the baseline imported {events.__file__}, not code from {code_root}")
    world = FakeWorld(images={"app:1": "sha256:" + "ab" * 32})
    _, dispatcher = fake_runner(world, get_settings())
    db.engine_for(url).connect().close()
    start.wait(120)
    times: list[float] = []
    stream, written = f"job/{uuid.uuid4()}", 0
    deadline = time.perf_counter() + seconds
    while (now := time.perf_counter()) < deadline:
        if mode == "append":
            if written == EVENTS_PER_STREAM:
                stream, written = f"job/{uuid.uuid4()}", 0
            with db.session_scope() as session:
                events.append(
                    session, stream=stream, type="step.progress", actor="worker:bench",
                    payload={"bytes_pushed": written},
                )  # fmt: skip
            written += 1
        else:
            request = PushRequest("app:1", 1, f"bench/f-{uuid.uuid4().hex[:10]}", "v1", "bench")
            with db.session_scope() as session:
                job, _ = create_job(session, request, actor="producer:bench")
                job_id = job.id
            dispatcher.start_chain(job_id, 1)
        times.append(time.perf_counter() - now)
    out.put(times)


class LockSampler:
    """Samples ``pg_stat_activity`` of one database: busy sessions, and those waiting on an
    advisory lock."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.database = url.rsplit("/", 1)[1]
        self.connection = psycopg.connect(
            url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
        )
        self.busy = self.waiting = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        query = (
            "SELECT count(*) FILTER (WHERE state <> 'idle'),"
            " count(*) FILTER (WHERE wait_event_type = 'Lock' AND wait_event = 'advisory')"
            " FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
        )
        while not self._stop.wait(0.02):
            row = self.connection.execute(query, (self.database,)).fetchone()
            if row is not None:
                self.busy += int(row[0])
                self.waiting += int(row[1])

    def __enter__(self) -> LockSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.connection.close()

    @property
    def share(self) -> float:
        return self.waiting / self.busy if self.busy else 0.0


def _one(
    code_root: str | None, url: str, variant: str, mode: str, processes: int, seconds: float
) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")  # each writer imports its own code
    out = context.Queue()
    start = context.Barrier(processes + 1)
    workers = [
        context.Process(target=_writer, args=(code_root, url, mode, seconds, start, out))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    start.wait(120)
    with LockSampler(url) as sampler:
        began = time.perf_counter()
        times = [t for _ in workers for t in out.get(timeout=seconds + 120)]
        wall = time.perf_counter() - began
    for worker in workers:
        worker.join(60)
    return {
        "variant": variant, "mode": mode, "processes": processes, "wall": wall,
        "count": len(times), "times": times, "lock_wait_share": sampler.share,
    }  # fmt: skip


def _baseline_code(directory: Path, rev: str | None) -> tuple[str, str]:
    """The code before the lanes, extracted into ``directory``: (its path, its commit)."""
    if rev is None:
        added = subprocess.run(
            ["git", "log", "--diff-filter=A", "--format=%H", "--",
             "worker/store/migrations/versions/0010_event_lanes.py"],
            cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout.split()  # fmt: skip
        rev = f"{added[-1]}^"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "archive", commit, "worker", "tests", "harness"],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True)
    return str(directory), commit


def run(args: argparse.Namespace) -> dict[str, Any]:
    from cryptography.fernet import Fernet

    os.environ.setdefault("PUSHWORKER_SECRET_KEY", Fernet.generate_key().decode())
    stack = stack_env()
    load_before = load_line()
    names = {variant: f"bench_fleet_{variant.replace('-', '_')}" for variant in VARIANTS}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pushworker-fleet-") as directory:
        baseline, commit = _baseline_code(Path(directory), args.baseline_rev)
        code = {"lanes": None, "global-chain": baseline}
        urls = {}
        try:
            for variant in VARIANTS:
                _drop_pg_database(stack, names[variant])
                urls[variant] = _create_pg_database(stack, names[variant])
                prepare = multiprocessing.get_context("spawn").Process(
                    target=_prepare, args=(code[variant], urls[variant])
                )
                prepare.start()
                prepare.join(300)
                assert prepare.exitcode == 0, f"preparing {variant} failed"
            for round_no in range(args.rounds):
                for mode in args.modes:
                    for processes in args.processes:
                        order = VARIANTS if round_no % 2 == 0 else VARIANTS[::-1]
                        for variant in order:
                            print(
                                f"bench: round {round_no + 1}/{args.rounds}: {mode}, "
                                f"{processes} processes, {variant}...",
                                file=sys.stderr,
                            )
                            runs.append(
                                _one(code[variant], urls[variant], variant, mode, processes,
                                     args.seconds)
                            )  # fmt: skip
        finally:
            for variant in VARIANTS:
                _drop_pg_database(stack, names[variant])
    return {
        "runs": runs, "load_before": load_before, "load_after": load_line(),
        "baseline_commit": commit, "args": vars(args),
    }  # fmt: skip


def report(results: dict[str, Any]) -> list[str]:
    args = results["args"]
    info = machine()
    lines = [
        f"Command: `{command_line()}`",
        "",
        f"- machine: {info['host']}, {info['cpu']}, {info['memory']}, Linux {info['kernel']}, "
        f"Python {info['python']}; PostgreSQL of the stack on loopback",
        f"- load before: {results['load_before']}",
        f"- load after: {results['load_after']}",
        f"- baseline: the project's code at {results['baseline_commit']} "
        + (
            "(given with --baseline-rev)"
            if args.get("baseline_rev")
            else "(one global chain, one advisory lock held by every append until commit)"
        )
        + ", run in the same rounds",
        f"- {args['rounds']} interleaved rounds of {args['seconds']:g} s windows per variant, "
        "mode and process count; per cell the rate of each round (min..max), the median and p99 "
        "of one append (or one job) over all rounds, and the share of the busy sessions "
        "sampled (every 20 ms) that were waiting on an advisory lock",
        "",
        "| mode | processes | variant | per second, rounds (min..max) | p50 ms | p99 ms | "
        "waiting on a lock |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in args["modes"]:
        for processes in args["processes"]:
            for variant in VARIANTS:
                runs = [
                    r for r in results["runs"]
                    if (r["mode"], r["processes"], r["variant"]) == (mode, processes, variant)
                ]  # fmt: skip
                if not runs:
                    continue
                rates = [r["count"] / r["wall"] for r in runs]
                stats = Stats.of([t for r in runs for t in r["times"]])
                waiting = sum(r["lock_wait_share"] for r in runs) / len(runs)
                unit = "appends" if mode == "append" else "jobs"
                label = LABELS[variant]
                if variant == "global-chain" and args.get("baseline_rev"):
                    label = f"the code at {results['baseline_commit'][:10]}"
                lines.append(
                    f"| {mode} | {processes} | {label} | {unit}: "
                    f"{', '.join(f'{rate:.0f}' for rate in rates)} ({min(rates):.0f}.."
                    f"{max(rates):.0f}) | {stats.ms()} | {stats.ms('p99')} | {waiting:.0%} |"
                )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,2,4,8,16",
                        help="comma-separated process counts (default 1,2,4,8,16)")  # fmt: skip
    parser.add_argument("--modes", default="append,pipeline", help="append, pipeline or both")
    parser.add_argument("--seconds", type=float, default=10, help="window per cell (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--baseline-rev",
        help="the baseline's commit (default: before 0010; "
        "another one is named by its commit in the report)",
    )
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="print the section instead of appending it to docs/benchmarks.md",
    )
    args = parser.parse_args(argv)
    args.processes = [int(n) for n in args.processes.split(",")]
    args.modes = [m for m in args.modes.split(",") if m in MODES]
    results = run(args)
    save_results("fleet", results)
    write_section(
        "The fleet's ceiling on PostgreSQL: lanes against one global chain",
        report(results),
        print_only=args.no_report,
    )


if __name__ == "__main__":
    main()
