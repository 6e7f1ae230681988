"""Real concurrency on real time: threads and tasks racing through one engine.

These tests use the system clock (nothing here is a timing assertion: every
wait is bounded by a generous timeout and the checks are counts).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

from klockwork import Klockwork, VerdictStatus

from .conftest import in_threads

# pytest's ``flavour`` and ``store_kind`` fixtures come from conftest.py.


async def test_one_winner_among_many_racers(
    make_kw: Callable[..., Klockwork], flavour: str
) -> None:
    kw = make_kw()
    args = [(f"agent-{i}", f"session-{i}", ("FILE:/hot", "MUTATES"), 60_000) for i in range(100)]
    if flavour == "sync":
        verdicts = await in_threads(kw.leases.try_acquire, args)
    else:
        verdicts = await asyncio.gather(*(kw.leases.atry_acquire(*a) for a in args))
    statuses = [v.status for v in verdicts]
    assert statuses.count(VerdictStatus.GRANTED) == 1
    assert (
        statuses.count(VerdictStatus.GRANTED)
        + statuses.count(VerdictStatus.WAIT)
        + (statuses.count(VerdictStatus.DIE))
        == 100
    )
    assert len(kw.leases.list(resource="FILE:/hot")) == 1
    winner = next(v for v in verdicts if v.granted)
    for v in verdicts:
        if not v.granted:
            assert [c.lease_id for c in v.conflicts] == [winner.lease.lease_id]


THREADS = 20
ROUNDS = 50


async def test_leased_read_modify_write_is_exact(
    make_kw: Callable[..., Klockwork], flavour: str
) -> None:
    kw = make_kw()
    counter = {"value": 0, "inside": 0, "max_inside": 0}

    def enter() -> int:
        counter["inside"] += 1
        counter["max_inside"] = max(counter["max_inside"], counter["inside"])
        return counter["value"]

    def leave(seen: int) -> None:
        counter["value"] = seen + 1
        counter["inside"] -= 1

    if flavour == "sync":

        def worker(i: int) -> None:
            for _ in range(ROUNDS):
                with kw.lease(f"w{i}", "s", "FILE:/counter", "MUTATES", ttl_ms=10_000):
                    seen = enter()
                    time.sleep(0)  # let another thread run inside, if it could
                    leave(seen)

        await in_threads(worker, [(i,) for i in range(THREADS)])
    else:

        async def task(i: int) -> None:
            for _ in range(ROUNDS):
                async with kw.alease(f"w{i}", "s", "FILE:/counter", "MUTATES", ttl_ms=10_000):
                    seen = enter()
                    await asyncio.sleep(0)
                    leave(seen)

        await asyncio.wait_for(asyncio.gather(*(task(i) for i in range(THREADS))), 90)
    assert counter["value"] == THREADS * ROUNDS
    assert counter["max_inside"] == 1
    assert kw.leases.list() == []


async def test_async_waiters_all_served_one_at_a_time_loop_stays_responsive(
    make_kw: Callable[..., Klockwork],
) -> None:
    kw = make_kw()
    state: dict[str, Any] = {"inside": 0, "max_inside": 0, "served": 0}
    ticks: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0.001)

    async def task(i: int) -> None:
        verdict = await kw.leases.aacquire(f"t{i:02d}", "s", ("FILE:/one", "MUTATES"), 10_000)
        state["inside"] += 1
        state["max_inside"] = max(state["max_inside"], state["inside"])
        await asyncio.sleep(0.001)
        state["inside"] -= 1
        state["served"] += 1
        assert await kw.leases.arelease(verdict.lease.lease_id)

    tick_task = asyncio.create_task(ticker())
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(task(i) for i in range(50))), 90)
    elapsed = time.monotonic() - started
    stop.set()
    await tick_task
    assert state["served"] == 50
    assert state["max_inside"] == 1
    assert kw.leases.list() == []
    assert kw.leases.waiting == 0
    # The loop kept running while 49 tasks waited: the ticker ticked throughout.
    assert len(ticks) >= 10
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert max(gaps) < max(1.0, elapsed / 4), (max(gaps), elapsed)
