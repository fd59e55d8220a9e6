"""The statements every step runs are cacheable: SQLAlchemy compiles a statement without a cache
key anew on every execution (the claim's insert once cost 0.1-0.2 ms of compiling per claim)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.sql import ClauseElement

from worker.store import claims, events


def _hot_statements() -> list[tuple[str, Any]]:
    found = []
    for module in (claims, events):
        for name, value in vars(module).items():
            if name.startswith("_") and isinstance(value, ClauseElement):
                found.append((f"{module.__name__}.{name}", value))
            elif isinstance(value, events.Guard):
                # Both of a guard's statements: alone (SQLite) and with its append (PostgreSQL).
                found.append((f"{module.__name__}.{name}.alone", value.alone))
                found.append((f"{module.__name__}.{name}.with_append", value.with_append))
    return found


def test_the_hot_path_has_its_statements() -> None:
    names = {name for name, _ in _hot_statements()}
    assert {
        "worker.store.claims._INSERT_CLAIM",
        "worker.store.events._INSERT_EVENT",
        "worker.store.claims.SUCCEEDED_CLAIM.with_append",
    } <= names


@pytest.mark.parametrize(("name", "statement"), _hot_statements())
def test_a_hot_statement_has_a_cache_key(name: str, statement: ClauseElement) -> None:
    assert statement._generate_cache_key() is not None, f"{name} is compiled on every execution"
