"""The message contract end to end: a producer that cannot import this package sends
``pushworker.submit`` to the broker; the real worker validates it, then pushes or records why not.

The producer (``tests/support/producer_app.py``) runs in a subprocess started with ``python -S``
from a directory holding only that file, with ``PYTHONPATH`` set to the virtualenv's
site-packages: Celery is importable, the editable install of pushworker (a ``.pth`` hook) is not,
and the producer checks that itself before sending anything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from harness.images import new_image
from harness.stack import ROOT, RegistryEndpoint
from tests.e2e.conftest import E2E, served_digest, wait_for_job
from worker.core.text import has_control
from worker.registries import RegistrySpec, create_registry
from worker.store.db import session_scope
from worker.store.models import Event, PushJob, Registry
from worker.store.queries import select_events
from worker.store.verify import verify

CONTRACT_ID = 31  # a registry of this module's own (the harness's are 4 and 5)
SECRET = f"never-in-a-message-{uuid.uuid4().hex[:8]}"


def ensure_registry(registry_id: int, name: str, endpoint: RegistryEndpoint) -> int:
    with session_scope() as session:
        if session.get(Registry, registry_id) is None:
            ca = Path(endpoint.ca_file).read_text() if endpoint.ca_file else None
            spec = RegistrySpec(name=name, url=endpoint.url, kind="generic",
                                username=endpoint.user, secret=endpoint.password, ca_cert=ca,
                                insecure=endpoint.ca_file is None)  # fmt: skip
            create_registry(session, spec, registry_id=registry_id)
    return registry_id


@pytest.fixture
def registry(e2e: E2E) -> int:
    return ensure_registry(CONTRACT_ID, "contract-tls", e2e.stack.tls)


class Producer:
    """Runs ``producer_app`` as a foreign process: no pushworker on its ``sys.path``."""

    def __init__(self, e2e: E2E, workdir: Path) -> None:
        shutil.copy(ROOT / "tests" / "support" / "producer_app.py", workdir)
        self.cwd = workdir
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": str(workdir),
            "PYTHONPATH": sysconfig.get_paths()["purelib"],
            "PRODUCER_BROKER_URL": e2e.broker_url,
        }

    def run(self, *arguments: str) -> str:
        result = subprocess.run(
            [sys.executable, "-S", *arguments], cwd=self.cwd, env=self.env,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, f"the producer failed:\n{result.stderr[-3000:]}"
        return result.stdout.strip()

    def celery_call(self, request: dict[str, Any]) -> str:
        """``celery -A producer_app call pushworker.submit --args '[{...}]'``; the task id."""
        out = self.run("-m", "celery", "-A", "producer_app", "call", "pushworker.submit",
                       "--queue", "pushworker", "--args", json.dumps([request]))  # fmt: skip
        return out.splitlines()[-1]

    def send_task(self, messages: list[dict[str, Any]]) -> list[str]:
        """``Celery(broker=...).send_task("pushworker.submit", ...)`` per message; the task ids."""
        return list(json.loads(self.run("producer_app.py", json.dumps(messages))))


@pytest.fixture
def producer(e2e: E2E, tmp_path: Path) -> Producer:
    return Producer(e2e, tmp_path)


def request(image: str, **changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "source_image": image,
        "registry_id": CONTRACT_ID,
        "repository": f"contract/app-{uuid.uuid4().hex[:8]}",
        "tag": "v1",
        "requested_by": "producer-e2e",
        "idempotency_key": f"contract-{uuid.uuid4()}",
    }
    fields.update(changes)
    return {key: value for key, value in fields.items() if value is not None}


def job_by_key(key: str, timeout: float = 60) -> PushJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as session:  # SQLite: a session holds the write lock, so be brief
            job_id = session.scalar(select(PushJob.id).where(PushJob.idempotency_key == key))
        if job_id is not None:
            return wait_for_job(job_id)
        time.sleep(0.2)
    raise AssertionError(f"no job with idempotency key {key} within {timeout} s")


def rejection(task_id: str, timeout: float = 60) -> Event:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as session:
            rows = select_events(session, stream=f"submissions/{task_id}")
        if rows:
            (row,) = rows
            return row
        time.sleep(0.2)
    raise AssertionError(f"submission {task_id} was not recorded within {timeout} s")


def test_a_foreign_producer_pushes_through_celery_call(
    e2e: E2E, registry: int, producer: Producer, image: str
) -> None:
    """`celery call pushworker.submit`: the worker validates, records and pushes; the registry
    serves the pushed digest."""
    sent = request(image)
    producer.celery_call(sent)
    job = job_by_key(sent["idempotency_key"])
    assert (job.status, job.error_message) == ("succeeded", None)
    assert job.requested_registry_id == CONTRACT_ID and job.requested_by == "producer-e2e"
    assert job.pushed_reference == f"{e2e.stack.tls.host}/{sent['repository']}:v1"
    assert job.digest == served_digest(e2e.stack.tls, sent["repository"], "v1")
    with session_scope() as session:
        first = select_events(session, job_id=job.id)[0]
    assert (first.type, first.actor) == ("job.enqueued", "producer:producer-e2e")


def test_invalid_messages_are_rejected_on_record_and_the_next_job_still_runs(
    e2e: E2E, registry: int, producer: Producer, image: str
) -> None:
    """Raw messages with missing, extra and secret fields, kwargs instead of the one object, an
    unknown registry and a malformed repository: each one gets a submission.rejected event with
    its error; none makes a job; the valid message sent after them is pushed."""
    invalid = {
        "missing tag": (request(image, tag=None), "invalid_message", "missing field(s) 'tag'"),
        "extra secret": (
            request(image, password=SECRET), "invalid_message", "unexpected field(s) 'password'"
        ),
        "unknown registry": (
            request(image, registry_id=9_999), "registry_not_found", "registry 9999 does not"
        ),
        "host in repository": (
            request(image, repository="evil.example.com/app"), "invalid_reference", "names a host"
        ),
        "wrong type": (
            request(image, registry_id=str(CONTRACT_ID)), "invalid_message",
            "registry_id must be of type integer, not string",
        ),
    }  # fmt: skip
    kwargs_style = request(image)
    valid = request(new_image(e2e.api))
    messages: list[dict[str, Any]] = [{"args": [sent]} for sent, _, _ in invalid.values()]
    messages += [{"kwargs": kwargs_style}, {"args": [valid]}]
    ids = producer.send_task(messages)

    job = job_by_key(valid["idempotency_key"])
    assert job.status == "succeeded"
    assert job.digest == served_digest(e2e.stack.tls, valid["repository"], "v1")
    expected = [(code, words) for _, code, words in invalid.values()]
    expected.append(("invalid_message", "takes exactly one positional argument"))
    for task_id, (code, words), message in zip(ids[:-1], expected, messages[:-1], strict=True):
        row = rejection(task_id)
        assert row.type == "submission.rejected" and row.job_id is None
        assert row.payload["error_code"] == code, row.payload
        assert words in row.payload["error_message"], row.payload
        sent = message.get("args", [message.get("kwargs")])[0]
        assert row.payload.get("idempotency_key") == (
            sent["idempotency_key"] if "args" in message else None
        )
    with session_scope() as session:
        keys = [sent["idempotency_key"] for sent, _, _ in invalid.values()]
        keys.append(kwargs_style["idempotency_key"])
        assert session.scalars(select(PushJob).where(PushJob.idempotency_key.in_(keys))).all() == []
        recorded = json.dumps([r.payload for r in select_events(session)])
    assert SECRET not in recorded
    assert SECRET not in e2e.worker_log.read_text(errors="replace")


def test_hostile_messages_are_each_recorded_once_and_the_log_verifies(
    e2e: E2E, registry: int, producer: Producer, image: str
) -> None:
    """Ids beyond 32 and 64 bits, a chain of strings or booleans, NUL, an escape sequence and a
    lone surrogate, sent as raw JSON through the real broker: each is refused by the schema and
    recorded as exactly one submission.rejected event (the rejection itself used to fail on
    2^63, and a chain of "2" was hashed as sent and stored as 2, breaking the log); the stored
    record holds no raw control character; the valid message after them is pushed; and
    ``events verify`` finds the whole log intact."""
    schema = "invalid_message"
    hostile = {
        "id 2^63": (request(image, registry_id=2**63), schema),
        "id 2^31": (request(image, registry_id=2**31), schema),
        "id 0": (request(image, registry_id=0), schema),
        "chain of strings": (request(image, fallback=[str(CONTRACT_ID + 1)]), schema),
        "chain of booleans": (request(image, fallback=[True]), schema),
        "chain of 2^63": (request(image, fallback=[2**63]), schema),
        "NUL in requested_by": (request(image, requested_by="x\x00y"), schema),
        "ESC in requested_by": (request(image, requested_by="x\x1b[2J\x1b]0;owned\x07"), schema),
        "C1 in tag": (request(image, tag="v\x9b1"), schema),
        # JSON Schema cannot say "valid Unicode": the producer API's own check refuses it
        "surrogate in key": (request(image, idempotency_key="k\ud800"), "invalid_input"),
    }  # fmt: skip
    valid = request(new_image(e2e.api))
    ids = producer.send_task([{"args": [sent]} for sent, _ in [*hostile.values(), (valid, "")]])

    assert job_by_key(valid["idempotency_key"]).status == "succeeded"
    for task_id, (name, (_sent, code)) in zip(ids[:-1], hostile.items(), strict=True):
        row = rejection(task_id)  # exactly one event on the submission's stream
        assert row.payload["error_code"] == code, (name, row.payload)
        shown = [row.actor, *(str(value) for value in row.payload.values())]
        assert not any(has_control(text) for text in shown), (name, shown)
        if name.startswith("id 2^"):
            assert row.registry_id is None and "requested_registry_id" not in row.payload
    with session_scope() as session:
        repositories = [sent["repository"] for sent, _ in hostile.values()]
        made = session.scalars(select(PushJob.id).where(PushJob.repository.in_(repositories)))
        assert made.all() == []
    report = verify()
    assert report.ok, [problem.message for problem in report.problems]
    assert "raised unexpected" not in e2e.worker_log.read_text(errors="replace")
