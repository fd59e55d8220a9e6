"""Profile the worker during a benchmark-1 run: pyinstrument inside the pool processes (wall
time of the tasks), then py-spy over the whole worker (CPU, main process included).

    eval "$(scripts/stack env)"; .venv/bin/python -m bench.profile_worker [--jobs 30]

New pushes of distinct 1 MiB images, one job at a time, through ``bench/instrumented.py``
(the project's app) after ``--warmup`` jobs that are not profiled:

1. pyinstrument (0.5 ms sampling) in every pool process from ``task_prerun`` to
   ``task_postrun``: the task body, the step's transactions, its Docker and registry calls, the
   publish of the chain's next message. Wall time: waits count. The sessions are combined into
   bench/results/profile-<time>.txt and .html.
2. py-spy (``pip install py-spy``; skipped if missing) over the worker's main process and its
   pool processes, 250 Hz, ``--gil``: only samples of a thread holding the GIL, i.e. running
   Python (I/O waits and SQLite's own work release it), so this approximates the worker's Python
   CPU, Celery's consumer included. Raw stacks in bench/results/profile-<time>.pyspy.txt.

The report lists the functions that take the most time (inclusive), per job.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS,
    ROOT,
    JobWatcher,
    MiB,
    command_line,
    common_arguments,
    load_line,
    machine_lines,
    make_images,
    phase,
    remove_images,
    repository_of,
    run_one,
    setup,
    target_references,
    write_section,
)

#: Functions whose inclusive time the report lists: (label, file, function name).
WATCHED = [
    ("Celery: next step's publish (chain)", "celery/app/task.py", "apply_async"),
    ("StepRunner.run (the step)", "worker/engine/pipeline.py", "run"),
    ("claim transaction (StepRunner._claim)", "worker/engine/pipeline.py", "_claim"),
    ("record transaction (_record_success)", "worker/engine/pipeline.py", "_record_success"),
    ("events.append", "worker/store/events.py", "append"),
    ("  its read of seq and chain head (_append_state)", "worker/store/events.py", "_append_state"),
    ("  canonical JSON + SHA-256 (chain_hash)", "worker/store/chain.py", "chain_hash"),
    ("after-commit log lines (publish_committed)", "worker/store/events.py", "publish_committed"),
    ("SQLAlchemy Session.get", "sqlalchemy/orm/session.py", "get"),
    ("SQLAlchemy Session.flush", "sqlalchemy/orm/session.py", "flush"),
    ("SQLAlchemy Session.commit", "sqlalchemy/orm/session.py", "commit"),
    ("  SQLite COMMIT (driver)", "sqlalchemy/engine/default.py", "do_commit"),
    ("SQL execution (driver)", "sqlalchemy/engine/default.py", "do_execute"),
    ("Docker: login", "worker/seams/docker_engine.py", "login"),
    ("Docker: image inspects (image)", "worker/seams/docker_engine.py", "image"),
    ("Docker: tag", "worker/seams/docker_engine.py", "tag"),
    ("Docker: push (the daemon's push)", "worker/seams/docker_engine.py", "push"),
    ("registry HTTP: manifest_digest", "worker/seams/registry_http.py", "manifest_digest"),
    ("credential resolution", "worker/core/credentials.py", "resolve_credential"),
    ("structlog rendering (JSONRenderer)", "structlog/processors.py", "__call__"),
]
SPY_RATE = 250


def _matches(path: str, function: str, suffix: str, name: str) -> bool:
    bare = function.rsplit(".", 1)[-1]
    return bare == name and (path.endswith(suffix) or path == Path(suffix).name)


# --- pyinstrument -----------------------------------------------------------------------------


def combine_sessions(profile_dir: Path) -> Any:
    from pyinstrument.session import Session

    sessions = [
        Session.from_json(json.loads(p.read_text()))
        for p in sorted(profile_dir.glob("profile-*.pyisession"))
    ]
    if not sessions:
        raise RuntimeError(f"no profiles written in {profile_dir}")
    combined = sessions[0]
    for other in sessions[1:]:
        combined = Session.combine(combined, other)
    return combined


def pyinstrument_rows(session: Any) -> tuple[float, list[float]]:
    """Total sampled seconds, and per WATCHED row its inclusive seconds (a sample is counted
    once per row even when the function recurses)."""
    root = session.root_frame(trim_stem=False)
    if root is None:
        return 0.0, [0.0] * len(WATCHED)
    values = [0.0] * len(WATCHED)

    def walk(frame: Any, active: frozenset[int]) -> None:
        path, function = str(frame.file_path or ""), str(frame.function or "")
        mine = {i for i, (_, s, n) in enumerate(WATCHED) if _matches(path, function, s, n)}
        for index in mine - active:
            values[index] += frame.time
        for child in frame.children:
            walk(child, active | mine)

    walk(root, frozenset())
    return float(root.time), values


# --- py-spy -----------------------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<function>.*) \((?P<path>.*?):\d+\)$")


def py_spy() -> str | None:
    found = Path(sys.executable).with_name("py-spy")
    return str(found) if found.exists() else shutil.which("py-spy")


def spy_rows(raw: Path) -> dict[str, Any]:
    """Seconds of CPU samples of the main process and the pool, and per WATCHED row."""
    totals: dict[str, float] = defaultdict(float)
    rows = [0.0] * len(WATCHED)
    leaf_packages: dict[str, float] = defaultdict(float)
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        seconds = int(count_text) / SPY_RATE
        frames = stack.split(";")
        role = "pool" if sum(f.startswith("process ") for f in frames) > 1 else "main"
        totals[role] += seconds
        parsed = [m for f in frames if (m := _FRAME.match(f))]
        if parsed:
            leaf = parsed[-1].group("path")
            package = leaf.split("/")[0] if "/" in leaf else leaf.removesuffix(".py")
            leaf_packages[f"{role}: {package}"] += seconds
        if role != "pool":
            continue
        hit: set[int] = set()
        for match in parsed:
            for index, (_, suffix, name) in enumerate(WATCHED):
                if index not in hit and _matches(
                    match.group("path"), match.group("function"), suffix, name
                ):
                    hit.add(index)
        for index in hit:
            rows[index] += seconds
    leaves = sorted(leaf_packages.items(), key=lambda item: -item[1])[:12]
    return {"totals": dict(totals), "rows": rows, "leaves": leaves}


# --- the run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = load_line()
    bench = setup("profile", args)
    created: list[str] = []
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = RESULTS / f"profile-{stamp}"
    RESULTS.mkdir(exist_ok=True)
    try:
        profile_dir = bench.workdir / "profile"
        profile_dir.mkdir()
        spy_binary = py_spy()
        count = args.warmup + args.jobs * (2 if spy_binary else 1)
        with phase("images"):
            sources = make_images(bench.api, f"{bench.run_id}-prof", count, MiB)
            created += sources
        worker = bench.worker(
            "bench.instrumented", concurrency=args.concurrency,
            extra_env={"BENCH_PROFILE_DIR": str(profile_dir)}, label="profiled",
        )  # fmt: skip
        watcher = JobWatcher(bench.database_url)
        queue = list(sources)

        def jobs(n: int) -> float:
            started = time.monotonic()
            for _ in range(n):
                source = queue.pop(0)
                run_one(watcher, source, repository_of(source))
            return time.monotonic() - started

        with phase("warm-up (not profiled)"):
            jobs(args.warmup)
        spy: dict[str, Any] | None = None
        if spy_binary:
            raw = base.with_suffix(".pyspy.txt")
            with phase(f"py-spy: {args.jobs} jobs"):
                recorder = subprocess.Popen(
                    [spy_binary, "record", "--pid", str(worker.pid), "--subprocesses",
                     "--rate", str(SPY_RATE), "--format", "raw", "--nonblocking", "--gil",
                     "--output", str(raw)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                )  # fmt: skip
                time.sleep(2)  # py-spy attaches to every process first
                spy_seconds = jobs(args.jobs)
                time.sleep(0.5)
                recorder.send_signal(signal.SIGINT)
                _, err = recorder.communicate(timeout=60)
            if raw.exists():
                spy = {**spy_rows(raw), "seconds": spy_seconds, "raw": str(raw)}
            else:
                print(f"bench: py-spy wrote nothing: {err.decode()[-500:]}", file=sys.stderr)
        (profile_dir / "on").touch()
        with phase(f"pyinstrument: {args.jobs} jobs"):
            wall_seconds = jobs(args.jobs)
        (profile_dir / "on").unlink()
        watcher.close()
        worker.stop()  # the pool processes write their profiles as they exit
        session = combine_sessions(profile_dir)
        from pyinstrument.renderers import ConsoleRenderer, HTMLRenderer

        text = ConsoleRenderer(unicode=True, color=False, short_mode=False).render(session)
        base.with_suffix(".txt").write_text(text)
        base.with_suffix(".html").write_text(HTMLRenderer().render(session))
        total, values = pyinstrument_rows(session)
        return {
            "args": vars(args),
            "pyinstrument": {"total": total, "rows": values, "seconds": wall_seconds},
            "spy": spy,
            "text_path": str(base.with_suffix(".txt")),
            "report": lambda after: machine_lines(bench, load_before, after),
        }
    finally:
        remove_images(bench.api, target_references(bench.api, created))
        remove_images(bench.api, created)
        bench.close()


def report(results: dict[str, Any]) -> list[str]:
    args = results["args"]
    jobs = args["jobs"]
    pyi = results["pyinstrument"]
    spy = results["spy"]
    relative = Path(results["text_path"]).relative_to(ROOT)
    lines = [
        f"Command: `{command_line()}`",
        "",
        *results["report"](load_line()),
        f"- {jobs} new 1 MiB pushes one at a time per profiler, worker concurrency "
        f"{args['concurrency']}, after {args['warmup']} warm-up jobs; the jobs took "
        f"{pyi['seconds'] / jobs * 1000:.0f} ms each under pyinstrument"
        + (f", {spy['seconds'] / jobs * 1000:.0f} ms under py-spy" if spy else "")
        + f"; trees in `{relative}` (and .html)"
        + (f", `{Path(spy['raw']).relative_to(ROOT)}`" if spy else ""),
        "- pyinstrument: wall time inside the pool processes' tasks (waits included), "
        "0.5 ms sampling (its own overhead inflates Python-heavy parts)",
    ]
    if spy:
        lines.append(
            f"- py-spy `--gil`: samples of the whole worker holding the GIL (running Python), "
            f"{SPY_RATE} Hz: main "
            f"process {spy['totals'].get('main', 0) / jobs * 1000:.1f} ms per job, pool "
            f"processes {spy['totals'].get('pool', 0) / jobs * 1000:.1f} ms per job"
        )
    lines += [
        "",
        "| function (inclusive) | pyinstrument ms/job (wall) | share | py-spy ms/job (GIL held) "
        "| share |",
        "|---|---|---|---|---|",
        f"| all of the pool processes' task time | {pyi['total'] / jobs * 1000:.1f} | 100% "
        + (f"| {spy['totals'].get('pool', 0) / jobs * 1000:.1f} | 100% |" if spy else "| | |"),
    ]
    for index, (label, _, _) in enumerate(WATCHED):
        wall = pyi["rows"][index]
        cells = f"| {label} | {wall / jobs * 1000:.1f} | {wall / max(pyi['total'], 1e-9):.0%} "
        if spy:
            cpu = spy["rows"][index]
            pool = max(spy["totals"].get("pool", 0), 1e-9)
            cells += f"| {cpu / jobs * 1000:.1f} | {cpu / pool:.0%} |"
        else:
            cells += "| | |"
        lines.append(cells)
    if spy:
        leaves = ", ".join(f"{name} {sec / jobs * 1000:.1f}" for name, sec in spy["leaves"])
        lines += [
            "",
            f"py-spy, GIL-held time by the package of the innermost Python frame (ms/job): "
            f"{leaves}",
        ]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20, help="profiled jobs per profiler")
    parser.add_argument("--warmup", type=int, default=8, help="jobs before profiling starts")
    common_arguments(parser)
    args = parser.parse_args(argv)
    results = run(args)
    write_section("Profile: the worker during benchmark 1", report(results),
                  print_only=args.no_report)  # fmt: skip
    print(f"bench: profile tree in {results['text_path']}", file=sys.stderr)


if __name__ == "__main__":
    main()
