"""Where a registry slot's time went, from ``bench/slot_trace.py``'s lines and the throttling
proxy's timeline (tests/support/throttleproxy.py). Imports nothing of the worker: the benchmark
reads it before it sets the worker's environment."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def read(directory: Path) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for path in sorted(directory.glob("slots-*.jsonl")):
        pid = int(path.stem.split("-", 1)[1])
        for line in path.read_text().splitlines():
            if line.strip():
                lines.append({**json.loads(line), "pid": pid})
    return sorted(lines, key=lambda r: r["t0"])


def _mid(record: dict[str, Any]) -> float:
    return (float(record["t0"]) + float(record["t1"])) / 2


def _job_of(holder: str) -> str:
    return holder.split(":", 1)[0]


def slot_phases(
    records: Iterable[dict[str, Any]], timeline: dict[str, list[float | None]]
) -> dict[str, Any]:
    """Per push the registry let in (its repository opened and closed at the proxy): when the
    slot was taken, when the engine's push call began, when the registry opened and closed the
    push, when the push call returned, and when the slot was freed; per hand-over, how long the
    reserved slot waited for its waiter. Means in seconds, with the slot-seconds they add up to."""
    records = list(records)
    asked = [r for r in records if r["kind"] == "acquire" and r.get("take") is False]
    acquires = [
        r for r in records if r["kind"] == "acquire" and r.get("granted") and r.get("take", True)
    ]
    refused_takes = [
        r
        for r in records
        if r["kind"] == "acquire" and not r.get("granted") and r.get("take", True)
    ]
    frees = {r["holder"]: r for r in records if r["kind"] in ("release", "hand_over")}
    pushes = [r for r in records if r["kind"] == "push"]
    by_job_acquire: dict[str, list[dict[str, Any]]] = {}
    for record in acquires:
        by_job_acquire.setdefault(_job_of(record["holder"]), []).append(record)
    phases: dict[str, list[float]] = {
        "acquire_to_call": [], "call_to_open": [], "open": [], "close_to_return": [],
        "return_to_free": [], "held": [],
    }  # fmt: skip
    for push in pushes:
        marks = timeline.get(push["repository"])
        if not marks or marks[1] is None or marks[2] is None:
            continue  # refused (429) or never opened: not a push the registry let in
        opened, closed = float(marks[1]), float(marks[2])
        if not push["t0"] <= opened <= closed <= push["t1"] + 0.05:
            continue  # an earlier try of the same repository
        # A pool process runs one step at a time: its last slot taken before this push call.
        taken = [a for a in acquires if a["pid"] == push["pid"] and a["t1"] <= push["t0"]]
        if not taken:
            continue
        acquire = taken[-1]
        free = frees.get(acquire["holder"])
        if free is None:
            continue
        phases["acquire_to_call"].append(push["t0"] - _mid(acquire))
        phases["call_to_open"].append(opened - push["t0"])
        phases["open"].append(closed - opened)
        phases["close_to_return"].append(push["t1"] - closed)
        phases["return_to_free"].append(_mid(free) - push["t1"])
        phases["held"].append(_mid(free) - _mid(acquire))
    gaps: list[float] = []
    untaken = 0
    for free in (r for r in records if r["kind"] == "hand_over"):
        for waiter in free.get("reserved", []):
            job = waiter.split(":", 1)[0]
            later = [a for a in by_job_acquire.get(job, []) if _mid(a) >= _mid(free)]
            if later:
                gaps.append(_mid(later[0]) - _mid(free))
            else:
                untaken += 1
    summary: dict[str, Any] = {
        f"slot_{key}": statistics.fmean(values) if values else 0.0 for key, values in phases.items()
    }
    summary.update(
        slot_pushes=len(phases["held"]),
        slot_held_seconds=sum(phases["held"]),
        slot_open_seconds=sum(phases["open"]),
        slot_handovers=len(gaps),
        slot_handover_gap=statistics.fmean(gaps) if gaps else 0.0,
        slot_handover_gap_median=statistics.median(gaps) if gaps else 0.0,
        slot_reserved_seconds=sum(gaps),
        slot_untaken_reservations=untaken,
        # Polls that waited: refused before the claim (asked), or, where the slot is taken
        # before the claim, refused when taken; and slots taken from a step between its claim
        # and its upload (asked free, refused when taken: the claim given back).
        slot_refused_asks=sum(not r.get("granted") for r in asked),
        slot_refused_takes=len(refused_takes),
        slot_jobs=len({_job_of(r["holder"]) for r in acquires}),
        **_lock_summary(records),
    )
    return summary


def _lock_summary(records: list[dict[str, Any]]) -> dict[str, float]:
    """SQLite's write lock over the run: seconds waited for it and held, summed over every
    transaction, and the share of the traced span during which some process held it."""
    locks = [r for r in records if r["kind"] == "lock"]
    if not locks:
        return {"lock_wait_seconds": 0.0, "lock_hold_seconds": 0.0, "lock_held_share": 0.0}
    span = max(r["t2"] for r in locks) - min(r["t0"] for r in locks)
    held = sum(r["t2"] - r["t1"] for r in locks)
    return {
        "lock_wait_seconds": sum(r["t1"] - r["t0"] for r in locks),
        "lock_hold_seconds": held,
        "lock_held_share": held / span if span > 0 else 0.0,
        "lock_transactions": float(len(locks)),
    }
