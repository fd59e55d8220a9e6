"""Contract of the event store, on SQLite and on PostgreSQL alike."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from worker import events
from worker.db import engine_for, session_scope
from worker.errors import EventConflict, ValidationError


def test_append_numbers_each_stream_from_one(database_url: str) -> None:
    """Sequence numbers are per stream, gapless, and select returns them in order."""
    with session_scope() as session:
        for stream in ("job/a", "job/b", "job/a"):
            events.append(session, stream=stream, type="t", actor="test", job_id=stream[-1])
    with session_scope() as session:
        rows = events.select_events(session, stream="job/a")
        assert [(r.stream, r.seq) for r in rows] == [("job/a", 1), ("job/a", 2)]
        assert [r.seq for r in events.select_events(session, job_id="b")] == [1]


def test_select_filters_combine(database_url: str) -> None:
    with session_scope() as session:
        events.append(session, stream="job/a", type="job.failed", actor="w", registry_id=5)
        events.append(session, stream="job/b", type="job.failed", actor="w", registry_id=4)
        events.append(session, stream="job/b", type="job.retried", actor="operator:x")
    with session_scope() as session:
        failed_at_5 = events.select_events(session, registry_id=5, types=["job.failed"])
        assert [e.stream for e in failed_at_5] == ["job/a"]
        assert [e.type for e in events.select_events(session, actor="operator:x")] == [
            "job.retried"
        ]


def test_duplicate_sequence_number_is_the_projects_own_error(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer with a stale read of the last seq clashes on UNIQUE(stream, seq): EventConflict."""
    with session_scope() as session:
        events.append(session, stream="job/a", type="t", actor="test")
    with pytest.raises(EventConflict, match="job/a"), session_scope() as session:
        # Another writer appended between this writer's read and its insert: the read is stale.
        monkeypatch.setattr(session, "scalar", lambda *_a, **_k: 0)
        events.append(session, stream="job/a", type="t", actor="late")
    with session_scope() as session:
        assert [e.actor for e in events.select_events(session, stream="job/a")] == ["test"]


def test_payload_keys_pass_an_allow_list(database_url: str) -> None:
    """A payload key outside the allow-list (such as 'password') is refused."""
    with pytest.raises(ValidationError, match="password"), session_scope() as session:
        events.append(session, stream="job/a", type="t", actor="x", payload={"password": "p"})


@pytest.mark.parametrize("statement", ["UPDATE events SET type = 'x'", "DELETE FROM events"])
def test_the_database_refuses_to_change_events(database_url: str, statement: str) -> None:
    """Append-only is enforced by triggers, for any client that connects."""
    with session_scope() as session:
        events.append(session, stream="job/a", type="t", actor="x")
    with pytest.raises(DBAPIError, match="append-only"), engine_for(database_url).begin() as conn:
        conn.execute(text(statement))
    with session_scope() as session:
        assert [e.type for e in events.select_events(session)] == ["t"]
