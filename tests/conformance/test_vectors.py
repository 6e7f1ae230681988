"""The shared JSON vectors, run through a real store (every store, both APIs).

The same files drive the pure-rules unit tests and, later, the Redis Lua
script: a store passes when it decides exactly what the vectors say.
"""

from __future__ import annotations

from typing import Any

import pytest

from klockwork import InvalidRequestError, LeaseState, Predicate, VerdictStatus

from .conftest import Api, load_vectors

MATRIX = load_vectors("matrix.json")
WAIT_DIE = load_vectors("wait_die.json")
PATHS = load_vectors("paths.json")


def test_matrix_vector_file_is_complete() -> None:
    pairs = {(p["holder"], p["request"]): p["compatible"] for p in MATRIX["pairs"]}
    assert len(MATRIX["pairs"]) == 36
    assert set(MATRIX["predicates"]) == {p.value for p in Predicate}
    assert len(pairs) == 36
    for (a, b), ok in pairs.items():
        assert pairs[(b, a)] == ok, f"matrix not symmetric for {a}/{b}"
    compatible = {frozenset(k) for k, ok in pairs.items() if ok}
    assert compatible == {
        frozenset(("PROVIDES", "CONSUMES")),
        frozenset(("PROVIDES", "DEPENDS_ON")),
        frozenset(("CONSUMES",)),
        frozenset(("CONSUMES", "DEPENDS_ON")),
        frozenset(("DEPENDS_ON",)),
    }


async def test_matrix_through_the_store(api: Api) -> None:
    await api.register_agent("holder", 5)
    await api.register_agent("older", 1)
    await api.register_agent("younger", 9)
    for i, pair in enumerate(MATRIX["pairs"]):
        resource = f"TABLE:m{i}"
        held = await api.try_acquire("holder", "s", (resource, pair["holder"]))
        assert held.status is VerdictStatus.GRANTED
        for agent, refused in (("older", VerdictStatus.WAIT), ("younger", VerdictStatus.DIE)):
            verdict = await api.try_acquire(agent, "s", (resource, pair["request"]))
            expected = VerdictStatus.GRANTED if pair["compatible"] else refused
            assert verdict.status is expected, f"{agent}: {pair} -> {verdict.status}"
            if verdict.granted:
                assert await api.release(verdict.lease.lease_id)
            else:
                assert [c.lease_id for c in verdict.conflicts] == [held.lease.lease_id]


async def _run_wait_die_case(api: Api, case: dict[str, Any]) -> None:
    request = case["request"]
    priorities = {h["agent_id"]: h["priority"] for h in case["holders"]}
    priorities[request["agent_id"]] = request["priority"]
    for agent_id, priority in priorities.items():
        await api.register_agent(agent_id, priority)
    holder_leases = []
    for h in case["holders"]:
        verdict = await api.try_acquire(
            h["agent_id"], h["session_id"], (h["resource"], h["predicate"]), h["ttl_ms"]
        )
        assert verdict.granted, f"setup: holder {h} not granted: {verdict}"
        holder_leases.append(verdict.lease.lease_id)
    api.clock.advance(case["advance_ms"])

    verdict = await api.try_acquire(
        request["agent_id"],
        request["session_id"],
        (request["resource"], request["predicate"]),
    )
    expected = case["expected"]
    assert verdict.status.value == expected["status"]
    assert sorted(c.lease_id or "" for c in verdict.conflicts) == sorted(
        holder_leases[i] for i in expected["blocking"]
    )
    assert sorted({c.agent_id for c in verdict.conflicts}) == expected["blocking_agents"]
    assert verdict.wait_time_ms == expected["wait_time_ms"]
    if verdict.granted:
        assert verdict.lease.state is LeaseState.ACTIVE
    else:
        assert verdict.leases == []


@pytest.mark.parametrize("case", WAIT_DIE["cases"], ids=lambda c: c["name"])
async def test_wait_die_vector(api: Api, case: dict[str, Any]) -> None:
    await _run_wait_die_case(api, case)


@pytest.mark.parametrize("case", PATHS["normalize"], ids=lambda c: repr(c["input"]))
async def test_path_normalisation_through_the_store(api: Api, case: dict[str, Any]) -> None:
    if "error" in case:
        with pytest.raises(InvalidRequestError) as info:
            await api.try_acquire("a", "s", (case["input"], "MUTATES"))
        assert info.value.argument == "resource"
        assert api.list() == []
        assert api.kw.get_agent("a") is None  # refused before anything changed
        return
    verdict = await api.try_acquire("a", "s", (case["input"], "MUTATES"))
    assert verdict.lease.resource == case["expected"]
    # The canonical key and the raw input name the same resource.
    other = await api.try_acquire("b", "s", (case["expected"], "MUTATES"))
    assert other.status is VerdictStatus.DIE
    assert [c.lease_id for c in other.conflicts] == [verdict.lease.lease_id]


@pytest.mark.parametrize("case", PATHS["overlaps"], ids=lambda c: f"{c['a']}~{c['b']}")
async def test_overlap_through_the_store(api: Api, case: dict[str, Any]) -> None:
    await api.register_agent("old", 1)
    await api.register_agent("young", 2)
    assert (await api.try_acquire("young", "s", (case["a"], "MUTATES"))).granted
    verdict = await api.try_acquire("old", "s", (case["b"], "MUTATES"))
    assert verdict.status is (VerdictStatus.WAIT if case["overlaps"] else VerdictStatus.GRANTED)
