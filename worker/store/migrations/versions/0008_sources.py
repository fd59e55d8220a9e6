"""Jobs may copy from sources other than the Docker Engine: another registry (a promotion), an
OCI layout or a docker-archive on the worker's filesystem (docs/sources.md).

``source_kind`` says which (every existing job is ``docker``); ``source_image`` keeps holding
the image of a ``docker`` job and holds the whole spec of any other. ``source_registry_id`` is
the registry a promotion reads from; ``source_digest`` the immutable digest the job's pin step
resolved its source to, which its push copies whatever the source names by then.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("push_jobs") as batch_op:
        batch_op.add_column(
            sa.Column("source_kind", sa.String(length=20), nullable=False, server_default="docker")
        )
        batch_op.add_column(sa.Column("source_registry_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("source_digest", sa.String(length=100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("push_jobs") as batch_op:
        batch_op.drop_column("source_digest")
        batch_op.drop_column("source_registry_id")
        batch_op.drop_column("source_kind")
