"""Poison messages on the real stack: whatever lands on the worker's queue, the same worker process
goes on, every message is acknowledged and recorded as rejected, no message body reaches the log,
and a normal push still succeeds afterwards.

Messages are written straight to Redis (kombu's envelope built by hand, as ``apply_async`` writes
it, and plain garbage) and through kombu's Producer with content types the worker refuses.
"""

from __future__ import annotations

import base64
import json
import pickle
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kombu import Connection, Exchange, Producer
from sqlalchemy import func, select

from harness.images import new_image
from tasks.consumer import TASK_ARGUMENTS
from tests.e2e.conftest import E2E, HARBOR_ID, wait_for_job
from worker.core.messages import MAX_BODY_BYTES, SUBMIT_TASK, Accepted
from worker.core.messages import check_message as guard_verdict
from worker.core.queues import step_task
from worker.engine.steps import STEP_NAMES
from worker.producer import enqueue_push
from worker.store.db import session_scope
from worker.store.models import Event

QUEUE = "pushworker"
SECRET = "pw-secret-" + uuid.uuid4().hex
REJECTIONS = ("message.rejected", "submission.rejected")
REQUEST = {
    "source_image": "app:build",
    "registry_id": HARBOR_ID,
    "repository": "poison/app",
    "tag": "v1",
    "requested_by": "poison",
    "idempotency_key": "poison",
}


@dataclass(frozen=True)
class Raw:
    """One item for the Redis list: a kombu envelope (or garbage), and the id it carries."""

    item: bytes
    message_id: str | None


def envelope(
    body: bytes,
    headers: Any,
    *,
    content_type: Any = "application/json",
    encoding: Any = "utf-8",
) -> Raw:
    """A message as kombu's Redis transport stores it (the shape ``apply_async`` writes)."""
    message_id = headers.get("id") if isinstance(headers, dict) else None
    item = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": encoding,
        "content-type": content_type,
        "headers": headers,
        "properties": {
            "correlation_id": str(message_id),
            "delivery_mode": 2,
            "priority": 0,
            "delivery_info": {"exchange": "", "routing_key": QUEUE},
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return Raw(json.dumps(item).encode(), message_id if isinstance(message_id, str) else None)


def headers(task: Any, **extra: Any) -> dict[str, Any]:
    message_id = str(uuid.uuid4())
    return {
        "lang": "py",
        "task": task,
        "id": message_id,
        "root_id": message_id,
        "retries": 0,
        "timelimit": [None, None],
        "argsrepr": "",
        "kwargsrepr": "{}",
        **extra,
    }


def nested(depth: int, leaf: Any = 1) -> str:
    return "[" * depth + json.dumps(leaf) + "]" * depth


def json_body(value: Any) -> bytes:
    return json.dumps(value).encode()


# --- the corpus -----------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)
TASK_NAMES = (
    st.sampled_from([*TASK_ARGUMENTS])
    | st.text(max_size=60)
    | st.sampled_from(["pushworker.sumbit", "celery.ping", "pushworker.step.pussh", ""])
)
CONTENT = st.sampled_from(
    [
        ("application/json", "utf-8"),
        ("application/json", "binary"),
        ("application/x-yaml", "utf-8"),
        ("application/x-python-serialize", "binary"),
        ("text/plain", "utf-8"),
        (None, None),
        ("application/json", "latin-1"),
        (7, "utf-8"),
    ]
)


@st.composite
def deep_submit(draw: st.DrawFn) -> Raw:
    """The incident: a valid request whose fallback nests 900 to 10000 deep."""
    depth = draw(st.integers(900, 10_000))
    body = f'[[{json.dumps(REQUEST)[:-1]}, "fallback": {nested(depth)}}}], {{}}, {{}}]'
    return envelope(body.encode(), headers(SUBMIT_TASK))


@st.composite
def deep_anywhere(draw: st.DrawFn) -> Raw:
    depth = draw(st.integers(33, 10_000))
    where = draw(st.sampled_from(["body", "args", "kwargs", "embed", "stamps"]))
    deep = nested(depth)
    if where == "stamps":
        head = headers(draw(TASK_NAMES), stamps=json.loads(nested(min(depth, 500))))
        return envelope(b"[[], {}, {}]", head)
    body = {
        "body": deep,
        "args": f"[{deep}], {{}}, {{}}",
        "kwargs": f'[], {{"k": {deep}}}, {{}}',
        "embed": f'[], {{}}, {{"chain": {deep}}}',
    }[where]
    text = body if where == "body" else f"[{body}]"
    return envelope(text.encode(), headers(draw(TASK_NAMES)))


@st.composite
def any_json_body(draw: st.DrawFn) -> Raw:
    """Any JSON value as the whole body, or as args/kwargs/embed, for any task name."""
    value = draw(JSON)
    shape = draw(st.sampled_from(["whole", "args", "call"]))
    if shape == "args":
        value = [value if isinstance(value, list) else [value], {}, {}]
    elif shape == "call":
        value = [
            draw(st.lists(JSON, max_size=3)),
            draw(st.dictionaries(st.text(max_size=8), JSON, max_size=3)),
            {},
        ]
    return envelope(json_body(value), headers(draw(TASK_NAMES), argsrepr=f"({SECRET!r},)"))


@st.composite
def wrong_args(draw: st.DrawFn) -> Raw:
    """Known task names with argument shapes they do not take (a secret among the values)."""
    task = draw(st.sampled_from([*map(step_task, STEP_NAMES), "pushworker.maintenance.reconcile"]))
    args = draw(st.lists(JSON | st.just(SECRET) | st.just(True) | st.just("5"), max_size=3))
    kwargs = draw(
        st.dictionaries(st.sampled_from(["password", "job_id"]), st.just(SECRET), max_size=1)
    )
    return envelope(json_body([args, kwargs, {}]), headers(task))


@st.composite
def odd_envelope(draw: st.DrawFn) -> Raw:
    """Odd content types and encodings, non-JSON bytes, missing or protocol-1 headers, bodies
    over the size limit, and headers of the wrong types."""
    kind = draw(st.sampled_from(["content", "bytes", "no_headers", "proto1", "big", "header"]))
    secret_call = json_body([[{**REQUEST, "password": SECRET}], {}, {}])
    if kind == "content":
        content_type, encoding = draw(CONTENT)
        body = pickle.dumps({"password": SECRET}) if encoding == "binary" else secret_call
        return envelope(body, headers(SUBMIT_TASK), content_type=content_type, encoding=encoding)
    if kind == "bytes":
        return envelope(draw(st.binary(min_size=1, max_size=200)), headers(draw(TASK_NAMES)))
    if kind == "no_headers":
        return envelope(secret_call, draw(st.none() | st.just({}) | JSON))
    if kind == "proto1":
        message = {
            "task": draw(TASK_NAMES),
            "id": str(uuid.uuid4()),
            "args": [SECRET],
            "kwargs": {},
        }
        return envelope(json_body(message), {})
    if kind == "big":
        size = draw(st.integers(MAX_BODY_BYTES + 1, 2 * MAX_BODY_BYTES))
        return envelope(json_body([["x" * size], {}, {}]), headers(SUBMIT_TASK))
    field, value = draw(
        st.sampled_from(
            [
                ("eta", "not a time"),
                ("expires", 12),
                ("retries", "many"),
                ("timelimit", "x"),
                ("timelimit", [1, 2, 3]),
                ("shadow", {"x": 1}),
                ("id", 5),
                ("compression", "gzip"),
            ]
        )
    )
    head = headers(SUBMIT_TASK)
    head[field] = value
    return envelope(json_body([[REQUEST], {}, {}]), head)


@st.composite
def broken_envelope(draw: st.DrawFn) -> Raw:
    """What kombu's Redis transport cannot even parse: garbage, JSON that is not an envelope."""
    item = draw(
        st.binary(min_size=1, max_size=100)
        | JSON.map(json_body)
        | st.just(
            b'{"body": "@@not base64@@", "properties": {"delivery_tag": "t",'
            b' "body_encoding": "base64"}, "headers": {}}'
        )
        | st.just(nested(5000).encode())
    )
    return Raw(item, None)


CORPUS = st.tuples(
    st.lists(deep_submit(), min_size=20, max_size=20),
    st.lists(deep_anywhere(), min_size=40, max_size=40),
    st.lists(any_json_body(), min_size=80, max_size=80),
    st.lists(wrong_args(), min_size=40, max_size=40),
    st.lists(odd_envelope(), min_size=60, max_size=60),
    st.lists(broken_envelope(), min_size=30, max_size=30),
).map(lambda parts: [raw for part in parts for raw in part])
#: Messages in the corpus (the sum of the sizes above), plus the fixed cases below.
CORPUS_SIZE = 270


def _recordable(raw: Raw) -> bool:
    """Everything but what the guard accepts for a task other than submit (a real step or
    reconcile call, not poison): such draws are left out of the corpus."""
    try:
        item = json.loads(raw.item)
        verdict = guard_verdict(
            tasks=TASK_ARGUMENTS,
            headers=item["headers"],
            properties=item["properties"],
            content_type=item["content-type"],
            content_encoding=item["content-encoding"],
            body=base64.b64decode(item["body"]),
        )
    except Exception:  # not an envelope: kombu cannot read it either
        return True
    return not isinstance(verdict, Accepted) or verdict.task_name == SUBMIT_TASK


# --- the test -------------------------------------------------------------------------------------


def rejections() -> int:
    with session_scope() as session:
        query = select(func.count()).select_from(Event).where(Event.type.in_(REJECTIONS))
        return int(session.scalar(query) or 0)


def rejected_streams() -> set[str]:
    with session_scope() as session:
        query = select(Event.stream).where(Event.type.in_(REJECTIONS))
        return set(session.scalars(query))


def publish_with_kombu(broker_url: str) -> list[str]:
    """Messages a kombu producer sends with content types the worker refuses; their ids."""
    ids = []
    with Connection(broker_url) as connection:
        producer = Producer(connection, exchange=Exchange(""), routing_key=QUEUE)
        for content_type, body in [
            ("application/x-python-serialize", pickle.dumps(([{"password": SECRET}], {}, {}))),
            ("application/x-yaml", f"[[{{password: {SECRET}}}], {{}}, {{}}]".encode()),
            ("application/data", SECRET.encode()),
        ]:
            head = headers(SUBMIT_TASK)
            producer.publish(
                body, content_type=content_type, content_encoding="binary", headers=head
            )
            ids.append(head["id"])
        # A misspelled task name with a password: Celery would log the whole body.
        app = Celery(broker=broker_url)
        app.conf.task_serializer = "json"
        sent = app.send_task(
            "pushworker.sumbit", args=[{**REQUEST, "password": SECRET}], queue=QUEUE
        )
        app.close()
        ids.append(sent.id)
    return ids


def unacked_count(client: redis.Redis) -> int:
    """Messages kombu's Redis transport holds as delivered and not yet acknowledged."""
    count = client.hlen("unacked")
    assert isinstance(count, int)
    return count


def wait_until_consumed(
    client: redis.Redis, expected: int, unacked: int, timeout: float = 120
) -> None:
    """Until the queue is empty, no more messages are unacknowledged than before the corpus
    (a worker killed whole by an earlier test leaves its message there for the visibility
    timeout), and every rejection is recorded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (
            client.llen(QUEUE) == 0
            and unacked_count(client) <= unacked
            and rejections() >= expected
        ):
            return
        time.sleep(0.5)
    raise AssertionError(
        f"not consumed within {timeout} s: {client.llen(QUEUE)} queued, "
        f"{client.hlen('unacked')} unacked, {rejections()} of {expected} rejections recorded"
    )


@settings(
    max_examples=1,
    phases=[Phase.generate],
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(corpus=CORPUS)
def test_the_worker_survives_a_generated_corpus_of_poison_messages(
    e2e: E2E, corpus: list[Raw]
) -> None:
    """270 generated poison messages (900-10000 deep nesting, any JSON, wrong task names and
    argument shapes, odd content types and encodings, non-JSON bytes, missing and protocol-1
    headers, oversized bodies, unparseable envelopes) plus 4 sent through kombu and Celery:
    the same worker process answers ping afterwards, the queue and Redis' unacked hash are
    empty, every message is recorded as rejected exactly once (under its own id where it has
    one), no worker log line holds the planted secret, and a normal push then succeeds."""
    assert e2e.worker.process is not None
    pid = e2e.worker.process.pid
    corpus = [raw for raw in corpus if _recordable(raw)]
    client = redis.Redis.from_url(e2e.broker_url)
    before = rejections()
    unacked = unacked_count(client)

    kombu_ids = publish_with_kombu(e2e.broker_url)
    for start in range(0, len(corpus), 50):  # LPUSH in batches: the worker reads as they land
        client.lpush(QUEUE, *(raw.item for raw in corpus[start : start + 50]))
    expected = before + len(corpus) + len(kombu_ids)
    wait_until_consumed(client, expected, unacked)

    assert rejections() == expected, "each message is recorded exactly once"
    streams = rejected_streams()
    ids = [raw.message_id for raw in corpus if raw.message_id] + kombu_ids
    unrecorded = [
        i for i in ids if f"messages/{i}" not in streams and f"submissions/{i}" not in streams
    ]
    assert not unrecorded, "every message with an id is recorded under it"

    assert e2e.worker.process.poll() is None and e2e.worker.process.pid == pid
    probe = Celery(broker=e2e.broker_url)
    try:
        assert probe.control.ping(destination=[e2e.worker.node], timeout=5.0)
    finally:
        probe.close()
    log = e2e.worker.log_text()
    assert SECRET not in log
    assert "Unrecoverable error" not in log

    job_id = enqueue_push(
        source_image=new_image(e2e.api),
        registry_id=HARBOR_ID,
        repository=f"poison/after-{uuid.uuid4().hex[:8]}",
        tag="v1",
        requested_by="poison",
    )
    assert wait_for_job(job_id).status == "succeeded"
