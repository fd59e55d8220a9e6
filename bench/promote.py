"""Promoting an image from one registry to another.

    eval "$(scripts/stack env)"; .venv/bin/python -m bench.promote [--mib 50] [--runs 4]

Each run writes, for each way, a fresh single-platform image of one random ``--mib`` layer (an
OCI layout, nothing pulled) and copies it into the source registry (the benchmark's private TLS
registry, record 1), untimed: no way finds anything warm that another way read or wrote. Then
the three ways promote their image, by digest, to a fresh repository of the stack's plain
registry (record 2), in a rotating order (interleaved):

* pushworker: ``enqueue_push(source="registry:1/REPO@DIGEST")``, timed from the producer's call
  until the job's ``finished_at`` as the worker records it (four steps on a skopeo worker
  process, digest verified; the same machine's clock, so no polling interval is counted);
* engine: ``docker pull SRC@DIGEST && docker tag && docker push DST`` through the stack's Docker
  Engine (logged in beforehand, untimed; the pulled image removed after each run, untimed);
* skopeo: one bare ``skopeo copy --all --preserve-digests`` with an authfile, from a fresh HOME
  (no blob cache carried between runs, as in the worker).

Every copy is checked to serve the source's digest. The goal: pushworker >= 3x faster than the
engine path, and within 1.1x of bare skopeo.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from bench.common import (
    MiB,
    command_line,
    common_arguments,
    load_line,
    machine_lines,
    save_results,
    setup,
    write_section,
)
from harness.stack import RegistryEndpoint as Endpoint
from harness.stack import Stack
from tests.support.oci import write_oci_layout

METHODS = ("pushworker", "engine", "skopeo")
DEST_ID = 2
SKOPEO = "/usr/bin/skopeo"


def docker_cli() -> str:
    """The fastest docker CLI here (field notes: the newer one on PATH)."""
    return shutil.which("docker") or "/usr/bin/docker"


def auth_json(*endpoints: Endpoint) -> str:
    auths = {
        e.host: {"auth": base64.b64encode(f"{e.user}:{e.password}".encode()).decode()}
        for e in endpoints
    }
    return json.dumps({"auths": auths})


class Copier:
    """Bare skopeo with a private authfile, cert dir and HOME (fresh for every call)."""

    def __init__(self, workdir: Path, source: Endpoint, dest: Endpoint) -> None:
        self.dir = workdir / "skopeo"
        self.dir.mkdir()
        (self.dir / "auth.json").write_text(auth_json(source, dest))
        os.chmod(self.dir / "auth.json", 0o600)
        (self.dir / "certs").mkdir()
        assert source.ca_file is not None
        shutil.copy(source.ca_file, self.dir / "certs" / "ca.crt")
        self.source, self.dest = source, dest

    def _env(self) -> dict[str, str]:
        home = tempfile.mkdtemp(dir=self.dir)
        return {"HOME": home, "XDG_RUNTIME_DIR": home, "PATH": "/usr/bin:/bin"}

    def run(self, *args: str) -> None:
        done = subprocess.run(
            [SKOPEO, *args], env=self._env(), capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"skopeo {args[0]} failed: {done.stderr.strip()[-400:]}")

    def seed(self, layout: Path, repository: str) -> None:
        self.run("copy", "--quiet", "--all", "--preserve-digests", "--retry-times", "0",
                 "--dest-authfile", str(self.dir / "auth.json"),
                 "--dest-cert-dir", str(self.dir / "certs"),
                 f"oci:{layout}", f"docker://{self.source.host}/{repository}:seed")  # fmt: skip

    def promote(self, source_ref: str, target: str) -> float:
        started = time.perf_counter()
        self.run("copy", "--quiet", "--all", "--preserve-digests", "--retry-times", "0",
                 "--src-authfile", str(self.dir / "auth.json"),
                 "--src-cert-dir", str(self.dir / "certs"),
                 "--dest-authfile", str(self.dir / "auth.json"), "--dest-tls-verify=false",
                 f"docker://{source_ref}", f"docker://{target}")  # fmt: skip
        return time.perf_counter() - started


class Engine:
    """The docker CLI with a private config (its own logins) on the stack's engine."""

    def __init__(self, workdir: Path, docker_host: str, *endpoints: Endpoint) -> None:
        self.config = workdir / "docker-config"
        self.config.mkdir()
        self.env = {**os.environ, "DOCKER_HOST": docker_host}
        for endpoint in endpoints:
            self._run("login", "--username", endpoint.user, "--password-stdin", endpoint.host,
                      stdin=endpoint.password)  # fmt: skip

    def _run(self, *args: str, stdin: str | None = None) -> None:
        done = subprocess.run(
            [docker_cli(), "--config", str(self.config), *args], input=stdin, text=True,
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"docker {args[0]} failed: {done.stderr.strip()[-400:]}")

    def promote(self, source_ref: str, target: str) -> float:
        started = time.perf_counter()
        self._run("pull", "--quiet", source_ref)
        self._run("tag", source_ref, target)
        self._run("push", "--quiet", target)
        return time.perf_counter() - started

    def forget(self, *references: str) -> None:
        for reference in references:
            subprocess.run([docker_cli(), "--config", str(self.config), "rmi", "-f", reference],
                           env=self.env, capture_output=True, check=False)  # fmt: skip


def promote_with_pushworker(source_spec: str, repository: str) -> tuple[float, str, str, datetime]:
    from sqlalchemy import select

    from worker.producer import enqueue_push
    from worker.store.db import read_connection
    from worker.store.models import JobStatus, PushJob

    state = select(PushJob.status, PushJob.digest, PushJob.error_message, PushJob.finished_at)
    # The job's end is the worker's own record of it (finished_at, this machine's clock), not
    # the moment this loop next looks: polling every 50 ms would add 25 ms on average.
    started = datetime.now(UTC)
    job_id = enqueue_push(source=source_spec, registry_id=DEST_ID, repository=repository,
                          tag="v1", requested_by="bench:promote")  # fmt: skip
    while True:
        # One light read every 50 ms: a tighter ORM loop here would take CPU from the worker
        # on this 2-core machine, and the bare copy has no such neighbour.
        time.sleep(0.05)
        with read_connection() as connection:
            row = connection.execute(state.where(PushJob.id == job_id)).one()
        status, digest, error, finished = row
        if JobStatus(status).is_final:
            if status != JobStatus.SUCCEEDED:
                raise RuntimeError(f"job {job_id} {status}: {error}")
            finished = finished if finished.tzinfo else finished.replace(tzinfo=UTC)
            return (finished - started).total_seconds(), str(digest), job_id, started


#: The phases of a job's time, in order, as ``job_phases`` names them.
PHASES = ("to first step", "resolve_credentials", "login", "tag (pin)", "hand-offs", "push")


def job_phases(job_id: str, enqueued: datetime) -> dict[str, float]:
    """Where the job's time went, from its events (this machine's clock, like ``enqueued``):
    the queue before its first step, each step's run (claim recorded to outcome recorded;
    ``push`` is the copy and its digest check), and the hand-offs between steps (an outcome
    recorded to the next claim: the Celery hop and the next task's start)."""
    from worker.store.db import session_scope
    from worker.store.queries import select_events

    with session_scope() as session:
        rows = [r for r in select_events(session, job_id=job_id) if r.step]
    phases = dict.fromkeys(PHASES, 0.0)
    previous_end: datetime | None = None
    for step in ("resolve_credentials", "login", "tag", "push"):
        mine = [r for r in rows if r.step == step]
        started = _aware(next(r.time for r in mine if r.type == "step.started"))
        ended = _aware(next(r.time for r in mine if r.type in ("step.succeeded", "step.skipped")))
        if previous_end is None:
            phases["to first step"] = (started - enqueued).total_seconds()
        else:
            phases["hand-offs"] += (started - previous_end).total_seconds()
        phases["tag (pin)" if step == "tag" else step] = (ended - started).total_seconds()
        previous_end = ended
    return phases


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def served(endpoint: Endpoint, repository: str, reference: str) -> str | None:
    answer = requests.head(
        f"{endpoint.url}/v2/{repository}/manifests/{reference}",
        auth=(endpoint.user, endpoint.password), verify=endpoint.ca_file or True, timeout=10,
        headers={"Accept": "application/vnd.oci.image.index.v1+json, "
                           "application/vnd.oci.image.manifest.v1+json, "
                           "application/vnd.docker.distribution.manifest.v2+json"},
    )  # fmt: skip
    return answer.headers.get("Docker-Content-Digest") if answer.status_code == 200 else None


def _add_destination(dest: Endpoint) -> None:
    from worker.registries import RegistrySpec, create_registry
    from worker.store.db import session_scope

    spec = RegistrySpec(name="promote-dest", url=dest.url, username=dest.user,
                        secret=dest.password, insecure=True)  # fmt: skip
    with session_scope() as session:
        create_registry(session, spec, registry_id=DEST_ID)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(parser)
    parser.add_argument("--mib", type=int, default=50, help="size of the image's one layer")
    parser.add_argument("--runs", type=int, default=4, help="runs, each method once per run")
    parser.add_argument("--warmup", type=int, default=1, help="runs first, not counted")
    args = parser.parse_args()
    bench = setup("promote", args)
    try:
        results = run(bench, args)
    finally:
        bench.close()
    report(bench, args, results)


def run(bench: Any, args: argparse.Namespace) -> dict[str, Any]:
    source = bench.endpoint
    dest = Stack(bench.stack).plain
    _add_destination(dest)
    copier = Copier(bench.workdir, source, dest)
    engine = Engine(bench.workdir, bench.stack["DOCKER_HOST"], source, dest)
    bench.worker(queue="pushworker.skopeo", concurrency=2, label="skopeo",
                 extra_env={"DOCKER_HOST": ""})  # fmt: skip
    load_before = load_line()
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    phases: list[dict[str, float]] = []
    for index in range(-args.warmup, args.runs):
        counted = index >= 0
        name = f"{bench.run_id}-r{index}"
        # One image per way: nothing one way read or wrote (page cache, registry storage) is
        # warm for another, whatever the order.
        images: dict[str, str] = {}
        for method in METHODS:
            layout = write_oci_layout(
                bench.workdir / f"layout-{index}-{method}", layer_bytes=args.mib * MiB,
                platforms=(("linux", "amd64"),),
            )  # fmt: skip
            copier.seed(layout.path, f"bench/{name}-{method}")
            images[method] = layout.index_digest
            shutil.rmtree(layout.path)
        order = METHODS[index % 3 :] + METHODS[: index % 3]
        for method in order:
            repository, digest = f"bench/{name}-{method}", images[method]
            source_ref = f"{source.host}/{repository}@{digest}"
            target_repo = f"promoted/{name}-{method}"
            target = f"{dest.host}/{target_repo}:v1"
            if method == "pushworker":
                elapsed, pushed, job_id, enqueued = promote_with_pushworker(
                    f"registry:1/{repository}@{digest}", target_repo
                )
                assert pushed == digest, (pushed, digest)
                if counted:
                    phases.append(job_phases(job_id, enqueued))
            elif method == "engine":
                elapsed = engine.promote(source_ref, target)
                engine.forget(source_ref, target)
            else:
                elapsed = copier.promote(source_ref, target)
            if counted:
                times[method].append(elapsed)
            found = served(dest, target_repo, "v1")
            if method != "engine" and found != digest:
                raise RuntimeError(f"{method} left {found} at {target}, not {digest}")
            if found is None:
                raise RuntimeError(f"{method} left nothing at {target}")
            label = f"run {index + 1}" if counted else "warm-up"
            print(f"bench: {label} {method}: {elapsed:.2f} s", file=sys.stderr, flush=True)
    return {"times": times, "phases": phases, "load_before": load_before,
            "load_after": load_line(), "mib": args.mib, "runs": args.runs,
            "docker_cli": docker_cli()}  # fmt: skip


def report(bench: Any, args: argparse.Namespace, results: dict[str, Any]) -> None:
    times: dict[str, list[float]] = results["times"]
    median = {method: statistics.median(values) for method, values in times.items()}
    per_run = [
        (times["engine"][i] / times["pushworker"][i], times["pushworker"][i] / times["skopeo"][i])
        for i in range(len(times["pushworker"]))
    ]
    path = save_results("promote", {**results, "median": median, "per_run": per_run})
    version = subprocess.run([docker_cli(), "--version"], capture_output=True, text=True)
    lines = [
        f"Promoting one {args.mib} MiB single-layer image by digest from a TLS registry to a "
        f"plain one (both htpasswd), {args.runs} runs after {args.warmup} uncounted warm-up run, "
        "the three ways in a rotating order within each run, each way its own fresh random "
        "image (bench/promote.py).",
        "",
        "| way | median | min | max |",
        "|---|---|---|---|",
        *[
            f"| {label} | {median[m]:.2f} s | {min(times[m]):.2f} s | {max(times[m]):.2f} s |"
            for m, label in (
                (
                    "pushworker",
                    "pushworker job (`--from registry:1/REPO@DIGEST`), enqueue to finished_at",
                ),
                (
                    "engine",
                    f"`docker pull && docker tag && docker push` ({version.stdout.strip()})",
                ),
                ("skopeo", "bare `skopeo copy --all --preserve-digests`"),
            )
        ],
        "",
        "- where the pushworker job's time went (medians over the runs, from its events): "
        + ", ".join(
            f"{phase} {statistics.median(p[phase] for p in results['phases']) * 1000:.0f} ms"
            for phase in PHASES
        )
        + "; push is the skopeo copy and the destination's digest check, everything else the "
        "job's fixed cost (the two registries' /v2/ checks in login, the source's HEAD in pin)",
        f"- engine / pushworker: {median['engine'] / median['pushworker']:.2f}x of medians, per "
        f"run {min(r[0] for r in per_run):.2f}-{max(r[0] for r in per_run):.2f}x (goal >= 3x)",
        f"- pushworker / bare skopeo: {median['pushworker'] / median['skopeo']:.2f}x of medians, "
        f"per run {min(r[1] for r in per_run):.2f}-{max(r[1] for r in per_run):.2f}x "
        "(goal <= 1.1x)",
        f"- command: `{command_line()}`; raw results: `{path.relative_to(Path.cwd())}`"
        if path.is_relative_to(Path.cwd())
        else f"- command: `{command_line()}`",
        *machine_lines(bench, results["load_before"], results["load_after"]),
    ]
    write_section(f"Promotion: registry to registry, {args.mib} MiB", lines,
                  print_only=args.no_report)  # fmt: skip


if __name__ == "__main__":
    main()
