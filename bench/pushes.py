"""Benchmarks 1 and 2: per-job time of the pipeline against ``docker tag && docker push``.

    eval "$(scripts/stack env)"; .venv/bin/python -m bench.pushes [--jobs 10] [--rounds 3]
        [--registry tls|plain|both] [--database sqlite|postgres] [--docker-cli PATH]

1. New pushes: distinct images of 1 MiB (and ``--large-mib``, 50 MiB by default), each through
   the whole pipeline (enqueue -> four sub-tasks -> events -> digest verified), timed from the
   producer's call to the ``job.succeeded`` event, one job at a time; against a shell loop doing
   ``docker tag SRC DST && docker push DST`` per image after one ``docker login``, with the
   newest ``docker`` CLI on the machine (or ``--docker-cli``).
2. Re-pushes: the same images again, which the registry already holds (a new job each, same
   repository and tag); against the same CLI commands, run again.

Both against a private copy of the stack's TLS registry and of its plain-HTTP one (``--registry
both``, the default). Rounds are interleaved: pipeline batch, CLI batch, then the other
registry, with the order of sides and registries alternating from round to round. The CLI
pushes its own images (distinct from the pipeline's), so that every "new" push is new to the
registry. Every figure comes with the spread of its per-round values.
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
    REGISTRY_IDS,
    CpuMeter,
    DockerCLI,
    JobTiming,
    JobWatcher,
    MiB,
    Stats,
    baseline_arguments,
    chosen_cli,
    command_line,
    common_arguments,
    load_line,
    machine_lines,
    make_images,
    median_per_round,
    ms,
    phase,
    registry_kinds,
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
    kinds = registry_kinds(args.registry)
    binary = chosen_cli(args.docker_cli)
    bench = setup("pushes", args, kinds)
    created: list[str] = []
    try:
        with phase("images"):
            small = args.size_mib * MiB
            large = args.large_mib * MiB
            plan = {
                "new": (small, args.jobs),
                "large": (large, args.large_jobs),
            }
            images: dict[tuple[str, str, int, str], list[str]] = {}
            for kind in kinds:
                for scenario, (size, count) in plan.items():
                    if count <= 0:
                        continue
                    for side in ("p", "c"):
                        for round_no in range(args.rounds):
                            prefix = f"{bench.run_id}-{kind}-{scenario}-{side}{round_no}"
                            refs = make_images(bench.api, prefix, count, size)
                            images[(scenario, side, round_no, kind)] = refs
                            created += refs
            warm = {
                kind: make_images(bench.api, f"{bench.run_id}-{kind}-warm", args.warmup + 1, small)
                for kind in kinds
            }
            created += [ref for refs in warm.values() for ref in refs]
        worker = bench.worker(concurrency=args.concurrency)
        watcher = JobWatcher(bench.database_url)
        clis = {kind: DockerCLI(bench, binary, bench.registries[kind].endpoint) for kind in kinds}
        login_seconds = {kind: cli.login() for kind, cli in clis.items()}
        with phase("warm-up (not measured)"):
            for kind in kinds:
                for source in warm[kind][:-1]:
                    run_one(watcher, source, repository_of(source), REGISTRY_IDS[kind])
                clis[kind].tag_and_push(warm[kind][-1], clis[kind].target(warm[kind][-1]))

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

        def pipeline_batch(scenario: str, kind: str, sources: list[str], round_no: int) -> None:
            expected = EXPECTED_REPUSH if scenario == "repush" else EXPECTED_NEW
            with measured_cpu(f"{kind}/{scenario}/pipeline", len(sources)):
                timings = [
                    run_one(watcher, source, repository_of(source), REGISTRY_IDS[kind])
                    for source in sources
                ]
            for timing in timings:
                record = pipeline_record(round_no, timing, expected)
                pipeline[scenario].append({**record, "registry": kind})

        def cli_batch(scenario: str, kind: str, sources: list[str], round_no: int) -> None:
            cli = clis[kind]
            with measured_cpu(f"{kind}/{scenario}/cli", len(sources)):
                for source in sources:
                    tag_s, push_s = cli.tag_and_push(source, cli.target(source))
                    baseline[scenario].append({
                        "round": round_no, "registry": kind, "total": tag_s + push_s,
                        "tag": tag_s, "push": push_s,
                    })  # fmt: skip

        def pair(scenario: str, kind: str, images_of: str, round_no: int) -> None:
            """One batch of each side; which goes first alternates from round to round, so
            that neither always runs right after the other's uploads."""
            p_sources = images[(images_of, "p", round_no, kind)]
            c_sources = images[(images_of, "c", round_no, kind)]
            if round_no % 2 == 0:
                pipeline_batch(scenario, kind, p_sources, round_no)
                cli_batch(scenario, kind, c_sources, round_no)
            else:
                cli_batch(scenario, kind, c_sources, round_no)
                pipeline_batch(scenario, kind, p_sources, round_no)

        for round_no in range(args.rounds):
            order = kinds if round_no % 2 == 0 else tuple(reversed(kinds))
            with phase(f"round {round_no + 1}/{args.rounds}"):
                for kind in order:
                    for scenario in ("new", "large"):
                        if (scenario, "p", round_no, kind) in images:
                            pair(scenario, kind, scenario, round_no)
                    # The images this round pushed as new: the registry holds them now.
                    pair("repush", kind, "new", round_no)
        digests_ok = _verify_digests(watcher, pipeline)
        watcher.close()
        worker_log_bytes = worker.log_path.stat().st_size
        return {
            "args": vars(args),
            "registries": list(kinds),
            "cli_binary": {"path": binary.path, "version": binary.version},
            "cli_login": login_seconds,
            "pipeline": pipeline,
            "cli": baseline,
            "cpu": cpu,
            "digests_verified": digests_ok,
            "worker_log_bytes": worker_log_bytes,
            "report": lambda after: machine_lines(bench, load_before, after, binary),
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


#: Issue 19's goals, against the newest CLI: pipeline / CLI at most this.
GOALS = {"new": 1.0, "large": 1.0, "repush": 0.6}
LABELS = {
    "new": "new push, {size} MiB",
    "large": "new push, {large} MiB",
    "repush": "re-push, {size} MiB (registry has it)",
}


def _round_medians(records: list[dict[str, Any]], key: str = "total") -> dict[int, float]:
    return median_per_round([(r["round"], r[key]) for r in records])


def spread(values: list[float] | dict[int, float], scale: float = 1000, digits: int = 1) -> str:
    """``min..max`` of per-round values (ms by default)."""
    seq = list(values.values()) if isinstance(values, dict) else values
    return f"{min(seq) * scale:.{digits}f}..{max(seq) * scale:.{digits}f}"


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per registry and benchmark: medians over all jobs, per-round medians and ratios."""
    args = results["args"]
    rows = []
    for kind in results.get("registries", ["tls"]):
        for scenario in ("new", "large", "repush"):
            p_records = [
                r for r in results["pipeline"][scenario] if r.get("registry", "tls") == kind
            ]
            c_records = [r for r in results["cli"][scenario] if r.get("registry", "tls") == kind]
            if not p_records or not c_records:
                continue
            p_rounds, c_rounds = _round_medians(p_records), _round_medians(c_records)
            ratios = [p_rounds[r] / c_rounds[r] for r in p_rounds if r in c_rounds]
            p = Stats.of([r["total"] for r in p_records])
            c = Stats.of([r["total"] for r in c_records])
            rows.append({
                "registry": kind, "scenario": scenario,
                "label": LABELS[scenario].format(size=args["size_mib"], large=args["large_mib"]),
                "jobs": p.n, "pipeline": p.median, "pipeline_rounds": p_rounds,
                "cli": c.median, "cli_rounds": c_rounds, "ratio": p.median / c.median,
                "ratio_rounds": ratios, "goal": GOALS[scenario],
            })  # fmt: skip
    return rows


def report(results: dict[str, Any]) -> list[str]:
    args = results["args"]
    cli = results["cli_binary"]
    logins = ", ".join(f"{k} {ms(v)} ms" for k, v in results["cli_login"].items())
    lines = [
        f"Command: `{command_line()}`",
        "",
        *results["report"](load_line()),
        f"- {args['rounds']} interleaved rounds (which side and which registry goes first "
        f"alternates); per round, registry and side {args['jobs']} x {args['size_mib']} MiB "
        f"and {args['large_jobs']} x {args['large_mib']} MiB new pushes, then the "
        f"{args['jobs']} small images again (re-push); worker concurrency "
        f"{args['concurrency']}, jobs one at a time; {args['warmup']} warm-up jobs per registry "
        "not counted",
        "- pipeline: `enqueue_push()` to the `job.succeeded` event (stamped in the last step's "
        "transaction); every job's events checked, and its digest verified by the push step "
        f"({results['digests_verified']} jobs)",
        f"- CLI: `{cli['path']} tag && {cli['path']} push` ({cli['version']}) per image after "
        f"one `docker login` per registry ({logins}, not counted)",
        "- median over every job of the run; in brackets the spread: min..max of the per-round "
        "medians (and of the per-round ratios)",
        "",
        "| registry | benchmark | jobs/side | pipeline ms (rounds) | CLI ms (rounds) "
        "| ratio (rounds) | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary_rows(results):
        met = "met" if row["ratio"] <= row["goal"] else "not met"
        lines.append(
            f"| {row['registry']} | {row['label']} | {row['jobs']} | {ms(row['pipeline'])} "
            f"({spread(row['pipeline_rounds'])}) | {ms(row['cli'])} ({spread(row['cli_rounds'])}) "
            f"| **{row['ratio']:.2f}** ({spread(row['ratio_rounds'], 1, 2)}) "
            f"| ≤ {row['goal']} {met} |"
        )
    lines += [
        "",
        "Where the pipeline's time goes (medians, ms; from the job's own events: step = "
        "`step.started` to `step.succeeded`/`skipped`, hops = the rest between the first "
        "`step.started` and `job.succeeded`, i.e. Celery handing on and the claim/record "
        "transactions around the steps):",
        "",
        "| registry | benchmark | enqueue call | enqueue → 1st step | resolve | login | tag "
        "| push | hops | CLI tag | CLI push |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def med(values: list[float]) -> str:
        return ms(statistics.median(values))

    for kind in results.get("registries", ["tls"]):
        for scenario in ("new", "large", "repush"):
            p_records = [
                r for r in results["pipeline"][scenario] if r.get("registry", "tls") == kind
            ]
            c_records = [r for r in results["cli"][scenario] if r.get("registry", "tls") == kind]
            if not p_records or not c_records:
                continue
            steps = [med([r["steps"][s] for r in p_records]) for s in STEPS]
            label = LABELS[scenario].format(size=args["size_mib"], large=args["large_mib"])
            lines.append(
                f"| {kind} | {label} | {med([r['enqueue_call'] for r in p_records])} "
                f"| {med([r['to_first_step'] for r in p_records])} | {' | '.join(steps)} "
                f"| {med([r['between_steps'] for r in p_records])} "
                f"| {med([r['tag'] for r in c_records])} | {med([r['push'] for r in c_records])} |"
            )
    lines += [
        "",
        "CPU per job (ms, median over batches; `producer` is this benchmark's process: the "
        "enqueue call and its polling for the job's end; dockerd and the registries are shared "
        "with whatever else runs on the stack):",
        "",
        "| registry | benchmark | side | worker (of which main process) | producer | docker CLI "
        "| dockerd | registry | total |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, batches in results["cpu"].items():
        kind, scenario, side = key.split("/")
        label = LABELS[scenario].format(size=args["size_mib"], large=args["large_mib"])
        parts = ["worker", "producer", "cli", "dockerd", "registry"]
        meds = {p: statistics.median([b[p] for b in batches]) for p in parts}
        total = statistics.median([sum(b[p] for p in parts) for b in batches])
        cells = [ms(meds[p]) if meds[p] > 0.0005 else "-" for p in parts]
        if meds["worker"] > 0.0005:
            cells[0] += f" ({ms(statistics.median([b['worker_main'] for b in batches]))})"
        lines.append(f"| {kind} | {label} | {side} | {' | '.join(cells)} | {ms(total)} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10, help="small images per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=1)
    parser.add_argument("--large-mib", type=int, default=50)
    parser.add_argument("--large-jobs", type=int, default=2, help="0: no large images")
    parser.add_argument("--warmup", type=int, default=4, help="pipeline jobs before measuring")
    parser.add_argument("--plot", action="store_true",
                        help="also redraw docs/benchmark-pushes.png")  # fmt: skip
    common_arguments(parser)
    baseline_arguments(parser)
    args = parser.parse_args(argv)
    if args.rounds < 3:
        print("bench: fewer than 3 rounds give no honest spread", file=sys.stderr)
    results = run(args)
    lines = report(results)
    write_section(
        f"Benchmarks 1 and 2: pushes and re-pushes against {results['cli_binary']['path']} "
        f"{results['cli_binary']['version']}, {args.database}, registry {args.registry}",
        lines, print_only=args.no_report,
    )  # fmt: skip
    data = {k: v for k, v in results.items() if k != "report"}
    path = save_results("pushes", data)
    print(f"bench: raw results in {path}", file=sys.stderr)
    if args.plot:
        from bench.plot import plot_pushes

        print(f"bench: plot {plot_pushes(data)}", file=sys.stderr)


if __name__ == "__main__":
    main()
