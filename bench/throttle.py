"""Benchmark 7: pushes to a registry that throttles above 4 concurrent pushes (issue 15).

    eval "$(scripts/stack env)"; .venv/bin/python -m bench.throttle [--jobs 200] [--rounds 3]

A private plain registry behind ``ThrottleProxy`` (tests/support/throttleproxy.py), which answers
``429 TOOMANYREQUESTS`` (no Retry-After, as Harbor does) to a push that would make more than
``--limit`` (4) pushes at once. Per round, each side pushes its own ``--jobs`` distinct 1 MiB
images, in this order:

- ``off``: the worker as before flow control (``PUSHWORKER_FLOW_CONTROL=0``, default retry
  settings: 4 tries, backoff from 2 s), ``--concurrency`` (8) pool processes, the registry record
  without limits: a 429 is retried like an outage and a job fails after 4 tries;
- ``adaptive``: flow control on, the registry record without limits: the first 429s halve the
  registry's effective limit (AIMD), waits are re-queued;
- ``capped``: flow control on, the registry record set to ``--max-concurrent`` = the limit;
- ``cli``: a script doing ``docker tag && docker push`` for each image, 4 at a time (the newest
  docker CLI on PATH, whose version is reported).

Goodput is succeeded jobs / wall time (from the first enqueue to the last job's end); the proxy
counts its 429 answers and all requests. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import (
    Bench,
    MiB,
    PrivateRegistry,
    command_line,
    common_arguments,
    load_line,
    machine_lines,
    make_images,
    phase,
    save_results,
    setup,
    write_section,
)
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
    bench: Bench, watcher: Any, images: list[str], registry_id: int, proxy: ThrottleProxy
) -> dict[str, Any]:
    from worker.producer import enqueue_push

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
        time.sleep(0.05)
    wall = time.time() - started
    return _side(len(images), failed, wall, proxy)


def _side(jobs: int, failed: int, wall: float, proxy: ThrottleProxy) -> dict[str, Any]:
    requests = len(proxy.seen)
    return {
        "jobs": jobs, "succeeded": jobs - failed, "failed": failed, "wall": wall,
        "goodput": (jobs - failed) / wall, "throttled": proxy.throttled, "requests": requests,
        "throttled_share": proxy.throttled / max(requests, 1), "max_open": proxy.max_open,
    }  # fmt: skip


def _cli_side(
    docker: str, config: Path, env: dict[str, str], images: list[str], proxy: ThrottleProxy,
    endpoint: RegistryEndpoint,
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

    def push(source: str) -> bool:
        target = f"{proxy.host}/throttle/{source.split('/', 1)[1].split(':', 1)[0]}:v1"
        return run("tag", source, target) and run("push", target)

    started = time.time()
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(push, images))
    wall = time.time() - started
    return _side(len(images), results.count(False), wall, proxy)


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = load_line()
    bench = setup("throttle", args)
    plain = PlainRegistry(bench.stack, bench.workdir).start()
    endpoint = plain.endpoint
    docker = shutil.which("docker") or "/usr/bin/docker"
    version = subprocess.run(
        [docker, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True,
        env={"DOCKER_HOST": bench.stack["DOCKER_HOST"], "PATH": "/usr/bin:/bin"},
    ).stdout.strip()  # fmt: skip
    config = bench.workdir / "docker-config"
    config.mkdir()
    cli_env = {"DOCKER_HOST": bench.stack["DOCKER_HOST"], "PATH": "/usr/bin:/bin"}
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    try:
        with phase("images"):
            images = {
                (side, r): make_images(bench.api, f"{bench.run_id}-{side}{r}", args.jobs, MiB)
                for r in range(args.rounds)
                for side in SIDES
            }
        from bench.common import JobWatcher

        watcher = JobWatcher(bench.database_url)
        host, port = endpoint.host.rsplit(":", 1)
        for round_no in range(args.rounds):
            for side in SIDES:
                proxy = ThrottleProxy(host, int(port), limit=args.limit)
                proxy.start()
                try:
                    with phase(f"round {round_no + 1}: {side}"):
                        batch = images[(side, round_no)]
                        if side == "cli":
                            outcome = _cli_side(docker, config, cli_env, batch, proxy, endpoint)
                        else:
                            cap = args.limit if side == "capped" else None
                            registry_id = _registry_for(proxy, endpoint, cap)
                            flag = "0" if side == "off" else "1"
                            worker = bench.worker(
                                concurrency=args.concurrency, label=f"{side}{round_no}",
                                extra_env={"PUSHWORKER_FLOW_CONTROL": flag},
                            )  # fmt: skip
                            try:
                                outcome = _pipeline_side(bench, watcher, batch, registry_id, proxy)
                            finally:
                                worker.stop()
                    outcome["round"] = round_no
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
    "off": "worker, flow control off (before this change)",
    "adaptive": "worker, flow control, no cap configured (AIMD learns it)",
    "capped": "worker, flow control, `--max-concurrent 4`",
    "cli": "script: `docker tag && docker push`, 4 in parallel",
}


def report(data: dict[str, Any]) -> list[str]:
    args = data["args"]
    lines = [
        f"`{command_line()}`",
        "",
        f"{args['jobs']} jobs per side and round, {args['rounds']} rounds (interleaved: off, "
        f"adaptive, capped, cli); 1 MiB images; the registry answers 429 (no Retry-After) to a "
        f"push above {args['limit']} at once; worker concurrency {args['concurrency']}; "
        f"docker CLI {data['docker']}.",
        "",
        "| side | goodput jobs/s, median (min-max) | succeeded | failed | 429s per round, median "
        "(min-max) | share of requests answered 429 | most pushes at once |",
        "|---|---|---|---|---|---|---|",
    ]
    for side in SIDES:
        rounds = data["results"][side]
        if not rounds:
            continue
        goodput = [r["goodput"] for r in rounds]
        throttled = [r["throttled"] for r in rounds]
        share = [r["throttled_share"] for r in rounds]
        lines.append(
            f"| {LABELS[side]} | {statistics.median(goodput):.2f} ({min(goodput):.2f}-"
            f"{max(goodput):.2f}) | {sum(r['succeeded'] for r in rounds)} | "
            f"{sum(r['failed'] for r in rounds)} | {statistics.median(throttled):g} "
            f"({min(throttled)}-{max(throttled)}) | {100 * statistics.median(share):.1f}% | "
            f"{max(r['max_open'] for r in rounds)} |"
        )
    off = data["results"]["off"]
    for side in ("adaptive", "capped"):
        mine = data["results"][side]
        if off and mine:
            ratios = [m["goodput"] / o["goodput"] for m, o in zip(mine, off, strict=False)]
            lines.append("")
            lines.append(
                f"Goodput {side} / off per round: "
                + ", ".join(f"{ratio:.2f}x" for ratio in ratios)
                + " (goal >= 1.5x; 429s goal <= 5% of requests)."
            )
    lines += ["", *data["machine"]]
    lines.append(
        "- the throttled registry: a second private instance, plain HTTP, behind the proxy "
        "(the TLS one above is not used here)"
    )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs per side and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit", type=int, default=4, help="pushes at once the registry takes")
    common_arguments(parser)
    parser.set_defaults(concurrency=8)
    args = parser.parse_args(argv)
    data = run(args)
    lines = report(data)
    write_section(
        "Benchmark 7: a registry that throttles above 4 pushes", lines, print_only=args.no_report
    )
    path = save_results("throttle", data)
    print(f"bench: raw results in {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
