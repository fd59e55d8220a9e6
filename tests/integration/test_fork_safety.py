"""A process forked after its parent used the database opens its own connections.

Celery's main process uses the database (it records refused messages and takes over the claims
of dead workers) and forks pool children whenever one is replaced. A child that reused a pooled
connection of its parent would share one PostgreSQL session with it: two processes' statements
interleaved on one socket.
"""

from __future__ import annotations

import os

from sqlalchemy import text

from worker.store.db import session_scope


def _backend_pid() -> int:
    with session_scope() as session:
        return int(session.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_a_forked_child_never_reuses_its_parents_connection(postgres_url: str) -> None:
    """The parent's connection goes back to the pool; the child's query runs on another
    PostgreSQL backend, and the parent's pooled connection still works afterwards."""
    parent = _backend_pid()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe and exits at once
        try:
            os.write(write_end, str(_backend_pid()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        reported = pipe.read()
    os.waitpid(child, 0)
    assert reported.isdigit(), f"the child could not query the database: {reported!r}"
    assert int(reported) != parent, "the child used the connection its parent had pooled"
    assert _backend_pid() == parent, "the parent's pooled connection was closed by the child"
