"""Blocking acquire on a manual clock: WAIT wakes on notification or expiry, DIE retries."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from klockwork import (
    EventLoopBlockedError,
    Klockwork,
    LeaseTimeoutError,
    ManualClock,
    StoreUnavailableError,
    Verdict,
)

from .conftest import T0, Api


async def _old_waits_for_young(api: Api, ttl_ms: int = 10_000) -> str:
    await api.register_agent("old", 1)
    await api.register_agent("young", 9)
    return (await api.try_acquire("young", "s", ("FILE:/x", "MUTATES"), ttl_ms)).lease.lease_id


async def test_acquire_returns_at_once_when_free(api: Api) -> None:
    verdict = await api.acquire("a", "s", ("FILE:/x", "MUTATES"), timeout_s=0)
    assert verdict.granted
    assert api.clock.pending_timers == 0


async def test_wait_wakes_on_release_notification(api: Api) -> None:
    holder = await _old_waits_for_young(api)
    waiter = asyncio.create_task(api.acquire("old", "s", ("FILE:/x", "MUTATES")))
    await api.until_sleeping()
    assert not waiter.done()
    assert await api.release(holder)  # no clock advance: only the notification wakes it
    verdict = await asyncio.wait_for(waiter, 15)
    assert verdict.lease.agent_id == "old"
    assert verdict.lease.acquired_at == T0


async def test_wait_wakes_on_revoke(api: Api) -> None:
    holder = await _old_waits_for_young(api)
    waiter = asyncio.create_task(api.acquire("old", "s", ("FILE:/x", "MUTATES")))
    await api.until_sleeping()
    assert await api.revoke(holder)
    assert (await asyncio.wait_for(waiter, 15)).granted


async def test_wait_wakes_when_the_holder_expires(api: Api) -> None:
    await _old_waits_for_young(api, ttl_ms=1000)
    waiter = asyncio.create_task(api.acquire("old", "s", ("FILE:/x", "MUTATES")))
    await api.until_sleeping()
    api.clock.advance(999)
    await asyncio.sleep(0.01)
    # (not a timing assertion: even if it woke, the holder is still live here)
    api.clock.advance(1)
    verdict = await asyncio.wait_for(waiter, 15)
    assert verdict.lease.acquired_at == T0 + 1000


async def test_die_retries_until_the_older_holder_releases(api: Api) -> None:
    await api.register_agent("old", 1)
    holder = (await api.try_acquire("old", "s", ("FILE:/x", "MUTATES"))).lease.lease_id
    waiter = asyncio.create_task(api.acquire("young", "s", ("FILE:/x", "MUTATES")))
    await api.until_sleeping()  # backing off after DIE
    for _ in range(3):  # back-off elapses: it retries, dies again, backs off again
        api.clock.advance(200)
        await api.until_sleeping()
    assert api.tries("young").count("DIE") >= 3
    assert api.kinds("young") == []  # retries are not outcomes: nothing recorded yet
    assert not waiter.done()
    assert await api.release(holder)
    verdict = await asyncio.wait_for(waiter, 15)
    assert verdict.lease.agent_id == "young"
    assert api.kinds("young") == ["lease.granted"]  # one outcome for the whole call
    assert api.kw.get_agent("young").priority == T0  # type: ignore[union-attr]


async def test_wait_timeout(api: Api) -> None:
    holder = await _old_waits_for_young(api)
    waiter = asyncio.create_task(api.acquire("old", "s", ("FILE:/x", "MUTATES"), timeout_s=2))
    await api.until_sleeping()
    api.clock.advance(2000)
    with pytest.raises(LeaseTimeoutError) as info:
        await asyncio.wait_for(waiter, 15)
    assert info.value.reason == "WAIT"
    assert [c.lease_id for c in info.value.conflicts] == [holder]
    assert info.value.wait_time_ms == 8000
    assert api.list(agent_id="old") == []


async def test_die_timeout(api: Api) -> None:
    await api.register_agent("old", 1)
    await api.try_acquire("old", "s", ("FILE:/x", "MUTATES"))
    waiter = asyncio.create_task(api.acquire("young", "s", ("FILE:/x", "MUTATES"), timeout_s=1))
    await api.until_sleeping()
    api.clock.advance(1000)
    with pytest.raises(LeaseTimeoutError) as info:
        await asyncio.wait_for(waiter, 15)
    assert info.value.reason == "DIE"
    assert api.list(agent_id="young") == []


async def test_zero_timeout_gives_up_at_once(api: Api) -> None:
    await _old_waits_for_young(api)
    with pytest.raises(LeaseTimeoutError):
        await api.acquire("old", "s", ("FILE:/x", "MUTATES"), timeout_s=0)
    assert api.clock.pending_timers == 0
    assert api.kw.leases.waiting == 0


async def test_many_waiters_are_served_oldest_first(api: Api) -> None:
    await api.register_agent("holder", 100)
    current = (await api.try_acquire("holder", "s", ("FILE:/x", "MUTATES"))).lease.lease_id
    waiters: dict[int, asyncio.Task[Verdict]] = {}
    for prio in (3, 2, 1):  # youngest first: each arrival is older, so each one WAITs
        await api.register_agent(f"w{prio}", prio)
        waiters[prio] = asyncio.create_task(api.acquire(f"w{prio}", "s", ("FILE:/x", "MUTATES")))
        await api.until_sleeping(len(waiters))
    refused = [(agent, status) for agent, status in api.tried if agent != "holder"]
    assert {agent for agent, _ in refused} == {"w1", "w2", "w3"}
    assert {status for _, status in refused} == {"WAIT"}
    order = []
    while waiters:
        assert await api.release(current)
        for _ in range(1000):
            # A waiter that lost the race backs off on the (manual) clock: let time pass.
            done, _ = await asyncio.wait(
                waiters.values(), timeout=0.01, return_when=asyncio.FIRST_COMPLETED
            )
            if done:
                break
            api.clock.advance(10)
        assert len(done) == 1
        task = done.pop()
        prio = next(p for p, t in waiters.items() if t is task)
        order.append(prio)
        del waiters[prio]
        current = task.result().lease.lease_id
    assert order == [1, 2, 3]


@pytest.mark.parametrize("why", ["WAIT", "DIE"])
async def test_closing_the_engine_wakes_waiters_and_they_fail_closed(api: Api, why: str) -> None:
    await api.register_agent("old", 1)
    await api.register_agent("young", 9)
    holder, asker = ("young", "old") if why == "WAIT" else ("old", "young")
    await api.try_acquire(holder, "s", ("FILE:/x", "MUTATES"))
    waiter = asyncio.create_task(api.acquire(asker, "s", ("FILE:/x", "MUTATES")))
    await api.until_sleeping()
    api.kw.close()  # no clock advance, no release: closing alone must wake it
    with pytest.raises(StoreUnavailableError):
        await asyncio.wait_for(waiter, 15)


async def test_sync_acquire_refuses_to_block_a_running_loop(api: Api) -> None:
    holder = await _old_waits_for_young(api)
    with pytest.raises(EventLoopBlockedError) as info:
        api.kw.leases.acquire("old", "s", ("FILE:/x", "MUTATES"))
    assert isinstance(info.value, RuntimeError)
    assert "aacquire" in str(info.value)
    # It withdrew its reservation: a younger agent is judged against the holder only.
    verdict = await api.try_acquire("mid", "s", ("FILE:/x", "MUTATES"))
    assert [c.lease_id for c in verdict.conflicts] == [holder]
    # A free resource is still granted from a running loop (no wait needed).
    assert api.kw.leases.acquire("old", "s", ("FILE:/free", "MUTATES")).granted


async def test_the_refusal_names_the_call_the_user_made(api: Api) -> None:
    await _old_waits_for_young(api)
    kw = api.kw
    cases = [
        (lambda: kw.leases.acquire("old", "s", ("FILE:/x", "MUTATES")), "await kw.leases.aacquire"),
        (lambda: kw.leases.hold("old", "s", ("FILE:/x", "MUTATES")).__enter__(), "kw.leases.ahold"),
        (lambda: kw.lease("old", "s", "FILE:/x").__enter__(), "async with kw.alease(...)"),
    ]
    for call, twin in cases:
        with pytest.raises(EventLoopBlockedError) as info:
            call()
        assert info.value.use.startswith(twin.split("(")[0]) or twin in info.value.use
        assert twin in str(info.value)
    assert kw.leases.list(agent_id="old") == []  # nothing was taken on the way


@pytest.mark.parametrize("ttl_ms", [1000, 2007])
async def test_wait_wakes_at_the_holders_expiry_on_a_clock_at_zero(
    make_kw: Callable[..., Klockwork],
    flavour: str,
    store_kind: str,
    ttl_ms: int,
) -> None:
    # 2007 ms is 2.007 s, and 2.007 * 1000.0 == 2007.0000000000002 in floats: the
    # deadline must still be reached by advancing exactly 2007 ms.
    clock = ManualClock()  # start_ms=0, as DESIGN shows it
    api = Api(make_kw(clock, db="zero.db"), flavour, clock, store_kind)
    try:
        await api.register_agent("old", 1)
        await api.register_agent("young", 9)
        await api.try_acquire("young", "s", ("FILE:/x", "MUTATES"), ttl_ms)
        waiter = asyncio.create_task(api.acquire("old", "s", ("FILE:/x", "MUTATES")))
        await api.until_sleeping()
        assert set(api.tries("old")) == {"WAIT"}  # old waits (it does not back off)
        clock.advance(ttl_ms)  # exactly the holder's expiry
        done, _ = await asyncio.wait([waiter], timeout=2)
        assert done, "the waiter was not woken by the holder's expiry"
        assert waiter.result().lease.acquired_at == ttl_ms
    finally:
        clock.advance(10**9)
        await asyncio.wait_for(waiter, 15)
