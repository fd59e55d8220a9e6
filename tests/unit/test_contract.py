"""The message contract of ``pushworker.submit``: its schema, its file, what a rejection records.

Runs on a throwaway SQLite file; publishing is replaced by a list (no broker).
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.support.fakes import RecordingDispatcher
from worker import contract, producer
from worker.contract import handle_submission, request_from_call
from worker.core.errors import DatabaseUnavailable, InvalidMessage, PushWorkerError
from worker.registries import RegistrySpec, create_registry
from worker.store.db import session_scope
from worker.store.models import PushJob, Registry
from worker.store.queries import select_events

ROOT = Path(__file__).resolve().parents[2]
SECRET = "hunter2-do-not-record"


def message(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "source_image": "myapp:build",
        "registry_id": 5,
        "repository": "team/myapp",
        "tag": "1.2.3",
        "requested_by": "platform:user-42",
        "idempotency_key": f"build-{uuid.uuid4()}",
    }
    base.update(changes)
    return {key: value for key, value in base.items() if value is not DROP}


DROP = object()


def rejection(value: Any) -> str:
    with pytest.raises(InvalidMessage) as caught:
        request_from_call([value], {})
    assert caught.value.code == "invalid_message"
    return caught.value.message


# --- the schema -----------------------------------------------------------------------------------


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(contract.push_request_schema())


def test_the_schema_file_is_in_sync_with_the_code() -> None:
    """docs/push-request.schema.json is generated: `python -m worker.contract > docs/...`."""
    on_disk = (ROOT / contract.SCHEMA_FILE).read_text()
    assert on_disk == contract.schema_json(), (
        f"{contract.SCHEMA_FILE} is stale: run `python -m worker.contract > {contract.SCHEMA_FILE}`"
    )
    assert json.loads(on_disk)["additionalProperties"] is False


def test_the_schema_has_no_field_for_a_secret() -> None:
    names = set(contract.push_request_schema()["properties"])
    assert not {n for n in names if re.search(r"pass|secret|token|auth|credential", n)}


def test_a_full_and_a_minimal_request_pass() -> None:
    full = message(fallback=[4, 7])
    assert request_from_call([full], {}) == full
    assert request_from_call([message()], {})["registry_id"] == 5


def test_an_integral_float_is_taken_as_an_integer() -> None:
    """JSON Schema counts 5.0 as an integer; the producer API gets the int 5."""
    request = request_from_call([message(registry_id=5.0, fallback=[4.0])], {})
    assert request["registry_id"] == 5 and type(request["registry_id"]) is int
    assert request["fallback"] == [4] and type(request["fallback"][0]) is int


@pytest.mark.parametrize(
    "field", ["source_image", "registry_id", "repository", "tag", "requested_by", "idempotency_key"]
)
def test_a_missing_field_is_named(field: str) -> None:
    assert f"missing field(s) '{field}'" in rejection(message(**{field: DROP}))


def test_every_missing_field_is_named_at_once() -> None:
    text = rejection({"source_image": "a:b"})
    for field in ("registry_id", "repository", "tag", "requested_by", "idempotency_key"):
        assert repr(field) in text


@pytest.mark.parametrize("extra", ["password", "auth_config", "registry_url", "Tag"])
def test_an_extra_field_is_refused_by_name_never_by_value(extra: str) -> None:
    text = rejection(message(**{extra: SECRET}))
    assert f"unexpected field(s) '{extra}'" in text
    assert "credentials are never accepted" in text
    assert SECRET not in text


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("registry_id", "5", "registry_id must be of type integer, not string"),
        ("registry_id", True, "registry_id must be of type integer, not boolean"),
        ("registry_id", 5.5, "registry_id must be of type integer, not number"),
        ("registry_id", None, "registry_id must be of type integer, not null"),
        ("source_image", 12, "source_image must be of type string, not integer"),
        ("tag", ["v1"], "tag must be of type string, not array"),
        ("requested_by", {"user": 1}, "requested_by must be of type string, not object"),
        ("fallback", 4, "fallback must be of type array, not integer"),
        ("fallback", [4, "7"], "fallback[1] must be of type integer, not string"),
        ("idempotency_key", None, "idempotency_key must be of type string, not null"),
        ("tag", "", "tag must not be empty"),
        ("repository", "a" * 256, "repository must be at most 255 characters"),
        ("tag", "v" * 129, "tag must be at most 128 characters"),
        ("requested_by", "x" * 192, "requested_by must be at most 191 characters"),
        ("registry_id", 2**63, "registry_id must be a registry id from 1 to 2147483647"),
        ("registry_id", 2**31, "registry_id must be a registry id from 1 to 2147483647"),
        ("registry_id", 0, "registry_id must be a registry id from 1 to 2147483647"),
        ("fallback", [4, True], "fallback[1] must be of type integer, not boolean"),
        ("fallback", [4, -1], "fallback[1] must be a registry id from 1 to 2147483647"),
        ("requested_by", "x\x1b[2J", "requested_by must not contain control characters"),
        ("requested_by", "x\x00", "requested_by must not contain control characters"),
        ("tag", "v1\n", "tag must not contain control characters"),  # no "$" loophole
        ("source_image", "img\x9b", "source_image must not contain control characters"),
        ("idempotency_key", "k\x7f", "idempotency_key must not contain control characters"),
    ],
)
def test_wrong_types_and_sizes_are_named(field: str, value: Any, expected: str) -> None:
    assert expected in rejection(message(**{field: value}))


def test_a_rejection_names_at_most_ten_problems() -> None:
    text = rejection(message(fallback=["x"] * 50))
    assert text.count("must be of type integer") == 10 and text.endswith("and 40 more")


def test_values_are_never_echoed() -> None:
    text = rejection(message(registry_id=SECRET, tag=[SECRET]))
    assert SECRET not in text


@pytest.mark.parametrize(
    ("value", "kind"), [([], "array"), ("{}", "string"), (None, "null"), (5, "integer")]
)
def test_a_request_that_is_not_an_object_is_refused(value: Any, kind: str) -> None:
    assert f"the push request must be of type object, not {kind}" in rejection(value)


@pytest.mark.parametrize(
    ("args", "kwargs", "got"),
    [
        ([], message(), "0 positional argument(s) and keyword argument(s) 'source_image'"),
        ([], {}, "0 positional argument(s)"),
        ([message(), message()], {}, "2 positional argument(s)"),
        ([message()], {"priority": 1}, "keyword argument(s) 'priority'"),
    ],
)
def test_exactly_one_positional_argument(args: list[Any], kwargs: dict[str, Any], got: str) -> None:
    with pytest.raises(InvalidMessage, match="takes exactly one positional argument") as caught:
        request_from_call(args, kwargs)
    assert got in caught.value.message


# --- handling a submission ------------------------------------------------------------------------


@pytest.fixture
def published(sqlite_url: str, dispatched: RecordingDispatcher) -> list[tuple[str, int]]:
    """Registries 4 and 5 (credentials stored) and a broker that is a list."""
    with session_scope() as session:
        for rid in (4, 5):
            spec = RegistrySpec(
                name=f"r{rid}", url=f"https://r{rid}.example.com", username="u", secret="pw"
            )
            create_registry(session, spec, registry_id=rid)
    return dispatched.chains


def submit(args: list[Any], kwargs: dict[str, Any] | None = None) -> contract.Submission:
    return handle_submission(args, kwargs or {}, submission_id=str(uuid.uuid4()))


def rejected_events(result: contract.Submission) -> list[dict[str, Any]]:
    with session_scope() as session:
        rows = select_events(session, stream=result.stream)
        return [{"type": r.type, "actor": r.actor, "registry_id": r.registry_id, **r.payload}
                for r in rows]  # fmt: skip


def job_count() -> int:
    with session_scope() as session:
        return len(session.query(PushJob).all())


def test_a_valid_submission_is_enqueued_like_enqueue_push(
    published: list[tuple[str, int]],
) -> None:
    result = submit([message(fallback=[4])])
    assert result.accepted and result.to_dict() == {"status": "accepted", "job_id": result.job_id}
    assert published == [(result.job_id, 5)]
    with session_scope() as session:
        job = session.get(PushJob, result.job_id)
        assert job is not None
        assert (job.status, job.fallback_chain, job.requested_by) == (
            "queued",
            [4],
            "platform:user-42",
        )
        enqueued = select_events(session, job_id=job.id)
        assert [(e.type, e.actor) for e in enqueued] == [
            ("job.enqueued", "producer:platform:user-42")
        ]


def test_the_same_idempotency_key_makes_one_job(published: list[tuple[str, int]]) -> None:
    """A redelivered or resent message returns the first job and publishes nothing more."""
    request = message()
    first, second = submit([request]), submit([dict(request)])
    assert first.job_id == second.job_id
    assert len(published) == 1


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (message(tag=DROP), "invalid_message", "missing field(s) 'tag'"),
        (message(password=SECRET), "invalid_message", "unexpected field(s) 'password'"),
        (message(registry_id=99), "registry_not_found", "registry 99 does not exist"),
        (message(repository="E2E/App"), "invalid_reference", "not a valid Docker repository"),
        (message(repository="evil.example.com/app"), "invalid_reference", "names a host"),
        (message(tag="bad tag"), "invalid_reference", "not a valid Docker tag"),
        (message(fallback=[5]), "invalid_fallback_chain", "names its own registry"),
        (message(fallback=[98]), "registry_not_found", "registry 98 does not exist"),
        (message(source_image="a b"), "invalid_input", "is not an image reference"),
    ],
)
def test_an_invalid_submission_is_recorded_as_a_rejection(
    published: list[tuple[str, int]], request_: dict[str, Any], code: str, words: str
) -> None:
    """The same validation as enqueue_push; no job, nothing published, one clear event."""
    result = submit([request_])
    assert not result.accepted and result.error_code == code
    assert published == [] and job_count() == 0
    (event,) = rejected_events(result)
    assert event["type"] == "submission.rejected"
    assert event["error_code"] == code and words in event["error_message"]
    assert result.stream.startswith("submissions/")
    assert SECRET not in json.dumps(event)
    assert "password" not in event  # unknown fields are named in the message, never kept
    if "registry_id" in request_ and isinstance(request_["registry_id"], int):
        assert event["registry_id"] == request_["registry_id"]
        assert event["requested_registry_id"] == request_["registry_id"]
    assert event["actor"] == "producer:platform:user-42"


def test_credentials_not_configured_are_rejected(published: list[tuple[str, int]]) -> None:
    with session_scope() as session:
        registry = session.get(Registry, 5)
        assert registry is not None
        registry.credential_secret = None  # as if the record had lost its secret
    result = submit([message()])
    assert result.error_code == "credential_unavailable"
    assert "has no credential" in rejected_events(result)[0]["error_message"]
    assert published == []


def test_a_kwargs_style_call_is_rejected_with_its_fields_kept(
    published: list[tuple[str, int]],
) -> None:
    result = submit([], message())
    assert result.error_code == "invalid_message"
    (event,) = rejected_events(result)
    assert "takes exactly one positional argument" in event["error_message"]
    assert event["actor"] == "producer:unknown"


def test_a_redelivered_rejection_is_recorded_once(published: list[tuple[str, int]]) -> None:
    submission_id = str(uuid.uuid4())
    for _ in range(2):
        result = handle_submission([message(tag=DROP)], {}, submission_id=submission_id)
    assert len(rejected_events(result)) == 1


def test_a_database_outage_is_raised_for_the_task_to_retry(
    published: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(**_kwargs: Any) -> str:
        raise DatabaseUnavailable("the database does not answer")

    monkeypatch.setattr(producer, "enqueue_push", down)
    with pytest.raises(DatabaseUnavailable):
        submit([message()])


def test_a_crash_is_recorded_and_not_raised(
    published: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(**_kwargs: Any) -> str:
        raise KeyError(SECRET)

    monkeypatch.setattr(producer, "enqueue_push", crash)
    result = submit([message()])
    assert result.error_code == "internal_error"
    (event,) = rejected_events(result)
    assert event["error_message"] == "the submission crashed: KeyError"


def test_the_submission_id_is_the_task_id_when_it_is_a_uuid() -> None:
    task_id = str(uuid.uuid4())
    assert contract.submission_id_for(task_id) == task_id
    assert uuid.UUID(contract.submission_id_for("not-a-uuid"))
    assert uuid.UUID(contract.submission_id_for(None))


# --- the Celery task ------------------------------------------------------------------------------


def test_the_task_takes_one_object_and_reports_rejections(
    published: list[tuple[str, int]],
) -> None:
    """Run in-process (``apply``): the same function the worker runs, without a broker."""
    from tasks.submit import submit as task

    assert task.name == "pushworker.submit"
    accepted = task.apply(args=[message()]).get()
    assert accepted["status"] == "accepted"
    rejected = task.apply(kwargs=message()).get()
    assert rejected["status"] == "rejected" and rejected["error_code"] == "invalid_message"
    assert len(published) == 1


# --- the runbook ----------------------------------------------------------------------------------


def _codes() -> dict[str, type[PushWorkerError]]:
    import worker.jobs  # noqa: F401  (errors defined next to their use join the tree)

    codes: dict[str, type[PushWorkerError]] = {}
    pending: list[type[PushWorkerError]] = [PushWorkerError]
    while pending:
        cls = pending.pop()
        codes[cls.code] = cls
        pending.extend(cls.__subclasses__())
    return codes


def test_the_operations_runbook_documents_every_error_code() -> None:
    """Each code has a row in docs/operations.md with its exit code and retryable flag."""
    text = (ROOT / "docs" / "operations.md").read_text()
    rows = {
        m.group(1): (int(m.group(2)), m.group(3))
        for m in re.finditer(r"^\| `([a-z_]+)` \| (\d+) \| (yes|no) \|", text, re.M)
    }
    for code, cls in _codes().items():
        assert code in rows, f"docs/operations.md has no row for error code {code}"
        assert rows[code] == (cls.exit_code, "yes" if cls.retryable else "no"), code
