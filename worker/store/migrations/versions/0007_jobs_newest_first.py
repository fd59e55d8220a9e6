"""The jobs list (console, API, ``pushctl jobs``) reads newest first by (created_at, id): an index
in that order lets a page at any depth of a large table read only its own rows.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_push_jobs_created_id", "push_jobs", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_push_jobs_created_id", table_name="push_jobs")
