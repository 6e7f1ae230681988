"""``with kw.lease(...)`` / ``async with kw.alease(...)``: acquire, auto-renew, release."""

from __future__ import annotations

import asyncio

import pytest

from klockwork import HeldLeases, LeaseLostError, LeaseState, LeaseTimeoutError, ManualClock

from .conftest import T0, Api, eventually

TTL = 300


async def _renewer_settled(api: Api) -> None:
    """The renewer thread finished what the last advance made due and sleeps again."""
    await api.until_sleeping(1)


async def test_hold_acquires_and_releases(api: Api) -> None:
    async with api.hold("a", "s", "FILE:/x", "MUTATES", TTL) as held:
        lease = held.lease
        assert held.leases == [lease]
        assert held.lease_ids == [lease.lease_id]
        assert not held.lost and held.lost_reason is None
        assert [x.lease_id for x in api.list()] == [lease.lease_id]
    assert api.list() == []
    assert api.get(lease.lease_id).state is LeaseState.RELEASED  # type: ignore[union-attr]
    assert api.kinds()[-1] == "lease.released"


async def test_hold_auto_renews_past_its_ttl(api: Api) -> None:
    async with api.hold("a", "s", "FILE:/x", "MUTATES", TTL) as held:
        lease_id = held.lease.lease_id
        await _renewer_settled(api)
        for _ in range(12):  # 4 TTLs in steps of ttl/3
            api.clock.advance(TTL // 3)
            await _renewer_settled(api)
            current = api.get(lease_id)
            assert current is not None and current.state is LeaseState.ACTIVE
            assert current.expires_at > api.clock.now_ms()
        assert api.clock.now_ms() == T0 + 4 * TTL
        assert not held.lost
        assert [x.lease_id for x in api.list()] == [lease_id]
        # Somebody else still cannot get in.
        assert not (await api.try_acquire("b", "s", ("FILE:/x", "MUTATES"))).granted
    assert api.list() == []


async def test_hold_renews_exactly_every_third_of_its_ttl(api: Api) -> None:
    async with api.hold("a", "s", "FILE:/x", "MUTATES", TTL) as held:
        lease_id = held.lease.lease_id
        await _renewer_settled(api)
        for step in range(1, 7):
            api.clock.advance(TTL // 3)
            await _renewer_settled(api)
            expires = api.get(lease_id).expires_at  # type: ignore[union-attr]
            assert expires == T0 + step * (TTL // 3) + TTL, f"no renewal at step {step}"


async def test_hold_without_auto_renew_expires(api: Api) -> None:
    async with api.hold("a", "s", "FILE:/x", "MUTATES", TTL, auto_renew=False) as held:
        assert api.clock.pending_timers == 0  # nothing scheduled
        api.clock.advance(TTL)
        assert api.get(held.lease.lease_id).state is LeaseState.EXPIRED  # type: ignore[union-attr]
        assert (await api.try_acquire("b", "s", ("FILE:/x", "MUTATES"))).granted


async def _advance_until_lost(api: Api, held: HeldLeases) -> None:
    """Let renewals fall due until one fails (the renewer then stops scheduling)."""
    for _ in range(10):
        api.clock.advance(TTL // 3)
        await eventually(lambda: held.lost or api.clock.pending_timers >= 1, "the renewer")
        if held.lost:
            return
    raise AssertionError("the renewer never noticed the loss")


async def test_revoked_during_the_block_is_lost_and_raises_on_exit(api: Api) -> None:
    with pytest.raises(LeaseLostError) as info:
        async with api.hold("a", "s", "FILE:/x", "MUTATES", TTL) as held:
            await _renewer_settled(api)
            assert await api.revoke(held.lease.lease_id, "operator")
            await _advance_until_lost(api, held)
            assert held.lost
            assert "Revoked" in (held.lost_reason or "")
            # Someone else may hold it now.
            assert (await api.try_acquire("b", "s", ("FILE:/x", "MUTATES"))).granted
    assert info.value.lease_id == held.lease.lease_id


async def test_lost_by_expiry_raises_on_exit(api: Api) -> None:
    # Renewals stop (the store said no); here: the lease was already expired when renewed.
    with pytest.raises(LeaseLostError):
        async with api.hold("a", "s", "FILE:/x", "MUTATES", TTL) as held:
            await _renewer_settled(api)
            api.clock.advance(10 * TTL)  # a stall far beyond the TTL
            await eventually(lambda: held.lost, "the renewer to notice")
            assert "Expired" in (held.lost_reason or "")


async def test_an_error_in_the_block_wins_over_the_loss(api: Api) -> None:
    with pytest.raises(KeyError):
        async with api.hold("a", "s", "FILE:/x", "MUTATES", TTL) as held:
            await _renewer_settled(api)
            assert await api.revoke(held.lease.lease_id)
            await _advance_until_lost(api, held)
            raise KeyError("boom")
    assert api.list() == []


async def test_an_error_in_the_block_releases(api: Api) -> None:
    with pytest.raises(KeyError):
        async with api.hold("a", "s", "FILE:/x", "MUTATES", TTL):
            raise KeyError("boom")
    assert api.list() == []
    assert api.kinds()[-1] == "lease.released"


async def test_hold_waits_for_the_resource(api: Api) -> None:
    await api.register_agent("old", 1)
    await api.register_agent("young", 9)
    holder = (await api.try_acquire("young", "s", ("FILE:/x", "MUTATES"))).lease.lease_id
    entered = asyncio.Event()

    async def block() -> None:
        async with api.hold("old", "s", "FILE:/x", "MUTATES", TTL):
            entered.set()

    task = asyncio.create_task(block())
    await api.until_sleeping()
    assert not entered.is_set()
    assert await api.release(holder)
    await asyncio.wait_for(task, 15)
    assert entered.is_set()


async def test_hold_timeout(api: Api) -> None:
    await api.register_agent("old", 1)
    await api.try_acquire("old", "s", ("FILE:/x", "MUTATES"))
    with pytest.raises(LeaseTimeoutError):
        async with api.hold("young", "s", "FILE:/x", "MUTATES", TTL, timeout_s=0):
            pytest.fail("entered without the lease")


async def test_hold_on_a_clock_starting_at_zero(
    make_kw: object, flavour: str, store_kind: str
) -> None:
    clock = ManualClock()  # start_ms=0, as DESIGN shows it
    api = Api(make_kw(clock, db="zero.db"), flavour, clock, store_kind)  # type: ignore[operator]
    try:
        async with api.hold("a", "s", "FILE:/x", "MUTATES", TTL) as held:
            await _renewer_settled(api)
            for _ in range(12):
                api.clock.advance(TTL // 3)
                await _renewer_settled(api)
            assert api.get(held.lease.lease_id).state is LeaseState.ACTIVE  # type: ignore[union-attr]
            assert not held.lost
    finally:
        clock.advance(10**12)
