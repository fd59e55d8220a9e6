"""The HTTP API's cost: ``POST /v1/pushes`` against calling ``enqueue_push()`` directly.

    eval "$(scripts/stack env)"; .venv/bin/python -m bench.api [--calls 100] [--rounds 5]

A real ``pushctl api serve`` process (uvicorn, one process) on this benchmark's database and
broker, a producer token, and one keep-alive HTTP client. Each API call is the whole request:
the token's argon2 check, the request's validation against the contract's schema, the
idempotency read, ``enqueue_push`` (the job row, its ``job.enqueued`` event, the publish) and
the job read back for the answer. Interleaved, in this process, ``enqueue_push()`` with the
same kind of request. No worker consumes the queue (benchmark 5's setting).

Then throughput: ``--clients`` threads each sending ``--burst`` requests at once, against the
same number of threads calling ``enqueue_push()``.

``--with-worker``: a Celery worker (``--concurrency``) consumes every job meanwhile, writing to
the same database; the jobs name an image that does not exist, so each runs resolve_credentials
and login against the registry and fails at tag: a busy worker, without building images.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from bench.common import (
    BENCH_REGISTRY_ID,
    Stats,
    command_line,
    common_arguments,
    load_line,
    machine_lines,
    save_results,
    setup,
    write_section,
)
from harness.stack import ROOT, free_port


def serve_api(env: dict[str, str], log_path: str) -> tuple[str, subprocess.Popen[bytes]]:
    """A real ``pushctl api serve`` process (one uvicorn process) with ``env``, once it answers
    ``/healthz``: its base URL and the process."""
    port = free_port()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "api", "serve", "--port", str(port)],
            cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return url, process
        except httpx.TransportError:
            time.sleep(0.2)
    process.terminate()
    raise SystemExit(f"the API did not start; see {log_path}")


def _throughput(call: Callable[[int], None], clients: int, burst: int) -> float:
    """Requests per second of ``clients`` threads each making ``burst`` calls."""
    counter = iter(range(10**9))
    lock = threading.Lock()

    def work() -> None:
        for _ in range(burst):
            with lock:
                n = next(counter)
            call(n)

    threads = [threading.Thread(target=work) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return clients * burst / (time.perf_counter() - started)


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = load_line()
    bench = setup("api", args)
    process = None
    try:
        import worker.producer as client
        from worker.tokens import create_token

        token, _ = create_token(f"bench-{bench.run_id}", "producer", actor="operator:bench")
        url, process = serve_api(bench.env, str(bench.workdir / "api.log"))
        if args.with_worker:
            bench.worker(concurrency=args.concurrency)
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        run_id = uuid.uuid4().hex[:8]

        def body(side: str, n: int) -> dict[str, Any]:
            return {
                "source_image": f"pushworker-bench/api-{run_id}:latest",
                "registry_id": BENCH_REGISTRY_ID, "repository": f"bench/{side}-{run_id}-{n}",
                "tag": "v1", "requested_by": "bench:api",
            }  # fmt: skip

        def api_once(n: int, session: httpx.Client = http) -> float:
            started = time.perf_counter()
            response = session.post(
                "/v1/pushes", json=body("api", n), headers={"Idempotency-Key": f"a-{run_id}-{n}"}
            )
            elapsed = time.perf_counter() - started
            if response.status_code != 201:
                raise SystemExit(
                    f"POST /v1/pushes answered {response.status_code}: {response.text}"
                )
            return elapsed

        def direct_once(n: int) -> float:
            started = time.perf_counter()
            client.enqueue_push(**body("direct", n), idempotency_key=f"d-{run_id}-{n}")
            return time.perf_counter() - started

        counter = iter(range(10**9))
        for _ in range(args.warmup):
            api_once(next(counter))
            direct_once(next(counter))
        api: list[dict[str, float]] = []
        direct: list[dict[str, float]] = []
        for round_no in range(args.rounds):
            for _ in range(args.calls):
                api.append({"round": round_no, "total": api_once(next(counter))})
            for _ in range(args.calls):
                direct.append({"round": round_no, "total": direct_once(next(counter))})
        base = 10**8
        sessions = threading.local()

        def api_threaded(n: int) -> None:
            if not hasattr(sessions, "client"):
                sessions.client = httpx.Client(
                    base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60
                )
            api_once(base + n, sessions.client)

        api_rate = _throughput(api_threaded, args.clients, args.burst)

        def direct_threaded(n: int) -> None:
            direct_once(2 * base + n)

        direct_rate = _throughput(direct_threaded, args.clients, args.burst)
        http.close()
        return {
            "args": vars(args),
            "api": api,
            "direct": direct,
            "api_rate": api_rate,
            "direct_rate": direct_rate,
            "report": lambda after: machine_lines(bench, load_before, after),
        }
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
        bench.close()


def report(results: dict[str, Any]) -> list[str]:
    args = results["args"]
    api = Stats.of([c["total"] for c in results["api"]])
    direct = Stats.of([c["total"] for c in results["direct"]])
    rounds = sorted({c["round"] for c in results["api"]})
    ratios = []
    for round_no in rounds:
        a = Stats.of([c["total"] for c in results["api"] if c["round"] == round_no]).median
        d = Stats.of([c["total"] for c in results["direct"] if c["round"] == round_no]).median
        ratios.append(a / d)
    lines = [
        f"Command: `{command_line()}`",
        "",
        *results["report"](load_line()),
        f"- {args['rounds']} interleaved rounds of {args['calls']} `POST /v1/pushes` (one "
        f"keep-alive client, a producer token, `pushctl api serve` with one uvicorn process) and "
        f"{args['calls']} `enqueue_push()` calls in the benchmark's process; {args['warmup']} "
        "warm-up calls of each not counted; distinct repositories and idempotency keys; "
        + (
            f"a worker (concurrency {args['concurrency']}) consuming every job meanwhile"
            if args.get("with_worker")
            else "no worker running"
        ),
        f"- throughput: {args['clients']} threads x {args['burst']} requests each, at once",
        "",
        "| what | n | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
    ]
    for label, s in [("**`POST /v1/pushes`**, whole request", api), ("`enqueue_push()`", direct)]:
        lines.append(
            f"| {label} | {s.n} | {s.ms()} | {s.ms('p90')} | {s.ms('p99')} | {s.ms('maximum')} |"
        )
    lines += [
        "",
        f"- ratio of medians, API / direct: **{api.median / direct.median:.2f}** (rounds "
        f"{min(ratios):.2f}-{max(ratios):.2f})",
        f"- throughput: API {results['api_rate']:.0f} requests/s, `enqueue_push()` "
        f"{results['direct_rate']:.0f} calls/s (ratio "
        f"{results['api_rate'] / results['direct_rate']:.2f})",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=100, help="calls per round and side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8, help="threads of the throughput part")
    parser.add_argument("--burst", type=int, default=25, help="requests per thread")
    parser.add_argument(
        "--with-worker", action="store_true", help="a worker consumes the jobs meanwhile"
    )
    common_arguments(parser)
    args = parser.parse_args(argv)
    results = run(args)
    write_section("HTTP API: POST /v1/pushes", report(results), print_only=args.no_report)
    path = save_results("api", {k: v for k, v in results.items() if k != "report"})
    print(f"bench: raw results in {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
