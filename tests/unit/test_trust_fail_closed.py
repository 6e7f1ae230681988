"""Regression tests: a SQLite store that cannot answer truthfully refuses; it never grants.

Findings of issue 9 (probes in ``shared/probes``):

* 4 — ``repro_db_deleted_split_brain.py``: with its file deleted, replaced
  or truncated, an open engine kept granting on a file no other process
  saw; a store was started over an empty (truncated) file.
* 5 — ``repro_stale_now_grant.py``: the time was read before waiting for
  another process's write lock, so a request that waited was granted a
  lease already expired; a blocking acquire waited for the busy timeout,
  not its own deadline.
* 15 — ``repro_thread_conn_leak.py``: one connection (two fds) per calling
  thread, never closed when the thread ended.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from klockwork import (
    Klockwork,
    LeaseTimeoutError,
    Policy,
    SqliteStore,
    StoreUnavailableError,
    VerdictStatus,
)

R = "FILE:/src/auth.ts"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "kw.db"


@pytest.fixture
def engines() -> Iterator[list[Klockwork]]:
    made: list[Klockwork] = []
    yield made
    for kw in made:
        kw.close()  # must not raise, even over a vanished file


def _open(db: Path, made: list[Klockwork], **store_options: Any) -> Klockwork:
    kw = Klockwork(SqliteStore(db, **store_options))
    kw.policies.add(Policy(name="deploys", action="deploy.*", effect="allow"))
    made.append(kw)
    return kw


def _files(db: Path) -> list[Path]:
    return [Path(f"{db}{suffix}") for suffix in ("", "-wal", "-shm")]


# ================================================================ 4. file gone, replaced, emptied
def _delete(db: Path) -> None:
    for path in _files(db):
        path.unlink(missing_ok=True)


def _replace(db: Path) -> None:
    other = db.with_name("other.db")
    SqliteStore(other).close()  # a perfectly good, empty store
    os.replace(other, db)


def _truncate(db: Path) -> None:
    os.truncate(db, 0)


def _move_away(db: Path) -> None:
    os.rename(db, db.with_name("moved.db"))


@pytest.mark.parametrize(
    "damage", [_delete, _replace, _truncate, _move_away], ids=lambda f: f.__name__[1:]
)
def test_an_engine_whose_file_is_gone_refuses_every_call(
    db: Path, engines: list[Klockwork], damage: Callable[[Path], None]
) -> None:
    kw = _open(db, engines)
    held = kw.leases.try_acquire("agent-a", "s", (R, "MUTATES"), ttl_ms=60_000).lease
    damage(db)
    calls: list[Callable[[], Any]] = [
        lambda: kw.leases.try_acquire("agent-a", "s", ("FILE:/other", "MUTATES")),
        lambda: kw.leases.try_acquire("agent-c", "s", (R, "MUTATES")),
        lambda: kw.leases.validate(held.lease_id),
        lambda: kw.leases.check_fencing(R, held.fencing_token),
        lambda: kw.leases.heartbeat(held.lease_id),
        lambda: kw.leases.list(),
        lambda: kw.gates.execute("agent-a", "deploy.prod"),
        lambda: kw.register_agent("agent-d"),
    ]
    for call in calls:
        with pytest.raises(StoreUnavailableError):
            call()


def test_a_new_process_on_the_deleted_path_and_the_old_engine_never_both_hold(
    db: Path, engines: list[Klockwork]
) -> None:
    old = _open(db, engines)
    held = old.leases.try_acquire("agent-a", "s", (R, "MUTATES"), ttl_ms=60_000).lease
    _delete(db)
    new = _open(db, engines)  # e.g. a process started after a tmp cleaner ran
    assert new.leases.try_acquire("agent-b", "s", (R, "MUTATES")).granted
    with pytest.raises(StoreUnavailableError):
        old.leases.validate(held.lease_id)
    with pytest.raises(StoreUnavailableError):
        old.leases.check_fencing(R, held.fencing_token)
    with pytest.raises(StoreUnavailableError):
        old.leases.try_acquire("agent-a", "s", ("FILE:/other", "MUTATES"))


def test_a_file_moved_back_serves_again(db: Path, engines: list[Klockwork]) -> None:
    kw = _open(db, engines)
    held = kw.leases.try_acquire("agent-a", "s", (R, "MUTATES"), ttl_ms=60_000).lease
    _move_away(db)
    with pytest.raises(StoreUnavailableError):
        kw.leases.try_acquire("agent-b", "s", ("FILE:/b", "MUTATES"))
    os.rename(db.with_name("moved.db"), db)
    assert kw.leases.validate(held.lease_id).lease_id == held.lease_id
    assert kw.leases.try_acquire("agent-b", "s", ("FILE:/b", "MUTATES")).granted
    assert kw.gates.execute("agent-a", "deploy.prod").status == "executed"
    assert kw.audit.verify().valid


def test_a_store_is_never_started_over_an_empty_file(db: Path) -> None:
    db.touch()
    with pytest.raises(StoreUnavailableError, match="empty"):
        SqliteStore(db)
    with pytest.raises(StoreUnavailableError):
        Klockwork.open(f"sqlite:///{db}")
    assert db.stat().st_size == 0  # left as found


# ================================================================ 5. the time of a decision
class _Locker:
    """Another connection (another process, a backup) holding the write lock."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.locked = threading.Event()
        self.release = threading.Event()
        self.released_at_ms = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = sqlite3.connect(self.db, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            self.locked.set()
            self.release.wait(30)
            self.released_at_ms = time.time_ns() // 1_000_000
            conn.execute("COMMIT")
        finally:
            conn.close()

    def __enter__(self) -> _Locker:
        self.thread.start()
        assert self.locked.wait(10)
        return self

    def release_after(self, seconds: float) -> None:
        threading.Timer(seconds, self.release.set).start()

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.thread.join(10)


def test_a_request_that_waited_for_the_lock_is_not_granted_an_expired_lease(
    db: Path, engines: list[Klockwork]
) -> None:
    a = _open(db, engines)
    b = _open(db, engines)
    a.register_agent("agent-a")
    b.register_agent("agent-b")
    with _Locker(db) as locker:
        locker.release_after(0.8)  # longer than the TTL asked for
        verdict = a.leases.try_acquire("agent-a", "s", (R, "MUTATES"), ttl_ms=500)
        now_ms = time.time_ns() // 1_000_000
    assert verdict.granted
    lease = verdict.lease
    assert lease.acquired_at >= locker.released_at_ms - 50  # dated after the wait
    assert lease.expires_at - now_ms > 200, "granted a lease that was (nearly) expired at birth"
    assert a.leases.validate(lease.lease_id).lease_id == lease.lease_id
    other = b.leases.try_acquire("agent-b", "s", (R, "MUTATES"), ttl_ms=30_000)
    assert other.status is not VerdictStatus.GRANTED  # still held: one holder at a time


TIMEOUT_S = 0.5


def test_acquire_is_bounded_by_its_own_deadline_not_the_busy_timeout(
    db: Path, engines: list[Klockwork]
) -> None:
    kw = _open(db, engines, busy_timeout_ms=10_000)
    kw.leases.try_acquire("warm", "s", ("FILE:/warm", "MUTATES"))
    with _Locker(db):
        started = time.monotonic()
        # The store stayed busy past the caller's deadline on the very first
        # try: that is a timeout (the caller asked to wait that long), not an outage.
        with pytest.raises(LeaseTimeoutError):
            kw.leases.acquire("agent-a", "s", (R, "MUTATES"), ttl_ms=5_000, timeout_s=TIMEOUT_S)
        took = time.monotonic() - started
    assert took < TIMEOUT_S + 2.0, f"acquire(timeout_s={TIMEOUT_S}) took {took:.1f} s"
    assert kw.leases.list(agent_id="agent-a") == []


async def test_aacquire_is_bounded_by_its_own_deadline_not_the_busy_timeout(
    db: Path, engines: list[Klockwork]
) -> None:
    kw = _open(db, engines, busy_timeout_ms=10_000)
    await kw.leases.atry_acquire("warm", "s", ("FILE:/warm", "MUTATES"))
    with _Locker(db):
        started = time.monotonic()
        with pytest.raises(LeaseTimeoutError):
            await kw.leases.aacquire(
                "agent-a", "s", (R, "MUTATES"), ttl_ms=5_000, timeout_s=TIMEOUT_S
            )
        took = time.monotonic() - started
    assert took < TIMEOUT_S + 2.0, f"aacquire(timeout_s={TIMEOUT_S}) took {took:.1f} s"
    assert kw.leases.list(agent_id="agent-a") == []


def test_a_blocked_acquire_whose_retry_meets_a_held_lock_times_out(
    db: Path, engines: list[Klockwork]
) -> None:
    """Past its own deadline, a waiting request reports a timeout, not an outage."""
    kw = _open(db, engines, busy_timeout_ms=10_000)
    kw.register_agent("old", priority=1)
    kw.register_agent("young", priority=2)
    held = kw.leases.try_acquire("young", "s", (R, "MUTATES"), ttl_ms=60_000)
    assert held.granted
    outcome: list[BaseException] = []

    def waiter() -> None:
        try:  # older than the holder: WAIT, retrying until its deadline
            kw.leases.acquire("old", "s", (R, "MUTATES"), ttl_ms=5_000, timeout_s=0.3)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.05)  # its first try was decided (WAIT); it now waits to retry
    with _Locker(db):  # taken while the waiter waits: its retry meets it
        thread.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], LeaseTimeoutError), outcome
    assert kw.leases.list(agent_id="old") == []


# ================================================================ 15. connections per thread
def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_short_lived_threads_leave_a_bounded_number_of_open_files(
    db: Path, engines: list[Klockwork]
) -> None:
    kw = _open(db, engines)
    kw.leases.try_acquire("warm", "s", ("FILE:/warm", "MUTATES"))
    kw.audit.flush()
    before = _open_fds()
    errors: list[BaseException] = []

    def request(i: int) -> None:  # one request = one short-lived thread
        try:
            verdict = kw.leases.try_acquire(f"agent-{i}", "s", (f"FILE:/req/{i}", "MUTATES"))
            kw.leases.release(verdict.lease.lease_id)
        except BaseException as exc:
            errors.append(exc)

    for i in range(200):  # one after another
        thread = threading.Thread(target=request, args=(i,))
        thread.start()
        thread.join()
    for wave in range(10):  # and 10 at a time
        threads = [
            threading.Thread(target=request, args=(1000 + wave * 10 + j,)) for j in range(10)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    grown = _open_fds() - before
    assert grown <= 40, f"{grown} more open fds after 300 short-lived threads"
    assert len(kw.leases.list()) == 1


def test_the_threads_of_one_process_take_turns_without_failing(
    db: Path, engines: list[Klockwork]
) -> None:
    """Sixteen writer threads of one engine: every try is decided, none fails as busy."""
    kw = _open(db, engines)
    errors: list[BaseException] = []
    granted: list[int] = []

    def writer(i: int) -> None:
        try:
            for n in range(40):
                verdict = kw.leases.try_acquire(f"agent-{i}", "s", (f"FILE:/t/{i}/{n}", "MUTATES"))
                assert verdict.granted
                kw.leases.release(verdict.lease.lease_id)
                granted.append(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(granted) == 16 * 40


def test_a_writer_turn_not_given_in_time_fails_closed(db: Path, engines: list[Klockwork]) -> None:
    kw = _open(db, engines, busy_timeout_ms=1_000)
    turns = kw.store._writers  # type: ignore[attr-defined]
    held, done = threading.Event(), threading.Event()

    def hog() -> None:
        with turns.turn("hold the turn", None):
            held.set()
            done.wait(30)

    thread = threading.Thread(target=hog)
    thread.start()
    assert held.wait(10)
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailableError, match="other writers"):
            kw.leases.try_acquire("agent-a", "s", (R, "MUTATES"), ttl_ms=5_000)
    finally:
        done.set()
        thread.join(10)
    assert time.monotonic() - started < 5  # bounded by the store's busy timeout (1 s)
    assert kw.leases.list(agent_id="agent-a") == []
