"""What every benchmark shares: the stack, an isolated worker, images, the docker CLI, timing,
statistics and the report (``docs/benchmarks.md``).

Each benchmark gets its own database (a fresh SQLite file, or a fresh PostgreSQL database on the
stack's server), its own Redis database on the stack's Redis (``/7`` unless told otherwise) and
its own worker processes, so that it neither sees nor disturbs anyone else's jobs. Nothing here
asserts a time: the numbers are reported, and ratios are what to read.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import redis
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.orm import Session

from harness.images import add_file
from harness.stack import RegistryEndpoint as Endpoint
from harness.stack import Stack, StackError, free_port, stack_env
from harness.worker import CeleryProcess, WorkerNotReady, process_children

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REPORT = DOCS / "benchmarks.md"
RESULTS = ROOT / "bench" / "results"
#: Debian's docker.io client (20.10, the daemon's version). Only ``machine()`` still uses it, to
#: ask the daemon its version; the baseline of a comparison is ``newest_docker_cli()``.
DOCKER_CLI = "/usr/bin/docker"
#: Where a ``docker`` CLI may be besides the directories of PATH.
DOCKER_CLI_DIRS = ("/usr/local/bin", "/usr/bin")
#: The Redis database of the benchmarks' broker (the e2e tests use 11, the default is 0).
BROKER_DB = 7
BENCH_REGISTRY_ID = 1
#: Registry record ids of the private registries: the TLS one keeps id 1 (what every benchmark
#: used so far), the plain-HTTP one is 2.
REGISTRY_IDS = {"tls": 1, "plain": 2}
REGISTRY_KINDS = ("tls", "plain")
MiB = 2**20


# --- the stack ----------------------------------------------------------------------------------


class PrivateRegistry:
    """A registry of this benchmark's own: the stack's TLS registry configuration (its server
    certificate, CA and htpasswd user) on a free port, storing into the work directory; with
    ``plain=True`` the stack's plain-HTTP registry's instead (its htpasswd user, no TLS).

    The end-to-end tests stop and start the stack's registries (outage tests) and others push
    to them; a private instance keeps those out of the measurements and its storage goes away
    with the work directory. The daemon reaches it without a certs.d entry: 127.0.0.0/8 is an
    insecure registry range by default (TLS without verification); the worker verifies it
    with the stack's CA.
    """

    def __init__(
        self, stack: dict[str, str], workdir: Path, *, plain: bool = False,
        log_level: str = "warn",
    ) -> None:  # fmt: skip
        self.plain = plain
        # ``tls`` names the stack registry whose user this copy takes (the attribute's name is
        # older than the plain variant; bench.throttle reads it).
        self.tls = Stack(stack).plain if plain else Stack(stack).tls
        tls_state = Path(stack["PUSHWORKER_STACK_TLS_CA"]).parent
        state = tls_state.parent / "plain-registry" if plain else tls_state
        self.dir = workdir / ("registry-plain" if plain else "registry")
        self.dir.mkdir()
        shutil.copy(state / "htpasswd", self.dir / "htpasswd")
        self.port = free_port()
        http: dict[str, Any] = {"addr": f"127.0.0.1:{self.port}", "secret": uuid.uuid4().hex}
        if not plain:
            http["tls"] = {
                "certificate": str(state / "server.crt"), "key": str(state / "server.key"),
            }  # fmt: skip
        config = {
            "version": 0.1,
            "log": {"level": log_level},
            "storage": {"filesystem": {"rootdirectory": str(self.dir / "data")}},
            "http": http,
            "auth": {"htpasswd": {"realm": "pushworker-bench", "path": str(self.dir / "htpasswd")}},
        }
        (self.dir / "config.yml").write_text(json.dumps(config))  # JSON is YAML
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def kind(self) -> str:
        return "plain" if self.plain else "tls"

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(
            host=f"127.0.0.1:{self.port}", user=self.tls.user, password=self.tls.password,
            ca_file=None if self.plain else self.tls.ca_file,
        )  # fmt: skip

    def describe(self) -> str:
        scheme = "plain HTTP" if self.plain else "TLS"
        return (
            f"{self.kind}: {self.endpoint.url} (htpasswd, {scheme}; a private instance of the "
            f"stack's {'plain-HTTP' if self.plain else 'TLS'} registry)"
        )

    def start(self, timeout: float = 30) -> PrivateRegistry:
        import requests

        binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
        with (self.dir / "registry.log").open("ab") as log:
            self.process = subprocess.Popen(
                [binary, "serve", str(self.dir / "config.yml")], stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                answer = requests.get(
                    f"{self.endpoint.url}/v2/", verify=self.endpoint.ca_file or True, timeout=2
                )
                if answer.status_code == 401:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        log_text = (self.dir / "registry.log").read_text(errors="replace")[-2000:]
        raise SystemExit(f"the private registry did not start:\n{log_text}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


# --- an isolated environment: database, broker, registry record -----------------------------


@dataclass
class Bench:
    """One benchmark's private world. ``close()`` drops what ``setup()`` made."""

    name: str
    stack: dict[str, str]
    workdir: Path
    env: dict[str, str]
    endpoint: Endpoint
    database: str  # "sqlite" or "postgres"
    api: docker.APIClient
    run_id: str
    #: The first of ``registries`` (what benchmarks with one registry use).
    registry: PrivateRegistry
    keep: bool = False
    code: str = ""
    workers: list[CeleryProcess] = field(default_factory=list)
    _pg_database: str | None = None
    #: Every private registry of this run by kind ("tls", "plain"); record ids in REGISTRY_IDS.
    registries: dict[str, PrivateRegistry] = field(default_factory=dict)

    @property
    def pg_database(self) -> str | None:
        """The PostgreSQL database of this run (None on SQLite)."""
        return self._pg_database

    def sweep_images(self) -> None:
        """Remove every image this run made or tagged (names carry the run id), retrying once:
        under load the daemon sometimes refuses a removal."""
        for _ in range(2):
            leftovers = [
                tag
                for image in self.api.images()
                for tag in image.get("RepoTags") or []
                if f"/{self.run_id}-" in tag or f"bench/{self.run_id}-" in tag
            ]
            if not leftovers:
                return
            remove_images(self.api, leftovers)
        print(f"bench: could not remove {len(leftovers)} images of run {self.run_id}",
              file=sys.stderr)  # fmt: skip

    @property
    def database_url(self) -> str:
        return self.env["PUSHWORKER_DATABASE_URL"]

    @property
    def broker_url(self) -> str:
        return self.env["PUSHWORKER_BROKER_URL"]

    def worker(
        self, app: str = "tasks.app", *, concurrency: int = 4, queue: str = "pushworker",
        extra_env: dict[str, str] | None = None, label: str = "pipeline",
    ) -> CeleryProcess:  # fmt: skip
        """Start a worker process on this benchmark's broker and database."""
        log = self.workdir / f"worker-{label}.log"
        worker = CeleryProcess(
            {**self.env, **(extra_env or {})}, log, app=app, concurrency=concurrency,
            queues=queue, name=f"bench-{label}-{self.run_id}@%h",
        )  # fmt: skip
        self.workers.append(worker)
        try:
            worker.start()
        except WorkerNotReady as error:
            raise SystemExit(str(error)) from None
        time.sleep(0.5)  # the main process answers first: let every pool process finish starting
        return worker

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.sweep_images()
        for registry in {id(r): r for r in [self.registry, *self.registries.values()]}.values():
            registry.stop()
        redis.Redis.from_url(self.broker_url).flushdb()
        from worker.store.db import engine_for

        engine_for.cache_clear()  # let go of the database before dropping it
        if self._pg_database is not None:
            _drop_pg_database(self.stack, self._pg_database)
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            print(f"bench: kept {self.workdir}", file=sys.stderr)


def setup(
    name: str, args: argparse.Namespace, registries: Sequence[str] = ("tls",),
    *, registry_log_level: str = "warn",
) -> Bench:  # fmt: skip
    """A fresh database and broker database, migrated, with a registry record for each private
    registry asked for (``tls``: a copy of the stack's TLS registry, id 1; ``plain``: of its
    plain-HTTP one, id 2) whose credential is stored encrypted, as operators store Harbor's."""
    from cryptography.fernet import Fernet

    try:
        stack = stack_env()
    except StackError as error:
        raise SystemExit(str(error)) from None
    # A terminated benchmark still stops its worker and registry and removes its images.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run_id = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix=f"pushworker-bench-{name}-"))
    pg_database = None
    if args.database == "postgres":
        pg_database = f"pushworker_bench_{run_id}"
        database_url = _create_pg_database(stack, pg_database)
    else:
        database_url = f"sqlite:///{workdir / 'pushworker.db'}"
    env = {
        "PUSHWORKER_DATABASE_URL": database_url,
        "PUSHWORKER_BROKER_URL": f"{stack['PUSHWORKER_STACK_REDIS_URL']}/{args.broker_db}",
        "PUSHWORKER_SECRET_KEY": Fernet.generate_key().decode(),
        "DOCKER_HOST": stack["DOCKER_HOST"],
        "PUSHWORKER_LOG_FORMAT": "json",
        "HOME": str(workdir / "home"),
    }
    # Before tasks.app is imported anywhere in this process: celeryconfig reads the broker URL.
    # HOME (no ~/.docker/config.json for docker-py) is the worker's only: this process keeps
    # its own, so that nothing it writes later lands in a removed work directory.
    os.environ.update({key: value for key, value in env.items() if key != "HOME"})
    from worker.core.settings import get_settings
    from worker.store.db import engine_for

    get_settings.cache_clear()
    engine_for.cache_clear()
    _log_to(workdir / "producer.log")
    redis.Redis.from_url(env["PUSHWORKER_BROKER_URL"]).flushdb()
    from worker.store.migrate import upgrade

    upgrade(database_url)
    started: dict[str, PrivateRegistry] = {}
    try:
        for kind in registries:
            private = PrivateRegistry(
                stack, workdir, plain=kind == "plain", log_level=registry_log_level
            )
            started[kind] = private.start()
            _add_registry(private.endpoint, REGISTRY_IDS[kind], "bench" if kind == "tls" else
                          f"bench-{kind}")  # fmt: skip
    except BaseException:
        for private in started.values():
            private.stop()
        raise
    first = started[registries[0]]
    api = docker.APIClient(base_url=stack["DOCKER_HOST"], version="auto")
    return Bench(
        name=name, stack=stack, workdir=workdir, env=env, endpoint=first.endpoint,
        database=args.database, api=api, run_id=run_id, keep=args.keep, code=_commit(),
        registry=first, _pg_database=pg_database, registries=started,
    )  # fmt: skip


def _log_to(path: Path) -> None:
    """This process's log lines (the producer's, as in production: JSON at INFO) go to a file,
    not to the terminal, which shows the benchmark's own progress lines only. (The project's
    loggers write to whatever ``sys.stderr`` is when a line is logged, so the file is given to
    structlog and to the standard library's root handler themselves.)"""
    import logging

    import structlog

    from worker.core.logs import configure_logging

    configure_logging("json")
    handle = path.open("a", buffering=1)
    structlog.configure(logger_factory=structlog.WriteLoggerFactory(file=handle))
    root = logging.getLogger()
    to_file = logging.StreamHandler(handle)
    to_file.setFormatter(root.handlers[0].formatter if root.handlers else None)
    root.handlers[:] = [to_file]


def _add_registry(
    endpoint: Endpoint, registry_id: int = BENCH_REGISTRY_ID, name: str = "bench"
) -> None:
    from worker.registries import RegistrySpec, create_registry
    from worker.store.db import session_scope

    ca = Path(endpoint.ca_file).read_text() if endpoint.ca_file else None
    spec = RegistrySpec(
        name=name, url=endpoint.url, kind="harbor" if ca else "generic",
        username=endpoint.user, secret=endpoint.password, ca_cert=ca, insecure=ca is None,
    )  # fmt: skip
    with session_scope() as session:
        create_registry(session, spec, registry_id=registry_id)


def _pg_admin_url(stack: dict[str, str]) -> str:
    url = stack["PUSHWORKER_STACK_POSTGRES_URL"].replace("postgresql+psycopg://", "postgresql://")
    return url.rsplit("/", 1)[0] + "/postgres"


def _create_pg_database(stack: dict[str, str], name: str) -> str:
    import psycopg

    with psycopg.connect(_pg_admin_url(stack), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return stack["PUSHWORKER_STACK_POSTGRES_URL"].rsplit("/", 1)[0] + f"/{name}"


def _drop_pg_database(stack: dict[str, str], name: str) -> None:
    import psycopg

    with psycopg.connect(_pg_admin_url(stack), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite",
                        help="the worker's database (default: a fresh SQLite file, the default "
                        "configuration)")  # fmt: skip
    parser.add_argument(
        "--broker-db",
        type=int,
        default=BROKER_DB,
        help=f"Redis database of the broker (default {BROKER_DB})",
    )
    parser.add_argument("--concurrency", type=int, default=4, help="worker concurrency")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="print the section instead of appending it to docs/benchmarks.md",
    )


# --- worker processes ---------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stack_pid(stack: dict[str, str], service: str) -> int | None:
    state = stack.get("PUSHWORKER_STACK_STATE_DIR")
    if not state:
        return None
    try:
        return int(Path(state, f"{service}.pid").read_text())
    except (OSError, ValueError):
        return None


class CpuMeter:
    """CPU seconds used by each party of a push, between two snapshots.

    ``worker``: the worker's processes (``worker_main``: its main process alone, Celery's
    consumer); ``producer``: this process (enqueue calls and its
    polling); ``cli``: the docker CLI processes this process ran and waited for; ``dockerd`` and
    ``registry``: the stack's daemon and registry, which other people's tests may also use (a
    lower bound of nothing, an upper bound of our share).
    """

    def __init__(self, bench: Bench, worker: CeleryProcess | None = None) -> None:
        self.worker = worker
        self.dockerd = _stack_pid(bench.stack, "dockerd")
        # Every private registry of the run: a benchmark runs one of them at a time.
        self.registries = [
            r.process.pid
            for r in (bench.registries.values() or [bench.registry])
            if r.process is not None
        ]

    def snapshot(self) -> dict[str, float]:
        times = os.times()
        snap = {
            "producer": times.user + times.system,
            "cli": times.children_user + times.children_system,
            "worker": sum(cpu_seconds(p) for p in self.worker.pids()) if self.worker else 0.0,
            "worker_main": cpu_seconds(self.worker.pid) if self.worker else 0.0,
            "dockerd": cpu_seconds(self.dockerd) if self.dockerd else 0.0,
            "registry": sum(cpu_seconds(pid) for pid in self.registries),
        }
        return snap

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {key: after[key] - before[key] for key in before}


class RssSampler:
    """Peak RSS of each of the worker's processes (main and pool), sampled every ``interval``
    seconds (50 ms by default), and the peak of their sum."""

    def __init__(self, worker: CeleryProcess, interval: float = 0.05) -> None:
        self.worker = worker
        self.interval = interval
        self.peaks: dict[int, int] = {}
        self.peak_sum = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        total = 0
        for pid in self.worker.pids():
            rss = rss_bytes(pid)
            total += rss
            self.peaks[pid] = max(self.peaks.get(pid, 0), rss)
        self.peak_sum = max(self.peak_sum, total)


# --- jobs: enqueue, wait, read their events ----------------------------------------------------


@dataclass
class JobTiming:
    """A job's times, in seconds since the epoch (this machine's clock, shared with the worker)."""

    job_id: str
    enqueue_started: float
    enqueue_returned: float
    events: list[tuple[str, str | None, float]] = field(default_factory=list)

    def first(self, type: str, step: str | None = None) -> float:
        for event_type, event_step, moment in self.events:
            if event_type == type and (step is None or event_step == step):
                return moment
        raise KeyError(f"job {self.job_id} has no {type} event for step {step}")

    @property
    def total(self) -> float:
        """From the producer's call to the ``job.succeeded`` event."""
        return self.first("job.succeeded") - self.enqueue_started

    def step_seconds(self, step: str) -> float:
        """``step.started`` to ``step.succeeded`` (or ``step.skipped``) of one step."""
        started = self.first("step.started", step)
        for event_type, event_step, moment in self.events:
            finished = event_type in ("step.succeeded", "step.skipped")
            if event_step == step and finished and moment >= started:
                return moment - started
        raise KeyError(f"job {self.job_id}: step {step} did not finish")

    @property
    def types(self) -> list[str]:
        """Event types in order, without ``step.progress`` (written only by pushes over 2 s); a
        reused login (``step.skipped`` on login, see worker/engine/steps.py) reads as its
        success."""
        return [
            "step.succeeded" if (kind, step) == ("step.skipped", "login") else kind
            for kind, step, _ in self.events
            if kind != "step.progress"
        ]


class JobWatcher:
    """Reads jobs and events through a plain engine of its own.

    The project's engine begins every SQLite transaction with ``BEGIN IMMEDIATE`` (it takes the
    write lock), so polling through it would contend with the worker; these reads do not.
    """

    def __init__(self, database_url: str) -> None:
        kwargs: dict[str, Any] = {}
        if database_url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30}
        self.engine: Engine = create_engine(database_url, **kwargs)
        self._raw: Any = None

    def statuses(self, job_ids: Iterable[str]) -> dict[str, str]:
        """Status of each job, through one raw driver connection: a poll costs this process
        (which shares the two cores with the worker) about 0.1 ms, not the ~1 ms of an ORM
        session."""
        from worker.store.models import PushJob

        if self._raw is None:
            self._raw = self.engine.raw_connection()
        mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        ids = list(job_ids)
        found: dict[str, str] = {}
        cursor = self._raw.cursor()
        try:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                cursor.execute(
                    f"SELECT id, status FROM {PushJob.__tablename__} "  # noqa: S608 (placeholders)
                    f"WHERE id IN ({', '.join([mark] * len(chunk))})",
                    chunk,
                )
                found.update({str(job_id): str(status) for job_id, status in cursor.fetchall()})
        finally:
            cursor.close()
            self._raw.rollback()  # PostgreSQL: end the snapshot so the next poll sees new rows
        return found

    def wait(self, job_ids: Sequence[str], *, timeout: float = 600, poll: float = 0.02) -> None:
        """Until every job is final; raises naming the failed or unfinished ones."""
        pending = set(job_ids)
        failed: list[str] = []
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for job_id, status in self.statuses(pending).items():
                if status in ("succeeded", "failed", "cancelled"):
                    pending.discard(job_id)
                    if status != "succeeded":
                        failed.append(job_id)
            if pending:
                time.sleep(poll)
        if failed:
            raise RuntimeError(f"{len(failed)} jobs did not succeed, e.g. {failed[0]}")
        if pending:
            raise TimeoutError(f"{len(pending)} jobs did not finish within {timeout} s")

    def fill_events(self, timings: Sequence[JobTiming]) -> None:
        from worker.store.models import Event

        by_id = {t.job_id: t for t in timings}
        with Session(self.engine) as session:
            ids = list(by_id)
            for start in range(0, len(ids), 500):
                rows = session.execute(
                    select(Event.job_id, Event.type, Event.step, Event.time)
                    .where(Event.job_id.in_(ids[start : start + 500]))
                    .order_by(Event.id)
                )
                for job_id, type_, step, moment in rows:
                    by_id[str(job_id)].events.append((str(type_), step, moment.timestamp()))

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
        self.engine.dispose()


def enqueue(
    source_image: str, repository: str, tag: str = "v1", registry_id: int = BENCH_REGISTRY_ID
) -> JobTiming:
    """One producer call (``worker.producer.enqueue_push``), timed."""
    from worker.producer import enqueue_push

    started = time.time()
    job_id = enqueue_push(
        source_image=source_image, registry_id=registry_id, repository=repository,
        tag=tag, requested_by="bench",
    )  # fmt: skip
    return JobTiming(job_id, started, time.time())


def run_one(
    watcher: JobWatcher, source_image: str, repository: str,
    registry_id: int = BENCH_REGISTRY_ID,
) -> JobTiming:  # fmt: skip
    """Enqueue one job, wait for it, and read its events."""
    timing = enqueue(source_image, repository, registry_id=registry_id)
    watcher.wait([timing.job_id])
    watcher.fill_events([timing])
    return timing


EXPECTED_NEW = ["job.enqueued"] + ["step.started", "step.succeeded"] * 4 + ["job.succeeded"]


def repository_of(source: str) -> str:
    """``pushworker-bench/abc-p-1:latest`` -> ``bench/abc-p-1``."""
    return "bench/" + source.split("/", 1)[1].split(":", 1)[0]


# --- images -----------------------------------------------------------------------------------


def make_images(api: docker.APIClient, prefix: str, count: int, size: int) -> list[str]:
    """``count`` distinct one-layer images of ``size`` random bytes, loaded in bulk.

    The same images as ``harness.images.build_scratch_image`` makes (``FROM scratch``
    plus one file), but written as a ``docker save`` archive and loaded in one API call per
    batch: about 0.13 s an image instead of 0.3 s, which is what makes 200-job rounds affordable.
    """
    references = [f"pushworker-bench/{prefix}-{i}:latest" for i in range(count)]
    batch = max(1, min(100, (256 * MiB) // max(size, 1)))
    for start in range(0, count, batch):
        archive = _save_archive(references[start : start + batch], size)
        for chunk in api.load_image(archive):
            if isinstance(chunk, dict) and chunk.get("error"):
                raise RuntimeError(f"loading images failed: {chunk['error']}")
    return references


def _save_archive(references: list[str], size: int) -> bytes:
    out = io.BytesIO()
    manifest = []
    with tarfile.open(fileobj=out, mode="w") as tar:
        for reference in references:
            layer = io.BytesIO()
            with tarfile.open(fileobj=layer, mode="w") as layer_tar:
                add_file(layer_tar, "blob", os.urandom(size))
            layer_bytes = layer.getvalue()
            diff_id = hashlib.sha256(layer_bytes).hexdigest()
            config = json.dumps({
                "architecture": "amd64", "os": "linux", "config": {},
                "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
                "history": [{"created_by": "COPY blob /blob (pushworker bench)"}],
            }).encode()  # fmt: skip
            config_name = f"{hashlib.sha256(config).hexdigest()}.json"
            add_file(tar, f"{diff_id}/layer.tar", layer_bytes)
            add_file(tar, config_name, config)
            manifest.append(
                {"Config": config_name, "RepoTags": [reference], "Layers": [f"{diff_id}/layer.tar"]}
            )
        add_file(tar, "manifest.json", json.dumps(manifest).encode())
    return out.getvalue()


def remove_images(api: docker.APIClient, references: Iterable[str]) -> None:
    """Untag (and so delete) benchmark images; the registry keeps what was pushed."""
    for reference in references:
        with suppress(docker.errors.APIError):
            api.remove_image(reference, force=True, noprune=False)


def target_references(api: docker.APIClient, sources: Iterable[str]) -> list[str]:
    """Every tag of the sources' images (the pushed references), for clean-up."""
    tags: list[str] = []
    for source in sources:
        try:
            tags.extend(api.inspect_image(source).get("RepoTags") or [])
        except docker.errors.APIError:
            continue
    return tags


# --- the docker CLI, as a script would use it -------------------------------------------------


@dataclass(frozen=True)
class CliBinary:
    """One ``docker`` CLI executable and the client version it reports."""

    path: str
    version: str

    @property
    def key(self) -> tuple[int, ...]:
        return version_key(self.version)

    def __str__(self) -> str:
        return f"{self.path} ({self.version})"


def version_key(version: str) -> tuple[int, ...]:
    """``28.2.2`` -> (28, 2, 2); ``20.10.24+dfsg1`` -> (20, 10, 24)."""
    found = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version.strip())
    return tuple(int(part or 0) for part in found.groups()) if found else (0,)


def docker_clis() -> list[CliBinary]:
    """Every distinct ``docker`` executable in PATH's directories, /usr/local/bin and /usr/bin
    (symlinks and /bin -> /usr/bin counted once), with its client version."""
    directories = [*os.environ.get("PATH", "").split(os.pathsep), *DOCKER_CLI_DIRS]
    found: dict[str, CliBinary] = {}
    for directory in directories:
        candidate = Path(directory or ".") / "docker"
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        real = str(candidate.resolve())
        if real in found:
            continue
        version = cli_version(str(candidate))
        if version:
            found[real] = CliBinary(str(candidate), version)
    return list(found.values())


def cli_version(path: str) -> str:
    """The client version ``docker --version`` prints (it asks no daemon); "" if it fails."""
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=20
        ).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ""
    found = re.search(r"version ([0-9][^,\s]*)", out)
    return found.group(1) if found else ""


def newest_docker_cli() -> CliBinary:
    """The newest ``docker`` CLI on this machine: the one a user would run (here 28.x, 1.3-2.5x
    faster per push than Debian's 20.10), so the baseline a comparison must beat."""
    clis = docker_clis()
    if not clis:
        raise SystemExit("no docker CLI found in PATH, /usr/local/bin or /usr/bin")
    return max(clis, key=lambda cli: cli.key)


def chosen_cli(path: str | None) -> CliBinary:
    """``--docker-cli PATH`` if given, else the newest CLI on the machine."""
    if not path:
        return newest_docker_cli()
    version = cli_version(path)
    if not version:
        raise SystemExit(f"--docker-cli {path}: not a docker CLI that answers --version")
    return CliBinary(path, version)


def baseline_arguments(parser: argparse.ArgumentParser) -> None:
    """``--docker-cli`` and ``--registry``, for the benchmarks that compare with the CLI."""
    parser.add_argument(
        "--docker-cli", metavar="PATH", default=None,
        help="the docker CLI of the baseline (default: the newest one in PATH, /usr/local/bin "
        "and /usr/bin)",
    )  # fmt: skip
    parser.add_argument(
        "--registry", choices=["tls", "plain", "both"], default="both",
        help="push to a private copy of the stack's TLS registry, of its plain-HTTP one, or to "
        "both, interleaved (default)",
    )  # fmt: skip


def registry_kinds(choice: str) -> tuple[str, ...]:
    return REGISTRY_KINDS if choice == "both" else (choice,)


class DockerCLI:
    """``docker --config <private dir>`` (the chosen CLI): its login state is its own."""

    def __init__(
        self, bench: Bench, binary: CliBinary | None = None, endpoint: Endpoint | None = None
    ) -> None:
        self.binary = binary or newest_docker_cli()
        self.endpoint = endpoint or bench.endpoint
        self.config = bench.workdir / f"docker-config-{self.endpoint.host.replace(':', '-')}"
        self.config.mkdir(exist_ok=True)
        self.env = {**os.environ, "DOCKER_HOST": bench.stack["DOCKER_HOST"]}

    def _run(self, *args: str, stdin: str | None = None) -> None:
        result = subprocess.run(
            [self.binary.path, "--config", str(self.config), *args], input=stdin, text=True,
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"docker {args[0]} failed: {result.stderr.strip()[-500:]}")

    def login(self) -> float:
        started = time.perf_counter()
        self._run(
            "login", "--username", self.endpoint.user, "--password-stdin", self.endpoint.host,
            stdin=self.endpoint.password,
        )  # fmt: skip
        return time.perf_counter() - started

    def tag_and_push(self, source: str, target: str) -> tuple[float, float]:
        """``docker tag SOURCE TARGET && docker push TARGET``; returns (tag s, push s)."""
        started = time.perf_counter()
        self._run("tag", source, target)
        tagged = time.perf_counter()
        self._run("push", target)
        return tagged - started, time.perf_counter() - tagged

    def target(self, source: str, tag: str = "v1") -> str:
        return f"{self.endpoint.host}/{repository_of(source)}:{tag}"


# --- statistics ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    n: int
    median: float
    minimum: float
    maximum: float
    p90: float
    p99: float
    mean: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not values:
            raise ValueError("no values")
        ordered = sorted(values)
        return cls(
            n=len(ordered), median=statistics.median(ordered), minimum=ordered[0],
            maximum=ordered[-1], p90=quantile(ordered, 0.90), p99=quantile(ordered, 0.99),
            mean=statistics.fmean(ordered),
        )  # fmt: skip

    def ms(self, what: str = "median") -> str:
        return f"{getattr(self, what) * 1000:.1f}"

    def range_ms(self) -> str:
        return f"{self.minimum * 1000:.1f}-{self.maximum * 1000:.1f}"

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in self.__dict__.items()}


def quantile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values."""
    if len(ordered) == 1:
        return ordered[0]
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio_range(rounds: Sequence[tuple[float, float]]) -> str:
    """Min-max over rounds of (pipeline median / baseline median)."""
    ratios = [a / b for a, b in rounds if b > 0]
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "-"


# --- the report ---------------------------------------------------------------------------------


def load_line() -> str:
    """``uptime``'s load averages, and what else runs here (others test on this machine)."""
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    others = _busy_processes()
    return f"load average {one}, {five}, {fifteen}" + (
        f"; also running: {others}" if others else ""
    )


def _busy_processes() -> str:
    """A few names of other processes using CPU right now (pytest runs, builds...)."""
    mine = {os.getpid(), *process_children(os.getpid())}
    seen: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if stat[0] != "R":
            continue
        words = [w.decode(errors="replace") for w in cmdline if w]
        name = next((Path(w).name for w in words[1:3] if "pytest" in w or "celery" in w), None)
        name = name or (Path(words[0]).name if words else "?")
        seen[name] = seen.get(name, 0) + 1
    return ", ".join(f"{n}x{k}" if n > 1 else k for k, n in sorted(seen.items()))


def machine() -> dict[str, str]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    try:
        docker_version = subprocess.run(
            [DOCKER_CLI, "version", "--format", "{{.Server.Version}}"],
            capture_output=True, text=True, timeout=20, env={**os.environ},
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        docker_version = "?"
    return {
        "host": platform.node(),
        "cpu": f"{os.cpu_count()} x {cpu}",
        "memory": f"{mem_kib / 2**20:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "docker": docker_version or "?",
    }


def _commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
    except OSError:
        return "?"
    changes = " + uncommitted changes" if dirty else ""
    return f"{head}{changes} (worker/ and tasks/ as run: {_fingerprint()})"


def _fingerprint() -> str:
    """A digest of the code the worker ran: others edit worker/ and tasks/ while benchmarks run."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("worker/**/*.py"), *ROOT.glob("tasks/*.py")]):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return f"sha256 {digest.hexdigest()[:12]}"


def machine_lines(
    bench: Bench, load_before: str, load_after: str, cli: CliBinary | None = None
) -> list[str]:
    info = machine()
    registries = [r.describe() for r in bench.registries.values()] or [bench.registry.describe()]
    lines = [
        f"- machine: {info['host']}, {info['cpu']}, {info['memory']}, Linux {info['kernel']}, "
        f"Python {info['python']}, Docker Engine {info['docker']} (storage driver of the stack's "
        "private dockerd: vfs)",
        f"- code: {bench.code}; database: {bench.database}; broker: Redis db "
        f"{bench.broker_url.rsplit('/', 1)[-1]}; registries: {'; '.join(registries)}",
    ]
    if cli is not None:
        others = ", ".join(str(c) for c in docker_clis() if c.path != cli.path)
        lines.append(
            f"- baseline CLI: `{cli.path}` {cli.version}"
            + (f" (also on this machine: {others})" if others else "")
        )
    return [*lines, f"- load before: {load_before}", f"- load after: {load_after}"]


def command_line() -> str:
    module = Path(sys.argv[0]).with_suffix("").name
    return " ".join([f".venv/bin/python -m bench.{module}", *map(shlex.quote, sys.argv[1:])])


def write_section(title: str, lines: Sequence[str], *, print_only: bool = False) -> None:
    """Append a dated section to docs/benchmarks.md (under a lock: benchmarks may overlap)."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([f"## {title} ({stamp})", "", *lines, ""]) + "\n"
    if print_only:
        print(text)
        return
    DOCS.mkdir(exist_ok=True)
    with open(REPORT, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        if not handle.read(1):
            handle.write(REPORT_HEADER)
        handle.seek(0, os.SEEK_END)
        handle.write("\n" + text)
    print(text)
    print(f"bench: appended to {REPORT}", file=sys.stderr)


REPORT_HEADER = """# Benchmarks

Written by the commands in `bench/` (see bench/README.md); each run appends a dated section.
Every comparison runs on the same stack in the same run, interleaved (pipeline round, then
baseline round, and so on). Times are medians of per-job times over all rounds, with the
minimum and maximum; ratios are pipeline / baseline (below 1.0: the pipeline is faster).
These machines are shared and noisy: the load is noted with every section, and tests never
assert times.
"""


def save_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(json.dumps(data, indent=1, default=str))
    return path


def latest_results(name: str) -> Path | None:
    found = sorted(RESULTS.glob(f"{name}-*.json"))
    return found[-1] if found else None


@contextmanager
def phase(label: str) -> Iterator[None]:
    started = time.monotonic()
    print(f"bench: {label}...", file=sys.stderr, flush=True)
    yield
    print(f"bench: {label}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def by_round(values: Sequence[tuple[int, float]]) -> dict[int, list[float]]:
    rounds: dict[int, list[float]] = {}
    for round_no, value in values:
        rounds.setdefault(round_no, []).append(value)
    return rounds


def median_per_round(values: Sequence[tuple[int, float]]) -> dict[int, float]:
    return {r: statistics.median(v) for r, v in by_round(values).items()}


def paired_round_ratios(
    pipeline: Sequence[tuple[int, float]], baseline: Sequence[tuple[int, float]]
) -> list[tuple[float, float]]:
    a, b = median_per_round(pipeline), median_per_round(baseline)
    return [(a[r], b[r]) for r in sorted(a) if r in b]
