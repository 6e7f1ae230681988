"""AuditLog: recording, ordering, flushing, querying, odd data, failures."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from klockwork.core.audit.chain import (
    GENESIS_HASH,
    AuditEntry,
    block_seal,
    canonical_json,
    to_json_value,
)
from klockwork.core.audit.encode import encode_batch
from klockwork.core.audit.log import AuditBackend, AuditLog, MemoryAuditBackend, verify_file
from klockwork.core.clock import ManualClock
from klockwork.core.errors import InvalidRequestError, StoreUnavailableError
from klockwork.core.model import GovernanceEvent, Predicate


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1_700_000_000_000)


@pytest.fixture
def log(clock: ManualClock) -> Iterator[AuditLog]:
    log = AuditLog(clock=clock, key=b"k")
    yield log
    log.close()


def test_record_returns_gapless_seqs_from_one(log: AuditLog) -> None:
    assert [log.record("tool.start", "a", "s", {"i": i}) for i in range(5)] == [1, 2, 3, 4, 5]


def test_unknown_kind_is_refused(log: AuditLog) -> None:
    for kind in ("lease.Granted", "lease", "approval.requested", ""):
        with pytest.raises(InvalidRequestError) as info:
            log.record(kind, "a", "s", {})
        assert info.value.argument == "kind"
    assert log.checkpoint().seq == 0  # nothing was recorded


def test_query_right_after_record_sees_the_entry(log: AuditLog, clock: ManualClock) -> None:
    for i in range(200):
        seq = log.record("lease.released", "a", "s", {"i": i})
        page = log.query(since=0, limit=1000)
        assert page.entries[-1].seq == seq and page.entries[-1].data == {"i": i}
    assert page.entries[0].ts == clock.now_ms()


def test_flush_waits_for_everything_recorded_before(log: AuditLog) -> None:
    for i in range(5000):
        log.record("tool.end", "a", None, {"i": i})
    assert log.flush(timeout_s=30) is True
    assert log.checkpoint().seq == 5000
    assert log.flush(timeout_s=0) is True  # nothing pending: immediate


def test_concurrent_records_form_one_gapless_chain(clock: ManualClock) -> None:
    log = AuditLog(clock=clock)
    per_thread, threads = 2000, 8
    seqs: list[list[int]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads)

    def work(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            seqs[t].append(log.record("lease.granted", f"agent-{t}", "s", {"t": t, "i": i}))

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    result = log.verify()
    total = per_thread * threads
    assert result.valid and result.checked == total and result.head_seq == total
    assert sorted(s for part in seqs for s in part) == list(range(1, total + 1))
    for t, part in enumerate(seqs):  # each thread's entries are in its own order
        assert part == sorted(part)
        entries = log.query(agent_id=f"agent-{t}", limit=1000).entries
        assert [e.data["i"] for e in entries] == list(range(1000))
    log.close()


def test_query_filters(log: AuditLog, clock: ManualClock) -> None:
    log.record("lease.granted", "a", "s1", {})
    clock.advance(10)
    log.record("lease.denied", "b", "s1", {})
    log.record("lease.granted", "b", "s2", {})
    assert [e.seq for e in log.query(kind="lease.granted").entries] == [1, 3]
    assert [e.seq for e in log.query(agent_id="b").entries] == [2, 3]
    assert [e.seq for e in log.query(session_id="s1").entries] == [1, 2]
    assert [e.seq for e in log.query(since=clock.now_ms()).entries] == [2, 3]
    assert [e.seq for e in log.query(kind="lease.granted", agent_id="b").entries] == [3]
    assert log.query(agent_id="nobody").entries == []


def test_cursor_pages_cover_every_match_exactly_once(log: AuditLog) -> None:
    for i in range(1234):
        log.record("tool.end" if i % 3 else "tool.start", "a", "s", {"i": i})
    for kind, expected in (("tool.end", 822), (None, 1234)):
        seen: list[int] = []
        cursor = None
        while True:
            page = log.query(kind=kind, cursor=cursor, limit=100)
            seen += [e.seq for e in page.entries]
            cursor = page.next_cursor
            if cursor is None:
                break
        assert len(seen) == expected and seen == sorted(set(seen))
    exact = log.query(limit=1000, cursor=log.query(limit=234).next_cursor)
    assert len(exact.entries) == 1000 and exact.next_cursor is None  # no empty last page


@pytest.mark.parametrize("limit", [0, -1, 1001, 2.5, True])
def test_limit_out_of_bounds_is_refused(log: AuditLog, limit: Any) -> None:
    with pytest.raises(InvalidRequestError) as info:
        log.query(limit=limit)
    assert info.value.argument == "limit"


def test_limit_bounds_are_inclusive(log: AuditLog) -> None:
    for _ in range(3):
        log.record("llm.end", None, None)
    assert len(log.query(limit=1).entries) == 1
    assert len(log.query(limit=1000).entries) == 3


def test_bad_cursor_is_refused(log: AuditLog) -> None:
    for cursor in ("nonsense", "", "a2xhdzE6LTE"):
        with pytest.raises(InvalidRequestError) as info:
            log.query(cursor=cursor)
        assert info.value.argument == "cursor"


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


@dataclasses.dataclass
class Point:
    x: int
    y: tuple[int, int]


def test_odd_data_is_recorded_faithfully_and_verifies(log: AuditLog, tmp_path: Path) -> None:
    when = datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.timezone.utc)
    data = {
        "enum": Color.RED,
        "intenum": Level.HIGH,
        "strenum": Predicate.MUTATES,
        "set": {3, 1, 2},
        "frozen": frozenset({"b", "a"}),
        "when": when,
        "day": datetime.date(2024, 5, 1),
        "span": datetime.timedelta(seconds=90),
        "bytes": b"\x00\xffok",
        "uuid": uuid.UUID(int=1),
        "dec": decimal.Decimal("1.10"),
        "nested": {"t": (1, [2, {3: "int key"}]), None: "none key"},
        "point": Point(1, (2, 3)),
        "nan": float("nan"),
        "inf": float("-inf"),
        "big": 1 << 20000,
        "surrogate": "bad \udc80 text",
        "obj": object,
    }
    log.record("action.executed", "a", "s", data)
    got = log.query().entries[0].data
    assert got["enum"] == "red" and got["intenum"] == 3 and got["strenum"] == "MUTATES"
    assert got["set"] == [1, 2, 3] and got["frozen"] == ["a", "b"]
    assert got["when"] == "2024-05-01T12:30:00+00:00" and got["day"] == "2024-05-01"
    assert got["span"] == 90.0 and got["bytes"] == "AP9vaw=="
    assert got["uuid"] == "00000000-0000-0000-0000-000000000001" and got["dec"] == "1.10"
    assert got["nested"] == {"t": [1, [2, {"3": "int key"}]], "null": "none key"}
    assert got["point"] == {"x": 1, "y": [2, 3]}
    assert got["nan"] == "NaN" and got["inf"] == "-Infinity"
    assert got["big"] == hex(1 << 20000) and got["surrogate"] == "bad \\udc80 text"
    assert got["obj"] == "<class 'object'>"
    assert got == to_json_value(data)  # the documented conversion
    path = tmp_path / "odd.jsonl"
    log.export(path)
    assert verify_file(path, against=log.checkpoint(), key=b"k").valid
    assert log.verify().valid


def test_odd_identities_are_refused_and_non_mapping_data_kept(log: AuditLog) -> None:
    # An identity is a name: a number or a spelling variant is refused, not recorded.
    for agent, session in ((42, None), ("a", uuid.UUID(int=2)), (" a", None), ("a", "")):
        with pytest.raises(InvalidRequestError):
            log.record("tool.error", agent, session, {})  # type: ignore[arg-type]
    log.record("tool.error", "42", None, ["not", "a", "dict"])
    entry = log.query().entries[0]
    assert entry.agent_id == "42" and entry.session_id is None
    assert entry.data == {"value": ["not", "a", "dict"]}
    assert log.verify().valid


def test_fast_path_is_byte_identical_to_the_documented_form() -> None:
    cases: list[tuple[Any, Any, Any]] = [
        ("a", "s", {"k": "v", "n": 1, "f": 1.5, "b": True, "z": None}),
        (None, None, {"nested": {"b": [1, {"c": 'é\n"q'}], "a": []}, "x": -0.0}),
        ("ü", "\u2028", {}),
        ("a", None, None),
        ("a", "s", {2: "int key"}),
        ("a", "s", {"big": 1e300, "small": 5e-324}),
    ]
    batch = [(i + 1, 1000 + i, "tool.end", a, s, d) for i, (a, s, d) in enumerate(cases)]
    rows, head = encode_batch([slot for entry in batch for slot in (*entry, None)], GENESIS_HASH)
    documented = [
        {
            "seq": seq,
            "ts": ts,
            "kind": kind,
            "agent_id": a,
            "session_id": s,
            "data": to_json_value(d if d is not None else {}),
            "prev_hash": GENESIS_HASH,
        }
        for seq, ts, kind, a, s, d in batch
    ]
    seal = block_seal(GENESIS_HASH, [canonical_json(fields) for fields in documented])
    for fields, row in zip(documented, rows, strict=True):
        assert row[7] == seal
        assert row[8] == canonical_json({**fields, "hash": seal})
    assert head == seal


def test_listener_records_governance_events(log: AuditLog) -> None:
    log.listener(GovernanceEvent("lease.granted", 123, "a", "s", {"lease_id": "l1"}))
    log.listener(GovernanceEvent("approval.requested", 124, "a", "s", {}))  # not audited
    (entry,) = log.query().entries
    assert (entry.kind, entry.ts, entry.agent_id, entry.data) == (
        "lease.granted",
        123,
        "a",
        {"lease_id": "l1"},
    )


def test_checkpoint_is_signed_and_verify_uses_the_key(clock: ManualClock) -> None:
    log = AuditLog(clock=clock, key=b"secret")
    empty = log.checkpoint()
    assert (empty.seq, empty.hash) == (0, GENESIS_HASH)
    log.record("breaker.opened", None, None, {"tool": "x"})
    cp = log.checkpoint()
    assert cp.seq == 1 and cp.signature is not None and cp.ts == clock.now_ms()
    assert log.verify(cp).valid and log.verify(empty).valid
    assert not log.verify(cp.model_copy(update={"signature": "00" * 32})).valid
    unkeyed = AuditLog(clock=clock)
    assert unkeyed.checkpoint().signature is None
    log.close()
    unkeyed.close()


def test_log_continues_a_chain_already_in_its_backend(clock: ManualClock) -> None:
    backend = MemoryAuditBackend()
    first = AuditLog(backend, clock=clock)
    first.record("delegation.created", "a", None, {})
    first.flush()
    second = AuditLog(backend, clock=clock)
    assert second.record("delegation.revoked", "a", None, {}) == 2
    result = second.verify()
    assert result.valid and result.head_seq == 2
    second.close()


def test_memory_backend_is_an_audit_backend_and_protects_stored_entries(log: AuditLog) -> None:
    assert isinstance(MemoryAuditBackend(), AuditBackend)
    log.record("chain.end", "a", "s", {"x": [1]})
    log.query().entries[0].data["x"].append(2)  # a caller mutating what it got back
    assert log.query().entries[0].data == {"x": [1]}
    assert log.verify().valid


def test_close_flushes_then_refuses_new_records(clock: ManualClock) -> None:
    stored_at_close: list[int] = []

    class Spy(MemoryAuditBackend):
        def close(self) -> None:
            stored_at_close.append(len(self.lines(0, 1000)))
            super().close()

    backend = Spy()
    log = AuditLog(backend, clock=clock)
    for _ in range(100):
        log.record("tool.start", None, None)
    log.close()
    log.close()  # idempotent: the backend is closed once
    assert stored_at_close == [100]
    with pytest.raises(StoreUnavailableError):
        backend.lines(0, 10)
    with pytest.raises(StoreUnavailableError):
        log.record("tool.start", None, None)
    with pytest.raises(StoreUnavailableError):
        log.query()


class FailingBackend(MemoryAuditBackend):
    def __init__(self, fail_after: int) -> None:
        super().__init__()
        self.fail_after = fail_after

    def append(self, entries: Sequence[AuditEntry]) -> None:
        if entries[-1].seq > self.fail_after:
            raise OSError("disk full")
        super().append(entries)


def test_writer_failure_fails_closed(clock: ManualClock) -> None:
    log = AuditLog(FailingBackend(fail_after=0), clock=clock)
    log.record("lease.granted", "a", "s", {})
    with pytest.raises(StoreUnavailableError, match="disk full"):
        log.flush()
    with pytest.raises(StoreUnavailableError):
        log.verify()
    with pytest.raises(StoreUnavailableError):
        log.record("lease.granted", "a", "s", {})
    with pytest.raises(StoreUnavailableError):
        log.close()


def test_rows_handed_to_backends_are_entries(clock: ManualClock) -> None:
    seen: list[AuditEntry] = []

    class Spy(MemoryAuditBackend):
        def append(self, entries: Sequence[AuditEntry]) -> None:
            seen.extend(entries[i] for i in range(len(entries)))
            super().append(entries)

    log = AuditLog(Spy(), clock=clock)
    log.record("approval.decided", "a", "s", {"ok": True})
    log.flush()
    (entry,) = seen
    assert entry.hash == entry.compute_hash() and entry.stored_line() == entry.canonical_line()
    log.close()


def test_sealers_racing_keep_one_chain_in_seq_order(clock: ManualClock) -> None:
    """Recording threads that settle, readers that flush and the writer all seal:
    the stored chain is the one chain, in seq order, and every reader sees its writes."""
    log = AuditLog(clock=clock)
    threads, per_thread = 4, 3000
    start = threading.Barrier(threads + 1)
    problems: list[str] = []

    def record(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            seq = log.record("lease.granted", f"agent-{t}", "s", {"i": i})
            log.settle()
            if i % 500 == 0:
                page = log.query(agent_id=f"agent-{t}", since=0, limit=1000)
                if not page.entries or page.entries[-1].seq > seq:
                    problems.append(f"agent-{t} did not see its entry {seq}")

    def verify() -> None:
        start.wait()
        for _ in range(20):
            result = log.verify()
            if not result.valid:
                problems.append(result.reason)

    workers = [threading.Thread(target=record, args=(t,)) for t in range(threads)]
    workers.append(threading.Thread(target=verify))
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert problems == []
    result = log.verify()
    assert result.valid and result.checked == threads * per_thread
    log.close()


def test_a_busy_recorder_seals_on_its_own_thread(clock: ManualClock) -> None:
    stored = MemoryAuditBackend()
    log = AuditLog(stored, clock=clock)
    for i in range(2000):
        log.record("tool.end", "a", None, {"i": i})
        log.settle()
    # No reader ran: what is stored was sealed by settle() (or the writer), in order.
    assert len(stored.lines(0, 5000)) >= 2000 - 300
    assert log.verify().checked == 2000
    log.close()


def test_a_quiet_log_is_sealed_by_the_writer(clock: ManualClock) -> None:
    stored = MemoryAuditBackend()
    log = AuditLog(stored, clock=clock)
    log.record("tool.end", "a", None, {})
    deadline = time.monotonic() + 5
    while not stored.lines(0, 10) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(stored.lines(0, 10)) == 1  # nobody flushed: the writer sealed it
    log.close()


def test_settle_never_raises_but_the_failure_is_kept(clock: ManualClock) -> None:
    log = AuditLog(FailingBackend(fail_after=0), clock=clock)
    for _ in range(300):
        log.record("lease.granted", "a", "s", {})
    log.settle()  # the decision it follows stands: no error here
    with pytest.raises(StoreUnavailableError, match="disk full"):
        log.record("lease.granted", "a", "s", {})
    with pytest.raises(StoreUnavailableError):
        log.close()
