"""A burst of jobs (10,000 by default) through a real worker: enqueue rate, time to drain, peak
memory of the worker, the broker and the database, and proof that none was lost or duplicated.

    eval "$(scripts/stack env)"; .venv/bin/python -m bench.burst [--jobs 10000] [--producers 1]
        [--database postgres|sqlite] [--registry tls|plain] [--broker-db 12]

Everything is real: a Celery prefork worker (``celery -A tasks.app worker -c 4``), Redis as the
broker (its own database), the stack's Docker Engine, a private copy of one of the stack's
registries, and PostgreSQL (a fresh database; SQLite with ``--database sqlite``). Every job is
enqueued through the producer API the platform calls (``worker.producer.enqueue_push``, with an
idempotency key each, as fast as ``--producers`` threads can call it) before or while the worker
drains them. The images are a handful (``--images``) of small one-layer images, each re-pushed
under distinct tags, so that the registry's work is light (one manifest a job; the layer is
there after the first push) and what is measured is the pipeline.

While the burst runs, every 250 ms: the RSS of each worker process (main and pool), the memory of
the broker's database in Redis (``MEMORY USAGE`` of each of its keys, its queue length) and the
server's ``used_memory`` (Redis is shared: the server's figure includes others' data), and the
RSS and private memory of the PostgreSQL backends connected to the benchmark's database.

Afterwards, from the event log, the registry's access log and its tag lists: every job
``succeeded`` (0 lost) and pushed exactly once (0 duplicated): one ``job.enqueued``, one
``job.succeeded``, one push ``step.succeeded`` per job; exactly one manifest PUT per job at the
registry; every expected tag served. Nothing asserts a time.

Tags the pipeline made on the Docker Engine are removed once their job succeeded (``--keep-tags``
keeps them): each tag rewrites the engine's whole reference store and lengthens the image's tag
list every inspect returns, so 10,000 tags on 8 images would measure the engine's bookkeeping
rather than the pipeline. The removal is recorded in the report.
"""

from __future__ import annotations

import argparse
import bisect
import json
import re
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import redis
import requests
from sqlalchemy import text

from bench.common import (
    REGISTRY_IDS,
    Bench,
    JobWatcher,
    Stats,
    command_line,
    common_arguments,
    load_line,
    machine_lines,
    make_images,
    phase,
    rss_bytes,
    save_results,
    setup,
    write_section,
)
from harness.worker import CeleryProcess

KiB = 1024
MiB = 2**20
TERMINAL = ("succeeded", "failed", "cancelled")
#: A manifest PUT the registry answered 201, in its combined-format access log line.
MANIFEST_PUT = re.compile(r'"PUT /v2/\S+/manifests/\S+ HTTP/[0-9.]+" 201 ')
STEPS = ("resolve_credentials", "login", "tag", "push")


@dataclass
class Job:
    index: int
    source: str
    repository: str
    tag: str
    job_id: str = ""
    started: float = 0.0
    returned: float = 0.0


def private_kib(pid: int) -> int:
    """Private (unshared) memory of a process in KiB, from smaps_rollup: a PostgreSQL backend's
    RSS counts the shared buffers it touched, which all backends share."""
    try:
        text_ = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    total = 0
    for line in text_.splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total


@dataclass
class Sampler:
    """Peaks of the worker's, the broker's and the database's memory, every ``interval`` s."""

    worker: CeleryProcess
    broker_url: str
    database_url: str
    pg_database: str | None
    interval: float = 0.25
    worker_peaks: dict[int, int] = field(default_factory=dict)
    worker_peak_sum: int = 0
    broker_keys_peak: int = 0
    broker_queue_peak: int = 0
    redis_used_base: int = 0
    redis_used_peak: int = 0
    pg_rss_peak_sum: int = 0
    pg_private_peak_sum: int = 0
    pg_backends_peak: int = 0
    pg_backend_rss_peak: int = 0
    samples: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    #: Every ``timeline_every`` s: (time, {pid: RSS}) of the worker's processes, to tell a
    #: process that keeps growing with the jobs it ran from one that reached its size.
    timeline: list[tuple[float, dict[int, int]]] = field(default_factory=list)
    timeline_every: float = 5.0

    def __post_init__(self) -> None:
        self._redis = redis.Redis.from_url(self.broker_url)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._pg: Any = None
        if self.pg_database is not None:
            import psycopg

            url = self.database_url.replace("postgresql+psycopg://", "postgresql://")
            self._pg = psycopg.connect(url, autocommit=True)

    def __enter__(self) -> Sampler:
        info: dict[str, Any] = self._redis.info("memory")  # type: ignore[assignment]
        self.redis_used_base = int(info["used_memory"])
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        if self._pg is not None:
            self._pg.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        self.samples += 1
        total = 0
        now, sizes = time.time(), {}
        for pid in self.worker.pids():
            rss = rss_bytes(pid)
            total += rss
            sizes[pid] = rss
            self.worker_peaks[pid] = max(self.worker_peaks.get(pid, 0), rss)
        self.worker_peak_sum = max(self.worker_peak_sum, total)
        if not self.timeline or now - self.timeline[-1][0] >= self.timeline_every:
            self.timeline.append((now, sizes))
        try:
            self._sample_redis()
        except redis.RedisError as error:
            self.errors[f"redis: {type(error).__name__}"] += 1
        if self._pg is not None:
            try:
                self._sample_pg()
            except Exception as error:  # a sample lost is reported, the run goes on
                self.errors[f"postgres: {type(error).__name__}"] += 1

    def _sample_redis(self) -> None:
        # The broker's database holds few keys (the queue, kombu's unacked hash and index,
        # bindings, flow control's): MEMORY USAGE of each is the database's own footprint.
        keys = list(self._redis.scan_iter(count=1000))
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.memory_usage(key)
        pipe.llen("pushworker")
        pipe.info("memory")
        answers = pipe.execute()
        info = answers[-1]
        self.broker_queue_peak = max(self.broker_queue_peak, int(answers[-2]))
        self.broker_keys_peak = max(self.broker_keys_peak, sum(int(a or 0) for a in answers[:-2]))
        self.redis_used_peak = max(self.redis_used_peak, int(info["used_memory"]))

    def _sample_pg(self) -> None:
        pids = [
            int(row[0])
            for row in self._pg.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.pg_database,),
            ).fetchall()
        ]
        rss = [rss_bytes(pid) for pid in pids]
        self.pg_backends_peak = max(self.pg_backends_peak, len(pids))
        self.pg_rss_peak_sum = max(self.pg_rss_peak_sum, sum(rss))
        self.pg_backend_rss_peak = max([self.pg_backend_rss_peak, *rss])
        private = sum(private_kib(pid) for pid in pids) * KiB
        self.pg_private_peak_sum = max(self.pg_private_peak_sum, private)


class Untagger:
    """Removes the Docker Engine tag of each job that succeeded (see the module's docstring)."""

    def __init__(self, bench: Bench, host: str, jobs: list[Job]) -> None:
        self.api = docker.APIClient(base_url=bench.stack["DOCKER_HOST"], version="auto")
        self.engine = JobWatcher(bench.database_url).engine
        self.reference = {job.job_id: f"{host}/{job.repository}:{job.tag}" for job in jobs}
        self.removed = 0
        self.failed = 0
        self._done: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="untagger", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pass()  # the last ones
        self.engine.dispose()

    def _run(self) -> None:
        while not self._stop.wait(2.0):
            self._pass()

    def _pass(self) -> None:
        with self.engine.connect() as connection:
            finished = [
                str(row[0])
                for row in connection.execute(
                    text("SELECT id FROM push_jobs WHERE status = 'succeeded'")
                )
            ]
        for job_id in finished:
            if job_id in self._done or job_id not in self.reference:
                continue
            self._done.add(job_id)
            try:
                self.api.remove_image(self.reference[job_id], noprune=True)
                self.removed += 1
            except docker.errors.APIError:
                self.failed += 1


def enqueue_all(jobs: list[Job], registry_id: int, producers: int, run_id: str) -> None:
    """Every job through ``enqueue_push`` (``producers`` threads, each its own share)."""
    from worker.producer import enqueue_push

    def one(job: Job) -> None:
        job.started = time.time()
        job.job_id = enqueue_push(
            source_image=job.source, registry_id=registry_id, repository=job.repository,
            tag=job.tag, requested_by="bench-burst", idempotency_key=f"burst-{run_id}-{job.index}",
        )  # fmt: skip
        job.returned = time.time()

    if producers <= 1:
        for job in jobs:
            one(job)
        return
    with ThreadPoolExecutor(max_workers=producers) as pool:
        list(pool.map(one, jobs))


def wait_drained(watcher: JobWatcher, count: int, timeout: float) -> dict[str, int]:
    """Until every job is in a final state (or ``timeout``); the count of each status."""
    deadline = time.monotonic() + timeout
    last_report = 0.0
    statuses: dict[str, int] = {}
    while time.monotonic() < deadline:
        with watcher.engine.connect() as connection:
            statuses = {
                str(status): int(n)
                for status, n in connection.execute(
                    text("SELECT status, count(*) FROM push_jobs GROUP BY status")
                )
            }
        final = sum(statuses.get(s, 0) for s in TERMINAL)
        if time.monotonic() - last_report > 30:
            print(f"bench: {final}/{count} jobs final, {statuses}", file=sys.stderr, flush=True)
            last_report = time.monotonic()
        if final >= count:
            break
        time.sleep(1.0)
    return statuses


def check_events(watcher: JobWatcher, jobs: list[Job]) -> dict[str, Any]:
    """Per job, how many of each event: lost and duplicated work shows here."""
    counts: dict[str, Counter[tuple[str, str | None]]] = {job.job_id: Counter() for job in jobs}
    succeeded_at: list[float] = []
    with watcher.engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT job_id, type, step, count(*) FROM events WHERE job_id IS NOT NULL "
                "GROUP BY job_id, type, step"
            )
        )
        for job_id, type_, step, n in rows:
            counts.setdefault(str(job_id), Counter())[(str(type_), step)] += int(n)
        for (moment,) in connection.execute(
            text("SELECT time FROM events WHERE type = 'job.succeeded'")
        ):
            succeeded_at.append(moment.timestamp() if hasattr(moment, "timestamp") else moment)
        digests = int(
            connection.execute(
                text("SELECT count(*) FROM push_jobs WHERE digest LIKE 'sha256:%'")
            ).scalar_one()
        )
    not_exactly_once: Counter[str] = Counter()
    push_runs: Counter[int] = Counter()
    retried: Counter[str] = Counter()
    shapes: Counter[str] = Counter()
    for job in jobs:
        c = counts.get(job.job_id, Counter())
        for what, key in (
            ("job.enqueued", ("job.enqueued", None)),
            ("job.succeeded", ("job.succeeded", None)),
            ("push step.succeeded", ("step.succeeded", "push")),
        ):
            if c[key] != 1:
                not_exactly_once[what] += 1
        push_runs[c[("step.succeeded", "push")]] += 1
        for step in STEPS:
            if c[("step.started", step)] > 1:
                retried[step] += 1
        shapes[
            ", ".join(f"{t}{'/' + s if s else ''} x{n}" for (t, s), n in sorted(c.items(), key=str))
        ] += 1
    return {
        "not_exactly_once": dict(not_exactly_once),
        "push_step_succeeded_per_job": {str(k): v for k, v in sorted(push_runs.items())},
        "steps_started_more_than_once": dict(retried),
        "event_shapes": dict(shapes.most_common(5)),
        "succeeded_at": sorted(succeeded_at),
        "digests_recorded": digests,
        "unknown_jobs": len(set(counts) - {job.job_id for job in jobs}),
    }


def check_registry(bench: Bench, kind: str, jobs: list[Job]) -> dict[str, Any]:
    """The registry's side: manifest PUTs answered 201 in its access log, tags it serves."""
    private = bench.registries[kind]
    puts = 0
    with (private.dir / "registry.log").open(errors="replace") as log:
        for line in log:
            puts += bool(MANIFEST_PUT.search(line))
    endpoint = private.endpoint
    auth = (endpoint.user, endpoint.password)
    verify: str | bool = endpoint.ca_file or True
    expected: dict[str, set[str]] = {}
    for job in jobs:
        expected.setdefault(job.repository, set()).add(job.tag)
    served: dict[str, set[str]] = {}
    for repository in expected:
        answer = requests.get(
            f"{endpoint.url}/v2/{repository}/tags/list", auth=auth, verify=verify, timeout=60
        )
        answer.raise_for_status()
        served[repository] = set(answer.json().get("tags") or [])
    missing = sum(len(tags - served.get(repo, set())) for repo, tags in expected.items())
    extra = sum(len(served.get(repo, set()) - tags) for repo, tags in expected.items())
    return {
        "manifest_puts": puts,
        "tags_served": sum(len(t) for t in served.values()),
        "tags_missing": missing,
        "tags_unexpected": extra,
    }


def windows(moments: list[float], start: float, width: float = 10.0) -> list[float]:
    """Completions per second in consecutive ``width``-second windows from ``start`` (the last,
    partial window left out)."""
    if not moments:
        return []
    end = moments[-1]
    rates = []
    edge = start
    index = 0
    while edge + width <= end:
        n = 0
        while index < len(moments) and moments[index] < edge + width:
            n += 1
            index += 1
        rates.append(n / width)
        edge += width
    return rates


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = load_line()
    bench = setup("burst", args, (args.registry,), registry_log_level="info")
    try:
        with phase(f"{args.images} images of {args.image_kib} KiB"):
            sources = make_images(bench.api, f"{bench.run_id}-burst", args.images,
                                  args.image_kib * KiB)  # fmt: skip
        jobs = []
        for index in range(args.jobs):
            source = sources[index % len(sources)]
            name = source.split("/", 1)[1].split(":", 1)[0]
            jobs.append(Job(index, source, f"burst/{name}", f"t{index:06d}"))
        worker = bench.worker(concurrency=args.concurrency)
        idle_rss = {pid: rss_bytes(pid) for pid in worker.pids()}
        watcher = JobWatcher(bench.database_url)
        registry_id = REGISTRY_IDS[args.registry]
        host = bench.registries[args.registry].endpoint.host
        untagger = None
        load_at_start = load_line()
        with Sampler(worker, bench.broker_url, bench.database_url, bench.pg_database) as memory:
            with phase(f"enqueue {args.jobs} jobs ({args.producers} producer thread(s))"):
                started = time.time()
                enqueue_all(jobs, registry_id, args.producers, bench.run_id)
                enqueued = time.time()
            if not args.keep_tags:
                untagger = Untagger(bench, host, jobs)
                untagger.start()
            with phase("drain"):
                statuses = wait_drained(watcher, args.jobs, args.timeout)
            drained = time.time()
        if untagger is not None:
            untagger.stop()
        load_at_end = load_line()
        with phase("checks"):
            events = check_events(watcher, jobs)
            registry = check_registry(bench, args.registry, jobs)
            database_bytes = None
            if bench.pg_database is not None:
                with watcher.engine.connect() as connection:
                    database_bytes = int(
                        connection.execute(
                            text("SELECT pg_database_size(current_database())")
                        ).scalar_one()
                    )
        watcher.close()
        succeeded_at = events.pop("succeeded_at")
        return {
            "args": vars(args),
            "images": sources,
            "started": started,
            "enqueued": enqueued,
            "drained_polled": drained,
            "enqueue_calls": [job.returned - job.started for job in jobs],
            "first_succeeded": succeeded_at[0] if succeeded_at else None,
            "last_succeeded": succeeded_at[-1] if succeeded_at else None,
            "windows": windows(succeeded_at, started),
            "statuses": statuses,
            "events": events,
            "registry": registry,
            "untagged": (untagger.removed, untagger.failed) if untagger else None,
            "memory": {
                "worker_idle": {str(k): v for k, v in idle_rss.items()},
                "worker_peaks": {str(k): v for k, v in memory.worker_peaks.items()},
                "worker_peak_sum": memory.worker_peak_sum,
                "main_pid": str(worker.pid),
                "broker_keys_peak": memory.broker_keys_peak,
                "broker_queue_peak": memory.broker_queue_peak,
                "redis_used_base": memory.redis_used_base,
                "redis_used_peak": memory.redis_used_peak,
                "pg_rss_peak_sum": memory.pg_rss_peak_sum,
                "pg_private_peak_sum": memory.pg_private_peak_sum,
                "pg_backends_peak": memory.pg_backends_peak,
                "pg_backend_rss_peak": memory.pg_backend_rss_peak,
                "samples": memory.samples,
                "sample_errors": dict(memory.errors),
                "worker_timeline": [
                    [moment, {str(k): v for k, v in sizes.items()}]
                    for moment, sizes in memory.timeline
                ],
                "succeeded_at": succeeded_at,
            },
            "database_bytes": database_bytes,
            "loads": {"start": load_at_start, "end": load_at_end},
            "report": lambda after: machine_lines(bench, load_before, after),
        }
    finally:
        bench.close()


def _growth_lines(memory: dict[str, Any]) -> list[str]:
    """The pool processes' mean RSS as the jobs went through: at a quarter, half, three
    quarters and the end of the drain, and its slope over the second half (a process that
    leaks keeps growing with the jobs it ran; one that reached its working size does not)."""
    timeline, done_at = memory.get("worker_timeline") or [], memory.get("succeeded_at") or []
    main_pid = memory["main_pid"]
    points: list[tuple[int, float]] = []  # (jobs succeeded by then, mean pool RSS)
    for moment, sizes in timeline:
        pool = [v for k, v in sizes.items() if k != main_pid]
        if pool:
            points.append((bisect.bisect_right(done_at, moment), statistics.fmean(pool)))
    total = len(done_at)
    if total < 4 or len(points) < 4:
        return []
    marks = []
    for share in (0.25, 0.5, 0.75, 1.0):
        jobs, rss = next(((j, r) for j, r in points if j >= share * total), points[-1])
        marks.append(f"{rss / MiB:.0f} MiB after {jobs}")
    half = [(j, r) for j, r in points if j >= total / 2]
    slope = ""
    if len(half) >= 2 and half[-1][0] > half[0][0]:
        per_k = (half[-1][1] - half[0][1]) / (half[-1][0] - half[0][0]) * 1000
        slope = f"; over the second half {per_k / KiB:+.0f} KiB per 1,000 jobs"
    return [
        "| pool processes' mean RSS along the drain (jobs succeeded by then) | "
        + ", ".join(marks)
        + slope
        + " |"
    ]


def report(results: dict[str, Any]) -> list[str]:
    args = results["args"]
    n = args["jobs"]
    started = results["started"]
    enqueue_s = results["enqueued"] - started
    calls = Stats.of(results["enqueue_calls"])
    first, last = results["first_succeeded"], results["last_succeeded"]
    statuses = results["statuses"]
    succeeded = statuses.get("succeeded", 0)
    events = results["events"]
    registry = results["registry"]
    memory = results["memory"]
    lost = n - succeeded
    pushes_per_job = events["push_step_succeeded_per_job"]
    duplicated = sum(v for k, v in pushes_per_job.items() if int(k) > 1)
    put_excess = registry["manifest_puts"] - n
    rates = results["windows"]
    lines = [
        f"Command: `{command_line()}`",
        "",
        *results["report"](load_line()),
        f"- load when the burst started: {results['loads']['start']}; when it had drained: "
        f"{results['loads']['end']}",
        f"- {n} jobs, {args['images']} distinct one-layer images of {args['image_kib']} KiB "
        f"re-pushed under distinct tags (repository `burst/<image>`, tag `t<n>`), registry "
        f"`{args['registry']}`; real prefork worker `-c {args['concurrency']}`, Redis broker, "
        f"the stack's dockerd, {args['database']}; no beat (nothing republished by reconcile); "
        f"enqueued by {args['producers']} producer thread(s) calling `enqueue_push()` with an "
        "idempotency key each",
        "- the Docker Engine tags of succeeded jobs removed while draining"
        + (
            f" ({results['untagged'][0]} removed, {results['untagged'][1]} failed)"
            if results["untagged"]
            else ": no (`--keep-tags`)"
        ),
        "",
        "| what | figure |",
        "|---|---|",
        f"| enqueue: {n} `enqueue_push()` calls | {enqueue_s:.1f} s, **{n / enqueue_s:.0f} "
        f"jobs/s**; a call p50 {calls.ms()} ms, p99 {calls.ms('p99')} ms, max "
        f"{calls.ms('maximum')} ms (the worker draining meanwhile) |",
    ]
    if first is not None and last is not None:
        lines += [
            f"| time to drain (first enqueue call → last `job.succeeded`) | **{last - started:.1f}"
            f" s**; {max(0.0, last - results['enqueued']):.1f} s after the last enqueue call |",
            f"| jobs/s while draining (first enqueue → last `job.succeeded`) "
            f"| **{n / (last - started):.1f}**; first to last `job.succeeded`: "
            f"{n / max(last - first, 1e-9):.1f} |",
        ]
    if rates:
        median_rate = statistics.median(rates)
        lines.append(
            f"| jobs/s per 10 s window ({len(rates)} windows) | median {median_rate:.1f}, "
            f"min {min(rates):.1f}, max {max(rates):.1f} |"
        )
    mib = MiB
    main_pid = memory["main_pid"]
    redis_growth = memory["redis_used_peak"] - memory["redis_used_base"]
    pool = [v for k, v in memory["worker_peaks"].items() if k != main_pid]
    lines += [
        f"| worker RSS peak, main + pool (sum of the processes' simultaneous RSS) "
        f"| **{memory['worker_peak_sum'] / mib:.0f} MiB** (idle after start: "
        f"{sum(memory['worker_idle'].values()) / mib:.0f} MiB); main "
        f"{memory['worker_peaks'].get(main_pid, 0) / mib:.0f} MiB, pool processes "
        f"{min(pool, default=0) / mib:.0f}-{max(pool, default=0) / mib:.0f} MiB each |",
        *_growth_lines(memory),
        f"| broker: the Redis database's keys, peak of the sum of `MEMORY USAGE` "
        f"| **{memory['broker_keys_peak'] / mib:.1f} MiB**; queue length peak "
        f"{memory['broker_queue_peak']} messages |",
        f"| Redis server `used_memory` (shared server: others' data too) | peak "
        f"{memory['redis_used_peak'] / mib:.1f} MiB, {redis_growth / mib:+.1f} MiB over its "
        "value before the burst |",
    ]
    if args["database"] == "postgres":
        size = results["database_bytes"] or 0
        lines.append(
            f"| PostgreSQL backends of the benchmark's database (peak {memory['pg_backends_peak']}"
            f" backends) | RSS sum peak **{memory['pg_rss_peak_sum'] / mib:.0f} MiB** (shared "
            f"buffers counted in each), private memory sum peak "
            f"{memory['pg_private_peak_sum'] / mib:.0f} MiB, largest backend "
            f"{memory['pg_backend_rss_peak'] / mib:.0f} MiB; database size after "
            f"{size / mib:.0f} MiB |"
        )
    lines += [
        f"| lost: jobs not `succeeded` | **{lost}** (statuses {json.dumps(statuses)}) |",
        f"| duplicated: jobs whose push step succeeded more than once | **{duplicated}** "
        f"(push `step.succeeded` per job: {json.dumps(pushes_per_job)}) |",
        f"| events not exactly once per job | {json.dumps(events['not_exactly_once']) or '{}'}"
        f"; steps started more than once: {json.dumps(events['steps_started_more_than_once'])} |",
        f"| registry: manifest PUTs answered 201 (access log) | {registry['manifest_puts']} "
        f"({put_excess:+d} against one a job) |",
        f"| registry: tags served | {registry['tags_served']} (missing "
        f"{registry['tags_missing']}, unexpected {registry['tags_unexpected']}) |",
        f"| digests recorded on the jobs | {events['digests_recorded']} |",
        "",
        "Events per job, the most common shapes: "
        + "; ".join(f"{count} x [{shape}]" for shape, count in events["event_shapes"].items()),
    ]
    if memory["sample_errors"]:
        lines.append(f"Samples lost: {json.dumps(memory['sample_errors'])}.")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--images", type=int, default=8, help="distinct images, re-pushed")
    parser.add_argument("--image-kib", type=int, default=64)
    parser.add_argument("--producers", type=int, default=1, help="threads calling enqueue_push")
    parser.add_argument("--registry", choices=["tls", "plain"], default="tls")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="drain timeout, s")
    parser.add_argument("--keep-tags", action="store_true",
                        help="leave the pipeline's tags on the Docker Engine")  # fmt: skip
    common_arguments(parser)
    parser.set_defaults(database="postgres")
    args = parser.parse_args(argv)
    results = run(args)
    lines = report(results)
    write_section(
        f"Burst of {args.jobs} jobs ({args.database}, registry {args.registry})", lines,
        print_only=args.no_report,
    )  # fmt: skip
    data = {k: v for k, v in results.items() if k != "report"}
    with suppress(OSError):
        path = save_results("burst", data)
        print(f"bench: raw results in {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
