"""SQLite write-lock contention: several processes writing jobs to one database file, with the
project's lock wait (short jittered retries) against SQLite's own busy handler.

    .venv/bin/python -m bench.contention [--processes 5] [--jobs 60] [--rounds 2]

Each process runs ``create_job`` and the four steps (``worker.engine.pipeline.StepRunner``, inline)
against fakes of Docker and the registry (``tests/support/fakes.py``): the database writes of a
real job (nine transactions, eleven events) and nothing else, as fast as it can. That is the
shape of an enqueue burst beside a busy worker, with the network taken out. The baseline
variant swaps ``worker.store.db._sqlite_begin_immediate`` for a plain ``BEGIN IMMEDIATE`` that waits
in SQLite's busy handler (``busy_timeout``), which is what the project did before. Needs no
stack: a fresh SQLite file per round and variant.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import Stats, command_line, load_line, machine, save_results, write_section

VARIANTS = ("retries", "busy-handler")
LABELS = {
    "retries": "the project's wait (retries of at most 4 ms, jittered)",
    "busy-handler": "SQLite's busy handler (`busy_timeout`, sleeps up to 100 ms)",
}


def _busy_handler_begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _writer(url: str, variant: str, jobs: int, out: Any) -> None:
    os.environ["PUSHWORKER_DATABASE_URL"] = url
    import structlog

    from worker.store import db

    if variant == "busy-handler":
        db._sqlite_begin_immediate = _busy_handler_begin
    # The event log lines are not what is measured here.
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    from tests.support.fakes import FakeWorld, fake_runner
    from worker.core.settings import get_settings
    from worker.jobs import PushRequest, create_job

    world = FakeWorld(images={"app:1": "sha256:" + "ab" * 32})
    _, dispatcher = fake_runner(world, get_settings())
    times = []
    for _ in range(jobs):
        started = time.perf_counter()
        request = PushRequest("app:1", 1, f"bench/c-{uuid.uuid4().hex[:10]}", "v1", "bench")
        with db.session_scope() as session:
            job, _ = create_job(session, request, actor="producer:bench")
            job_id = job.id
        dispatcher.start_chain(job_id, 1)
        times.append(time.perf_counter() - started)
    out.put(times)


def _prepare(directory: Path) -> str:
    from worker.core.settings import get_settings
    from worker.registries import RegistrySpec, create_registry
    from worker.store.db import session_scope
    from worker.store.migrate import upgrade

    url = f"sqlite:///{directory / 'contention.db'}"
    os.environ["PUSHWORKER_DATABASE_URL"] = url
    get_settings.cache_clear()
    upgrade(url)
    with session_scope() as session:
        spec = RegistrySpec(name="r", url="https://reg.example.com", username="u", secret="pw")
        create_registry(session, spec, registry_id=1)
    return url


def _one(variant: str, processes: int, jobs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pushworker-contention-") as directory:
        url = _prepare(Path(directory))
        context = multiprocessing.get_context("spawn")  # each writer opens its own connections
        out = context.Queue()
        workers = [
            context.Process(target=_writer, args=(url, variant, jobs, out))
            for _ in range(processes)
        ]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        times = [t for _ in workers for t in out.get(timeout=600)]
        wall = time.perf_counter() - started
        for worker in workers:
            worker.join(60)
    return {"variant": variant, "wall": wall, "jobs": len(times), "times": times}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from cryptography.fernet import Fernet

    os.environ.setdefault("PUSHWORKER_SECRET_KEY", Fernet.generate_key().decode())
    load_before = load_line()
    runs = []
    for round_no in range(args.rounds):
        order = VARIANTS if round_no % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            print(f"bench: round {round_no + 1}/{args.rounds}: {variant}...", file=sys.stderr)
            runs.append(_one(variant, args.processes, args.jobs))
    return {"runs": runs, "load_before": load_before, "load_after": load_line(), "args": vars(args)}


def report(results: dict[str, Any]) -> list[str]:
    args = results["args"]
    info = machine()
    lines = [
        f"Command: `{command_line()}`",
        "",
        f"- machine: {info['host']}, {info['cpu']}, {info['memory']}, Linux {info['kernel']}, "
        f"Python {info['python']}",
        f"- load before: {results['load_before']}",
        f"- load after: {results['load_after']}",
        f"- {args['rounds']} interleaved rounds; per round and variant {args['processes']} "
        f"processes x {args['jobs']} jobs (`create_job` + 4 steps against fakes, 9 transactions "
        "and 11 events a job) on a fresh SQLite file; time per job includes its lock waits",
        "",
        "| variant | jobs | jobs/s, per round | job p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        runs = [r for r in results["runs"] if r["variant"] == variant]
        stats = Stats.of([t for r in runs for t in r["times"]])
        rates = ", ".join(f"{r['jobs'] / r['wall']:.1f}" for r in runs)
        lines.append(
            f"| {LABELS[variant]} | {stats.n} | {rates} | {stats.ms()} | {stats.ms('p90')} | "
            f"{stats.ms('p99')} | {stats.ms('maximum')} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=60, help="jobs per process")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-report", action="store_true", help="print, do not append")
    args = parser.parse_args(argv)
    results = run(args)
    write_section("SQLite write-lock contention", report(results), print_only=args.no_report)
    path = save_results("contention", {k: v for k, v in results.items()})
    print(f"bench: raw results in {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
