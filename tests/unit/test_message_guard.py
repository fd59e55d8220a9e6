"""The message guard (``worker.core.messages``): what the worker accepts from the broker, and that
it
answers every input with a verdict instead of an exception."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.consumer import TASK_ARGUMENTS
from worker.core.messages import (
    CONTENT_TYPE,
    MAX_BODY_BYTES,
    MAX_DEPTH,
    SUBMIT_TASK,
    Accepted,
    Refusal,
    check_message,
    nesting_depth,
    text_depth,
)
from worker.core.queues import step_task
from worker.engine.steps import STEP_NAMES

STEP_TASKS = tuple(step_task(name) for name in STEP_NAMES)
JOB = str(uuid.uuid4())
REQUEST = {
    "source_image": "app:build", "registry_id": 5, "repository": "team/app", "tag": "1",
    "requested_by": "ci", "idempotency_key": "k1",
}  # fmt: skip
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def headers(task: Any = SUBMIT_TASK, **extra: Any) -> dict[str, Any]:
    return {"lang": "py", "task": task, "id": str(uuid.uuid4()), "retries": 0,
            "timelimit": [None, None], **extra}  # fmt: skip


def verdict(
    body: Any = None,
    *,
    head: Any = None,
    content_type: Any = CONTENT_TYPE,
    encoding: Any = "utf-8",
    properties: Any = None,
) -> Accepted | Refusal:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return check_message(
        tasks=TASK_ARGUMENTS,
        headers=headers() if head is None else head,
        properties={"delivery_info": {"routing_key": "pushworker"}}
        if properties is None
        else properties,
        content_type=content_type,
        content_encoding=encoding,
        body=raw,
    )


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


ACCEPTED: list[tuple[str, dict[str, Any], Any]] = [
    ("a push request", headers(), [[REQUEST], {}, EMBED]),
    ("any object for submit (the contract checks it)", headers(), [[{"x": 1}], {}, {}]),
    ("a step", headers(STEP_TASKS[0]), [[JOB, 5], {}, EMBED]),
    (
        "a retried step with an eta",
        headers(STEP_TASKS[3], retries=2, eta="2030-01-01T00:00:00.123456+00:00"),
        [[JOB, 0], {}, EMBED],
    ),
    (
        "reconcile",
        headers("pushworker.maintenance.reconcile", expires="2030-01-01T00:00:00+00:00"),
        [[], {}, EMBED],
    ),
    ("health", headers("pushworker.health.check_registries"), [[], {}, {}]),
    (
        "a chain embedded",
        headers(STEP_TASKS[0]),
        [
            [JOB, 5],
            {},
            {
                "chain": [
                    {
                        "task": STEP_TASKS[1],
                        "args": [JOB, 5],
                        "kwargs": {},
                        "options": {"queue": "q"},
                        "subtask_type": None,
                        "immutable": True,
                    }
                ]
            },
        ],
    ),
    (f"nesting exactly {MAX_DEPTH}", headers(), [[{"fallback": nested(MAX_DEPTH - 3)}], {}, {}]),
]


@pytest.mark.parametrize(("case", "head", "body"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_well_formed_calls_are_accepted(case: str, head: dict[str, Any], body: Any) -> None:
    """Every kind of message this project's producers, chains, retries and beat send passes."""
    result = verdict(body, head=head)
    assert isinstance(result, Accepted), result
    assert result.task_name == head["task"]
    assert result.message_id == head["id"]
    assert (result.args, result.kwargs) == (body[0], body[1])


def _refused_cases() -> list[tuple[str, dict[str, Any], str]]:
    good = [[REQUEST], {}, EMBED]
    deep = nested(900)
    return [
        ("pickle", {"content_type": "application/x-python-serialize"}, "content_type"),
        ("yaml", {"content_type": "application/x-yaml"}, "content_type"),
        ("no content type", {"content_type": None}, "content_type"),
        ("binary encoding", {"encoding": "binary"}, "encoding"),
        ("no encoding", {"encoding": None}, "encoding"),
        ("protocol 1 (no task header)", {"head": {"id": "x"}}, "protocol"),
        ("headers not an object", {"head": ["task"]}, "protocol"),
        ("no headers", {"head": 0}, "protocol"),
        ("task name not text", {"head": headers(task=7)}, "headers"),
        ("no id", {"head": {"task": SUBMIT_TASK}}, "headers"),
        ("eta not a time", {"head": headers(eta="tomorrow")}, "headers"),
        ("expires a number", {"head": headers(expires=5)}, "headers"),
        ("retries a bool", {"head": headers(retries=True)}, "headers"),
        ("timelimit of one", {"head": headers(timelimit=[1])}, "headers"),
        ("shadow an object", {"head": headers(shadow={})}, "headers"),
        ("compressed", {"head": headers(compression="application/x-gzip")}, "compressed"),
        ("deep headers", {"head": headers(stamps=deep)}, "too_deep"),
        ("deep properties", {"properties": {"x": deep}}, "too_deep"),
        ("not UTF-8", {"body": b"\xff\xfe[[], {}, {}]"}, "not_json"),
        ("not JSON", {"body": b"[[], {}, {}"}, "not_json"),
        ("empty body", {"body": b""}, "not_json"),
        (
            "too large",
            {"body": json.dumps([["x" * MAX_BODY_BYTES], {}, {}]).encode()},
            "too_large",
        ),
        ("a JSON string", {"body": "hello"}, "shape"),
        ("a JSON null", {"body": None}, "shape"),
        ("two elements", {"body": [[], {}]}, "shape"),
        ("args an object", {"body": [{}, {}, {}]}, "shape"),
        ("kwargs a list", {"body": [[], [], {}]}, "shape"),
        ("embed null", {"body": [[], {}, None]}, "shape"),
        (
            "the incident's 900-deep fallback",
            {"body": [[{**REQUEST, "fallback": deep}], {}, {}]},
            "too_deep",
        ),
        ("10000 deep", {"body": b"[" * 10000 + b"]" * 10000}, "too_deep"),
        ("deep and unterminated", {"body": b"[" * 5000}, "too_deep"),
        ("unknown task", {"head": headers("pushworker.sumbit"), "body": good}, "unknown_task"),
        (
            "a Celery built-in",
            {"head": headers("celery.ping"), "body": [[], {}, {}]},
            "unknown_task",
        ),
        ("submit without args", {"body": [[], REQUEST, {}]}, "arguments"),
        ("submit with two", {"body": [[REQUEST, REQUEST], {}, {}]}, "arguments"),
        ("submit with a string", {"body": [["{}"], {}, {}]}, "arguments"),
        ("submit with kwargs", {"body": [[REQUEST], {"x": 1}, {}]}, "arguments"),
        (
            "step without args",
            {"head": headers(STEP_TASKS[1]), "body": [[], {}, {}]},
            "arguments",
        ),
        (
            "step job id not a uuid",
            {"head": headers(STEP_TASKS[1]), "body": [["x", 5], {}, {}]},
            "arguments",
        ),
        (
            "step registry id a bool",
            {"head": headers(STEP_TASKS[2]), "body": [[JOB, True], {}, {}]},
            "arguments",
        ),
        (
            "step registry id a string",
            {"head": headers(STEP_TASKS[2]), "body": [[JOB, "5"], {}, {}]},
            "arguments",
        ),
        (
            "step registry id past 2^63",
            {"head": headers(STEP_TASKS[2]), "body": [[JOB, 2**63], {}, {}]},
            "arguments",
        ),
        (
            "step with kwargs",
            {"head": headers(STEP_TASKS[3]), "body": [[JOB, 5], {"x": 1}, {}]},
            "arguments",
        ),
        (
            "reconcile with args",
            {"head": headers("pushworker.maintenance.reconcile"), "body": [[1], {}, {}]},
            "arguments",
        ),
    ]


REFUSED = _refused_cases()


@pytest.mark.parametrize(("case", "change", "reason"), REFUSED, ids=[c[0] for c in REFUSED])
def test_malformed_messages_are_refused_with_their_reason(
    case: str, change: dict[str, Any], reason: str
) -> None:
    """Each class of bad message is refused with a reason naming the class, not a value."""
    change = dict(change)
    body = change.pop("body", [[REQUEST], {}, EMBED])
    result = verdict(body, **change)
    assert isinstance(result, Refusal), f"{case}: {result}"
    assert result.reason == reason
    assert result.to_payload()["error_code"] == "invalid_message"


def test_a_refusal_records_metadata_never_values() -> None:
    """A secret sent to a misspelled task name appears nowhere in what is recorded, and an
    odd task name is truncated and escaped."""
    secret = "hunter2-" + uuid.uuid4().hex
    body = [[{**REQUEST, "password": secret}], {}, {}]
    for name in ("pushworker.sumbit", "\x1b[2J" + "x" * 500):
        result = verdict(body, head=headers(name))
        assert isinstance(result, Refusal)
        recorded = json.dumps(result.to_payload())
        assert secret not in recorded
        assert "\x1b" not in recorded
        assert len(result.to_payload()["task_name"]) <= 110
        assert result.to_payload()["body_bytes"] == len(json.dumps(body).encode())


def test_submit_rejections_keep_the_request_for_the_contracts_record() -> None:
    """A submission refused for its arity goes to submissions/<id> with its request."""
    head = headers()
    result = verdict([[REQUEST], {"extra": 1}, {}], head=head)
    assert isinstance(result, Refusal) and result.is_submission
    assert result.request == REQUEST
    assert result.message_id == head["id"]


def test_the_guard_knows_exactly_the_apps_tasks() -> None:
    """A task added to the app without an argument rule would be refused: the tables agree."""
    from tasks.app import app

    app.loader.import_default_modules()
    ours = {name for name in app.tasks if name.startswith("pushworker.")}
    assert ours == set(TASK_ARGUMENTS)


def test_the_step_tasks_keep_their_names() -> None:
    """One task per step of the list, under the name producers and queued messages use."""
    assert STEP_TASKS == (
        "pushworker.step.resolve_credentials",
        "pushworker.step.login",
        "pushworker.step.tag",
        "pushworker.step.push",
    )
    assert set(STEP_TASKS) < set(TASK_ARGUMENTS)


@pytest.mark.parametrize("depth", [0, 1, 5, MAX_DEPTH, 900, 10_000])
def test_depth_is_measured_without_recursion(depth: int) -> None:
    """Nesting far past Python's recursion limit is measured (text and objects alike)."""
    text = "[" * depth + '"[[{{"' + "]" * depth
    assert text_depth(text) == depth
    measured = nesting_depth(nested(depth))
    assert measured == depth if depth <= MAX_DEPTH else measured > MAX_DEPTH


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=40,
)


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    body = draw(
        JSON.map(lambda v: json.dumps(v).encode())
        | st.builds(lambda d: b"[" * d + b"]" * d, st.integers(0, 3000))
        | st.binary(max_size=64)
        | JSON.map(lambda v: json.dumps([[v], {}, {}]).encode())
        | st.none()
    )
    head = draw(st.none() | JSON | st.builds(headers, st.sampled_from([*TASK_ARGUMENTS, "x", 3])))
    return {
        "headers": head,
        "properties": draw(st.none() | JSON),
        "content_type": draw(st.sampled_from([CONTENT_TYPE, "application/x-yaml", None, 1])),
        "content_encoding": draw(st.sampled_from(["utf-8", "binary", None])),
        "body": body,
    }


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_any_message_gets_a_verdict_never_an_exception(message: dict[str, Any]) -> None:
    """Property: for any headers, properties, content type and body, the guard answers, and an
    accepted message is a well-formed call: a known task, args a list, kwargs a dict, bounded
    nesting, and arguments its task takes."""
    result = check_message(tasks=TASK_ARGUMENTS, **message)
    if isinstance(result, Accepted):
        assert result.task_name in TASK_ARGUMENTS
        assert isinstance(result.args, list) and isinstance(result.kwargs, dict)
        assert nesting_depth([result.args, result.kwargs]) <= MAX_DEPTH
        assert TASK_ARGUMENTS[result.task_name](result.args, result.kwargs) is None
    else:
        assert result.reason and result.message
        json.dumps(result.to_payload())  # recordable as it is


def _celery_lines(secret: str) -> list[tuple[str, str, tuple[Any, ...]]]:
    """Celery's and kombu's own format strings that print a message, filled with a secret."""
    from celery.worker.consumer import consumer

    body = f"[[{{'password': '{secret}'}}], {{}}, {{}}]"
    head = {"task": "pushworker.sumbit", "argsrepr": f"({secret!r},)"}
    name = "celery.worker.consumer.consumer"
    return [
        (name, consumer.UNKNOWN_TASK_ERROR, (KeyError("x"), f"{body} (80b)", head, {})),
        (name, consumer.INVALID_TASK_ERROR, (ValueError("x"), f"{body} (80b)")),
        (name, consumer.UNKNOWN_FORMAT, (body,)),
        (
            name,
            consumer.MESSAGE_DECODE_ERROR,
            (
                UnicodeDecodeError("utf-8", secret.encode(), 0, 1, "bad"),
                "application/json",
                "utf-8",
                head,
                body,
            ),
        ),
        ("kombu.transport.redis", "Could not restore message: %r", ({"body": secret},)),
    ]


def test_celery_and_kombu_lines_never_print_a_message_body(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Second line of defence behind the guard: through the worker's logging configuration,
    each of Celery's and kombu's lines that prints a message body, its headers or a decoding
    error's bytes keeps its first words and loses the contents (and the exception's text)."""
    import logging

    from worker.core.logs import WITHHELD, configure_logging

    secret = "s3cret-" + uuid.uuid4().hex
    configure_logging("json")
    for logger, text, args in _celery_lines(secret):
        try:
            raise ValueError(secret)
        except ValueError:
            logging.getLogger(logger).error(text, *args, exc_info=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(_celery_lines(secret))
    for line in lines:
        assert secret not in line
        assert WITHHELD in json.loads(line)["event"]
