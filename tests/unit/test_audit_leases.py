"""Lease decisions in the engine's audit trail (``Klockwork(audit_leases=True)``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from klockwork import InvalidRequestError, Klockwork, LeaseTimeoutError, ManualClock, MemoryStore
from klockwork.core.audit.chain import to_json_value
from klockwork.core.model import GovernanceEvent

LEASE_KINDS = {"lease.granted", "lease.denied", "lease.released", "lease.expired", "lease.revoked"}


@pytest.fixture(params=["memory", "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Klockwork]:
    clock = ManualClock(1_700_000_000_000)
    if request.param == "memory":
        kw = Klockwork(clock=clock)
    else:
        kw = Klockwork.open(f"sqlite:///{tmp_path / 'kw.db'}", clock=clock)
    yield kw
    kw.close()


def _entries(kw: Klockwork) -> list[Any]:
    return kw.audit.query(limit=1000).entries


def test_every_lease_decision_is_audited_as_the_event_says(engine: Klockwork) -> None:
    kw, clock = engine, engine.clock
    assert isinstance(clock, ManualClock)
    events: list[GovernanceEvent] = []
    kw.add_listener(events.append)
    kw.audit._wake_needed = False  # keep the writer asleep: entries are written at the end
    kw.register_agent("old", 1)
    kw.register_agent("young", 2)
    held = kw.leases.try_acquire("young", "s-y", ("FILE:/a", "MUTATES"), 1_000).lease
    clock.advance(10)
    kw.leases.heartbeat(held.lease_id, 50_000)  # changes the store's record, not the grant
    assert not kw.leases.try_acquire("old", "s-o", ("FILE:/a", "CONSUMES"), 1_000).granted
    assert not kw.leases.try_acquire("young", "s-y2", [("FILE:/a/b", "MUTATES")]).granted
    kw.leases.revoke(held.lease_id, "taken back")
    two = kw.leases.try_acquire("old", "s-o", [("FILE:/x", "MUTATES"), ("TABLE:t", "CONSUMES")])
    kw.leases.release(two.leases[0].lease_id)
    kw.leases.try_acquire("young", "s-y", ("FILE:/z", "DELETES"), 5)
    clock.advance(100)
    kw.leases.sweep()
    kw.audit._wake_needed = True
    kw.audit.record("tool.end", None, None)  # wakes the writer

    entries = [e for e in _entries(kw) if e.kind in LEASE_KINDS]
    expected = [(e.kind, e.ts, e.agent_id, e.session_id, to_json_value(e.data)) for e in events]
    assert [(e.kind, e.ts, e.agent_id, e.session_id, e.data) for e in entries] == expected
    kinds = [e.kind for e in entries]
    assert kinds.count("lease.granted") == 4 and kinds.count("lease.denied") == 2
    assert {"lease.revoked", "lease.released", "lease.expired"} <= set(kinds)
    assert entries[0].data["expires_at"] == held.expires_at  # as granted, before the heartbeat
    revoked = next(e for e in entries if e.kind == "lease.revoked")
    assert revoked.data["reason"] == "taken back"
    assert kw.audit.verify().valid


def test_lease_entries_are_recorded_in_decision_order_from_many_threads(
    engine: Klockwork,
) -> None:
    kw = engine
    threads, rounds = 6, 150 if isinstance(kw.store, MemoryStore) else 30
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(rounds):
                lease = kw.leases.try_acquire(f"agent-{t}", "s", (f"FILE:/t{t}", "MUTATES")).lease
                kw.audit.record("tool.end", f"agent-{t}", "s", {"i": i})
                kw.leases.release(lease.lease_id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    total = threads * rounds * 3
    result = kw.audit.verify()
    assert result.valid and result.checked == total
    for t in range(threads):
        mine = kw.audit.query(agent_id=f"agent-{t}", limit=1000).entries
        assert [e.kind for e in mine] == ["lease.granted", "tool.end", "lease.released"] * rounds
        assert [e.data["i"] for e in mine if e.kind == "tool.end"] == list(range(rounds))
        grants = [e.data["fencing_token"] for e in mine if e.kind == "lease.granted"]
        assert grants == sorted(grants)


def test_audit_leases_false_leaves_lease_decisions_out() -> None:
    with Klockwork(audit_leases=False) as kw:
        lease = kw.leases.try_acquire("a", "s", ("FILE:/a", "MUTATES")).lease
        assert not kw.leases.try_acquire("b", "s", ("FILE:/a", "MUTATES")).granted
        kw.leases.release(lease.lease_id)
        kw.audit.record("tool.end", "a", "s")
        assert [e.kind for e in _entries(kw)] == ["tool.end"]


@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_audit_leases_must_be_a_bool(value: Any) -> None:
    with pytest.raises(InvalidRequestError) as info:
        Klockwork(audit_leases=value)
    assert info.value.argument == "audit_leases"


def test_a_blocking_acquire_leaves_one_entry_however_often_it_retried(engine: Klockwork) -> None:
    """DIE back-offs and WAIT wake-ups are not decisions: one outcome per acquire call."""
    kw, clock = engine, engine.clock
    assert isinstance(clock, ManualClock)
    events: list[GovernanceEvent] = []
    kw.add_listener(events.append)
    kw.register_agent("old", 1)
    kw.register_agent("young", 2)
    held = kw.leases.try_acquire("old", "s-o", ("FILE:/a", "MUTATES"), 60_000).lease
    done = threading.Event()
    outcome: list[Any] = []

    def young() -> None:  # DIEs against "old" until it releases
        outcome.append(kw.leases.acquire("young", "s-y", ("FILE:/a", "MUTATES"), 1_000, 60))
        done.set()

    worker = threading.Thread(target=young)
    worker.start()
    while kw.leases.waiting == 0:  # young is blocked: it retries as time passes
        done.wait(0.001)
    for _ in range(20):
        clock.advance(50)
        done.wait(0.002)
    kw.leases.release(held.lease_id)
    worker.join(10)
    assert outcome and outcome[0].granted
    # A timeout: one denial, however many tries it took.
    with pytest.raises(LeaseTimeoutError):
        kw.leases.acquire("old", "s-o2", ("FILE:/a", "MUTATES"), 1_000, timeout_s=0)
    kw.audit.flush()

    lease_entries = [e for e in _entries(kw) if e.kind in LEASE_KINDS]
    kinds = [(e.kind, e.agent_id) for e in lease_entries]
    assert kinds == [
        ("lease.granted", "old"),
        ("lease.released", "old"),
        ("lease.granted", "young"),
        ("lease.denied", "old"),
    ]
    granted = lease_entries[2].data
    assert granted["attempts"] >= 2 and granted["waited_ms"] >= 50
    denied = lease_entries[3].data
    assert (denied["attempts"], denied["timed_out"], denied["verdict"]) == (1, True, "WAIT")
    assert [e.kind for e in events] == [k for k, _ in kinds]  # the event stream agrees
    # a single try still leaves its own denial
    assert not kw.leases.try_acquire("old", "s-o3", ("FILE:/a", "MUTATES")).granted
    kw.audit.flush()
    last = [e for e in _entries(kw) if e.kind in LEASE_KINDS][-1]
    assert last.kind == "lease.denied" and "attempts" not in last.data
