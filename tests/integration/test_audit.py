"""Verify, export and retention of the event log, on SQLite and PostgreSQL alike.

Tampering is done the way an attacker with database access would: straight in the tables,
with the append-only triggers bypassed on purpose (dropped on SQLite, replication mode on
PostgreSQL), then ``verify`` must catch it and name the event.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from click.testing import CliRunner
from sqlalchemy import Connection, Table, delete, insert, select, text, update

from worker.cli import cli
from worker.core.errors import StorageError, ValidationError
from worker.core.settings import get_settings
from worker.store import chain, events, export, queries, retention, seals, verify
from worker.store.db import engine_for, read_snapshot, session_scope
from worker.store.models import Event, EventCheckpoint, EventSeal, utcnow

EVENTS = cast(Table, Event.__table__)


def streams_in_lane(lane: int, count: int) -> list[str]:
    """``count`` stream names whose events all go to ``lane``."""
    found = (f"job/{n}" for n in itertools.count())
    return list(itertools.islice((s for s in found if chain.lane_of(s) == lane), count))


#: Three jobs that share one lane: their events form one chain, as every event did before the
#: lanes, so a change anywhere shows in the links after it.
SHARED_LANE = 7
JOBS = [stream.removeprefix("job/") for stream in streams_in_lane(SHARED_LANE, 3)]


def _append_many(count: int, *, streams: int = 3) -> list[int]:
    ids = []
    with session_scope() as session:
        for n in range(count):
            job = JOBS[n % streams]
            row = events.append(
                session, stream=f"job/{job}", type="step.started", actor="worker:a",
                job_id=job, registry_id=5, payload={"reason": f"n{n}"},
            )  # fmt: skip
            ids.append(row.id)
    return ids


@contextmanager
def attacker(url: str) -> Iterator[Connection]:
    """A connection that writes past the triggers, as someone with database access could."""
    engine = engine_for(url)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL session_replication_role = replica"))
        else:
            for trigger in ("events_no_update", "events_no_delete"):
                conn.execute(text(f"DROP TRIGGER IF EXISTS {trigger}"))
        yield conn


def _row(conn: Connection, event_id: int) -> dict[str, Any]:
    return dict(conn.execute(select(EVENTS).where(EVENTS.c.id == event_id)).one()._mapping)


def _problem(report: verify.VerifyReport) -> verify.Problem:
    assert not report.ok, report.to_dict()
    first = report.first_problem
    assert first is not None
    return first


# --- verify -------------------------------------------------------------------------------------


def test_an_untouched_log_verifies(database_url: str) -> None:
    assert verify.verify().to_dict() == {
        "ok": True, "checked": 0, "first_id": None, "head_id": None, "head_hash": None,
        "heads": {}, "seal": None, "checkpoint": None, "problem_count": 0, "problems": [],
    }  # fmt: skip
    ids = _append_many(20)
    report = verify.verify()
    assert report.ok and report.checked == 20
    assert (report.first_id, report.head_id) == (ids[0], ids[-1])


def test_an_altered_payload_is_named(database_url: str) -> None:
    ids = _append_many(10)
    with attacker(database_url) as conn:
        conn.execute(
            update(EVENTS).where(EVENTS.c.id == ids[4]).values(payload={"reason": "nothing"})
        )
    problem = _problem(verify.verify())
    assert (problem.event_id, problem.kind) == (ids[4], "altered")
    assert f"event {ids[4]} " in problem.message
    assert verify.verify().problem_count == 1  # the next event still links: only one change


@pytest.mark.parametrize("column", ["time", "actor", "type", "registry_id", "outcome"])
def test_any_altered_column_is_named(database_url: str, column: str) -> None:
    ids = _append_many(5)
    values: dict[str, Any] = {
        "time": utcnow(), "actor": "operator:mallory", "type": "step.succeeded",
        "registry_id": 4, "outcome": "succeeded",
    }  # fmt: skip
    with attacker(database_url) as conn:
        conn.execute(update(EVENTS).where(EVENTS.c.id == ids[2]).values({column: values[column]}))
    problem = _problem(verify.verify())
    assert (problem.event_id, problem.kind) == (ids[2], "altered")


def test_a_deleted_event_is_named(database_url: str) -> None:
    ids = _append_many(10)
    with attacker(database_url) as conn:
        conn.execute(delete(EVENTS).where(EVENTS.c.id == ids[6]))
    problem = _problem(verify.verify())
    assert (problem.event_id, problem.kind) == (ids[7], "removed")
    assert f"after event {ids[5]}" in problem.message


def test_a_deleted_first_event_is_named(database_url: str) -> None:
    ids = _append_many(3)
    with attacker(database_url) as conn:
        conn.execute(delete(EVENTS).where(EVENTS.c.id == ids[0]))
    problem = _problem(verify.verify())
    assert (problem.event_id, problem.kind) == (ids[1], "removed")


def test_a_whole_jobs_history_deleted_is_caught(database_url: str) -> None:
    """What a per-job chain would miss: every event of one job gone."""
    ids = _append_many(9, streams=3)
    with attacker(database_url) as conn:
        conn.execute(delete(EVENTS).where(EVENTS.c.job_id == JOBS[1]))
    problem = _problem(verify.verify())
    assert (problem.event_id, problem.kind) == (ids[2], "removed")


def test_two_swapped_events_are_named(database_url: str) -> None:
    """Rows swapped whole (hashes and all): the id is hashed, so each is named as altered, and
    the event after them follows a hash that now comes earlier in the order."""
    ids = _append_many(10)
    a, b = ids[3], ids[4]
    with attacker(database_url) as conn:
        conn.execute(update(EVENTS).where(EVENTS.c.id == a).values(id=-1))
        conn.execute(update(EVENTS).where(EVENTS.c.id == b).values(id=a))
        conn.execute(update(EVENTS).where(EVENTS.c.id == -1).values(id=b))
    report = verify.verify()
    assert [(p.event_id, p.kind) for p in report.problems] == [
        (a, "altered"), (b, "altered"), (ids[5], "reordered")
    ]  # fmt: skip


def test_an_event_moved_to_another_lane_is_named(database_url: str) -> None:
    ids = _append_many(4)
    with attacker(database_url) as conn:
        conn.execute(update(EVENTS).where(EVENTS.c.id == ids[3]).values(lane=SHARED_LANE + 1))
    assert [(p.event_id, p.kind) for p in verify.verify().problems] == [(ids[3], "altered")]


def test_a_job_alone_in_its_lane_deleted_whole_is_caught_by_the_seal(database_url: str) -> None:
    """The one change a lane's links cannot show: every event of a lane's tail gone (here a
    job alone in its lane). Once sealed, the seal names the lane's head, which must be there."""
    lone = streams_in_lane(SHARED_LANE + 3, 1)[0]
    _append_many(3)
    with session_scope() as session:
        lone_ids = [
            events.append(session, stream=lone, type="t", actor="x", job_id=lone[4:]).id
            for _ in range(3)
        ]
    sealed = seals.seal(actor="operator:a")
    assert sealed.created and sealed.lanes == 2
    _append_many(3)  # the other lane moves on after the seal
    with attacker(database_url) as conn:
        conn.execute(delete(EVENTS).where(EVENTS.c.stream == lone))
    report = verify.verify()
    assert [(p.event_id, p.kind) for p in report.problems] == [(lone_ids[-1], "sealed")]
    assert f"seal {sealed.id}" in report.problems[0].message


def test_a_seal_altered_or_removed_is_named(database_url: str) -> None:
    _append_many(2)
    first = seals.seal(actor="operator:a")
    assert not seals.seal(actor="operator:a").created  # nothing moved: no new seal
    _append_many(2)
    second = seals.seal(actor="operator:a")
    assert second.created and second.id == (first.id or 0) + 1
    assert verify.verify(seal_anchors={second.id or 0: second.hash or ""}).ok
    with attacker(database_url) as conn:
        if conn.dialect.name == "sqlite":
            conn.execute(text("DROP TRIGGER IF EXISTS event_seals_no_delete"))
        conn.execute(delete(EventSeal).where(EventSeal.id == second.id))
    # The newest seal gone: only a seal kept elsewhere tells.
    assert verify.verify().ok
    report = verify.verify(seal_anchors={second.id or 0: second.hash or ""})
    assert [p.kind for p in report.problems] == ["anchor"]
    with attacker(database_url) as conn:
        if conn.dialect.name == "sqlite":
            conn.execute(text("DROP TRIGGER IF EXISTS event_seals_no_update"))
        conn.execute(update(EventSeal).where(EventSeal.id == first.id).values(heads={}))
    assert [p.kind for p in verify.verify().problems] == ["seal"]


def test_an_altered_and_rehashed_event_breaks_the_next_link(database_url: str) -> None:
    ids = _append_many(6)
    with attacker(database_url) as conn:
        row = _row(conn, ids[2])
        record = {**row, "time": row["time"], "payload": {"reason": "forged"}}
        conn.execute(
            update(EVENTS)
            .where(EVENTS.c.id == ids[2])
            .values(payload={"reason": "forged"}, hash=chain.chain_hash(record))
        )
    problem = _problem(verify.verify())
    assert (problem.event_id, problem.kind) == (ids[3], "removed")
    assert f"event {ids[2]} was altered and re-hashed" in problem.message


def test_an_inserted_event_is_named(database_url: str) -> None:
    """A forged event slipped in between two others (with a fresh id) breaks the link after it."""
    ids = _append_many(4)
    with attacker(database_url) as conn:
        conn.execute(delete(EVENTS).where(EVENTS.c.id.in_(ids[2:])))
        kept = [_row(conn, ids[0]), _row(conn, ids[1])]
    with attacker(database_url) as conn:
        forged = {**kept[1], "id": ids[-1] + 10, "seq": 99, "actor": "operator:mallory"}
        forged["prev_hash"] = kept[1]["hash"]
        forged["hash"] = chain.chain_hash(forged)
        conn.execute(insert(EVENTS).values(forged))
    assert verify.verify().ok  # appended at the end with a right link: only an anchor tells
    anchored = verify.verify(anchors={ids[-1]: "f" * 64})
    assert _problem(anchored).kind == "anchor"


def test_a_cut_off_tail_is_caught_by_an_anchor(database_url: str) -> None:
    ids = _append_many(5)
    head = verify.verify()
    assert head.head_id == ids[-1] and head.head_hash
    with attacker(database_url) as conn:
        conn.execute(delete(EVENTS).where(EVENTS.c.id >= ids[3]))
    assert verify.verify().ok  # a truncated chain is still a chain
    report = verify.verify(anchors={head.head_id: head.head_hash})
    problem = _problem(report)
    assert (problem.event_id, problem.kind) == (ids[-1], "anchor")
    with session_scope() as session:
        events.append(session, stream="job/0", type="t", actor="x")
    assert verify.verify(anchors={ids[1]: _hash_of(ids[1])}).ok


def _hash_of(event_id: int) -> str:
    with session_scope() as session:
        row = session.get(Event, event_id)
        assert row is not None
        return row.hash


def test_a_log_broken_everywhere_is_reported_in_bounded_memory() -> None:
    """Every link broken: every problem counted, the first MAX_PROBLEMS kept, in order."""
    checker = verify.ChainChecker({})
    count = verify.MAX_PROBLEMS * 3
    for n in range(1, count + 1):
        record = {
            "id": n, "stream": "s", "seq": n, "job_id": None, "time": "2026-01-01T00:00:00Z",
            "type": "t", "step": None, "registry_id": None, "attempt": None, "actor": "a",
            "payload": {}, "repository": None, "outcome": None, "prev_hash": f"{n:064x}",
        }  # fmt: skip
        record["hash"] = chain.chain_hash(record)
        checker.feed(record)
    report = checker.finish()
    assert report.problem_count == count
    assert [p.event_id for p in report.problems] == list(range(1, verify.MAX_PROBLEMS + 1))
    assert {p.kind for p in report.problems} == {"removed"}


# --- concurrent writers -------------------------------------------------------------------------


def _writer(
    url: str,
    name: str,
    start: Any,
    transactions: int,
    per_transaction: int,
    streams: list[str] | None = None,
    pause: float = 0.02,
) -> None:
    os.environ["PUSHWORKER_DATABASE_URL"] = url
    get_settings.cache_clear()
    engine_for(url).connect().close()
    start.wait(60)
    for t in range(transactions):
        with session_scope() as session:
            for n in range(per_transaction):
                stream = streams[t % len(streams)] if streams else f"job/{name}-{t % 3}"
                events.append(
                    session, stream=stream, type="step.progress", actor=name,
                    payload={"bytes_pushed": n},
                )  # fmt: skip
        time.sleep(pause)  # a worker does other things between two transactions


def _run_writers(database_url: str, arguments: list[tuple[Any, ...]]) -> None:
    """One ``_writer`` process per entry of ``arguments`` (its arguments after the name and
    the start barrier), started together; each must exit cleanly."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(len(arguments))
    processes = [
        context.Process(target=_writer, args=(database_url, f"w{n}", start, *extra))
        for n, extra in enumerate(arguments)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0


def test_concurrent_writers_in_several_processes_keep_one_chain(database_url: str) -> None:
    """Four processes append at once (several events per transaction, shared streams)."""
    _run_writers(database_url, [(10, 2)] * 4)
    report = verify.verify()
    assert report.ok, report.to_dict()
    assert report.checked == 4 * 10 * 2
    with session_scope() as session:
        actors = [row.actor for row in queries.select_events(session)]
    switches = sum(1 for a, b in itertools.pairwise(actors) if a != b)
    assert switches > 4, "the writers did not overlap"


def test_writers_of_one_lane_in_several_processes_keep_its_chain(database_url: str) -> None:
    """Four processes append without pause to different streams of one lane: each waits for the
    lane's lock and must then read the head the one before it committed (on PostgreSQL, a read
    in a snapshot taken before the lock was granted would link to a stale head)."""
    lane_streams = streams_in_lane(SHARED_LANE + 5, 8)
    _run_writers(database_url, [(25, 2, lane_streams[2 * n : 2 * n + 2], 0.0) for n in range(4)])
    report = verify.verify()
    assert report.ok, report.to_dict()
    assert report.checked == 4 * 25 * 2 and list(report.heads) == [str(SHARED_LANE + 5)]
    with session_scope() as session:
        actors = [row.actor for row in queries.select_events(session)]
    assert sum(1 for a, b in itertools.pairwise(actors) if a != b) > 4, "no overlap"


# --- export -------------------------------------------------------------------------------------


def test_export_jsonl_round_trips_and_verifies(database_url: str) -> None:
    _append_many(30)
    out = io.StringIO()
    assert export.export(out, "jsonl") == 30
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert list(records[0]) == list(queries.RECORD_FIELDS)
    checker = verify.ChainChecker({}, root=chain.GENESIS_HASH)
    for record in records:
        checker.feed(record)
    assert checker.finish().ok
    with session_scope() as session:
        assert records == [queries.event_fields(r) for r in queries.select_events(session)]


def test_export_filters_like_queries(database_url: str) -> None:
    _append_many(9, streams=3)
    with session_scope() as session:
        events.append(session, stream="registry/4", type="registry.tested", actor="operator:a",
                      registry_id=4, payload={"ok": False})  # fmt: skip
    out = io.StringIO()
    query = queries.EventQuery(job_id=JOBS[1])
    assert export.export(out, "jsonl", query) == 3
    assert {json.loads(line)["job_id"] for line in out.getvalue().splitlines()} == {JOBS[1]}
    out = io.StringIO()
    query = queries.EventQuery(registry_id=4, outcomes=["failed"], actor="operator:a")
    assert export.export(out, "csv", query) == 1
    (row,) = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert row["type"] == "registry.tested" and json.loads(row["payload"]) == {"ok": False}
    assert row["job_id"] == "" and row["outcome"] == "failed"


def test_export_refuses_an_unknown_format(database_url: str) -> None:
    with pytest.raises(ValidationError, match="xml"):
        export.export(io.StringIO(), "xml")


def test_export_streams_in_one_snapshot_without_blocking_writers(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer commits while an export is half-way: the export does not see it, and does not
    make it wait (on SQLite the writers' lock is not taken by readers)."""
    monkeypatch.setattr(queries, "PAGE_SIZE", 50)
    _append_many(50 * 2 + 5)
    with read_snapshot() as conn:
        records = queries.iter_records(conn, queries.EventQuery())
        first = next(records)
        with session_scope() as session:  # would wait 30 s, then fail, if the reader held it
            events.append(session, stream="job/x", type="t", actor="x")
        rest = list(records)
    assert first["seq"] == 1 and len(rest) == 50 * 2 + 4


# --- retention ----------------------------------------------------------------------------------


def _age_all(url: str, days: int) -> None:
    """Make every event older (time travel for the test; past the triggers)."""
    with attacker(url) as conn:
        rows = conn.execute(select(EVENTS)).all()
    # Re-write the log as it would have been written `days` ago, hashes and all.
    with attacker(url) as conn:
        conn.execute(delete(EVENTS))
        prev: dict[int, str] = {}
        for row in rows:
            record = dict(row._mapping)
            record["time"] = record["time"].replace(year=record["time"].year - 1)
            record["prev_hash"] = prev.get(record["lane"], chain.GENESIS_HASH)
            record["hash"] = prev[record["lane"]] = chain.chain_hash(record)
            conn.execute(insert(EVENTS).values(record))


def test_prune_archives_checkpoints_and_verify_still_passes(
    database_url: str, tmp_path: Path
) -> None:
    old = _append_many(10)
    _age_all(database_url, 365)
    recent = _append_many(3)
    archive = tmp_path / "events.jsonl"
    report = retention.prune(older_than_days=30, archive=archive, actor="operator:alice")
    assert (report.count, report.first_event_id, report.last_event_id) == (10, old[0], old[-1])
    lines = [json.loads(line) for line in archive.read_text().splitlines()]
    assert [line["id"] for line in lines] == old
    with session_scope() as session:
        remaining = queries.select_events(session)
        assert [r.id for r in remaining[:3]] == recent
        pruned = remaining[-1]
        assert (pruned.type, pruned.actor, pruned.stream) == (
            "events.pruned", "operator:alice", events.AUDIT_STREAM
        )  # fmt: skip
        assert pruned.payload["last_event_id"] == old[-1]
        assert pruned.payload["count"] == 10
        assert pruned.payload["archived_to"] == str(archive.resolve())
        (checkpoint,) = session.scalars(select(EventCheckpoint))
        assert (checkpoint.last_event_id, checkpoint.last_hash) == (old[-1], lines[-1]["hash"])
        assert checkpoint.archive_sha256 == report.archive_sha256
    after = verify.verify()
    assert after.ok, after.to_dict()
    assert after.checkpoint is not None and after.checkpoint["last_event_id"] == old[-1]
    assert verify.verify_archive(archive).ok
    # Writing goes on, and a second prune chains onto the first checkpoint.
    _append_many(2)
    second = retention.prune(older_than_days=0, archive=None, actor="operator:alice")
    assert second.first_event_id == recent[0]
    assert verify.verify().ok
    assert verify.verify_archive(archive).ok


def test_prune_with_nothing_old_enough_does_nothing(database_url: str) -> None:
    _append_many(3)
    report = retention.prune(older_than_days=1, archive=None, actor="operator:a")
    assert report.count == 0
    with session_scope() as session:
        assert len(queries.select_events(session)) == 3


def test_prune_refuses_to_destroy_evidence(database_url: str, tmp_path: Path) -> None:
    """A changed event in the part to prune: refused, nothing written, nothing deleted."""
    ids = _append_many(5)
    with attacker(database_url) as conn:
        conn.execute(update(EVENTS).where(EVENTS.c.id == ids[1]).values(actor="x"))
    archive = tmp_path / "a.jsonl"
    with pytest.raises(StorageError, match=f"event {ids[1]}"):
        retention.prune(older_than_days=0, archive=archive, actor="operator:a")
    assert not archive.exists() and not list(tmp_path.glob("*.partial"))
    with session_scope() as session:
        assert len(queries.select_events(session)) == 5


def test_prune_never_overwrites_an_archive(database_url: str, tmp_path: Path) -> None:
    _append_many(2)
    archive = tmp_path / "a.jsonl"
    archive.write_text("keep me\n")
    with pytest.raises(ValidationError, match="exists already"):
        retention.prune(older_than_days=0, archive=archive, actor="operator:a")
    assert archive.read_text() == "keep me\n"


def test_a_forged_checkpoint_does_not_verify(database_url: str) -> None:
    """Someone inserts a checkpoint to be allowed to delete: no events.pruned confirms it."""
    ids = _append_many(5)
    with session_scope() as session:
        row = session.get(Event, ids[2])
        assert row is not None
        session.add(EventCheckpoint(
            first_event_id=ids[0], last_event_id=ids[2], last_hash=row.hash, count=3,
            cutoff=utcnow(), time=utcnow(), actor="operator:mallory",
        ))  # fmt: skip
    with engine_for(database_url).begin() as conn:
        conn.execute(delete(EVENTS).where(EVENTS.c.id <= ids[2]))  # the trigger lets it through
    problems = verify.verify().problems
    assert any(p.kind == "checkpoint" and "not confirmed" in p.message for p in problems)


def test_an_event_restored_below_a_checkpoint_is_named(database_url: str) -> None:
    """Someone puts a pruned event back (from the archive, say): it should not be there."""
    ids = _append_many(4)
    retention.prune(older_than_days=0, archive=None, actor="operator:a")
    with session_scope() as session:
        assert session.get(Event, ids[1]) is None
    with attacker(database_url) as conn:
        conn.execute(
            insert(EVENTS).values(
                id=ids[1], stream="job/x", seq=1, time=utcnow(), type="t", actor="x",
                payload={}, prev_hash="0" * 64, hash="0" * 64,
            )
        )  # fmt: skip
    problem = _problem(verify.verify())
    assert (problem.event_id, problem.kind) == (ids[1], "unexpected")


def test_an_altered_archive_does_not_verify(database_url: str, tmp_path: Path) -> None:
    _append_many(4)
    archive = tmp_path / "a.jsonl"
    retention.prune(older_than_days=0, archive=archive, actor="operator:a")
    lines = archive.read_text().splitlines()
    record = json.loads(lines[1])
    record["actor"] = "operator:mallory"
    lines[1] = json.dumps(record)
    archive.write_text("\n".join(lines) + "\n")
    problem = _problem(verify.verify_archive(archive))
    assert (problem.event_id, problem.kind) == (record["id"], "altered")


# --- the CLI ------------------------------------------------------------------------------------


def _run(*args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def test_cli_verify_export_prune(database_url: str, tmp_path: Path) -> None:
    ids = _append_many(6)
    assert _run("events", "--job", JOBS[1], "--json").stdout.count(f'"job_id": "{JOBS[1]}"') == 2
    ok = _run("events", "verify")
    assert ok.stdout.startswith("ok: event log: 6 events") and f"head: {ids[-1]}:" in ok.stdout
    head = ok.stdout.split("head: ")[1].strip()
    assert _run("events", "verify", "--anchor", head).stdout.startswith("ok:")

    exported = tmp_path / "e.csv"
    _run("events", "export", "--format", "csv", "--job", JOBS[2], "--output", str(exported))
    assert len(list(csv.DictReader(exported.open()))) == 2
    jsonl = _run("events", "export", "--type", "step.started").stdout
    assert len(jsonl.splitlines()) == 6

    archive = tmp_path / "a.jsonl"
    _run("events", "prune", "--older-than", "1", code=2)  # neither --archive nor --discard
    pruned = _run("events", "prune", "--older-than", "0", "--archive", str(archive), "--json")
    assert json.loads(pruned.stdout)["count"] == 6
    assert _run("events", "verify").stdout.startswith("ok:")
    assert _run("events", "verify", "--archive", str(archive)).stdout.startswith("ok:")
    _append_many(2)
    with attacker(database_url) as conn:
        last = conn.execute(select(EVENTS.c.id).order_by(EVENTS.c.id.desc())).scalar()
        conn.execute(update(EVENTS).where(EVENTS.c.id == last).values(step="push"))
    failed = _run("events", "verify", code=StorageError.exit_code)
    assert f"first: event {last} (step.started) was altered" in failed.stdout
    report = json.loads(_run("events", "verify", "--json", code=StorageError.exit_code).stdout)
    assert report["problems"][0]["event_id"] == last


# --- signed seals -------------------------------------------------------------------------------


def _seal_row(conn: Connection, seal_id: int) -> dict[str, Any]:
    table = cast(Table, EventSeal.__table__)
    return dict(conn.execute(select(table).where(table.c.id == seal_id)).one()._mapping)


def _unguard_seals(conn: Connection) -> None:
    if conn.dialect.name == "sqlite":
        for action in ("update", "delete"):
            conn.execute(text(f"DROP TRIGGER IF EXISTS event_seals_no_{action}"))


def test_seals_are_signed_with_a_key_derived_from_the_secret_key(database_url: str) -> None:
    _append_many(3)
    sealed = seals.seal(actor="operator:a")
    report = verify.verify()
    assert report.ok and report.seal is not None
    assert report.seal["signature"] == "verified"
    with attacker(database_url) as conn:
        row = _seal_row(conn, sealed.id or 0)
    secret = get_settings().secret_key
    assert row["signature"] and row["key_id"] and secret
    # Neither the secret key nor the derived key is what is stored.
    assert secret not in (row["signature"], row["key_id"])


def test_a_rehashed_seal_without_the_key_does_not_verify(database_url: str) -> None:
    """Someone with the database and this code cuts a lane's tail and re-seals what is left:
    the hash and the links hold, the signature cannot be made without the key."""
    ids = _append_many(4)
    sealed = seals.seal(actor="operator:a")
    with attacker(database_url) as conn:
        _unguard_seals(conn)
        conn.execute(delete(EVENTS).where(EVENTS.c.id == ids[-1]))
        row = _seal_row(conn, sealed.id or 0)
        heads = {lane: [ids[-2], _hash_of_row(conn, ids[-2])] for lane in row["heads"]}
        forged = {**row, "heads": heads}
        forged["hash"] = seals.seal_hash(forged)
        conn.execute(
            update(EventSeal)
            .where(EventSeal.id == sealed.id)
            .values(heads=heads, hash=forged["hash"])
        )
    problems = verify.verify().problems
    assert [p.kind for p in problems] == ["seal"]
    assert "does not carry a valid signature" in problems[0].message
    # The same forgery with the signature removed: an unsigned latest seal where the key is.
    with attacker(database_url) as conn:
        _unguard_seals(conn)
        conn.execute(
            update(EventSeal).where(EventSeal.id == sealed.id).values(signature=None, key_id=None)
        )
    problems = verify.verify().problems
    assert [p.kind for p in problems] == ["seal"] and "unsigned" in problems[0].message


def test_a_seal_signed_with_another_key_is_reported_not_failed(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a key rotation the old seals cannot be checked here: said, not counted as forged."""
    from cryptography.fernet import Fernet

    _append_many(2)
    seals.seal(actor="operator:a")
    monkeypatch.setenv("PUSHWORKER_SECRET_KEY", Fernet.generate_key().decode())
    get_settings.cache_clear()
    report = verify.verify()
    assert report.ok and report.seal is not None
    assert report.seal["signature"] == "not checked: signed with another key"


def _hash_of_row(conn: Connection, event_id: int) -> str:
    return str(_row(conn, event_id)["hash"])
