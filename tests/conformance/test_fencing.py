"""Lease ids, fencing tokens, validate and check_fencing."""

from __future__ import annotations

import re

import pytest

from klockwork import InvalidRequestError, LeaseNotFoundError, StaleLeaseError

from .conftest import Api

HEX32 = re.compile(r"^[0-9a-f]{32}$")


async def test_lease_ids_are_unguessable_and_unique(api: Api) -> None:
    ids: list[str] = []
    for batch in range(10):  # 10k ids, in one millisecond of the manual clock
        verdict = await api.try_acquire(
            "a", "s", [(f"TABLE:t{batch}-{i}", "CONSUMES") for i in range(1000)]
        )
        ids.extend(lease.lease_id for lease in verdict.leases)
    assert len(ids) == 10_000
    assert len(set(ids)) == 10_000
    assert all(HEX32.match(i) for i in ids)
    one = await api.try_acquire("b", "s", ("TABLE:single", "CONSUMES"))
    assert HEX32.match(one.lease.lease_id)
    assert one.lease.lease_id not in ids


async def test_fencing_tokens_strictly_increase_per_resource(api: Api) -> None:
    tokens: list[int] = []
    for i in range(20):
        verdict = await api.try_acquire(f"agent{i % 3}", "s", ("FILE:/x", "MUTATES"), 100)
        tokens.append(verdict.lease.fencing_token)
        if i % 2:
            assert await api.release(verdict.lease.lease_id)
        else:
            api.clock.advance(100)  # ends by expiry instead
    assert tokens == sorted(set(tokens))
    # Compatible holders at once still get distinct, increasing tokens.
    shared = [
        (await api.try_acquire(f"r{i}", "s", ("FILE:/y", "CONSUMES"))).lease.fencing_token
        for i in range(5)
    ]
    assert shared == sorted(set(shared))
    assert shared[0] > tokens[-1]  # one counter per store orders leases globally


async def test_manifest_tokens_are_distinct(api: Api) -> None:
    verdict = await api.try_acquire("a", "s", [("FILE:/a", "MUTATES"), ("FILE:/b", "MUTATES")])
    first, second = (lease.fencing_token for lease in verdict.leases)
    assert first < second


async def test_validate(api: Api) -> None:
    verdict = await api.try_acquire("a", "s", ("FILE:/x", "MUTATES"), 100)
    lease = verdict.lease
    assert api.validate(lease.lease_id) == lease
    api.clock.advance(100)
    with pytest.raises(StaleLeaseError) as info:
        api.validate(lease.lease_id)
    assert info.value.resource == "FILE:/x"
    assert info.value.fencing_token == lease.fencing_token
    assert "EXPIRED" in str(info.value)
    with pytest.raises(LeaseNotFoundError):
        api.validate("0" * 32)


@pytest.mark.parametrize("end", ["release", "revoke"])
async def test_validate_after_release_or_revoke(api: Api, end: str) -> None:
    lease = (await api.try_acquire("a", "s", ("FILE:/x", "MUTATES"))).lease
    assert await (api.release(lease.lease_id) if end == "release" else api.revoke(lease.lease_id))
    with pytest.raises(StaleLeaseError):
        api.validate(lease.lease_id)
    newer = (await api.try_acquire("b", "s", ("FILE:/x", "MUTATES"))).lease
    with pytest.raises(StaleLeaseError) as info:
        api.validate(lease.lease_id)
    assert info.value.current_token == newer.fencing_token


async def test_check_fencing(api: Api) -> None:
    old = (await api.try_acquire("a", "s", ("FILE:/x", "MUTATES"), 100)).lease
    api.check_fencing("FILE:/x", old.fencing_token)  # active: current
    api.clock.advance(100)
    api.check_fencing("FILE:/x", old.fencing_token)  # ended, but nobody newer yet
    new = (await api.try_acquire("b", "s", ("FILE:/x", "MUTATES"))).lease
    with pytest.raises(StaleLeaseError) as info:
        api.check_fencing("FILE:/x", old.fencing_token)
    assert info.value.fencing_token == old.fencing_token
    assert info.value.current_token == new.fencing_token
    api.check_fencing("FILE:/x", new.fencing_token)
    api.check_fencing("file://x/", new.fencing_token)  # normalised like any resource


async def test_check_fencing_accepts_an_old_token_while_its_lease_is_active(api: Api) -> None:
    first = (await api.try_acquire("a", "s", ("FILE:/x", "CONSUMES"))).lease
    second = (await api.try_acquire("b", "s", ("FILE:/x", "CONSUMES"))).lease
    assert second.fencing_token > first.fencing_token
    api.check_fencing("FILE:/x", first.fencing_token)  # still active: still valid
    assert await api.release(first.lease_id)
    with pytest.raises(StaleLeaseError):
        api.check_fencing("FILE:/x", first.fencing_token)


async def test_check_fencing_sees_a_newer_lease_on_a_directory_above(api: Api) -> None:
    old = (await api.try_acquire("a", "s", ("FILE:/src/a.ts", "MUTATES"))).lease
    assert await api.release(old.lease_id)
    (await api.try_acquire("b", "s", ("FILE:/src", "MUTATES"))).lease  # noqa: B018
    with pytest.raises(StaleLeaseError):
        api.check_fencing("FILE:/src/a.ts", old.fencing_token)


@pytest.mark.parametrize("token", ["1", 1.0, True, None])
async def test_check_fencing_rejects_a_non_int_token(api: Api, token: object) -> None:
    with pytest.raises(InvalidRequestError):
        api.check_fencing("FILE:/x", token)  # type: ignore[arg-type]
