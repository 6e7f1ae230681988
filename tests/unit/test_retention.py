"""Retention: stores and the in-memory audit log stay bounded, and stay sound.

``MemoryStore(retain_inactive=N, audit_retain=M)`` and
``SqliteStore(path, retain_inactive=N)`` drop old ended leases, settled gate
records and decided approvals (and, in memory, old fencing history and old
audit entries). These tests fail if that stops bounding memory / the file,
or if pruning makes anything *less* safe:

* a fencing token whose history was pruned is refused (the floor), while
  active leases keep passing;
* pending approvals (and the gate records waiting for them) are never dropped;
* the kept audit tail still verifies, tampering is still caught, and an
  export of it verifies from ``kw.audit.retained_from()``.

Retain values are tiny (2..100) so that a few thousand operations are enough.
Four bugs found while writing them are pinned here: a live directory lease
refused inside its directory after pruning, SQLite never pruning approvals
when every gate asks for one, a gate decided out of band failing once its
approval was pruned, and verify racing a drop of the in-memory tail.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import klockwork.core.stores.sqlite as sqlite_store_module
from klockwork import (
    ApprovalStatus,
    CapabilityError,
    Checkpoint,
    Klockwork,
    LeaseNotFoundError,
    ManualClock,
    MemoryStore,
    Policy,
    SqliteStore,
    StaleLeaseError,
    VerdictStatus,
)
from klockwork.core.audit.chain import AuditEntry, sign_checkpoint
from klockwork.core.audit.log import verify_file
from klockwork.core.governance.outcomes import GateRecord
from klockwork.core.leases.rules import parse_intents
from klockwork.core.stores.sqlite_io import PRUNE_EVERY, fence_floor

T0 = 1_700_000_000_000  # ManualClock start: nothing ever expires on its own
HOUR_MS = 3_600_000
RETAIN = 10
KEY = b"retention-test-key-0123456789abc"


# --------------------------------------------------------------------------- helpers
@pytest.fixture
def make_kw(store_kind: str, tmp_path: Path) -> Iterator[Callable[..., Klockwork]]:
    """Engines on the parametrised store, with a tiny retention, on a manual clock."""
    made: list[Klockwork] = []

    def make(retain: int = RETAIN, **engine_options: Any) -> Klockwork:
        store = (
            MemoryStore(retain_inactive=retain)
            if store_kind == "memory"
            else SqliteStore(tmp_path / f"kw{len(made)}.db", retain_inactive=retain)
        )
        engine_options.setdefault("clock", ManualClock(T0))
        kw = Klockwork(store, **engine_options)
        kw.policies.add(Policy(name="merges", action="merge", effect="require_approval"))
        kw.policies.add(Policy(name="deploys", action="deploy", effect="allow"))
        made.append(kw)
        return kw

    yield make
    for kw in made:
        kw.close()


def _cycle(kw: Klockwork, resource: str, agent: str = "churn") -> tuple[str, int]:
    """Acquire ``resource`` and release it at once; return (lease_id, token)."""
    verdict = kw.leases.try_acquire(agent, "s", (resource, "MUTATES"), ttl_ms=HOUR_MS)
    assert verdict.status is VerdictStatus.GRANTED, verdict
    lease = verdict.leases[0]
    assert kw.leases.release(lease.lease_id)
    return lease.lease_id, lease.fencing_token


def _lease_rows(kw: Klockwork) -> int:
    store = kw.store
    if isinstance(store, MemoryStore):
        return len(store._leases)
    assert isinstance(store, SqliteStore)
    with sqlite3.connect(store.path) as conn:
        return int(conn.execute("SELECT count(*) FROM kw_leases").fetchone()[0])


def _floor(kw: Klockwork) -> int:
    store = kw.store
    if isinstance(store, MemoryStore):
        return store._fence_floor
    assert isinstance(store, SqliteStore)
    with sqlite3.connect(store.path) as conn:
        return fence_floor(conn)


def _gate_records(kw: Klockwork) -> list[GateRecord]:
    return kw.store.list_records("gate", GateRecord)


def _stale(kw: Klockwork, resource: str, token: int) -> bool:
    try:
        kw.leases.check_fencing(resource, token)
    except StaleLeaseError:
        return True
    return False


# --------------------------------------------------------------------------- 1. leases (memory)
def test_memory_lease_and_fence_history_stay_bounded() -> None:
    store = MemoryStore(retain_inactive=RETAIN)
    kw = Klockwork(store, clock=ManualClock(T0), audit_leases=False)
    try:
        ids: list[str] = []
        most_leases = most_fences = 0
        for i in range(3000):
            ids.append(_cycle(kw, f"FILE:/churn/{i}")[0])
            most_leases = max(most_leases, len(store._leases))
            most_fences = max(most_fences, len(store._fence))
        assert most_leases <= RETAIN + 1  # the one active lease plus the retained ended ones
        assert len(store._leases) == RETAIN
        assert len(store._retired) == RETAIN
        limit = store._fence_limit
        assert limit == 1024  # max(2 * retain, 1024)
        assert most_fences <= limit + 1  # pruned as soon as it goes past the limit
        assert len(store._fence_keys) == len(store._fence)  # the sorted index follows
        assert store._fence_floor > 0  # fencing history was actually forgotten

        for old in ids[: -RETAIN - 1]:
            assert kw.leases.get(old) is None
        with pytest.raises(LeaseNotFoundError):
            kw.leases.validate(ids[0])
        with pytest.raises(LeaseNotFoundError):
            kw.leases.heartbeat(ids[0])
        for recent in ids[-RETAIN:]:
            lease = kw.leases.get(recent)
            assert lease is not None and lease.state.value == "RELEASED"
            with pytest.raises(StaleLeaseError):  # found: a precise error, not "unknown"
                kw.leases.validate(recent)
    finally:
        kw.close()


def test_memory_active_leases_are_never_pruned() -> None:
    store = MemoryStore(retain_inactive=3)
    kw = Klockwork(store, clock=ManualClock(T0), audit_leases=False)
    try:
        held = [
            kw.leases.try_acquire(
                "holder", "s", (f"FILE:/held/{i}", "MUTATES"), ttl_ms=HOUR_MS
            ).leases[0]
            for i in range(20)
        ]
        for i in range(2100):
            _cycle(kw, f"FILE:/churn/{i}")
        assert len(store._leases) == 20 + 3
        for lease in held:
            assert kw.leases.validate(lease.lease_id).fencing_token == lease.fencing_token
            assert lease.resource in store._fence  # an active key's history is kept
    finally:
        kw.close()


# --------------------------------------------------------------------------- 2. fence floor
def test_fence_floor_refuses_pruned_ended_tokens_and_keeps_live_ones(
    make_kw: Callable[..., Klockwork],
) -> None:
    kw = make_kw(audit_leases=False)
    keep = kw.leases.try_acquire("holder", "s", ("FILE:/keep", "MUTATES"), ttl_ms=HOUR_MS)
    active_old = keep.leases[0]
    gone_id, gone_token = _cycle(kw, "FILE:/gone", agent="gone")
    # Without pruning this token is current: no newer grant on FILE:/gone.
    kw.leases.check_fencing("FILE:/gone", gone_token)

    churn = [_cycle(kw, f"FILE:/churn/{i}") for i in range(2 * PRUNE_EVERY + 50)]

    assert _floor(kw) > gone_token
    assert kw.leases.get(gone_id) is None  # its history was pruned...
    with pytest.raises(StaleLeaseError) as info:  # ...so its token is refused (fail closed)
        kw.leases.check_fencing("FILE:/gone", gone_token)
    assert info.value.fencing_token == gone_token
    assert info.value.current_token == _floor(kw)  # judged by the floor

    # An active lease granted before thousands of others still passes everything.
    kw.leases.check_fencing("FILE:/keep", active_old.fencing_token)
    assert kw.leases.validate(active_old.lease_id).fencing_token == active_old.fencing_token
    renewed = kw.leases.heartbeat(active_old.lease_id)
    assert renewed.fencing_token == active_old.fencing_token

    # A recent ended lease with no newer grant on its key still passes (current behaviour)...
    _, last_token = churn[-1]
    assert last_token > _floor(kw)
    kw.leases.check_fencing(f"FILE:/churn/{len(churn) - 1}", last_token)
    # ...and one superseded on its key is refused, as without retention.
    _, newer = _cycle(kw, f"FILE:/churn/{len(churn) - 1}")
    assert _stale(kw, f"FILE:/churn/{len(churn) - 1}", last_token)
    kw.leases.check_fencing(f"FILE:/churn/{len(churn) - 1}", newer)
    # A new grant on the pruned key is current again.
    _, fresh = _cycle(kw, "FILE:/gone", agent="gone")
    assert fresh > _floor(kw)
    kw.leases.check_fencing("FILE:/gone", fresh)
    assert _stale(kw, "FILE:/gone", gone_token)


def test_active_directory_lease_passes_inside_its_directory_after_pruning(
    make_kw: Callable[..., Klockwork],
) -> None:
    kw = make_kw(audit_leases=False)
    repo = kw.leases.try_acquire("holder", "s", ("FILE:/repo", "MUTATES"), ttl_ms=HOUR_MS)
    token = repo.leases[0].fencing_token
    kw.leases.check_fencing("FILE:/repo/a.py", token)  # passes before any pruning
    for i in range(2 * PRUNE_EVERY + 50):
        _cycle(kw, f"FILE:/elsewhere/{i}")
    assert _floor(kw) > token
    kw.leases.check_fencing("FILE:/repo", token)  # the exact key passes
    kw.leases.check_fencing("FILE:/repo/a.py", token)  # refused: the bug


# --------------------------------------------------------------------------- 3. records
def test_settled_gate_records_are_pruned_but_a_pending_approval_is_kept(
    make_kw: Callable[..., Klockwork], store_kind: str
) -> None:
    kw = make_kw()
    pending = kw.gates.execute("agent", "merge", {"pr": 1}, "ev-pending")
    assert pending.status == "requested" and pending.approval_id is not None
    n = 200 if store_kind == "memory" else PRUNE_EVERY + 100
    results = [kw.gates.execute("agent", "deploy", {"i": i}, f"ev-{i}") for i in range(n)]
    assert all(r.status == "executed" for r in results)

    records = _gate_records(kw)
    if store_kind == "memory":
        assert len(records) == RETAIN  # the pending one counts, and stays
    else:
        assert len(records) <= RETAIN + 1 + PRUNE_EVERY
        assert len(records) < n // 2  # it did prune
    assert kw.gates.get(results[0].audit_event_id or "") is None  # the oldest settled: gone
    newest = results[-1]
    assert kw.gates.get(newest.audit_event_id or "") is not None
    again = kw.gates.execute("agent", "deploy", {"i": n - 1}, f"ev-{n - 1}")
    assert again.audit_event_id == newest.audit_event_id  # still idempotent within retention

    # The pending request survived every prune, and can be decided afterwards.
    assert pending.audit_event_id in {r.audit_event_id for r in _gate_records(kw)}
    assert kw.approvals.get(pending.approval_id).status is ApprovalStatus.PENDING
    assert [a.approval_id for a in kw.approvals.list()] == [pending.approval_id]
    kw.approvals.approve(pending.approval_id, "human")
    settled = kw.gates.execute("agent", "merge", {"pr": 1}, "ev-pending")
    assert settled.status == "executed"
    assert settled.audit_event_id == pending.audit_event_id
    assert kw.audit.verify().valid


def test_decided_approvals_are_pruned_but_pending_ones_are_kept(
    make_kw: Callable[..., Klockwork], store_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mixed workload (3 new records per round): SQLite's shared counter lands on
    # both kinds. PRUNE_EVERY is lowered so that a few rounds are enough.
    monkeypatch.setattr(sqlite_store_module, "PRUNE_EVERY", 16)
    kw = make_kw()
    waiting = [kw.gates.execute("agent", "merge", {"pr": i}, f"wait-{i}") for i in range(3)]
    decided: list[str] = []
    for i in range(80):
        r = kw.gates.execute("agent", "merge", {"i": i}, f"ev-{i}")
        assert r.approval_id is not None
        kw.approvals.approve(r.approval_id, "human")
        assert kw.gates.execute("agent", "merge", {"i": i}, f"ev-{i}").status == "executed"
        kw.gates.execute("agent", "deploy", {"i": i})
        decided.append(r.approval_id)

    everything = kw.approvals.list(None)
    bound = RETAIN if store_kind == "memory" else RETAIN + 16
    assert len(everything) <= bound
    pending_ids = {a.approval_id for a in kw.approvals.list()}
    assert pending_ids == {w.approval_id for w in waiting}  # never dropped
    assert decided[-1] in {a.approval_id for a in everything}
    assert decided[0] not in {a.approval_id for a in everything}
    for w in waiting:  # still decidable
        assert w.approval_id is not None
        kw.approvals.deny(w.approval_id, "human", "no")
    assert kw.gates.execute("agent", "merge", {"pr": 0}, "wait-0").status == "denied"


@pytest.mark.parametrize(
    "store_kind",
    [
        "memory",
        pytest.param(
            "sqlite",
        ),
    ],
)
def test_decided_approvals_are_pruned_when_every_gate_needs_approval(
    make_kw: Callable[..., Klockwork], store_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store_module, "PRUNE_EVERY", 16)  # same bug at 1024, just slower
    kw = make_kw()
    for i in range(100):
        r = kw.gates.execute("agent", "merge", {"i": i}, f"ev-{i}")
        assert r.approval_id is not None
        kw.approvals.approve(r.approval_id, "human")
        assert kw.gates.execute("agent", "merge", {"i": i}, f"ev-{i}").status == "executed"
    assert len(_gate_records(kw)) <= RETAIN + 16
    assert len(kw.approvals.list(None)) <= RETAIN + 16


def test_a_gate_decided_out_of_band_is_decided_again_once_pruned(
    make_kw: Callable[..., Klockwork], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store_module, "PRUNE_EVERY", 16)
    kw = make_kw()
    first = kw.gates.execute("agent", "merge", {"pr": 0}, "ev-0")
    assert first.approval_id is not None
    kw.approvals.approve(first.approval_id, "human")  # e.g. from the CLI; nobody re-runs it yet
    for i in range(1, 80):  # a mixed workload, so SQLite prunes approvals too
        r = kw.gates.execute("agent", "merge", {"i": i}, f"ev-{i}")
        assert r.approval_id is not None
        kw.approvals.approve(r.approval_id, "human")
        kw.gates.execute("agent", "merge", {"i": i}, f"ev-{i}")
        kw.gates.execute("agent", "deploy", {"i": i})
    # Approved out of band and never re-run: the pair left the window, so the
    # retry the agent makes when it comes back is decided again (a fresh
    # approval), never an error, and that approval then runs it.
    retry = kw.gates.execute("agent", "merge", {"pr": 0}, "ev-0")
    assert retry.status == "requested" and retry.approval_id is not None
    kw.approvals.approve(retry.approval_id, "human")
    assert kw.gates.execute("agent", "merge", {"pr": 0}, "ev-0").status == "executed"


def test_a_gate_decided_out_of_band_settles_while_kept(
    make_kw: Callable[..., Klockwork],
) -> None:
    kw = make_kw()
    first = kw.gates.execute("agent", "merge", {"pr": 0}, "ev-0")
    assert first.approval_id is not None
    kw.approvals.approve(first.approval_id, "human")
    for i in range(1, 5):  # within the window
        kw.gates.execute("agent", "deploy", {"i": i})
    assert kw.gates.execute("agent", "merge", {"pr": 0}, "ev-0").status == "executed"


# --------------------------------------------------------------------------- 4. audit tail
@dataclass
class Tail:
    kw: Klockwork
    early: Checkpoint  # taken when the chain was short: later dropped
    inside: Checkpoint  # taken late: still in the kept tail
    total: int


AUDIT_RETAIN = 50


def _audited_kw(key: bytes | None = KEY) -> Klockwork:
    return Klockwork(
        MemoryStore(retain_inactive=RETAIN, audit_retain=AUDIT_RETAIN),
        clock=ManualClock(T0),
        audit_key=key,
    )


def _fill(kw: Klockwork, cycles: int, start: int = 0) -> None:
    for i in range(start, start + cycles):
        _cycle(kw, f"FILE:/audited/{i}", agent="agent-a")  # lease.granted + lease.released


@pytest.fixture
def tail() -> Iterator[Tail]:
    kw = _audited_kw()
    _fill(kw, 5)
    early = kw.audit.checkpoint()
    _fill(kw, 190, start=5)
    inside = kw.audit.checkpoint()
    _fill(kw, 5, start=195)
    kw.audit.flush()
    yield Tail(kw, early, inside, total=400)
    kw.close()


def _backend(kw: Klockwork) -> Any:
    return kw.audit._backend


def test_audit_tail_stays_bounded() -> None:
    kw = _audited_kw()
    try:
        most = 0
        for round_ in range(40):
            _fill(kw, 10, start=10 * round_)
            kw.audit.flush()
            most = max(most, len(_backend(kw)._lines))
        assert AUDIT_RETAIN <= most <= AUDIT_RETAIN + AUDIT_RETAIN // 8
        assert kw.audit.checkpoint().seq == 800
    finally:
        kw.close()


def test_audit_tail_links_to_a_signed_start_and_verifies(tail: Tail) -> None:
    kw, backend = tail.kw, _backend(tail.kw)
    start = kw.audit.retained_from()
    assert start is not None and start.signature == sign_checkpoint(KEY, start.seq, start.hash)
    kept = len(backend._lines)
    assert AUDIT_RETAIN <= kept <= AUDIT_RETAIN + AUDIT_RETAIN // 8
    assert start.seq == tail.total - kept
    first = AuditEntry.from_line(backend._lines[0])
    assert first.seq == start.seq + 1 and first.prev_hash == start.hash

    result = kw.audit.verify()
    assert result.valid, result.reason
    assert result.checked == kept and result.head_seq == tail.total
    assert "retained tail" in result.reason


def test_audit_tail_without_a_key_is_unsigned_and_verifies() -> None:
    kw = _audited_kw(key=None)
    try:
        _fill(kw, 100)
        start = kw.audit.retained_from()
        assert start is not None and start.signature is None
        assert kw.audit.verify().valid
    finally:
        kw.close()


@pytest.mark.parametrize("where", [0, 1, 25, -1])
def test_tampering_a_kept_line_is_detected(tail: Tail, where: int) -> None:
    backend = _backend(tail.kw)
    index = where % len(backend._lines)
    line = backend._lines[index]
    forged = line.replace(b'"agent_id":"agent-a"', b'"agent_id":"agent-z"')
    assert forged != line
    backend._lines[index] = forged
    result = tail.kw.audit.verify()
    assert not result.valid
    # The seal covers the block as a whole: the first seq of the edited line's block.
    seal = AuditEntry.from_line(line).hash
    first = next(
        i for i, kept in enumerate(backend._lines) if AuditEntry.from_line(kept).hash == seal
    )
    assert first <= index and result.first_broken_seq == backend._offset + first + 1


def test_removing_a_kept_line_is_detected(tail: Tail) -> None:
    backend = _backend(tail.kw)
    seq = backend._offset + 11
    for column in (backend._lines, backend._ts, backend._kinds, backend._agents, backend._sessions):
        del column[10]
    result = tail.kw.audit.verify()
    assert not result.valid and result.first_broken_seq == seq


def test_exported_tail_verifies_from_its_start(tail: Tail, tmp_path: Path) -> None:
    kw = tail.kw
    path = tmp_path / "tail.jsonl"
    count = kw.audit.export(path)
    start = kw.audit.retained_from()
    assert start is not None and count == tail.total - start.seq

    ok = verify_file(path, start=start, key=KEY)
    assert ok.valid, ok.reason
    assert ok.checked == count and ok.head_seq == tail.total
    assert verify_file(path, start=start).valid  # no key: the start need not be signed
    assert verify_file(path, start=start, against=tail.inside, key=KEY).valid

    without = verify_file(path, key=KEY)
    assert not without.valid and without.first_broken_seq == 1
    assert "entry 1 is missing" in without.reason


def test_exported_tail_refuses_a_forged_start(tail: Tail, tmp_path: Path) -> None:
    kw = tail.kw
    path = tmp_path / "tail.jsonl"
    kw.audit.export(path)
    start = kw.audit.retained_from()
    assert start is not None
    unsigned = start.model_copy(update={"signature": None})
    badly_signed = start.model_copy(
        update={"signature": sign_checkpoint(b"other", start.seq, start.hash)}
    )
    other_hash = "ab" * 32
    wrong_hash = start.model_copy(
        update={"hash": other_hash, "signature": sign_checkpoint(KEY, start.seq, other_hash)}
    )
    wrong_seq = start.model_copy(
        update={"seq": start.seq - 1, "signature": sign_checkpoint(KEY, start.seq - 1, start.hash)}
    )
    for forged in (unsigned, badly_signed):
        result = verify_file(path, start=forged, key=KEY)
        assert not result.valid and "not signed with the key" in result.reason
    for forged in (wrong_hash, wrong_seq):  # properly signed, but not where the tail begins
        result = verify_file(path, start=forged, key=KEY)
        assert not result.valid and result.checked == 0
    tampered = path.read_bytes().replace(b'"agent_id":"agent-a"', b'"agent_id":"agent-z"', 1)
    path.write_bytes(tampered)
    assert not verify_file(path, start=start, key=KEY).valid


def test_checkpoints_against_a_retained_tail(tail: Tail) -> None:
    kw = tail.kw
    start = kw.audit.retained_from()
    assert start is not None
    assert tail.early.seq < start.seq < tail.inside.seq < tail.total  # the premise

    old = kw.audit.verify(against=tail.early)
    assert old.valid, old.reason
    assert "dropped by retention and could not be compared" in old.reason

    inside = kw.audit.verify(against=tail.inside)
    assert (
        inside.valid and f"consistent with the checkpoint at seq {tail.inside.seq}" in inside.reason
    )
    head = kw.audit.checkpoint()
    assert kw.audit.verify(against=head).valid

    rewritten = "cd" * 32
    lying = tail.inside.model_copy(
        update={"hash": rewritten, "signature": sign_checkpoint(KEY, tail.inside.seq, rewritten)}
    )
    result = kw.audit.verify(against=lying)
    assert not result.valid and result.first_broken_seq == tail.inside.seq
    at_start = start.model_copy(
        update={"hash": rewritten, "signature": sign_checkpoint(KEY, start.seq, rewritten)}
    )
    assert not kw.audit.verify(against=at_start).valid
    unsigned = tail.inside.model_copy(update={"signature": None})
    assert not kw.audit.verify(against=unsigned).valid
    beyond = head.model_copy(
        update={"seq": head.seq + 5, "signature": sign_checkpoint(KEY, head.seq + 5, head.hash)}
    )
    truncated = kw.audit.verify(against=beyond)
    assert not truncated.valid and "truncated" in truncated.reason


def test_query_pages_through_the_tail(tail: Tail) -> None:
    kw = tail.kw
    offset = _backend(kw)._offset
    seqs: list[int] = []
    cursor = None
    while True:
        page = kw.audit.query(cursor=cursor, limit=7)
        seqs += [e.seq for e in page.entries]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seqs == list(range(offset + 1, tail.total + 1))
    released = kw.audit.query(kind="lease.released", limit=1000).entries
    assert released and all(e.seq > offset and e.kind == "lease.released" for e in released)
    assert len(kw.audit.query(agent_id="agent-a", limit=1000).entries) == tail.total - offset


def test_verify_is_not_fooled_by_a_drop_during_verification(tail: Tail) -> None:
    kw, backend = tail.kw, _backend(tail.kw)
    dropped = backend.dropped
    fired: list[bool] = []

    def dropped_then_more_writes() -> Any:
        # What another thread's decisions do between retained_from() and lines().
        answer = dropped()
        if not fired:
            fired.append(True)
            _fill(kw, AUDIT_RETAIN, start=10_000)
            kw.audit.flush()
        return answer

    backend.dropped = dropped_then_more_writes
    result = kw.audit.verify()
    assert fired
    assert result.valid, result.reason


# --------------------------------------------------------------------------- 5. property
FENCE_RESOURCES = (
    "FILE:/",
    "FILE:/a",
    "FILE:/a/b",
    "FILE:/a/b/c",
    "FILE:/a/c",
    "FILE:/d",
    "FILE:/e",
    "TABLE:t",
    "TABLE:u",
)
PROBES = (*FENCE_RESOURCES, "FILE:/a/b/x", "FILE:/z")
FENCE_PREDICATES = ("MUTATES", "CONSUMES", "DEPENDS_ON")
FENCE_AGENTS = ("a0", "a1", "a2")


def _under(x: str, y: str) -> bool:
    """``x`` strictly inside directory ``y`` (FILE paths only)."""
    if not (x.startswith("FILE:") and y.startswith("FILE:")) or x == y:
        return False
    return x.startswith(y if y.endswith("/") else y + "/")


@dataclass
class Grant:
    lease_id: str
    key: str
    token: int
    active: bool = True


class FenceMachine(RuleBasedStateMachine):
    """A store with tiny retention against a reference that never forgets.

    Retention may only make ``check_fencing`` stricter: it must never accept
    a token the reference refuses, and it must accept every active lease's
    token on its own key. The memory store's fence limit is lowered (white
    box) so that a handful of resources is enough to prune fencing history.
    """

    store_kind = "memory"
    pruned_examples = 0  # examples in which the fence floor rose (not vacuous)

    def __init__(self) -> None:
        super().__init__()
        self.dir: str | None = None
        if self.store_kind == "memory":
            store: MemoryStore | SqliteStore = MemoryStore(retain_inactive=2)
            store._fence_limit = 4
        else:
            self.dir = tempfile.mkdtemp(prefix="kw-retention-")
            store = SqliteStore(os.path.join(self.dir, "kw.db"), retain_inactive=2)
        self.kw = Klockwork(store, clock=ManualClock(T0), audit_leases=False)
        self.grants: list[Grant] = []

    def _reference_accepts(self, key: str, token: int) -> bool:
        if any(g.active and g.key == key and g.token == token for g in self.grants):
            return True
        related = [
            g.token for g in self.grants if g.key == key or _under(g.key, key) or _under(key, g.key)
        ]
        return not related or max(related) <= token

    def _check(self, resource: str, token: int) -> None:
        key = parse_intents((resource, "CONSUMES"))[0].key
        assert key == resource
        if not _stale(self.kw, resource, token):
            assert self._reference_accepts(key, token), (
                f"retention accepted stale token {token} on {resource} (floor {_floor(self.kw)})"
            )

    @rule(
        agent=st.sampled_from(FENCE_AGENTS),
        intents=st.lists(
            st.tuples(st.sampled_from(FENCE_RESOURCES), st.sampled_from(FENCE_PREDICATES)),
            min_size=1,
            max_size=2,
            unique_by=lambda i: i[0],
        ),
    )
    def acquire(self, agent: str, intents: list[tuple[str, str]]) -> None:
        verdict = self.kw.leases.try_acquire(agent, "s", intents, ttl_ms=HOUR_MS)
        for lease in verdict.leases:
            self.grants.append(Grant(lease.lease_id, lease.resource, lease.fencing_token))

    @precondition(lambda self: any(g.active for g in self.grants))
    @rule(data=st.data(), revoke=st.booleans())
    def end(self, data: st.DataObject, revoke: bool) -> None:
        grant = data.draw(st.sampled_from([g for g in self.grants if g.active]))
        if revoke:
            assert self.kw.leases.revoke(grant.lease_id, "test")
        else:
            assert self.kw.leases.release(grant.lease_id)
        grant.active = False

    @precondition(lambda self: bool(self.grants))
    @rule(resource=st.sampled_from(PROBES), data=st.data())
    def check(self, resource: str, data: st.DataObject) -> None:
        self._check(resource, data.draw(st.sampled_from([g.token for g in self.grants])))

    @invariant()
    def active_tokens_pass(self) -> None:
        for g in self.grants:
            if g.active:
                self.kw.leases.check_fencing(g.key, g.token)

    def teardown(self) -> None:
        try:
            tokens = sorted({g.token for g in self.grants})
            for resource in PROBES:
                for token in tokens:
                    self._check(resource, token)
            if _floor(self.kw):
                type(self).pruned_examples += 1
        finally:
            self.kw.close()
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)


def test_memory_fencing_with_retention_is_never_laxer_than_without() -> None:
    class Machine(FenceMachine):
        store_kind = "memory"

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=60,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    assert Machine.pruned_examples > 0  # the property was exercised with pruning


def test_sqlite_fencing_with_retention_is_never_laxer_than_without(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sqlite_store_module, "PRUNE_EVERY", 4)  # prune every 4th grant

    class Machine(FenceMachine):
        store_kind = "sqlite"

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=20,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    assert Machine.pruned_examples > 0


# --------------------------------------------------------------------------- 6. SQLite size
def test_sqlite_file_stays_small_under_lease_churn(tmp_path: Path) -> None:
    path = tmp_path / "kw.db"
    retain = 100
    kw = Klockwork(SqliteStore(path, retain_inactive=retain), audit_leases=False)
    try:
        for i in range(5000):
            _cycle(kw, f"FILE:/repo/src/module_{i}.py")
        rows = _lease_rows(kw)
        assert rows <= retain + PRUNE_EVERY
        assert _floor(kw) > 0
        db = path.stat().st_size
        wal_path = Path(f"{path}-wal")
        wal = wal_path.stat().st_size if wal_path.exists() else 0
        # Measured: ~320 KiB with pruning, ~1.1 MiB without; the WAL cycles at ~4 MiB.
        assert db < 640 * 1024, db
        assert db + wal < 8 * 1024 * 1024, (db, wal)
    finally:
        kw.close()


# --------------------------------------------------------------------------- 7. agents
def test_memory_forgets_idle_agents_it_only_saw_in_requests() -> None:
    store = MemoryStore(retain_inactive=10)
    kw = Klockwork(store, clock=ManualClock(T0), audit_leases=False)
    kw.register_agent("registered", priority=7)
    kw.leases.try_acquire("holder", "s", ("FILE:/kept", "MUTATES"), ttl_ms=HOUR_MS)
    holder_age = kw.get_agent("holder").priority  # type: ignore[union-attr]
    kw.register_agent("revoked")
    kw.revoke_agent("revoked")
    for i in range(5_000):
        v = kw.leases.try_acquire(f"passer-{i}", "s", (f"FILE:/p/{i}", "MUTATES"))
        kw.leases.release(v.lease.lease_id)  # type: ignore[union-attr]
    assert len(store._agents) <= store._agent_limit + 1
    assert kw.get_agent("passer-0") is None  # idle and only ever seen in a request
    assert kw.get_agent("registered").priority == 7  # type: ignore[union-attr]
    assert kw.get_agent("holder").priority == holder_age  # type: ignore[union-attr]
    with pytest.raises(CapabilityError):  # a revocation is never forgotten
        kw.leases.try_acquire("revoked", "s", ("FILE:/r", "MUTATES"))
    kw.close()
