"""The event log's chain splits into lanes; seals; the trace id of each event.

- ``events`` gains ``lane`` (the chain an event is a link of; NULL for the events that exist now,
  which stay the version-1 global chain exactly as they were hashed: nothing is re-hashed) and
  ``trace_id``; ``ix_events_lane_id`` finds a lane's head.
- ``event_epochs``: one row, version 2, naming the last version-1 event and its hash: the root
  every lane's first event links to. Written here, once, from what the log holds now (or from
  the latest retention checkpoint when every event was pruned).
- ``event_checkpoints.heads``: where each chain's remaining events start after retention.
- ``event_seals``: the lanes' heads, chained, signed with a key derived from the secret key;
  written by ``pushctl events seal`` and beat.
- PostgreSQL: ``pushworker_append_state``, what an append reads, after taking its lane's lock,
  in one round trip instead of two (the lock, then a read in a snapshot taken after it: each
  statement of a PL/pgSQL function takes its own snapshot in READ COMMITTED).
- Epochs and seals are append-only like the events (triggers refuse UPDATE and DELETE; on
  PostgreSQL TRUNCATE too).

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

EVENT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
GENESIS_HASH = "0" * 64
_APPEND_ONLY = ("event_epochs", "event_seals")


def _postgres() -> bool:
    return bool(op.get_bind().dialect.name == "postgresql")


def upgrade() -> None:
    op.add_column("events", sa.Column("lane", sa.SmallInteger(), nullable=True))
    op.add_column("events", sa.Column("trace_id", sa.String(length=32), nullable=True))
    op.create_index("ix_events_lane_id", "events", ["lane", "id"], unique=False)
    op.add_column("event_checkpoints", sa.Column("heads", sa.JSON(), nullable=True))
    op.create_table(
        "event_epochs",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("v1_last_id", EVENT_ID, nullable=True),
        sa.Column("v1_last_hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("version"),
    )
    op.create_table(
        "event_seals",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("heads", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("signature", sa.String(length=64), nullable=True),
        sa.Column("key_id", sa.String(length=16), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    bind = op.get_bind()
    last = bind.execute(sa.text("SELECT id, hash FROM events ORDER BY id DESC LIMIT 1")).first()
    if last is None:
        last = bind.execute(
            sa.text(
                "SELECT last_event_id, last_hash FROM event_checkpoints ORDER BY id DESC LIMIT 1"
            )
        ).first()
    last_id, last_hash = (last[0], last[1]) if last is not None else (None, GENESIS_HASH)
    bind.execute(
        sa.text(
            "INSERT INTO event_epochs (version, started_at, v1_last_id, v1_last_hash) "
            "VALUES (2, CURRENT_TIMESTAMP, :id, :hash)"
        ),
        {"id": last_id, "hash": last_hash},
    )
    _guard(bind)
    if _postgres():
        op.execute(APPEND_STATE_FUNCTION)


#: Takes the lane's advisory lock (held until the transaction ends), then reads in a snapshot
#: taken after the lock: the stream's last seq, the lane's head, the job's repository, and the
#: event's id from the sequence. Parameters and columns are prefixed: PL/pgSQL would otherwise
#: take ``lane`` or ``repository`` for a column and a parameter at once.
APPEND_STATE_FUNCTION = """
CREATE FUNCTION pushworker_append_state(
    p_class integer, p_lane integer, p_stream text, p_job_id text
) RETURNS TABLE (o_last_seq integer, o_head_hash varchar, o_repository varchar, o_id bigint)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(p_class, p_lane);
    RETURN QUERY SELECT
        (SELECT max(e.seq) FROM events e WHERE e.stream = p_stream),
        (SELECT e.hash FROM events e WHERE e.lane = p_lane ORDER BY e.id DESC LIMIT 1),
        (SELECT j.repository FROM push_jobs j WHERE j.id = p_job_id),
        nextval('events_id_seq');
END
$$
"""


def _guard(bind: sa.engine.Connection) -> None:
    if _postgres():
        op.execute(
            """
            CREATE FUNCTION event_records_append_only() RETURNS trigger AS $$
            BEGIN
                RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP;
            END;
            $$ LANGUAGE plpgsql
            """
        )
        for table in _APPEND_ONLY:
            for action in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                    "FOR EACH ROW EXECUTE FUNCTION event_records_append_only()"
                )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION event_records_append_only()"
            )
        return
    for table in _APPEND_ONLY:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {action} refused'); END"
            )


def downgrade() -> None:
    for table in _APPEND_ONLY:
        for action in ("update", "delete", "truncate"):
            if _postgres():
                op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{action} ON {table}")
            elif action != "truncate":
                op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{action}")
    if _postgres():
        op.execute("DROP FUNCTION IF EXISTS event_records_append_only()")
        op.execute("DROP FUNCTION IF EXISTS pushworker_append_state(integer, integer, text, text)")
    op.drop_table("event_seals")
    op.drop_table("event_epochs")
    # Plain DROP COLUMN (SQLite 3.35+), not a batch copy of the tables: the triggers of 0003
    # name these tables, and SQLite refuses to rename a table a trigger depends on.
    op.drop_index("ix_events_lane_id", table_name="events")
    op.execute("ALTER TABLE event_checkpoints DROP COLUMN heads")
    op.execute("ALTER TABLE events DROP COLUMN trace_id")
    op.execute("ALTER TABLE events DROP COLUMN lane")
