"""The fault tests again, with RabbitMQ as the broker: the same worker, the same checks.

This module's ``e2e`` is a worker on the stack's RabbitMQ vhost (quorum queues, publisher
confirms, flow control in the stack's Redis), and this process publishes there too (through
``harness.publish.BrokerDispatcher``: ``tasks.app`` keeps the session's Redis configuration). The
tests imported from the Redis modules below run here on that worker unchanged; the broker restart
and the poison corpus need RabbitMQ's own ways of restarting and of publishing, and the redelivery
after a whole worker dies is RabbitMQ's own, so those are written here.

RabbitMQ missing fails these tests with what to install; none is skipped.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import amqp
import kombu
import pytest
from celery import Celery
from hypothesis import HealthCheck, Phase, given, settings

from harness.images import new_image
from harness.publish import BrokerDispatcher, broker_app, publish_via
from harness.rabbitmq import INSTALL_HINT, RabbitError, RabbitNode, amqp_answers, free_port
from harness.stack import Stack
from harness.worker import CeleryProcess
from tests.e2e.conftest import BROKER_DB, E2E, HARBOR_ID, e2e_env, running_e2e, wait_for_job
from tests.e2e.test_faults import (
    assert_each_step_completed_once,
    events_of,
    test_a_step_that_keeps_killing_its_worker_fails_the_job,
    test_duplicate_deliveries_run_each_step_once,
    test_registry_outage_fails_jobs_then_an_operator_retry_succeeds,
    test_worker_killed_mid_push_finishes_the_job_once,
)
from tests.e2e.test_poison_messages import CORPUS, QUEUE, SECRET, Raw, _recordable, rejections
from tests.e2e.test_poison_messages import headers as task_headers
from tests.e2e.test_takeover import (
    HOST,
    _known_host,
    running_push_claim,
    start_worker,
    test_a_worker_killed_whole_mid_push_is_taken_over_by_the_next_start,
)
from worker.core.messages import SUBMIT_TASK
from worker.core.settings import get_settings
from worker.engine.dispatch import set_dispatcher
from worker.engine.liveness import parse_owner
from worker.jobs import PushRequest, create_job
from worker.producer import enqueue_push
from worker.reconcile import reconcile
from worker.store.db import session_scope
from worker.store.models import Event, JobStatus, PushJob
from worker.store.queries import select_events

MiB = 1024 * 1024
#: Every queue these tests (and the Redis modules' tests run here) consume.
QUEUES = (QUEUE, f"{QUEUE}.{HOST}")

# Run here, on the RabbitMQ worker, exactly as written for Redis. The outage test's retries wait
# in RabbitMQ's delayed-delivery queues (countdowns on quorum queues).
__all__ = [
    "_known_host",
    "test_a_step_that_keeps_killing_its_worker_fails_the_job",
    "test_a_worker_killed_whole_mid_push_is_taken_over_by_the_next_start",
    "test_duplicate_deliveries_run_each_step_once",
    "test_registry_outage_fails_jobs_then_an_operator_retry_succeeds",
    "test_worker_killed_mid_push_finishes_the_job_once",
]


@pytest.fixture(scope="module")
def e2e(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    """The session's ``e2e``, but the worker and this process use the stack's RabbitMQ."""
    url = stack.amqp_url
    if not url:
        pytest.fail(f"the stack has no RabbitMQ: {INSTALL_HINT}, then scripts/stack up")
    _delete_queues(url)
    workdir = tmp_path_factory.mktemp("e2e-amqp")
    # Flow control on, as in production, in its own Redis database.
    env = e2e_env(
        stack, workdir, url, PUSHWORKER_FLOW_REDIS_URL=f"{stack.redis_url}/{BROKER_DB + 1}"
    )
    dispatcher = BrokerDispatcher(url)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        get_settings.cache_clear()
        set_dispatcher(dispatcher)
        try:
            with running_e2e(stack, workdir, env) as e2e:
                yield e2e
        finally:
            set_dispatcher(None)
            dispatcher.close()
    get_settings.cache_clear()


def _delete_queues(url: str) -> None:
    """Start from empty queues: what an earlier run left must not reach this run's worker."""
    app = broker_app(url)
    try:
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            for name in QUEUES:
                channel.queue_delete(name)  # deleting a queue that is not there is no error
    finally:
        app.close()


def test_the_worker_declares_quorum_queues_and_never_logs_the_password(e2e: E2E) -> None:
    """The queues are quorum queues (a classic declaration of the same name is refused), and
    neither the worker's log nor the event log holds the vhost user's password."""
    job_id = enqueue_push(source_image=new_image(e2e.api), registry_id=HARBOR_ID,
                          repository=f"amqp/app-{uuid.uuid4().hex[:8]}", tag="v1",
                          requested_by="amqp")  # fmt: skip
    assert wait_for_job(job_id).status == "succeeded"
    with amqp.Connection(**_connection_args(e2e.broker_url)) as connection:
        channel = connection.channel()
        with pytest.raises(amqp.exceptions.PreconditionFailed, match="x-queue-type"):
            channel.queue_declare(QUEUE, durable=True, auto_delete=False)
    password = e2e.broker_url.split("@")[0].rsplit(":", 1)[1]
    assert password not in e2e.worker.log_text()
    with session_scope() as session:
        payloads = [json.dumps(event.payload) for event in session.query(Event)]
    assert not [payload for payload in payloads if password in payload]


def wait_for_status(job_id: str) -> str:
    with session_scope() as session:
        job = session.get(PushJob, job_id)
        assert job is not None
        return job.status


def _connection_args(url: str) -> dict[str, str]:
    """What py-amqp's own Connection takes, from the broker URL (kombu parses it)."""
    parsed = kombu.Connection(url)
    return {
        "host": f"{parsed.hostname}:{parsed.port}",
        "userid": str(parsed.userid),
        "password": str(parsed.password),
        "virtual_host": str(parsed.virtual_host),
    }


def test_a_worker_killed_whole_is_redelivered_to_a_running_worker_at_once(e2e: E2E) -> None:
    """SIGKILL of a whole worker (main process and pool) mid-push: RabbitMQ sees the connection
    drop and hands the unacknowledged push to the other worker on the queue, with no restart and
    no take-over; the job succeeds once. Prints how long the redelivery took."""
    image = new_image(e2e.api, size=96 * MiB)
    workers = [start_worker(e2e, f"redelivery-{n}") for n in (1, 2)]  # both on the host's queue
    repository = f"redelivery/app-{uuid.uuid4().hex[:8]}"
    try:
        job_id = enqueue_push(source_image=image, registry_id=HARBOR_ID, repository=repository,
                              tag="1.0", requested_by="redelivery", docker_host=HOST)  # fmt: skip
        pid = parse_owner(running_push_claim(job_id).owner)[2]
        pushing = next((worker for worker in workers if pid in worker.pids()), None)
        assert pushing is not None, f"the claim's process {pid} is neither worker's"
        killed = time.monotonic()
        os.killpg(pushing.pid, signal.SIGKILL)
        pushing.wait_exit(timeout=30)
        assert wait_for_status(job_id) == JobStatus.RUNNING, "the kill came after the push"
        while ("step.started", "push", 2) not in events_of(job_id):
            assert time.monotonic() - killed < 120, "the push was never redelivered"
            time.sleep(0.01)
        redelivered = time.monotonic() - killed
        finished = wait_for_job(job_id, timeout=120)
    finally:
        for worker in workers:
            if not worker.exited():
                worker.stop()
    print(f"\nredelivery after a whole worker was killed (RabbitMQ): {redelivered:.2f} s")
    assert finished.status == JobStatus.SUCCEEDED, finished.error_message
    types = [kind for kind, _, _ in events_of(job_id)]
    assert "job.republished" not in types, "the broker redelivered: nothing had to take over"
    assert_each_step_completed_once(job_id)


# --- the broker restarts --------------------------------------------------------------------------


class OwnRabbit:
    """A rabbitmq-server of this test's own (not the stack's shared node), killed with SIGKILL and
    started again on the same port and data."""

    def __init__(self, base: Path) -> None:
        name = f"pwtest-{uuid.uuid4().hex[:8]}"
        self.node = RabbitNode(base, name, free_port(), free_port())
        self.log = base.parent / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        # guest may connect from loopback only, which is all this node listens on.
        return f"amqp://guest:guest@127.0.0.1:{self.node.port}//"

    def start(self) -> None:
        try:
            process = self.process = self.node.start(self.log)
            self.node.wait_ready(lambda: process.poll() is None)
        except RabbitError as error:
            self.kill()
            pytest.fail(f"{error} (log {self.log})", pytrace=False)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while amqp_answers(self.node.port):  # the VM is the shell's child: wait for it too
            assert time.monotonic() < deadline, "the killed node still answers"
            time.sleep(0.1)


@pytest.fixture
def own_rabbit(tmp_path: Path) -> Iterator[OwnRabbit]:
    server = OwnRabbit(tmp_path / "rabbit")
    server.start()
    yield server
    server.kill()


def test_broker_restart_loses_no_job(e2e: E2E, own_rabbit: OwnRabbit) -> None:
    """RabbitMQ killed (SIGKILL) and started again while jobs are queued and running: quorum
    queues keep what was published, the worker reconnects, reconcile (beat's task) republishes
    whatever did not make it, and every job reaches succeeded exactly once."""
    images = [new_image(e2e.api, size=24 * MiB) for _ in range(6)]
    repository = f"restart/amqp-{uuid.uuid4().hex[:8]}"
    job_ids = []
    with session_scope() as session:
        for i, image in enumerate(images):
            job, _ = create_job(session, PushRequest(image, HARBOR_ID, repository, f"v{i}", "f"),
                                actor="test")  # fmt: skip
            job_ids.append(job.id)
    env = {**e2e.env, "PUSHWORKER_BROKER_URL": own_rabbit.url}
    with CeleryProcess(env, e2e.workdir / "amqp-restart-worker.log", concurrency=2):
        for job_id in job_ids:
            publish_via(own_rabbit.url, job_id, HARBOR_ID)
        deadline = time.monotonic() + 60
        while JobStatus.RUNNING.value not in _statuses(job_ids):
            assert time.monotonic() < deadline, "no job started"
            time.sleep(0.05)
        own_rabbit.kill()
        assert JobStatus.QUEUED.value in _statuses(job_ids), "a job was queued at the kill"
        own_rabbit.start()

        def republish(job_id: str, registry_id: int) -> bool:
            publish_via(own_rabbit.url, job_id, registry_id)
            return True

        deadline = time.monotonic() + 300
        while not all(JobStatus(s).is_final for s in _statuses(job_ids)):
            assert time.monotonic() < deadline, f"jobs not final: {_statuses(job_ids)}"
            # Beat's reconcile, with a grace long enough that it republishes only what the
            # broker really lost (the figure printed below).
            reconcile(grace=60, publish=republish)
            time.sleep(1)
    with session_scope() as session:
        republished = sum(
            1
            for job_id in job_ids
            for event in select_events(session, job_id=job_id)
            if event.type == "job.republished"
        )
    print(f"\nbroker restart (RabbitMQ): {republished} republished of {len(job_ids)} jobs")
    for job_id in job_ids:
        job = wait_for_job(job_id, timeout=5)
        assert job.status == "succeeded", job.error_message
        assert_each_step_completed_once(job_id)


def _statuses(job_ids: list[str]) -> list[str]:
    with session_scope() as session:
        return [session.get(PushJob, job_id).status for job_id in job_ids]  # type: ignore[union-attr]


# --- poison messages ------------------------------------------------------------------------------


def _as_amqp(raw: Raw) -> amqp.Message | None:
    """The Redis corpus item as an AMQP message: kombu's envelope becomes the message's own body,
    content type, encoding and headers; an item that is no envelope (which Redis cannot even
    parse) is sent as a bare body with no properties. None for what AMQP cannot carry (headers
    that are not a table, a content type that is not text)."""
    try:
        item = json.loads(raw.item)
        body = base64.b64decode(item["body"])
        head, content_type, encoding = (
            item["headers"],
            item["content-type"],
            item["content-encoding"],
        )
    except Exception:
        return amqp.Message(raw.item)
    if head is not None and not isinstance(head, dict):
        return None
    if not all(isinstance(v, str | None) for v in (content_type, encoding)):
        return None
    properties = {"content_type": content_type, "content_encoding": encoding}
    return amqp.Message(
        body, application_headers=head or None,
        **{key: value for key, value in properties.items() if value is not None},
    )  # fmt: skip


@settings(
    max_examples=1,
    phases=[Phase.generate],
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(corpus=CORPUS)
def test_the_worker_survives_poison_messages(e2e: E2E, corpus: list[Raw]) -> None:
    """The poison corpus of test_poison_messages, published straight to the quorum queue: the
    same worker process answers ping afterwards, the queue is empty, every message is recorded as
    rejected once (acknowledged, never requeued), no log line holds the planted secret, and a
    normal push then succeeds."""
    assert e2e.worker.process is not None
    pid = e2e.worker.process.pid
    messages = [m for m in (_as_amqp(raw) for raw in corpus if _recordable(raw)) if m is not None]
    # A misspelled task name with a secret (Celery would log the whole body), and a pickle.
    for name, body, content_type in [
        ("pushworker.sumbit", json.dumps([[{"password": SECRET}], {}, {}]), "application/json"),
        (SUBMIT_TASK, f"(dp0\nS'{SECRET}'\n.", "application/x-python-serialize"),
    ]:
        messages.append(amqp.Message(body.encode(), content_type=content_type,
                                     content_encoding="utf-8",
                                     application_headers=task_headers(name)))  # fmt: skip
    before = rejections()
    sent = 0
    with amqp.Connection(**_connection_args(e2e.broker_url), confirm_publish=True) as connection:
        channel = connection.channel()
        for message in messages:
            try:
                channel.basic_publish(message, exchange="", routing_key=QUEUE)
            except RecursionError:  # headers nested too deep for the AMQP client to encode
                channel = connection.channel()
                continue
            sent += 1
        expected = before + sent
        deadline = time.monotonic() + 180
        while True:
            ready = channel.queue_declare(QUEUE, passive=True).message_count
            if ready == 0 and rejections() >= expected:
                break
            assert time.monotonic() < deadline, f"{ready} ready, {rejections()} of {expected}"
            time.sleep(0.5)
    assert rejections() == expected, "each message is recorded exactly once"
    assert sent > 250, f"only {sent} messages could be sent"
    assert e2e.worker.process.poll() is None and e2e.worker.process.pid == pid
    probe = Celery(broker=e2e.broker_url)
    try:
        assert probe.control.ping(destination=[e2e.worker.node], timeout=5.0)
    finally:
        probe.close()
    log = e2e.worker.log_text()
    assert SECRET not in log
    assert "Unrecoverable error" not in log
    job_id = enqueue_push(source_image=new_image(e2e.api), registry_id=HARBOR_ID,
                          repository=f"poison/amqp-{uuid.uuid4().hex[:8]}", tag="v1",
                          requested_by="poison")  # fmt: skip
    assert wait_for_job(job_id).status == "succeeded"
