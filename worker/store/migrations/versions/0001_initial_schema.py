"""Initial schema: registries, push jobs, step claims, and the append-only event log.

Revision ID: 0001
Revises:
Create Date: 2026-11-27 22:30:38.623908
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("stream", sa.String(length=80), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=True),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("type", sa.String(length=40), nullable=False),
        sa.Column("step", sa.String(length=40), nullable=True),
        sa.Column("registry_id", sa.Integer(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("stream", "seq", name="uq_events_stream_seq"),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index("ix_events_job", ["job_id", "seq"], unique=False)
        batch_op.create_index("ix_events_registry_time", ["registry_id", "time"], unique=False)
        batch_op.create_index("ix_events_time", ["time"], unique=False)
        batch_op.create_index("ix_events_type_time", ["type", "time"], unique=False)

    op.create_table(
        "registries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("url", sa.String(length=300), nullable=False),
        sa.Column("host", sa.String(length=300), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("username", sa.String(length=200), nullable=True),
        sa.Column("auth_required", sa.Boolean(), nullable=False),
        sa.Column("credential_kind", sa.String(length=10), nullable=True),
        sa.Column("credential_secret", sa.Text(), nullable=True),
        sa.Column("credential_ref", sa.String(length=500), nullable=True),
        sa.Column("ca_cert", sa.Text(), nullable=True),
        sa.Column("insecure", sa.Boolean(), nullable=False),
        sa.Column("fallback_chain", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "push_jobs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("source_image", sa.String(length=300), nullable=False),
        sa.Column("repository", sa.String(length=255), nullable=False),
        sa.Column("tag", sa.String(length=128), nullable=False),
        sa.Column("requested_registry_id", sa.Integer(), nullable=False),
        sa.Column("effective_registry_id", sa.Integer(), nullable=False),
        sa.Column("fallback_chain", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("current_step", sa.String(length=40), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("error_code", sa.String(length=60), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("pushed_reference", sa.String(length=600), nullable=True),
        sa.Column("digest", sa.String(length=100), nullable=True),
        sa.Column("requested_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["effective_registry_id"],
            ["registries.id"],
        ),
        sa.ForeignKeyConstraint(
            ["requested_registry_id"],
            ["registries.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("idempotency_key"),
    )
    with op.batch_alter_table("push_jobs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_push_jobs_registry_created", ["requested_registry_id", "created_at"], unique=False
        )
        batch_op.create_index("ix_push_jobs_status_created", ["status", "created_at"], unique=False)

    op.create_table(
        "step_runs",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("step", sa.String(length=40), nullable=False),
        sa.Column("registry_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["push_jobs.id"],
        ),
        sa.PrimaryKeyConstraint("job_id", "step", "registry_id"),
    )
    _forbid_event_changes()


def _forbid_event_changes() -> None:
    """The database itself refuses UPDATE and DELETE on events: append-only, whoever connects."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION events_append_only() RETURNS trigger AS $$
            BEGIN
                RAISE EXCEPTION 'events are append-only: % refused', TG_OP;
            END;
            $$ LANGUAGE plpgsql
            """
        )
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER events_no_{action.lower()} BEFORE {action} ON events "
                "FOR EACH ROW EXECUTE FUNCTION events_append_only()"
            )
        return
    for action in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER events_no_{action.lower()} BEFORE {action} ON events "
            f"BEGIN SELECT RAISE(ABORT, 'events are append-only: {action} refused'); END"
        )


def downgrade() -> None:
    for action in ("update", "delete"):
        if op.get_bind().dialect.name == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS events_no_{action} ON events")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS events_no_{action}")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS events_append_only()")
    op.drop_table("step_runs")
    with op.batch_alter_table("push_jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_push_jobs_status_created")
        batch_op.drop_index("ix_push_jobs_registry_created")

    op.drop_table("push_jobs")
    op.drop_table("registries")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_type_time")
        batch_op.drop_index("ix_events_time")
        batch_op.drop_index("ix_events_registry_time")
        batch_op.drop_index("ix_events_job")

    op.drop_table("events")
