"""Contract of the event store, on SQLite and on PostgreSQL alike."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import JSON, Connection, Table, column, create_engine, insert, table, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from tests.conftest import use_database
from worker.core.errors import EventConflict, StorageError, ValidationError
from worker.store import chain, events, queries
from worker.store.db import engine_for, session_scope
from worker.store.models import Event, UTCDateTime


def test_append_numbers_each_stream_from_one(database_url: str) -> None:
    """Sequence numbers are per stream, gapless, and select returns them in order."""
    with session_scope() as session:
        for stream in ("job/a", "job/b", "job/a"):
            events.append(session, stream=stream, type="t", actor="test", job_id=stream[-1])
    with session_scope() as session:
        rows = queries.select_events(session, stream="job/a")
        assert [(r.stream, r.seq) for r in rows] == [("job/a", 1), ("job/a", 2)]
        assert [r.seq for r in queries.select_events(session, job_id="b")] == [1]


def test_select_filters_combine(database_url: str) -> None:
    with session_scope() as session:
        events.append(session, stream="job/a", type="job.failed", actor="w", registry_id=5)
        events.append(session, stream="job/b", type="job.failed", actor="w", registry_id=4)
        events.append(session, stream="job/b", type="job.retried", actor="operator:x")
    with session_scope() as session:
        failed_at_5 = queries.select_events(session, registry_id=5, types=["job.failed"])
        assert [e.stream for e in failed_at_5] == ["job/a"]
        assert [e.type for e in queries.select_events(session, actor="operator:x")] == [
            "job.retried"
        ]


def test_duplicate_sequence_number_is_the_projects_own_error(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer with a stale read of the last seq clashes on UNIQUE(stream, seq): EventConflict."""
    with session_scope() as session:
        events.append(session, stream="job/a", type="t", actor="test")
    read = events._append_state

    def stale(*args: Any) -> Any:
        # Another writer appended between this writer's read and its insert: the read is stale.
        return dataclasses.replace(read(*args), last_seq=0)

    monkeypatch.setattr(events, "_append_state", stale)
    # PostgreSQL reads and inserts in one call, under the lane's lock (nothing to go stale);
    # the recorder's own way, which it takes for a lane's first event, is the one tested here.
    monkeypatch.setattr(events, "_append_linked", lambda *_args: None)
    with pytest.raises(EventConflict, match="job/a"), session_scope() as session:
        events.append(session, stream="job/a", type="t", actor="late")
    with session_scope() as session:
        assert [e.actor for e in queries.select_events(session, stream="job/a")] == ["test"]


def test_payload_keys_pass_an_allow_list(database_url: str) -> None:
    """A payload key outside the allow-list (such as 'password') is refused."""
    with pytest.raises(ValidationError, match="password"), session_scope() as session:
        events.append(session, stream="job/a", type="t", actor="x", payload={"password": "p"})


def test_only_the_projects_sessions_publish_committed_events(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append committed through ``session_scope`` reaches the subscribers; a rolled-back one
    does not; and a Session the project did not make is not hooked at all (the hooks are on the
    project's sessionmaker, not on every Session of the process), though its event is stored."""
    seen: list[str] = []
    monkeypatch.setattr(events, "_subscribers", [lambda fields: seen.append(fields["actor"])])
    with session_scope() as session:
        events.append(session, stream="job/a", type="t", actor="ours")
    with pytest.raises(RuntimeError, match="abort"), session_scope() as session:
        events.append(session, stream="job/a", type="t", actor="rolled-back")
        raise RuntimeError("abort")
    with Session(engine_for(database_url)) as foreign:
        events.append(foreign, stream="job/a", type="t", actor="foreign")
        foreign.commit()
    assert seen == ["ours"]
    with session_scope() as session:
        stored = [e.actor for e in queries.select_events(session, stream="job/a")]
    assert stored == ["ours", "foreign"]


@pytest.mark.parametrize("statement", ["UPDATE events SET type = 'x'", "DELETE FROM events"])
def test_the_database_refuses_to_change_events(database_url: str, statement: str) -> None:
    """Append-only is enforced by triggers, for any client that connects."""
    with session_scope() as session:
        events.append(session, stream="job/a", type="t", actor="x")
    with pytest.raises(DBAPIError, match="append-only"), engine_for(database_url).begin() as conn:
        conn.execute(text(statement))
    with session_scope() as session:
        assert [e.type for e in queries.select_events(session)] == ["t"]


# --- the hash chain and the derived columns ---------------------------------------------------


def test_every_event_links_to_the_one_before_it_in_its_lane(database_url: str) -> None:
    """A chain per lane in id order, across streams and transactions; each hash recomputes; a
    lane's first event links to the lanes' root (the genesis hash on a log that began with
    lanes)."""
    with session_scope() as session:
        events.append(session, stream="job/a", type="job.enqueued", actor="x", job_id="a")
        events.append(session, stream="registry/5", type="registry.created", actor="x")
    with session_scope() as session:
        events.append(session, stream="job/a", type="step.started", actor="x", job_id="a")
    with session_scope() as session:
        rows = queries.select_events(session)
    assert chain.lane_of("job/a") != chain.lane_of("registry/5")
    assert [r.lane for r in rows] == [chain.lane_of(r.stream) for r in rows]
    job, registry = [r for r in rows if r.stream == "job/a"], rows[1]
    assert job[0].prev_hash == registry.prev_hash == chain.GENESIS_HASH
    assert job[1].prev_hash == job[0].hash
    for row in rows:
        assert row.hash == chain.chain_hash(queries.event_fields(row))
    assert len({r.hash for r in rows}) == len(rows)


def test_the_hash_covers_every_stored_field(database_url: str) -> None:
    with session_scope() as session:
        row = events.append(
            session, stream="job/a", type="step.failed", actor="w", job_id="a", step="push",
            registry_id=5, attempt=2, payload={"error_code": "x", "retry_in": 1.5},
        )  # fmt: skip
        fields = queries.event_fields(row)
    for name, other in [
        ("stream", "job/b"), ("seq", 2), ("job_id", "b"), ("type", "step.succeeded"),
        ("step", "tag"), ("registry_id", 4), ("attempt", 3), ("actor", "v"),
        ("payload", {"error_code": "y", "retry_in": 1.5}), ("repository", "r"),
        ("outcome", "succeeded"), ("prev_hash", "1" * 64),
        ("time", "2020-01-01T00:00:00+00:00"),
        # the lanes' version also covers the id (an event cannot move in the order), the lane
        # and the trace
        ("id", fields["id"] + 1), ("lane", (fields["lane"] + 1) % chain.LANES),
        ("trace_id", "0" * 31 + "1"),
    ]:  # fmt: skip
        assert chain.chain_hash({**fields, name: other}) != fields["hash"], name


def test_payload_is_hashed_as_the_database_gives_it_back(database_url: str) -> None:
    """Tuples, floats and nested values come back as JSON gives them: the hash still holds."""
    with session_scope() as session:
        events.append(
            session, stream="job/a", type="t", actor="x",
            payload={"fallback_chain": (4, 7), "retry_in": 0.1, "checks": [{"ok": True}]},
        )  # fmt: skip
    with session_scope() as session:
        (row,) = queries.select_events(session)
        assert row.payload["fallback_chain"] == [4, 7]
        assert row.hash == chain.chain_hash(queries.event_fields(row))


def test_payload_that_is_not_plain_json_is_refused(database_url: str) -> None:
    with pytest.raises(ValidationError, match="plain JSON"), session_scope() as session:
        events.append(session, stream="job/a", type="t", actor="x", payload={"size": float("nan")})


def _a_job(session: Session, job_id: str, repository: str) -> None:
    from worker.store.models import PushJob, Registry

    if session.get(Registry, 5) is None:
        session.add(
            Registry(id=5, name="h", url="https://h", host="h", fallback_chain=[], insecure=False,
                     auth_required=True)
        )  # fmt: skip
        session.flush()
    session.add(
        PushJob(id=job_id, source_image="a:1", repository=repository, tag="1",
                requested_registry_id=5, effective_registry_id=5, fallback_chain=[],
                requested_by="t")
    )  # fmt: skip
    session.flush()


def test_repository_and_outcome_are_derived_and_queryable(database_url: str) -> None:
    with session_scope() as session:
        _a_job(session, "j1", "team/app")
        events.append(session, stream="job/j1", type="job.enqueued", actor="x", job_id="j1",
                      registry_id=5, payload={"repository": "team/app"})  # fmt: skip
        # No repository in the payload: the job's is used.
        events.append(session, stream="job/j1", type="step.failed", actor="x", job_id="j1",
                      registry_id=5, payload={"error_code": "e"})  # fmt: skip
        events.append(session, stream="job/j1", type="job.succeeded", actor="x", job_id="j1",
                      registry_id=5)  # fmt: skip
        events.append(session, stream="registry/5", type="registry.tested", actor="x",
                      registry_id=5, payload={"ok": False})  # fmt: skip
        events.append(session, stream="job/j1", type="fallback.applied", actor="x", job_id="j1")
    with session_scope() as session:
        rows = queries.select_events(session)
        assert [(r.repository, r.outcome) for r in rows] == [
            ("team/app", None),
            ("team/app", "failed"),
            ("team/app", "succeeded"),
            (None, "failed"),
            ("team/app", "fallback"),
        ]
        failures = queries.select_events(session, registry_id=5, outcomes=["failed"])
        assert [r.type for r in failures] == ["step.failed", "registry.tested"]
        pushes = queries.select_events(
            session, repository="team/app", types=["job.succeeded", "job.failed"]
        )
        assert [r.type for r in pushes] == ["job.succeeded"]


#: Text a canonical form must escape: quotes, backslashes, controls, DEL, non-ASCII, astral.
_AWKWARD = 'a"b\\c\n\t\x01\x7f é ☃ 𝄞 \u2028 </script>'


def test_awkward_values_are_hashed_as_a_verifier_hashes_them(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever fills in the linked values (PostgreSQL's ``pushworker_append_event``, or the
    recorder), every event of every kind verifies: payloads and named repositories with text
    JSON must escape, a job's repository read by the database, one outside Docker's alphabet
    (the recorder's way), events of no job, of a job that does not exist, a lane's first."""
    from worker.store import verify

    with session_scope() as session:
        _a_job(session, "plain", "team/app")
        _a_job(session, "odd", "Team/App")  # not a valid reference: stored by hand, all the same
    linked: list[tuple[str, bool]] = []  # (stream, whether PostgreSQL's function appended it)
    one_call = events._append_linked

    def spied(connection: Any, values: dict[str, Any], known: bool) -> Any:
        done = one_call(connection, values, known)
        linked.append((values["stream"], done is not None))
        return done

    monkeypatch.setattr(events, "_append_linked", spied)
    appended: list[Event] = []
    for round_ in range(2):  # the second round finds every lane started
        with session_scope() as session:
            for job_id in ("plain", "odd", "ghost", None):
                stream = f"job/{job_id}" if job_id else "audit"
                appended.append(events.append(
                    session, stream=stream, type="step.failed", actor=f"w{round_}",
                    job_id=job_id, step="push", registry_id=5, attempt=round_,
                    payload={"error_message": _AWKWARD, "checks": [{"ok": True}, None, 1.5],
                             "retry_in": 0.1 + round_},
                ))  # fmt: skip
                appended.append(events.append(
                    session, stream=stream, type="job.enqueued", actor="w",
                    job_id=job_id, payload={"repository": _AWKWARD[:40]},
                ))  # fmt: skip
    with session_scope() as session:
        rows = queries.select_events(session)
    assert [(r.id, r.hash, r.repository) for r in rows] == [
        (e.id, e.hash, e.repository) for e in appended
    ]
    by_stream = {(r.stream, r.type): r.repository for r in rows}
    assert by_stream[("job/plain", "step.failed")] == "team/app"
    assert by_stream[("job/odd", "step.failed")] == "Team/App"
    assert by_stream[("job/ghost", "step.failed")] is None
    assert by_stream[("job/plain", "job.enqueued")] == _AWKWARD[:40]
    for row in rows:
        assert row.hash == chain.chain_hash(queries.event_fields(row)), row.id
    assert verify.verify(database_url).ok
    if database_url.startswith("postgresql"):
        # Once a lane is started the function appends, but for the job repository whose JSON
        # it leaves to the recorder; a named repository is the recorder's to encode either way.
        second_round = dict(linked[-8:][0::2])  # each stream's step.failed of round 2
        assert second_round == {"job/plain": True, "job/odd": False, "job/ghost": True,
                                "audit": True}, linked  # fmt: skip
        assert all(done for stream, done in linked[-8:][1::2]), linked
    else:
        assert linked == []


@contextmanager
def _statements(url: str) -> Iterator[list[str]]:
    """The statements sent to the database at ``url`` meanwhile."""
    from sqlalchemy import event as sa_event

    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    engine = engine_for(url)
    sa_event.listen(engine, "before_cursor_execute", seen)
    try:
        yield statements
    finally:
        sa_event.remove(engine, "before_cursor_execute", seen)


def test_an_append_on_postgresql_is_one_statement(postgres_url: str) -> None:
    """Once its lane has a head, an append is one call of ``pushworker_append_event``: lock,
    read, hash and insert in one round trip."""
    with session_scope() as session:
        _a_job(session, "j1", "team/app")
        events.append(session, stream="job/j1", type="job.enqueued", actor="x", job_id="j1")
    with _statements(postgres_url) as statements, session_scope() as session:
        row = events.append(session, stream="job/j1", type="step.started", actor="x", job_id="j1")
    assert len(statements) == 1 and "pushworker_append_event" in statements[0], statements
    assert (row.seq, row.repository) == (2, "team/app")


def test_within_a_lane_the_time_follows_the_id(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL's one-call append takes the time from the database's clock under the lane's
    lock, never earlier than the lane's previous event, even one a worker whose clock runs
    ahead recorded (the recorder's own way, here a lane's first event)."""
    other = next(
        f"job/{n}" for n in range(99) if chain.lane_of(f"job/{n}") != chain.lane_of("job/a")
    )
    ahead = datetime.now(UTC) + timedelta(hours=1)
    monkeypatch.setattr(events, "utcnow", lambda: ahead)
    with session_scope() as session:
        events.append(session, stream="job/a", type="t", actor="a worker's clock, an hour ahead")
    monkeypatch.undo()
    before = datetime.now(UTC)
    with session_scope() as session:
        for stream in ("job/a", "job/a", other, other):
            events.append(session, stream=stream, type="t", actor="x")
    after = datetime.now(UTC)
    with session_scope() as session:
        fast = [r.time for r in queries.select_events(session, stream="job/a")]
        elsewhere = [r.time for r in queries.select_events(session, stream=other)]
    assert fast == [ahead, ahead, ahead]  # the database's clock is an hour behind the lane
    # Another lane's first event is the recorder's (this process's clock), its second the
    # database's: both now, in order.
    assert before <= elsewhere[0] <= elsewhere[1] <= after


def test_a_clash_inside_the_function_is_the_projects_own_error(postgres_url: str) -> None:
    """A key the function's insert clashes on (here an id the sequence hands out again, as after
    a careless restore) is ``EventConflict``, retryable, and stores nothing."""
    with session_scope() as session:
        first = events.append(session, stream="job/a", type="t", actor="x")
    with session_scope() as session:
        session.execute(text("SELECT setval('events_id_seq', :id, false)"), {"id": first.id})
    with pytest.raises(EventConflict), session_scope() as session:
        events.append(session, stream="job/a", type="t", actor="x")
    with session_scope() as session:
        assert [e.id for e in queries.select_events(session, stream="job/a")] == [first.id]


def _hash_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """The database's function hashes otherwise than this version (the actor "x" as "y"): what
    the recorder sends it is cut from another canonical form."""
    parts = chain.canonical_parts

    def drifted(record: Any) -> tuple[str, ...]:
        first, *rest = parts(record)
        return (first.replace('"actor":"x"', '"actor":"y"'), *rest)

    monkeypatch.setattr(events, "canonical_parts", drifted)


def test_a_database_that_hashes_otherwise_stores_nothing(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recorder recomputes the hash the database linked an event with, before its
    transaction commits: a database function that hashed differently from the recorder (say,
    left from another version) fails the append and leaves no event that would not verify."""
    with session_scope() as session:
        events.append(session, stream="job/a", type="t", actor="x")
    _hash_otherwise(monkeypatch)
    with pytest.raises(StorageError, match="does not compute"), session_scope() as session:
        events.append(session, stream="job/a", type="t", actor="x")
    with session_scope() as session:
        assert len(queries.select_events(session, stream="job/a")) == 1


#: A guard of the tests: the job's tag changes (when the job has the tag it names), returning
#: the job and its new tag.
_RETAG = events.Guard(
    "UPDATE push_jobs SET tag = :new_tag WHERE id = :k_job_id AND tag = :old_tag RETURNING id, tag",
    (),
)


def _retag(session: Session, job_id: str, old: str, new: str) -> Any:
    params = {"k_job_id": job_id, "old_tag": old, "new_tag": new}
    return events.append_guarded(
        session, _RETAG, params, stream=f"job/{job_id}", type="job.retagged", actor="x",
        job_id=job_id, payload={"reason": f"{old} -> {new}"},
    )  # fmt: skip


def _tag_and_types(job_id: str) -> tuple[str, list[str]]:
    from worker.store.models import PushJob

    with session_scope() as session:
        job = session.get(PushJob, job_id)
        assert job is not None
        return job.tag, [e.type for e in queries.select_events(session, stream=f"job/{job_id}")]


def test_a_guarded_append_follows_its_guard_and_only_then(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``append_guarded``: the event is appended when the guard changed its row (the guard's row
    comes back), and nothing is when it changed none. A lane's first event and a job repository
    the database leaves to the recorder take the recorder's way, behind the same guard."""
    from worker.store import verify

    with session_scope() as session:
        _a_job(session, "plain", "team/app")
        _a_job(session, "odd", "Team/App")  # the recorder's way on PostgreSQL
    linked: list[bool] = []  # whether the database appended, per guarded append
    checked = events._checked_link

    def spied(*args: Any) -> Any:
        linked.append(True)
        return checked(*args)

    monkeypatch.setattr(events, "_checked_link", spied)
    for job_id in ("plain", "odd"):
        for old, new in (("1", "2"), ("1", "3"), ("2", "3")):
            with session_scope() as session:
                row = _retag(session, job_id, old, new)
            if old == "1" and new == "3":  # the tag is 2 by then: the guard changes nothing
                assert row is None
            else:
                assert row is not None and (row["id"], row["tag"]) == (job_id, new)
        assert _tag_and_types(job_id) == ("3", ["job.retagged", "job.retagged"])
    with session_scope() as session:
        rows = queries.select_events(session)
    assert [(r.stream, r.seq, r.payload["reason"]) for r in rows] == [
        ("job/plain", 1, "1 -> 2"), ("job/plain", 2, "2 -> 3"),
        ("job/odd", 1, "1 -> 2"), ("job/odd", 2, "2 -> 3"),
    ]  # fmt: skip
    assert verify.verify(database_url).ok
    # PostgreSQL's function appended plain's second event only: its first is its lane's first
    # (a new database), and odd's repository is outside the alphabet the function writes.
    assert len(linked) == (1 if database_url.startswith("postgresql") else 0), linked


def test_a_guarded_append_on_postgresql_is_one_statement(postgres_url: str) -> None:
    """Once the event's lane has a head, the guard and the append are one statement."""
    with session_scope() as session:
        _a_job(session, "j1", "team/app")
        events.append(session, stream="job/j1", type="job.enqueued", actor="x", job_id="j1")
    with _statements(postgres_url) as statements, session_scope() as session:
        row = _retag(session, "j1", "1", "2")
    assert row == {"id": "j1", "tag": "2"}
    assert len(statements) == 1, statements
    assert statements[0].startswith("WITH guard AS (UPDATE push_jobs"), statements
    assert "pushworker_append_event" in statements[0]
    assert _tag_and_types("j1") == ("2", ["job.enqueued", "job.retagged"])


def test_a_guarded_append_the_database_hashes_otherwise_undoes_its_guard(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database function that hashed differently fails the guarded append before the
    transaction commits: neither the event nor the guard's change is kept."""
    with session_scope() as session:
        _a_job(session, "j1", "team/app")
        events.append(session, stream="job/j1", type="job.enqueued", actor="x", job_id="j1")
    _hash_otherwise(monkeypatch)
    with pytest.raises(StorageError, match="does not compute"), session_scope() as session:
        _retag(session, "j1", "1", "2")
    assert _tag_and_types("j1") == ("1", ["job.enqueued"])


def test_a_guarded_append_gives_its_event_the_time_in_utc(postgres_url: str) -> None:
    """Whatever the session's TimeZone, the event the guarded append logs and publishes has its
    time in UTC, as every other append's."""
    with session_scope() as session:
        _a_job(session, "j1", "team/app")
        events.append(session, stream="job/j1", type="job.enqueued", actor="x", job_id="j1")
    with session_scope() as session:
        session.execute(text("SET LOCAL TIME ZONE 'Asia/Kolkata'"))
        assert _retag(session, "j1", "1", "2") is not None
        logged = session.info["pending_event_logs"][-1]
        assert logged.type == "job.retagged"
        assert logged.time.utcoffset() == timedelta(0), logged.time


def test_a_guard_breaking_a_constraint_is_raised_as_it_is(database_url: str) -> None:
    """A guard's own row change that breaks a constraint is a bug, not a clash with another
    writer: the driver's error comes through (no retries), and nothing is appended."""
    broken = events.Guard(
        "UPDATE push_jobs SET effective_registry_id = 999 WHERE id = :k_job_id RETURNING id", ()
    )
    with session_scope() as session:
        _a_job(session, "j1", "team/app")
        events.append(session, stream="job/j1", type="job.enqueued", actor="x", job_id="j1")
    with pytest.raises(IntegrityError), session_scope() as session:
        events.append_guarded(
            session, broken, {"k_job_id": "j1"}, stream="job/j1", type="t", actor="x"
        )
    assert _tag_and_types("j1") == ("1", ["job.enqueued"])


def test_a_guard_naming_a_value_as_the_append_does_is_refused() -> None:
    """One statement binds the guard's values and the event's: a guard that names one as the
    append does is refused when it is made, not when it would have set the event's value."""
    with pytest.raises(ValueError, match=r"\['job_id', 'step'\]"):
        events.Guard("UPDATE step_runs SET owner = NULL WHERE job_id = :job_id AND step = :step "
                     "RETURNING attempts", ())  # fmt: skip
    events.Guard("UPDATE t SET a = :k_step::text RETURNING 1", ())  # a cast is not a name


def test_time_range_and_newest_first(database_url: str) -> None:
    with session_scope() as session:
        for _ in range(3):
            events.append(session, stream="job/a", type="t", actor="x")
    with session_scope() as session:
        rows = queries.select_events(session)
        middle = rows[1].time
        assert [r.seq for r in queries.select_events(session, since=middle)] == [2, 3]
        assert [r.seq for r in queries.select_events(session, until=middle)] == [1]
        newest = queries.select_events(session, newest_first=True, limit=2)
        assert [r.seq for r in newest] == [3, 2]
        assert [r.seq for r in queries.select_events(session, after_id=rows[0].id)] == [2, 3]


# --- what the database itself refuses ---------------------------------------------------------


def _add_checkpoint(conn: Connection, last_event_id: int) -> None:
    from worker.store.models import EventCheckpoint, utcnow

    conn.execute(
        insert(cast(Table, EventCheckpoint.__table__)).values(
            first_event_id=1, last_event_id=last_event_id, last_hash="0" * 64, count=1,
            cutoff=utcnow(), time=utcnow(), actor="test",
        )
    )  # fmt: skip


def test_delete_is_allowed_only_below_a_checkpoint(database_url: str) -> None:
    """Retention's one exception: rows up to the latest checkpoint may go, no others."""
    with session_scope() as session:
        for _ in range(3):
            events.append(session, stream="job/a", type="t", actor="x")
    engine = engine_for(database_url)
    with engine.begin() as conn:
        _add_checkpoint(conn, 2)
    with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
        conn.execute(text("DELETE FROM events"))
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM events WHERE id <= 2"))
    with session_scope() as session:
        assert [e.seq for e in queries.select_events(session)] == [3]


@pytest.mark.parametrize(
    "statement", ["UPDATE event_checkpoints SET count = 0", "DELETE FROM event_checkpoints"]
)
def test_checkpoints_are_append_only(database_url: str, statement: str) -> None:
    engine = engine_for(database_url)
    with engine.begin() as conn:
        _add_checkpoint(conn, 1)
    with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
        conn.execute(text(statement))


@pytest.mark.parametrize("table", ["events", "event_checkpoints"])
def test_postgres_refuses_truncate(postgres_url: str, table: str) -> None:
    """TRUNCATE skips row triggers; a statement trigger refuses it."""
    with pytest.raises(DBAPIError, match="append-only"), engine_for(postgres_url).begin() as conn:
        conn.execute(text(f"TRUNCATE {table}"))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_at_0002(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """An empty database migrated up to 0002 only (before the chain)."""
    from worker.store.migrate import upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
        upgrade(url, "0002")
        yield use_database(monkeypatch, url)
        return
    server = str(request.getfixturevalue("postgres_server"))
    name = f"pushworker_old_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = server.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url, "0002")
    yield use_database(monkeypatch, url)
    engine_for(url).dispose()
    engine_for.cache_clear()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_migration_chains_the_events_that_exist_already(database_at_0002: str) -> None:
    """Events written before 0003 are chained by it, in id order, and then verify."""
    from worker.store import verify
    from worker.store.migrate import upgrade
    from worker.store.models import PushJob, Registry, utcnow

    url = database_at_0002
    old_events = table(
        "events", *(column(n) for n in ("stream", "seq", "job_id", "type", "registry_id")),
        column("actor"), column("time", UTCDateTime()), column("payload", JSON()),
    )  # fmt: skip
    old = engine_for(url)
    with old.begin() as conn:
        now = utcnow()
        conn.execute(insert(cast(Table, Registry.__table__)).values(
            id=5, name="h", url="https://h", host="h", kind="generic", auth_required=True,
            insecure=False, fallback_chain=[], created_at=now, updated_at=now,
        ))  # fmt: skip
        conn.execute(insert(cast(Table, PushJob.__table__)).values(
            id="j1", source_image="a:1", repository="team/app", tag="1",
            requested_registry_id=5, effective_registry_id=5, fallback_chain=[],
            status="failed", attempt=1, requested_by="t", created_at=now, updated_at=now,
        ))  # fmt: skip
        for seq, type in enumerate(["job.enqueued", "step.failed", "job.failed"], 1):
            conn.execute(insert(old_events).values(
                stream="job/j1", seq=seq, job_id="j1", type=type, registry_id=5, actor="w",
                time=now + timedelta(seconds=seq), payload={"retry_in": 0.5},
            ))  # fmt: skip
    old.dispose()
    engine_for.cache_clear()
    upgrade(url)
    report = verify.verify(url)
    assert report.ok and report.checked == 3, report.to_dict()
    with session_scope() as session:
        rows = queries.select_events(session)
        assert [(r.repository, r.outcome) for r in rows] == [
            ("team/app", None), ("team/app", "failed"), ("team/app", "failed"),
        ]  # fmt: skip
        events.append(session, stream="job/j1", type="job.retried", actor="x", job_id="j1")
    assert verify.verify(url).ok
    with pytest.raises(DBAPIError, match="append-only"), engine_for(url).begin() as conn:
        conn.execute(text("UPDATE events SET type = 'x'"))
    with pytest.raises(DBAPIError, match="append-only"), engine_for(url).begin() as conn:
        conn.execute(text("DELETE FROM events"))


def test_migration_downgrades_and_upgrades_again(database_url: str) -> None:
    """0003 is reversible; the triggers of 0001 are back after the downgrade."""
    from alembic import command

    from worker.store.migrate import alembic_config

    with session_scope() as session:
        events.append(session, stream="job/a", type="t", actor="x")
    engine_for(database_url).dispose()
    command.downgrade(alembic_config(database_url), "0002")
    with pytest.raises(DBAPIError, match="append-only"), engine_for(database_url).begin() as c:
        c.execute(text("DELETE FROM events"))
    with pytest.raises(DBAPIError, match="append-only"), engine_for(database_url).begin() as c:
        c.execute(text("UPDATE events SET type = 'x'"))
    engine_for(database_url).dispose()
    command.upgrade(alembic_config(database_url), "head")
    from worker.store import verify

    assert verify.verify(database_url).ok


def _v1_log(url: str, count: int) -> list[dict[str, Any]]:
    """A log as the global chain wrote it, before the lanes: at revision 0009, version-1 hashes,
    each event linked to the one before it in id order."""
    from alembic import command

    from worker.store.migrate import alembic_config

    engine_for(url).dispose()
    command.downgrade(alembic_config(url), "0009")
    written: list[dict[str, Any]] = []
    prev = chain.GENESIS_HASH
    with engine_for(url).begin() as conn:
        for n in range(count):
            record: dict[str, Any] = {
                "id": n + 1, "stream": f"job/{n % 3}", "seq": n // 3 + 1, "job_id": None,
                "time": datetime(2026, 1, 1, tzinfo=UTC), "type": "step.started",
                "step": None, "registry_id": None, "attempt": None, "actor": "worker:old",
                "payload": {"reason": f"n{n}"}, "repository": None, "outcome": None,
                "prev_hash": prev,
            }  # fmt: skip
            record["hash"] = prev = chain.chain_hash(record)
            conn.execute(
                text(
                    "INSERT INTO events (id, stream, seq, job_id, time, type, step, registry_id,"
                    " attempt, actor, payload, repository, outcome, prev_hash, hash) VALUES (:id,"
                    " :stream, :seq, :job_id, :time, :type, :step, :registry_id, :attempt, :actor,"
                    " :payload, :repository, :outcome, :prev_hash, :hash)"
                ),
                {**record, "payload": json.dumps(record["payload"])},
            )
            written.append(record)
        if conn.dialect.name == "postgresql":  # as if the sequence had given these ids
            conn.execute(text("SELECT setval('events_id_seq', (SELECT max(id) FROM events))"))
    engine_for(url).dispose()
    command.upgrade(alembic_config(url), "head")
    return written


def test_an_existing_chain_is_migrated_to_lanes_untouched(database_url: str) -> None:
    """Migration 0010 re-hashes nothing: the version-1 events keep their hashes and still verify
    as one chain; every lane's first event links to the last of them (the epoch's root)."""
    from worker.store import verify

    old = _v1_log(database_url, 7)
    with session_scope() as session:
        stored = [(r.id, r.hash, r.lane) for r in queries.select_events(session)]
    assert stored == [(r["id"], r["hash"], None) for r in old]
    with session_scope() as session:
        new = [
            events.append(session, stream=stream, type="t", actor="worker:new")
            for stream in ("job/0", "registry/1", "job/0")
        ]
    assert new[0].prev_hash == new[1].prev_hash == old[-1]["hash"]
    assert new[2].prev_hash == new[0].hash and new[0].id > old[-1]["id"]
    report = verify.verify(database_url)
    assert report.ok, report.to_dict()
    assert report.heads["v1"] == [old[-1]["id"], old[-1]["hash"]]
    assert report.checked == 10


def test_a_migrated_chain_cut_at_its_end_is_caught(database_url: str) -> None:
    """The last version-1 event is the lanes' root, recorded by the migration: removing it (or
    the whole version-1 tail) is named, even though no lane links to it yet."""
    from tests.integration.test_audit import attacker
    from worker.store import verify

    old = _v1_log(database_url, 4)
    with attacker(database_url) as conn:
        conn.execute(text("DELETE FROM events WHERE id >= 3"))
    problems = verify.verify(database_url).problems
    assert [(p.event_id, p.kind) for p in problems] == [(old[-1]["id"], "sealed")]


def test_an_event_in_the_old_chain_after_the_migration_is_named(database_url: str) -> None:
    """A worker older than 0010 still running after it would write version-1 events."""
    from tests.integration.test_audit import attacker
    from worker.store import verify

    old = _v1_log(database_url, 2)
    record = {**old[-1], "id": 3, "seq": 9, "prev_hash": old[-1]["hash"]}
    record["hash"] = chain.chain_hash(record)
    with attacker(database_url) as conn:
        conn.execute(
            text(
                "INSERT INTO events (id, stream, seq, job_id, time, type, actor, payload,"
                " prev_hash, hash) VALUES (:id, :stream, :seq, :job_id, :time, :type, :actor,"
                " :payload, :prev_hash, :hash)"
            ),
            {**record, "payload": json.dumps(record["payload"])},
        )
    problems = verify.verify(database_url).problems
    assert [(p.event_id, p.kind) for p in problems] == [(3, "unexpected")]
