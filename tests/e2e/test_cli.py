"""``pushctl`` driven as an operator drives it: ``.venv/bin/pushctl`` subprocesses against the real
stack and the e2e worker, passwords on stdin, exit codes and ``--json`` output checked.

The second test is the incident's runbook (docs/operations.md): a registry refuses its
credentials, pushes fail with exit 7, the credential is fixed, the failed jobs are retried in bulk
and succeed, and the event log says who retried them and why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from harness.stack import RegistryEndpoint
from tests.e2e.conftest import E2E, served_digest

PUSHCTL = str(Path(sys.executable).with_name("pushctl"))  # .venv/bin/pushctl
OPERATOR = "e2e-cli"
TLS_ID, PLAIN_ID, INCIDENT_ID = 41, 42, 43  # this module's own (the harness's are 4 and 5)


def pushctl(
    *args: str, stdin: str | None = None, expect: int = 0, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [PUSHCTL, *args], input=stdin, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PUSHWORKER_OPERATOR": OPERATOR},
    )  # fmt: skip
    assert result.returncode == expect, (
        f"pushctl {' '.join(args)}: exit {result.returncode}, expected {expect}\n"
        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    )
    return result


def pushctl_json(*args: str, stdin: str | None = None, expect: int = 0) -> Any:
    return json.loads(pushctl(*args, "--json", stdin=stdin, expect=expect).stdout)


def add(registry_id: int, name: str, endpoint: RegistryEndpoint) -> Any:
    """``pushctl registry add`` with the password on stdin; it tests the connection itself."""
    security = ["--ca-file", endpoint.ca_file] if endpoint.ca_file else ["--insecure"]
    return pushctl_json(
        "registry", "add", name, endpoint.url, "--id", str(registry_id),
        "--username", endpoint.user, "--password-stdin", *security,
        stdin=f"{endpoint.password}\n",
    )  # fmt: skip


def set_password(registry_id: int, password: str, expect: int = 0) -> Any:
    return pushctl_json(
        "registry", "set-credential", str(registry_id), "--password-stdin",
        stdin=f"{password}\n", expect=expect,
    )  # fmt: skip


def failed_check(report: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in report["checks"] if not c["ok"] and not c["skipped"])


def test_registry_add_and_connection_tests(e2e: E2E) -> None:
    """add (password via stdin) for the TLS and the plain registry, healthy tests (exit 0), a
    wrong password (exit 7), a stopped registry (exit 8)."""
    tls, plain = e2e.stack.tls, e2e.stack.plain
    for registry_id, name, endpoint in ((TLS_ID, "cli-tls", tls), (PLAIN_ID, "cli-plain", plain)):
        saved = add(registry_id, name, endpoint)
        assert saved["registry"]["host"] == endpoint.host and saved["test"]["ok"] is True
        assert saved["registry"]["credential"] == "secret"
        report = pushctl_json("registry", "test", str(registry_id))
        assert report["ok"] is True
        assert [c["name"] for c in report["checks"]] == ["dns", "tcp", "tls", "v2", "credentials"]
    tls_check = next(c for c in report_of(TLS_ID)["checks"] if c["name"] == "tls")
    assert tls_check["ok"] and not tls_check["skipped"]
    listed = {r["id"]: r for r in pushctl_json("registry", "list")}
    assert {TLS_ID, PLAIN_ID} <= set(listed)
    assert tls.password not in json.dumps(listed)

    # A wrong password is saved (the operator said so), but its test fails: exit 7.
    refused = set_password(TLS_ID, "not-the-password", expect=7)
    assert failed_check(refused["test"])["error_code"] == "authentication_failed"
    report = pushctl_json("registry", "test", str(TLS_ID), expect=7)
    assert failed_check(report)["name"] == "credentials"
    set_password(TLS_ID, tls.password)
    pushctl("registry", "test", str(TLS_ID))

    # A registry that does not answer: exit 8, failing at tcp.
    e2e.stack.service("down", "plain-registry")
    try:
        report = pushctl_json("registry", "test", str(PLAIN_ID), expect=8)
        check = failed_check(report)
        assert (check["name"], check["error_code"]) == ("tcp", "registry_unavailable")
        text = pushctl("registry", "test", str(PLAIN_ID), expect=8)
        assert "fix:" in text.stdout
    finally:
        e2e.stack.service("up", "plain-registry")
    pushctl("registry", "test", str(PLAIN_ID))


def report_of(registry_id: int) -> Any:
    return pushctl_json("registry", "test", str(registry_id))


def test_the_incident_runbook_from_the_command_line(e2e: E2E, image: str) -> None:
    """push --wait succeeds (0); the password goes wrong and push --wait fails (7); the operator
    sets the credential and bulk-retries the failed jobs; they succeed; the log says who and why."""
    tls = e2e.stack.tls
    add(INCIDENT_ID, "cli-incident", tls)
    repository = f"cli/app-{uuid.uuid4().hex[:8]}"
    push = ["push", image, "--registry", str(INCIDENT_ID), "--repository", repository]

    ok = pushctl_json(*push, "--tag", "v1", "--wait", "--timeout", "120")
    assert ok["job"]["status"] == "succeeded"
    assert ok["job"]["digest"] == served_digest(tls, repository, "v1")

    set_password(INCIDENT_ID, "rotated-elsewhere", expect=7)
    failed = [
        pushctl_json(*push, "--tag", tag, "--wait", "--timeout", "120", expect=7)
        for tag in ("v2", "v3")
    ]
    for result in failed:
        job = result["job"]
        assert (job["status"], job["error_code"], job["current_step"]) == (
            "failed", "authentication_failed", "login",
        )  # fmt: skip
        assert f"set-credential {INCIDENT_ID}" in job["error_message"]
    failed_ids = {result["job_id"] for result in failed}
    listed = pushctl_json(
        "jobs", "list", "--status", "failed", "--registry", str(INCIDENT_ID), "--since", "1h"
    )
    assert {job["id"] for job in listed} == failed_ids
    assert served_digest(tls, repository, "v2") is None

    set_password(INCIDENT_ID, tls.password)
    retried = pushctl(
        "jobs", "retry", "--status", "failed", "--registry", str(INCIDENT_ID), "--since", "1h",
        "--reason", "password fixed after rotation",
    )  # fmt: skip
    assert retried.stdout.count("queued again as attempt 2") == 2
    assert "2 of 2 selected job(s) retried" in retried.stderr

    for job_id in failed_ids:
        job = wait_with_cli(job_id)
        assert (job["status"], job["attempt"], job["error_code"]) == ("succeeded", 2, None)
        timeline = pushctl_json("events", "--job", job_id)
        (retry,) = [e for e in timeline if e["type"] == "job.retried"]
        assert retry["actor"] == f"operator:{OPERATOR}"
        assert retry["payload"]["reason"] == "password fixed after rotation"
        assert retry["payload"]["previous_status"] == "failed"
        assert timeline[-1]["type"] == "job.succeeded"
    for tag in ("v2", "v3"):
        assert served_digest(tls, repository, tag) is not None


def wait_with_cli(job_id: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = pushctl_json("jobs", "show", job_id)["job"]
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} is still {job['status']}"
        time.sleep(0.5)
