"""The pure decisions of ``klockwork.core.leases.rules`` (no store, no clock)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klockwork import Intent, InvalidRequestError, LeaseState, Predicate, VerdictStatus
from klockwork.core.leases.rules import (
    COMPATIBLE_PAIRS,
    HIERARCHICAL_TYPES,
    ParsedIntent,
    ancestors,
    compatible,
    descendant_range,
    is_older,
    judge,
    normalize_resource,
    overlaps,
    parse_intents,
    parse_predicate,
    validate_ttl,
)
from klockwork.core.model import LeaseRecord, Reservation
from klockwork.core.validation import MAX_TTL_MS

VECTORS = Path(__file__).parents[1] / "conformance" / "vectors"
MATRIX = json.loads((VECTORS / "matrix.json").read_text())
WAIT_DIE = json.loads((VECTORS / "wait_die.json").read_text())
PATHS = json.loads((VECTORS / "paths.json").read_text())

# -- the KLIS matrix ------------------------------------------------------------------


@pytest.mark.parametrize("pair", MATRIX["pairs"], ids=lambda p: f"{p['holder']}-{p['request']}")
def test_matrix(pair: dict[str, Any]) -> None:
    a, b = Predicate(pair["holder"]), Predicate(pair["request"])
    assert compatible(a, b) is pair["compatible"]
    assert compatible(b, a) is pair["compatible"]


def test_compatible_pairs_constant() -> None:
    assert len(COMPATIBLE_PAIRS) == 5
    assert frozenset({Predicate.MUTATES}) not in COMPATIBLE_PAIRS
    assert frozenset({"FILE"}) == HIERARCHICAL_TYPES


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("MUTATES", Predicate.MUTATES),
        ("mutates", Predicate.MUTATES),
        ("Depends_On", Predicate.DEPENDS_ON),
        (Predicate.RENAMES, Predicate.RENAMES),
    ],
)
def test_parse_predicate(value: Any, expected: Predicate) -> None:
    assert parse_predicate(value) is expected


@pytest.mark.parametrize("value", ["READS", "", "DEPENDS ON", None, 3, b"MUTATES"])
def test_parse_predicate_rejects(value: Any) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_predicate(value)
    assert info.value.argument == "predicate"
    assert info.value.value == value


# -- resources -------------------------------------------------------------------------


@pytest.mark.parametrize("case", PATHS["normalize"], ids=lambda c: repr(c["input"]))
def test_normalize_resource(case: dict[str, Any]) -> None:
    if "error" in case:
        with pytest.raises(InvalidRequestError) as info:
            normalize_resource(case["input"])
        assert info.value.argument == "resource"
        assert info.value.value == case["input"]
    else:
        assert normalize_resource(case["input"]) == case["expected"]
        assert normalize_resource(case["expected"]) == case["expected"]  # idempotent


@pytest.mark.parametrize("value", [None, 42, b"FILE:/x", ("FILE", "/x")])
def test_normalize_resource_rejects_non_strings(value: Any) -> None:
    with pytest.raises(InvalidRequestError):
        normalize_resource(value)


@pytest.mark.parametrize("case", PATHS["ancestors"], ids=lambda c: c["key"])
def test_ancestors(case: dict[str, Any]) -> None:
    assert list(ancestors(case["key"])) == case["ancestors"]


@pytest.mark.parametrize("case", PATHS["overlaps"], ids=lambda c: f"{c['a']}~{c['b']}")
def test_overlaps(case: dict[str, Any]) -> None:
    assert overlaps(case["a"], case["b"]) is case["overlaps"]
    assert overlaps(case["b"], case["a"]) is case["overlaps"]


def test_descendant_range_examples() -> None:
    assert descendant_range("FILE:/src") == ("FILE:/src/", "FILE:/src0")
    assert descendant_range("FILE:src") == ("FILE:src/", "FILE:src0")
    assert descendant_range("TABLE:users") is None


def test_descendant_range_of_the_root_excludes_the_root() -> None:
    lo, hi = descendant_range("FILE:/")  # type: ignore[misc]
    assert lo <= "FILE:/a" < hi
    assert not lo <= "FILE:/" < hi


# Path segments drawn around '/' in sort order ('-', '.', '0', '~', non-ASCII).
_segment = st.text(alphabet="-.0/az~é_", min_size=1, max_size=4).filter(
    lambda s: "/" not in s and s not in (".", "..")
)
_key = st.lists(_segment, min_size=0, max_size=4).map(lambda parts: "FILE:/" + "/".join(parts))


@given(_key, _key)
def test_descendant_range_holds_exactly_the_descendants(a: str, b: str) -> None:
    lo, hi = descendant_range(a)  # type: ignore[misc]
    assert (lo <= b < hi) == (a in ancestors(b))


@given(_key, _key)
def test_overlaps_is_equality_or_ancestry(a: str, b: str) -> None:
    assert overlaps(a, b) == (a == b or a in ancestors(b) or b in ancestors(a))


@given(_key)
def test_ancestors_of_a_normalised_key(key: str) -> None:
    assert normalize_resource(key) == key
    chain = ancestors(key)
    assert len(chain) == (0 if key == "FILE:/" else key.count("/"))
    for parent in chain:
        assert overlaps(parent, key)
        assert key.startswith(parent.rstrip("/") + "/")


# -- other validation ---------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [1, 30_000, MAX_TTL_MS])
def test_validate_ttl_accepts(ttl: int) -> None:
    assert validate_ttl(ttl) == ttl


@pytest.mark.parametrize(
    "ttl", [0, -1, 1.0, "10", True, False, None, MAX_TTL_MS + 1, 2**40, 10**14, 2**62]
)
def test_validate_ttl_rejects(ttl: Any) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_ttl(ttl)
    assert info.value.argument == "ttl_ms"


def test_parse_intents_shapes() -> None:
    one = parse_intents(("file://a/", "mutates"))
    assert one == (ParsedIntent("FILE:/a", Predicate.MUTATES, ("FILE:/",)),)
    assert parse_intents(Intent(resource="FILE:/a", predicate=Predicate.MUTATES)) == one
    assert parse_intents([("FILE:/a", "MUTATES")]) == one
    two = parse_intents([("FILE:/a", "MUTATES"), ("TABLE:t", "CONSUMES")])
    assert [i.key for i in two] == ["FILE:/a", "TABLE:t"]
    assert two[1].ancestors == ()
    pair_of_pairs = parse_intents((("FILE:/a", "MUTATES"), ("TABLE:t", "CONSUMES")))
    assert pair_of_pairs == two


@pytest.mark.parametrize("bad", [[], (), "FILE:/a", ["FILE:/a"], [("FILE:/a",)], 3, None])
def test_parse_intents_rejects(bad: Any) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_intents(bad)
    assert info.value.argument == "intents"


# -- wait-die ----------------------------------------------------------------------------


def test_is_older() -> None:
    assert is_older(1, "z", 2, "a")  # lower priority wins whatever the id
    assert not is_older(2, "a", 1, "z")
    assert is_older(3, "a", 3, "b")  # tie: lower agent id
    assert not is_older(3, "b", 3, "a")
    assert not is_older(3, "a", 3, "a")  # nobody is older than itself
    # Two sessions of one agent: the lower session id is older.
    assert is_older(3, "a", 3, "a", "s1", "s2")
    assert not is_older(3, "a", 3, "a", "s2", "s1")
    assert not is_older(3, "a", 3, "a", "s1", "s1")
    assert is_older(3, "a", 3, "b", "s9", "s1")  # the session only breaks agent ties


_who = st.tuples(st.integers(-3, 3), st.sampled_from("abc"), st.sampled_from(["s1", "s2"]))


@given(_who, _who, _who)
def test_is_older_is_a_strict_total_order(x: tuple, y: tuple, z: tuple) -> None:  # type: ignore[type-arg]
    def older(p: tuple, q: tuple) -> bool:  # type: ignore[type-arg]
        return is_older(p[0], p[1], q[0], q[1], p[2], q[2])

    if x == y:
        assert not older(x, y)
    else:
        assert older(x, y) != older(y, x)  # total and asymmetric
    if older(x, y) and older(y, z):
        assert older(x, z)  # transitive


def _record(
    lease_id: str,
    agent: str,
    resource: str,
    predicate: str,
    priority: int,
    expires_at: int,
    *,
    session: str = "s1",
    state: LeaseState = LeaseState.ACTIVE,
) -> LeaseRecord:
    return LeaseRecord(
        lease_id,
        agent,
        session,
        resource,
        Predicate(predicate),
        priority,
        int(lease_id.strip("L") or 0),
        0,
        expires_at,
        expires_at,
        state,
    )


def _intent(resource: str, predicate: str) -> ParsedIntent:
    return parse_intents((resource, predicate))[0]


@pytest.mark.parametrize("case", WAIT_DIE["cases"], ids=lambda c: c["name"])
def test_judge_vectors(case: dict[str, Any]) -> None:
    """The same vectors the stores pass, judged directly from the facts."""
    now = 1000 + case["advance_ms"]
    records = [
        _record(
            f"L{i}",
            h["agent_id"],
            normalize_resource(h["resource"]),
            h["predicate"],
            h["priority"],
            1000 + h["ttl_ms"],
            session=h["session_id"],
        )
        for i, h in enumerate(case["holders"])
    ]
    req = case["request"]
    intent = _intent(req["resource"], req["predicate"])
    candidates = [[r for r in records if overlaps(r.resource, intent.key)]]
    j = judge(req["agent_id"], req["session_id"], req["priority"], [intent], candidates, [], now)
    expected = case["expected"]
    assert j.status.value == expected["status"]
    assert sorted(b.lease_id for b in j.blockers) == sorted(  # type: ignore[union-attr]
        f"L{i}" for i in expected["blocking"]
    )
    assert j.wait_time_ms == expected["wait_time_ms"]
    assert sorted(r.lease_id for r in j.expired) == sorted(
        r.lease_id for r in candidates[0] if r.expires_at <= now
    )


def test_judge_ignores_inactive_records() -> None:
    intent = _intent("FILE:/x", "MUTATES")
    holders = [
        _record("L1", "h", "FILE:/x", "MUTATES", 1, 500, state=LeaseState.RELEASED),
        _record("L2", "h", "FILE:/x", "MUTATES", 1, 500, state=LeaseState.REVOKED),
        _record("L3", "h", "FILE:/x", "MUTATES", 1, 50, state=LeaseState.EXPIRED),
    ]
    j = judge("r", "s", 5, [intent], [holders], [], 100)
    assert j.status is VerdictStatus.GRANTED
    assert j.expired == []  # already marked: nothing to report


def test_judge_reports_an_expired_holder_once_across_intents() -> None:
    stale = _record("L1", "h", "FILE:/a", "MUTATES", 1, 50)
    intents = [_intent("FILE:/a/x", "MUTATES"), _intent("FILE:/a/y", "MUTATES")]
    j = judge("r", "s", 5, intents, [[stale], [stale]], [], 100)
    assert j.status is VerdictStatus.GRANTED
    assert j.expired == [stale]


def test_judge_lists_a_blocker_once_across_intents() -> None:
    holder = _record("L1", "h", "FILE:/a", "MUTATES", 9, 600)
    intents = [_intent("FILE:/a/x", "CONSUMES"), _intent("FILE:/a/y", "CONSUMES")]
    j = judge("r", "s", 1, intents, [[holder], [holder]], [], 100)
    assert j.status is VerdictStatus.WAIT
    assert j.blockers == [holder]
    assert j.wait_time_ms == 500


def test_judge_manifest_dies_if_any_intent_dies() -> None:
    young = _record("L1", "young", "FILE:/a", "MUTATES", 9, 600)
    old = _record("L2", "old", "FILE:/b", "MUTATES", 1, 300)
    intents = [_intent("FILE:/a", "MUTATES"), _intent("FILE:/b", "MUTATES")]
    j = judge("r", "s", 5, intents, [[young], [old]], [], 100)
    assert j.status is VerdictStatus.DIE
    assert j.blockers == [young, old]
    assert j.wait_time_ms == 200


def _reservation(
    agent: str, resource: str, predicate: str, priority: int, expires_at: int = 10_000
) -> Reservation:
    return Reservation(agent, "ws", resource, Predicate(predicate), priority, expires_at)


def test_judge_older_waiter_reservation_kills_a_younger_newcomer() -> None:
    waiter = _reservation("waiter", "FILE:/a", "MUTATES", 1)
    j = judge("new", "s", 5, [_intent("FILE:/a/b", "CONSUMES")], [[]], [waiter], 100)
    assert j.status is VerdictStatus.DIE
    assert j.blockers == [waiter]
    assert j.wait_time_ms is None  # no holder's TTL to wait for


@pytest.mark.parametrize(
    ("reservation", "why"),
    [
        (_reservation("waiter", "FILE:/a", "MUTATES", 9), "younger waiter"),
        (_reservation("waiter", "FILE:/a", "CONSUMES", 1), "compatible predicate"),
        (_reservation("waiter", "FILE:/other", "MUTATES", 1), "no overlap"),
        (_reservation("waiter", "FILE:/a", "MUTATES", 1, expires_at=100), "expired"),
        (Reservation("new", "s", "FILE:/a", Predicate.MUTATES, 1, 10_000), "its own"),
    ],
)
def test_judge_reservations_that_do_not_block(reservation: Reservation, why: str) -> None:
    j = judge("new", "s", 5, [_intent("FILE:/a", "CONSUMES")], [[]], [reservation], 100)
    assert j.status is VerdictStatus.GRANTED, why


def test_judge_same_agent_other_session_reservation_blocks() -> None:
    mine = Reservation("a", "other", "FILE:/a", Predicate.MUTATES, 5, 10_000)
    j = judge("a", "s", 5, [_intent("FILE:/a", "MUTATES")], [[]], [mine], 100)
    assert j.status is VerdictStatus.DIE


def test_judge_wait_becomes_die_behind_an_older_waiter() -> None:
    holder = _record("L1", "h", "FILE:/a", "MUTATES", 9, 600)
    waiter = _reservation("waiter", "FILE:/a", "MUTATES", 1)
    j = judge("new", "s", 5, [_intent("FILE:/a", "MUTATES")], [[holder]], [waiter], 100)
    assert j.status is VerdictStatus.DIE
    assert j.blockers == [holder, waiter]
    assert j.wait_time_ms == 500


def test_within_session_nests_by_path_segment() -> None:
    from klockwork.core.leases.rules import within_session

    assert within_session("t1", "t1")
    assert within_session("t1/call-7", "t1")
    assert within_session("t1/call-7/x", "t1")
    assert not within_session("t1", "t1/call-7")  # the parent is not inside the child
    assert not within_session("t1/call-8", "t1/call-7")  # siblings
    assert not within_session("t10", "t1")  # a prefix that is not a segment
