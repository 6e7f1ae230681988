"""Regression tests: a revoked agent (and its delegates) can take no lease, renew none and
approve nothing; an agent's lineage (siblings included) never decides its requests.

Finding 10 of issue 9 (probes ``repro_revoked_delegate.py``, ``p6_approvals.py``):
revoked delegates still leased, renewed and approved; siblings approved each
other's requests; delegates created while their parent was being revoked
survived active.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from klockwork import (
    ApprovalStatus,
    Delegation,
    Klockwork,
    KlockworkError,
    LeaseState,
    MemoryStore,
    NotAnApproverError,
    Policy,
    SqliteStore,
)


@pytest.fixture(params=["memory", "sqlite"])
def kw(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Klockwork]:
    store = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "kw.db")
    engine = Klockwork(store)
    engine.policies.add(Policy(name="docs", action="docs.*", effect="allow"))
    engine.policies.add(
        Policy(name="merge", action="merge", effect="require_approval", approval_timeout_s=3600)
    )
    engine.register_agent("lead", capabilities=["docs.*", "merge"])
    yield engine
    engine.close()


def _delegate(
    kw: Klockwork, parent: str, name: str, caps: list[str], ttl_s: float = 600
) -> Delegation:
    return kw.delegate(parent, name, caps, ttl_s=ttl_s).__enter__()


def _revoke_child(kw: Klockwork, child: Delegation) -> None:
    kw.revoke_agent(child.agent_id)


def _revoke_parent(kw: Klockwork, child: Delegation) -> None:
    kw.revoke_agent(child.parent_id)


REVOCATIONS = pytest.mark.parametrize(
    "revoke", [_revoke_child, _revoke_parent], ids=["itself", "its-parent"]
)


@REVOCATIONS
def test_a_revoked_delegate_takes_no_lease_and_renews_none(
    kw: Klockwork, revoke: Callable[[Klockwork, Delegation], None]
) -> None:
    child = _delegate(kw, "lead", "writer", ["docs.*", "merge"])
    old = kw.leases.try_acquire(child.agent_id, "s", ("FILE:/docs/a.md", "MUTATES")).lease
    revoke(kw, child)

    ended = kw.leases.get(old.lease_id)
    assert ended is not None and ended.state is not LeaseState.ACTIVE
    with pytest.raises(KlockworkError):
        kw.leases.heartbeat(old.lease_id)
    with pytest.raises(KlockworkError):
        kw.leases.validate(old.lease_id)
    refused: list[Callable[[], object]] = [
        lambda: kw.leases.try_acquire(child.agent_id, "s", ("FILE:/docs/b.md", "MUTATES")),
        lambda: kw.leases.try_acquire(child.agent_id, "s2", ("FILE:/docs/a.md", "MUTATES")),
        lambda: kw.leases.acquire(
            child.agent_id, "s", ("FILE:/docs/c.md", "MUTATES"), timeout_s=0.5
        ),
        lambda: kw.lease(child.agent_id, "s", "FILE:/docs", timeout_s=0.5).__enter__(),
    ]
    for call in refused:
        with pytest.raises(KlockworkError):
            call()
    assert kw.leases.list(agent_id=child.agent_id) == []
    assert kw.gates.execute(child.agent_id, "docs.write").status == "denied"
    # Someone else can take what it held, at once.
    assert kw.leases.try_acquire("other", "s", ("FILE:/docs/a.md", "MUTATES")).granted


@REVOCATIONS
def test_a_revoked_delegate_decides_nothing(
    kw: Klockwork, revoke: Callable[[Klockwork, Delegation], None]
) -> None:
    child = _delegate(kw, "lead", "reviewer", ["docs.*", "merge"])
    revoke(kw, child)
    for decide in (kw.approvals.approve, kw.approvals.deny):
        approval_id = kw.gates.execute("someone-else", "merge").approval_id
        assert approval_id is not None
        with pytest.raises(NotAnApproverError):
            decide(approval_id, child.agent_id)
        approval = kw.approvals.get(approval_id)
        assert approval.status is ApprovalStatus.PENDING
        assert approval.decisions == []
    # An unrelated, standing approver still can.
    assert kw.approvals.approve(approval_id, "alice").status is ApprovalStatus.APPROVED


def test_no_one_in_the_requesters_lineage_decides_its_request(kw: Klockwork) -> None:
    a = _delegate(kw, "lead", "a", ["merge"])
    b = _delegate(kw, "lead", "b", ["merge"])
    a_sub = _delegate(kw, a.agent_id, "sub", ["merge"], ttl_s=60)
    kin = {
        a.agent_id: [b.agent_id, "lead", a_sub.agent_id, a.agent_id],
        b.agent_id: [a.agent_id],  # siblings, both ways
        a_sub.agent_id: [a.agent_id, "lead"],
    }
    for requester, deciders in kin.items():
        for decider in deciders:
            for decide in (kw.approvals.approve, kw.approvals.deny):
                approval_id = kw.gates.execute(requester, "merge").approval_id
                assert approval_id is not None
                with pytest.raises(NotAnApproverError):
                    decide(approval_id, decider)
                assert kw.approvals.get(approval_id).status is ApprovalStatus.PENDING
    # Someone outside the lineage decides as usual.
    approval_id = kw.gates.execute(a_sub.agent_id, "merge").approval_id
    assert approval_id is not None
    assert kw.approvals.approve(approval_id, "alice").status is ApprovalStatus.APPROVED


def _revoke_while_delegating(kw: Klockwork, parent: str) -> list[str]:
    """Two threads keep delegating under ``parent``; it is revoked meanwhile. Returns the
    ids of every delegate that was created."""
    made: list[str] = []
    made_lock = threading.Lock()
    stop = threading.Event()
    three = threading.Event()

    def spawn(worker: int) -> None:
        i = 0
        while not stop.is_set() and i < 500:
            try:
                child = _delegate(kw, parent, f"k{worker}-{i}", ["docs.x"])
            except KlockworkError:
                pass  # refused: the parent is revoked
            else:
                with made_lock:
                    made.append(child.agent_id)
                    if len(made) >= 3:
                        three.set()
            i += 1

    threads = [threading.Thread(target=spawn, args=(w,)) for w in range(2)]
    for thread in threads:
        thread.start()
    try:
        assert three.wait(20)
        kw.revoke_agent(parent)  # while delegates are being created
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    return made


def test_delegates_created_while_their_parent_is_revoked_end_up_revoked(kw: Klockwork) -> None:
    for trial in range(5):
        parent = f"p{trial}"
        kw.register_agent(parent, capabilities=["docs.*"])
        made = _revoke_while_delegating(kw, parent)
        assert made
        alive = [c for c in made if kw.gates.can_i(c, "docs.x").status == "executed"]
        assert alive == [], f"{len(alive)} of {len(made)} delegates of revoked {parent} act"
        with pytest.raises(KlockworkError):
            _delegate(kw, parent, "late", ["docs.x"])
        for child in made[-3:]:
            with pytest.raises(KlockworkError):
                kw.leases.try_acquire(child, "s", ("FILE:/docs/x.md", "MUTATES"))
