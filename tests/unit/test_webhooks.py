"""Webhooks with a fake receiver seam, over SQLite and, where locking matters, PostgreSQL (and,
for the seam itself, a real HTTP server on loopback): subscriptions and the SSRF rule, the
cursor, planning once (also with planners at once), retries, dead deliveries, one
``webhook-id`` per delivery, a job's order, one attempt at a time per subscription, a dead
worker's attempt sent again."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import select, update
from standardwebhooks import Webhook

from worker import webhooks
from worker.core.credentials import Secret, decrypt_secret
from worker.core.errors import NotFound, ValidationError, WebhookUnreachable, WebhookURLRefused
from worker.core.settings import Settings, get_settings
from worker.seams.webhook_http import (
    HttpxSender,
    WebhookRequest,
    WebhookResult,
    checked_addresses,
    refusal_reason,
)
from worker.store import events
from worker.store.db import session_scope
from worker.store.models import (
    Event,
    WebhookAttempt,
    WebhookDelivery,
    WebhookSubscription,
    utcnow,
)

#: A public address given as a literal: nothing is resolved, nothing is sent (the seam is fake).
PUBLIC_URL = "https://93.184.216.34/hooks"
OPERATOR = "operator:test"


@dataclass
class FakeReceiver:
    """The seam's Protocol, answering from a script (last answer repeated)."""

    answers: list[int]
    requests: list[WebhookRequest]

    def send(self, request: WebhookRequest) -> WebhookResult:
        self.requests.append(request)
        status = self.answers[min(len(self.requests) - 1, len(self.answers) - 1)]
        if 200 <= status < 300:
            return WebhookResult(status, 1.5)
        return WebhookResult(status, 2.5, WebhookUnreachable(f"the receiver answered {status}"))


def receiver(*answers: int) -> FakeReceiver:
    return FakeReceiver(list(answers), [])


def settings(**changes: Any) -> Settings:
    return replace(get_settings(), **changes)


def subscribe(types: tuple[str, ...] = ("job.succeeded", "job.failed"), **options: Any) -> int:
    with session_scope() as session:
        subscription, _secret = webhooks.add_subscription(
            session, PUBLIC_URL, types, actor=OPERATOR, **options
        )
        return subscription.id


def append(type: str, job_id: str | None = None, **fields: Any) -> int:
    job_id = job_id or str(uuid.uuid4())
    with session_scope() as session:
        return events.append(
            session, stream=events.job_stream(job_id), type=type, actor="worker:test",
            job_id=job_id, **fields,
        ).id  # fmt: skip


def deliveries() -> list[WebhookDelivery]:
    with session_scope() as session:
        rows = list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))
        session.expunge_all()
        return rows


def make_due() -> None:
    """As if the retry delay (or a dead worker's lease) had passed."""
    with session_scope() as session:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.status == "pending")
            .values(next_attempt_at=utcnow() - timedelta(seconds=1))
        )


# --- subscriptions and the SSRF rule --------------------------------------------------------------


def test_add_shows_the_secret_once_and_keeps_it_only_encrypted(sqlite_url: str) -> None:
    with session_scope() as session:
        subscription, secret = webhooks.add_subscription(
            session, PUBLIC_URL, ["job.succeeded"], actor=OPERATOR
        )
        stored = subscription.secret
        shown = webhooks.subscription_fields(subscription)
    assert secret.startswith("whsec_")
    Webhook(secret)  # the library takes it as it is
    assert secret not in stored and decrypt_secret(stored, "test").reveal() == secret
    assert "secret" not in shown and secret not in json.dumps(shown)
    with session_scope() as session:
        logged = json.dumps([e.payload for e in session.scalars(select(Event))])
    assert "webhook.added" not in logged  # the type is a column, the payload describes
    assert secret not in logged and stored not in logged
    assert "/hooks" not in logged, "the URL's path (which may hold a token) is not recorded"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:8080/h", "loopback"),
        ("http://[::1]/h", "loopback"),
        ("http://localhost/h", "loopback"),
        ("http://10.1.2.3/h", "private"),
        ("http://192.168.0.5/h", "private"),
        ("http://169.254.169.254/latest/meta-data", "metadata"),
        ("http://[fe80::1]/h", "link-local"),
        ("http://[::ffff:127.0.0.1]/h", "loopback"),
        ("http://0.0.0.0/h", "private"),
        ("http://100.64.0.1/h", "not a public"),
    ],
)
def test_urls_to_non_public_addresses_are_refused_unless_allowed(
    sqlite_url: str, url: str, reason: str
) -> None:
    with pytest.raises(WebhookURLRefused, match=reason), session_scope() as session:
        webhooks.add_subscription(session, url, ["job.succeeded"], actor=OPERATOR)
    with session_scope() as session:
        webhooks.add_subscription(
            session, url, ["job.succeeded"], actor=OPERATOR, allow_private=True
        )


@pytest.mark.parametrize(
    "url",
    ["ftp://93.184.216.34/h", "https://user:pw@93.184.216.34/h", "https:///h", "http://a b/",
     "http://93.184.216.34:0/h", "https://93.184.216.34/\x1b[2J"],
)  # fmt: skip
def test_malformed_urls_are_refused(sqlite_url: str, url: str) -> None:
    with pytest.raises(WebhookURLRefused), session_scope() as session:
        webhooks.add_subscription(session, url, ["job.succeeded"], actor=OPERATOR)


@pytest.mark.parametrize("types", [[], ["Job.Succeeded"], ["webhook.added"], ["job succeeded"]])
def test_event_types_are_checked(sqlite_url: str, types: list[str]) -> None:
    with pytest.raises(ValidationError), session_scope() as session:
        webhooks.add_subscription(session, PUBLIC_URL, types, actor=OPERATOR)


def test_refusal_reasons_of_addresses() -> None:
    import ipaddress

    assert refusal_reason(ipaddress.ip_address("93.184.216.34")) is None
    assert refusal_reason(ipaddress.ip_address("2606:4700::1111")) is None
    assert refusal_reason(ipaddress.ip_address("fd00:ec2::254")) == "a cloud metadata address"
    assert refusal_reason(ipaddress.ip_address("224.0.0.1")) is not None


# --- planning from the event log ----------------------------------------------------------------


def test_each_matching_event_is_planned_once_and_the_cursor_moves_past_every_event(
    database_url: str,
) -> None:
    before = append("job.succeeded")  # before the subscription: not delivered
    subscription_id = subscribe()
    job = str(uuid.uuid4())
    append("job.enqueued", job)
    succeeded = append("job.succeeded", job)
    failed = append("job.failed")
    assert webhooks.plan() == 2
    assert webhooks.plan() == 0, "planning again plans nothing"
    rows = deliveries()
    assert [r.event_id for r in rows] == [succeeded, failed]
    assert rows[0].job_id == job and before not in [r.event_id for r in rows]
    assert len({r.message_id for r in rows}) == 2
    with session_scope() as session:
        subscription = session.get(WebhookSubscription, subscription_id)
        assert subscription is not None and subscription.cursor == failed


def test_registry_and_only_failures_filter(sqlite_url: str) -> None:
    subscribe(registry_id=None, only_failures=True)
    append("job.succeeded", registry_id=5)
    failed = append("job.failed", registry_id=5)
    webhooks.plan()
    assert [r.event_id for r in deliveries()] == [failed]


def test_a_removed_subscription_plans_and_sends_nothing(sqlite_url: str) -> None:
    subscription_id = subscribe()
    append("job.succeeded")
    webhooks.plan()
    with session_scope() as session:
        webhooks.remove_subscription(session, subscription_id, actor=OPERATOR)
    append("job.succeeded")
    fake = receiver(200)
    report = webhooks.run(fake, budget=5)
    assert report.planned == 0 and fake.requests == []
    with pytest.raises(NotFound), session_scope() as session:
        webhooks.remove_subscription(session, subscription_id, actor=OPERATOR)


# --- delivering, retries, dead --------------------------------------------------------------------


def test_a_delivery_keeps_its_webhook_id_and_records_every_attempt(database_url: str) -> None:
    subscribe()
    event_id = append("job.succeeded")
    fake = receiver(500, 200)
    first = webhooks.run(fake, budget=5)
    assert (first.delivered, first.failed) == (0, 1)
    [pending] = deliveries()
    assert pending.status == "pending" and pending.next_attempt_at is not None
    assert pending.next_attempt_at > pending.created_at, "it waits before the next attempt"
    make_due()
    second = webhooks.deliver_due(fake, budget=5)
    assert second.delivered == 1
    assert [r.message_id for r in fake.requests] == [pending.message_id] * 2
    body = json.loads(fake.requests[0].body)
    assert body["type"] == "job.succeeded" and body["data"]["id"] == event_id
    with session_scope() as session:
        tries = webhooks.attempts_of(session, pending.id)
        assert [(t.attempt, t.status_code) for t in tries] == [(1, 500), (2, 200)]
        assert all(t.latency_ms is not None and t.finished_at is not None for t in tries)
        assert tries[0].error is not None and tries[1].error is None
    [done] = deliveries()
    assert (done.status, done.attempts, done.last_status_code) == ("delivered", 2, 200)


def test_a_delivery_failing_past_its_retry_window_is_dead_and_can_be_redelivered(
    database_url: str,
) -> None:
    subscribe()
    append("job.failed")
    webhooks.plan()
    report = webhooks.deliver_due(receiver(503), budget=5, settings=settings(webhook_retry_for=0))
    assert report.dead == 1
    [dead] = deliveries()
    assert dead.status == "dead" and dead.next_attempt_at is None
    with session_scope() as session:
        assert webhooks.list_deliveries(session, status="dead")[0].id == dead.id
        webhooks.redeliver(session, dead.id, actor=OPERATOR)
    fake = receiver(200)
    assert webhooks.deliver_due(fake, budget=5).delivered == 1
    assert fake.requests[0].message_id == dead.message_id
    with pytest.raises(NotFound), session_scope() as session:
        webhooks.redeliver(session, 999, actor=OPERATOR)


def test_backoff_doubles_up_to_its_cap() -> None:
    chosen = settings(webhook_retry_base=10.0, webhook_retry_max=60.0)
    assert [webhooks.backoff(n, chosen) for n in range(1, 6)] == [10, 20, 40, 60, 60]
    assert webhooks.backoff(10_000, chosen) == 60


def test_a_jobs_deliveries_go_out_in_event_order(database_url: str) -> None:
    subscribe(("job.enqueued", "job.succeeded"))
    job, other = str(uuid.uuid4()), str(uuid.uuid4())
    append("job.enqueued", job)
    append("job.enqueued", other)
    append("job.succeeded", job)
    fake = receiver(500, 200, 200, 200)
    webhooks.run(fake, budget=5)
    # The first failed; the other job's went out; this job's second waits for its first.
    sent = [json.loads(r.body)["data"]["job_id"] for r in fake.requests]
    assert sent == [job, other]
    make_due()
    webhooks.deliver_due(fake, budget=5)
    sent_types = [
        (json.loads(r.body)["data"]["job_id"], json.loads(r.body)["type"]) for r in fake.requests
    ]
    assert sent_types[2:] == [(job, "job.enqueued"), (job, "job.succeeded")]


def test_an_attempt_whose_worker_died_is_sent_again_with_the_same_id(database_url: str) -> None:
    subscribe()
    append("job.succeeded")
    webhooks.plan()
    chosen = get_settings()
    with session_scope() as session:
        [delivery_id] = webhooks.due_delivery_ids(session, utcnow())
        taken = webhooks.take(session, delivery_id, chosen)
    assert taken is not None  # ... and the worker dies here, before it records anything
    with session_scope() as session:
        assert webhooks.due_delivery_ids(session, utcnow()) == [], "its lease holds"
    make_due()  # the lease ran out
    fake = receiver(200)
    assert webhooks.deliver_due(fake, budget=5).delivered == 1
    assert fake.requests[0].message_id == taken.request.message_id
    with session_scope() as session:
        tries = webhooks.attempts_of(session, delivery_id)
        assert [(t.attempt, t.status_code) for t in tries] == [(1, None), (2, 200)]
        assert session.scalars(select(WebhookAttempt)).all()


# --- the seam, against a real HTTP server on loopback --------------------------------------------


@pytest.fixture
def http_server() -> Iterator[tuple[str, list[dict[str, Any]], list[int]]]:
    got: list[dict[str, Any]] = []
    answers = [200]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"])).decode()
            got.append({"body": body, "headers": dict(self.headers.items())})
            self.send_response(answers[0])
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/in?x=1", got, answers
    server.shutdown()
    server.server_close()


def _request(url: str, secret: str, *, allow_private: bool = True) -> WebhookRequest:
    return WebhookRequest(
        url=url, message_id="msg_1", body='{"type":"job.succeeded"}', secret=Secret(secret),
        allow_private=allow_private, timeout=5,
    )  # fmt: skip


def test_the_seam_signs_so_that_the_librarys_verifier_accepts(
    http_server: tuple[str, list[dict[str, Any]], list[int]],
) -> None:
    url, got, answers = http_server
    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    result = HttpxSender().send(_request(url, secret))
    assert result.ok and result.status_code == 200 and result.latency_ms > 0
    [seen] = got
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["webhook-id"] == "msg_1"
    assert Webhook(secret).verify(seen["body"], headers) == {"type": "job.succeeded"}
    assert headers["host"].startswith("127.0.0.1:")
    answers[0] = 500
    failed = HttpxSender().send(_request(url, secret))
    assert failed.status_code == 500 and isinstance(failed.error, WebhookUnreachable)


def test_the_seam_refuses_loopback_unless_allowed_and_reports_no_listener(
    http_server: tuple[str, list[dict[str, Any]], list[int]],
) -> None:
    url, got, _ = http_server
    refused = HttpxSender().send(_request(url, "whsec_MfKQ9r8G", allow_private=False))
    assert isinstance(refused.error, WebhookURLRefused) and refused.status_code is None
    assert got == [], "nothing was sent"
    port = int(url.split(":")[2].split("/")[0])
    with pytest.raises(WebhookURLRefused):
        checked_addresses(f"http://127.0.0.1:{port}/", allow_private=False)
    closed = HttpxSender().send(_request("http://127.0.0.1:1/", "whsec_MfKQ9r8G"))
    assert isinstance(closed.error, WebhookUnreachable) and closed.status_code is None


def test_one_attempt_at_a_time_per_subscription(database_url: str) -> None:
    """A receiver that hangs holds one slot: while an attempt to it is under way, its other
    deliveries wait, and another subscription's go on."""
    subscribe(("job.succeeded",))
    append("job.succeeded")
    append("job.succeeded")
    with session_scope() as session:
        other, _ = webhooks.add_subscription(
            session, "https://93.184.216.35/h", ["job.failed"], actor=OPERATOR
        )
    append("job.failed")
    webhooks.plan()
    with session_scope() as session:
        first, second, third = webhooks.due_delivery_ids(session, utcnow())
        taken = webhooks.take(session, first, get_settings())
    assert taken is not None
    with session_scope() as session:
        assert webhooks.due_delivery_ids(session, utcnow()) == [third]
        assert webhooks.take(session, second, get_settings()) is None
    [sent] = webhooks.deliver_due(receiver(200), budget=5).statuses
    assert sent == "delivered" and deliveries()[2].subscription_id == other.id


def test_planners_running_at_once_plan_each_event_exactly_once(database_url: str) -> None:
    """Several planners (beat's runs overlap when the webhook worker is busy) over the same
    subscriptions: every event planned once, none skipped."""
    subscribe()
    subscribe(("job.failed",))
    expected = [append("job.failed") for _ in range(40)]
    errors: list[BaseException] = []

    def planner() -> None:
        try:
            webhooks.plan()
        except BaseException as exc:  # collected: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=planner) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    rows = deliveries()
    assert sorted((r.subscription_id, r.event_id) for r in rows) == sorted(
        (subscription_id, event_id) for subscription_id in (1, 2) for event_id in expected
    )


def test_the_wanted_event_types_are_those_of_live_subscriptions(sqlite_url: str) -> None:
    """What a worker kicks a run for (tasks.webhooks), read again after ``WANTED_TTL``."""
    first = subscribe(("job.succeeded", "job.failed"))
    subscribe(("registry.health",))
    start = 1e9  # far from any earlier read of this process
    assert webhooks.wanted_types(now=start) == {"job.succeeded", "job.failed", "registry.health"}
    with session_scope() as session:
        webhooks.remove_subscription(session, first, actor=OPERATOR)
    assert "job.failed" in webhooks.wanted_types(now=start + 1), "kept until the TTL passes"
    later = start + webhooks.WANTED_TTL + 1
    assert webhooks.wanted_types(now=later) == {"registry.health"}


# --- pushctl webhooks -----------------------------------------------------------------------------


def test_pushctl_webhooks_shows_the_secret_once_and_every_attempt(sqlite_url: str) -> None:
    from click.testing import CliRunner

    from worker.cli import cli

    def run(*args: str, code: int = 0) -> str:
        result = CliRunner().invoke(cli, ["webhooks", *args])
        assert result.exit_code == code, result.output
        return result.output

    added = run("add", PUBLIC_URL, "--events", "job.succeeded")
    [secret] = [line.split(": ", 1)[1] for line in added.splitlines() if line.startswith("secret:")]
    assert secret.startswith("whsec_")
    assert secret not in run("list") and secret not in run("list", "--json")
    refused = run("add", "http://127.0.0.1:9/h", "--events", "job.succeeded", code=2)
    assert "loopback" in refused
    append("job.succeeded")
    webhooks.run(receiver(500), budget=5)
    make_due()
    webhooks.deliver_due(receiver(200), budget=5)
    shown = run("deliveries", "--attempts")
    assert "delivered" in shown and "500" in shown and "200" in shown
    assert "delivered" in run("deliveries", "--status", "delivered")
    assert run("deliveries", "--status", "dead").count("delivered") == 0
    [delivery] = deliveries()
    assert delivery.message_id in run("redeliver", str(delivery.id))
    assert "does not exist" in run("redeliver", "999", code=3)
    run("remove", "1")
    assert secret not in run("deliveries", "--json")


def test_two_workers_taking_one_subscriptions_deliveries_at_once_take_one(
    database_url: str,
) -> None:
    """The second taker waits for the first one's transaction (the subscription's row lock on
    PostgreSQL, the write lock on SQLite), then sees its attempt under way and takes nothing."""
    subscribe(("job.succeeded",))
    append("job.succeeded")
    append("job.succeeded")
    webhooks.plan()
    with session_scope() as session:
        first, second = webhooks.due_delivery_ids(session, utcnow())
    holding, release = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def taker_a() -> None:
        with session_scope() as session:
            results["a"] = webhooks.take(session, first, get_settings())
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=taker_a)
    thread.start()
    holding.wait(10)
    timer = threading.Timer(0.3, release.set)  # lets the second taker reach the lock first
    timer.start()
    with session_scope() as session:
        results["b"] = webhooks.take(session, second, get_settings())
    thread.join()
    assert results["a"] is not None and results["b"] is None


def test_the_seam_tries_each_checked_address_while_none_accepts(
    http_server: tuple[str, list[dict[str, Any]], list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name resolving to ::1 first, where nothing listens, and then to 127.0.0.1: delivered,
    with the name in ``Host``."""
    import ipaddress

    from worker.seams import webhook_http

    url, got, _ = http_server
    port = int(url.split(":")[2].split("/")[0])
    answers = [ipaddress.ip_address("::1"), ipaddress.ip_address("127.0.0.1")]
    monkeypatch.setattr(webhook_http, "resolve", lambda host, port: answers)
    result = HttpxSender().send(_request(f"http://receiver.test:{port}/in", "whsec_MfKQ9r8G"))
    assert result.ok, result
    assert got[0]["headers"]["host"] == f"receiver.test:{port}"
