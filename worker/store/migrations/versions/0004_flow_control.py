"""Per-registry flow control: a cap on concurrent pushes and a request rate; a job's deadline.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("registries") as batch_op:
        batch_op.add_column(sa.Column("max_concurrent", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("rate_per_second", sa.Float(), nullable=True))
    with op.batch_alter_table("push_jobs") as batch_op:
        batch_op.add_column(sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("push_jobs") as batch_op:
        batch_op.drop_column("deadline_at")
    with op.batch_alter_table("registries") as batch_op:
        batch_op.drop_column("rate_per_second")
        batch_op.drop_column("max_concurrent")
