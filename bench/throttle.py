"""Benchmark 7: pushes to a registry that throttles above 4 concurrent pushes (issue 15).

    eval "$(scripts/stack env)"; .venv/bin/python -m bench.throttle [--jobs 200] [--rounds 3] \
        [--size-mib 1] [--concurrency 8] [--sides off,adaptive,capped,cli] [--hold 0] [--trace]

A private plain registry behind ``ThrottleProxy`` (tests/support/throttleproxy.py), which answers
``429 TOOMANYREQUESTS`` (no Retry-After, as Harbor does) to a push that would make more than
``--limit`` (4) pushes at once. Per round, each side pushes its own ``--jobs`` distinct images of
``--size-mib`` (1) MiB; the sides take turns, in an order that rotates from round to round (so no
side always runs first after the images are made). With ``--hold S`` the registry answers each
push's manifest ``PUT`` S seconds late, the push open meanwhile: a registry slower per push than
this machine (remote, busy), so that its limit rather than the two cores here bounds goodput, as
for a fleet pushing to a throttling registry elsewhere:

- ``off``: the worker as before flow control (``PUSHWORKER_FLOW_CONTROL=0``, default retry
  settings: 4 tries, backoff from 2 s), ``--concurrency`` (8) pool processes, the registry record
  without limits: a 429 is retried like an outage and a job fails after 4 tries;
- ``adaptive``: flow control on, the registry record without limits: the first 429s halve the
  registry's effective limit (AIMD), waits are re-queued;
- ``capped``: flow control on, the registry record set to ``--max-concurrent`` = the limit;
- ``cli``: a script doing ``docker tag && docker push`` for each image, 4 at a time (the newest
  docker CLI on PATH, whose version is reported).

Goodput is succeeded jobs / wall time (from the first enqueue to the last job's end: a failed
job counts in the time, not in the jobs); the proxy counts its 429 answers and all requests.

Where the time goes, measured rather than guessed:

- the proxy's open pushes, sampled every 20 ms: while at least ``2 x limit`` jobs are unfinished
  (work enough to fill every slot), the mean open pushes and the share of samples with fewer
  than ``limit`` open (a slot the registry would take sits idle);
- per job, from its events: ``push`` (the successful push try, ``step.started`` to its end),
  ``wait`` (the tag step's end to that try's start: flow-control waits, or 429s and backoffs),
  push tries, and the seconds spent in tries that failed;
- ``occupancy``: the successful tries' push seconds / (wall x limit), the share of the
  registry's capacity that did useful work. A controller that only removes 429s can at most
  turn the rest into pushes, so 1 / occupancy bounds its gain when the registry's limit, not the
  machine, bounds goodput;
- CPU: each party's CPU seconds per succeeded job (the worker's processes, dockerd, the
  throttled registry, this process with its proxy, the docker CLI) and the machine's busy
  share: where the CPU binds, off's CPU per job / a side's bounds that side's gain;
- with ``--trace`` (the worker runs as bench/slot_trace.py): where each held slot's time went,
  from its take to its release around the proxy's open and close of the push, how long a slot
  handed over stayed reserved, the polls refused, and SQLite's write lock
  (bench/slot_phases.py).

Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis

from bench.common import (
    Bench,
    CpuMeter,
    JobWatcher,
    MiB,
    PrivateRegistry,
    command_line,
    common_arguments,
    cpu_seconds,
    load_line,
    machine_lines,
    make_images,
    phase,
    save_results,
    setup,
    write_section,
)
from bench.slot_phases import read as read_trace
from bench.slot_phases import slot_phases
from harness.stack import RegistryEndpoint
from tests.support.throttleproxy import ThrottleProxy

SIDES = ("off", "adaptive", "capped", "cli")


class PlainRegistry(PrivateRegistry):
    """The benchmark's private registry without TLS: the proxy in front of it speaks HTTP."""

    def __init__(self, stack: dict[str, str], workdir: Path) -> None:
        import json

        (workdir / "plain").mkdir()
        super().__init__(stack, workdir / "plain")
        config_path = self.dir / "config.yml"
        config = json.loads(config_path.read_text())
        del config["http"]["tls"]
        config_path.write_text(json.dumps(config))

    @property
    def endpoint(self) -> RegistryEndpoint:
        return RegistryEndpoint(
            host=f"127.0.0.1:{self.port}", user=self.tls.user, password=self.tls.password,
            ca_file=None,
        )  # fmt: skip


class Sampler:
    """Samples every 20 ms the proxy's open pushes and how many jobs are unfinished, and, with
    flow control, the slots held and the jobs waiting for one (the registry's keys in Redis)."""

    def __init__(
        self, proxy: ThrottleProxy, jobs: int, broker_url: str | None = None, registry_id: int = 0
    ) -> None:
        self.proxy, self.pending = proxy, jobs
        self.samples: list[tuple[float, int, int, int, int]] = []
        self._redis = None if broker_url is None else redis.Redis.from_url(broker_url)
        self._keys = (
            f"pushworker:flow:{registry_id}:slots",
            f"pushworker:flow:{registry_id}:waiters",
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self.started = time.monotonic()

    def __enter__(self) -> Sampler:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            held = waiting = 0
            if self._redis is not None:
                pipe = self._redis.pipeline()
                pipe.zcard(self._keys[0])
                pipe.zcard(self._keys[1])
                held, waiting = (int(n) for n in pipe.execute())
            opened = self.proxy.open_pushes()
            self.samples.append((time.monotonic(), opened, self.pending, held, waiting))

    def summary(self, limit: int) -> dict[str, Any]:
        # Samples are not evenly spaced (this process also runs the proxy): weigh by time.
        open_seconds = sum(
            earlier[1] * (later[0] - earlier[0])
            for earlier, later in zip(self.samples, self.samples[1:], strict=False)
        )
        first = next((t for t, opened, *_ in self.samples if opened), self.started)
        busy = [s for s in self.samples if s[2] >= 2 * limit]
        steady = [s for s in busy if s[0] >= first]
        waiting = [s for s in steady if s[4] > 0]
        return {
            # Push-seconds the registry served: its capacity used is this / (limit x wall).
            "open_seconds": open_seconds,
            "first_open": first - self.started,
            "busy_seconds": len(busy) * 0.02,
            "mean_open": statistics.fmean(s[1] for s in busy) if busy else 0.0,
            "idle_slot_share": sum(s[1] < limit for s in busy) / max(len(busy), 1),
            "steady_mean_open": statistics.fmean(s[1] for s in steady) if steady else 0.0,
            "steady_idle_share": sum(s[1] < limit for s in steady) / max(len(steady), 1),
            # With jobs waiting for a slot: how many slots were held (the worker's view).
            "held_when_waiting": statistics.fmean(s[3] for s in waiting) if waiting else 0.0,
            "open_when_waiting": statistics.fmean(s[1] for s in waiting) if waiting else 0.0,
        }


def _registry_for(proxy: ThrottleProxy, endpoint: RegistryEndpoint, cap: int | None) -> int:
    from worker.registries import RegistrySpec, create_registry
    from worker.store.db import session_scope

    spec = RegistrySpec(
        name=f"throttled-{uuid.uuid4().hex[:6]}", url=proxy.url, kind="generic",
        username=endpoint.user, secret=endpoint.password, insecure=True, max_concurrent=cap,
    )  # fmt: skip
    with session_scope() as session:
        return create_registry(session, spec).id


def _pipeline_side(
    bench: Bench, watcher: JobWatcher, images: list[str], registry_id: int,
    proxy: ThrottleProxy, limit: int,
) -> dict[str, Any]:  # fmt: skip
    from worker.producer import enqueue_push

    with Sampler(proxy, len(images), bench.broker_url, registry_id) as sampler:
        started = time.time()
        job_ids = [
            enqueue_push(
                source_image=source, registry_id=registry_id, tag="v1", requested_by="bench",
                repository=f"throttle/{source.split('/', 1)[1].split(':', 1)[0]}",
            )
            for source in images
        ]  # fmt: skip
        pending, failed = set(job_ids), 0
        while pending:
            for job_id, status in watcher.statuses(pending).items():
                if status in ("succeeded", "failed", "cancelled"):
                    pending.discard(job_id)
                    failed += status != "succeeded"
            sampler.pending = len(pending)
            time.sleep(0.05)
        wall = time.time() - started
    outcome = _side(len(images), failed, wall, proxy)
    outcome.update(sampler.summary(limit))
    outcome.update(_job_times(watcher, job_ids, wall, limit))
    return outcome


def _job_times(watcher: JobWatcher, job_ids: list[str], wall: float, limit: int) -> dict[str, Any]:
    """Per job, from its events: the successful push try, the wait before it, the failed tries."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from worker.store.models import Event

    events: dict[str, list[tuple[str, str | None, float, int | None]]] = {
        job_id: [] for job_id in job_ids
    }
    with Session(watcher.engine) as session:
        for start in range(0, len(job_ids), 500):
            rows = session.execute(
                select(Event.job_id, Event.type, Event.step, Event.time, Event.attempt)
                .where(Event.job_id.in_(job_ids[start : start + 500]))
                .order_by(Event.id)
            )
            for job_id, type_, step, moment, attempt in rows:
                events[str(job_id)].append((str(type_), step, moment.timestamp(), attempt))
    waits, pushes, tries, failed_try_seconds, given_back, skips = [], [], [], 0.0, 0, 0
    for job_events in events.values():
        pushed = [(t, moment, attempt) for t, step, moment, attempt in job_events if step == "push"]
        # A try ends with its outcome, or with a wait that gave its claim back (the slot went to
        # another step between the claim and the upload): not a try, it does not count.
        starts = [moment for t, moment, _ in pushed if t == "step.started"]
        returned = sum(t == "step.waiting" and a is not None for t, _, a in pushed)
        # A delivery that found the push done or running (a waiter's own message after the
        # releasing process ran its push): a transaction and an event, nothing pushed.
        skips += sum(t == "step.skipped" for t, _, _ in pushed)
        given_back += returned
        tries.append(len(starts) - returned)
        begun: float | None = None
        for t, moment, attempt in pushed:
            if t == "step.started":
                begun = moment
            elif t == "step.failed" and begun is not None:
                failed_try_seconds += moment - begun
            if t in ("step.succeeded", "step.failed") or (t == "step.waiting" and attempt):
                begun = None
        done = [m for t, m, _ in pushed if t == "step.succeeded"]
        tag_ends = ("step.succeeded", "step.skipped")
        tagged = [m for t, step, m, _ in job_events if step == "tag" and t in tag_ends]
        if done and starts and tagged:
            last_start = max(m for m in starts if m <= done[-1])
            pushes.append(done[-1] - last_start)
            waits.append(max(0.0, last_start - tagged[-1]))
    return {
        "push_median": statistics.median(pushes) if pushes else 0.0,
        "wait_median": statistics.median(waits) if waits else 0.0,
        "wait_mean": statistics.fmean(waits) if waits else 0.0,
        "push_tries": sum(tries),
        "claims_given_back": given_back,
        "push_skips": skips,
        "failed_try_seconds": failed_try_seconds,
        "occupancy": sum(pushes) / (wall * limit),
    }


def _per_job_line(results: dict[str, list[dict[str, Any]]], key: str, text: str) -> list[str]:
    """A paragraph of ``key`` per job for each side that counted it (median over rounds)."""
    figures = [
        f"{side} {statistics.median(r[key] / max(r['jobs'], 1) for r in rounds):.2f}"
        for side, rounds in results.items()
        if rounds and key in rounds[0]
    ]
    return ["", text + "; ".join(figures)] if figures else []


def _superseded(worker_log: Path) -> int:
    """Deliveries of a waiter's own message that stopped on arrival, its job ended by a
    hand-over's run (``step.superseded`` in the worker's log): no transaction, no event."""
    try:
        return worker_log.read_text(errors="replace").count("step.superseded")
    except OSError:
        return 0


def _side(jobs: int, failed: int, wall: float, proxy: ThrottleProxy) -> dict[str, Any]:
    requests = len(proxy.seen)
    return {
        "jobs": jobs, "succeeded": jobs - failed, "failed": failed, "wall": wall,
        "goodput": (jobs - failed) / wall, "throttled": proxy.throttled, "requests": requests,
        "throttled_share": proxy.throttled / max(requests, 1), "max_open": proxy.max_open,
        "opened": proxy.opened, **_push_phases(proxy),
    }  # fmt: skip


def _push_phases(proxy: ThrottleProxy) -> dict[str, float]:
    """Medians over pushes, from the proxy's clock: before the registry counts a push (the
    Docker Engine's first requests of it), while it counts it, and after (the worker's check
    that the tag serves the pushed digest)."""
    phases: dict[str, list[float]] = {"before_open": [], "open": [], "after_close": []}
    for first, opened, closed, last in proxy.timeline.values():
        if first is None or opened is None or closed is None or last is None:
            continue
        phases["before_open"].append(opened - first)
        phases["open"].append(closed - opened)
        phases["after_close"].append(last - closed)
    return {key: statistics.median(values) if values else 0.0 for key, values in phases.items()}


def _cli_side(
    docker: str, config: Path, env: dict[str, str], images: list[str], proxy: ThrottleProxy,
    endpoint: RegistryEndpoint, limit: int,
) -> dict[str, Any]:  # fmt: skip
    def run(*args: str, stdin: str | None = None) -> bool:
        result = subprocess.run(
            [docker, "--config", str(config), *args], input=stdin, text=True, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return result.returncode == 0

    if not run(
        "login", "-u", endpoint.user, "--password-stdin", proxy.host, stdin=endpoint.password
    ):
        raise SystemExit(f"docker login to {proxy.host} failed")

    with Sampler(proxy, len(images)) as sampler:
        lock = threading.Lock()

        def push(source: str) -> bool:
            target = f"{proxy.host}/throttle/{source.split('/', 1)[1].split(':', 1)[0]}:v1"
            ok = run("tag", source, target) and run("push", target)
            with lock:
                sampler.pending -= 1
            return ok

        started = time.time()
        with ThreadPoolExecutor(max_workers=limit) as pool:
            results = list(pool.map(push, images))
        wall = time.time() - started
    outcome = _side(len(images), results.count(False), wall, proxy)
    outcome.update(sampler.summary(limit))
    return outcome


class _Cpu:
    """CPU used from now until ``used()``: the machine's busy share (both cores, every process
    on it, this side's and anyone else's) and the CPU seconds of each party of a push (the
    worker's processes, dockerd, the throttled registry, this process: producer, proxy and
    sampler; the docker CLI processes it ran)."""

    def __init__(self, bench: Bench, registry: PrivateRegistry, worker: Any = None) -> None:
        self.meter = CpuMeter(bench, worker)
        # The throttled registry (the meter knows the benchmark's own registries, idle here).
        self.registry = registry.process.pid if registry.process is not None else 0
        self.before, self.machine = self._snapshot(), _cpu_times()

    def _snapshot(self) -> dict[str, float]:
        return {**self.meter.snapshot(), "registry": cpu_seconds(self.registry)}

    def used(self) -> dict[str, Any]:
        after, machine = self._snapshot(), _cpu_times()
        busy = (machine[0] - self.machine[0]) / max(machine[1] - self.machine[1], 1)
        parties = ("worker", "dockerd", "registry", "producer", "cli")
        return {
            "cpu_busy": busy,
            "cpu": {party: after[party] - self.before[party] for party in parties},
        }


def _cpu_times() -> tuple[int, int]:
    """The machine's CPU time so far (all cores, in clock ticks): busy, and busy plus idle."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return sum(fields) - idle, sum(fields)


def _docker_cli() -> tuple[str, str]:
    """The newest docker CLI on PATH (several may be installed), and its version."""
    found: list[tuple[tuple[int, ...], str, str]] = []
    for directory in dict.fromkeys(Path(p) for p in os.environ.get("PATH", "").split(":") if p):
        candidate = directory / "docker"
        if not candidate.is_file():
            continue
        version = subprocess.run(
            [str(candidate), "version", "--format", "{{.Client.Version}}"],
            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},
        ).stdout.strip()  # fmt: skip
        numbers = tuple(int(part) for part in version.split("+")[0].split(".") if part.isdigit())
        found.append((numbers, str(candidate.resolve()), version))
    if not found:
        raise SystemExit("no docker CLI on PATH")
    _, path, version = max(found)
    return path, version


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = load_line()
    bench = setup("throttle", args)
    plain = PlainRegistry(bench.stack, bench.workdir).start()
    endpoint = plain.endpoint
    docker, version = _docker_cli()
    config = bench.workdir / "docker-config"
    config.mkdir()
    cli_env = {"DOCKER_HOST": bench.stack["DOCKER_HOST"], "PATH": "/usr/bin:/bin"}
    sides = [side for side in SIDES if side in args.sides.split(",")]
    size = round(args.size_mib * MiB)
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    try:
        with phase("images"):
            images = {
                (side, r): make_images(bench.api, f"{bench.run_id}-{side}{r}", args.jobs, size)
                for r in range(args.rounds)
                for side in sides
            }
        watcher = JobWatcher(bench.database_url)
        host, port = endpoint.host.rsplit(":", 1)
        for round_no in range(args.rounds):
            shift = round_no % len(sides)
            for side in sides[shift:] + sides[:shift]:
                proxy = ThrottleProxy(host, int(port), limit=args.limit, hold=args.hold)
                proxy.start()
                load = load_line()
                trace = bench.workdir / f"trace-{side}{round_no}" if args.trace else None
                try:
                    with phase(f"round {round_no + 1}: {side}"):
                        batch = images[(side, round_no)]
                        if side == "cli":
                            cpu = _Cpu(bench, plain)
                            outcome = _cli_side(
                                docker, config, cli_env, batch, proxy, endpoint, args.limit
                            )
                            outcome.update(cpu.used())
                        else:
                            cap = (args.cap or args.limit) if side == "capped" else None
                            registry_id = _registry_for(proxy, endpoint, cap)
                            flag = "0" if side == "off" else "1"
                            env = {"PUSHWORKER_FLOW_CONTROL": flag}
                            if trace is not None:
                                trace.mkdir()
                                env["BENCH_SLOT_TRACE"] = str(trace)
                            worker = bench.worker(
                                "bench.slot_trace" if trace else "tasks.app",
                                concurrency=args.concurrency, label=f"{side}{round_no}",
                                extra_env=env,
                            )  # fmt: skip
                            worker_log = bench.workdir / f"worker-{side}{round_no}.log"
                            try:
                                cpu = _Cpu(bench, plain, worker)
                                outcome = _pipeline_side(
                                    bench, watcher, batch, registry_id, proxy, args.limit
                                )
                                outcome.update(cpu.used())
                            finally:
                                worker.stop()
                            outcome["push_superseded"] = _superseded(worker_log)
                            if trace is not None:
                                outcome.update(slot_phases(read_trace(trace), proxy.timeline))
                    outcome["round"] = round_no
                    outcome["load"] = load
                    results[side].append(outcome)
                    print(f"bench: {side}: {outcome}", file=sys.stderr)
                finally:
                    proxy.close()
        watcher.close()
    finally:
        plain.stop()
        bench.close()
    return {
        "results": results, "docker": f"{docker} {version}", "args": vars(args),
        "machine": machine_lines(bench, load_before, load_line()),
    }  # fmt: skip


LABELS = {
    "off": "worker, no flow control (as before flow control)",
    "adaptive": "worker, flow control, no cap configured (AIMD learns it)",
    "capped": "worker, flow control, `--max-concurrent` = the cap",
    "cli": "script: `docker tag && docker push`, 4 in parallel",
}


def _spread(values: list[float], digits: int = 2) -> str:
    return (
        f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-"
        f"{max(values):.{digits}f})"
    )


def report(data: dict[str, Any]) -> list[str]:
    args = data["args"]
    results: dict[str, list[dict[str, Any]]] = data["results"]
    order = ", ".join(results)
    lines = [
        f"`{command_line()}`",
        "",
        f"{args['jobs']} jobs per side and round, {args['rounds']} rounds (interleaved: {order}; "
        f"the order rotates each round); {args.get('size_mib', 1):g} MiB images (one layer); the "
        f"registry answers 429 (no Retry-After) to a push above {args['limit']} at once"
        f"{_held(args.get('hold', 0.0))}; worker "
        f"concurrency {args['concurrency']} (one worker, prefork); the capped side's cap "
        f"{args.get('cap') or args['limit']}; docker CLI {data['docker']}.",
        "",
        "| side | goodput jobs/s, median (min-max) | succeeded | failed | 429s per round, median "
        "(min-max) | 429 share of all requests (pooled) | most pushes at once |",
        "|---|---|---|---|---|---|---|",
    ]
    for side, rounds in results.items():
        if not rounds:
            continue
        throttled = [float(r["throttled"]) for r in rounds]
        pooled = sum(r["throttled"] for r in rounds) / max(sum(r["requests"] for r in rounds), 1)
        lines.append(
            f"| {LABELS[side]} | {_spread([r['goodput'] for r in rounds])} | "
            f"{sum(r['succeeded'] for r in rounds)} | {sum(r['failed'] for r in rounds)} | "
            f"{_spread(throttled, 0)} | {100 * pooled:.1f}% | "
            f"{max(r['max_open'] for r in rounds)} |"
        )
    lines += [
        "",
        'Where the time went (medians over rounds). "Registry busy": the push-seconds the '
        "registry served (the proxy's open pushes, integrated) / (limit x wall), the share of "
        'its capacity used; "s open per push": those push-seconds / pushes it let in; "slot '
        f'idle": share of the time, while at least {2 * args["limit"]} jobs were unfinished, '
        f"with fewer than {args['limit']} pushes open; push s: a job's successful push step "
        "(its claim to its end, median); wait s: from the tag step's end to that push's start "
        "(mean: flow-control waits, or 429s and backoffs).",
        "",
        "| side | registry busy | s open per push | slot idle | first push opened after s | "
        "push s | registry's view: s before open / open / after close | wait s | push tries/job "
        "| s in failed tries per round |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for side, rounds in results.items():
        if not rounds:
            continue

        def med(key: str, rounds: list[dict[str, Any]] = rounds) -> float:
            return statistics.median(float(r.get(key, 0.0)) for r in rounds)

        busy = [r["open_seconds"] / (args["limit"] * r["wall"]) for r in rounds]
        per_push = [r["open_seconds"] / max(r["opened"], 1) for r in rounds]
        row = (
            f"| {side} | {_spread([100 * b for b in busy], 0)}% | {_spread(per_push)} | "
            f"{100 * med('idle_slot_share'):.0f}% | {med('first_open'):.1f} | "
        )
        phases = f"{med('before_open'):.2f} / {med('open'):.2f} / {med('after_close'):.2f}"
        if side == "cli":
            row += f"- | {phases} | - | 1.00 | - |"
        else:
            row += (
                f"{med('push_median'):.2f} | {phases} | {med('wait_mean'):.1f} | "
                f"{med('push_tries') / args['jobs']:.2f} | {med('failed_try_seconds'):.1f} |"
            )
        lines.append(row)
    given_back = [
        f"{side} " + ", ".join(str(r["claims_given_back"]) for r in rounds)
        for side, rounds in results.items()
        if rounds and "claims_given_back" in rounds[0]
    ]
    if given_back:
        lines += [
            "",
            "Push claims given back per round (the slot free when a step was claimed went to "
            "another before its upload; the step waited, the try not counted): "
            + "; ".join(given_back),
        ]
    lines += _per_job_line(
        results, "push_skips",
        "Push deliveries skipped per job (median over rounds; the push done or running "
        "already, e.g. a waiter's own message after the releasing process ran its push: a "
        "transaction and a `step.skipped` event each): ",
    )  # fmt: skip
    lines += _per_job_line(
        results, "push_superseded",
        "Push deliveries stopped on arrival per job (median over rounds; a waiter's own "
        "message whose job a hand-over's run ended, `step.superseded` in the worker's log: "
        "one Redis call, no transaction, no event): ",
    )  # fmt: skip
    lines += _slot_lines(results)
    lines += _cpu_lines(results)
    off = results.get("off", [])
    for side in ("adaptive", "capped", "cli"):
        mine = results.get(side, [])
        if off and mine:
            ratios = [m["goodput"] / o["goodput"] for m, o in zip(mine, off, strict=False)]
            lines += ["", f"Goodput {side} / off per round: "
                      + ", ".join(f"{ratio:.2f}x" for ratio in ratios)]  # fmt: skip
    if off:
        # A controller can at most fill the registry's idle capacity: with each push open as
        # long as in the uncontrolled run, goodput is at most limit / (s open per push).
        bounds = [
            args["limit"] / (o["open_seconds"] / max(o["opened"], 1)) / o["goodput"] for o in off
        ]
        lines += [
            "",
            "Bound on any controller's gain over off, per round (the registry kept at its limit "
            "for the whole run, pushes as long as off's): "
            + ", ".join(f"{bound:.2f}x" for bound in bounds),
        ]
        lines += _cpu_bound_lines(results)
    lines += ["", *data["machine"]]
    for side, rounds in results.items():
        lines.append(f"- load at the start of each {side} round: "
                     + "; ".join(str(r.get("load", "?")) for r in rounds))  # fmt: skip
    lines.append(
        "- the throttled registry: a second private instance, plain HTTP, behind the proxy "
        "(the TLS one above is not used here)"
    )
    return lines


def _cpu_lines(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """CPU per succeeded job by party, and the machine's busy share, per side."""
    measured = {side: rounds for side, rounds in results.items() if rounds and "cpu" in rounds[0]}
    if not measured:
        return []
    lines = [
        "",
        "CPU (medians over rounds): ms per succeeded job of each party, all of them, and the "
        "machine's busy share (both cores, every process, anyone's) while the side ran.",
        "",
        "| side | worker | dockerd | registry | benchmark process (proxy, producer) | docker CLI "
        "| all | machine busy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    parties = ("worker", "dockerd", "registry", "producer", "cli")
    for side, rounds in measured.items():

        def per_job(party: str | None, rounds: list[dict[str, Any]] = rounds) -> str:
            values = [
                (sum(r["cpu"].values()) if party is None else r["cpu"][party])
                / max(r["succeeded"], 1)
                for r in rounds
            ]
            return f"{1000 * statistics.median(values):.0f}"

        busy = statistics.median(r["cpu_busy"] for r in rounds)
        cells = " | ".join(per_job(party) for party in parties)
        lines.append(f"| {side} | {cells} | {per_job(None)} | {100 * busy:.0f}% |")
    return lines


def _cpu_bound_lines(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Where the machine's CPU, not the registry, bounds goodput (busy throughout), a side can
    do at most as much better than off as it needs less CPU per job: off's CPU per succeeded
    job / its own, per round (the share of the machine each side gets being equal)."""
    off = results.get("off", [])
    if not off or not all("cpu" in r for r in off):
        return []
    parts = []
    for side in ("adaptive", "capped", "cli"):
        mine = results.get(side, [])
        if not mine or not all("cpu" in r for r in mine):
            continue
        bounds = [
            (sum(o["cpu"].values()) / max(o["succeeded"], 1))
            / max(sum(m["cpu"].values()) / max(m["succeeded"], 1), 1e-9)
            for m, o in zip(mine, off, strict=False)
        ]
        parts.append(f"{side} " + ", ".join(f"{bound:.2f}x" for bound in bounds))
    return [
        "",
        "Bound where the CPU binds instead (the machine busy throughout): off's CPU per "
        "succeeded job / the side's, per round: " + "; ".join(parts),
    ]


def _slot_lines(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """With ``--trace``: where the time between a slot's acquire and its release went (means
    per push the registry let in, medians over rounds), and how long a slot handed over stayed
    reserved before its waiter took it."""
    traced = {
        side: rounds for side, rounds in results.items() if rounds and "slot_held" in rounds[0]
    }
    if not traced:
        return []
    lines = [
        "",
        "Where a held slot's time went (`--trace`: bench/slot_trace.py in the worker, joined with "
        "the proxy's clock; means per push the registry let in, medians over rounds, ms): from "
        "the slot's acquire to the engine's push call, to the registry opening the push (its "
        "first blob upload), open, from the registry closing it (manifest PUT answered) to the "
        "call's return, to the slot's release; then each hand-over's reservation until its "
        "waiter took the slot; and the polls that found no slot (refused asks before a claim, "
        "or refused takes: before the claim in the code that takes the slot there, else a slot "
        "gone between the claim and the upload).",
        "",
        "| side | pushes traced | held | acquire to call | call to open | open | close to return "
        "| return to release | open / held | hand-overs per round | reserved per hand-over, "
        "mean (median) | reservations never taken | refused asks / takes per job |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for side, rounds in traced.items():

        def ms(key: str, rounds: list[dict[str, Any]] = rounds) -> str:
            return f"{1000 * statistics.median(float(r[key]) for r in rounds):.0f}"

        def per_job(key: str, rounds: list[dict[str, Any]] = rounds) -> str:
            values = [r.get(key, 0) / max(r.get("slot_jobs", 0), 1) for r in rounds]
            return f"{statistics.median(values):.2f}"

        share = statistics.median(
            r["slot_open_seconds"] / max(r["slot_held_seconds"], 1e-9) for r in rounds
        )
        lines.append(
            f"| {side} | {sum(r['slot_pushes'] for r in rounds)} | {ms('slot_held')} | "
            f"{ms('slot_acquire_to_call')} | {ms('slot_call_to_open')} | {ms('slot_open')} | "
            f"{ms('slot_close_to_return')} | {ms('slot_return_to_free')} | {100 * share:.0f}% | "
            f"{statistics.median(r['slot_handovers'] for r in rounds):.0f} | "
            f"{ms('slot_handover_gap')} ({ms('slot_handover_gap_median')}) | "
            f"{sum(r['slot_untaken_reservations'] for r in rounds)} | "
            f"{per_job('slot_refused_asks')} / {per_job('slot_refused_takes')} |"
        )
    lines += [
        "",
        "SQLite's write lock (every write transaction takes it first; medians over rounds): "
        + "; ".join(_lock_text(side, rounds) for side, rounds in results.items() if rounds),
    ]
    return lines


def _lock_text(side: str, rounds: list[dict[str, Any]]) -> str:
    if not all(r.get("lock_transactions") for r in rounds):
        return f"{side} -"

    def med(key: str, per_job: bool = False) -> float:
        return statistics.median(
            float(r[key]) / (max(r["succeeded"], 1) if per_job else 1) for r in rounds
        )

    return (
        f"{side} held {100 * med('lock_held_share'):.0f}% of the time, "
        f"{med('lock_transactions', True):.1f} transactions per job, waited "
        f"{1000 * med('lock_wait_seconds', True):.0f} ms and held "
        f"{1000 * med('lock_hold_seconds', True):.0f} ms per job"
    )


def _held(hold: float) -> str:
    if not hold:
        return ""
    return (
        f" and answers each push's manifest PUT {hold:g} s late, the push open meanwhile (a "
        "registry slower per push than this machine, e.g. remote: its limit, not the CPU here, "
        "bounds goodput)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs per side and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit", type=int, default=4, help="pushes at once the registry takes")
    parser.add_argument("--size-mib", type=float, default=1.0, help="size of each image's layer")
    parser.add_argument(
        "--cap", type=int, default=None,
        help="the capped side's --max-concurrent (default: the registry's --limit)",
    )  # fmt: skip
    parser.add_argument("--sides", default=",".join(SIDES), help="which sides, comma-separated")
    parser.add_argument(
        "--hold", type=float, default=0.0,
        help="seconds the registry answers each push's manifest PUT late (the push open "
        "meanwhile): a registry slower than this machine, so that its limit binds, not the CPU",
    )  # fmt: skip
    parser.add_argument(
        "--trace", action="store_true",
        help="run the worker as bench.slot_trace and report where each held slot's time went",
    )  # fmt: skip
    common_arguments(parser)
    parser.set_defaults(concurrency=8)
    args = parser.parse_args(argv)
    data = run(args)
    lines = report(data)
    write_section(
        f"Benchmark 7: a registry that throttles above {args.limit} pushes", lines,
        print_only=args.no_report,
    )  # fmt: skip
    path = save_results("throttle", data)
    print(f"bench: raw results in {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
