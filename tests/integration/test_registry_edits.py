"""Registry edits racing on the real PostgreSQL: every refusal is a clear ``InvalidRegistry`` /
``InvalidFallbackChain``, never a database exception, and no race leaves a broken state behind
(two registries with one name, a fallback cycle, a reused id).

Threads start each round together at a barrier, each with its own connection, so the writes
overlap the way concurrent ``pushctl`` processes do.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select

from worker.core.errors import InvalidFallbackChain, InvalidRegistry, PushWorkerError
from worker.registries import (
    RegistrySpec,
    create_registry,
    get_registry,
    remove_registry,
    update_registry,
)
from worker.store.db import session_scope
from worker.store.models import Registry

#: Rounds of the cycle race: before chain edits were serialised, 3 of 5 tries made a cycle.
CYCLE_ROUNDS = 20


def _spec(name: str, **fields: Any) -> RegistrySpec:
    return RegistrySpec(
        name=name, url=f"https://{name}.example.com", username="u", secret="pw", **fields
    )


def _race(jobs: list[Callable[[], object]]) -> list[object]:
    """Run ``jobs`` in threads released together; each result is a value or the exception."""
    barrier = threading.Barrier(len(jobs))
    results: list[object] = [None] * len(jobs)

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = jobs[index]()
        except Exception as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def _add(name: str, registry_id: int | None = None) -> int:
    with session_scope() as session:
        return create_registry(session, _spec(name), registry_id=registry_id).id


def test_parallel_adds_of_one_name_make_one_registry(postgres_url: str) -> None:
    """20 concurrent adds of one name: one registry, 19 clear refusals, no database error."""
    results = _race([lambda: _add("same") for _ in range(20)])
    created = [r for r in results if isinstance(r, int)]
    refused = [r for r in results if isinstance(r, InvalidRegistry)]
    assert len(created) == 1, results
    assert len(refused) == 19, [type(r).__name__ for r in results]
    assert all("exists already" in r.message for r in refused)
    with session_scope() as session:
        assert len(list(session.scalars(select(Registry)))) == 1


def test_parallel_adds_of_distinct_names_get_distinct_ids(postgres_url: str) -> None:
    """Ids are taken under the registry lock: after explicit ids, automatic ones never clash."""
    _add("explicit-1", registry_id=1)
    _add("explicit-2", registry_id=2)
    results = _race([lambda i=i: _add(f"auto-{i}") for i in range(10)])  # type: ignore[misc]
    assert all(isinstance(r, int) for r in results), results
    assert len(set(results)) == 10
    assert not {1, 2} & set(results)


def test_an_existing_id_is_a_clear_refusal(postgres_url: str) -> None:
    """``registry add --id <existing>`` (also a removed one) names the id, no IntegrityError."""
    _add("first", registry_id=7)
    with pytest.raises(InvalidRegistry, match="id 7 is taken"):
        _add("second", registry_id=7)
    with session_scope() as session:
        remove_registry(session, 7)
    with pytest.raises(InvalidRegistry, match="id 7 is taken"):
        _add("third", registry_id=7)


@pytest.mark.parametrize("field", ["name", "url", "username", "secret", "credential_ref", "kind"])
def test_nul_bytes_are_refused_before_the_database(postgres_url: str, field: str) -> None:
    """A NUL byte (which PostgreSQL cannot store) in any field is a clear refusal naming it."""
    spec = _spec("nul")
    if field == "credential_ref":
        spec.secret = None
    setattr(spec, field, {"url": "https://a\x00b.example.com"}.get(field, "a\x00b"))
    with pytest.raises(PushWorkerError) as refused, session_scope() as session:
        create_registry(session, spec)
    assert refused.value.code in ("invalid_input", "invalid_registry")
    assert "\x00" not in str(refused.value)


def test_concurrent_chain_edits_never_make_a_cycle(postgres_url: str) -> None:
    """201 -> [202] and 202 -> [201] at the same moment: one is refused, never both saved."""
    _add("r201", registry_id=201)
    _add("r202", registry_id=202)
    outcomes = []
    for _ in range(CYCLE_ROUNDS):
        results = _race(
            [
                lambda: _set_chain(201, [202]),
                lambda: _set_chain(202, [201]),
            ]
        )
        saved = [r for r in results if r is True]
        refused = [r for r in results if isinstance(r, InvalidFallbackChain)]
        with session_scope() as session:
            chains = {rid: get_registry(session, rid).fallback_chain for rid in (201, 202)}
        outcomes.append((len(saved), chains))
        assert len(saved) == 1 and len(refused) == 1, (results, outcomes)
        assert not (chains[201] == [202] and chains[202] == [201]), outcomes
        _set_chain(201, [])
        _set_chain(202, [])


def _set_chain(registry_id: int, chain: list[int]) -> bool:
    with session_scope() as session:
        update_registry(session, registry_id, RegistrySpec(fallback_chain=chain))
    return True


def test_removing_a_registry_takes_it_out_of_every_chain(postgres_url: str) -> None:
    """``registry remove`` drops the registry from every other chain, each a registry.updated."""
    from worker.store.events import registry_stream
    from worker.store.queries import select_events

    for rid in (1, 2, 3):
        _add(f"r{rid}", registry_id=rid)
    _set_chain(1, [2, 3])
    _set_chain(3, [2])
    with session_scope() as session:
        remove_registry(session, 2)
    with session_scope() as session:
        assert get_registry(session, 1).fallback_chain == [3]
        assert get_registry(session, 3).fallback_chain == []
        for rid, chain in ((1, [3]), (3, [])):
            last = select_events(session, stream=registry_stream(rid))[-1]
            assert last.type == "registry.updated"
            assert last.payload["fallback_chain"] == chain
            assert "registry 2 was removed" in last.payload["reason"]
