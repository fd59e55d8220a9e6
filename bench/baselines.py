"""Issue 19's goals against the newest CLI, from the newest raw results of bench.pushes and
bench.throughput on SQLite and on PostgreSQL (``bench/results/``), in one table.

    .venv/bin/python -m bench.baselines [--no-report]

Run ``bench.pushes`` and ``bench.throughput`` with ``--database sqlite`` and ``--database
postgres`` first (bench/README.md). The PostgreSQL goal ("within 1.1x of SQLite") compares runs
made one after the other, not interleaved (a benchmark's worker has one database): it is given
both raw (pipeline median on PostgreSQL / on SQLite) and against the CLI measured alongside each
(ratio to the CLI on PostgreSQL / on SQLite), which takes out the machine's load drift between
the two runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from bench.common import RESULTS, command_line, load_line, write_section
from bench.pushes import summary_rows

#: Issue 19: PostgreSQL within this factor of SQLite.
PG_GOAL = 1.1
#: Issue 19: throughput at concurrency 4 at least this times four parallel CLI loops.
THROUGHPUT_GOAL = 1.0


def newest(name: str, database: str) -> tuple[Path, dict[str, Any]] | None:
    """The newest results of ``name`` on ``database`` in the format with registries."""
    for path in sorted(RESULTS.glob(f"{name}-*.json"), reverse=True):
        data = json.loads(path.read_text())
        if data.get("args", {}).get("database") == database and "registries" in data:
            return path, data
    return None


def throughput_rows(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows = {}
    for kind in data["registries"]:
        rounds = [r for r in data["rounds"] if r["registry"] == kind]
        pipeline = [r["pipeline"]["seconds"] for r in rounds]
        cli = [r["cli_parallel"]["seconds"] for r in rounds]
        rows[kind] = {
            "pipeline": statistics.median(pipeline),
            "cli": statistics.median(cli),
            "speedup": statistics.median(cli) / statistics.median(pipeline),
            "speedups": [c / p for c, p in zip(cli, pipeline, strict=True)],
        }
    return rows


def report() -> list[str]:
    found = {
        (name, db): newest(name, db)
        for name in ("pushes", "throughput")
        for db in ("sqlite", "postgres")
    }
    missing = [f"{n} on {db}" for (n, db), f in found.items() if f is None]
    if missing:
        raise SystemExit(f"no results of {', '.join(missing)} in {RESULTS}")
    files = {key: value[0] for key, value in found.items() if value is not None}
    data = {key: value[1] for key, value in found.items() if value is not None}
    cli = data[("pushes", "sqlite")]["cli_binary"]
    lines = [
        f"Command: `{command_line()}` (now: {load_line()})",
        "",
        "From: " + ", ".join(f"`{path.name}`" for path in files.values()),
        f"- baseline CLI: `{cli['path']}` {cli['version']}; each figure: median (min..max of "
        "per-round values); SQLite and PostgreSQL are separate runs, one after the other",
        "",
        "| benchmark | registry | SQLite: pipeline / CLI ms, ratio (rounds) | PostgreSQL: pipeline"
        " / CLI ms, ratio (rounds) | goal vs CLI | PostgreSQL / SQLite: pipeline; ratio to CLI "
        f"| ≤ {PG_GOAL} |",
        "|---|---|---|---|---|---|---|",
    ]
    sqlite_rows = {
        (r["registry"], r["scenario"]): r for r in summary_rows(data["pushes", "sqlite"])
    }
    pg_rows = {(r["registry"], r["scenario"]): r for r in summary_rows(data["pushes", "postgres"])}

    def cell(row: dict[str, Any]) -> str:
        ratios = row["ratio_rounds"]
        return (
            f"{row['pipeline'] * 1000:.0f} / {row['cli'] * 1000:.0f}, **{row['ratio']:.2f}** "
            f"({min(ratios):.2f}..{max(ratios):.2f})"
        )

    for key, s_row in sqlite_rows.items():
        p_row = pg_rows.get(key)
        if p_row is None:
            continue
        goal = s_row["goal"]
        met = [db for db, row in (("SQLite", s_row), ("PostgreSQL", p_row)) if row["ratio"] <= goal]
        raw = p_row["pipeline"] / s_row["pipeline"]
        relative = p_row["ratio"] / s_row["ratio"]
        pg_met = "met" if max(raw, relative) <= PG_GOAL else (
            "not met" if min(raw, relative) > PG_GOAL else "mixed")  # fmt: skip
        lines.append(
            f"| {s_row['label']} | {key[0]} | {cell(s_row)} | {cell(p_row)} "
            f"| ≤ {goal}: {'met on ' + ' and '.join(met) if met else 'not met'} "
            f"| {raw:.2f}; {relative:.2f} | {pg_met} |"
        )
    s_tp = throughput_rows(data["throughput", "sqlite"])
    p_tp = throughput_rows(data["throughput", "postgres"])
    jobs = data["throughput", "sqlite"]["args"]["jobs"]
    lines += [
        "",
        f"| {jobs} jobs, concurrency 4 vs 4 CLI loops | registry | SQLite: pipeline / CLI s, "
        "speed-up (rounds) | PostgreSQL: pipeline / CLI s, speed-up (rounds) "
        f"| goal ≥ {THROUGHPUT_GOAL}x | PostgreSQL / SQLite: pipeline s; speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for kind, s in s_tp.items():
        p = p_tp.get(kind)
        if p is None:
            continue

        def tp(row: dict[str, Any]) -> str:
            return (
                f"{row['pipeline']:.2f} / {row['cli']:.2f}, **{row['speedup']:.2f}x** "
                f"({min(row['speedups']):.2f}..{max(row['speedups']):.2f})"
            )

        met = [db for db, row in (("SQLite", s), ("PostgreSQL", p)) if row["speedup"] >= 1.0]
        lines.append(
            f"| throughput | {kind} | {tp(s)} | {tp(p)} "
            f"| {'met on ' + ' and '.join(met) if met else 'not met'} "
            f"| {p['pipeline'] / s['pipeline']:.2f}; {s['speedup'] / p['speedup']:.2f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--no-report", action="store_true",
                        help="print the section instead of appending it")  # fmt: skip
    args = parser.parse_args(argv)
    write_section("Issue 19 baselines: the goals against the newest CLI", report(),
                  print_only=args.no_report)  # fmt: skip


if __name__ == "__main__":
    main()
