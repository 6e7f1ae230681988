"""Lease requests: agents, manifests, hierarchy and input validation (DESIGN "Leases")."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from klockwork import (
    Intent,
    InvalidRequestError,
    LeaseConflictError,
    LeaseState,
    Predicate,
    VerdictStatus,
)

from .conftest import T0, Api

# -- agents ----------------------------------------------------------------------


async def test_unknown_agents_are_registered_on_first_use(api: Api) -> None:
    first = await api.try_acquire("ghost-1", "s", ("FILE:/x", "MUTATES"))
    assert first.granted
    info = api.kw.get_agent("ghost-1")
    assert info is not None
    assert info.priority == T0  # registration time: age decides
    second = await api.try_acquire("ghost-2", "s", ("FILE:/x", "MUTATES"))
    assert second.status is VerdictStatus.DIE  # never a double grant
    assert [c.agent_id for c in second.conflicts] == ["ghost-1"]
    assert len(api.list(resource="FILE:/x")) == 1


async def test_registration_time_decides_age(api: Api) -> None:
    await api.register_agent("late-b")
    api.clock.advance(5)
    await api.register_agent("early-a")  # registered later: younger despite its id
    assert (await api.try_acquire("early-a", "s", ("FILE:/x", "MUTATES"))).granted
    assert (await api.try_acquire("late-b", "s", ("FILE:/x", "MUTATES"))).status is (
        VerdictStatus.WAIT
    )


async def test_register_agent_keeps_a_known_priority(api: Api) -> None:
    assert (await api.register_agent("a", 7)).priority == 7
    api.clock.advance(100)
    assert (await api.register_agent("a")).priority == 7
    assert api.kw.get_agent("a").priority == 7  # type: ignore[union-attr]


async def test_priority_is_frozen_while_holding(api: Api) -> None:
    await api.register_agent("a", 5)
    verdict = await api.try_acquire("a", "s", ("FILE:/x", "MUTATES"))
    with pytest.raises(InvalidRequestError) as info:
        await api.register_agent("a", 1)
    assert isinstance(info.value, ValueError)
    assert info.value.argument == "priority"
    assert info.value.value == 1
    assert api.kw.get_agent("a").priority == 5  # type: ignore[union-attr]
    assert (await api.register_agent("a", 5)).priority == 5  # same priority: fine
    assert await api.release(verdict.lease.lease_id)
    assert (await api.register_agent("a", 1)).priority == 1


async def test_an_expired_lease_does_not_freeze_the_priority(api: Api) -> None:
    await api.register_agent("a", 5)
    await api.try_acquire("a", "s", ("FILE:/x", "MUTATES"), ttl_ms=100)
    api.clock.advance(100)
    assert (await api.register_agent("a", 1)).priority == 1


async def test_priority_is_frozen_while_waiting(api: Api) -> None:
    await api.register_agent("old", 1)
    await api.register_agent("young", 9)
    holder = await api.try_acquire("young", "s", ("FILE:/x", "MUTATES"))
    waiter = asyncio.create_task(api.acquire("old", "s", ("FILE:/x", "MUTATES")))
    await api.until_sleeping()
    with pytest.raises(InvalidRequestError):
        await api.register_agent("old", 0)
    assert await api.release(holder.lease.lease_id)
    granted = await asyncio.wait_for(waiter, 15)
    assert granted.granted
    with pytest.raises(InvalidRequestError):
        await api.register_agent("old", 0)  # now holding
    assert await api.release(granted.lease.lease_id)
    assert (await api.register_agent("old", 0)).priority == 0


async def test_priority_is_frozen_while_backing_off_after_die(api: Api) -> None:
    await api.register_agent("old", 1)
    await api.register_agent("young", 9)
    holder = await api.try_acquire("old", "s", ("FILE:/x", "MUTATES"))
    waiter = asyncio.create_task(api.acquire("young", "s", ("FILE:/x", "MUTATES")))
    await api.until_sleeping()  # young got DIE and is backing off, still acquiring
    try:
        with pytest.raises(InvalidRequestError):
            await api.register_agent("young", 0)  # self-promotion while waiting
    finally:
        await api.release(holder.lease.lease_id)
        assert (await asyncio.wait_for(waiter, 15)).granted


# -- request shapes and manifests ---------------------------------------------------


@pytest.mark.parametrize(
    "intents",
    [
        Intent(resource="FILE:/x", predicate=Predicate.MUTATES),
        ("FILE:/x", "MUTATES"),
        ("FILE:/x", Predicate.MUTATES),
        ("FILE:/x", "mutates"),
        [("FILE:/x", "MUTATES")],
        [Intent(resource="FILE:/x", predicate=Predicate.MUTATES)],
    ],
    ids=["Intent", "tuple", "tuple-enum", "tuple-lowercase", "list-tuple", "list-Intent"],
)
async def test_intent_shapes(api: Api, intents: Any) -> None:
    verdict = await api.try_acquire("a", "s", intents)
    assert verdict.lease.resource == "FILE:/x"
    assert verdict.lease.predicate is Predicate.MUTATES


async def test_manifest_is_granted_whole(api: Api) -> None:
    verdict = await api.try_acquire(
        "a", "s", [("FILE:/a", "MUTATES"), ("TABLE:t", "CONSUMES"), ("FILE:/b", "DELETES")]
    )
    assert verdict.granted
    assert [lease.resource for lease in verdict.leases] == ["FILE:/a", "TABLE:t", "FILE:/b"]
    assert len({lease.lease_id for lease in verdict.leases}) == 3
    assert len({lease.expires_at for lease in verdict.leases}) == 1
    with pytest.raises(InvalidRequestError):
        verdict.lease  # noqa: B018 - several leases: use .leases
    assert {lease.lease_id for lease in api.list(agent_id="a")} == {
        lease.lease_id for lease in verdict.leases
    }


@pytest.mark.parametrize("position", [0, 1, 2])
async def test_manifest_all_or_none(api: Api, position: int) -> None:
    await api.register_agent("holder", 1)
    await api.register_agent("asker", 5)
    resources = ["FILE:/a", "FILE:/b", "TABLE:t"]
    blocker = await api.try_acquire("holder", "s", (resources[position], "MUTATES"))
    verdict = await api.try_acquire("asker", "s", [(r, "MUTATES") for r in resources])
    assert verdict.status is VerdictStatus.DIE
    assert verdict.leases == []
    assert [c.lease_id for c in verdict.conflicts] == [blocker.lease.lease_id]
    assert api.list(agent_id="asker") == []  # nothing granted, nothing left behind
    # The free resources really are free.
    others = [r for i, r in enumerate(resources) if i != position]
    assert (await api.try_acquire("third", "s", [(r, "MUTATES") for r in others])).granted


async def test_manifest_with_a_bad_intent_changes_nothing(api: Api) -> None:
    with pytest.raises(InvalidRequestError):
        await api.try_acquire("a", "s", [("FILE:/a", "MUTATES"), ("FILE:/b", "WRITES")])
    assert api.list() == []
    assert (await api.try_acquire("b", "s", ("FILE:/a", "MUTATES"))).granted


async def test_manifest_over_itself_is_reentrant(api: Api) -> None:
    verdict = await api.try_acquire(
        "a", "s", [("FILE:/src", "MUTATES"), ("FILE:/src/a", "DELETES")]
    )
    assert verdict.granted and len(verdict.leases) == 2


async def test_manifest_lists_every_blocker_once(api: Api) -> None:
    await api.register_agent("holder", 9)
    await api.register_agent("asker", 1)
    blocker = await api.try_acquire("holder", "s", ("FILE:/src", "MUTATES"))
    verdict = await api.try_acquire(
        "asker", "s", [("FILE:/src/a", "CONSUMES"), ("FILE:/src/b", "CONSUMES")]
    )
    assert verdict.status is VerdictStatus.WAIT
    assert [c.lease_id for c in verdict.conflicts] == [blocker.lease.lease_id]


# -- hierarchy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("held", "asked"),
    [("FILE:/src", "FILE:/src/auth.ts"), ("FILE:/src/auth.ts", "FILE:/src")],
    ids=["directory-then-file", "file-then-directory"],
)
async def test_hierarchical_paths_conflict_both_ways(api: Api, held: str, asked: str) -> None:
    await api.register_agent("old", 1)
    await api.register_agent("young", 9)
    holder = await api.try_acquire("young", "s", (held, "MUTATES"))
    verdict = await api.try_acquire("old", "s", (asked, "MUTATES"))
    assert verdict.status is VerdictStatus.WAIT
    conflict = verdict.conflicts[0]
    assert (conflict.lease_id, conflict.resource, conflict.agent_id) == (
        holder.lease.lease_id,
        held,
        "young",
    )
    assert (await api.try_acquire("old", "s", ("FILE:/srcx", "MUTATES"))).granted
    assert await api.release(holder.lease.lease_id)
    assert (await api.try_acquire("old", "s", (asked, "MUTATES"))).granted


# -- invalid input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("agent_id", "session_id", "intents", "ttl_ms", "argument"),
    [
        ("a", "s", ("FILE:/x", "WRITES"), 1000, "predicate"),
        ("a", "s", ("FILE:/x", ""), 1000, "predicate"),
        ("a", "s", ("FILE:/x", None), 1000, "predicate"),
        ("a", "s", ("FILE:", "MUTATES"), 1000, "resource"),
        ("a", "s", ("FILE:/src/../..", "MUTATES"), 1000, "resource"),
        ("a", "s", ("no-type", "MUTATES"), 1000, "resource"),
        ("a", "s", (42, "MUTATES"), 1000, "intents"),
        ("a", "s", [(42, "MUTATES")], 1000, "resource"),
        ("a", "s", ("FILE:/x", "MUTATES"), 0, "ttl_ms"),
        ("a", "s", ("FILE:/x", "MUTATES"), -5, "ttl_ms"),
        ("a", "s", ("FILE:/x", "MUTATES"), 1.5, "ttl_ms"),
        ("a", "s", ("FILE:/x", "MUTATES"), "1000", "ttl_ms"),
        ("a", "s", ("FILE:/x", "MUTATES"), True, "ttl_ms"),
        ("a", "s", ("FILE:/x", "MUTATES"), None, "ttl_ms"),
        ("a", "s", [], 1000, "intents"),
        ("a", "s", (), 1000, "intents"),
        ("a", "s", "FILE:/x", 1000, "intents"),
        ("a", "s", ["FILE:/x"], 1000, "intents"),
        ("", "s", ("FILE:/x", "MUTATES"), 1000, "agent_id"),
        (None, "s", ("FILE:/x", "MUTATES"), 1000, "agent_id"),
        ("a", "", ("FILE:/x", "MUTATES"), 1000, "session_id"),
    ],
)
@pytest.mark.parametrize("blocking", [False, True], ids=["try_acquire", "acquire"])
async def test_invalid_requests_raise_and_change_nothing(
    api: Api,
    agent_id: Any,
    session_id: Any,
    intents: Any,
    ttl_ms: Any,
    argument: str,
    blocking: bool,
) -> None:
    call = api.acquire if blocking else api.try_acquire
    with pytest.raises(InvalidRequestError) as info:
        await call(agent_id, session_id, intents, ttl_ms)
    assert isinstance(info.value, ValueError)
    assert info.value.argument == argument
    assert repr(info.value.value) in str(info.value)
    assert api.list() == []
    if isinstance(agent_id, str) and agent_id:
        assert api.kw.get_agent(agent_id) is None
    assert api.kinds() == []  # not even a lease.denied


@pytest.mark.parametrize("timeout_s", [-1, True])
async def test_invalid_timeout(api: Api, timeout_s: Any) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await api.acquire("a", "s", ("FILE:/x", "MUTATES"), timeout_s=timeout_s)
    assert info.value.argument == "timeout_s"
    assert api.list() == []


@pytest.mark.parametrize(("agent_id", "priority"), [("", None), (None, 1), ("a", "1"), ("a", 1.0)])
async def test_invalid_registration(api: Api, agent_id: Any, priority: Any) -> None:
    with pytest.raises(InvalidRequestError):
        await api.register_agent(agent_id, priority)


async def test_verdict_lease_raises_when_not_granted(api: Api) -> None:
    await api.register_agent("old", 1)
    await api.try_acquire("old", "s", ("FILE:/x", "MUTATES"))
    verdict = await api.try_acquire("young", "s", ("FILE:/x", "MUTATES"))
    assert not verdict.granted
    with pytest.raises(LeaseConflictError) as info:
        verdict.lease  # noqa: B018
    assert info.value.reason == "DIE"
    assert info.value.conflicts == verdict.conflicts
    assert "old" in str(info.value)


async def test_granted_lease_fields(api: Api) -> None:
    verdict = await api.try_acquire("a", "s1", ("file://src//a.ts/", "DELETES"), ttl_ms=1234)
    lease = verdict.lease
    assert lease.agent_id == "a"
    assert lease.session_id == "s1"
    assert lease.resource == "FILE:/src/a.ts"
    assert lease.predicate is Predicate.DELETES
    assert lease.acquired_at == T0
    assert lease.expires_at == T0 + 1234
    assert lease.state is LeaseState.ACTIVE
    assert verdict.conflicts == [] and verdict.wait_time_ms is None
    assert api.get(lease.lease_id) == lease


async def test_a_sub_session_is_inside_its_session(api: Api) -> None:
    # "t1/call-1" runs inside "t1": reentrant with what "t1" holds...
    await api.try_acquire("a", "t1", ("FILE:/src", "MUTATES"))
    assert (await api.try_acquire("a", "t1/call-1", ("FILE:/src/x.py", "MUTATES"))).granted
    # ...but its sibling is not reentrant with it, and the parent not with the child.
    sibling = await api.try_acquire("a", "t1/call-2", ("FILE:/src/x.py", "MUTATES"))
    assert not sibling.granted
    assert [c.session_id for c in sibling.conflicts] == ["t1/call-1"]
    assert not (await api.try_acquire("a", "t1", ("FILE:/src/x.py", "MUTATES"))).granted
    # A prefix that is not a path segment is not a parent.
    assert not (await api.try_acquire("a", "t10", ("FILE:/src", "MUTATES"))).granted
