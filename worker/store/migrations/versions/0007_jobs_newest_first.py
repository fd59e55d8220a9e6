"""Indexes for the console's and the API's lists at scale (measured by bench.console_pages on
10 million events):

- the jobs list reads newest first by (created_at, id), over all jobs or one repository's;
- "every failure of the last week" filters events by outcome and a time range, where the one
  index with ``outcome`` starts with ``registry_id``. Only the events that have an outcome are
  indexed (``outcome = :x`` implies ``outcome IS NOT NULL``, so the planner uses it for any x);
- a page of the event log filtered by actor, repository or type with no time bound is read in
  id order (its cursor is an id): without an index ending in ``id`` the database reads every
  matching event and sorts them (an operator's thousands, a rare type's tens of thousands).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_HAS_OUTCOME = sa.text("outcome IS NOT NULL")


def upgrade() -> None:
    op.create_index("ix_push_jobs_created_id", "push_jobs", ["created_at", "id"])
    op.create_index("ix_push_jobs_repository_created", "push_jobs", ["repository", "created_at"])
    op.create_index(
        "ix_events_outcome_time", "events", ["outcome", "time"],
        postgresql_where=_HAS_OUTCOME, sqlite_where=_HAS_OUTCOME,
    )  # fmt: skip
    for column in ("actor", "repository", "type"):
        op.create_index(f"ix_events_{column}_id", "events", [column, "id"])


def downgrade() -> None:
    for column in ("actor", "repository", "type"):
        op.drop_index(f"ix_events_{column}_id", table_name="events")
    op.drop_index("ix_events_outcome_time", table_name="events")
    op.drop_index("ix_push_jobs_repository_created", table_name="push_jobs")
    op.drop_index("ix_push_jobs_created_id", table_name="push_jobs")
