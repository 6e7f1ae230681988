"""The pure approval and circuit-breaker state machines (``core.governance.approvals``)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from klockwork.core.errors import InvalidRequestError, NotAnApproverError
from klockwork.core.governance.approvals import (
    APPROVAL_EXPIRED,
    DENIED_BY_REVIEWER,
    Approval,
    ApprovalClosedError,
    ApprovalStatus,
    BreakerConfig,
    BreakerState,
    changes_breaker,
    decide_approval,
    denial_reason,
    expire_if_due,
    is_eligible,
    is_open,
    new_approval,
    on_report,
    outcome,
    remaining_s,
    reset,
)
from klockwork.core.governance.policy import Policy

S = ApprovalStatus


def pol(**kw: Any) -> Policy:
    data: dict[str, Any] = {"name": "p", "action": "pr.merge", "effect": "require_approval"}
    return Policy.model_validate({**data, **kw})


def req(requester: str = "bot", now_ms: int = 1000, **kw: Any) -> Approval:
    return new_approval("a1", requester, "pr.merge", {"pr": 7}, pol(**kw), now_ms, event_id="e1")


# -- construction -----------------------------------------------------------------------


def test_new_approval_copies_the_policy() -> None:
    a = req(approvers=["alice", "bob"], quorum=2, approval_timeout_s=1.5, on_timeout="allow")
    assert a.status is S.PENDING
    assert (a.approvers, a.quorum, a.on_timeout) == (["alice", "bob"], 2, "allow")
    assert (a.created_at_ms, a.deadline_ms, a.event_id) == (1000, 2500, "e1")
    assert a.policy_name == "p" and a.metadata == {"pr": 7} and a.decisions == []
    assert outcome(a) == "pending" and denial_reason(a) is None


def test_no_timeout_means_no_deadline_and_never_expires() -> None:
    a = req()
    assert a.deadline_ms is None and remaining_s(a, 10**15) is None
    assert expire_if_due(a, 10**15) is a
    assert decide_approval(a, "alice", "approve", "", 10**15).status is S.APPROVED


def test_unreachable_quorum_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as info:
        req(requester="alice", approvers=["alice", "bob"], quorum=2)
    assert info.value.argument == "policy"
    req(requester="alice", approvers=["alice", "team-*"], quorum=2)  # globs: cannot tell


@pytest.mark.parametrize("bad", ["", "  "])
def test_new_approval_rejects_empty_ids(bad: str) -> None:
    with pytest.raises(InvalidRequestError):
        new_approval(bad, "bot", "x", None, pol(), 0)
    with pytest.raises(InvalidRequestError):
        new_approval("a", bad, "x", None, pol(), 0)


# -- who may decide ---------------------------------------------------------------------


def test_self_approval_refused_even_when_listed() -> None:
    a = req(requester="alice", approvers=["alice", "bob"])
    assert not is_eligible(a, "alice")
    with pytest.raises(NotAnApproverError):
        decide_approval(a, "alice", "approve", "", 1001)
    with pytest.raises(NotAnApproverError):
        decide_approval(req(), "bot", "deny", "", 1001)  # empty approvers: anyone *but* bot


def test_non_approver_refused() -> None:
    a = req(approvers=["alice"])
    with pytest.raises(NotAnApproverError):
        decide_approval(a, "mallory", "approve", "", 1001)
    with pytest.raises(NotAnApproverError):
        decide_approval(a, "Alice", "approve", "", 1001)  # case-sensitive


def test_glob_approvers() -> None:
    a = req(approvers=["team-*", "ops-?"])
    assert is_eligible(a, "team-lead") and is_eligible(a, "ops-1")
    assert not is_eligible(a, "ops-12") and not is_eligible(a, "lead")
    assert decide_approval(a, "team-lead", "approve", "ok", 1001).status is S.APPROVED


@pytest.mark.parametrize(("approver", "verdict"), [("", "approve"), (" ", "deny"), ("x", "ok")])
def test_bad_arguments(approver: str, verdict: str) -> None:
    with pytest.raises(InvalidRequestError):
        decide_approval(req(), approver, verdict, "", 1001)


# -- votes ------------------------------------------------------------------------------


def test_quorum_needs_distinct_approvers() -> None:
    a = req(approvers=["*"], quorum=2)
    one = decide_approval(a, "alice", "approve", "", 1001)
    assert one.status is S.PENDING and len(one.decisions) == 1
    assert decide_approval(one, "alice", "approve", "again", 1002) is one  # counted once
    two = decide_approval(one, "bob", "approve", "", 1003)
    assert two.status is S.APPROVED and two.decided_at_ms == 1003
    assert [d.approver for d in two.decisions] == ["alice", "bob"]
    assert outcome(two) == "allow" and denial_reason(two) is None


def test_first_vote_stands() -> None:
    one = decide_approval(req(quorum=2), "alice", "approve", "", 1001)
    with pytest.raises(InvalidRequestError) as info:
        decide_approval(one, "alice", "deny", "changed my mind", 1002)
    assert info.value.argument == "verdict"


def test_one_deny_decides() -> None:
    one = decide_approval(req(quorum=3), "alice", "approve", "", 1001)
    denied = decide_approval(one, "bob", "deny", "too risky", 1002)
    assert denied.status is S.DENIED and denied.decided_at_ms == 1002
    assert denied.decisions[-1].comment == "too risky"
    assert outcome(denied) == "deny" and denial_reason(denied) == DENIED_BY_REVIEWER


def test_decided_approvals_are_immutable() -> None:
    a = req()
    b = decide_approval(a, "alice", "approve", "", 1001)
    assert b is not a and a.status is S.PENDING and a.decisions == []
    for verdict in ("approve", "deny"):
        with pytest.raises(ApprovalClosedError) as info:
            decide_approval(b, "bob", verdict, "", 1002)
        assert info.value.approval is b and info.value.status is S.APPROVED
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        b.status = S.PENDING
    assert expire_if_due(b, 10**12) is b


# -- deadlines --------------------------------------------------------------------------


def test_decision_after_deadline_expires_deny() -> None:
    a = req(approval_timeout_s=10)  # deadline 11_000, exclusive
    assert remaining_s(a, 1000) == 10.0
    assert decide_approval(a, "alice", "approve", "", 10_999).status is S.APPROVED
    with pytest.raises(ApprovalClosedError) as info:
        decide_approval(a, "alice", "approve", "", 11_000)
    expired = info.value.approval
    assert expired.status is S.EXPIRED and expired.decided_at_ms == 11_000
    assert expired.decisions == []  # the late vote was not counted
    assert outcome(expired) == "deny" and denial_reason(expired) == APPROVAL_EXPIRED
    assert remaining_s(expired, 0) == 0.0 and a.status is S.PENDING


def test_expiry_with_on_timeout_allow_counts_as_allowed() -> None:
    a = req(approval_timeout_s=1, on_timeout="allow")
    assert expire_if_due(a, 1999) is a
    expired = expire_if_due(a, 50_000)
    assert expired.status is S.EXPIRED and expired.decided_at_ms == 2000  # the deadline
    assert expire_if_due(a, 99_000) == expired  # deterministic: every process agrees
    assert outcome(expired) == "allow" and denial_reason(expired) is None


def test_late_deny_after_deadline_also_expires() -> None:
    a = req(approval_timeout_s=1, on_timeout="allow")
    with pytest.raises(ApprovalClosedError) as info:
        decide_approval(a, "alice", "deny", "", 5000)
    assert outcome(info.value.approval) == "allow"


# -- stateful: random approvers and a moving clock against a reference model -------------

PEOPLE = ["bot", "alice", "bob", "carol", "team-x", "team-y", "mallory"]


class ApprovalMachine(RuleBasedStateMachine):
    """Random votes and clock moves; a tiny reference model says what must happen."""

    approval: Approval
    now: int

    @initialize(
        approvers=st.sampled_from([[], ["alice", "bob", "carol"], ["team-*", "alice"], ["bot"]]),
        quorum=st.integers(1, 3),
        timeout=st.one_of(st.none(), st.integers(1, 20)),
        on_timeout=st.sampled_from(["deny", "allow"]),
    )
    def start(
        self, approvers: list[str], quorum: int, timeout: int | None, on_timeout: str
    ) -> None:
        named = [a for a in approvers if "*" not in a]
        if approvers and len(named) == len(approvers) and len(set(named) - {"bot"}) < quorum:
            approvers = [*approvers, "team-*"]  # keep the quorum reachable
        policy = pol(
            approvers=approvers, quorum=quorum, approval_timeout_s=timeout, on_timeout=on_timeout
        )
        self.now = 0
        self.approval = new_approval("a", "bot", "pr.merge", {}, policy, 0)
        self.history: list[ApprovalStatus] = [S.PENDING]
        self.votes: dict[str, str] = {}  # the model: eligible approver -> first verdict

    def eligible(self, who: str) -> bool:
        globs = self.approval.approvers
        if who == "bot":
            return False
        return not globs or who in globs or (who.startswith("team-") and "team-*" in globs)

    def expected(self) -> ApprovalStatus:
        a = self.approval
        if "deny" in self.votes.values():
            return S.DENIED
        if sum(v == "approve" for v in self.votes.values()) >= a.quorum:
            return S.APPROVED
        return S.PENDING

    def record(self, new: Approval) -> None:
        if new.status is not self.history[-1]:
            self.history.append(new.status)
        self.approval = new

    @rule(who=st.sampled_from(PEOPLE), verdict=st.sampled_from(["approve", "deny"]))
    def vote(self, who: str, verdict: str) -> None:
        before = self.approval
        due = before.deadline_ms is not None and self.now >= before.deadline_ms
        if before.status is not S.PENDING or due:
            with pytest.raises(ApprovalClosedError) as info:
                decide_approval(before, who, verdict, "", self.now)
            assert info.value.approval.status is not S.PENDING
            if before.status is S.PENDING:
                assert info.value.approval.status is S.EXPIRED
            self.record(info.value.approval)
            return
        if not self.eligible(who):
            with pytest.raises(NotAnApproverError):
                decide_approval(before, who, verdict, "", self.now)
            return
        first = self.votes.get(who)
        if first is not None and first != verdict:
            with pytest.raises(InvalidRequestError):
                decide_approval(before, who, verdict, "", self.now)
            return
        after = decide_approval(before, who, verdict, "", self.now)
        if first is not None:
            assert after is before
            return
        self.votes[who] = verdict
        assert after.status is self.expected()
        self.record(after)

    @rule(ms=st.integers(0, 8000))
    def tick(self, ms: int) -> None:
        self.now += ms

    @rule()
    def sweep(self) -> None:
        self.record(expire_if_due(self.approval, self.now))

    @invariant()
    def only_one_move_from_pending(self) -> None:
        assert self.history[0] is S.PENDING and len(self.history) <= 2

    @invariant()
    def approved_only_with_quorum(self) -> None:
        a = self.approval
        approvals = {d.approver for d in a.decisions if d.verdict == "approve"}
        assert "bot" not in {d.approver for d in a.decisions}
        assert all(self.eligible(who) for who in approvals)
        if a.status is S.APPROVED:
            assert len(approvals) >= a.quorum and outcome(a) == "allow"

    @invariant()
    def denied_only_by_reviewer_or_expiry(self) -> None:
        a = self.approval
        if outcome(a) == "deny":
            denied = [d for d in a.decisions if d.verdict == "deny"]
            if a.status is S.DENIED:
                assert len(denied) == 1 and self.eligible(denied[0].approver)
                assert denial_reason(a) == DENIED_BY_REVIEWER
            else:
                assert a.status is S.EXPIRED and a.on_timeout == "deny"
                assert denial_reason(a) == APPROVAL_EXPIRED and not denied
        if a.status is S.EXPIRED:
            assert a.deadline_ms is not None and a.decided_at_ms == a.deadline_ms
            assert all(d.at_ms < a.deadline_ms for d in a.decisions)


ApprovalMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30)
TestApprovalMachine = ApprovalMachine.TestCase


# -- circuit breaker --------------------------------------------------------------------

CFG = BreakerConfig(threshold=3, cooldown_s=10)


def fail(state: BreakerState, now: int, times: int = 1) -> tuple[BreakerState, bool]:
    opened = False
    for _ in range(times):
        state, opened = on_report(state, "failure", now, CFG)
    return state, opened


def test_breaker_defaults() -> None:
    assert BreakerConfig() == BreakerConfig(threshold=5, cooldown_s=60.0)
    s = BreakerState(agent_id="a")
    assert (s.consecutive_failures, s.opened_at_ms) == (0, None)
    assert not is_open(s, 0, BreakerConfig())


def test_breaker_opens_at_threshold_and_stays_open_until_cooldown() -> None:
    s, opened = fail(BreakerState(agent_id="a"), 0, 2)
    assert not opened and not is_open(s, 0, CFG) and s.consecutive_failures == 2
    s, opened = fail(s, 100)
    assert opened and s.opened_at_ms == 100
    assert is_open(s, 100, CFG) and is_open(s, 10_099, CFG) and not is_open(s, 10_100, CFG)
    s2, opened = fail(s, 5000)  # while open: counted, no re-open, cooldown not restarted
    assert not opened and s2.opened_at_ms == 100 and s2.consecutive_failures == 4


def test_breaker_reset_closes() -> None:
    s, _ = fail(BreakerState(agent_id="a"), 0, 3)
    r = reset(s)
    assert not is_open(r, 1, CFG) and r.consecutive_failures == 0 and r.opened_at_ms is None
    assert reset(r) is r and is_open(s, 1, CFG)  # the old state is unchanged


def test_success_resets_the_count() -> None:
    s, _ = fail(BreakerState(agent_id="a"), 0, 2)
    s, opened = on_report(s, "success", 0, CFG)
    assert not opened and s.consecutive_failures == 0
    s, opened = fail(s, 0, 2)
    assert not opened and not is_open(s, 0, CFG)


def test_success_while_open_does_not_cut_the_cooldown() -> None:
    s, _ = fail(BreakerState(agent_id="a"), 0, 3)
    s, _ = on_report(s, "success", 50, CFG)
    assert is_open(s, 50, CFG) and s.consecutive_failures == 0


def test_partial_neither_counts_nor_resets() -> None:
    s, _ = fail(BreakerState(agent_id="a"), 0, 2)
    same, opened = on_report(s, "partial", 0, CFG)
    assert same is s and not opened
    s, opened = fail(same, 0)
    assert opened  # partial did not break the streak


@settings(max_examples=300, deadline=None)
@given(
    failures=st.integers(0, 5),
    opened_at=st.none() | st.integers(0, 200),
    now=st.integers(0, 400),
    status=st.sampled_from(["success", "failure", "partial"]),
    never_reported=st.booleans(),
)
def test_a_report_said_to_change_nothing_changes_nothing(
    failures: int, opened_at: int | None, now: int, status: str, never_reported: bool
) -> None:
    """``report`` skips the breaker's write when ``changes_breaker`` is False: it must be exact."""
    stored = (
        None
        if never_reported
        else BreakerState(agent_id="a", consecutive_failures=failures, opened_at_ms=opened_at)
    )
    state = stored or BreakerState(agent_id="a")
    new, opened = on_report(state, status, now, CFG)
    if not changes_breaker(stored, status):
        assert new is state and not opened
    else:  # and it is not needlessly cautious: what it sends to a write is a change
        assert new is not state


def test_half_open_next_failure_reopens_next_success_closes() -> None:
    s, _ = fail(BreakerState(agent_id="a"), 0, 3)
    assert not is_open(s, 10_000, CFG)  # cooldown over: half-open, actions pass
    reopened, opened = fail(s, 10_000)
    assert opened and reopened.opened_at_ms == 10_000 and is_open(reopened, 19_999, CFG)
    closed, opened = on_report(s, "success", 10_000, CFG)
    assert not opened and closed.opened_at_ms is None and closed.consecutive_failures == 0
    _, opened = fail(closed, 10_001)
    assert not opened  # a fresh streak is needed again


def test_bad_report_status() -> None:
    with pytest.raises(InvalidRequestError):
        on_report(BreakerState(agent_id="a"), "ok", 0, CFG)
