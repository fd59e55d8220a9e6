"""Webhooks end to end: the real Celery worker pushes, a webhook worker of its own (queue
``pushworker.webhooks``) driven by a real Celery beat delivers, and a real receiver process on
loopback verifies every delivery with the ``standardwebhooks`` package's own verifier.

Subscriptions are made with ``pushctl webhooks add ... --allow-private`` (the receiver is on
loopback); without that flag the same URL is refused.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner

from harness.images import new_image
from harness.worker import CeleryProcess
from tests.e2e.conftest import E2E, HARBOR_ID, wait_for_job
from tests.support.webhook_receiver import Receiver, free_port
from worker.cli import cli
from worker.core.credentials import Secret
from worker.core.errors import WebhookUnreachable
from worker.producer import enqueue_push
from worker.seams.webhook_http import HttpxSender, WebhookRequest, new_secret
from worker.store.db import session_scope
from worker.store.models import Event, JobStatus, WebhookAttempt, WebhookDelivery
from worker.webhooks import attempts_of

T = TypeVar("T")

#: Short on purpose: a hanging receiver is given up on after 5 s (time enough for the kill test
#: to kill the worker mid-attempt on a loaded machine; its lease is 2 x 5 + 5 s), and retried
#: soon after.
WEBHOOK_ENV = {
    "PUSHWORKER_WEBHOOK_TIMEOUT": "5",
    "PUSHWORKER_WEBHOOK_EVERY": "1",
    "PUSHWORKER_WEBHOOK_RETRY_BASE": "0.5",
    "PUSHWORKER_WEBHOOK_RETRY_MAX": "1",
}


@dataclass
class Hooks:
    """The webhook worker (replaceable: one test kills it) and beat."""

    env: dict[str, str]
    workdir: Path
    worker: CeleryProcess
    beat: CeleryProcess

    def start_worker(self) -> CeleryProcess:
        self.worker = _webhook_worker(self.env, self.workdir)
        return self.worker


def _webhook_worker(env: dict[str, str], workdir: Path) -> CeleryProcess:
    name = f"webhooks-{uuid.uuid4().hex[:6]}"
    return CeleryProcess(
        env, workdir / f"{name}.log", queues="pushworker.webhooks", concurrency=2,
        own_group=True, name=f"{name}@%h",
    ).start()  # fmt: skip


@pytest.fixture(scope="module")
def hooks(e2e: E2E) -> Iterator[Hooks]:
    workdir = e2e.workdir / "webhooks"
    workdir.mkdir(exist_ok=True)
    env = {**e2e.env, **WEBHOOK_ENV}
    worker = _webhook_worker(env, workdir)
    beat = CeleryProcess(env, workdir / "beat.log", beat=True).start()
    state = Hooks(env, workdir, worker, beat)
    try:
        yield state
    finally:
        state.beat.stop()
        state.worker.stop()


@dataclass
class Subscription:
    id: int
    secret: str
    receiver: Receiver


def pushctl(*args: str) -> Any:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def json_output(*args: str) -> Any:
    """A command's ``--json`` document (indented), without the event log lines (one line each)
    that the command's own committed events write to the same stream."""
    lines = pushctl(*args).output.splitlines()
    start = next(i for i, line in enumerate(lines) if line in ("{", "[", "[]"))
    return json.loads("\n".join(lines[start:]))


@pytest.fixture
def subscribe(e2e: E2E, hooks: Hooks) -> Iterator[Callable[..., Subscription]]:
    made: list[Subscription] = []

    def make(events: str = "job.succeeded,job.failed") -> Subscription:
        port = free_port()
        url = f"http://127.0.0.1:{port}/hooks/push"
        shown = json_output("webhooks", "add", url, "--events", events, "--allow-private", "--json")
        secret = shown["secret"]
        assert secret.startswith("whsec_")
        subscription = Subscription(shown["id"], secret, Receiver(e2e.workdir, secret, port=port))
        made.append(subscription)
        return subscription

    yield make
    for subscription in made:
        pushctl("webhooks", "remove", str(subscription.id))
        subscription.receiver.stop()


def wait_until(probe: Callable[[], T | None], what: str, timeout: float = 120) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def push(e2e: E2E) -> str:
    return enqueue_push(
        source_image=new_image(e2e.api), registry_id=HARBOR_ID,
        repository=f"hooks/app-{uuid.uuid4().hex[:8]}", tag="1.0", requested_by="webhook-test",
    )  # fmt: skip


def deliveries_of(subscription: Subscription) -> list[dict[str, Any]]:
    with session_scope() as session:
        rows = session.query(WebhookDelivery, Event).join(
            Event, Event.id == WebhookDelivery.event_id
        )
        return [
            {
                "id": d.id, "status": d.status, "message_id": d.message_id, "job_id": d.job_id,
                "type": e.type, "event_id": e.id, "attempts": d.attempts,
            }
            for d, e in rows.filter(WebhookDelivery.subscription_id == subscription.id)
            .order_by(WebhookDelivery.id)
            .all()
        ]  # fmt: skip


def tries(delivery_id: int) -> list[WebhookAttempt]:
    with session_scope() as session:
        found = attempts_of(session, delivery_id)
        session.expunge_all()
        return found


def test_a_loopback_url_is_refused_without_allow_private(e2e: E2E) -> None:
    url = f"http://127.0.0.1:{free_port()}/hooks"
    result = CliRunner().invoke(cli, ["webhooks", "add", url, "--events", "job.succeeded"])
    assert result.exit_code == 2, result.output
    assert "loopback" in result.output and "--allow-private" in result.output
    listed = json_output("webhooks", "list", "--json")
    assert url not in [row["url"] for row in listed]


def test_a_push_produces_a_signed_job_succeeded_delivery(
    e2e: E2E, subscribe: Callable[..., Subscription]
) -> None:
    subscription = subscribe()
    receiver = subscription.receiver.start()
    job_id = push(e2e)
    assert wait_for_job(job_id).status == JobStatus.SUCCEEDED

    def got() -> dict[str, Any] | None:
        for line in receiver.answered():
            if line["payload"] and line["payload"]["data"]["job_id"] == job_id:
                return line
        return None

    line = wait_until(got, "the receiver got the job.succeeded delivery")
    assert line["verified"] and line["status"] == 200
    assert line["payload"]["type"] == "job.succeeded"
    [delivery] = deliveries_of(subscription)
    assert line["headers"]["webhook-id"] == delivery["message_id"]
    assert line["payload"]["data"]["id"] == delivery["event_id"]
    shown = json_output("webhooks", "deliveries", "--json", "--webhook", str(subscription.id))
    assert [(d["status"], d["attempts"], d["last_status_code"]) for d in shown] == [
        ("delivered", 1, 200)
    ]
    assert subscription.secret not in json.dumps(shown)
    assert subscription.secret not in pushctl("webhooks", "list", "--json").output


def test_a_receiver_down_for_a_while_gets_everything_after_it_returns_in_order_per_job(
    e2e: E2E, subscribe: Callable[..., Subscription]
) -> None:
    subscription = subscribe("job.enqueued,job.succeeded")
    jobs = [push(e2e), push(e2e)]
    for job_id in jobs:
        assert wait_for_job(job_id).status == JobStatus.SUCCEEDED

    def failed_while_down() -> list[dict[str, Any]] | None:
        rows = deliveries_of(subscription)
        firsts = [r for r in rows if r["type"] == "job.enqueued"]
        # An attempt is recorded before it is made; wait until the first one has its outcome.
        ok = len(rows) == 4 and all(
            r["attempts"] >= 1 and tries(r["id"])[0].finished_at is not None for r in firsts
        )
        return rows if ok else None

    rows = wait_until(failed_while_down, "each job's first delivery tried while it is down")
    assert all(r["status"] == "pending" for r in rows)
    for row in rows:
        if row["type"] == "job.enqueued":
            first = tries(row["id"])[0]
            assert first.status_code is None and first.error, "no connection"
        else:
            assert row["attempts"] == 0, "a job's later delivery waits for its earlier one"
    receiver = subscription.receiver.start()
    wait_until(
        lambda: all(r["status"] == "delivered" for r in deliveries_of(subscription)),
        "every delivery delivered once the receiver is back",
    )
    answered = [line for line in receiver.answered() if line["status"] == 200]
    assert all(line["verified"] for line in answered)
    assert {line["headers"]["webhook-id"] for line in answered} == {
        r["message_id"] for r in rows
    }, "none lost"
    for job_id in jobs:
        types = [
            line["payload"]["type"]
            for line in answered
            if line["payload"]["data"]["job_id"] == job_id
        ]
        assert types == ["job.enqueued", "job.succeeded"], f"job {job_id} in order"


def test_a_receiver_answering_500_then_200_gets_two_attempts(
    e2e: E2E, subscribe: Callable[..., Subscription]
) -> None:
    subscription = subscribe()
    receiver = subscription.receiver.start(mode="fail-first")
    job_id = push(e2e)
    assert wait_for_job(job_id).status == JobStatus.SUCCEEDED
    [delivery] = wait_until(
        lambda: [r for r in deliveries_of(subscription) if r["status"] == "delivered"],
        "the delivery delivered",
    )
    assert [(t.attempt, t.status_code) for t in tries(delivery["id"])] == [(1, 500), (2, 200)]
    ids = [line["headers"]["webhook-id"] for line in receiver.answered()]
    assert ids == [delivery["message_id"]] * 2, "the same webhook-id on both attempts"


def test_a_hanging_receiver_does_not_delay_a_push(
    e2e: E2E, subscribe: Callable[..., Subscription]
) -> None:
    subscription = subscribe("job.enqueued,job.succeeded")
    receiver = subscription.receiver.start(mode="hang")
    warm = push(e2e)  # its deliveries keep the webhook worker busy with a receiver that hangs
    wait_until(receiver.arrived, "a delivery hanging at the receiver")
    job_id = push(e2e)
    job = wait_for_job(job_id)
    assert job.status == JobStatus.SUCCEEDED and job.started_at and job.finished_at
    assert wait_for_job(warm).status == JobStatus.SUCCEEDED

    def planned() -> list[dict[str, Any]] | None:
        rows = deliveries_of(subscription)
        mine = [r["type"] for r in rows if r["job_id"] == job_id]
        return rows if mine == ["job.enqueued", "job.succeeded"] else None

    rows = wait_until(planned, "the job's deliveries planned (by the worker's other slot)")
    assert all(r["status"] == "pending" for r in rows), "nothing was answered"
    # The receiver was being tried (and hanging) since before the push was asked for, and it
    # never answered anything: the push did not wait for it.
    first_try = min(t.started_at for r in rows for t in tries(r["id"]))
    assert first_try < job.started_at
    assert receiver.answered() == []


def test_the_delivering_worker_killed_mid_delivery_delivers_after_with_the_same_id(
    e2e: E2E, hooks: Hooks, subscribe: Callable[..., Subscription]
) -> None:
    subscription = subscribe()
    receiver = subscription.receiver.start(mode="hang-first")
    job_id = push(e2e)
    assert wait_for_job(job_id).status == JobStatus.SUCCEEDED
    [arrived] = wait_until(receiver.arrived, "the first attempt at the receiver")
    os.killpg(hooks.worker.pid, signal.SIGKILL)  # mid-delivery: the receiver has not answered
    hooks.worker.wait_exit(timeout=30)
    [delivery] = deliveries_of(subscription)
    assert delivery["status"] == "pending"
    hooks.start_worker()
    wait_until(
        lambda: deliveries_of(subscription)[0]["status"] == "delivered",
        "delivered by the next worker",
    )
    [answered] = receiver.answered()
    assert answered["verified"] and answered["status"] == 200
    assert answered["headers"]["webhook-id"] == arrived["webhook_id"] == delivery["message_id"]
    first, *later = tries(delivery["id"])
    assert first.finished_at is None and first.status_code is None, "cut short by the kill"
    assert later[-1].status_code == 200


def test_https_to_a_host_name_is_checked_against_that_name_on_the_checked_address(
    e2e: E2E,
) -> None:
    """The seam connects to the address it checked, yet TLS verifies the URL's host name: the
    stack's TLS registry (certificate for 127.0.0.1 and localhost, from the stack's own CA)
    answers over ``https://localhost``; with the system's CAs the same request is refused."""
    endpoint = e2e.stack.tls
    assert endpoint.ca_file is not None
    port = endpoint.host.rsplit(":", 1)[1]
    request = WebhookRequest(
        url=f"https://localhost:{port}/v2/", message_id="msg_tls", body="{}",
        secret=Secret(new_secret()), allow_private=True, timeout=10,
    )  # fmt: skip
    trusted = HttpxSender(verify=ssl.create_default_context(cafile=endpoint.ca_file))
    answered = trusted.send(request)
    assert answered.status_code is not None and answered.status_code >= 400, answered
    assert isinstance(answered.error, WebhookUnreachable)  # not 2xx: a failed attempt
    untrusted = HttpxSender().send(request)
    assert untrusted.status_code is None and isinstance(untrusted.error, WebhookUnreachable)
    assert "SSL" in untrusted.error.message or "CERTIFICATE" in untrusted.error.message.upper()
