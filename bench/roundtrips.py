"""A job's database round trips on PostgreSQL, for this code and another commit, with the database
on loopback and behind a delaying proxy (a database across a network).

    .venv/bin/python -m bench.roundtrips --baseline-rev REV [--jobs 150] [--rounds 3]
                                         [--delay-ms 0.1]

Each variant (this tree, and REV extracted with ``git archive``) runs in its own fresh process
against its own database of the stack's PostgreSQL, migrated by its own code: ``create_job`` and
the four steps (``worker.engine.pipeline.StepRunner``, inline) against fakes of Docker and the
registry (``tests/support/fakes.py``), as ``bench.fleet``'s pipeline mode does. Counted per job:

- statements: what SQLAlchemy sends (a ``before_cursor_execute`` listener);
- round trips: each time the driver waits for the server (psycopg's ``Connection.wait``): the
  statements, and the BEGIN, COMMIT and pool pings around them;
- wall time per job, median of the round's jobs;
- CPU time per job of the benchmark's process (the worker's side) and of the database's server
  processes for its database (``/proc/PID/stat``: the server runs on this machine). On these
  2 cores, 2,000 ms of CPU a second over their sum bounds the jobs a second of any fleet.

Rounds alternate the variants and the two paths to the database: direct (loopback), and through
a proxy in its own process that forwards each chunk ``--delay-ms`` late each way (what it adds
to a round trip is measured and printed: the proxy's own thread hand-offs add to the delay).
Counts are exact and repeat; times are this machine's, 2 shared cores. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import socket
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import (
    _create_pg_database,
    _drop_pg_database,
    command_line,
    load_line,
    machine,
    save_results,
    write_section,
)
from bench.fleet import _baseline_code, _prepare, _quiet_logs, _use_code
from harness.stack import stack_env

VARIANTS = ("this", "baseline")
PATHS = ("direct", "delayed")


def _forward(source: socket.socket, sink: socket.socket, delay: float) -> None:
    try:
        while data := source.recv(65536):
            if delay:
                time.sleep(delay)
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


def _proxy(listener: socket.socket, target: tuple[str, int], delay: float) -> None:
    """Accepts on ``listener`` and forwards to ``target``, each chunk ``delay`` s late."""
    while True:
        client, _ = listener.accept()
        upstream = socket.create_connection(target)
        for end in (client, upstream):
            end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=_forward, args=(a, b, delay), daemon=True).start()


def _start_proxy(target: tuple[str, int], delay: float) -> tuple[Any, int]:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = int(listener.getsockname()[1])
    process = multiprocessing.get_context("fork").Process(
        target=_proxy, args=(listener, target, delay), daemon=True
    )
    process.start()
    listener.close()
    return process, port


def _via(url: str, port: int | None) -> str:
    """``url`` with its host and port replaced by the proxy's (None: unchanged)."""
    if port is None:
        return url
    scheme, rest = url.split("://", 1)
    user, tail = rest.split("@", 1)
    database = tail.split("/", 1)[1]
    return f"{scheme}://{user}@127.0.0.1:{port}/{database}"


def _round_trip_ms(url: str) -> float:
    """The median time of ``SELECT 1`` on ``url``: what one round trip costs there."""
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as c:
        times = []
        for _ in range(200):
            started = time.perf_counter()
            c.execute("SELECT 1").fetchone()
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def _run_jobs(code_root: str | None, url: str, jobs: int, out: Any) -> None:
    _use_code(code_root, url)
    _quiet_logs()
    import psycopg
    from sqlalchemy import event

    from tests.support.fakes import FakeWorld, fake_runner
    from worker.core.settings import get_settings
    from worker.jobs import PushRequest, create_job
    from worker.store import db

    if code_root is not None and not str(db.__file__).startswith(code_root):
        raise RuntimeError(f"the baseline imported {db.__file__}, not code from {code_root}")
    counts = {"statements": 0, "round_trips": 0}
    wait = psycopg.Connection.wait

    def counted_wait(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts["round_trips"] += 1
        return wait(self, *args, **kwargs)

    psycopg.Connection.wait = counted_wait  # type: ignore[method-assign]

    def statement(*_args: Any) -> None:
        counts["statements"] += 1

    event.listen(db.engine_for(url), "before_cursor_execute", statement)
    world = FakeWorld(images={"app:1": "sha256:" + "ab" * 32})
    _, dispatcher = fake_runner(world, get_settings())

    def job() -> None:
        request = PushRequest("app:1", 1, f"bench/r-{uuid.uuid4().hex[:10]}", "v1", "bench")
        with db.session_scope() as session:
            created, _ = create_job(session, request, actor="producer:bench")
            job_id = created.id
        dispatcher.start_chain(job_id, 1)

    for _ in range(10):  # warm: connections, prepared statements, every lane started
        job()
    counts.update(statements=0, round_trips=0)
    times = []
    server_before, cpu_before = _server_cpu(url), time.process_time()
    for _ in range(jobs):
        started = time.perf_counter()
        job()
        times.append(time.perf_counter() - started)
    cpu = time.process_time() - cpu_before
    server = _server_cpu(url)
    server_cpu = sum(server.values()) - sum(server_before.get(pid, 0.0) for pid in server)
    out.put({**counts, "jobs": jobs, "times": times, "cpu": cpu, "server_cpu": server_cpu})


def _server_cpu(url: str) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL server process of ``url``'s database (the server
    runs on this machine: its processes' ``/proc/PID/stat``)."""
    import psycopg

    database = url.rsplit("/", 1)[1]
    admin = url.rsplit("/", 1)[0].replace("postgresql+psycopg", "postgresql") + "/postgres"
    with psycopg.connect(admin, autocommit=True) as connection:
        pids = [row[0] for row in connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,)
        )]  # fmt: skip
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    from cryptography.fernet import Fernet

    os.environ.setdefault("PUSHWORKER_SECRET_KEY", Fernet.generate_key().decode())
    stack = stack_env()
    load_before = load_line()
    spawn = multiprocessing.get_context("spawn")
    names = {variant: f"bench_roundtrips_{variant}" for variant in VARIANTS}
    runs: list[dict[str, Any]] = []
    pg_host, pg_port = "127.0.0.1", 5432
    proxy, proxy_port = _start_proxy((pg_host, pg_port), args.delay_ms / 1000)
    with tempfile.TemporaryDirectory(prefix="pushworker-roundtrips-") as directory:
        baseline, commit = _baseline_code(Path(directory), args.baseline_rev)
        code = {"this": None, "baseline": baseline}
        urls: dict[str, str] = {}
        try:
            for variant in VARIANTS:
                _drop_pg_database(stack, names[variant])
                urls[variant] = _create_pg_database(stack, names[variant])
                prepare = spawn.Process(target=_prepare, args=(code[variant], urls[variant]))
                prepare.start()
                prepare.join(300)
                assert prepare.exitcode == 0, f"preparing {variant} failed"
            rtt = {
                "direct": _round_trip_ms(urls["this"]),
                "delayed": _round_trip_ms(_via(urls["this"], proxy_port)),
            }
            for round_ in range(args.rounds):
                for path in PATHS:
                    order = VARIANTS if round_ % 2 == 0 else tuple(reversed(VARIANTS))
                    for variant in order:
                        url = _via(urls[variant], proxy_port if path == "delayed" else None)
                        out = spawn.Queue()
                        worker = spawn.Process(
                            target=_run_jobs, args=(code[variant], url, args.jobs, out)
                        )
                        worker.start()
                        result = out.get(timeout=900)
                        worker.join(60)
                        runs.append({**result, "variant": variant, "path": path,
                                     "round": round_})  # fmt: skip
                        print(
                            f"round {round_ + 1} {path:7} {variant:8} "
                            f"{result['round_trips'] / args.jobs:5.1f} round trips, "
                            f"{statistics.median(result['times']) * 1000:6.1f} ms a job",
                            flush=True,
                        )
        finally:
            proxy.terminate()
            for variant in VARIANTS:
                _drop_pg_database(stack, names[variant])
    return {
        "runs": runs, "rtt_ms": rtt, "baseline_commit": commit, "args": vars(args),
        "load_before": load_before, "load_after": load_line(),
    }  # fmt: skip


def report(results: dict[str, Any]) -> list[str]:
    args, info = results["args"], machine()
    lines = [
        f"Command: `{command_line()}`",
        "",
        f"- machine: {info['host']}, {info['cpu']}, {info['memory']}, Linux {info['kernel']}, "
        f"Python {info['python']}; PostgreSQL of the stack",
        f"- load before: {results['load_before']}; after: {results['load_after']}",
        f"- baseline: the project's code at {results['baseline_commit']}, run in the same "
        f"rounds, interleaved; {args['rounds']} rounds of {args['jobs']} jobs per cell",
        f"- a round trip (`SELECT 1`, median): direct {results['rtt_ms']['direct']:.2f} ms, "
        f"through the proxy ({args['delay_ms']:g} ms each way) "
        f"{results['rtt_ms']['delayed']:.2f} ms",
        "",
        "| database | code | statements a job | round trips a job | ms a job, each round "
        "(median of its jobs) | CPU ms a job: this process / the server |",
        "|---|---|---|---|---|---|",
    ]
    for path in PATHS:
        for variant in VARIANTS:
            cell = [r for r in results["runs"] if (r["path"], r["variant"]) == (path, variant)]
            if not cell:
                continue
            jobs = cell[0]["jobs"]
            statements = sorted({r["statements"] / jobs for r in cell})
            trips = sorted({r["round_trips"] / jobs for r in cell})
            medians = [statistics.median(r["times"]) * 1000 for r in cell]
            label = "this code" if variant == "this" else f"{results['baseline_commit']}"
            where = "loopback" if path == "direct" else "through the delaying proxy"
            cpu = [r["cpu"] / jobs * 1000 for r in cell if "cpu" in r]
            server = [r["server_cpu"] / jobs * 1000 for r in cell if "server_cpu" in r]
            lines.append(
                f"| {where} | {label} | {', '.join(f'{s:.1f}' for s in statements)} | "
                f"{', '.join(f'{t:.1f}' for t in trips)} | "
                f"{', '.join(f'{m:.1f}' for m in medians)} | "
                f"{_span(cpu)} / {_span(server)} |"
            )
    return lines


def _span(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}" if values else "-"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.roundtrips", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-rev", required=True, help="the commit to compare with")
    parser.add_argument("--jobs", type=int, default=150, help="jobs per cell (default 150)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--delay-ms", type=float, default=0.1,
                        help="what the proxy adds each way, in ms (default 0.1)")  # fmt: skip
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="print the section instead of appending it to docs/benchmarks.md",
    )
    args = parser.parse_args(argv)
    results = run(args)
    save_results("roundtrips", results)
    write_section(
        "A job's database round trips on PostgreSQL", report(results), print_only=args.no_report
    )


if __name__ == "__main__":
    main()
