"""The console's server time per page at millions of events, on PostgreSQL.

    eval "$(scripts/stack env)"
    .venv/bin/python -m bench.console_pages --events 10000000 [--reps 40] [--keep-database]

A fresh PostgreSQL database, migrated to head, is filled as ``bench.event_queries`` fills it (a
synthetic year: 8 events per job, every 20th job failed, every 100th retried by an operator; 20
registries, 5,000 repositories), with the matching ``push_jobs`` rows (one per job, created at
its first event) and each registry's health and test results in its own stream. Then a real
``pushctl api serve`` process (uvicorn, one process) serves the console on that database, an
admin token signs in as a browser would (the sign-in form's nonce cookie, then the session
cookie), and every page is asked ``--reps`` times with a fresh parameter each time where the page
takes one (another job, registry, repository, a deeper cursor). Reported per page: the
server's own time to the answer (its ``Server-Timing: app;dur=`` header, the time from the
request reaching the app to the first byte of the answer) p50 / p95 / max, and the client's
whole-request time. The pages' goal is a server-side p95 under 100 ms.

``--keep-database`` keeps (and on the next run reuses) the filled database, whose fill takes
several minutes at 10 million events. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text

from bench.api import serve_api
from bench.common import load_line, machine, write_section
from bench.event_queries import (
    EVENTS_PER_JOB,
    OPERATORS,
    REGISTRIES,
    REPOSITORIES,
    SPAN_DAYS,
    fill_postgres,
    job_uuid,
)
from harness.stack import ROOT

RESULTS = ROOT / "bench" / "results"
#: The database's name; kept with ``--keep-database`` (its fill is the slow part).
DATABASE = "pushworker_bench_console"

#: One row per job, created at its first event (``bench.event_queries``' layout: job ``j`` owns
#: events ``8j+1 .. 8j+8``, spread evenly over the year before ``end``).
JOBS_FILL = """
INSERT INTO push_jobs (id, source_image, repository, tag, requested_registry_id,
                       effective_registry_id, fallback_chain, status, current_step, attempt,
                       error_code, error_message, pushed_reference, digest, requested_by,
                       created_at, updated_at, started_at, finished_at)
SELECT md5('job' || j)::uuid::text, 'app:build', repository, '1.' || j % 100,
       registry, registry, '[]'::json,
       CASE WHEN j % 20 = 3 THEN 'failed' ELSE 'succeeded' END, NULL,
       CASE WHEN j % 100 = 7 THEN 2 ELSE 1 END,
       CASE WHEN j % 20 = 3 THEN 'authentication_failed' END,
       CASE WHEN j % 20 = 3 THEN 'denied' END,
       CASE WHEN j % 20 <> 3 THEN 'reg.example.com/' || repository || ':' || '1.' || j % 100 END,
       CASE WHEN j % 20 <> 3 THEN 'sha256:' || repeat('0', 64) END,
       'platform:web', created, created, created, created + interval '2 seconds'
FROM (
    SELECT j, 'team/app-' || (j * 104729) % 5000 AS repository, 1 + (j * 7919) % 20 AS registry,
           CAST(:start AS timestamptz) + make_interval(secs => j * 8 * :step_seconds) AS created
    FROM generate_series(CAST(:low AS bigint), CAST(:high AS bigint)) AS j
) AS n
"""


@dataclass(frozen=True)
class Page:
    name: str
    #: The path, given the run's random source, the newest event's time and the number of jobs.
    path: Callable[[random.Random, int], str]


def _job(rng: random.Random, jobs: int) -> str:
    return job_uuid(rng.randrange(jobs))


def _repository(rng: random.Random) -> str:
    return f"team/app-{rng.randrange(REPOSITORIES)}"


PAGES = [
    Page("overview", lambda r, j: "/console/"),
    Page("overview (its live fragment)", lambda r, j: "/console/fragments/overview"),
    Page("jobs, newest first", lambda r, j: "/console/jobs"),
    Page("jobs, status failed", lambda r, j: "/console/jobs?status=failed"),
    Page("jobs, one registry", lambda r, j: f"/console/jobs?registry={r.randrange(1, 21)}"),
    Page("jobs, one repository", lambda r, j: f"/console/jobs?repository={_repository(r)}"),
    Page(
        "jobs, one requester, last 24 h",
        lambda r, j: "/console/jobs?requester=platform:web&since=24h",
    ),
    Page("job timeline", lambda r, j: f"/console/jobs/{_job(r, j)}"),
    Page("job timeline (its live fragment)", lambda r, j: f"/console/fragments/jobs/{_job(r, j)}"),
    Page("registries", lambda r, j: "/console/registries"),
    Page("events, first page", lambda r, j: "/console/events"),
    Page("events, deep cursor", lambda r, j: f"/console/events?cursor={r.randrange(j * 8)}"),
    Page("events, one job", lambda r, j: f"/console/events?job={_job(r, j)}"),
    Page("events, one registry", lambda r, j: f"/console/events?registry={r.randrange(1, 21)}"),
    Page("events, one repository", lambda r, j: f"/console/events?repository={_repository(r)}"),
    Page("events, type job.retried", lambda r, j: "/console/events?type=job.retried"),
    Page(
        "events, outcome failed, last 7 days",
        lambda r, j: "/console/events?outcome=failed&since=7d",
    ),
    Page("events, one operator", lambda r, j: f"/console/events?actor={r.choice(OPERATORS)}"),
    Page("events, last hour", lambda r, j: "/console/events?since=1h"),
]


def _server(url: str) -> str:
    server = os.environ.get("PUSHWORKER_STACK_POSTGRES_URL")
    if not server:
        raise SystemExit('no PostgreSQL: eval "$(scripts/stack env)"')
    return server.rsplit("/", 1)[0] + f"/{url}"


def prepare(events: int, keep: bool) -> tuple[str, float | None]:
    """The filled database's URL, and how long the fill took (None: an earlier fill reused)."""
    from worker.store.db import engine_for
    from worker.store.migrate import upgrade

    url = _server(DATABASE)
    admin = create_engine(_server("postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        exists = conn.execute(
            text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": DATABASE}
        ).scalar()
    if exists and keep:
        engine = engine_for(url)
        with engine.connect() as conn:
            count = conn.execute(text("SELECT count(*) FROM events WHERE job_id IS NOT NULL"))
            if count.scalar() == events:
                upgrade(url)  # a reused database still gets newer migrations
                return url, None
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{DATABASE}"'))
    upgrade(url)
    engine = engine_for(url)
    started = time.perf_counter()
    end = datetime.now(UTC)
    fill_postgres(engine, events, end, valid_chain=False)
    _registries()  # after the fill, whose events take ids 1..events
    jobs = events // EVENTS_PER_JOB
    chunk = 500_000
    for low in range(0, jobs, chunk):
        with engine.begin() as conn:
            conn.execute(
                text(JOBS_FILL),
                {
                    "start": end - timedelta(days=SPAN_DAYS),
                    "low": low,
                    "high": min(jobs, low + chunk) - 1,
                    "step_seconds": SPAN_DAYS * 86400 / events,
                },
            )
        print(f"bench: jobs {min(jobs, low + chunk):,} / {jobs:,}", file=sys.stderr)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE push_jobs"))
    _health()
    return url, time.perf_counter() - started


def _registries() -> None:
    """The 20 registries the synthetic jobs name, through the service (credentials encrypted)."""
    from worker.registries import RegistrySpec, create_registry
    from worker.store.db import session_scope

    with session_scope() as db:
        for n in range(1, REGISTRIES + 1):
            spec = RegistrySpec(
                name=f"registry-{n}",
                url=f"https://reg{n}.example.com",
                kind="harbor",
                username="robot",
                secret=f"secret-{n}",
            )
            create_registry(db, spec, registry_id=n, actor="operator:bench")


def _health() -> None:
    """Each registry's latest health and test result, appended after the fill (as the beat's
    health task and "test now" would)."""
    from worker.store import events
    from worker.store.db import session_scope

    with session_scope() as db:
        for n in range(1, REGISTRIES + 1):
            stream = events.registry_stream(n)
            events.append(
                db,
                stream=stream,
                type="registry.health",
                actor="worker:bench",
                registry_id=n,
                payload={"status": "healthy" if n % 7 else "unhealthy"},
            )
            events.append(
                db,
                stream=stream,
                type="registry.tested",
                actor="operator:bench",
                registry_id=n,
                payload={
                    "ok": True,
                    "checks": [
                        {"name": c, "ok": True} for c in ("dns", "tcp", "tls", "v2", "auth")
                    ],
                },
            )


def _sign_in(client: httpx.Client, token: str) -> None:
    form = client.get("/console/signin")
    nonce = re.search(r'name="csrf" value="([^"]+)"', form.text)
    if nonce is None:
        raise SystemExit("the sign-in form carries no CSRF nonce")
    answer = client.post("/console/signin", data={"token": token, "csrf": nonce.group(1)})
    if answer.status_code != 303:
        raise SystemExit(f"sign-in answered {answer.status_code}: {answer.text[:300]}")


def _server_ms(response: httpx.Response) -> float:
    match = re.search(r"app;dur=([0-9.]+)", response.headers.get("server-timing", ""))
    if match is None:
        raise SystemExit(f"{response.url} has no Server-Timing header")
    return float(match.group(1))


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from worker.core.settings import get_settings

    secret = Fernet.generate_key().decode()
    os.environ["PUSHWORKER_SECRET_KEY"] = secret
    url = _server(DATABASE)
    os.environ["PUSHWORKER_DATABASE_URL"] = url
    get_settings.cache_clear()
    filled = prepare(args.events, args.keep_database)
    from worker.tokens import create_token

    token, _ = create_token(f"bench-{time.time_ns()}", "admin", actor="operator:bench")
    workdir = RESULTS / "console_pages"
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        "PUSHWORKER_DATABASE_URL": url,
        "PUSHWORKER_SECRET_KEY": secret,
        "PUSHWORKER_LOG_FORMAT": "json",
    }
    base, process = serve_api(env, str(workdir / "api.log"))
    load_before = load_line()
    rng = random.Random(20261130)
    jobs = args.events // EVENTS_PER_JOB
    results: dict[str, dict[str, list[float]]] = {
        p.name: {"server": [], "client": []} for p in PAGES
    }
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            _sign_in(client, token)
            for page in PAGES:  # one warm-up each: the first query plans, the first template
                client.get(page.path(rng, jobs)).raise_for_status()
            # Interleaved: every page once per round, so that a slow moment hits all of them.
            for _ in range(args.reps):
                for page in PAGES:
                    path = page.path(rng, jobs)
                    started = time.perf_counter()
                    answer = client.get(path)
                    elapsed = (time.perf_counter() - started) * 1000
                    if answer.status_code != 200:
                        raise SystemExit(f"{path} answered {answer.status_code}")
                    results[page.name]["server"].append(_server_ms(answer))
                    results[page.name]["client"].append(elapsed)
    finally:
        process.terminate()
        process.wait(timeout=30)
        if not args.keep_database:
            admin = create_engine(_server("postgres"), isolation_level="AUTOCOMMIT")
            from worker.store.db import engine_for

            engine_for(url).dispose()
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)'))
    return {
        "events": args.events,
        "jobs": jobs,
        "reps": args.reps,
        "results": results,
        "fill_seconds": round(filled[1], 1) if filled[1] else None,
        "load": [load_before, load_line()],
        "machine": machine(),
        "command": " ".join([".venv/bin/python -m bench.console_pages", *sys.argv[1:]]),
    }


def report(data: dict[str, Any]) -> list[str]:
    m = data["machine"]
    lines = [
        f"Command: `{data['command']}`",
        "",
        f"- machine: {m['cpu']}, {m['memory']}, Python {m['python']}; PostgreSQL on loopback; "
        f"load before {data['load'][0]}, after {data['load'][1]}",
        f"- {data['events']:,} events, {data['jobs']:,} jobs, 20 registries"
        + (
            f"; filled in {data['fill_seconds']} s"
            if data["fill_seconds"]
            else " (a database filled by an earlier run)"
        )
        + f"; each page asked {data['reps']} times, interleaved, after one warm-up",
        "- server: the app's `Server-Timing` (request in to the answer's first byte); client: "
        "the whole request on one keep-alive connection",
        "",
        "| page | server p50 ms | server **p95** ms | server max ms | client p50 ms |",
        "|---|---|---|---|---|",
    ]
    worst = 0.0
    for name, samples in data["results"].items():
        server, client = samples["server"], samples["client"]
        worst = max(worst, _p(server, 0.95))
        lines.append(
            f"| {name} | {statistics.median(server):.1f} | **{_p(server, 0.95):.1f}** | "
            f"{max(server):.1f} | {statistics.median(client):.1f} |"
        )
    verdict = "met" if worst < 100 else "not met"
    lines += [
        "",
        f"Goal (every page's server p95 under 100 ms): {verdict}; the slowest page's "
        f"p95 is {worst:.1f} ms.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--events", type=int, default=10_000_000, help="events in the log")
    parser.add_argument("--reps", type=int, default=40, help="times each page is asked")
    parser.add_argument(
        "--keep-database",
        action="store_true",
        help=f"keep the filled database {DATABASE} and reuse it next time",
    )
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="print the section instead of appending it to docs/benchmarks.md",
    )
    args = parser.parse_args()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    data = run(args)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"console_pages-{stamp}.json").write_text(json.dumps(data, indent=1))
    write_section("Console pages at scale, PostgreSQL", report(data), print_only=args.no_report)


if __name__ == "__main__":
    main()
