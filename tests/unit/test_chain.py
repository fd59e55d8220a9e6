"""The canonical form cut into parts (``chain.canonical_parts``) is the canonical form: what
PostgreSQL hashes when it links an event (``pushworker_append_event``) is what a verifier
hashes."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.store import chain

_text = st.text(max_size=40)  # any Unicode: quotes, backslashes, controls, astral planes
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | _text
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
_records = st.fixed_dictionaries(
    {
        "stream": _text, "seq": st.integers(1, 2**31 - 1), "job_id": st.none() | _text,
        "time": st.datetimes(timezones=st.just(UTC)), "type": _text,
        "step": st.none() | _text, "registry_id": st.none() | st.integers(-(2**31), 2**31 - 1),
        "attempt": st.none() | st.integers(0, 99), "actor": _text,
        "payload": st.dictionaries(_text, _json, max_size=5),
        "repository": st.none() | _text, "outcome": st.none() | _text,
        "prev_hash": st.text("0123456789abcdef", min_size=64, max_size=64),
        "id": st.integers(1, 2**62), "lane": st.integers(0, chain.LANES - 1),
        "trace_id": st.none() | st.text("0123456789abcdef", min_size=32, max_size=32),
    }
)  # fmt: skip


def _joined(record: dict[str, Any]) -> bytes:
    """The parts with the linked values put in, as the database puts them in."""
    first, second, third, fourth, fifth, sixth = chain.canonical_parts(record)
    repository = record["repository"]
    repository_json = "null" if repository is None else chain._CANONICAL.encode(repository)
    text = (
        f"{first}{record['id']}{second}{record['prev_hash']}{third}{repository_json}"
        f"{fourth}{record['seq']}{fifth}{chain.canonical_time(record['time'])}{sixth}"
    )
    return text.encode("ascii")


@settings(max_examples=400, deadline=None)
@given(_records)
def test_the_parts_joined_are_the_canonical_form(record: dict[str, Any]) -> None:
    assert _joined(record) == chain.canonical_json(record)
    assert hashlib.sha256(_joined(record)).hexdigest() == chain.chain_hash(record)


@given(_records, st.integers(1, 2**62), st.integers(1, 2**31 - 1))
def test_the_parts_do_not_depend_on_the_linked_values(
    record: dict[str, Any], other_id: int, other_seq: int
) -> None:
    """What the database fills in is not in the parts: the caller cannot have guessed it."""
    moved = {**record, "id": other_id, "seq": other_seq, "prev_hash": "f" * 64,
             "repository": "somewhere/else", "time": datetime(1999, 1, 1, tzinfo=UTC)}  # fmt: skip
    assert chain.canonical_parts(moved) == chain.canonical_parts(record)


def test_a_version_one_record_has_no_parts() -> None:
    record: dict[str, Any] = {name: None for name in chain.HASHED_FIELDS}
    record["time"] = datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="version-2"):
        chain.canonical_parts(record)
