"""The event log's common questions, timed at millions of events; export and verify throughput.

    .venv/bin/python -m bench.event_queries --backend postgresql --events 10000000
    .venv/bin/python -m bench.event_queries --backend postgresql --events 1000000 --valid-chain
    .venv/bin/python -m bench.event_queries --backend sqlite --events 1000000

A fresh database is migrated to head (``worker.store.migrate``, the real schema and indexes), filled
with a synthetic year of push jobs, then each question is asked ``--reps`` times with a fresh
parameter each time (another job, registry, repository) through
``worker.store.queries.select_events``,
the call the CLI makes, in its own transaction, as ``pushctl events`` does; p50/p95/max in ms.

The data: 8 events per job (job.enqueued, started/succeeded for resolve_credentials, login and
push, job.succeeded); every 20th job fails at the push (step.failed, job.failed); every 100th
ends with a job.retried by one of three operators; 20 registries, 5,000 repositories; times
spread evenly over the 365 days before now, ids in time order.

Filling: PostgreSQL by ``INSERT ... SELECT generate_series`` in SQL (hashes are placeholders, the
chain does not verify; ``--valid-chain`` computes the real chain in Python and loads it with COPY
instead); SQLite by ``executemany`` in batches, always with the real chain. Secondary indexes
are dropped for the load and created afterwards (then ANALYZE), as a bulk load would.

Export streams every event as JSON lines to /dev/null (``worker.store.export.export``) while
a thread samples the process's RSS; verify runs ``worker.store.verify.verify`` over the whole
log (valid chains only). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import sqlite3
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Engine, Table, create_engine, event, text

from worker.store import chain, export, queries, verify
from worker.store.db import engine_for, session_scope
from worker.store.migrate import upgrade
from worker.store.models import Event

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
#: The SQLite database, filled fresh on every run and removed after.
SQLITE_PATH = Path("/tmp/pushworker-bench.db")
#: How many times each question is asked (its median and p95 are reported).
REPS = 50
EVENTS_PER_JOB = 8
REGISTRIES = 20
REPOSITORIES = 5000
OPERATORS = ("operator:alice", "operator:bob", "operator:carol")
SPAN_DAYS = 365
TYPES = ["job.enqueued", "step.started", "step.succeeded", "step.started", "step.succeeded",
         "step.started", "step.succeeded", "job.succeeded"]  # fmt: skip
STEPS = [None, "resolve_credentials", "resolve_credentials", "login", "login", "push", "push",
         None]  # fmt: skip


def job_uuid(j: int) -> str:
    """The id of job number ``j`` (PostgreSQL: ``md5('job' || j)::uuid``)."""
    return str(uuid.UUID(hashlib.md5(f"job{j}".encode()).hexdigest()))  # noqa: S324


# --- the synthetic log, row by row (Python) ---------------------------------------------------


def synthetic_rows(count: int, end: datetime) -> Iterator[dict[str, Any]]:
    """The events 1..count with the real hash chain."""
    start = end - timedelta(days=SPAN_DAYS)
    step_seconds = SPAN_DAYS * 86400 / count
    prev = chain.GENESIS_HASH
    for i in range(1, count + 1):
        j, k = divmod(i - 1, EVENTS_PER_JOB)
        job_id = job_uuid(j)
        repository = f"team/app-{(j * 104729) % REPOSITORIES}"
        type, step = TYPES[k], STEPS[k]
        actor = f"worker:host-{j % 4}:{1000 + (j // 1000) % 50}"
        payload: dict[str, Any] = {}
        if k == 0:
            actor = "platform:web"
            payload = {"repository": repository, "tag": f"1.{j % 100}", "requested_by": actor}
        elif j % 20 == 3 and k >= 6:
            type = "step.failed" if k == 6 else "job.failed"
            payload = {"error_code": "authentication_failed", "error_message": "denied"}
        elif j % 100 == 7 and k == 7:
            type, actor = "job.retried", OPERATORS[j % 3]
            payload = {"reason": "credential fixed", "previous_status": "failed"}
        elif k in (2, 4, 6):
            payload = {"reference": f"reg/{repository}:1", "digest": "sha256:" + "0" * 64}
        row = {
            "id": i, "stream": f"job/{job_id}", "seq": k + 1, "job_id": job_id,
            "time": start + timedelta(seconds=(i - 1) * step_seconds), "type": type, "step": step,
            "registry_id": 1 + (j * 7919) % REGISTRIES, "attempt": 1, "actor": actor,
            "payload": payload, "repository": repository,
            "outcome": chain.derive_outcome(type, payload), "prev_hash": prev,
        }  # fmt: skip
        row["hash"] = prev = chain.chain_hash(row)
        yield row


COLUMNS = ["id", "stream", "seq", "job_id", "time", "type", "step", "registry_id", "attempt",
           "actor", "payload", "repository", "outcome", "prev_hash", "hash"]  # fmt: skip


# --- the synthetic log, in SQL (PostgreSQL) -------------------------------------------------------

PG_FILL = """
INSERT INTO events (id, stream, seq, job_id, time, type, step, registry_id, attempt, actor,
                    payload, repository, outcome, prev_hash, hash)
SELECT i, 'job/' || job_id, k + 1, job_id,
       :start + make_interval(secs => (i - 1) * :step_seconds),
       type, (ARRAY[NULL, 'resolve_credentials', 'resolve_credentials', 'login', 'login',
                    'push', 'push', NULL])[k + 1],
       1 + (j * 7919) % 20, 1,
       CASE WHEN k = 0 THEN 'platform:web'
            WHEN type = 'job.retried' THEN (ARRAY['operator:alice', 'operator:bob',
                                                  'operator:carol'])[j % 3 + 1]
            ELSE 'worker:host-' || j % 4 || ':' || 1000 + (j / 1000) % 50 END,
       CASE WHEN k = 0 THEN json_build_object('repository', repository,
                                              'tag', '1.' || j % 100,
                                              'requested_by', 'platform:web')
            WHEN type IN ('step.failed', 'job.failed') THEN
                 json_build_object('error_code', 'authentication_failed',
                                   'error_message', 'denied')
            WHEN type = 'job.retried' THEN
                 json_build_object('reason', 'credential fixed', 'previous_status', 'failed')
            WHEN k IN (2, 4, 6) THEN
                 json_build_object('reference', 'reg/' || repository || ':' || '1',
                                   'digest', 'sha256:' || repeat('0', 64))
            ELSE '{}'::json END,
       repository,
       CASE WHEN type LIKE '%.failed' THEN 'failed'
            WHEN type LIKE '%.succeeded' THEN 'succeeded' END,
       lpad(to_hex(i - 1), 64, '0'),
       lpad(to_hex(i), 64, '0')
FROM (
    SELECT i, j, k, md5('job' || j)::uuid::text AS job_id,
           'team/app-' || (j * 104729) % 5000 AS repository,
           CASE WHEN j % 20 = 3 AND k = 6 THEN 'step.failed'
                WHEN j % 20 = 3 AND k = 7 THEN 'job.failed'
                WHEN j % 100 = 7 AND k = 7 THEN 'job.retried'
                ELSE (ARRAY['job.enqueued', 'step.started', 'step.succeeded', 'step.started',
                            'step.succeeded', 'step.started', 'step.succeeded',
                            'job.succeeded'])[k + 1] END AS type
    FROM (SELECT i, (i - 1) / 8 AS j, (i - 1) % 8 AS k
          FROM generate_series(CAST(:low AS bigint), CAST(:high AS bigint)) AS i) AS n
) AS e
"""


def _secondary_indexes() -> list[Any]:
    table = cast(Table, Event.__table__)
    return sorted(table.indexes, key=lambda index: index.name or "")


def fill_postgres(engine: Engine, count: int, end: datetime, valid_chain: bool) -> float:
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE events DROP CONSTRAINT uq_events_stream_seq"))
        for index in _secondary_indexes():
            conn.execute(text(f"DROP INDEX {index.name}"))
    if valid_chain:
        _copy_rows(engine, count, end)
    else:
        chunk = 1_000_000
        for low in range(1, count + 1, chunk):
            high = min(count, low + chunk - 1)
            with engine.begin() as conn:
                conn.execute(
                    text(PG_FILL),
                    {"start": end - timedelta(days=SPAN_DAYS), "low": low, "high": high,
                     "step_seconds": SPAN_DAYS * 86400 / count},
                )  # fmt: skip
            _progress(f"filled {high:,} / {count:,}", started)
    with engine.begin() as conn:
        conn.execute(text("SET maintenance_work_mem = '512MB'"))
        conn.execute(
            text("ALTER TABLE events ADD CONSTRAINT uq_events_stream_seq UNIQUE (stream, seq)")
        )
        for index in _secondary_indexes():
            index.create(conn)
            _progress(f"index {index.name}", started)
        conn.execute(text(f"SELECT setval(pg_get_serial_sequence('events', 'id'), {count})"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE events"))
    return time.perf_counter() - started


def _copy_rows(engine: Engine, count: int, end: datetime) -> None:
    started = time.perf_counter()
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        with cursor.copy(f"COPY events ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            for row in synthetic_rows(count, end):
                values = [row[c] for c in COLUMNS]
                values[COLUMNS.index("payload")] = json.dumps(row["payload"])
                copy.write_row(values)
                if row["id"] % 1_000_000 == 0:
                    _progress(f"copied {row['id']:,} / {count:,}", started)
        raw.commit()
    finally:
        raw.close()


def fill_sqlite(path: Path, count: int, end: datetime) -> float:
    started = time.perf_counter()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous=OFF")
    for index in _secondary_indexes():
        conn.execute(f"DROP INDEX {index.name}")
    marks = ", ".join("?" * len(COLUMNS))
    insert = f"INSERT INTO events ({', '.join(COLUMNS)}) VALUES ({marks})"  # noqa: S608
    batch: list[tuple[Any, ...]] = []
    for row in synthetic_rows(count, end):
        values = dict(row)
        values["time"] = row["time"].astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        values["payload"] = json.dumps(row["payload"])
        batch.append(tuple(values[c] for c in COLUMNS))
        if len(batch) == 20_000:
            conn.executemany(insert, batch)
            conn.commit()
            batch.clear()
            if row["id"] % 200_000 == 0:
                _progress(f"filled {row['id']:,} / {count:,}", started)
    conn.executemany(insert, batch)
    conn.commit()
    conn.close()
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as sa_conn:
        for index in _secondary_indexes():
            index.create(sa_conn)
            _progress(f"index {index.name}", started)
        sa_conn.execute(text("ANALYZE"))
    engine.dispose()
    return time.perf_counter() - started


def _progress(what: str, started: float) -> None:
    print(f"  [{time.perf_counter() - started:7.1f} s] {what}", file=sys.stderr, flush=True)


# --- the questions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    name: str
    #: What it asks of ``select_events``, given a random generator and the newest event's time.
    filters: Callable[[random.Random, datetime, int], dict[str, Any]]


def _job(rng: random.Random, _end: datetime, jobs: int) -> dict[str, Any]:
    return {"job_id": job_uuid(rng.randrange(jobs))}


def _registry_failures(rng: random.Random, end: datetime, _jobs: int) -> dict[str, Any]:
    return {
        "registry_id": rng.randint(1, REGISTRIES),
        "outcomes": ["failed"],
        "since": end - timedelta(hours=24),
    }


def _repository_pushes(rng: random.Random, _end: datetime, _jobs: int) -> dict[str, Any]:
    return {
        "repository": f"team/app-{rng.randrange(REPOSITORIES)}",
        "types": ["job.succeeded", "job.failed"],
    }


def _retries(rng: random.Random, end: datetime, _jobs: int) -> dict[str, Any]:
    return {"types": ["job.retried"], "since": end - timedelta(days=rng.choice([7, 6, 5]))}


def _actor(rng: random.Random, end: datetime, _jobs: int) -> dict[str, Any]:
    return {"actor": rng.choice(OPERATORS), "since": end - timedelta(days=30)}


def _last_hour(rng: random.Random, end: datetime, _jobs: int) -> dict[str, Any]:
    return {"since": end - timedelta(minutes=rng.choice([60, 55, 50])), "limit": 500}


QUESTIONS = [
    Question("a job's history (--job J)", _job),
    Question(
        "failures of a registry in the last 24 h (--registry R --outcome failed --since 24h)",
        _registry_failures,
    ),
    Question(
        "every push of a repository (--repository P --type job.succeeded --type job.failed)",
        _repository_pushes,
    ),
    Question("who retried what, last 7 days (--type job.retried --since 7d)", _retries),
    Question("what an operator did, last 30 days (--actor A --since 30d)", _actor),
    Question("the last hour, first 500 (--since 1h, the CLI's default limit)", _last_hour),
]


@dataclass
class Timing:
    question: str
    #: ``select_events`` in its own transaction, ORM objects built: what the CLI waits for;
    #: first ask with fresh parameters (the rows' pages may have to be read from disk).
    p50_ms: float
    p95_ms: float
    max_ms: float
    #: The same ask again at once (its pages cached).
    again_p50_ms: float
    again_p95_ms: float
    #: CPU time of this process in that second ask.
    cpu_p50_ms: float
    cpu_p95_ms: float
    #: The same SQL through the driver, rows fetched, no ORM.
    sql_p50_ms: float
    sql_p95_ms: float
    #: PostgreSQL's own "Execution Time" (EXPLAIN ANALYZE) of the same SQL.
    server_p50_ms: float | None
    server_p95_ms: float | None
    rows_median: float
    plan: str


def _p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def ask(engine: Engine, question: Question, end: datetime, jobs: int, reps: int) -> Timing:
    rng = random.Random(42)
    captured: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "FROM events" in statement:
            captured.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    samples, again, cpu, rows = [], [], [], []
    try:
        for rep in range(reps + 3):  # three warm-up asks, not counted
            filters = question.filters(rng, end, jobs)
            for attempt in (1, 2):  # a first ask, then the same again (its pages now cached)
                started, cpu_started = time.perf_counter(), time.process_time()
                with session_scope(engine) as session:
                    found = queries.select_events(session, **filters)
                elapsed = (time.perf_counter() - started) * 1000
                if rep < 3:
                    continue
                if attempt == 1:
                    samples.append(elapsed)
                    rows.append(len(found))
                else:
                    again.append(elapsed)
                    cpu.append((time.process_time() - cpu_started) * 1000)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    statements = captured[6::2]
    sql, server = [], []
    with engine.connect() as conn:
        for statement, parameters in statements:
            started = time.perf_counter()
            conn.exec_driver_sql(statement, parameters).fetchall()
            sql.append((time.perf_counter() - started) * 1000)
            if engine.dialect.name == "postgresql":
                explained = conn.exec_driver_sql(
                    "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters
                ).scalar()
                assert explained is not None
                server.append(float(explained[0]["Execution Time"]))
        conn.rollback()
    return Timing(
        question=question.name,
        p50_ms=statistics.median(samples),
        p95_ms=_p95(samples),
        max_ms=max(samples),
        again_p50_ms=statistics.median(again),
        again_p95_ms=_p95(again),
        cpu_p50_ms=statistics.median(cpu),
        cpu_p95_ms=_p95(cpu),
        sql_p50_ms=statistics.median(sql),
        sql_p95_ms=_p95(sql),
        server_p50_ms=statistics.median(server) if server else None,
        server_p95_ms=_p95(server) if server else None,
        rows_median=statistics.median(rows),
        plan=_plan(engine, *statements[0]),
    )


def _plan(engine: Engine, statement: str, parameters: Any) -> str:
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            lines = conn.exec_driver_sql("EXPLAIN " + statement, parameters).scalars().all()
            nodes = [
                re.sub(r"\s*\(cost=.*", "", line).strip(" ->")
                for line in lines
                if re.search(r"Scan|Sort|Limit", line)
            ]
            return " / ".join(nodes)
        rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
        return " / ".join(str(row[-1]) for row in rows)


# --- export and verify ----------------------------------------------------------------------------


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure_export(url: str, since: datetime | None) -> dict[str, Any]:
    peak = [_rss_mib()]
    before = peak[0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], _rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    with open(os.devnull, "w") as out:
        count = export.export(out, "jsonl", queries.EventQuery(since=since), url=url)
    elapsed = time.perf_counter() - started
    done.set()
    sampler.join()
    return {
        "since": since.isoformat() if since else None,
        "events": count,
        "seconds": round(elapsed, 1),
        "events_per_s": round(count / elapsed),
        "rss_before_mib": round(before, 1),
        "rss_peak_mib": round(max(peak[0], _rss_mib()), 1),
    }


def measure_verify(url: str) -> dict[str, Any]:
    before = _rss_mib()
    started = time.perf_counter()
    report = verify.verify(url)
    elapsed = time.perf_counter() - started
    return {
        "ok": report.ok,
        "events": report.checked,
        "seconds": round(elapsed, 1),
        "events_per_s": round(report.checked / elapsed) if elapsed else 0,
        "rss_before_mib": round(before, 1),
        "rss_after_mib": round(_rss_mib(), 1),
    }


# --- the run --------------------------------------------------------------------------------------


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem_kib / 2**20:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"
    )


def prepare(args: argparse.Namespace, end: datetime) -> tuple[str, Callable[[], None]]:
    """A fresh database (URL), filled; and how to drop it."""
    if args.backend == "sqlite":
        path = SQLITE_PATH
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        url = f"sqlite:///{path}"
        upgrade(url)
        args.fill_seconds = fill_sqlite(path, args.events, end)

        def remove() -> None:
            engine_for(url).dispose()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)

        return url, remove
    server = os.environ.get("PUSHWORKER_STACK_POSTGRES_URL")
    if not server:
        raise SystemExit('no PostgreSQL: eval "$(scripts/stack env)"')
    name = f"pushworker_bench_{args.events}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    url = server.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    upgrade(url)
    args.fill_seconds = fill_postgres(engine_for(url), args.events, end, args.valid_chain)

    def drop() -> None:
        engine_for(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    return url, drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], required=True)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--valid-chain", action="store_true", help="PostgreSQL: real hashes")
    parser.add_argument(
        "--export-days", type=float, help="export only the last DAYS (default: every event)"
    )
    args = parser.parse_args()
    args.fill_seconds = None
    end = datetime.now(UTC)
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    url, drop = prepare(args, end)
    try:
        engine = engine_for(url)
        with engine.connect() as conn:
            newest = conn.execute(text("SELECT max(time) FROM events")).scalar()
            size = _size(conn, url)
            version = (
                conn.execute(text("SHOW server_version")).scalar()
                if url.startswith("postgresql")
                else sqlite3.sqlite_version
            )
        end = newest if isinstance(newest, datetime) else datetime.fromisoformat(str(newest))
        end = end.replace(tzinfo=UTC) if end.tzinfo is None else end
        jobs = args.events // EVENTS_PER_JOB
        load_start = Path("/proc/loadavg").read_text().split()[:3]
        timings = [ask(engine, q, end, jobs, REPS) for q in QUESTIONS]
        since = end - timedelta(days=args.export_days) if args.export_days else None
        export = measure_export(url, since)
        valid = args.backend == "sqlite" or args.valid_chain
        verify = measure_verify(url) if valid else None
    finally:
        drop()
    result = {
        "backend": args.backend,
        "events": args.events,
        "reps": REPS,
        "machine": machine(),
        "load": [load_start, Path("/proc/loadavg").read_text().split()[:3]],
        "fill_seconds": round(args.fill_seconds, 1) if args.fill_seconds else None,
        "database_size": size,
        "database_version": version,
        "questions": [t.__dict__ for t in timings],
        "export": export,
        "verify": verify,
        "command": " ".join([".venv/bin/python -m bench.event_queries", *sys.argv[1:]]),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"event_queries-{args.backend}-{args.events}-{stamp}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(report(result))
    print(f"results: {path}", file=sys.stderr)


def _size(conn: Any, url: str) -> str:
    if url.startswith("sqlite"):
        path = Path(url.split("///", 1)[1])
        return f"{path.stat().st_size / 2**30:.2f} GiB"
    return str(
        conn.execute(text("SELECT pg_size_pretty(pg_database_size(current_database()))")).scalar()
    )


def report(result: dict[str, Any]) -> str:
    lines = [
        f"### {result['backend']}, {result['events']:,} events ({result['time']})",
        "",
        f"- `{result['command']}`",
        f"- machine: {result['machine']}; load average (1/5/15 min) "
        f"when the questions started {' '.join(result['load'][0])}, at the end "
        f"{' '.join(result['load'][1])}",
        f"- database: {result['backend']} {result['database_version']}, "
        f"{result['database_size']}"
        + (f"; filled in {result['fill_seconds']} s" if result["fill_seconds"] else ""),
        "",
        "| question | rows | first ask p50 / **p95** ms | asked again p50 / **p95** ms "
        "| CPU (again) p50 / p95 ms | SQL p50 / p95 ms | server p50 / p95 ms | plan |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in result["questions"]:
        server = (
            f"{t['server_p50_ms']:.1f} / {t['server_p95_ms']:.1f}"
            if t["server_p50_ms"] is not None
            else "-"
        )
        lines.append(
            f"| {t['question']} | {t['rows_median']:g} | {t['p50_ms']:.1f} / "
            f"**{t['p95_ms']:.1f}** | {t['again_p50_ms']:.1f} / **{t['again_p95_ms']:.1f}** "
            f"| {t['cpu_p50_ms']:.1f} / {t['cpu_p95_ms']:.1f} "
            f"| {t['sql_p50_ms']:.1f} / {t['sql_p95_ms']:.1f} | {server} | {t['plan']} |"
        )
    if result["export"]:
        e = result["export"]
        lines.append(
            f"\nexport (JSON lines, {'since ' + e['since'] if e['since'] else 'all events'}): "
            f"{e['events']:,} in {e['seconds']} s "
            f"({e['events_per_s']:,}/s), RSS {e['rss_before_mib']} -> peak {e['rss_peak_mib']} MiB"
        )
    if result["verify"]:
        v = result["verify"]
        lines.append(
            f"\nverify: ok={v['ok']}, {v['events']:,} in {v['seconds']} s "
            f"({v['events_per_s']:,}/s), RSS {v['rss_before_mib']} -> {v['rss_after_mib']} MiB"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
