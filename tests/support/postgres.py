"""What a test on PostgreSQL needs to see of the server's sessions."""

from __future__ import annotations

import time

from sqlalchemy import create_engine, text


def lock_waiters(url: str, timeout: float) -> list[int]:
    """The backends of this database waiting for a lock, once there are any (or [] at the
    timeout)."""
    watcher = create_engine(url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with watcher.connect() as connection:
                pids = list(
                    connection.execute(
                        text(
                            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                            " AND wait_event_type = 'Lock'"
                        )
                    ).scalars()
                )
            if pids or time.monotonic() > deadline:
                return pids
            time.sleep(0.05)
    finally:
        watcher.dispose()
