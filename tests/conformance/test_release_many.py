"""``release_many``: several leases ended in one store call, each as ``release`` ends it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from klockwork import InvalidRequestError, LeaseState

from .conftest import Api

MANIFEST = [("FILE:/m0", "MUTATES"), ("FILE:/m1", "MUTATES"), ("TABLE:t", "CONSUMES")]


async def _manifest(api: Api, agent: str = "a", ttl_ms: int = 10_000) -> list[str]:
    verdict = await api.try_acquire(agent, "s", MANIFEST, ttl_ms)
    assert verdict.granted
    return [lease.lease_id for lease in verdict.leases]


def _ended(api: Api, since: int) -> list[tuple[Any, ...]]:
    """The audit entries after ``since`` entries, as (kind, agent, session, data)."""
    entries = api.kw.audit.query(limit=1000).entries[since:]
    return [(e.kind, e.agent_id, e.session_id, e.data) for e in entries]


async def test_release_many_releases_every_lease(api: Api) -> None:
    ids = await _manifest(api)
    assert await api.release_many(ids) == [True, True, True]
    assert api.list() == []
    for lease_id in ids:
        assert api.get(lease_id).state is LeaseState.RELEASED  # type: ignore[union-attr]
    assert api.kinds() == ["lease.granted"] * 3 + ["lease.released"] * 3
    assert (await api.try_acquire("b", "s", MANIFEST)).granted


async def test_unknown_ended_and_repeated_ids(api: Api) -> None:
    first = await _manifest(api, "a", ttl_ms=100)
    assert await api.release(first[0])
    assert await api.revoke(first[1], "gone")
    api.clock.advance(100)  # first[2] expires (nobody looked yet)
    second = await _manifest(api, "b")
    ids = [first[0], "unknown", first[1], first[2], second[0], second[0], second[2], second[1]]
    assert await api.release_many(ids) == [False, False, False, False, True, False, True, True]
    assert api.get(first[2]).state is LeaseState.EXPIRED  # type: ignore[union-attr]
    assert api.list() == []
    assert await api.release_many(second) == [False, False, False]
    assert await api.release_many([]) == []


async def test_the_audit_trail_is_that_of_separate_releases(api: Api) -> None:
    """Same entries, in the same order, as one ``release`` per id (an expired one included)."""

    async def run(release_all: Any) -> list[tuple[Any, ...]]:
        short = (await api.try_acquire("x", "s", ("FILE:/gone", "MUTATES"), 50)).lease.lease_id
        ids = await _manifest(api, "a")
        api.clock.advance(50)  # ``short`` is past its TTL, not marked expired yet
        since = len(api.kw.audit.query(limit=1000).entries)
        await release_all([ids[1], short, ids[0], "unknown", ids[2]])
        entries = _ended(api, since)
        # lease ids and tokens differ between the two runs; the rest is equal
        for entry in entries:
            assert entry[3]["lease_id"] in [short, *ids]
            assert entry[3]["fencing_token"] > 0
        return [(k, a, s, {**d, "lease_id": "", "fencing_token": 0}) for k, a, s, d in entries]

    async def one_by_one(ids: list[str]) -> None:
        assert [await api.release(i) for i in ids] == [True, False, True, False, True]

    async def together(ids: list[str]) -> None:
        assert await api.release_many(ids) == [True, False, True, False, True]

    separate = await run(one_by_one)
    assert [e[0] for e in separate] == ["lease.released", "lease.expired"] + ["lease.released"] * 2
    assert await run(together) == separate
    assert api.kw.audit.verify().valid


async def test_events_are_those_of_separate_releases(api: Api) -> None:
    ids = await _manifest(api)
    mark = len(api.events)
    await api.release_many(list(reversed(ids)))
    events = api.events[mark:]
    assert [e.kind for e in events] == ["lease.released"] * 3
    assert [e.data["lease_id"] for e in events] == list(reversed(ids))
    assert [e.data["resource"] for e in events] == ["TABLE:t", "FILE:/m1", "FILE:/m0"]


async def test_release_many_wakes_the_waiters(api: Api) -> None:
    await api.register_agent("old", 1)
    await api.register_agent("young", 9)
    ids = await _manifest(api, "young")
    waiters = [
        asyncio.create_task(api.acquire("old", f"s{i}", (resource, "MUTATES")))
        for i, resource in enumerate(["FILE:/m1", "TABLE:t"])
    ]
    await api.until_sleeping(2)
    assert not any(w.done() for w in waiters)
    assert await api.release_many(ids) == [True, True, True]  # no clock advance: notified
    verdicts = await asyncio.wait_for(asyncio.gather(*waiters), 15)
    assert [v.lease.resource for v in verdicts] == ["FILE:/m1", "TABLE:t"]


@pytest.mark.parametrize(
    "bad",
    ["0" * 32, b"ids", 7, None, ["ok", 7], ["ok", "x\x00y"], ["ok", "z" * 2000]],
)
async def test_bad_input_releases_nothing(api: Api, bad: Any) -> None:
    ids = await _manifest(api)
    if isinstance(bad, list):
        bad = [ids[0], *bad[1:]]  # a real id first: it must stay held
    with pytest.raises(InvalidRequestError) as info:
        await api.release_many(bad)
    assert info.value.argument == "lease_ids"
    assert sorted(x.lease_id for x in api.list()) == sorted(ids)


async def test_any_iterable_of_ids(api: Api) -> None:
    ids = await _manifest(api)
    assert await api.release_many(i for i in ids) == [True, True, True]


async def test_leaving_a_manifest_hold_releases_every_lease(api: Api) -> None:
    leases = api.kw.leases
    if api.is_async:
        async with leases.ahold("a", "s", MANIFEST, 10_000) as held:
            ids = held.lease_ids
    else:
        holding = leases.hold("a", "s", MANIFEST, 10_000)
        held = await asyncio.to_thread(holding.__enter__)
        ids = held.lease_ids
        await asyncio.to_thread(holding.__exit__, None, None, None)
    assert len(ids) == 3
    assert api.list() == []
    assert api.kinds() == ["lease.granted"] * 3 + ["lease.released"] * 3
    for lease_id in ids:
        assert api.get(lease_id).state is LeaseState.RELEASED  # type: ignore[union-attr]
