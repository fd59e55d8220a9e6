"""Plots of the benchmarks' per-job times (matplotlib, a bench-only dependency).

    .venv/bin/python -m bench.plot [bench/results/pushes-....json]

Without an argument, plots the newest ``bench/results/pushes-*.json`` to
docs/benchmark-pushes.png (and ``throughput-*.json``, if there is one, to
docs/benchmark-throughput.png).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

from bench.common import DOCS, latest_results

TITLES = {
    "new": "new push, {size} MiB",
    "large": "new push, {large} MiB",
    "repush": "re-push, {size} MiB",
}
COLORS = {"pipeline": "#1f77b4", "CLI": "#ff7f0e"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pushes(data: dict[str, Any], out: Path | None = None) -> Path:
    """Per-job time of pipeline vs CLI, one panel per benchmark: box, points, medians."""
    plt = _pyplot()
    out = out or DOCS / "benchmark-pushes.png"
    args = data["args"]
    scenarios = [s for s in ("new", "large", "repush") if data["pipeline"].get(s)]
    fig, axes = plt.subplots(1, len(scenarios), figsize=(4.2 * len(scenarios), 4.6), squeeze=False)
    rng = random.Random(7)
    for ax, scenario in zip(axes[0], scenarios, strict=True):
        series = {
            "pipeline": [r["total"] * 1000 for r in data["pipeline"][scenario]],
            "CLI": [r["total"] * 1000 for r in data["cli"][scenario]],
        }
        names = list(series)
        ax.boxplot(
            [series[n] for n in names], positions=range(len(names)), widths=0.5,
            showfliers=False, medianprops={"color": "black"},
        )  # fmt: skip
        for x, name in enumerate(names):
            jitter = [x + rng.uniform(-0.18, 0.18) for _ in series[name]]
            ax.scatter(jitter, series[name], s=12, alpha=0.6, color=COLORS[name], zorder=3)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("ms per job")
        medians = {n: _median(v) for n, v in series.items()}
        ratio = _median(series["pipeline"]) / _median(series["CLI"])
        title = TITLES[scenario].format(size=args["size_mib"], large=args["large_mib"])
        ax.set_title(f"{title}\nratio {ratio:.2f} (median {medians['pipeline']:.0f} vs "
                     f"{medians['CLI']:.0f} ms)", fontsize=10)  # fmt: skip
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        "Per-job time: pipeline (enqueue → job.succeeded) vs docker tag && docker push",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_throughput(data: dict[str, Any], out: Path | None = None) -> Path:
    """Completed jobs over time for each side of each round of benchmark 3."""
    plt = _pyplot()
    out = out or DOCS / "benchmark-throughput.png"
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    styles = {"pipeline": "-", "cli": "--", "cli_parallel": ":"}
    names = {"pipeline": "pipeline", "cli": "CLI loop", "cli_parallel": "CLI, 4 in parallel"}
    for side, rounds in data["completions"].items():
        for round_no, moments in enumerate(rounds):
            ax.plot(
                sorted(moments), range(1, len(moments) + 1), styles.get(side, "-"),
                color={"pipeline": "#1f77b4", "cli": "#ff7f0e"}.get(side, "#2ca02c"),
                label=names.get(side, side) if round_no == 0 else None, alpha=0.8,
            )  # fmt: skip
    ax.set_xlabel("seconds since the round started")
    ax.set_ylabel("jobs finished")
    ax.set_title(f"{data['args']['jobs']} jobs: pipeline (concurrency "
                 f"{data['args']['concurrency']}) vs sequential CLI loop", fontsize=10)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def main(argv: list[str] | None = None) -> None:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not paths:
        paths = [p for p in (latest_results("pushes"), latest_results("throughput")) if p]
    if not paths:
        raise SystemExit("no results: run python -m bench.pushes first")
    for path in paths:
        data = json.loads(path.read_text())
        if path.name.startswith("throughput"):
            print(plot_throughput(data))
        else:
            print(plot_pushes(data))


if __name__ == "__main__":
    main()
