"""The event log becomes a hash chain; indexed repository and outcome; retention checkpoints.

- ``events`` gains ``prev_hash`` and ``hash`` (the chain, see worker.store.chain), and
  ``repository`` and ``outcome`` (derived at append, indexed); existing events are chained here,
  in id order, with this migration's own frozen copy of version 1 of the canonical form.
- ``event_checkpoints``: where retention cut the chain. Append-only, like the events.
- The DELETE trigger on ``events`` now lets through exactly the events covered by a checkpoint
  (retention, ``worker.store.retention.prune``); every other DELETE is still refused. On
  PostgreSQL, TRUNCATE (which skips row triggers) is refused on both tables too.

Revision ID: 0003
Revises: 0002
"""

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

EVENT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
DELETE_REFUSED = "events are append-only: DELETE refused (only events covered by a checkpoint)"
_NEW_INDEXES = {
    "ix_events_registry_outcome_time": ["registry_id", "outcome", "time"],
    "ix_events_repository_type_time": ["repository", "type", "time"],
    "ix_events_actor_time": ["actor", "time"],
}


# --- version 1 of the chain, frozen as it was when this migration was written ----------------
# A migration must mean the same thing forever, so it does not import the live hashing code
# (worker.store.chain): a later chain version must not change what this backfill wrote.
# tests/unit/test_migrations_frozen.py checks that this copy still hashes like the live one;
# when it stops, the live code has a new CHAIN_VERSION and this copy stays as it is.

GENESIS_HASH = "0" * 64
CHAIN_VERSION = 1
HASHED_FIELDS = (
    "stream", "seq", "job_id", "time", "type", "step", "registry_id", "attempt", "actor",
    "payload", "repository", "outcome", "prev_hash",
)  # fmt: skip
_OUTCOME_OF_SUFFIX = {
    "succeeded": "succeeded",
    "failed": "failed",
    "skipped": "skipped",
    "cancelled": "cancelled",
}
_OUTCOME_OF_TYPE = {"fallback.applied": "fallback"}


def canonical_time(moment: datetime | str) -> str:
    """``2026-11-27T22:30:38.623908Z``: UTC, always with microseconds."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_json(record: Mapping[str, Any]) -> bytes:
    """Version 1 of the canonical form: the hashed fields as JSON with sorted keys, no
    whitespace, ASCII only, the time as ISO UTC with microseconds."""
    body = {name: record[name] for name in HASHED_FIELDS}
    body["time"] = canonical_time(record["time"])
    body["v"] = CHAIN_VERSION
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def chain_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``canonical_json(record)``; ``record`` must hold ``prev_hash``."""
    return hashlib.sha256(canonical_json(record)).hexdigest()


def derive_outcome(type: str, payload: Mapping[str, Any]) -> str | None:
    """The ``outcome`` column of an event of this type and payload (version 1)."""
    if type == "registry.tested":
        return "succeeded" if payload.get("ok") else "failed"
    if type in _OUTCOME_OF_TYPE:
        return _OUTCOME_OF_TYPE[type]
    return _OUTCOME_OF_SUFFIX.get(type.rsplit(".", 1)[-1])


# --- the migration ------------------------------------------------------------------------------


def _postgres() -> bool:
    return bool(op.get_bind().dialect.name == "postgresql")


def upgrade() -> None:
    op.create_table(
        "event_checkpoints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("first_event_id", EVENT_ID, nullable=False),
        sa.Column("last_event_id", EVENT_ID, nullable=False),
        sa.Column("last_hash", sa.String(length=64), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("cutoff", sa.DateTime(timezone=True), nullable=False),
        sa.Column("archived_to", sa.String(length=1000), nullable=True),
        sa.Column("archive_sha256", sa.String(length=64), nullable=True),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_event_checkpoints_last_event_id", "event_checkpoints", ["last_event_id"], unique=False
    )

    # NOT NULL with a default, so that existing rows get a value (SQLite cannot alter a column
    # afterwards without rebuilding the table); the backfill below replaces the defaults.
    op.add_column("events", sa.Column("repository", sa.String(length=255), nullable=True))
    op.add_column("events", sa.Column("outcome", sa.String(length=20), nullable=True))
    for name in ("prev_hash", "hash"):
        op.add_column(
            "events",
            sa.Column(name, sa.String(length=64), nullable=False, server_default=""),
        )
    _backfill_chain()
    if _postgres():
        for name in ("prev_hash", "hash"):
            op.alter_column("events", name, server_default=None)
    for name, columns in _NEW_INDEXES.items():
        op.create_index(name, "events", columns, unique=False)
    _guard_deletes()


def _backfill_chain() -> None:
    """Chain the events that exist already, in id order (the triggers are lifted meanwhile)."""
    bind = op.get_bind()
    if not bind.execute(sa.text("SELECT 1 FROM events LIMIT 1")).first():
        return
    if _postgres():
        op.execute("ALTER TABLE events DISABLE TRIGGER events_no_update")
    else:
        op.execute("DROP TRIGGER IF EXISTS events_no_update")
    events = sa.table(
        "events",
        *(sa.column(name) for name in ("id", "stream", "seq", "job_id", "type", "step")),
        *(sa.column(name) for name in ("registry_id", "attempt", "actor", "repository")),
        sa.column("time", sa.DateTime(timezone=True)),
        sa.column("payload", sa.JSON()),
        *(sa.column(name) for name in ("outcome", "prev_hash", "hash")),
    )
    jobs = sa.table("push_jobs", sa.column("id"), sa.column("repository"))
    prev_hash, last_id = GENESIS_HASH, None
    while True:
        query = (
            sa.select(events, jobs.c.repository.label("job_repository"))
            .select_from(events.outerjoin(jobs, jobs.c.id == events.c.job_id))
            .order_by(events.c.id)
            .limit(1000)
        )
        if last_id is not None:
            query = query.where(events.c.id > last_id)
        rows = bind.execute(query).mappings().all()
        if not rows:
            break
        updates: list[dict[str, Any]] = []
        for row in rows:
            record = dict(row)
            payload = record["payload"] or {}
            named = payload.get("repository")
            record["repository"] = named if isinstance(named, str) and named else None
            record["repository"] = record["repository"] or record["job_repository"]
            record["outcome"] = derive_outcome(record["type"], payload)
            record["payload"] = payload
            record["prev_hash"] = prev_hash
            prev_hash = chain_hash(record)
            updates.append(
                {
                    "b_id": record["id"],
                    "repository": record["repository"],
                    "outcome": record["outcome"],
                    "prev_hash": record["prev_hash"],
                    "hash": prev_hash,
                }
            )
            last_id = record["id"]
        bind.execute(
            events.update()
            .where(events.c.id == sa.bindparam("b_id"))
            .values(
                repository=sa.bindparam("repository"),
                outcome=sa.bindparam("outcome"),
                prev_hash=sa.bindparam("prev_hash"),
                hash=sa.bindparam("hash"),
            ),
            updates,
        )
    if _postgres():
        op.execute("ALTER TABLE events ENABLE TRIGGER events_no_update")
    else:
        op.execute(
            "CREATE TRIGGER events_no_update BEFORE UPDATE ON events "
            "BEGIN SELECT RAISE(ABORT, 'events are append-only: UPDATE refused'); END"
        )


def _guard_deletes() -> None:
    """DELETE only what a checkpoint covers; checkpoints themselves are append-only."""
    covered = "(SELECT MAX(last_event_id) FROM event_checkpoints)"
    if _postgres():
        op.execute("DROP TRIGGER IF EXISTS events_no_delete ON events")
        op.execute(
            f"""
            CREATE FUNCTION events_delete_guard() RETURNS trigger AS $$
            BEGIN
                IF OLD.id <= COALESCE({covered}, 0) THEN
                    RETURN OLD;
                END IF;
                RAISE EXCEPTION '{DELETE_REFUSED}';
            END;
            $$ LANGUAGE plpgsql
            """
        )
        op.execute(
            "CREATE TRIGGER events_no_delete BEFORE DELETE ON events "
            "FOR EACH ROW EXECUTE FUNCTION events_delete_guard()"
        )
        op.execute(
            """
            CREATE FUNCTION event_checkpoints_append_only() RETURNS trigger AS $$
            BEGIN
                RAISE EXCEPTION 'event checkpoints are append-only: % refused', TG_OP;
            END;
            $$ LANGUAGE plpgsql
            """
        )
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER event_checkpoints_no_{action.lower()} BEFORE {action} "
                "ON event_checkpoints FOR EACH ROW EXECUTE FUNCTION event_checkpoints_append_only()"
            )
        # TRUNCATE skips row triggers: refuse it with statement triggers.
        op.execute(
            "CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events "
            "FOR EACH STATEMENT EXECUTE FUNCTION events_append_only()"
        )
        op.execute(
            "CREATE TRIGGER event_checkpoints_no_truncate BEFORE TRUNCATE ON event_checkpoints "
            "FOR EACH STATEMENT EXECUTE FUNCTION event_checkpoints_append_only()"
        )
        return
    op.execute("DROP TRIGGER IF EXISTS events_no_delete")
    op.execute(
        f"CREATE TRIGGER events_no_delete BEFORE DELETE ON events "
        f"WHEN OLD.id > COALESCE({covered}, 0) "
        f"BEGIN SELECT RAISE(ABORT, '{DELETE_REFUSED}'); END"
    )
    for action in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER event_checkpoints_no_{action.lower()} BEFORE {action} "
            f"ON event_checkpoints BEGIN SELECT RAISE(ABORT, "
            f"'event checkpoints are append-only: {action} refused'); END"
        )


def downgrade() -> None:
    if _postgres():
        op.execute("DROP TRIGGER IF EXISTS events_no_truncate ON events")
        op.execute("DROP TRIGGER IF EXISTS events_no_delete ON events")
        op.execute("DROP FUNCTION IF EXISTS events_delete_guard()")
        op.execute(
            "CREATE TRIGGER events_no_delete BEFORE DELETE ON events "
            "FOR EACH ROW EXECUTE FUNCTION events_append_only()"
        )
        for action in ("update", "delete", "truncate"):
            op.execute(f"DROP TRIGGER IF EXISTS event_checkpoints_no_{action} ON event_checkpoints")
        op.execute("DROP FUNCTION IF EXISTS event_checkpoints_append_only()")
    else:
        for action in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS event_checkpoints_no_{action}")
            op.execute(f"DROP TRIGGER IF EXISTS events_no_{action}")
    for name in _NEW_INDEXES:
        op.drop_index(name, table_name="events")
    # On SQLite this rebuilds the table, which drops its triggers: they are made again below.
    with op.batch_alter_table("events") as batch_op:
        for name in ("hash", "prev_hash", "outcome", "repository"):
            batch_op.drop_column(name)
    if not _postgres():
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER events_no_{action.lower()} BEFORE {action} ON events "
                f"BEGIN SELECT RAISE(ABORT, 'events are append-only: {action} refused'); END"
            )
    op.drop_index("ix_event_checkpoints_last_event_id", table_name="event_checkpoints")
    op.drop_table("event_checkpoints")
