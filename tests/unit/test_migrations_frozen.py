"""Migrations carry their own frozen copy of what they compute.

A migration must mean the same thing forever: once it ran somewhere, editing what it computes
(through an import of live code) would make two databases at the same revision disagree. So:

- no migration under ``versions/`` imports ``worker`` (Alembic's ``env.py`` may: it needs the
  settings for the URL and the models' metadata, and it is not a step of the history);
- 0003's frozen copy of version 1 of the hash chain still hashes exactly like the live
  ``worker.store.chain``. When this fails, the live code changed what is hashed: that is a new
  ``CHAIN_VERSION`` with its own migration, never a silent edit of version 1.
"""

from __future__ import annotations

import ast
import importlib.util
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.store import chain

MIGRATIONS = Path(__file__).resolve().parents[2] / "worker" / "store" / "migrations"
VERSIONS = MIGRATIONS / "versions"
#: What env.py may import from the project, and why: the URL (settings) and the metadata.
ENV_IMPORTS = {"worker.core.settings", "worker.store.models"}


def project_imports(path: Path) -> set[str]:
    """The ``worker`` / ``tasks`` modules ``path`` imports, anywhere in the file (a lazy import
    inside a function counts too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        found.update(n for n in names if n.split(".")[0] in ("worker", "tasks"))
    return found


def test_no_migration_imports_the_project() -> None:
    """Every migration is self-contained: none imports ``worker`` (or ``tasks``)."""
    migrations = sorted(VERSIONS.glob("*.py"))
    assert migrations, f"no migrations found under {VERSIONS}"
    offenders = {p.name: sorted(project_imports(p)) for p in migrations if project_imports(p)}
    assert offenders == {}


def test_env_imports_only_settings_and_models() -> None:
    """``env.py`` is the one exception, and a narrow one: settings and models only."""
    assert project_imports(MIGRATIONS / "env.py") <= ENV_IMPORTS


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"frozen_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HASH_CHAIN = _load(VERSIONS / "0003_hash_chain.py")

TEXT = st.text(max_size=30)
#: What a stored payload can hold (the recorder refuses NaN and infinities).
JSON_FLOATS = st.floats(allow_nan=False, allow_infinity=False)
JSON_SCALARS = st.none() | st.booleans() | st.integers() | JSON_FLOATS | TEXT
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
#: Types that take each branch of ``derive_outcome``, and anything else.
TYPES = st.sampled_from(
    ["job.succeeded", "step.failed", "step.skipped", "job.cancelled", "fallback.applied",
     "registry.tested", "job.enqueued", "events.pruned", "failed", ""]
) | TEXT  # fmt: skip
EARLIEST, LATEST = datetime(1970, 1, 2), datetime(9998, 12, 30)
ZONES = st.sampled_from(
    [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
)
# Naive or aware: hypothesis' overloads take a zone strategy with None in it only without bounds.
MOMENTS = st.datetimes(EARLIEST, LATEST) | st.datetimes(EARLIEST, LATEST, timezones=ZONES)
HASHES = st.text("0123456789abcdef", min_size=64, max_size=64)
OPTIONAL_INT = st.none() | st.integers(-(2**31), 2**31 - 1)


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    """An event record as the recorder, the verifier or an export line holds it: the time as a
    datetime (naive or in any zone) or as the ISO text of an export."""
    moment = draw(MOMENTS)
    payload = draw(st.dictionaries(TEXT | st.sampled_from(["ok", "repository"]), JSON_VALUES))
    return {
        "stream": draw(TEXT), "seq": draw(st.integers(1, 2**31 - 1)),
        "job_id": draw(st.none() | TEXT),
        "time": moment.isoformat() if draw(st.booleans()) else moment,
        "type": draw(TYPES), "step": draw(st.none() | TEXT), "registry_id": draw(OPTIONAL_INT),
        "attempt": draw(OPTIONAL_INT), "actor": draw(TEXT), "payload": payload,
        "repository": draw(st.none() | TEXT), "outcome": draw(st.none() | TEXT),
        "prev_hash": draw(st.just(chain.GENESIS_HASH) | HASHES),
        # not hashed; present in every stored record
        "id": draw(st.integers(1, 2**62)), "hash": "f" * 64,
    }  # fmt: skip


def test_frozen_constants_are_version_1_of_the_live_chain() -> None:
    """The frozen copy is version 1, and the live code is still at version 1 with the same
    genesis and the same hashed fields."""
    assert HASH_CHAIN.CHAIN_VERSION == chain.CHAIN_VERSION == 1
    assert HASH_CHAIN.GENESIS_HASH == chain.GENESIS_HASH
    assert HASH_CHAIN.HASHED_FIELDS == chain.HASHED_FIELDS


@settings(max_examples=300, deadline=None)
@given(records())
def test_frozen_copy_hashes_like_the_live_chain(record: dict[str, Any]) -> None:
    """Any record: the same canonical bytes, hence the same hash, from the frozen copy in
    migration 0003 and from ``worker.store.chain``."""
    assert HASH_CHAIN.canonical_json(record) == chain.canonical_json(record)
    assert HASH_CHAIN.chain_hash(record) == chain.chain_hash(record)


@given(TYPES, st.dictionaries(st.sampled_from(["ok", "reason"]), JSON_VALUES))
def test_frozen_copy_derives_outcomes_like_the_live_chain(
    type: str, payload: dict[str, Any]
) -> None:
    """The ``outcome`` column the backfill derived is the one an append derives today."""
    assert HASH_CHAIN.derive_outcome(type, payload) == chain.derive_outcome(type, payload)


def test_the_outcomes_a_filter_may_name_are_every_outcome_the_log_records() -> None:
    """``chain.OUTCOMES`` (what the API, the console and ``pushctl events`` accept) is exactly
    the set of values ``derive_outcome`` gives: no filter refuses a recorded outcome."""
    derived = {*chain._OUTCOME_OF_SUFFIX.values(), *chain._OUTCOME_OF_TYPE.values()}
    assert set(chain.OUTCOMES) == derived
    assert chain.derive_outcome("registry.tested", {"ok": True}) in chain.OUTCOMES
