"""Hypothesis state machine: engine-level approvals against a tiny reference model.

The model is written from DESIGN.md (it shares no code with
``klockwork.core.governance.approvals``): requests through ``kw.gates.execute`` under
three policies (quorum 1, 2 and 3, with and without deadlines), votes by
random deciders (listed approvers, the requester itself, an outsider), a
manual clock moving past deadlines. After every step the engine's approvals,
the gates' settled outcomes and the audit trail must agree with the model.
Memory engine, sync API.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from klockwork import (
    ApprovalClosedError,
    InvalidRequestError,
    Klockwork,
    ManualClock,
    MemoryStore,
    NotAnApproverError,
    Policy,
)

REQUESTERS = ("r1", "r2")
DECIDERS = ("alice", "bob", "carol", "r1", "r2", "mallory")
#: action -> (quorum, timeout_ms or None, on_timeout)
KINDS = {
    "deploy.q1": (1, 10_000, "deny"),
    "deploy.q2": (2, 30_000, "allow"),
    "deploy.q3": (3, None, "deny"),
}
APPROVERS = ["alice", "bob", "carol", "r*"]  # mallory is nobody's approver


@dataclass
class Req:
    approval_id: str
    event_id: str
    requester: str
    action: str
    quorum: int
    deadline: int | None
    on_timeout: str
    votes: dict[str, str] = field(default_factory=dict)
    status: str = "pending"
    settled: bool = False

    def expire(self, now: int) -> None:
        if self.status == "pending" and self.deadline is not None and now >= self.deadline:
            self.status = "expired"

    def outcome(self) -> str:
        return {
            "pending": "requested",
            "approved": "executed",
            "denied": "denied",
            "expired": "executed" if self.on_timeout == "allow" else "denied",
        }[self.status]


class ApprovalMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock(start_ms=1_000_000)
        self.kw = Klockwork(MemoryStore(), clock=self.clock)
        for action, (quorum, timeout, on_timeout) in KINDS.items():
            self.kw.policies.add(
                Policy(
                    name=action,
                    action=action,
                    effect="require_approval",
                    approvers=APPROVERS,
                    quorum=quorum,
                    approval_timeout_s=None if timeout is None else timeout / 1000,
                    on_timeout=on_timeout,
                )
            )
        self.reqs: list[Req] = []
        self.decided = 0  # votes applied

    def teardown(self) -> None:
        self.kw.close()

    def now(self) -> int:
        return self.clock.now_ms()

    @rule(requester=st.sampled_from(REQUESTERS), action=st.sampled_from(sorted(KINDS)))
    def request(self, requester: str, action: str) -> None:
        event_id = f"e{len(self.reqs)}"
        result = self.kw.gates.execute(requester, action, {"n": len(self.reqs)}, event_id)
        assert result.status == "requested"
        assert result.approval_id is not None
        quorum, timeout, on_timeout = KINDS[action]
        deadline = None if timeout is None else self.now() + timeout
        self.reqs.append(
            Req(result.approval_id, event_id, requester, action, quorum, deadline, on_timeout)
        )

    @precondition(lambda self: self.reqs)
    @rule(
        data=st.data(),
        decider=st.sampled_from(DECIDERS),
        verdict=st.sampled_from(["approve", "approve", "deny"]),
    )
    def vote(self, data: st.DataObject, decider: str, verdict: str) -> None:
        req = data.draw(st.sampled_from(self.reqs))
        vote = self.kw.approvals.approve if verdict == "approve" else self.kw.approvals.deny
        req.expire(self.now())
        if decider == req.requester:
            expected: type[Exception] | None = NotAnApproverError
        elif req.status != "pending":
            expected = ApprovalClosedError
        elif decider == "mallory":
            expected = NotAnApproverError
        elif decider in req.votes and req.votes[decider] != verdict:
            expected = InvalidRequestError
        else:
            expected = None
        try:
            approval = vote(req.approval_id, decider)
        except (NotAnApproverError, InvalidRequestError) as exc:
            assert type(exc) is expected, (exc, expected)
            return
        assert expected is None, f"expected {expected}"
        if decider not in req.votes:
            req.votes[decider] = verdict
            self.decided += 1
            if verdict == "deny":
                req.status = "denied"
            elif sum(v == "approve" for v in req.votes.values()) >= req.quorum:
                req.status = "approved"
        assert approval.status.value == req.status

    @rule(ms=st.sampled_from([1, 999, 5_000, 10_000, 20_000]))
    def advance(self, ms: int) -> None:
        self.clock.advance(ms)
        for req in self.reqs:
            req.expire(self.now())

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        """Re-run the gate with the same event_id: the stored outcome, decided once."""
        req = data.draw(st.sampled_from(self.reqs))
        req.expire(self.now())
        # the same action: an event_id is bound to it (other metadata is refused)
        meta = {"n": int(req.event_id[1:])}
        result = self.kw.gates.execute(req.requester, req.action, meta, req.event_id)
        assert result.status == req.outcome()
        assert result.approval_id == req.approval_id
        if req.status != "pending":
            req.settled = True

    @invariant()
    def approvals_match(self) -> None:
        now = self.now()
        for req in self.reqs:
            req.expire(now)
            approval = self.kw.approvals.get(req.approval_id)
            assert approval.status.value == req.status
            assert {d.approver: d.verdict for d in approval.decisions} == req.votes
            assert approval.requester == req.requester
        pending = {r.approval_id for r in self.reqs if r.status == "pending"}
        assert {a.approval_id for a in self.kw.approvals.list()} == pending

    @invariant()
    def audit_matches(self) -> None:
        self.kw.audit.flush()
        kinds = [e.kind for e in self.kw.audit.query(limit=1000).entries]
        assert kinds.count("action.requested") == len(self.reqs)
        assert kinds.count("approval.decided") == self.decided
        assert kinds.count("approval.expired") == sum(r.status == "expired" for r in self.reqs)
        settled = sum(r.settled for r in self.reqs)
        assert kinds.count("action.executed") + kinds.count("action.denied") == settled


SETTINGS = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_engine_approvals_match_the_reference_model() -> None:
    run_state_machine_as_test(ApprovalMachine, settings=SETTINGS)
