"""What is hashed is what is stored, for any input: on SQLite and on PostgreSQL alike.

Two entry points are driven with generated, hostile input (wrong JSON types, bools where ids go,
ids beyond 32 bits, NUL, ESC and other control characters, lone surrogates, over-long text):

- ``events.append`` itself: every call either raises a ``ValidationError`` and stores nothing,
  or stores an event; and the whole log always verifies (``worker.store.verify.verify``).
- ``contract.handle_submission`` (the ``pushworker.submit`` task's body): every request is
  either accepted (a job) or has exactly one ``submission.rejected`` event, which holds no raw
  control character; and the log verifies.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from tests.support.fakes import RecordingDispatcher
from worker import contract
from worker.core.errors import ValidationError
from worker.core.text import has_control
from worker.producer import enqueue_push
from worker.registries import RegistrySpec, create_registry
from worker.store import events, queries, verify
from worker.store.db import session_scope
from worker.store.models import Event, PushJob

#: Examples per property and backend (each example is one or two transactions and a verify).
APPEND_EXAMPLES = 150
SUBMISSION_EXAMPLES = 150

PROPERTY = settings(
    max_examples=APPEND_EXAMPLES,
    deadline=None,
    # One migrated database per test, shared by its examples: the log only grows, and every
    # example checks the whole of it.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

HOSTILE_STRINGS = st.sampled_from(
    ["\x00", "x\x1b[2Jy", "\ud800", "a\udfffb", "\n", "\x7f", "\x9b31m", "é", "😀", ""]
)
#: Text that is sometimes fine and sometimes not: control characters, surrogates, any length.
TEXT = st.one_of(
    st.text(max_size=12),
    st.text(st.characters(exclude_categories=()), max_size=12),
    st.builds(lambda a, b, c: a + b + c, st.text(max_size=4), HOSTILE_STRINGS, st.text(max_size=4)),
    st.integers(min_value=1, max_value=400).map(lambda n: "r" * n),
)
INTS = st.one_of(
    st.integers(min_value=-3, max_value=10),
    st.integers(),
    st.sampled_from([2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**63, 2**64]),
)
#: Anything a JSON message or a careless caller could hand over.
ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    INTS,
    st.floats(),
    TEXT,
    st.lists(st.one_of(INTS, st.booleans(), TEXT), max_size=3),
)
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), INTS, st.floats(), TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=8,
)
PAYLOADS = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(sorted(events.ALLOWED_PAYLOAD_KEYS)), JSON_VALUES, max_size=4),
    st.dictionaries(TEXT, JSON_VALUES, max_size=2),  # keys outside the allow-list, mostly
)


def valid_append() -> dict[str, Any]:
    return {
        "stream": "job/a", "type": "step.failed", "actor": "worker:h:1", "job_id": "a",
        "step": "push", "registry_id": 5, "attempt": 1,
    }  # fmt: skip


#: A valid append with up to three of its arguments replaced by anything, and any payload.
APPENDS = st.builds(
    lambda changes, payload: {**valid_append(), **changes, "payload": payload},
    st.dictionaries(st.sampled_from(sorted(valid_append())), ANYTHING, max_size=3),
    PAYLOADS,
)


def event_count() -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Event)) or 0)


def assert_log_verifies(url: str) -> None:
    report = verify.verify(url)
    assert report.ok, [problem.message for problem in report.problems]


@given(arguments=APPENDS)
@PROPERTY
def test_any_append_is_refused_clearly_or_stored_as_hashed(
    database_url: str, arguments: dict[str, Any]
) -> None:
    """A ValidationError and nothing stored, or a stored event; the log verifies either way.

    Today's failure this catches: ``registry_id=True`` hashed as ``true`` and stored as 1 (the
    log then reports an altered event forever), and ``2**40`` or a NUL byte that the database
    refuses with its own error instead of a clear one.
    """
    before = event_count()
    try:
        with session_scope() as session:
            row = events.append(session, **arguments)
            written = queries.event_fields(row)
    except ValidationError:
        event("refused")
        assert event_count() == before
    else:
        event("stored")
        assert event_count() == before + 1
        with session_scope() as session:
            stored = session.get(Event, written["id"])
            assert stored is not None
            assert queries.event_fields(stored) == {**written, "time": stored.time.isoformat()}
    assert_log_verifies(database_url)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("registry_id", True), ("registry_id", "2"), ("registry_id", 2.0), ("registry_id", 2**31),
        ("registry_id", -(2**31) - 1), ("attempt", False), ("attempt", 2**63), ("stream", 5),
        ("actor", "x\x00y"), ("actor", "a" * 201), ("job_id", "\ud800"), ("step", b"push"),
        ("type", ""), ("stream", None),
    ],
)  # fmt: skip
def test_append_refuses_what_the_database_would_store_differently(
    database_url: str, field: str, value: Any
) -> None:
    """Each column's exact stored form: an int in the 32-bit range (not a bool, "2" or 2.0),
    text within the column's length without NUL or lone surrogates."""
    arguments: dict[str, Any] = {"stream": "job/a", "type": "t", "actor": "x", field: value}
    with pytest.raises(ValidationError, match=field), session_scope() as session:
        events.append(session, **arguments)
    assert event_count() == 0


# --- submissions ----------------------------------------------------------------------------------


@pytest.fixture
def registries(database_url: str, dispatched: RecordingDispatcher) -> Iterator[str]:
    """Registries 4 and 5 with credentials, and a broker that accepts everything."""
    with session_scope() as session:
        for rid in (4, 5):
            spec = RegistrySpec(
                name=f"r{rid}", url=f"https://r{rid}.example.com", username="u", secret="pw"
            )
            create_registry(session, spec, registry_id=rid)
    yield database_url


def valid_request() -> dict[str, Any]:
    return {
        "source_image": "myapp:build", "registry_id": 5, "repository": "team/myapp",
        "tag": "1.2.3", "requested_by": "platform:user-42", "idempotency_key": "k",
    }  # fmt: skip


FIELDS = [*valid_request(), "fallback"]
REQUESTS = st.one_of(
    # a valid request with some fields replaced by anything (or dropped)
    st.builds(
        lambda changes, dropped: {
            key: value
            for key, value in {**valid_request(), **changes}.items()
            if key not in dropped
        },
        st.dictionaries(st.sampled_from(FIELDS), ANYTHING, max_size=4),
        st.sets(st.sampled_from(FIELDS), max_size=1),
    ),
    # fallback chains of every kind, the rest valid
    st.builds(
        lambda chain: {**valid_request(), "fallback": chain},
        st.lists(st.one_of(INTS, st.booleans(), TEXT, st.floats()), max_size=3),
    ),
    JSON_VALUES,  # not even an object
)


@given(request=REQUESTS, key=st.uuids())
@settings(PROPERTY, max_examples=SUBMISSION_EXAMPLES)
def test_every_hostile_submission_is_accepted_or_recorded_once(
    registries: str, request: Any, key: uuid.UUID
) -> None:
    """Accepted (a job exists), or exactly one ``submission.rejected`` event that holds no raw
    control character; the task never raises for bad input, and the log verifies."""
    if isinstance(request, dict) and request.get("idempotency_key") == "k":
        request["idempotency_key"] = f"k-{key}"  # a fresh job unless the key itself is hostile
    result = contract.handle_submission([request], {}, submission_id=str(uuid.uuid4()))
    with session_scope() as session:
        rejected = queries.select_events(session, stream=result.stream)
        event("accepted" if result.accepted else f"rejected: {result.error_code}")
        if result.accepted:
            assert session.get(PushJob, result.job_id) is not None
            assert rejected == []
        else:
            (rejection,) = rejected
            assert rejection.type == contract.REJECTED and rejection.payload["error_code"]
            shown = [rejection.actor, *(str(v) for v in rejection.payload.values())]
            assert not any(has_control(text) for text in shown), shown
    assert_log_verifies(registries)


@pytest.mark.parametrize(
    "chain",
    [["2"], [True], [4.0], [2**31], [0], [-1]],
    ids=["str", "bool", "float", "2^31", "0", "-1"],
)
def test_the_producer_api_refuses_a_chain_that_is_not_ids(
    registries: str, chain: list[Any]
) -> None:
    """The incident of issue 13 (8): a chain of "2" or True was hashed as sent and stored as
    2 or 1. Now refused before anything is recorded."""
    with pytest.raises(ValidationError, match=r"fallback\[0\]"):
        enqueue_push(
            source_image="myapp:build", registry_id=5, repository="team/myapp", tag="1",
            requested_by="platform:x", fallback=chain,
        )  # fmt: skip
    assert event_count() == 2  # the two registry.created events only


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("registry_id", True), ("registry_id", 2**63), ("registry_id", "5"),
        ("requested_by", "x\x1b[2J"), ("requested_by", "x\x00y"), ("tag", "1\n"),
        ("idempotency_key", "k\x00"), ("source_image", "img\x9b"), ("repository", "\ud800"),
    ],
)  # fmt: skip
def test_the_producer_api_refuses_wrong_types_and_control_characters(
    registries: str, field: str, value: Any
) -> None:
    request = {**valid_request(), field: value}
    with pytest.raises(ValidationError, match=field):
        enqueue_push(**request)
    assert event_count() == 2
