"""Approvals at the engine level (``kw.approvals`` + ``kw.gates.gate``), on both stores.

Deciding, denying, expiring with nobody waiting, the caller's own timeout,
who may decide (never the requester, only listed approvers, quorum of
distinct approvers), waking waiters in this process, in another process and
in asyncio without blocking the loop, and closing the engine under a waiter.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from support import run_spawned

from klockwork import (
    ApprovalClosedError,
    ApprovalNotFoundError,
    ApprovalStatus,
    ApprovalTimeoutError,
    EventLoopBlockedError,
    GateDeniedError,
    InvalidRequestError,
    Klockwork,
    ManualClock,
    NotAnApproverError,
    Policy,
    StoreUnavailableError,
)

from .test_gates import entries

Engine = Callable[..., Klockwork]
REAL_S = 10.0


def until(condition: Callable[[], bool], what: str = "condition") -> None:
    """Poll (real time) until ``condition()``; fail after a while."""
    deadline = time.monotonic() + REAL_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as p:
        yield p


def ask(kw: Klockwork, **policy: Any) -> None:
    kw.policies.add(
        Policy(**{"name": "ask", "action": "deploy", "effect": "require_approval", **policy})
    )


def pending_id(kw: Klockwork) -> str:
    until(lambda: len(kw.approvals.list()) == 1, "a pending approval")
    return kw.approvals.list()[0].approval_id


# -- deciding -------------------------------------------------------------------------


def test_approve_lets_the_waiting_gate_execute_once(
    engine: Engine, pool: ThreadPoolExecutor
) -> None:
    kw = engine()
    ask(kw)
    waiting: Future[Any] = pool.submit(kw.gates.gate, "a1", "deploy", {"env": "prod"}, "e1")
    approval_id = pending_id(kw)
    approval = kw.approvals.approve(approval_id, "alice", "lgtm")
    assert approval.status is ApprovalStatus.APPROVED
    result = waiting.result(timeout=REAL_S)
    assert (result.status, result.approval_id) == ("executed", approval_id)
    assert [e.kind for e in entries(kw)] == [
        "action.requested",
        "approval.decided",
        "action.executed",
    ]
    # the same event_id afterwards: the settled outcome, nothing new recorded
    assert kw.gates.gate("a1", "deploy", {"env": "prod"}, "e1").status == "executed"
    assert kw.gates.execute("a1", "deploy", {"env": "prod"}, "e1").status == "executed"
    assert len(entries(kw, "action.executed")) == 1
    decided = entries(kw, "approval.decided")[0]
    assert (decided.agent_id, decided.data["verdict"]) == ("alice", "approve")


def test_deny_raises_denied_by_reviewer(engine: Engine, pool: ThreadPoolExecutor) -> None:
    kw = engine()
    ask(kw)
    waiting = pool.submit(kw.gates.gate, "a1", "deploy", None, "e1")
    kw.approvals.deny(pending_id(kw), "bob", "not today")
    with pytest.raises(GateDeniedError) as err:
        waiting.result(timeout=REAL_S)
    assert err.value.reason == "DENIED_BY_REVIEWER"
    assert err.value.policy == "ask"
    assert err.value.approval_id is not None
    assert [e.kind for e in entries(kw)] == [
        "action.requested",
        "approval.decided",
        "action.denied",
    ]
    with pytest.raises(ApprovalClosedError):
        kw.approvals.approve(err.value.approval_id, "carol")


def test_quorum_two_needs_two_distinct_approvers(engine: Engine) -> None:
    kw = engine()
    ask(kw, quorum=2)
    result = kw.gates.execute("a1", "deploy", event_id="e1")
    aid = result.approval_id or ""
    assert kw.approvals.approve(aid, "alice").status is ApprovalStatus.PENDING
    assert kw.approvals.approve(aid, "alice").status is ApprovalStatus.PENDING  # one vote each
    with pytest.raises(InvalidRequestError):
        kw.approvals.deny(aid, "alice")  # contradicting one's own vote
    assert kw.gates.execute("a1", "deploy", event_id="e1").status == "requested"
    assert kw.approvals.approve(aid, "bob").status is ApprovalStatus.APPROVED
    assert kw.gates.gate("a1", "deploy", event_id="e1").status == "executed"
    assert len(entries(kw, "approval.decided")) == 2


def test_one_deny_decides_even_with_quorum(engine: Engine) -> None:
    kw = engine()
    ask(kw, quorum=3)
    aid = kw.gates.execute("a1", "deploy", event_id="e1").approval_id or ""
    kw.approvals.approve(aid, "alice")
    assert kw.approvals.deny(aid, "bob").status is ApprovalStatus.DENIED
    with pytest.raises(GateDeniedError) as err:
        kw.gates.gate("a1", "deploy", event_id="e1")
    assert err.value.reason == "DENIED_BY_REVIEWER"


def test_nobody_approves_their_own_request_and_only_listed_approvers_decide(
    engine: Engine,
) -> None:
    kw = engine()
    ask(kw, approvers=["alice", "a1", "team-*"])
    aid = kw.gates.execute("a1", "deploy").approval_id or ""
    with pytest.raises(NotAnApproverError):
        kw.approvals.approve(aid, "a1")  # the requester, even though listed
    with pytest.raises(NotAnApproverError):
        kw.approvals.deny(aid, "a1")
    with pytest.raises(NotAnApproverError):
        kw.approvals.approve(aid, "mallory")
    assert kw.approvals.get(aid).decisions == []
    assert entries(kw, "approval.decided") == []
    assert kw.approvals.approve(aid, "team-ops").status is ApprovalStatus.APPROVED


def test_a_refused_self_approval_says_why_in_plain_words(engine: Engine) -> None:
    kw = engine()
    ask(kw, approvers=["*"])
    aid = kw.gates.execute("merger", "deploy").approval_id or ""
    with pytest.raises(NotAnApproverError) as own:
        kw.approvals.approve(aid, "merger")
    assert str(own.value) == (
        f"'merger' requested approval {aid!r} and cannot decide its own request"
    )
    with kw.delegate("merger", "helper", ["deploy"], ttl_s=60) as child:
        with pytest.raises(NotAnApproverError, match="is a delegate of the requester 'merger'"):
            kw.approvals.approve(aid, child.agent_id)
        other = kw.gates.execute(child.agent_id, "deploy").approval_id or ""
        with pytest.raises(NotAnApproverError, match="delegated to the requester 'merger/helper'"):
            kw.approvals.approve(other, "merger")


async def test_sync_gate_and_wait_refuse_to_freeze_a_running_loop(engine: Engine) -> None:
    """On a loop's thread a sync wait would stop every task: refuse, opening nothing."""
    kw = engine()
    ask(kw)
    with pytest.raises(EventLoopBlockedError) as info:
        kw.gates.gate("a1", "deploy")
    assert "await kw.gates.agate(...)" in str(info.value)
    assert kw.approvals.list() == []  # checked before an approval was opened
    assert entries(kw, "action.requested") == []
    aid = kw.gates.execute("a1", "deploy").approval_id or ""
    with pytest.raises(EventLoopBlockedError, match=r"await kw\.approvals\.await_") as waited:
        kw.approvals.wait(aid, timeout_s=5)
    assert waited.value.approval_id == aid
    kw.approvals.approve(aid, "alice")
    assert kw.approvals.wait(aid).status is ApprovalStatus.APPROVED  # decided: no wait
    kw.policies.add(Policy(name="reads", action="read", effect="allow"))
    assert kw.gates.gate("a1", "read").status == "executed"  # allowed: no wait either


def test_unknown_approval_and_bad_arguments(engine: Engine) -> None:
    kw = engine()
    with pytest.raises(ApprovalNotFoundError):
        kw.approvals.get("apr_nope")
    with pytest.raises(ApprovalNotFoundError):
        kw.approvals.approve("apr_nope", "alice")
    with pytest.raises(InvalidRequestError) as err:
        kw.approvals.list(status="maybe")
    assert err.value.argument == "status"
    with pytest.raises(InvalidRequestError) as err:
        kw.approvals.wait("apr_x", timeout_s=-1)
    assert err.value.argument == "timeout_s"
    with pytest.raises(InvalidRequestError) as err:
        kw.approvals.approve("apr_x", "")
    assert err.value.argument == "approver"


# -- expiry and timeouts --------------------------------------------------------------


def test_expires_with_nobody_waiting_and_is_audited_once(
    engine: Engine, clock: ManualClock
) -> None:
    kw = engine()
    ask(kw, approval_timeout_s=60)
    aid = kw.gates.execute("a1", "deploy", event_id="e1").approval_id or ""
    clock.advance(59_999)
    assert kw.approvals.get(aid).status is ApprovalStatus.PENDING
    clock.advance(1)  # the deadline is exclusive
    for _ in range(3):
        approval = kw.approvals.get(aid)
        assert approval.status is ApprovalStatus.EXPIRED
        assert approval.decided_at_ms == approval.deadline_ms
    assert [a.approval_id for a in kw.approvals.list(status="expired")] == [aid]
    assert kw.approvals.list() == []
    assert kw.approvals.sweep() == []  # already expired
    with pytest.raises(ApprovalClosedError):
        kw.approvals.approve(aid, "alice")  # too late
    with pytest.raises(GateDeniedError) as err:
        kw.gates.gate("a1", "deploy", event_id="e1")
    assert err.value.reason == "APPROVAL_EXPIRED"
    (expired,) = entries(kw, "approval.expired")
    assert expired.data["approval_id"] == aid
    assert len(entries(kw, "action.denied")) == 1


def test_sweep_expires_what_is_due(engine: Engine, clock: ManualClock) -> None:
    kw = engine()
    ask(kw, approval_timeout_s=1)
    ids = {kw.gates.execute(f"a{i}", "deploy").approval_id for i in range(3)}
    clock.advance(1000)
    assert {a.approval_id for a in kw.approvals.sweep()} == ids
    assert kw.approvals.sweep() == []
    assert len(entries(kw, "approval.expired")) == 3


def test_on_timeout_allow_executes_after_expiry(engine: Engine, clock: ManualClock) -> None:
    kw = engine()
    ask(kw, approval_timeout_s=5, on_timeout="allow")
    assert kw.gates.execute("a1", "deploy", event_id="e1").status == "requested"
    clock.advance(5_000)
    result = kw.gates.gate("a1", "deploy", event_id="e1")
    assert result.status == "executed"
    assert kw.approvals.get(result.approval_id or "").status is ApprovalStatus.EXPIRED
    assert [e.kind for e in entries(kw)] == [
        "action.requested",
        "approval.expired",
        "action.executed",
    ]


def test_a_waiter_wakes_when_the_deadline_passes(
    engine: Engine, clock: ManualClock, pool: ThreadPoolExecutor
) -> None:
    kw = engine()
    ask(kw, approval_timeout_s=30)
    waiting = pool.submit(kw.gates.gate, "a1", "deploy")
    pending_id(kw)
    until(lambda: clock.pending_timers >= 1, "the waiter's timer")
    clock.advance(30_000)
    with pytest.raises(GateDeniedError) as err:
        waiting.result(timeout=REAL_S)
    assert err.value.reason == "APPROVAL_EXPIRED"
    assert len(entries(kw, "approval.expired")) == 1


def test_gate_timeout_raises_and_the_approval_stays_pending(
    engine: Engine, clock: ManualClock, pool: ThreadPoolExecutor
) -> None:
    kw = engine()
    ask(kw)
    with pytest.raises(ApprovalTimeoutError) as err:
        kw.gates.gate("a1", "deploy", event_id="e1", timeout_s=0)
    aid = err.value.approval_id or ""
    assert kw.approvals.get(aid).status is ApprovalStatus.PENDING
    waiting = pool.submit(kw.gates.gate, "a1", "deploy", None, "e1", 5)
    until(lambda: clock.pending_timers >= 1, "the waiter's timer")
    clock.advance(5_000)
    with pytest.raises(ApprovalTimeoutError):
        waiting.result(timeout=REAL_S)
    assert kw.approvals.get(aid).status is ApprovalStatus.PENDING
    assert len(kw.approvals.list(status=None)) == 1
    kw.approvals.approve(aid, "alice")
    assert kw.gates.gate("a1", "deploy", event_id="e1").status == "executed"


# -- waking -------------------------------------------------------------------------


def test_an_approval_from_another_thread_wakes_the_waiter_promptly(
    engine: Engine, pool: ThreadPoolExecutor
) -> None:
    kw = engine()
    ask(kw)
    aid = kw.gates.execute("a1", "deploy").approval_id or ""
    waiting = pool.submit(kw.approvals.wait, aid)
    time.sleep(0.05)  # let it go to sleep
    t0 = time.monotonic()
    kw.approvals.approve(aid, "alice")
    assert waiting.result(timeout=REAL_S).status is ApprovalStatus.APPROVED
    assert time.monotonic() - t0 < 0.5


def test_closing_the_engine_wakes_waiters(engine: Engine, pool: ThreadPoolExecutor) -> None:
    kw = engine()
    ask(kw)
    waiters = [pool.submit(kw.gates.gate, f"a{i}", "deploy") for i in range(2)]
    until(lambda: len(kw.approvals.list()) == 2, "two pending approvals")
    time.sleep(0.02)
    kw.close()
    for w in waiters:
        with pytest.raises(StoreUnavailableError):
            w.result(timeout=REAL_S)


async def test_await_does_not_block_the_loop(engine: Engine) -> None:
    kw = engine()
    ask(kw)
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    tick_task = asyncio.create_task(ticker())
    gate = asyncio.create_task(kw.gates.agate("a1", "deploy", {"x": 1}, "e1"))
    await asyncio.sleep(0.05)
    before = ticks
    assert before > 5 and not gate.done()
    aid = (await asyncio.to_thread(kw.approvals.list))[0].approval_id
    await asyncio.sleep(0.05)
    assert ticks > before + 5  # the loop kept running while the gate waited
    await asyncio.to_thread(kw.approvals.approve, aid, "alice")
    result = await asyncio.wait_for(gate, REAL_S)
    assert result.status == "executed"
    stop.set()
    await tick_task
    assert len(entries(kw, "action.executed")) == 1


async def test_await_raises_denied_and_times_out(engine: Engine) -> None:
    kw = engine()
    ask(kw)
    with pytest.raises(ApprovalTimeoutError):
        await kw.gates.agate("a1", "deploy", event_id="e1", timeout_s=0)
    aid = kw.approvals.list()[0].approval_id
    await kw.approvals.adeny(aid, "bob", "no")
    with pytest.raises(GateDeniedError) as err:
        await kw.gates.agate("a1", "deploy", event_id="e1")
    assert err.value.reason == "DENIED_BY_REVIEWER"
    assert (await kw.approvals.await_(aid)).status is ApprovalStatus.DENIED


def _approve_when_pending(url: str, start: Any) -> None:
    kw = Klockwork.open(url)
    try:
        start.wait(60)
        deadline = time.monotonic() + 30
        while not kw.approvals.list():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.1)  # the other process is asleep by now
        kw.approvals.approve(kw.approvals.list()[0].approval_id, "alice")
    finally:
        kw.close()


@pytest.mark.slow
def test_an_approval_from_another_process_wakes_the_waiter(tmp_path: Path) -> None:
    url = f"sqlite:///{(tmp_path / 'gates.db').resolve()}"
    kw = Klockwork.open(url)  # a real clock: the waiter polls the file
    try:
        ask(kw)
        done = threading.Event()
        with ThreadPoolExecutor(max_workers=1) as pool:

            def gate() -> Any:
                try:
                    return kw.gates.gate("a1", "deploy", event_id="e1", timeout_s=60)
                finally:
                    done.set()

            waiting = pool.submit(gate)
            run_spawned(_approve_when_pending, [(url,)])
            approved_at = time.monotonic()
            assert waiting.result(timeout=30).status == "executed"
            assert done.is_set()
            assert time.monotonic() - approved_at < 1.0  # polled within _POLL_MAX_S
        assert [e.kind for e in entries(kw)] == [
            "action.requested",
            "approval.decided",
            "action.executed",
        ]
        assert kw.audit.verify().valid
    finally:
        kw.close()
