"""Regression tests: a decision and its audit entry commit together, or neither does.

Findings of issue 9 (probes in ``shared/probes``):

* 1 — ``repro_unaudited_after_crash.py``: a decision committed to SQLite
  was never audited when the process died right after the call returned.
* 2 — ``repro_phantom_audit.py``: a call that failed (unstorable metadata,
  a full disk) still left an audit entry behind.
* 3 — ``repro_audit_writer_brick.py``: one failed audit write (the write
  lock held by another process past the busy timeout) disabled the engine
  for good and lost what was queued; ``record(ts=2**63)`` broke the writer.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from klockwork import (
    AuditEntry,
    InvalidRequestError,
    Klockwork,
    KlockworkError,
    LeaseState,
    MemoryStore,
    Policy,
    SqliteStore,
    StoreUnavailableError,
)
from klockwork.core.governance.outcomes import GATE, GateRecord

BIG = "x" * 1_000_000  # more than any free space left in a freshly made file


@pytest.fixture
def make_kw(store_kind: str, tmp_path: Path) -> Iterator[Callable[..., Klockwork]]:
    """Engines on the parametrised store (every SQLite one on the same file)."""
    made: list[Klockwork] = []

    def make(**store_options: Any) -> Klockwork:
        store = (
            MemoryStore()
            if store_kind == "memory"
            else SqliteStore(tmp_path / "kw.db", **store_options)
        )
        kw = Klockwork(store)
        kw.policies.add(Policy(name="deploys", action="deploy.*", effect="allow"))
        kw.policies.add(Policy(name="merges", action="merge", effect="require_approval"))
        kw.policies.add(Policy(name="drops", action="drop.*", effect="deny"))
        made.append(kw)
        return kw

    yield make
    for kw in made:
        kw.close()


def _entries(kw: Klockwork) -> list[AuditEntry]:
    return kw.audit.query(limit=1000).entries


def _assert_one_gapless_valid_chain(kw: Klockwork) -> list[AuditEntry]:
    entries = _entries(kw)
    result = kw.audit.verify()
    assert result.valid, result.reason
    assert result.checked == len(entries)
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    return entries


def _gate_records(kw: Klockwork) -> list[GateRecord]:
    return kw.store.list_records(GATE, GateRecord)


# ================================================================ 1. crash durability
CRASHING_CHILD = r"""
import os, signal, sys
from klockwork import Klockwork, Policy

kw = Klockwork.open(sys.argv[1])
kw.policies.add(Policy(name="deploys", action="deploy.*", effect="allow"))
kw.policies.add(Policy(name="merges", action="merge", effect="require_approval"))
kw.policies.add(Policy(name="drops", action="drop.*", effect="deny"))
merge = kw.gates.execute("bot", "merge", {"pr": 7}, event_id="run-42/merge")
first = kw.leases.try_acquire("bot", "s", ("FILE:/src/a.py", "MUTATES"), ttl_ms=600_000).lease
gate, lease = kw.gates.execute, kw.leases.try_acquire
last = {
    "gate": lambda: gate("bot", "deploy.prod", {"sha": "abc"}, event_id="run-42/deploy"),
    "deny": lambda: gate("bot", "drop.table", {"t": "users"}, event_id="run-42/drop"),
    "lease": lambda: lease("bot", "s", ("FILE:/etc/app.conf", "MUTATES"), ttl_ms=600_000),
    "approve": lambda: kw.approvals.approve(merge.approval_id, "alice"),
    "release": lambda: kw.leases.release(first.lease_id),
}[sys.argv[2]]
print(first.lease_id, flush=True)
last()
os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer, a node drain, kill -9
"""


@pytest.mark.parametrize("last", ["gate", "deny", "lease", "approve", "release"])
def test_a_decision_that_returned_is_audited_even_if_the_process_dies_at_once(
    tmp_path: Path, last: str
) -> None:
    url = f"sqlite:///{tmp_path / 'kw.db'}"
    child = subprocess.run(
        [sys.executable, "-c", CRASHING_CHILD, url, last],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    first_lease_id = child.stdout.split()[0]

    with Klockwork.open(url) as kw:
        entries = _assert_one_gapless_valid_chain(kw)
        by_event = {
            e.data.get("audit_event_id"): e for e in entries if e.kind.startswith("action.")
        }
        # Every committed gate outcome has its entry, of its kind.
        records = _gate_records(kw)
        assert records
        for rec in records:
            entry = by_event.get(rec.audit_event_id)
            assert entry is not None, f"gate record {rec.event_id} has no audit entry"
            assert entry.kind == f"action.{rec.result.status}"
        # Every approval: its request, and its decision once decided.
        for approval in kw.approvals.list(status=None):
            assert any(
                e.kind == "action.requested" and e.data.get("approval_id") == approval.approval_id
                for e in entries
            )
            if approval.status.value != "pending":
                assert any(
                    e.kind == "approval.decided"
                    and e.data.get("approval_id") == approval.approval_id
                    for e in entries
                ), "a decided approval has no approval.decided entry"
        # Every lease granted has its entry; an ended one its end too.
        granted = {e.data["lease_id"] for e in entries if e.kind == "lease.granted"}
        active = kw.leases.list()
        assert {lease.lease_id for lease in active} <= granted
        first = kw.leases.get(first_lease_id)
        assert first is not None and first_lease_id in granted
        released = [e for e in entries if e.kind == "lease.released"]
        if first.state is LeaseState.RELEASED:
            assert [e.data["lease_id"] for e in released] == [first_lease_id]
        else:
            assert released == []
        # And no entry without its decision.
        stored = {rec.audit_event_id for rec in records}
        assert set(by_event) <= stored
        assert all(kw.leases.get(lease_id) is not None for lease_id in granted)
        # The last call's decision itself was committed (it returned).
        if last == "gate":
            assert "run-42/deploy" in {rec.event_id for rec in records}
        elif last == "deny":
            assert "run-42/drop" in {rec.event_id for rec in records}
        elif last == "lease":
            assert "FILE:/etc/app.conf" in {lease.resource for lease in active}
        elif last == "approve":
            assert [a.status.value for a in kw.approvals.list(status=None)] == ["approved"]
        else:
            assert first.state is LeaseState.RELEASED
        # A retry with the same event_id finds the stored outcome and adds nothing.
        if last in ("gate", "deny"):
            action, meta, event_id = (
                ("deploy.prod", {"sha": "abc"}, "run-42/deploy")
                if last == "gate"
                else ("drop.table", {"t": "users"}, "run-42/drop")
            )
            before = len(entries)
            again = kw.gates.execute("bot", action, meta, event_id=event_id)
            assert again.audit_event_id in by_event
            assert len(_entries(kw)) == before


# ================================================================ 2. no phantom entries
BAD_METADATA = [
    pytest.param({"obj": object()}, id="object"),
    pytest.param({"b": b"\xff\xfe"}, id="invalid-utf8-bytes"),
    pytest.param({"s": {1, 2}}, id="set"),
    pytest.param({"t": "caf\ud800"}, id="lone-surrogate"),
    pytest.param({"k\udcff": 1}, id="lone-surrogate-key"),
    pytest.param({1: "x"}, id="int-key"),
    pytest.param({"f": float("nan")}, id="nan"),
    pytest.param({"f": float("inf")}, id="inf"),
]


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"d": value}
    return value


@pytest.mark.parametrize(
    "metadata",
    [*BAD_METADATA, pytest.param(_deep(5_000), id="too-deep")],
)
@pytest.mark.parametrize("action", ["deploy.prod", "merge", "drop.table"])
def test_unstorable_metadata_is_refused_and_leaves_no_trace(
    make_kw: Callable[..., Klockwork], metadata: dict[Any, Any], action: str
) -> None:
    kw = make_kw()
    with pytest.raises(InvalidRequestError):
        kw.gates.execute("bot", action, metadata, event_id="e-1")
    with pytest.raises(InvalidRequestError):
        kw.gates.can_i("bot", action, metadata)
    assert _entries(kw) == []
    assert _gate_records(kw) == []
    assert kw.approvals.list(status=None) == []
    assert kw.audit.verify().valid
    # The event_id was not consumed, and the chain has no hole where it failed.
    fresh = kw.gates.execute("bot", action, {"ok": True}, event_id="e-1")
    entries = _assert_one_gapless_valid_chain(kw)
    assert len(entries) == 1
    assert entries[0].data["audit_event_id"] == fresh.audit_event_id
    assert entries[0].data["metadata"] == {"ok": True}


def _limit_pages(kw: Klockwork, pages: int | None) -> None:
    """Cap the file at ``pages`` (None: its current size) on every connection the store keeps.

    ``PRAGMA max_page_count`` is what a full disk looks like to SQLite
    (``SQLITE_FULL``), without mounting anything.
    """
    idle = kw.store._pool.idle  # type: ignore[attr-defined]
    assert idle, "expected the store to keep a connection between calls"
    for conn in idle:
        cap = pages or conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count={cap}")


def test_a_full_disk_fails_the_call_leaves_no_entry_and_is_not_sticky(tmp_path: Path) -> None:
    kw = Klockwork(SqliteStore(tmp_path / "kw.db"))
    try:
        kw.policies.add(Policy(name="deploys", action="deploy.*", effect="allow"))
        kw.policies.add(Policy(name="merges", action="merge", effect="require_approval"))
        kw.gates.execute("bot", "deploy.warm", {"n": 0})
        kw.audit.flush()
        before = _assert_one_gapless_valid_chain(kw)
        _limit_pages(kw, None)
        many = [(f"FILE:/big/{i:04d}/{'p' * 200}", "MUTATES") for i in range(300)]
        failing: list[Callable[[], Any]] = [
            lambda: kw.gates.execute("bot", "deploy.prod", {"blob": BIG}, event_id="big"),
            lambda: kw.gates.execute("bot", "merge", {"blob": BIG}, event_id="big-merge"),
            lambda: kw.leases.try_acquire("filler", "s", many),
        ]
        for call in failing:
            with pytest.raises(StoreUnavailableError, match="full"):
                call()
        assert kw.leases.list(agent_id="filler") == []
        assert {r.event_id for r in _gate_records(kw)} == {None}  # the warm-up's only
        assert kw.approvals.list(status=None) == []

        _limit_pages(kw, 1_073_741_823)  # space again
        assert kw.gates.execute("bot", "deploy.prod", {"blob": BIG}, event_id="big").status == (
            "executed"
        )
        assert kw.gates.execute("bot", "merge", {"blob": BIG}, event_id="big-merge").approval_id
        assert kw.leases.try_acquire("filler", "s", many).granted
        entries = _assert_one_gapless_valid_chain(kw)
        new = entries[len(before) :]
        assert [e.kind for e in new].count("action.executed") == 1
        assert [e.kind for e in new].count("action.requested") == 1
        assert [e.kind for e in new].count("lease.granted") == len(many)
        assert len(new) == 2 + len(many)
    finally:
        kw.close()


FULL_DISK_CHILD = r"""
import json, os, resource, signal, sys
from klockwork import Klockwork, KlockworkError, Policy

path = sys.argv[1]
kw = Klockwork.open(f"sqlite:///{path}")
kw.policies.add(Policy(name="deploys", action="deploy.*", effect="allow"))
kw.gates.execute("bot", "deploy.warm", {"n": 0})
kw.audit.flush()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
biggest = max(os.path.getsize(path + s) for s in ("", "-wal", "-shm") if os.path.exists(path + s))
resource.setrlimit(resource.RLIMIT_FSIZE, (biggest + 4096, hard))
blob = "x" * 1_000_000
failed = []
for _ in range(3):
    try:
        kw.gates.execute("bot", "deploy.prod", {"blob": blob}, event_id="big")
        failed.append(None)
    except KlockworkError as exc:
        failed.append(type(exc).__name__)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
after = kw.gates.execute("bot", "deploy.prod", {"blob": blob}, event_id="big").status
entries = kw.audit.query(limit=100).entries
print(json.dumps({
    "failed": failed,
    "after": after,
    "entries": [[e.seq, e.kind, e.data.get("event_id")] for e in entries],
    "valid": kw.audit.verify().valid,
}))
kw.close()
"""


def test_a_file_size_limit_fails_the_call_leaves_no_entry_and_is_not_sticky(
    tmp_path: Path,
) -> None:
    child = subprocess.run(
        [sys.executable, "-c", FULL_DISK_CHILD, str(tmp_path / "kw.db")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout.strip().splitlines()[-1])
    assert out["failed"] == ["StoreUnavailableError"] * 3
    assert out["after"] == "executed"
    assert out["entries"] == [[1, "action.executed", None], [2, "action.executed", "big"]]
    assert out["valid"] is True


def _abort_inserts_into(db: Path, table: str) -> Callable[[], None]:
    """Make every insert into ``table`` fail (as a write error would); returns the undo."""
    with sqlite3.connect(db) as conn:
        conn.execute(
            f"CREATE TRIGGER trust_abort_{table} BEFORE INSERT ON {table} "
            "BEGIN SELECT RAISE(ABORT, 'disk full, say'); END"
        )
    conn.close()

    def undo() -> None:
        with sqlite3.connect(db) as conn:
            conn.execute(f"DROP TRIGGER trust_abort_{table}")
        conn.close()

    return undo


@pytest.mark.parametrize(
    "tables",
    [("kw_records",), ("kw_leases",), ("kw_audit",), ("kw_audit", "kw_audit_pending")],
    ids=["records", "leases", "chain-only", "chain-and-pending"],
)
def test_a_write_that_fails_mid_transaction_leaves_neither_decision_nor_entry(
    tmp_path: Path, tables: tuple[str, ...]
) -> None:
    db = tmp_path / "kw.db"
    kw = Klockwork(SqliteStore(db))
    try:
        kw.policies.add(Policy(name="deploys", action="deploy.*", effect="allow"))
        kw.policies.add(Policy(name="merges", action="merge", effect="require_approval"))
        held = kw.leases.try_acquire("a", "s", ("FILE:/held", "MUTATES")).lease
        before = _assert_one_gapless_valid_chain(kw)
        undos = [_abort_inserts_into(db, table) for table in tables]
        calls: dict[str, Callable[[], Any]] = {
            "gate": lambda: kw.gates.execute("bot", "deploy.prod", {"n": 1}, event_id="g"),
            "approval": lambda: kw.gates.execute("bot", "merge", {"n": 1}, event_id="m"),
            "lease": lambda: kw.leases.try_acquire("b", "s", ("FILE:/new", "MUTATES")),
            "release": lambda: kw.leases.release(held.lease_id),
        }
        failed = set()
        for name, call in calls.items():
            try:
                call()
            except StoreUnavailableError:
                failed.add(name)
        # The audit entry of every decision is written with it: when the
        # entries cannot be written, no decision commits.
        if "kw_audit_pending" in tables:
            assert failed == set(calls)
        if tables == ("kw_audit",):  # sealing refused: the entries wait, pending
            assert failed == set()
        kind_of = {
            "gate": "action.executed",
            "approval": "action.requested",
            "lease": "lease.granted",
            "release": "lease.released",
        }
        for undo in undos:  # (readers seal first: the chain must take rows again)
            undo()
        new = [e.kind for e in _entries(kw)[len(before) :]]
        assert sorted(new) == sorted(kind_of[n] for n in calls if n not in failed)
        if "gate" in failed:
            assert "g" not in {r.event_id for r in _gate_records(kw)}
        if "approval" in failed:
            assert kw.approvals.list(status=None) == []
        if "lease" in failed:
            assert kw.leases.list(agent_id="b") == []
        if "release" in failed:
            lease = kw.leases.get(held.lease_id)
            assert lease is not None and lease.state is LeaseState.ACTIVE  # not half-applied
        # Once the writes work again, what failed works, and each decision has one entry.
        for name in failed:
            result = calls[name]()
            if name == "release":
                assert result is True
        assert kw.leases.release(held.lease_id) is False  # released exactly once
        entries = _assert_one_gapless_valid_chain(kw)
        kinds = [e.kind for e in entries]
        assert kinds.count("action.executed") == 1
        assert kinds.count("action.requested") == 1
        assert kinds.count("lease.granted") == 2
        assert kinds.count("lease.released") == 1
        assert {r.event_id for r in _gate_records(kw)} == {"g", "m"}
    finally:
        kw.close()


# ================================================================ 3. no sticky failure
def test_a_write_lock_held_past_the_busy_timeout_fails_calls_then_everything_recovers(
    tmp_path: Path,
) -> None:
    db = tmp_path / "kw.db"
    kw = Klockwork(SqliteStore(db, busy_timeout_ms=100))
    blocker = sqlite3.connect(db, isolation_level=None)
    try:
        kw.policies.add(Policy(name="acts", action="act.*", effect="allow"))
        held = kw.leases.try_acquire("agent-a", "s", ("FILE:/a", "MUTATES")).lease
        accepted = {kw.audit.record("tool.start", "agent-a", "s", {"tool": "grep"}): "tool.start"}

        blocker.execute("BEGIN IMMEDIATE")  # another process's long transaction
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            kw.leases.try_acquire("agent-b", "s", ("FILE:/b", "MUTATES"))
        with pytest.raises(StoreUnavailableError):
            kw.gates.execute("agent-a", "act.x", {"during": "lock"})
        with pytest.raises(StoreUnavailableError):
            kw.leases.release(held.lease_id)  # not released: says so, loudly
        with contextlib.suppress(StoreUnavailableError):  # refused, or accepted and never lost
            accepted[kw.audit.record("tool.end", "agent-a", "s", {"tool": "grep"})] = "tool.end"
        assert time.monotonic() - started < 8  # each waited the short busy timeout only
        time.sleep(0.3)  # held well past the busy timeout
        blocker.execute("ROLLBACK")

        # The store answers again: so does the engine, at once.
        assert kw.leases.try_acquire("agent-b", "s", ("FILE:/b", "MUTATES")).granted
        assert kw.gates.execute("agent-a", "act.x", {"after": "lock"}).status == "executed"
        lease = kw.leases.get(held.lease_id)
        assert lease is not None and lease.state is LeaseState.ACTIVE
        assert kw.leases.release(held.lease_id) is True
        assert kw.leases.release(held.lease_id) is False
        accepted[kw.audit.record("tool.end", "agent-a", "s", {"tool": "ls"})] = "tool.end"
        entries = _assert_one_gapless_valid_chain(kw)
        by_seq = {e.seq: e.kind for e in entries}
        for seq, kind in accepted.items():
            assert by_seq.get(seq) == kind, f"entry {seq} ({kind}) was accepted, then lost"
        kinds = [e.kind for e in entries]
        assert kinds.count("lease.granted") == 2
        assert kinds.count("lease.released") == 1
        executed = [e for e in entries if e.kind == "action.executed"]
        assert [e.data["metadata"] for e in executed] == [{"after": "lock"}]
    finally:
        blocker.close()
        kw.close()


def test_an_audit_writer_that_fails_does_not_disable_the_engine(tmp_path: Path) -> None:
    """The chain cannot be extended for a while: decisions still commit, and are sealed later."""
    db = tmp_path / "kw.db"
    kw = Klockwork(SqliteStore(db, busy_timeout_ms=100))
    try:
        kw.policies.add(Policy(name="acts", action="act.*", effect="allow"))
        kw.leases.try_acquire("agent-a", "s", ("FILE:/a", "MUTATES"))
        kw.audit.flush()
        undo = _abort_inserts_into(db, "kw_audit")  # sealing fails; deciding does not
        made = [kw.gates.execute("agent-a", "act.x", {"i": i}).audit_event_id for i in range(3)]
        assert kw.leases.try_acquire("agent-b", "s", ("FILE:/b", "MUTATES")).granted
        seq = kw.audit.record("tool.start", "agent-a", "s", {"tool": "grep"})
        with pytest.raises(KlockworkError):
            kw.audit.flush()  # cannot seal now: says so
        time.sleep(0.3)  # the background sealer fails meanwhile (and retries)
        undo()
        assert kw.gates.execute("agent-a", "act.y").status == "executed"
        entries = _assert_one_gapless_valid_chain(kw)
        events = {e.data.get("audit_event_id") for e in entries}
        assert set(made) <= events
        assert any(e.seq == seq and e.kind == "tool.start" for e in entries)
        assert [e.kind for e in entries].count("lease.granted") == 2
    finally:
        kw.close()


@pytest.mark.parametrize("ts", [2**63, 2**64, -1, 1.5, "1", True])
def test_an_out_of_range_timestamp_is_refused_and_the_engine_keeps_working(
    make_kw: Callable[..., Klockwork], ts: Any
) -> None:
    kw = make_kw()
    kw.gates.execute("bot", "deploy.warm")
    with pytest.raises(InvalidRequestError, match="ts"):
        kw.audit.record("tool.start", "bot", "s", {"tool": "grep"}, ts=ts)
    assert kw.audit.record("tool.start", "bot", "s", {"tool": "grep"}, ts=2**63 - 1) == 2
    assert kw.leases.try_acquire("bot", "s", ("FILE:/a", "MUTATES")).granted
    assert kw.gates.execute("bot", "deploy.prod").status == "executed"
    kw.audit.flush()
    entries = _assert_one_gapless_valid_chain(kw)
    assert [e.kind for e in entries] == [
        "action.executed",
        "tool.start",
        "lease.granted",
        "action.executed",
    ]
