"""Pure state machines of approvals and of the per-agent circuit breaker.

No I/O, no clock reads (time comes in as ``now_ms``), no threads, no
mutation: every transition takes a frozen model and returns a new one (or
the *same object* when nothing changed, so ``new is old`` tells the engine
there is nothing to persist or audit). The engine and the stores load the
state, call these functions inside their atomic section, and persist the
result, the way :func:`klockwork.core.leases.rules.judge` is used for leases.

**Approval states**::

                  approve (fewer than quorum distinct approvals so far)
                  +-----+
                  v     |
    new_approval -> PENDING --- quorum distinct eligible approvals ---> APPROVED
                    |   |                                         (outcome allow)
                    |   +------ one deny by an eligible approver -----> DENIED
                    |                                  (outcome deny, DENIED_BY_REVIEWER)
                    +---------- now_ms >= deadline_ms -----------------> EXPIRED
                                (outcome = on_timeout; deny -> APPROVAL_EXPIRED)

    APPROVED, DENIED and EXPIRED are terminal: nothing ever leaves them.

Rules: the requester never decides its own request, even when listed in
``approvers``; ``approvers`` are case-sensitive globs over approver ids
(empty = anyone but the requester); each approver has **one vote and the
first vote stands** (repeating it is an idempotent no-op, contradicting it
raises); one deny decides at once; ``quorum`` *distinct* approvals approve.
The deadline is exclusive (a decision at ``now_ms == deadline_ms`` is late)
and an expiry is stamped ``decided_at_ms = deadline_ms``, not the time it
was noticed, so every process that expires an approval writes the same
record. Approvers, quorum, deadline and ``on_timeout`` are copied from the
policy at request time: editing the policy later never changes a pending
approval.

**Races the engine must defend against** (each step inside one atomic
section: load, call, persist; ``now_ms`` read *inside* the section):

1. Two approvers at once (quorum 1). (a) alice loads PENDING, approves,
   persists APPROVED. (b) bob loads APPROVED, denies: :func:`decide_approval`
   raises :class:`ApprovalClosedError` (``approval.status == approved``).
   Guarantee: exactly one terminal state; ``decisions`` only ever holds votes
   applied while PENDING, so the record shows who actually decided.
2. One approver twice (double click, client retry). The first vote is
   recorded; the repeat of the same verdict returns the same object (no
   second audit entry, quorum not reached by one person); a contradicting
   verdict raises :class:`~klockwork.core.errors.InvalidRequestError`.
3. A decision racing the deadline (deadline 100). (a) alice's request is
   sent at 99 but her section runs at 101. (b) :func:`decide_approval` with
   ``now_ms=101`` raises :class:`ApprovalClosedError` whose ``approval`` is
   the EXPIRED record (persist it). Guarantee: a vote is applied only if its
   section ran before the deadline, whatever the arrival order; had a
   sweeper expired it first, the answer is identical. Reading ``now_ms``
   *before* taking the section would let a late vote through: don't.
4. A requester resuming after expiry. (a) the agent's ``gate()`` wait runs
   out (``ApprovalTimeoutError``); nobody sweeps. (b) hours later it resumes
   with the same ``event_id``; the stored record still says PENDING. The
   engine calls :func:`expire_if_due` before :func:`outcome`, which then
   gives ``on_timeout``. Guarantee: the expiry depends only on the stored
   deadline and ``now_ms``, so the answer cannot depend on whether anybody
   was waiting, and an expired approval can never be approved afterwards.
5. Two reports at once for one agent's breaker: applied one after the other
   inside the section, the failure count is exact. :func:`on_report` is not
   idempotent: the engine de-duplicates reports on ``audit_event_id``.
"""

from __future__ import annotations

import enum
import fnmatch
import math
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from klockwork.core.errors import InvalidRequestError, NotAnApproverError
from klockwork.core.governance.globs import is_glob
from klockwork.core.governance.policy import Policy
from klockwork.core.validation import same_identity

__all__ = [
    "APPROVAL_EXPIRED",
    "CIRCUIT_OPEN",
    "DENIED_BY_REVIEWER",
    "Approval",
    "ApprovalClosedError",
    "ApprovalStatus",
    "BreakerConfig",
    "BreakerState",
    "BreakerUpdate",
    "Decision",
    "changes_breaker",
    "decide_approval",
    "denial_reason",
    "expire_if_due",
    "is_eligible",
    "is_open",
    "new_approval",
    "on_report",
    "outcome",
    "remaining_s",
    "reset",
]

DENIED_BY_REVIEWER = "DENIED_BY_REVIEWER"
APPROVAL_EXPIRED = "APPROVAL_EXPIRED"
CIRCUIT_OPEN = "CIRCUIT_OPEN"

Verdict = Literal["approve", "deny"]
Outcome = Literal["allow", "deny", "pending"]
ReportStatus = Literal["success", "failure", "partial"]

_FROZEN = ConfigDict(frozen=True)


class ApprovalStatus(str, enum.Enum):
    """Where an approval is in its life; all but ``PENDING`` are terminal."""

    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"

    def __str__(self) -> str:
        return self.value


class Decision(BaseModel):
    """One approver's vote as recorded: ``verdict`` is ``"approve"`` or ``"deny"``,
    ``comment`` free text (the reason, for a deny), ``at_ms`` when it was applied."""

    model_config = _FROZEN
    approver: str
    verdict: Verdict
    comment: str = ""
    at_ms: int


class Approval(BaseModel):
    """A request for human (or agent) approval of one gated action.

    ``requester`` (an agent id) can never decide it; ``approvers`` are globs
    over approver ids (empty = anyone but the requester); ``quorum`` distinct
    approvals approve it. ``deadline_ms`` (exclusive; None = never) ends it
    with ``on_timeout`` (``deny`` or ``allow``). ``decisions`` are the votes
    applied while pending, in order; ``decided_at_ms`` is when it left
    ``PENDING`` (the deadline, for an expiry). ``audit_event_id`` is the audit
    entry of the request, ``event_id`` the caller's idempotency key.
    """

    model_config = _FROZEN
    approval_id: str = Field(min_length=1)
    requester: str = Field(min_length=1)
    action: str
    metadata: dict[str, Any] = {}
    policy_name: str | None = None
    approvers: list[str] = []
    quorum: int = Field(default=1, ge=1)
    created_at_ms: int
    deadline_ms: int | None = None
    on_timeout: Literal["deny", "allow"] = "deny"
    status: ApprovalStatus = ApprovalStatus.PENDING
    decisions: list[Decision] = []
    decided_at_ms: int | None = None
    audit_event_id: str | None = None
    event_id: str | None = None

    # -- retention (see stores.base.in_play) -------------------------------------------
    def retention_link(self) -> tuple[str, str] | None:
        """The gate outcome that asked for it (keyed by ``audit_event_id``)."""
        return None if self.audit_event_id is None else (GATE_KIND, self.audit_event_id)

    def in_play(self, gate_status: str | None) -> bool:
        """Kept while pending, and while the gate that asked for it awaits a re-run."""
        return self.status is ApprovalStatus.PENDING or gate_status == "requested"


#: Record kinds of approvals and of gate outcomes (``approval_desk.APPROVAL``,
#: ``outcomes.GATE``), named here, below both, since each refers to the other.
APPROVAL_KIND = "approval"
GATE_KIND = "gate"


class ApprovalClosedError(InvalidRequestError):
    """A vote reached an approval that is no longer pending; the vote was not counted.

    An :class:`~klockwork.core.errors.InvalidRequestError` (so a ``ValueError``:
    retrying never helps). ``approval`` is the current record; when the vote
    arrived past the deadline of a still-pending record it is the freshly
    EXPIRED one, which the engine should persist (and audit).

    Attributes:
        approval: the approval as it stands (terminal).
        approval_id: its id.
        status: its terminal status.
    """

    def __init__(self, approval: Approval) -> None:
        self.approval = approval
        self.approval_id = approval.approval_id
        self.status = approval.status
        super().__init__(
            "approval_id", approval.approval_id, f"approval is already {approval.status.value}"
        )


def new_approval(
    approval_id: str,
    requester: str,
    action: str,
    metadata: dict[str, Any] | None,
    policy: Policy,
    now_ms: int,
    event_id: str | None = None,
) -> Approval:
    """Build the PENDING approval a ``require_approval`` verdict of ``policy`` asks for.

    The policy's approvers, quorum, timeout and ``on_timeout`` are copied, so
    later edits of the policy do not affect it. ``deadline_ms`` is ``now_ms``
    plus ``approval_timeout_s`` rounded up to a millisecond (None without one).

    Raises:
        InvalidRequestError: an empty id, or a quorum nobody could reach (the
            approvers are all plain ids and, without the requester, too few).
    """
    for name, value in (("approval_id", approval_id), ("requester", requester)):
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequestError(name, value, "must be a non-empty string")
    named = set(policy.approvers)
    if named and not any(is_glob(a) for a in named) and len(named - {requester}) < policy.quorum:
        raise InvalidRequestError(
            "policy",
            policy.name,
            f"quorum {policy.quorum} cannot be reached: the requester {requester!r} "
            f"cannot approve its own request and only {sorted(named - {requester})} remain",
        )
    timeout = policy.approval_timeout_s
    deadline = None if timeout is None else now_ms + math.ceil(timeout * 1000)
    return Approval(
        approval_id=approval_id,
        requester=requester,
        action=action,
        metadata=dict(metadata or {}),
        policy_name=policy.name,
        approvers=list(policy.approvers),
        quorum=policy.quorum,
        created_at_ms=now_ms,
        deadline_ms=deadline,
        on_timeout="allow" if policy.on_timeout.value == "allow" else "deny",
        event_id=event_id,
    )


def is_eligible(approval: Approval, approver: str) -> bool:
    """True when ``approver`` may vote: not the requester (even if listed), and matched
    by a glob of ``approvers`` (case-sensitive) or ``approvers`` is empty."""
    if approver == approval.requester:
        return False
    return not approval.approvers or any(
        fnmatch.fnmatchcase(approver, glob) for glob in approval.approvers
    )


def expire_if_due(approval: Approval, now_ms: int) -> Approval:
    """Expire a pending approval whose deadline has passed (``now_ms >= deadline_ms``).

    Returns a new EXPIRED approval stamped ``decided_at_ms = deadline_ms``, or the
    same object when it is not pending, has no deadline, or is not due yet.
    """
    deadline = approval.deadline_ms
    if approval.status is not ApprovalStatus.PENDING or deadline is None or now_ms < deadline:
        return approval
    return approval.model_copy(update={"status": ApprovalStatus.EXPIRED, "decided_at_ms": deadline})


def decide_approval(
    approval: Approval, approver: str, verdict: str, comment: str, now_ms: int
) -> Approval:
    """Apply one approver's vote to a pending approval.

    Checks, in order: the arguments; the deadline (a late vote expires the
    approval first); that it is still pending; the approver's eligibility;
    the approver's earlier vote (one vote each, the first stands).

    Args:
        approval: the approval as stored.
        approver: who decides.
        verdict: ``"approve"`` or ``"deny"``.
        comment: free text recorded with the vote.
        now_ms: the engine's current time, read inside its atomic section.

    Returns:
        A new approval: DENIED after a deny, APPROVED once ``quorum`` distinct
        eligible approvers approved, else PENDING with the vote recorded. The
        same object when the approver repeats their verdict (idempotent retry).

    Raises:
        InvalidRequestError: an empty approver, an unknown verdict, or one
            contradicting the approver's earlier vote.
        ApprovalClosedError: not pending, or ``now_ms >= deadline_ms``
            (``error.approval`` is then the EXPIRED record, to persist).
        NotAnApproverError: the requester, or not matched by ``approvers``.
    """
    if not isinstance(approver, str) or not approver.strip():
        raise InvalidRequestError("approver", approver, "must be a non-empty string")
    if verdict not in ("approve", "deny"):
        raise InvalidRequestError("verdict", verdict, "expected 'approve' or 'deny'")
    current = expire_if_due(approval, now_ms)
    if current.status is not ApprovalStatus.PENDING:
        raise ApprovalClosedError(current)
    if same_identity(approver, current.requester):
        raise NotAnApproverError(
            f"{approver!r} requested approval {current.approval_id!r} and cannot decide it"
        )
    if not is_eligible(current, approver):
        raise NotAnApproverError(
            f"{approver!r} is not among the approvers {current.approvers} "
            f"of approval {current.approval_id!r}"
        )
    for earlier in current.decisions:
        if same_identity(earlier.approver, approver):
            if earlier.verdict == verdict:
                return current
            raise InvalidRequestError(
                "verdict",
                verdict,
                f"{approver!r} already voted {earlier.verdict!r} on {current.approval_id!r}; "
                "each approver has one vote and the first one stands",
            )
    vote = Decision(
        approver=approver,
        verdict="deny" if verdict == "deny" else "approve",
        comment=comment or "",
        at_ms=now_ms,
    )
    decisions = [*current.decisions, vote]
    update: dict[str, Any] = {"decisions": decisions}
    if verdict == "deny":
        update.update(status=ApprovalStatus.DENIED, decided_at_ms=now_ms)
    elif sum(d.verdict == "approve" for d in decisions) >= current.quorum:
        update.update(status=ApprovalStatus.APPROVED, decided_at_ms=now_ms)
    return current.model_copy(update=update)


def outcome(approval: Approval) -> Outcome:
    """The effective result: ``"allow"``, ``"deny"`` or ``"pending"``.

    APPROVED allows, DENIED denies, EXPIRED gives its ``on_timeout``. Reads the
    status only: call :func:`expire_if_due` first so that a due deadline counts.
    """
    status = approval.status
    if status is ApprovalStatus.APPROVED:
        return "allow"
    if status is ApprovalStatus.DENIED:
        return "deny"
    if status is ApprovalStatus.EXPIRED:
        return approval.on_timeout
    return "pending"


def denial_reason(approval: Approval) -> str | None:
    """``DENIED_BY_REVIEWER`` when denied, ``APPROVAL_EXPIRED`` when expired with
    ``on_timeout: deny``, None otherwise (pending or allowed; expire it first)."""
    if approval.status is ApprovalStatus.DENIED:
        return DENIED_BY_REVIEWER
    if approval.status is ApprovalStatus.EXPIRED and approval.on_timeout == "deny":
        return APPROVAL_EXPIRED
    return None


def remaining_s(approval: Approval, now_ms: int) -> float | None:
    """Seconds left before the deadline: None without one, 0.0 once past it or decided."""
    if approval.deadline_ms is None:
        return None
    if approval.status is not ApprovalStatus.PENDING:
        return 0.0
    return max(0.0, (approval.deadline_ms - now_ms) / 1000.0)


# -- circuit breaker --------------------------------------------------------------------


class BreakerConfig(BaseModel):
    """When a breaker opens and for how long.

    Attributes:
        threshold: consecutive failures that open the breaker.
        cooldown_s: how long it stays open.
    """

    model_config = _FROZEN
    threshold: int = Field(default=5, ge=1)
    cooldown_s: float = Field(default=60.0, gt=0)


class BreakerState(BaseModel):
    """One agent's circuit breaker.

    Three phases: *closed* (``opened_at_ms`` None), *open* (within the
    cooldown after ``opened_at_ms``: the gate denies with ``CIRCUIT_OPEN``)
    and *half-open* (``opened_at_ms`` set, cooldown over: actions pass; the
    next failure re-opens at once, the next success closes).

    Attributes:
        agent_id: the agent.
        consecutive_failures: failures since the last success or reset.
        opened_at_ms: when it last opened; None when closed.
    """

    model_config = _FROZEN
    agent_id: str
    consecutive_failures: int = Field(default=0, ge=0)
    opened_at_ms: int | None = None


class BreakerUpdate(NamedTuple):
    """What :func:`on_report` did: the new state, and whether it just opened."""

    state: BreakerState
    opened: bool


def _cooled(state: BreakerState, now_ms: int, config: BreakerConfig) -> bool:
    opened = state.opened_at_ms
    return opened is not None and now_ms >= opened + math.ceil(config.cooldown_s * 1000)


def is_open(state: BreakerState, now_ms: int, config: BreakerConfig) -> bool:
    """True while the gate must deny with ``CIRCUIT_OPEN``: opened, cooldown not over.

    After the cooldown this is False (half-open) even before any new report.
    """
    return state.opened_at_ms is not None and not _cooled(state, now_ms, config)


def on_report(
    state: BreakerState, status: str, now_ms: int, config: BreakerConfig
) -> BreakerUpdate:
    """Apply one ``report(audit_event_id, status)`` to the agent's breaker.

    * ``success``: the failure count drops to 0; a half-open breaker closes.
      An *open* breaker stays open until its cooldown is over (a late
      success of an older action does not cut the cooldown short).
    * ``failure``: the count grows; reaching ``threshold`` opens a closed
      breaker; any failure re-opens a half-open one at once (new cooldown);
      a failure while open keeps it open without restarting the cooldown.
    * ``partial``: neither counts nor resets (same object returned): it is
      evidence of neither health nor failure, and it cannot break a streak.

    Returns:
        ``(state, opened)``: ``opened`` is True only when this report opened
        (or re-opened) the breaker, the cue for a ``breaker.opened`` entry.

    Raises:
        InvalidRequestError: an unknown status.
    """
    if status == "partial":
        return BreakerUpdate(state, False)
    if status == "success":
        if is_open(state, now_ms, config):
            return BreakerUpdate(state.model_copy(update={"consecutive_failures": 0}), False)
        return BreakerUpdate(reset(state), False)
    if status != "failure":
        raise InvalidRequestError("status", status, "expected 'success', 'failure' or 'partial'")
    failures = state.consecutive_failures + 1
    if is_open(state, now_ms, config):
        return BreakerUpdate(state.model_copy(update={"consecutive_failures": failures}), False)
    if state.opened_at_ms is not None or failures >= config.threshold:
        update = {"consecutive_failures": failures, "opened_at_ms": now_ms}
        return BreakerUpdate(state.model_copy(update=update), True)
    return BreakerUpdate(state.model_copy(update={"consecutive_failures": failures}), False)


def changes_breaker(state: BreakerState | None, status: str) -> bool:
    """Whether :func:`on_report` of ``status`` could change ``state`` (None: never reported).

    A ``partial`` never does, nor a ``success`` on a closed breaker with no
    failures counted: the common report needs no write.
    """
    if status == "partial":
        return False
    if status == "success":
        return state is not None and (
            state.consecutive_failures != 0 or state.opened_at_ms is not None
        )
    return True


def reset(state: BreakerState) -> BreakerState:
    """Close the breaker and clear its count (``reset_breaker``); same object if closed."""
    if state.consecutive_failures == 0 and state.opened_at_ms is None:
        return state
    return state.model_copy(update={"consecutive_failures": 0, "opened_at_ms": None})
