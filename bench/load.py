"""Load: N jobs of distinct small images through a real worker (concurrency 4).

Checks what must hold under load (all succeeded, each image served, every job's events complete
and in order) and reports jobs/s and the worker's peak memory. Run standalone:

    eval "$(scripts/stack env)"; .venv/bin/python -m bench.load --jobs 500

The end-to-end suite runs the same function (tests/e2e/test_load.py); timings are reported,
never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import docker

from harness.images import build_scratch_image
from harness.worker import process_children
from worker.store.db import session_scope
from worker.store.models import PushJob
from worker.store.queries import select_events

EXPECTED = ["job.enqueued"] + ["step.started", "step.succeeded"] * 4 + ["job.succeeded"]


@dataclass
class LoadReport:
    jobs: int
    concurrency: int
    seconds: float
    jobs_per_second: float
    worker_peak_rss_mib: float
    succeeded: int
    incomplete_logs: int


def build_images(api: docker.APIClient, count: int, size: int = 4096) -> list[str]:
    run = uuid.uuid4().hex[:6]
    references = [f"pushworker-load/{run}-{i}:latest" for i in range(count)]
    for reference in references:
        build_scratch_image(api, reference, size)
    return references


class PeakRss:
    """Samples the summed RSS of a process tree (the worker and its pool) every 100 ms."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid, self.peak = root_pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, _tree_rss(self.root_pid))


def _tree_rss(root: int) -> int:
    total = 0
    for pid in [root, *process_children(root)]:
        try:
            fields = Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()
            total += int(fields[0]) * 1024
        except (OSError, IndexError):
            continue
    return total


def run_load(images: list[str], registry_id: int, worker_pid: int, concurrency: int) -> LoadReport:
    from worker.producer import enqueue_push

    started = time.monotonic()
    with PeakRss(worker_pid) as rss:
        job_ids = [
            enqueue_push(
                source_image=image,
                registry_id=registry_id,
                repository=f"load/{image.split('/')[1].split(':')[0]}",
                tag="v1",
                requested_by="bench:load",
            )
            for image in images
        ]
        _wait_all(job_ids)
    seconds = time.monotonic() - started
    succeeded, incomplete = _check(job_ids)
    return LoadReport(
        jobs=len(job_ids),
        concurrency=concurrency,
        seconds=round(seconds, 2),
        jobs_per_second=round(len(job_ids) / seconds, 2),
        worker_peak_rss_mib=round(rss.peak / 2**20, 1),
        succeeded=succeeded,
        incomplete_logs=incomplete,
    )


def _wait_all(job_ids: list[str], timeout: float = 1800) -> None:
    deadline = time.monotonic() + timeout
    pending = set(job_ids)
    while pending and time.monotonic() < deadline:
        with session_scope() as session:
            rows = session.query(PushJob.id, PushJob.status).filter(PushJob.id.in_(pending))
            pending -= {job_id for job_id, status in rows if status in ("succeeded", "failed")}
        time.sleep(0.5)
    if pending:
        raise TimeoutError(f"{len(pending)} jobs did not finish")


def _check(job_ids: list[str]) -> tuple[int, int]:
    succeeded = incomplete = 0
    with session_scope() as session:
        for job_id in job_ids:
            job = session.get(PushJob, job_id)
            succeeded += job is not None and job.status == "succeeded"
            types = [e.type for e in select_events(session, job_id=job_id)]
            # A reused login (worker/engine/steps.py) records a skip.
            if len(types) > 4 and types[4] == "step.skipped":
                types[4] = "step.succeeded"
            incomplete += types != EXPECTED
    return succeeded, incomplete


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--registry", type=int, required=True, help="registry id to push to")
    parser.add_argument("--worker-pid", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    api = docker.APIClient(base_url=os.environ["DOCKER_HOST"])
    images = build_images(api, args.jobs)
    report = run_load(images, args.registry, args.worker_pid, args.concurrency)
    print(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
