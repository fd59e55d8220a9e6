"""What a job sends PostgreSQL, statement by statement: each of a step's transactions is as
short as the design makes it (every statement a round trip to a database across a network).

A regression here (an append or a row change that went back to its own statement) costs every
job a round trip; ``bench.roundtrips`` measures what each costs.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import event

from tests.support.fakes import FakeWorld, fake_runner
from worker.core.settings import Settings
from worker.jobs import PushRequest, create_job
from worker.registries import RegistrySpec, create_registry
from worker.store import events
from worker.store.chain import LANES, lane_of
from worker.store.db import engine_for, session_scope

SOURCE = "app:build"


def _kind(statement: str) -> str:
    """A statement named by what it is: ``append``, ``claim`` or its first words."""
    flat = " ".join(statement.split())
    if flat.startswith("WITH claim AS (INSERT INTO step_runs"):
        return "claim + job running + append" if "pushworker_append_event" in flat else "claim"
    if flat.startswith("WITH finished AS (UPDATE step_runs"):
        return "claim ended + job succeeded + append"
    if flat.startswith("WITH guard AS (UPDATE step_runs"):
        return "claim ended + append"
    if flat.startswith("SELECT * FROM pushworker_append_event"):
        return "append"
    if flat.startswith("SELECT push_jobs.id"):
        return "read job, claim, registry"
    return " ".join(re.findall(r"[A-Za-z_]+", flat)[:3])


def test_a_job_on_postgresql_is_eight_short_transactions(postgres_url: str) -> None:
    """Once every lane of the log has a head (the common case), a job is the producer's
    transaction and two a step (one for the local first step): three statements in the first
    two, then two for each claim and one for each record (the last step's: two)."""
    with session_scope() as session:
        spec = RegistrySpec(name="r", url="https://reg.example.com", username="u", secret="pw")
        create_registry(session, spec, registry_id=5)
        for lane in range(LANES):
            stream = next(f"warm/{n}" for n in range(10_000) if lane_of(f"warm/{n}") == lane)
            events.append(session, stream=stream, type="lane.started", actor="test")
    world = FakeWorld(images={SOURCE: "sha256:image1"})
    _, dispatcher = fake_runner(world, Settings.from_env())
    transactions: list[list[str]] = []

    def begun(_connection: Any) -> None:
        transactions.append([])

    def executed(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        transactions[-1].append(_kind(statement))

    engine = engine_for(postgres_url)
    event.listen(engine, "begin", begun)
    event.listen(engine, "before_cursor_execute", executed)
    try:
        with session_scope() as session:
            job, _ = create_job(
                session, PushRequest(SOURCE, 5, "team/app", "v1", "t"), actor="producer:t"
            )
            job_id = job.id
        dispatcher.start_chain(job_id, 5)
    finally:
        event.remove(engine, "begin", begun)
        event.remove(engine, "before_cursor_execute", executed)
    claim = ["read job, claim, registry", "claim + job running + append"]
    assert transactions == [
        ["SELECT registries id", "INSERT INTO push_jobs", "append"],  # the producer's
        [*claim, "claim ended + append"],  # resolve_credentials: local, one transaction
        claim, ["claim ended + append"],  # login
        claim, ["claim ended + append"],  # tag
        claim, ["claim ended + job succeeded + append", "append"],  # push, job.succeeded
    ]  # fmt: skip
