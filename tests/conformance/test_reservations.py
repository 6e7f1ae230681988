"""An older waiter reserves its intent: younger newcomers die (no barging, no starvation)."""

from __future__ import annotations

import asyncio

import pytest

from klockwork import LeaseTimeoutError, VerdictStatus

from .conftest import Api


async def _setup(api: Api) -> str:
    """old(1) waits behind holder(9); returns the holder's lease id."""
    await api.register_agent("old", 1)
    await api.register_agent("mid", 5)
    await api.register_agent("holder", 9)
    held = await api.try_acquire("holder", "s", ("FILE:/r", "MUTATES"))
    return held.lease.lease_id


async def test_older_waiter_reserves_and_is_served_next(api: Api) -> None:
    holder = await _setup(api)
    waiter = asyncio.create_task(api.acquire("old", "s", ("FILE:/r", "MUTATES")))
    await api.until_sleeping()

    # mid is older than the holder (alone it would WAIT) but younger than the waiter.
    verdict = await api.try_acquire("mid", "s", ("FILE:/r", "MUTATES"))
    assert verdict.status is VerdictStatus.DIE
    by_agent = {c.agent_id: c for c in verdict.conflicts}
    assert by_agent["old"].lease_id is None  # a waiter, not a holder
    assert by_agent["old"].resource == "FILE:/r"
    assert by_agent["holder"].lease_id == holder
    # The reservation covers the hierarchy too.
    below = await api.try_acquire("mid", "s", ("FILE:/r/sub", "CONSUMES"))
    assert below.status is VerdictStatus.DIE
    assert {c.agent_id for c in below.conflicts} == {"holder", "old"}
    # A compatible or unrelated request is not blocked by it.
    assert (await api.try_acquire("mid", "s", ("FILE:/other", "MUTATES"))).granted

    assert await api.release(holder)
    granted = await asyncio.wait_for(waiter, 15)
    assert granted.lease.agent_id == "old"
    # Served: the reservation is gone, the lease now blocks.
    after = await api.try_acquire("mid", "s", ("FILE:/r", "MUTATES"))
    assert [c.lease_id for c in after.conflicts] == [granted.lease.lease_id]


async def test_an_older_newcomer_may_go_before_a_younger_waiter(api: Api) -> None:
    holder = await _setup(api)
    await api.register_agent("eldest", 0)
    waiter = asyncio.create_task(api.acquire("mid", "s", ("FILE:/r", "MUTATES")))
    await api.until_sleeping()
    verdict = await api.try_acquire("eldest", "s", ("FILE:/r", "MUTATES"))
    assert verdict.status is VerdictStatus.WAIT  # only the holder blocks it
    assert [c.agent_id for c in verdict.conflicts] == ["holder"]
    assert await api.release(holder)
    assert (await asyncio.wait_for(waiter, 15)).granted


async def test_newcomers_never_barge_past_the_waiter(api: Api) -> None:
    holder = await _setup(api)
    waiter = asyncio.create_task(api.acquire("old", "s", ("FILE:/r", "MUTATES")))
    await api.until_sleeping()
    assert await api.release(holder)
    # Right after the release, before or after the waiter retried: mid never wins.
    for _ in range(20):
        verdict = await api.try_acquire("mid", "s", ("FILE:/r", "MUTATES"))
        assert verdict.status is VerdictStatus.DIE
    assert (await asyncio.wait_for(waiter, 15)).lease.agent_id == "old"


async def test_a_waiter_that_times_out_leaves_no_reservation(api: Api) -> None:
    holder = await _setup(api)
    waiter = asyncio.create_task(api.acquire("old", "s", ("FILE:/r", "MUTATES"), timeout_s=0.5))
    await api.until_sleeping()
    api.clock.advance(600)
    with pytest.raises(LeaseTimeoutError) as info:
        await asyncio.wait_for(waiter, 15)
    assert info.value.reason == "WAIT"
    assert [c.lease_id for c in info.value.conflicts] == [holder]
    assert await api.release(holder)
    assert (await api.try_acquire("mid", "s", ("FILE:/r", "MUTATES"))).granted


async def test_a_cancelled_async_waiter_leaves_no_reservation(api: Api) -> None:
    holder = await _setup(api)
    waiter = asyncio.create_task(api.kw.leases.aacquire("old", "s", ("FILE:/r", "MUTATES")))
    await api.until_sleeping()
    blocked = await api.try_acquire("mid", "s", ("FILE:/r", "MUTATES"))
    assert "old" in {c.agent_id for c in blocked.conflicts}
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert api.kw.leases.waiting == 0
    verdict = await api.try_acquire("mid", "s", ("FILE:/r", "MUTATES"))
    assert [c.agent_id for c in verdict.conflicts] == ["holder"]  # no stale reservation
    assert await api.release(holder)
    assert (await api.try_acquire("mid", "s", ("FILE:/r", "MUTATES"))).granted


async def test_a_younger_newcomer_never_barges_past_an_older_agent_backing_off(
    api: Api,
) -> None:
    await api.register_agent("first", 1)
    await api.register_agent("second", 2)
    await api.register_agent("third", 3)
    await api.register_agent("holder", 9)
    holder = (await api.try_acquire("holder", "s", ("FILE:/x", "MUTATES"))).lease.lease_id
    # first WAITs behind the holder and reserves both of its intents.
    first = asyncio.create_task(
        api.acquire("first", "s", [("FILE:/x", "MUTATES"), ("FILE:/y", "MUTATES")])
    )
    await api.until_sleeping(1)
    # second wants FILE:/y: only first's reservation blocks it -> DIE, it backs off.
    second = asyncio.create_task(api.acquire("second", "s", ("FILE:/y", "MUTATES")))
    await api.until_sleeping(2)
    assert await api.release(holder)
    for lease in (await asyncio.wait_for(first, 15)).leases:
        assert await api.release(lease.lease_id)
    try:
        # second (older, still acquiring) is backing off; third is younger.
        verdict = await api.try_acquire("third", "s", ("FILE:/y", "MUTATES"))
        assert verdict.status is VerdictStatus.DIE, "third barged past the older second"
        assert [c.agent_id for c in verdict.conflicts] == ["second"]
    finally:
        for lease in api.list(agent_id="third"):
            await api.release(lease.lease_id)
        api.clock.advance(1000)
        assert (await asyncio.wait_for(second, 15)).granted


async def test_the_waiters_are_listed_while_they_wait(api: Api) -> None:
    holder = await _setup(api)
    assert api.kw.leases.waiters() == []
    waiter = asyncio.create_task(api.acquire("old", "s", ("FILE:/r", "MUTATES")))
    await api.until_sleeping()
    [line] = api.kw.leases.waiters()
    assert (line.agent_id, line.session_id, line.resource, line.predicate.value, line.priority) == (
        "old",
        "s",
        "FILE:/r",
        "MUTATES",
        1,
    )
    assert line.until > api.clock.now_ms()
    assert api.kw.leases.waiters("FILE:/r/sub") == [line]  # overlapping: a path inside
    assert api.kw.leases.waiters("FILE:/other") == []
    assert await api.release(holder)
    await asyncio.wait_for(waiter, 15)
    assert api.kw.leases.waiters() == []  # served: out of line
