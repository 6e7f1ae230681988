"""The Lua half of the Redis store against the Python rules.

``test_vectors.py`` runs every vector through the real acquire script (the
``redis`` store of the suite). Here the script's pieces are checked on
their own, on the real server: its ``judge`` (the test-only
:data:`~klockwork.core.stores.redis.scripts.JUDGE` wrapper) on the
wait-die vectors and on random facts against :func:`rules.judge`, and its
``ancestors``, byte order and integer order against Python's.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from klockwork.core.leases.rules import (
    ParsedIntent,
    ancestors,
    judge,
    normalize_resource,
    overlaps,
    parse_intents,
)
from klockwork.core.model import LeaseRecord, LeaseState, Predicate
from klockwork.core.stores.redis import lua, scripts
from klockwork.core.stores.redis.codec import intent_args, lease_record
from klockwork.core.stores.redis.store import RedisStore

from .conftest import drop_redis_namespace, load_vectors, redis_url

WAIT_DIE = load_vectors("wait_die.json")
PATHS = load_vectors("paths.json")
MATRIX = load_vectors("matrix.json")

# A test-only script: one LIB function applied to its arguments.
_PROBE = (
    lua.PRELUDE
    + lua.LIB
    + r"""
local f, a, b = ARGV[5], ARGV[6], ARGV[7]
if f == 'ancestors' then return cjson.encode(ancestors(a)) end
if f == 'lt' then return cjson.encode(lt(a, b)) end
if f == 'int_lt' then return cjson.encode(int_lt(a, b)) end
if f == 'within' then return cjson.encode(within(a, b)) end
return cjson.encode(conflicts(a, b))
"""
)


@pytest.fixture(scope="module")
def store() -> Iterator[RedisStore]:
    namespace = f"t-{uuid.uuid4().hex[:16]}-lua"
    s = RedisStore(redis_url(namespace), server_time=False)
    yield s
    s.close()
    drop_redis_namespace(namespace)


def probe(store: RedisStore, fn: str, a: str, b: str = "") -> Any:
    return store._call(_PROBE, [fn, a, b], "probe", 0, mutating=False)


def _row(rec: LeaseRecord) -> list[str]:
    return [
        rec.lease_id,
        rec.agent_id,
        rec.session_id,
        rec.resource,
        rec.predicate.value,
        str(rec.priority),
        str(rec.fencing_token),
        str(rec.acquired_at),
        str(rec.expires_at),
        str(rec.ttl_ms),
        rec.state.value,
    ]


def lua_judge(
    store: RedisStore,
    agent_id: str,
    session_id: str,
    priority: int,
    intents: list[ParsedIntent],
    candidates: list[list[LeaseRecord]],
    now_ms: int,
) -> Any:
    args = [agent_id, session_id, str(priority), str(len(intents))]
    for intent, holders in zip(intents, candidates, strict=True):
        args += intent_args(intent, json.dumps([_row(r) for r in holders]))
    return store._call(scripts.JUDGE, args, "judge", now_ms, mutating=False)


def _compare(
    store: RedisStore,
    agent_id: str,
    session_id: str,
    priority: int,
    intents: list[ParsedIntent],
    candidates: list[list[LeaseRecord]],
    now_ms: int,
) -> None:
    """The Lua judge decides exactly what rules.judge decides."""
    # judge() never changes the records it is given (the store marks them).
    py = judge(agent_id, session_id, priority, intents, candidates, [], now_ms)
    lua = lua_judge(store, agent_id, session_id, priority, intents, candidates, now_ms)
    assert lua["st"] == py.status.value
    blockers = lua["blockers"] if isinstance(lua["blockers"], list) else []
    assert [b[0] for b in blockers] == [b.lease_id for b in py.blockers]  # type: ignore[union-attr]
    assert lua["wait"] == py.wait_time_ms
    expired = lua["expired"] if isinstance(lua["expired"], list) else []
    assert [lease_record(r).lease_id for r in expired] == [r.lease_id for r in py.expired]


def _record(i: int, h: dict[str, Any], t0: int) -> LeaseRecord:
    return LeaseRecord(
        f"L{i}",
        h["agent_id"],
        h["session_id"],
        normalize_resource(h["resource"]),
        Predicate(h["predicate"]),
        h["priority"],
        i + 1,
        t0,
        t0 + h["ttl_ms"],
        h["ttl_ms"],
    )


@pytest.mark.parametrize("case", WAIT_DIE["cases"], ids=lambda c: c["name"])
def test_wait_die_vectors_through_the_lua_judge(store: RedisStore, case: dict[str, Any]) -> None:
    t0 = 1_000_000
    now = t0 + case["advance_ms"]
    records = [_record(i, h, t0) for i, h in enumerate(case["holders"])]
    req = case["request"]
    (intent,) = parse_intents((req["resource"], req["predicate"]))
    candidates = [[r for r in records if overlaps(r.resource, intent.key)]]
    lua = lua_judge(
        store, req["agent_id"], req["session_id"], req["priority"], [intent], candidates, now
    )
    expected = case["expected"]
    assert lua["st"] == expected["status"]
    blockers = lua["blockers"] if isinstance(lua["blockers"], list) else []
    assert sorted(b[0] for b in blockers) == sorted(f"L{i}" for i in expected["blocking"])
    assert lua["wait"] == expected["wait_time_ms"]
    _compare(store, req["agent_id"], req["session_id"], req["priority"], [intent], candidates, now)


def test_matrix_through_the_lua_judge(store: RedisStore) -> None:
    for pair in MATRIX["pairs"]:
        holder = LeaseRecord("L", "h", "s", "TABLE:t", Predicate(pair["holder"]), 5, 1, 0, 10, 10)
        (intent,) = parse_intents(("TABLE:t", pair["request"]))
        for agent, priority, refused in (("o", 1, "WAIT"), ("y", 9, "DIE")):
            lua = lua_judge(store, agent, "s", priority, [intent], [[holder]], 5)
            assert lua["st"] == ("GRANTED" if pair["compatible"] else refused), pair
        assert probe(store, "conflicts", pair["holder"], pair["request"]) is not pair["compatible"]


@pytest.mark.parametrize("case", PATHS["ancestors"], ids=lambda c: c["key"])
def test_ancestors_vectors_in_lua(store: RedisStore, case: dict[str, Any]) -> None:
    assert (probe(store, "ancestors", case["key"]) or []) == case["ancestors"]


@pytest.mark.parametrize(
    "key", ["FILE:a/b/c", "FILE:a", "TABLE:x/y", "FILE:/ä/ö", "FILE:/a:b/c", "Q:/"]
)
def test_ancestors_of_odd_keys_in_lua(store: RedisStore, key: str) -> None:
    assert (probe(store, "ancestors", key) or []) == list(ancestors(key))


_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF), max_size=6)
_INT64 = st.integers(-(2**63) + 1, 2**63 - 1)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(a=_TEXT, b=_TEXT, x=_INT64, y=_INT64)
def test_orders_in_lua_match_python(store: RedisStore, a: str, b: str, x: int, y: int) -> None:
    """Byte order is str order; priorities (any int64) compare exactly, never as doubles."""
    assert probe(store, "lt", a, b) is (a < b)
    assert probe(store, "int_lt", str(x), str(y)) is (x < y)
    assert probe(store, "int_lt", str(x), str(x + 1 if x < 2**63 - 1 else x)) is (x < 2**63 - 1)
    assert probe(store, "within", a, b) is (a == b or a.startswith(b + "/"))


_KEYS = ("FILE:/", "FILE:/a", "FILE:/a/b", "FILE:/a/c", "FILE:/d", "TABLE:t")
_holder = st.tuples(
    st.sampled_from(["a", "b", "c"]),
    st.sampled_from(["s", "s/1", "s/2", "t"]),
    st.sampled_from(_KEYS),
    st.sampled_from(list(Predicate)),
    st.sampled_from([1, 2, 2**60, -5]),
    st.integers(1, 40),
    st.sampled_from([LeaseState.ACTIVE, LeaseState.ACTIVE, LeaseState.RELEASED]),
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    holders=st.lists(_holder, max_size=6),
    requester=st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(["s", "s/1", "t"]),
        st.sampled_from([1, 2, 2**60, -5]),
    ),
    wants=st.lists(
        st.tuples(st.sampled_from(_KEYS), st.sampled_from(list(Predicate))), min_size=1, max_size=3
    ),
)
def test_lua_judge_matches_python_on_random_facts(
    store: RedisStore,
    holders: list[Any],
    requester: tuple[str, str, int],
    wants: list[tuple[str, Predicate]],
) -> None:
    records = [
        LeaseRecord(f"L{i}", a, s, k, p, pr, i + 1, 0, e, e, state)
        for i, (a, s, k, p, pr, e, state) in enumerate(holders)
    ]
    intents = list(parse_intents([(k, p.value) for k, p in wants]))
    candidates = [[r for r in records if overlaps(r.resource, i.key)] for i in intents]
    agent, session, priority = requester
    _compare(store, agent, session, priority, intents, candidates, 20)
