"""Jobs may name the Docker Engine (worker host) that holds their source image.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("push_jobs") as batch_op:
        batch_op.add_column(sa.Column("docker_host", sa.String(length=100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("push_jobs") as batch_op:
        batch_op.drop_column("docker_host")
