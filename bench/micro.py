"""Micro-measurements of single costs on the hot path: one at a time, variants interleaved.

    eval "$(scripts/stack env)"; .venv/bin/python -m bench.micro [--rounds 5]

A. Daemon calls through ``worker.seams.docker_engine.DockerEngine`` (warm client): an image inspect,
   a tag, a login (what the login step asks the daemon to do when it cannot reuse one). The
   inspect also with the client reading proxies and ``.netrc`` from the environment per call
   (requests' default, which the seam turns off for a local engine), wall and CPU.
B. The push step's digest check (``RegistryHTTP.manifest_digest``): with a new
   ``RegistryHTTP`` (a new TLS connection, then 401 and a retry with Basic credentials), with the
   object reused (keep-alive), and reused with the credentials sent at once (what the step does:
   ``worker.seams.registry_http.shared_client`` keeps one client per registry endpoint and
   credential in the process).
C. The pipeline without Celery and without I/O: ``create_job`` and the four steps run inline by
   ``worker.engine.pipeline.StepRunner`` against fakes of the two seams
   (``tests/support/fakes.py``),
   on this benchmark's database: what the database and the Python around it cost per job.
   Variant: SQLite with ``PRAGMA synchronous=NORMAL`` (set on checkout, in this process only).
D. The producer's publish of a job's four-task chain through the dispatcher seam
   (``worker.engine.dispatch.get_dispatcher()``: the Celery one, ``tasks.dispatch``), with and
   without the database read it makes first (``route_of``, replaced in ``tasks.dispatch``,
   where it is looked up).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any
from unittest.mock import patch

from bench.common import (
    BENCH_REGISTRY_ID,
    MiB,
    command_line,
    common_arguments,
    load_line,
    machine_lines,
    make_images,
    ms,
    phase,
    remove_images,
    save_results,
    setup,
    target_references,
    write_section,
)


def timed(function: Callable[[], object], count: int) -> list[float]:
    values = []
    for _ in range(count):
        started = time.perf_counter()
        function()
        values.append(time.perf_counter() - started)
    return values


def cpu_and_wall(function: Callable[[], object], count: int) -> tuple[list[float], list[float]]:
    walls, cpus = [], []
    for _ in range(count):
        wall, cpu = time.perf_counter(), time.process_time()
        function()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return walls, cpus


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = load_line()
    bench = setup("micro", args)
    created: list[str] = []
    samples: dict[str, list[float]] = {}

    def add(key: str, values: list[float]) -> None:
        samples.setdefault(key, []).extend(values)

    try:
        from sqlalchemy import event

        from tests.support.fakes import FakeWorld, fake_runner
        from worker.core.credentials import resolve_credential
        from worker.core.reference import build_target
        from worker.core.settings import get_settings
        from worker.engine.dispatch import get_dispatcher
        from worker.engine.targets import endpoint_of
        from worker.jobs import PushRequest, create_job
        from worker.registries import get_registry
        from worker.seams.docker_engine import DockerEngine
        from worker.seams.registry_http import RegistryHTTP
        from worker.store.db import default_engine, session_scope

        with phase("images"):
            (source,) = make_images(bench.api, f"{bench.run_id}-micro", 1, MiB)
            created.append(source)
        engine = DockerEngine(bench.stack["DOCKER_HOST"])
        with session_scope() as session:
            registry = get_registry(session, BENCH_REGISTRY_ID)
            session.expunge(registry)
        credential = resolve_credential(registry)
        assert credential is not None
        endpoint = endpoint_of(registry)
        target = build_target(registry.host, "bench/micro", "v1")
        engine.tag(source, target)
        engine.push(target, credential)  # so that the manifest check finds it

        # C: the fake pipeline; synchronous is set on every checkout by this flag.
        mode = {"synchronous": "FULL"}
        db_engine = default_engine()
        sqlite = db_engine.dialect.name == "sqlite"
        if sqlite:

            @event.listens_for(db_engine, "checkout")
            def _synchronous(dbapi_connection: Any, *_args: Any) -> None:
                dbapi_connection.execute(f"PRAGMA synchronous={mode['synchronous']}")

        settings = get_settings()
        world = FakeWorld(images={source: "sha256:" + "ab" * 32})
        _, dispatcher = fake_runner(world, settings)

        def fake_job() -> None:
            request = PushRequest(
                source_image=source, registry_id=BENCH_REGISTRY_ID,
                repository=f"bench/fake-{uuid.uuid4().hex[:10]}", tag="v1",
                requested_by="bench",
            )  # fmt: skip
            with session_scope() as session:
                job, _ = create_job(session, request, actor="producer:bench")
                job_id = job.id
            dispatcher.start_chain(job_id, BENCH_REGISTRY_ID)

        from tasks.dispatch import CeleryDispatcher

        celery_dispatcher = get_dispatcher()  # what worker.producer.publish sends through
        assert isinstance(celery_dispatcher, CeleryDispatcher), celery_dispatcher
        with session_scope() as session:
            job, _ = create_job(
                session,
                PushRequest(source_image=source, registry_id=BENCH_REGISTRY_ID,
                            repository="bench/publish", tag="v1", requested_by="bench"),
                actor="producer:bench",
            )  # fmt: skip
            publish_job = job.id

        def no_route(job_id: str) -> tuple[str | None, str]:
            return None, "docker"

        def publish(with_lookup: bool) -> Callable[[], None]:
            def go() -> None:
                if with_lookup:
                    celery_dispatcher.start_chain(publish_job, BENCH_REGISTRY_ID)
                    return
                with patch("tasks.dispatch.route_of", new=no_route):
                    celery_dispatcher.start_chain(publish_job, BENCH_REGISTRY_ID)

            return go

        for _ in range(5):  # warm every path once
            fake_job()
            publish(True)()
        for round_no in range(args.rounds):
            with phase(f"round {round_no + 1}/{args.rounds}"):
                # A
                # The seam's client reads no proxies or .netrc per call on a local socket
                # (``without_environment_lookups``); "env" is requests' default, for comparison.
                for variant, reads_environment in (("", False), ("_env", True)):
                    engine._api.trust_env = reads_environment
                    walls, cpus = cpu_and_wall(lambda: engine.image(source), 40)
                    add(f"inspect{variant}", walls)
                    add(f"inspect{variant}_cpu", cpus)
                engine._api.trust_env = False
                add("tag", timed(lambda: engine.tag(source, target), 20))
                # reuse=False: the daemon's own login every time, as a retried login step does
                login = lambda: engine.login(registry.host, credential, reuse=False)  # noqa: E731
                add("login", timed(login, 5))

                # B
                def fresh() -> None:
                    http = RegistryHTTP(endpoint, credential, timeout=10)
                    try:
                        http.manifest_digest(target.repository, target.tag)
                    finally:
                        http.close()

                add("manifest_fresh", timed(fresh, 10))
                kept = RegistryHTTP(endpoint, credential, timeout=10)

                def reused(http: RegistryHTTP = kept) -> None:
                    http.manifest_digest(target.repository, target.tag)

                reused()
                add("manifest_reused", timed(reused, 10))
                kept.http.auth = kept._basic()  # credentials on the first request
                add("manifest_preemptive", timed(reused, 10))
                kept.close()

                # C
                for synchronous in ("FULL", "NORMAL") if sqlite else ("FULL",):
                    mode["synchronous"] = synchronous
                    walls, cpus = cpu_and_wall(fake_job, 10)
                    add(f"fake_job_{synchronous}", walls)
                    add(f"fake_job_{synchronous}_cpu", cpus)
                mode["synchronous"] = "FULL"

                # D
                add("publish_with_read", timed(publish(True), 20))
                add("publish_without_read", timed(publish(False), 20))
        return {
            "args": vars(args),
            "samples": samples,
            "database": bench.database,
            "report": lambda after: machine_lines(bench, load_before, after),
        }
    finally:
        remove_images(bench.api, target_references(bench.api, created))
        remove_images(bench.api, created)
        bench.close()


ROWS = [
    ("inspect", "A. daemon: image inspect (`DockerEngine.image`)"),
    ("inspect_cpu", "A. same, CPU of this process"),
    ("inspect_env", "A. same, the client reading proxies and .netrc per call (requests' default)"),
    ("inspect_env_cpu", "A. same, CPU of this process"),
    ("tag", "A. daemon: tag (`DockerEngine.tag`)"),
    (
        "login",
        "A. daemon: login (`DockerEngine.login`: the daemon authenticates with the registry)",
    ),
    ("manifest_fresh", "B. digest check with a new client (new session: TLS, 401, retry)"),
    ("manifest_reused", "B. same, `RegistryHTTP` reused (keep-alive; still 401 then retry)"),
    ("manifest_preemptive", "B. reused, credentials sent at once (1 request; the push step)"),
    ("fake_job_FULL", "C. pipeline without I/O: enqueue + 4 steps, wall (default settings)"),
    ("fake_job_FULL_cpu", "C. same, CPU"),
    ("fake_job_NORMAL", "C. same with SQLite `synchronous=NORMAL`, wall"),
    ("fake_job_NORMAL_cpu", "C. same with SQLite `synchronous=NORMAL`, CPU"),
    ("publish_with_read", "D. producer publish of the 4-task chain, as `start_chain` does it"),
    ("publish_without_read", "D. same without its `route_of` database read"),
]


def report(results: dict[str, Any]) -> list[str]:
    samples = results["samples"]
    args = results["args"]
    lines = [
        f"Command: `{command_line()}`",
        "",
        *results["report"](load_line()),
        f"- {args['rounds']} rounds, the variants of each measurement interleaved within a round",
        "",
        "| measurement | n | median ms | p90 ms |",
        "|---|---|---|---|",
    ]
    for key, label in ROWS:
        values = samples.get(key)
        if not values:
            continue
        ordered = sorted(values)
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        lines.append(f"| {label} | {len(values)} | {ms(statistics.median(values))} | {ms(p90)} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    common_arguments(parser)
    args = parser.parse_args(argv)
    results = run(args)
    write_section("Micro-measurements of the hot path", report(results),
                  print_only=args.no_report)  # fmt: skip
    path = save_results("micro", {k: v for k, v in results.items() if k != "report"})
    print(f"bench: raw results in {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
