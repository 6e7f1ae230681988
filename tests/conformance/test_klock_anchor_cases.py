"""What Klock gets wrong (ANCHORS.md), re-expressed as black-box tests klockwork passes.

One test (or a few) per failure listed in ANCHORS.md, in its order. The
SQLite-across-processes case is the multi-process test in
``test_multiprocess.py``; here it is also checked with two engines on one
file, each with its own connections, as two processes would have.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from klockwork import (
    InvalidRequestError,
    KlockClient,
    LeaseExpiredError,
    LeaseNotFoundError,
    LeaseState,
    ManualClock,
    SqliteStore,
    StaleLeaseError,
    VerdictStatus,
)
from klockwork import Klockwork as Engine

from .conftest import T0, Api, StoreMaker, in_threads

# 1. "only the first conflicting holder decides WAIT/DIE, in hash order"


@pytest.mark.parametrize("first", ["younger-holder-first", "older-holder-first"])
async def test_every_conflicting_holder_is_judged(api: Api, first: str) -> None:
    await api.register_agent("h-young", 9)
    await api.register_agent("h-old", 1)
    await api.register_agent("req", 5)
    holders = ["h-young", "h-old"] if first == "younger-holder-first" else ["h-old", "h-young"]
    for h in holders:
        assert (await api.try_acquire(h, "s", ("FILE:/r", "CONSUMES"))).granted
    verdict = await api.try_acquire("req", "s", ("FILE:/r", "MUTATES"))
    assert verdict.status is VerdictStatus.DIE
    assert sorted(c.agent_id for c in verdict.conflicts) == ["h-old", "h-young"]


# 2. "a holder that never registered is skipped -> two writers granted"


async def test_unregistered_holder_still_blocks(api: Api) -> None:
    await api.register_agent("registered", 1)
    assert (await api.try_acquire("never-registered", "s", ("FILE:/r", "MUTATES"))).granted
    verdict = await api.try_acquire("registered", "s", ("FILE:/r", "MUTATES"))
    assert verdict.status is VerdictStatus.WAIT
    writers = [lease.agent_id for lease in api.list(resource="FILE:/r")]
    assert writers == ["never-registered"]


async def test_unregistered_holder_still_blocks_through_klock_client(api: Api) -> None:
    client = KlockClient(api.kw)
    client.register_agent("registered", 1)
    assert client.acquire_lease("ghost", "s", "FILE", "/r", "MUTATES", 1000)["success"]
    second = client.acquire_lease("registered", "s", "FILE", "/r", "MUTATES", 1000)
    assert second["success"] is False and second["reason"] == "WAIT"
    assert len(client.list_leases()) == 1


# 3. "reentrancy is per agent in any session -> threads sharing an agent id all get MUTATES"


async def test_reentrancy_is_per_agent_and_session(api: Api) -> None:
    sessions = [f"thread-{i}" for i in range(8)]
    if api.is_async:
        verdicts = await asyncio.gather(
            *(api.try_acquire("shared", s, ("FILE:/r", "MUTATES")) for s in sessions)
        )
    else:
        verdicts = await in_threads(
            api.kw.leases.try_acquire, [("shared", s, ("FILE:/r", "MUTATES")) for s in sessions]
        )
    statuses = [v.status for v in verdicts]
    assert statuses.count(VerdictStatus.GRANTED) == 1
    assert len(api.list(resource="FILE:/r")) == 1
    # The same session is reentrant.
    [holder] = api.list(resource="FILE:/r")
    again = await api.try_acquire("shared", holder.session_id, ("FILE:/r", "MUTATES"))
    assert again.granted


# 4. "expiry is lazy and a heartbeat revives an expired lease"


async def test_expired_lease_is_not_revived(api: Api) -> None:
    client = KlockClient(api.kw)
    lease = (await api.try_acquire("a", "s", ("FILE:/r", "MUTATES"), 100)).lease
    api.clock.advance(150)  # no sweeper ran
    assert api.list() == []
    taken = await api.try_acquire("b", "s", ("FILE:/r", "MUTATES"))
    assert taken.granted  # lazily expired: it blocks nobody
    with pytest.raises(LeaseExpiredError):
        await api.heartbeat(lease.lease_id)
    assert client.heartbeat_lease(lease.lease_id) is False
    assert api.get(lease.lease_id).state is LeaseState.EXPIRED  # type: ignore[union-attr]
    assert [x.agent_id for x in api.list(resource="FILE:/r")] == ["b"]


# 5. "release and heartbeat check no ownership; revoke does not exist"
#
# klockwork's semantics: a lease id is a bearer capability. It is 128 random
# bits, never derived from the agent or the time, so only whoever was handed
# it (the holder, or an operator who listed it) can release or renew it.
# Taking a lease away from its holder is an explicit, audited ``revoke``.


async def test_guessed_ids_release_nothing(api: Api) -> None:
    lease = (await api.try_acquire("victim", "s", ("FILE:/r", "MUTATES"))).lease
    for forged in (f"lease_victim_{T0}", f"lease_victim_{T0 + 1}", "0" * 32, ""):
        assert await api.release(forged) is False
        assert await api.revoke(forged) is False
        with pytest.raises(LeaseNotFoundError):
            await api.heartbeat(forged)
    assert api.get(lease.lease_id).state is LeaseState.ACTIVE  # type: ignore[union-attr]


async def test_revoke_exists_and_is_reported(api: Api) -> None:
    lease = (await api.try_acquire("stuck", "s", ("FILE:/r", "MUTATES"))).lease
    assert await api.revoke(lease.lease_id, "holder stalled")
    assert api.kinds()[-1] == "lease.revoked"
    assert (await api.try_acquire("next", "s", ("FILE:/r", "MUTATES"))).granted


# 6. "lease ids lease_{agent}_{ms} collide within one millisecond"


async def test_lease_ids_do_not_collide_within_a_millisecond(api: Api) -> None:
    ids = set()
    for i in range(500):  # the manual clock never moves: all in one millisecond
        verdict = await api.try_acquire("same-agent", "s", (f"TABLE:t{i}", "MUTATES"))
        ids.add(verdict.lease.lease_id)
    assert len(ids) == 500
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert not any("same-agent" in i for i in ids)


async def test_lease_ids_are_not_a_function_of_agent_and_time(api: Api) -> None:
    other = Engine(clock=ManualClock(start_ms=T0))
    try:
        mine = (await api.try_acquire("a", "s", ("FILE:/r", "MUTATES"))).lease.lease_id
        theirs = other.leases.try_acquire("a", "s", ("FILE:/r", "MUTATES")).lease.lease_id
        assert mine != theirs
    finally:
        other.close()


# 7. "unknown predicates silently become CONSUMES"


@pytest.mark.parametrize("predicate", ["READS", "WRITES", "CONSUME", "consumes?", "*"])
async def test_unknown_predicates_are_rejected(api: Api, predicate: str) -> None:
    await api.register_agent("writer", 9)
    await api.try_acquire("writer", "s", ("FILE:/r", "MUTATES"))
    with pytest.raises(InvalidRequestError) as info:
        await api.try_acquire("reader", "s", ("FILE:/r", predicate))
    assert info.value.argument == "predicate"
    with pytest.raises(ValueError):
        KlockClient(api.kw).acquire_lease("reader", "s", "FILE", "/r", predicate, 1000)
    assert [lease.agent_id for lease in api.list()] == ["writer"]


# 8. "WAIT is a polling hint with no queue: younger agents barge in; DIE never retries;
#     fixed 1000 ms sleep"


async def test_younger_newcomer_cannot_barge_past_an_older_waiter(api: Api) -> None:
    await api.register_agent("older", 1)
    await api.register_agent("younger", 5)
    await api.register_agent("holder", 9)
    holder = (await api.try_acquire("holder", "s", ("FILE:/r", "MUTATES"))).lease.lease_id
    waiter = asyncio.create_task(api.acquire("older", "s", ("FILE:/r", "MUTATES")))
    await api.until_sleeping()
    barging = await api.try_acquire("younger", "s", ("FILE:/r", "MUTATES"))
    assert barging.status is VerdictStatus.DIE
    assert any(c.agent_id == "older" and c.lease_id is None for c in barging.conflicts)
    assert await api.release(holder)
    assert (await api.try_acquire("younger", "s", ("FILE:/r", "MUTATES"))).status is (
        VerdictStatus.DIE
    )
    assert (await asyncio.wait_for(waiter, 15)).lease.agent_id == "older"


async def test_die_is_retried_and_the_wait_is_not_a_fixed_second(api: Api) -> None:
    await api.register_agent("older", 1)
    holder = (await api.try_acquire("older", "s", ("FILE:/r", "MUTATES"))).lease.lease_id
    waiter = asyncio.create_task(api.acquire("younger", "s", ("FILE:/r", "MUTATES")))
    await api.until_sleeping()
    assert await api.release(holder)
    verdict = await asyncio.wait_for(waiter, 15)
    assert verdict.lease.agent_id == "younger"
    assert api.clock.now_ms() == T0  # woken by the release, not by a 1000 ms sleep


# 9. "no fencing token: a holder stalled past its TTL can still write"


async def test_stalled_holder_is_fenced_off(api: Api) -> None:
    stalled = (await api.try_acquire("slow", "s", ("FILE:/r", "MUTATES"), 100)).lease
    api.clock.advance(150)  # it stalls past its TTL
    fresh = (await api.try_acquire("fast", "s", ("FILE:/r", "MUTATES"))).lease
    assert fresh.fencing_token > stalled.fencing_token
    with pytest.raises(StaleLeaseError):
        api.check_fencing("FILE:/r", stalled.fencing_token)  # the stalled write is refused
    with pytest.raises(StaleLeaseError):
        api.validate(stalled.lease_id)
    api.check_fencing("FILE:/r", fresh.fencing_token)
    assert api.validate(fresh.lease_id) == fresh


# 10. "SQLite store without transactions: unsafe for several processes"
#     (see test_multiprocess.py; here: two engines with separate connections)


async def test_two_engines_on_one_sqlite_file_exclude_each_other(
    api: Api, tmp_path: object, make_store: StoreMaker
) -> None:
    if api.store_kind == "redis":  # two stores on one namespace: two machines
        engines = [Engine(make_store("shared"), clock=api.clock) for _ in range(2)]
    else:
        path = f"{tmp_path}/shared.db"
        engines = [Engine(SqliteStore(path), clock=api.clock) for _ in range(2)]
    try:

        def race(i: int) -> bool:
            return engines[i].leases.try_acquire(f"p{i}", "s", ("FILE:/r", "MUTATES")).granted

        results = await in_threads(race, [(0,), (1,)])
        assert sorted(results) == [False, True]
        assert len(engines[0].leases.list()) == len(engines[1].leases.list()) == 1
    finally:
        for engine in engines:
            engine.close()
