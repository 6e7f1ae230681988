"""Regression tests: no lease outlives its request; fencing sees the whole hierarchy.

Findings of issue 9 (probes in ``shared/probes``):

* 6 — ``repro_async_cancel_leak.py``: cancelling ``aacquire`` on SQLite
  while its store call ran leaked an ACTIVE lease nobody held.
* 12 — ``repro_fencing_descendant_gap.py``: a zombie's token on a
  directory kept passing ``check_fencing`` after someone was granted a
  file inside it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from klockwork import (
    Klockwork,
    ManualClock,
    MemoryStore,
    SqliteStore,
    StaleLeaseError,
)
from klockwork.core.clock import Clock

R = "FILE:/src/auth.ts"


@pytest.fixture
def make_kw(store_kind: str, tmp_path: Path) -> Iterator[Callable[..., Klockwork]]:
    made: list[Klockwork] = []

    def make(clock: Clock | None = None) -> Klockwork:
        store = MemoryStore() if store_kind == "memory" else SqliteStore(tmp_path / "kw.db")
        kw = Klockwork(store, clock=clock)
        made.append(kw)
        return kw

    yield make
    for kw in made:
        kw.close()


async def _none_held_by(kw: Klockwork, agent_id: str) -> None:
    """No ACTIVE lease of ``agent_id`` remains (a give-back may finish just after the cancel)."""
    deadline = time.monotonic() + 5
    while held := await asyncio.to_thread(kw.leases.list, agent_id):
        assert time.monotonic() < deadline, f"{agent_id} still holds {held}"
        await asyncio.sleep(0.02)


# ================================================================ 6. cancelled aacquire
async def test_cancelled_aacquires_leave_no_lease_and_no_reservation(
    make_kw: Callable[..., Klockwork],
) -> None:
    kw = make_kw()
    await kw.aregister_agent("agent-a", priority=1)  # older: its leftovers would block b
    await kw.aregister_agent("agent-b", priority=2)
    completed = 0
    for attempt in range(60):
        task = asyncio.ensure_future(
            kw.leases.aacquire("agent-a", "s1", (R, "MUTATES"), ttl_ms=60_000)
        )
        for _ in range(attempt % 5):  # cancel at different points of the call
            await asyncio.sleep(0)
        task.cancel()
        try:
            verdict = await task
        except asyncio.CancelledError:
            continue
        completed += 1  # finished before the cancel landed: give it back ourselves
        for lease in verdict.leases:
            await kw.leases.arelease(lease.lease_id)
    await _none_held_by(kw, "agent-a")
    # Neither a lease (60 s TTL) nor a reservation is left to block a younger agent.
    verdict = await kw.leases.atry_acquire("agent-b", "s1", (R, "MUTATES"))
    assert verdict.granted, verdict


async def test_a_grant_that_lands_after_the_cancel_is_given_back(tmp_path: Path) -> None:
    """The store call is in flight (waiting for another process's lock) when the task is
    cancelled; the lock is then freed and the try is granted: the grant goes back."""
    db = tmp_path / "kw.db"
    kw = Klockwork(SqliteStore(db))
    blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    try:
        await kw.aregister_agent("agent-a", priority=1)
        await kw.aregister_agent("agent-b", priority=2)
        for _ in range(3):
            blocker.execute("BEGIN IMMEDIATE")
            task = asyncio.ensure_future(
                kw.leases.aacquire("agent-a", "s1", (R, "MUTATES"), ttl_ms=60_000)
            )
            await asyncio.sleep(0.1)  # its try now waits for the write lock, on a worker
            task.cancel()
            unlock = threading.Timer(0.1, blocker.execute, ("COMMIT",))
            unlock.start()
            with pytest.raises(asyncio.CancelledError):
                await task
            unlock.join()
            await _none_held_by(kw, "agent-a")
            verdict = await kw.leases.atry_acquire("agent-b", "s1", (R, "MUTATES"))
            assert verdict.granted, verdict
            await kw.leases.arelease(verdict.lease.lease_id)
    finally:
        blocker.close()
        await asyncio.to_thread(kw.close)


# ================================================================ 12. fencing, both ways
T0 = 1_000_000


def _zombie_and_newcomer(
    kw: Klockwork, clock: ManualClock, zombie_on: str, newcomer_on: str
) -> tuple[str, int]:
    zombie = kw.leases.try_acquire("zombie", "s", (zombie_on, "MUTATES"), ttl_ms=1_000).lease
    clock.advance(2_000)  # the zombie paused past its TTL (GC, a laptop lid)
    newcomer = kw.leases.try_acquire("newcomer", "s", (newcomer_on, "MUTATES"), ttl_ms=30_000)
    assert newcomer.granted
    assert newcomer.lease.fencing_token > zombie.fencing_token
    return zombie.lease_id, zombie.fencing_token


@pytest.mark.parametrize(
    ("zombie_on", "newcomer_on"),
    [
        ("FILE:/repo", "FILE:/repo/a.py"),  # a grant inside the zombie's directory
        ("FILE:/repo", "FILE:/repo/src/deep/a.py"),
        ("FILE:/", "FILE:/etc/hosts"),
        ("FILE:/repo/a.py", "FILE:/repo"),  # a grant on the zombie's file's directory
        ("FILE:/repo/src/deep/a.py", "FILE:/repo"),
        ("FILE:/repo/a.py", "FILE:/repo/a.py"),
    ],
)
def test_a_newer_grant_above_or_below_makes_the_old_token_stale(
    make_kw: Callable[..., Klockwork], zombie_on: str, newcomer_on: str
) -> None:
    clock = ManualClock(start_ms=T0)
    kw = make_kw(clock)
    lease_id, token = _zombie_and_newcomer(kw, clock, zombie_on, newcomer_on)
    with pytest.raises(StaleLeaseError):
        kw.leases.check_fencing(zombie_on, token)
    with pytest.raises(StaleLeaseError):
        kw.leases.validate(lease_id)


@pytest.mark.parametrize(
    "newcomer_on", ["FILE:/repo/b.py", "FILE:/repository", "FILE:/repo-b/a.py", "TABLE:/repo/a.py"]
)
def test_a_grant_elsewhere_does_not_make_a_token_stale(
    make_kw: Callable[..., Klockwork], newcomer_on: str
) -> None:
    """Fencing follows the hierarchy, not string prefixes (the fix must not overreach)."""
    clock = ManualClock(start_ms=T0)
    kw = make_kw(clock)
    zombie = kw.leases.try_acquire("zombie", "s", ("FILE:/repo/a.py", "MUTATES"), 1_000).lease
    clock.advance(2_000)
    assert kw.leases.try_acquire("newcomer", "s", (newcomer_on, "MUTATES"), 30_000).granted
    kw.leases.check_fencing("FILE:/repo/a.py", zombie.fencing_token)  # nothing newer here
