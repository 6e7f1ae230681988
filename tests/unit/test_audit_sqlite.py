"""SqliteAuditBackend: the memory backend's behaviour, plus what a file adds.

Backend behaviour is checked on both backends (``backend_kind``), and the
AuditLog tests of ``test_audit_log`` that take a ``log`` are re-run on a log
over each backend. Then: the chain check inside the transaction, resuming a
reopened file, error translation, and (with ``rebase=True``) one chain
written by several processes.
"""

from __future__ import annotations

import inspect
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import run_spawned

from klockwork.core.audit.backend import EntryBatch
from klockwork.core.audit.chain import GENESIS_HASH, AuditEntry, canonical_json
from klockwork.core.audit.log import AuditBackend, AuditLog, MemoryAuditBackend, verify_file
from klockwork.core.audit.sqlite import SqliteAuditBackend
from klockwork.core.audit.verify import verify_lines
from klockwork.core.clock import ManualClock
from klockwork.core.errors import AuditIntegrityError, StoreUnavailableError
from klockwork.core.stores.sqlite import SqliteStore

from . import test_audit_log as memory_tests

MakeBackend = Callable[[], AuditBackend]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1_700_000_000_000)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "kw.db"


@pytest.fixture(params=["memory", "sqlite"])
def make_backend(request: pytest.FixtureRequest, db: Path) -> Iterator[MakeBackend]:
    """A factory of backends of one kind; every sqlite one is on the same file."""
    made: list[AuditBackend] = []

    def make() -> AuditBackend:
        backend: AuditBackend = (
            MemoryAuditBackend() if request.param == "memory" else SqliteAuditBackend(db)
        )
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def _all_lines(backend: AuditBackend) -> list[bytes]:
    return backend.lines(0, 1_000_000)


def _fill(backend: AuditBackend, clock: ManualClock, n: int) -> list[AuditEntry]:
    """Record ``n`` varied entries through a log (not closed: the backend stays open)."""
    log = AuditLog(backend, clock=clock)
    kinds = ("lease.granted", "lease.denied", "tool.end")
    for i in range(n):
        clock.advance(1)
        agent = None if i % 7 == 0 else f"agent-{i % 3}"
        log.record(kinds[i % 3], agent, f"s{i % 2}", {"i": i})
        log.flush()  # each entry a block of its own: any run of them continues a chain
    return [AuditEntry.from_line(line) for line in _all_lines(backend)]


def _batch(entries: list[AuditEntry]) -> EntryBatch:
    return EntryBatch(
        [
            (
                e.seq,
                e.ts,
                e.kind,
                e.agent_id,
                e.session_id,
                canonical_json(e.data).decode(),
                e.prev_hash,
                e.hash,
                e.stored_line(),
            )
            for e in entries
        ]
    )


# --------------------------------------------------------------------------- both backends
def test_is_an_audit_backend_and_starts_empty(make_backend: MakeBackend) -> None:
    backend = make_backend()
    assert isinstance(backend, AuditBackend)
    assert backend.head() is None
    assert backend.lines(0, 10) == [] and backend.read(0, 10) == []


def test_stores_lines_verbatim_and_reads_them_back(
    make_backend: MakeBackend, clock: ManualClock
) -> None:
    backend = make_backend()
    entries = _fill(backend, clock, 50)
    lines = _all_lines(backend)
    assert [e.seq for e in entries] == list(range(1, 51))
    assert all(type(line) is bytes for line in lines)
    assert [e.canonical_line() for e in entries] == lines
    assert verify_lines(lines).valid
    head = backend.head()
    assert head is not None and head.seq == 50 and head.stored_line() == lines[-1]
    assert backend.lines(10, 5) == lines[10:15]
    assert backend.lines(48, 10) == lines[48:]
    assert backend.lines(50, 10) == [] and backend.lines(-5, 2) == lines[:2]


def test_read_filters_match_a_scan(make_backend: MakeBackend, clock: ManualClock) -> None:
    backend = make_backend()
    entries = _fill(backend, clock, 60)
    since = entries[30].ts
    filters: list[dict[str, Any]] = [
        {},
        {"kind": "lease.denied"},
        {"agent_id": "agent-1"},
        {"session_id": "s0"},
        {"since": since},
        {"kind": "tool.end", "agent_id": "agent-2", "session_id": "s1", "since": since},
        {"agent_id": "nobody"},
    ]
    for f in filters:
        expected = [
            e
            for e in entries
            if all(
                getattr(e, k if k != "since" else "ts") == v for k, v in f.items() if k != "since"
            )
            and ("since" not in f or e.ts >= f["since"])
        ]
        for after, limit in ((0, 1000), (0, 3), (17, 5), (-1, 1000), (60, 10)):
            got = backend.read(after, limit, **f)
            assert got == [e for e in expected if e.seq > after][:limit], (f, after, limit)


def test_append_refuses_a_batch_that_does_not_continue_the_chain(
    make_backend: MakeBackend, clock: ManualClock
) -> None:
    source = MemoryAuditBackend()
    entries = _fill(source, clock, 10)
    backend = make_backend()
    backend.append(_batch(entries[:4]))
    for bad in (entries[5:7], entries[3:6], entries[:2], [entries[4], entries[6]]):
        with pytest.raises(AuditIntegrityError):
            backend.append(_batch(bad))
        with pytest.raises(AuditIntegrityError):
            backend.append(bad)  # plain entries, not an EntryBatch
    assert _all_lines(backend) == [e.stored_line() for e in entries[:4]]  # nothing written
    backend.append(entries[4:7])  # plain entries are accepted too
    backend.append(_batch(entries[7:]))
    backend.append([])
    assert _all_lines(backend) == [e.stored_line() for e in entries]


def test_read_returns_copies(make_backend: MakeBackend, clock: ManualClock) -> None:
    backend = make_backend()
    _fill(backend, clock, 1)
    backend.read(0, 1)[0].data["i"] = "changed"
    assert backend.read(0, 1)[0].data == {"i": 0}


def test_closed_backend_refuses_every_call(make_backend: MakeBackend, clock: ManualClock) -> None:
    backend = make_backend()
    entries = _fill(backend, clock, 3)
    backend.close()
    backend.close()  # idempotent
    calls: list[Callable[[], object]] = [
        lambda: backend.append(entries[:1]),
        lambda: backend.read(0, 10),
        lambda: backend.lines(0, 10),
        backend.head,
    ]
    for call in calls:
        with pytest.raises(StoreUnavailableError):
            call()


#: The AuditLog tests of test_audit_log that only need a ``log`` (and clock or tmp_path).
LOG_TESTS = [
    name
    for name, fn in vars(memory_tests).items()
    if name.startswith("test_")
    and callable(fn)
    and "log" in inspect.signature(fn).parameters
    and set(inspect.signature(fn).parameters) <= {"log", "clock", "tmp_path"}
    and not hasattr(fn, "pytestmark")
]


def test_the_reused_log_tests_are_the_expected_ones() -> None:
    assert {"test_query_filters", "test_cursor_pages_cover_every_match_exactly_once"} <= set(
        LOG_TESTS
    )
    assert len(LOG_TESTS) >= 10


@pytest.mark.parametrize("name", LOG_TESTS)
def test_audit_log_behaves_the_same_on_each_backend(
    name: str, make_backend: MakeBackend, clock: ManualClock, tmp_path: Path
) -> None:
    log = AuditLog(make_backend(), clock=clock, key=b"k")
    available = {"log": log, "clock": clock, "tmp_path": tmp_path}
    fn = getattr(memory_tests, name)
    try:
        fn(**{p: available[p] for p in inspect.signature(fn).parameters})
    finally:
        log.close()


def test_concurrent_records_on_sqlite_form_one_gapless_chain(db: Path, clock: ManualClock) -> None:
    threads, per_thread = 4, 1500
    with AuditLog(SqliteAuditBackend(db), clock=clock) as log:
        start = threading.Barrier(threads)

        def work(t: int) -> None:
            start.wait()
            for i in range(per_thread):
                log.record("lease.granted", f"agent-{t}", "s", {"i": i})

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        result = log.verify()
        assert result.valid and result.checked == threads * per_thread
        for t in range(threads):
            page = log.query(agent_id=f"agent-{t}", limit=1000).entries
            assert [e.data["i"] for e in page] == list(range(1000))


# --------------------------------------------------------------------------- sqlite only
def test_append_checks_prev_hash_inside_the_transaction(db: Path, clock: ManualClock) -> None:
    entries = _fill(MemoryAuditBackend(), clock, 4)
    other = _fill(MemoryAuditBackend(), clock, 4)  # same seqs, another chain
    backend = SqliteAuditBackend(db)
    backend.append(_batch(entries[:2]))
    with pytest.raises(AuditIntegrityError, match="do not continue"):
        backend.append(_batch(other[2:]))  # seq 3 follows seq 2, but links to another chain
    with pytest.raises(AuditIntegrityError):
        backend.append(other[2:])
    assert _all_lines(backend) == [e.stored_line() for e in entries[:2]]
    backend.close()


def test_reopened_file_resumes_the_chain(db: Path, clock: ManualClock) -> None:
    with AuditLog(SqliteAuditBackend(db), clock=clock) as first:
        assert [first.record("lease.granted", "a", "s", {"n": n}) for n in range(5)] == [
            1,
            2,
            3,
            4,
            5,
        ]
        cp = first.checkpoint()
    with AuditLog(SqliteAuditBackend(db), clock=clock, key=None) as second:
        assert second.record("lease.released", "a", "s") == 6
        result = second.verify(against=cp)
        assert result.valid and result.head_seq == 6
        assert [e.seq for e in second.query(kind="lease.released").entries] == [6]


def test_nothing_is_lost_on_a_clean_close(db: Path, clock: ManualClock) -> None:
    log = AuditLog(SqliteAuditBackend(db), clock=clock)
    for i in range(20_000):
        log.record("tool.end", "a", "s", {"i": i})
    log.close()
    backend = SqliteAuditBackend(db)
    lines = _all_lines(backend)
    assert len(lines) == 20_000 and verify_lines(lines).valid
    backend.close()
    path = db.parent / "out.jsonl"
    with AuditLog(SqliteAuditBackend(db), clock=clock) as log2:
        assert log2.export(path) == 20_000
    assert verify_file(path).valid


def test_shares_a_file_with_the_lease_store(db: Path, clock: ManualClock) -> None:
    store = SqliteStore(db)
    with AuditLog(SqliteAuditBackend(db), clock=clock) as log:
        log.record("lease.granted", "a", "s")
        assert log.verify().valid
    SqliteStore(db).close()  # the store's schema is untouched by ours, and vice versa
    store.close()
    tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master")}
    assert {"kw_audit", "kw_leases", "kw_agents"} <= tables


def test_a_file_that_is_not_a_database_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "not.db"
    path.write_bytes(b"this is not a sqlite database, just some text " * 100)
    with pytest.raises(StoreUnavailableError, match="could not") as info:
        SqliteAuditBackend(path)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


def test_a_locked_database_fails_the_log_closed(db: Path, clock: ManualClock) -> None:
    backend = SqliteAuditBackend(db, busy_timeout_ms=50)
    log = AuditLog(backend, clock=clock)
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        log.record("lease.granted", "a", "s")
        with pytest.raises(StoreUnavailableError, match="locked"):
            log.flush(timeout_s=30)
        with pytest.raises(StoreUnavailableError):
            log.record("lease.granted", "a", "s")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert backend.head() is None  # nothing half-written
    with pytest.raises(StoreUnavailableError):
        log.close()
    with pytest.raises(StoreUnavailableError, match="closed"):
        backend.head()


def test_two_logs_on_one_file_without_rebase_fail_closed(db: Path, clock: ManualClock) -> None:
    a = AuditLog(SqliteAuditBackend(db), clock=clock)
    b = AuditLog(SqliteAuditBackend(db), clock=clock)  # both see an empty chain
    a.record("lease.granted", "a", "s")
    a.flush()
    b.record("lease.granted", "b", "s")  # also seq 1: refused, not overwritten
    with pytest.raises(AuditIntegrityError, match="do not continue"):
        b.flush()
    with pytest.raises(AuditIntegrityError):
        b.close()
    assert a.verify().checked == 1
    a.close()


# --------------------------------------------------------------------------- rebase
def test_rebase_changes_nothing_for_a_single_writer(tmp_path: Path, clock: ManualClock) -> None:
    out: list[list[bytes]] = []
    for rebase in (False, True):
        backend = SqliteAuditBackend(tmp_path / f"{rebase}.db", rebase=rebase)
        log = AuditLog(backend, clock=ManualClock(1000))
        for i in range(3000):
            log.record("tool.start", "a", "s", {"i": i, "odd": {1, 2}})
        log.flush()
        assert log.verify().valid
        # Where blocks end depends on when they were sealed: compare what they hold.
        out.append([line[: line.rfind(b',"hash":')] for line in _all_lines(backend)])
        log.close()
    assert out[0] == out[1] and len(out[0]) == 3000


def test_rebase_rechains_batches_of_two_logs_onto_one_chain(db: Path, clock: ManualClock) -> None:
    a = AuditLog(SqliteAuditBackend(db, rebase=True), clock=clock)
    b = AuditLog(SqliteAuditBackend(db, rebase=True), clock=clock)
    for i in range(20):
        log, who = (a, "a") if i % 3 else (b, "b")
        for j in range(i + 1):
            log.record("tool.end", who, None, {"i": i, "j": j, "odd": b"\x00"})
        log.flush()
    result = a.verify()
    assert result.valid and result.checked == sum(range(1, 21))
    for who in ("a", "b"):  # each log's entries keep their own order
        got = [(e.data["i"], e.data["j"]) for e in a.query(agent_id=who, limit=1000).entries]
        mine = [i for i in range(20) if (i % 3 != 0) == (who == "a")]
        assert got == [(i, j) for i in mine for j in range(i + 1)]
    assert a.query(limit=1000).entries[0].data["odd"] == "AA=="
    a.close()
    b.close()


def test_rebase_rechains_plain_entries_too(db: Path, clock: ManualClock) -> None:
    backend = SqliteAuditBackend(db, rebase=True)
    first = _fill(MemoryAuditBackend(), clock, 3)
    second = _fill(MemoryAuditBackend(), clock, 3)  # seqs 1..3 again, another chain
    backend.append(first)
    backend.append(second)
    backend.append(_batch(first))
    lines = _all_lines(backend)
    assert verify_lines(lines).checked == 9
    stored = [AuditEntry.from_line(line) for line in lines]
    assert [e.data for e in stored] == [e.data for e in first + second + first]
    assert stored[3].prev_hash == stored[2].hash != GENESIS_HASH
    with pytest.raises(AuditIntegrityError, match="consecutive"):  # still refused
        backend.append([first[0], first[2]])
    backend.close()


PROCESSES = 3
PER_PROCESS = 300


def _append_from_a_process(path: str, name: str, n: int, start: Any) -> None:
    """Child process: ``n`` entries through its own rebasing AuditLog, in small batches."""
    log = AuditLog(SqliteAuditBackend(path, rebase=True))
    try:
        start.wait(60)
        for i in range(n):
            log.record("action.executed", name, f"session-{name}", {"i": i})
            if i % 3 == 0:
                log.flush()  # many small batches, so the processes interleave
    finally:
        log.close()


@pytest.mark.slow
def test_processes_appending_with_rebase_keep_one_chain(db: Path) -> None:
    SqliteAuditBackend(db).close()  # create the table once, before the race
    # Every child opens its log on the empty table before the start signal, so
    # all three start at seq 1: whatever the interleaving, two must re-chain.
    run_spawned(_append_from_a_process, [(str(db), f"p{i}", PER_PROCESS) for i in range(PROCESSES)])
    total = PROCESSES * PER_PROCESS
    backend = SqliteAuditBackend(db)
    lines = _all_lines(backend)
    result = verify_lines(lines)
    assert result.valid and result.checked == total and result.head_seq == total
    entries = [AuditEntry.from_line(line) for line in lines]
    for i in range(PROCESSES):  # every entry of every process, in its own order
        mine = [e.data["i"] for e in entries if e.agent_id == f"p{i}"]
        assert mine == list(range(PER_PROCESS))
    path = db.parent / "export.jsonl"
    with AuditLog(backend) as log:
        assert log.export(path) == total
    assert verify_file(path).valid
