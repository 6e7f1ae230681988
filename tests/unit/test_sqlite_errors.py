"""The SQLite store translates sqlite3 errors (``ERROR_MAP``) and fails closed."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from klockwork import (
    Klockwork,
    ManualClock,
    SqliteStore,
    StoreUnavailableError,
)
from klockwork.core.stores.sqlite_io import ERROR_MAP


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "kw.db"


@pytest.fixture
def kw(db: Path) -> Iterator[Klockwork]:
    engine = Klockwork(SqliteStore(db), clock=ManualClock(start_ms=1000))
    yield engine
    engine.close()


def test_error_map_is_complete_and_ordered() -> None:
    sources = [source for source, _ in ERROR_MAP]
    assert all(target is StoreUnavailableError for _, target in ERROR_MAP)
    assert sources[-1] is sqlite3.Error  # nothing escapes untranslated
    for i, source in enumerate(sources):  # most specific first
        for later in sources[i + 1 :]:
            assert not issubclass(later, source), f"{later} is shadowed by {source}"


class _FailingConnection:
    def __init__(self, exc: sqlite3.Error) -> None:
        self.exc = exc
        self.in_transaction = False

    def execute(self, *args: Any) -> Any:
        raise self.exc

    executescript = executemany = execute


def _fail_with(monkeypatch: pytest.MonkeyPatch, kw: Klockwork, exc: sqlite3.Error) -> None:
    """Every connection the store borrows fails with ``exc``."""

    @contextlib.contextmanager
    def failing() -> Iterator[_FailingConnection]:
        yield _FailingConnection(exc)

    monkeypatch.setattr(kw.store._pool, "connection", failing)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "exc",
    [
        sqlite3.OperationalError("database is locked"),
        sqlite3.OperationalError("disk I/O error"),
        sqlite3.ProgrammingError("Cannot operate on a closed database."),
        sqlite3.DatabaseError("file is not a database"),
        sqlite3.IntegrityError("constraint failed"),
        sqlite3.InterfaceError("bad parameter"),
        sqlite3.DataError("too big"),
        sqlite3.NotSupportedError("nope"),
        sqlite3.InternalError("oops"),
        sqlite3.Error("generic"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_every_sqlite_error_becomes_store_unavailable(
    kw: Klockwork, monkeypatch: pytest.MonkeyPatch, exc: sqlite3.Error
) -> None:
    _fail_with(monkeypatch, kw, exc)
    calls = [
        lambda: kw.leases.try_acquire("a", "s", ("FILE:/x", "MUTATES")),
        lambda: kw.leases.release("id"),
        lambda: kw.leases.heartbeat("id"),
        lambda: kw.leases.revoke("id"),
        lambda: kw.leases.get("id"),
        lambda: kw.leases.list(),
        lambda: kw.leases.sweep(),
        lambda: kw.leases.check_fencing("FILE:/x", 1),
        lambda: kw.register_agent("a", 1),
        lambda: kw.get_agent("a"),
    ]
    for call in calls:
        with pytest.raises(StoreUnavailableError) as info:
            call()
        assert info.value.__cause__ is exc
        assert str(exc) in str(info.value)
        assert str(kw.store.path) in str(info.value)  # type: ignore[attr-defined]


async def test_async_twins_translate_too(kw: Klockwork, monkeypatch: pytest.MonkeyPatch) -> None:
    exc = sqlite3.OperationalError("database is locked")
    _fail_with(monkeypatch, kw, exc)
    with pytest.raises(StoreUnavailableError):
        await kw.leases.atry_acquire("a", "s", ("FILE:/x", "MUTATES"))
    with pytest.raises(StoreUnavailableError):
        await kw.leases.aacquire("a", "s", ("FILE:/x", "MUTATES"), timeout_s=1)
    with pytest.raises(StoreUnavailableError):
        await kw.leases.arelease("id")
    with pytest.raises(StoreUnavailableError):
        await kw.aregister_agent("a", 1)


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database, just some text\n" * 200)
    with pytest.raises(StoreUnavailableError) as info:
        SqliteStore(path)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    with pytest.raises(StoreUnavailableError):
        Klockwork.open(f"sqlite:///{path}")


def test_a_directory_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailableError):
        SqliteStore(tmp_path / "missing" / "kw.db")


def test_a_closed_store_fails_closed(db: Path) -> None:
    store = SqliteStore(db)
    kw = Klockwork(store, clock=ManualClock())
    lease = kw.leases.try_acquire("a", "s", ("FILE:/x", "MUTATES")).lease
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreUnavailableError):
        kw.leases.try_acquire("b", "s", ("FILE:/y", "MUTATES"))
    with pytest.raises(StoreUnavailableError):
        kw.leases.release(lease.lease_id)
    with pytest.raises(StoreUnavailableError):
        kw.leases.heartbeat(lease.lease_id)

    errors: list[BaseException] = []

    def other_thread() -> None:  # a thread that never had a connection
        try:
            kw.leases.try_acquire("c", "s", ("FILE:/z", "MUTATES"))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join(30)
    assert len(errors) == 1 and isinstance(errors[0], StoreUnavailableError)
    kw.close()
    # Nothing was granted behind our back.
    with Klockwork(SqliteStore(db), clock=ManualClock()) as check:
        assert [x.lease_id for x in check.leases.list()] == [lease.lease_id]


def test_a_closed_engine_refuses_everything(db: Path) -> None:
    kw = Klockwork(SqliteStore(db))
    kw.close()
    kw.close()
    assert kw.closed
    with pytest.raises(StoreUnavailableError):
        kw.leases.try_acquire("a", "s", ("FILE:/x", "MUTATES"))
    with pytest.raises(StoreUnavailableError):
        kw.register_agent("a")


def test_a_locked_database_fails_closed_and_leaves_nothing(db: Path) -> None:
    kw = Klockwork(SqliteStore(db, busy_timeout_ms=50), clock=ManualClock())
    blocker = sqlite3.connect(db, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(StoreUnavailableError) as info:
            kw.leases.try_acquire("a", "s", ("FILE:/x", "MUTATES"))
        assert "locked" in str(info.value)
        blocker.execute("ROLLBACK")
        assert kw.leases.list() == []
        assert kw.get_agent("a") is None
        assert kw.leases.try_acquire("a", "s", ("FILE:/x", "MUTATES")).granted
    finally:
        blocker.close()
        kw.close()


def test_a_missing_table_fails_closed(db: Path) -> None:
    kw = Klockwork(SqliteStore(db), clock=ManualClock())
    try:
        with sqlite3.connect(db) as other:
            other.execute("DROP TABLE kw_reservations")
        with pytest.raises(StoreUnavailableError) as info:
            kw.leases.try_acquire("a", "s", ("FILE:/x", "MUTATES"))
        assert "kw_reservations" in str(info.value)
        assert kw.leases.list() == []
    finally:
        kw.close()


def test_a_failure_mid_manifest_rolls_everything_back(db: Path) -> None:
    kw = Klockwork(SqliteStore(db), clock=ManualClock())
    try:
        with sqlite3.connect(db) as other:
            other.execute(
                "CREATE TRIGGER boom BEFORE INSERT ON kw_leases WHEN NEW.resource = 'FILE:/boom' "
                "BEGIN SELECT RAISE(ABORT, 'disk full, say'); END"
            )
        with pytest.raises(StoreUnavailableError):
            kw.leases.try_acquire("a", "s", [("FILE:/ok", "MUTATES"), ("FILE:/boom", "MUTATES")])
        assert kw.leases.list() == []  # the first insert was rolled back
        assert kw.get_agent("a") is None  # and so was the registration
        assert kw.leases.try_acquire("b", "s", ("FILE:/ok", "MUTATES")).granted
    finally:
        kw.close()


def test_a_renewal_against_a_dead_store_loses_the_lease(db: Path) -> None:
    clock = ManualClock()
    kw = Klockwork(SqliteStore(db), clock=clock)
    seen: dict[str, Any] = {}
    try:
        # Leaving the block cannot release either: it fails loudly, never silently.
        with (
            pytest.raises(StoreUnavailableError),
            kw.lease("a", "s", "FILE:/x", "MUTATES", ttl_ms=300) as held,
        ):
            kw.store.close()
            for _ in range(100):
                clock.advance(100)
                if _wait_for(lambda: held.lost):
                    break
            seen["lost"], seen["reason"] = held.lost, held.lost_reason
    finally:
        kw.close()
    assert seen["lost"] is True
    assert "StoreUnavailableError" in seen["reason"]


def _wait_for(condition: Any, timeout_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True
