"""Load: many distinct jobs through the real worker at concurrency 4 (figures reported only)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

from bench.load import build_images, run_load
from tests.e2e.conftest import E2E, HARBOR_ID

JOBS = int(os.environ.get("PUSHWORKER_LOAD_JOBS", "500"))


def test_many_jobs_all_succeed_with_complete_ordered_logs(e2e: E2E) -> None:
    """Every job succeeds, and each job's log is exactly the expected sequence."""
    images = build_images(e2e.api, JOBS)
    assert e2e.worker.process is not None
    report = run_load(images, HARBOR_ID, e2e.worker.process.pid, concurrency=4)
    print("load:", json.dumps(asdict(report)))
    assert report.succeeded == JOBS
    assert report.incomplete_logs == 0
