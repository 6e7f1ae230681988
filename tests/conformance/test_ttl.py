"""TTLs, heartbeats, release and revoke (on a manual clock, no sweeper)."""

from __future__ import annotations

import pytest

from klockwork import (
    InvalidRequestError,
    LeaseExpiredError,
    LeaseNotFoundError,
    LeaseRevokedError,
    LeaseState,
    VerdictStatus,
)

from .conftest import T0, Api


async def _hold(api: Api, agent: str = "a", ttl_ms: int = 1000, resource: str = "FILE:/x") -> str:
    verdict = await api.try_acquire(agent, "s", (resource, "MUTATES"), ttl_ms)
    return verdict.lease.lease_id


async def test_expired_lease_never_blocks_without_a_sweep(api: Api) -> None:
    await api.register_agent("old", 1)
    lease_id = await _hold(api, "old", ttl_ms=100)
    api.clock.advance(99)
    assert (await api.try_acquire("young", "s", ("FILE:/x", "MUTATES"))).status is (
        VerdictStatus.DIE
    )
    assert [lease.lease_id for lease in api.list()] == [lease_id]
    api.clock.advance(1)  # expires_at == now: expired
    assert api.list() == []
    verdict = await api.try_acquire("young", "s", ("FILE:/x", "MUTATES"))
    assert verdict.granted
    lease = api.get(lease_id)
    assert lease is not None and lease.state is LeaseState.EXPIRED


async def test_expired_lease_is_reported_by_get(api: Api) -> None:
    lease_id = await _hold(api, ttl_ms=100)
    api.clock.advance(500)
    lease = api.get(lease_id)
    assert lease is not None and lease.state is LeaseState.EXPIRED
    assert api.get("0" * 32) is None


async def test_heartbeat_extends_an_active_lease(api: Api) -> None:
    lease_id = await _hold(api, ttl_ms=1000)
    api.clock.advance(600)
    renewed = await api.heartbeat(lease_id)
    assert renewed.expires_at == T0 + 600 + 1000  # its own TTL by default
    assert renewed.state is LeaseState.ACTIVE
    api.clock.advance(900)
    assert (await api.heartbeat(lease_id, ttl_ms=50)).expires_at == T0 + 1500 + 50
    assert api.get(lease_id).expires_at == T0 + 1550  # type: ignore[union-attr]
    api.clock.advance(49)
    assert [lease.lease_id for lease in api.list()] == [lease_id]


async def test_heartbeat_never_revives_an_expired_lease(api: Api) -> None:
    lease_id = await _hold(api, ttl_ms=100)
    api.clock.advance(100)
    with pytest.raises(LeaseExpiredError) as info:
        await api.heartbeat(lease_id)
    assert info.value.lease_id == lease_id
    with pytest.raises(LeaseExpiredError):
        await api.heartbeat(lease_id, ttl_ms=10_000)  # still not
    assert api.get(lease_id).state is LeaseState.EXPIRED  # type: ignore[union-attr]
    assert api.list() == []
    assert (await api.try_acquire("b", "s", ("FILE:/x", "MUTATES"))).granted


async def test_heartbeat_of_an_expired_lease_after_a_sweep(api: Api) -> None:
    lease_id = await _hold(api, ttl_ms=100)
    api.clock.advance(150)
    assert api.sweep() == 1
    assert api.sweep() == 0
    with pytest.raises(LeaseExpiredError):
        await api.heartbeat(lease_id)


async def test_heartbeat_of_a_revoked_lease(api: Api) -> None:
    lease_id = await _hold(api)
    assert await api.revoke(lease_id, "operator said so")
    with pytest.raises(LeaseRevokedError) as info:
        await api.heartbeat(lease_id)
    assert info.value.lease_id == lease_id
    assert "operator said so" in str(info.value)
    assert api.get(lease_id).state is LeaseState.REVOKED  # type: ignore[union-attr]


async def test_heartbeat_of_a_released_or_unknown_lease(api: Api) -> None:
    lease_id = await _hold(api)
    assert await api.release(lease_id)
    with pytest.raises(LeaseNotFoundError):
        await api.heartbeat(lease_id)
    with pytest.raises(LeaseNotFoundError):
        await api.heartbeat("f" * 32)
    assert api.get(lease_id).state is LeaseState.RELEASED  # type: ignore[union-attr]


@pytest.mark.parametrize("ttl_ms", [0, -1, 2.5, True])
async def test_heartbeat_rejects_a_bad_ttl(api: Api, ttl_ms: object) -> None:
    lease_id = await _hold(api, ttl_ms=1000)
    with pytest.raises(InvalidRequestError) as info:
        await api.heartbeat(lease_id, ttl_ms=ttl_ms)  # type: ignore[arg-type]
    assert info.value.argument == "ttl_ms"
    assert api.get(lease_id).expires_at == T0 + 1000  # type: ignore[union-attr]


async def test_release(api: Api) -> None:
    lease_id = await _hold(api)
    assert await api.release(lease_id) is True
    assert await api.release(lease_id) is False  # released twice
    assert api.get(lease_id).state is LeaseState.RELEASED  # type: ignore[union-attr]
    assert (await api.try_acquire("b", "s", ("FILE:/x", "MUTATES"))).granted


async def test_release_returns_false_when_expired(api: Api) -> None:
    lease_id = await _hold(api, ttl_ms=100)
    api.clock.advance(100)
    assert await api.release(lease_id) is False
    assert api.get(lease_id).state is LeaseState.EXPIRED  # type: ignore[union-attr]


async def test_release_returns_false_when_revoked_or_unknown(api: Api) -> None:
    lease_id = await _hold(api)
    assert await api.revoke(lease_id)
    assert await api.release(lease_id) is False
    assert api.get(lease_id).state is LeaseState.REVOKED  # type: ignore[union-attr]
    assert await api.release("nope") is False


async def test_revoke(api: Api) -> None:
    await api.register_agent("old", 1)
    lease_id = await _hold(api, "old")
    assert (await api.try_acquire("b", "s", ("FILE:/x", "MUTATES"))).status is VerdictStatus.DIE
    assert await api.revoke(lease_id, "stuck") is True
    assert await api.revoke(lease_id) is False  # not active any more
    assert api.list() == []
    assert (await api.try_acquire("b", "s", ("FILE:/x", "MUTATES"))).granted
    assert await api.revoke("unknown") is False


async def test_revoke_of_an_expired_lease(api: Api) -> None:
    lease_id = await _hold(api, ttl_ms=100)
    api.clock.advance(100)
    assert await api.revoke(lease_id) is False
    assert api.get(lease_id).state is LeaseState.EXPIRED  # type: ignore[union-attr]


async def test_sweep_marks_expired_leases(api: Api) -> None:
    short = await _hold(api, "a", ttl_ms=100, resource="FILE:/a")
    long = await _hold(api, "b", ttl_ms=1000, resource="FILE:/b")
    api.clock.advance(100)
    assert api.sweep() == 1
    assert api.get(short).state is LeaseState.EXPIRED  # type: ignore[union-attr]
    assert api.get(long).state is LeaseState.ACTIVE  # type: ignore[union-attr]
