"""``kw.approvals``: approvals stored in the engine's store, decided and awaited.

The state machine is :mod:`klockwork.core.governance.approvals` (pure); this module
runs it inside the store's atomic section (:meth:`Store.update_record`),
records every applied vote and expiry in the audit trail and wakes waiters.

Deadlines are stored with the approval, so it expires even when nobody is
waiting: any read (:meth:`Approvals.get`, :meth:`~Approvals.list`,
:meth:`~Approvals.wait`, a late vote) or :meth:`~Approvals.sweep` applies
the expiry the same way, stamped with the deadline, and the first process
that persists it records the ``approval.expired`` entry.

Waiting never polls within a process: a decision made here fires the
waiters' alarms at once. Decisions made by *another process* sharing a
SQLite store are seen by polling with a short adaptive interval
(``_POLL_MIN_S`` growing to ``_POLL_MAX_S``).
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Generator
from typing import Any, NamedTuple

from klockwork.core.clock import Clock, in_running_loop
from klockwork.core.errors import (
    ApprovalNotFoundError,
    ApprovalTimeoutError,
    EventLoopBlockedError,
    InvalidRequestError,
    NotAnApproverError,
    StoreUnavailableError,
)
from klockwork.core.events import AuditRecorder
from klockwork.core.governance.approvals import (
    APPROVAL_KIND,
    Approval,
    ApprovalClosedError,
    ApprovalStatus,
    decide_approval,
    expire_if_due,
)
from klockwork.core.notify import Signals
from klockwork.core.stores.base import Store, io_twin
from klockwork.core.validation import check_identity, check_key, check_text, check_timeout

__all__ = ["APPROVAL", "Approvals"]

APPROVAL = APPROVAL_KIND  # record kind
_STATUSES = {s.value for s in ApprovalStatus}
_POLL_MIN_S = 0.02
_POLL_MAX_S = 0.5

#: Tells whether ``approver`` is the requester under another name (itself, a
#: delegate of it, or one it descends from): such a vote is self-approval.
#: See :meth:`.delegation.Delegations.kinship`.
Kinship = Callable[[str, str], str | None]


class _Wait(NamedTuple):
    epoch: int
    timeout_s: float | None


class _Vote(NamedTuple):
    """What a vote's transition did: the record after it, whether it changed, the refusal."""

    approval: Approval | None
    changed: bool
    closed: ApprovalClosedError | None


class _Voted(NamedTuple):
    """What a vote did, as the audit writer turns it into ``approval.decided`` data."""

    approval: Approval
    approver: str
    verdict: str
    comment: str

    def __audit_data__(self) -> dict[str, Any]:
        a = self.approval
        return {
            "approval_id": a.approval_id,
            "action": a.action,
            "approver": self.approver,
            "verdict": self.verdict,
            "comment": self.comment,
            "status": a.status.value,
            "approvals": sum(d.verdict == "approve" for d in a.decisions),
            "quorum": a.quorum,
            "policy": a.policy_name,
            "audit_event_id": a.audit_event_id,
        }


def _expiry_data(a: Approval) -> dict[str, Any]:
    return {
        "approval_id": a.approval_id,
        "action": a.action,
        "deadline_ms": a.deadline_ms,
        "on_timeout": a.on_timeout,
        "policy": a.policy_name,
        "audit_event_id": a.audit_event_id,
    }


class Approvals:
    """Approval requests of one engine (``kw.approvals``).

    Created by gates (``require_approval``); decided here by people or
    agents other than the requester; awaited by :meth:`wait` / :meth:`await_`.
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        audit: AuditRecorder,
        kinship: Kinship,
    ) -> None:
        self._store = store
        self._clock = clock
        self._audit = audit
        self._kinship = kinship
        self._signals = Signals()

    # -- creation (used by the gates) ----------------------------------------------
    def _create(
        self, approval: Approval, on_create: Callable[[], object] | None = None
    ) -> Approval:
        """Store ``approval`` unless one with its id exists; return the stored one.

        ``on_create`` runs inside the atomic section when this call creates it
        (the gate records ``action.requested`` there, before any approver can
        see the approval and record ``approval.decided``).
        """

        def create(current: Approval | None) -> tuple[Approval | None, Approval]:
            if current is not None:
                return current, current
            if on_create is not None:
                on_create()
            return approval, approval

        return self._store.update_record(APPROVAL, approval.approval_id, Approval, create)

    # -- reads -------------------------------------------------------------------------
    def get(self, approval_id: str) -> Approval:
        """The approval as it stands now (a due deadline applied).

        Raises:
            ApprovalNotFoundError: no approval has this id.
        """
        _check_id(approval_id)
        stored = self._store.get_record(APPROVAL, approval_id, Approval)
        if stored is None:
            raise ApprovalNotFoundError(f"no approval {approval_id!r}")
        return self._expired(stored)

    aget = io_twin(get)

    def list(self, status: str | None = "pending") -> builtins.list[Approval]:
        """Approvals with ``status`` (``pending`` by default; None: all), oldest first."""
        if status is not None and (not isinstance(status, str) or status not in _STATUSES):
            raise InvalidRequestError(
                "status", status, f"expected one of {', '.join(sorted(_STATUSES))} or None"
            )
        pending = self._store.list_records(APPROVAL, Approval, ApprovalStatus.PENDING.value)
        for a in pending:  # expire what is due, so it is listed where it belongs
            self._expired(a)
        return self._store.list_records(APPROVAL, Approval, status)

    def sweep(self) -> builtins.list[Approval]:
        """Expire every pending approval past its deadline; return those expired now."""
        pending = self._store.list_records(APPROVAL, Approval, ApprovalStatus.PENDING.value)
        return [a for a in map(self._expired, pending) if a.status is ApprovalStatus.EXPIRED]

    def _expired(self, approval: Approval) -> Approval:
        """Apply a due deadline to a stored approval: persist it once, audit it once."""
        if expire_if_due(approval, self._clock.now_ms()) is approval:
            return approval

        def expire(current: Approval | None) -> tuple[Approval | None, tuple[Approval, bool]]:
            assert current is not None  # approvals are never deleted
            new = expire_if_due(current, self._clock.now_ms())
            if new is not current:  # audited before anyone can see it (see _transition)
                self._audit_expiry(new)
            return new, (new, new is not current)

        current, changed = self._store.update_record(
            APPROVAL, approval.approval_id, Approval, expire
        )
        if changed:
            self._signals.notify(current.approval_id)
        return current

    def _audit_expiry(self, approval: Approval) -> None:
        self._audit(
            "approval.expired",
            approval.requester,
            None,
            _expiry_data(approval),
            ts=approval.decided_at_ms,
        )

    # -- decisions -------------------------------------------------------------------
    def approve(self, approval_id: str, approver: str, comment: str = "") -> Approval:
        """Record ``approver``'s approval; returns the approval as it stands after it.

        Raises:
            ApprovalNotFoundError: unknown id.
            NotAnApproverError: the requester (or a delegate of it), or not
                among the policy's ``approvers``.
            ApprovalClosedError: no longer pending (decided or expired).
            InvalidRequestError: bad arguments, or contradicting an earlier vote.
        """
        return self._vote(approval_id, approver, "approve", comment)

    def deny(self, approval_id: str, approver: str, reason: str = "") -> Approval:
        """Deny: one eligible deny decides. Raises as :meth:`approve`."""
        return self._vote(approval_id, approver, "deny", reason)

    async def aapprove(self, approval_id: str, approver: str, comment: str = "") -> Approval:
        """Async twin of :meth:`approve` (store I/O runs off the event loop)."""
        return await self._avote(approval_id, approver, "approve", comment)

    async def adeny(self, approval_id: str, approver: str, reason: str = "") -> Approval:
        """Async twin of :meth:`deny`."""
        return await self._avote(approval_id, approver, "deny", reason)

    def _transition(
        self, approver: str, verdict: str, comment: str
    ) -> Callable[[Approval | None], tuple[Approval | None, _Vote]]:
        now = self._clock.now_ms  # read inside the atomic section (late votes expire)

        # The entry is recorded inside the atomic section, before the new state
        # is visible: a gate that sees the decision and records its
        # ``action.executed`` always comes after the ``approval.decided`` in the
        # chain (recording only queues the entry).
        def vote(current: Approval | None) -> tuple[Approval | None, _Vote]:
            if current is None:
                return None, _Vote(None, False, None)
            try:
                new = decide_approval(current, approver, verdict, comment, now())
            except ApprovalClosedError as closed:
                # A late vote expires the approval: persist that, then refuse.
                if closed.approval is not current:
                    self._audit_expiry(closed.approval)
                return closed.approval, _Vote(
                    closed.approval, closed.approval is not current, closed
                )
            # Only the call that changed the record audits it (a repeat vote is a no-op).
            if new is not current:
                self._audit(
                    "approval.decided",
                    approver,
                    None,
                    _Voted(new, approver, verdict, comment),
                    ts=new.decisions[-1].at_ms,
                )
            return new, _Vote(new, new is not current, None)

        return vote

    def _check_vote(self, approval_id: str, approver: str, verdict: str, comment: str) -> None:
        _check_id(approval_id)
        check_identity(approver, "approver")
        check_text(comment, "comment" if verdict == "approve" else "reason")

    def _lineage_check(self, approval: Approval | None, approver: str) -> None:
        if approval is None:
            return
        kin = self._kinship(approval.requester, approver)
        if kin is None:
            return
        requester, approval_id = approval.requester, approval.approval_id
        if kin == "itself":
            why = (
                f"{approver!r} requested approval {approval_id!r} and cannot decide its own request"
            )
        elif kin == "revoked":
            why = f"{approver!r} was revoked and can decide nothing"
        elif kin == "relative":
            why = (
                f"{approver!r} and the requester {requester!r} were delegated by the same "
                f"agent and {approver!r} cannot decide approval {approval_id!r}"
            )
        elif kin == "delegate":
            why = (
                f"{approver!r} is a delegate of the requester {requester!r} "
                f"and cannot decide approval {approval_id!r}"
            )
        else:
            why = (
                f"{approver!r} delegated to the requester {requester!r} "
                f"and cannot decide approval {approval_id!r}"
            )
        raise NotAnApproverError(why)

    def _vote(self, approval_id: str, approver: str, verdict: str, comment: str) -> Approval:
        self._check_vote(approval_id, approver, verdict, comment)
        self._lineage_check(self._store.get_record(APPROVAL, approval_id, Approval), approver)
        outcome = self._store.update_record(
            APPROVAL, approval_id, Approval, self._transition(approver, verdict, comment)
        )
        return self._voted(approval_id, outcome)

    async def _avote(self, approval_id: str, approver: str, verdict: str, comment: str) -> Approval:
        self._check_vote(approval_id, approver, verdict, comment)
        self._lineage_check(
            await self._store.aget_record(APPROVAL, approval_id, Approval), approver
        )
        outcome = await self._store.aupdate_record(
            APPROVAL, approval_id, Approval, self._transition(approver, verdict, comment)
        )
        return self._voted(approval_id, outcome)

    def _voted(self, approval_id: str, outcome: _Vote) -> Approval:
        approval, changed, closed = outcome
        if approval is None:
            raise ApprovalNotFoundError(f"no approval {approval_id!r}")
        if changed:  # audited in the transition
            self._signals.notify(approval_id)
        if closed is not None:
            raise closed
        return approval

    # -- waiting ---------------------------------------------------------------------
    def _wait_flow(
        self, approval_id: str, timeout_s: float | None
    ) -> Generator[_Wait, Approval, Approval]:
        """Decide after each look at the approval whether to return or sleep, and how long."""
        timeout_s = check_timeout(timeout_s)
        clock = self._clock
        deadline = None if timeout_s is None else clock.monotonic() + timeout_s
        poll_s = _POLL_MIN_S
        while True:
            epoch = self._signals.epoch
            approval = yield _Wait(epoch, None)  # the driver reads the approval
            if approval.status is not ApprovalStatus.PENDING:
                return approval
            wait_s: float | None = None
            if approval.deadline_ms is not None:
                wait_s = max(0.0, (approval.deadline_ms - clock.now_ms()) / 1000.0)
            if deadline is not None:
                remaining = deadline - clock.monotonic()
                if remaining <= 0:
                    raise ApprovalTimeoutError(
                        f"approval {approval_id!r} is still pending after {timeout_s} s "
                        "(it stays pending; wait again or re-run the gate)",
                        approval_id=approval_id,
                    )
                wait_s = remaining if wait_s is None else min(wait_s, remaining)
            if self._store.cross_process:  # another process may decide it
                wait_s = poll_s if wait_s is None else min(wait_s, poll_s)
                poll_s = min(poll_s * 2, _POLL_MAX_S)
            yield _Wait(epoch, wait_s)

    def wait(self, approval_id: str, timeout_s: float | None = None) -> Approval:
        """Block until the approval is decided or expires; return it.

        Raises:
            ApprovalTimeoutError: ``timeout_s`` ran out first (it stays pending).
            ApprovalNotFoundError: unknown id.
            StoreUnavailableError: the engine closed while waiting.
            EventLoopBlockedError: it is still pending and this thread runs
                an event loop: use :meth:`await_` there.
        """
        _check_id(approval_id)
        flow = self._wait_flow(approval_id, timeout_s)
        step = next(flow)
        try:
            while True:
                step = flow.send(self.get(approval_id))
                if in_running_loop():  # still pending: waiting here would freeze the loop
                    raise EventLoopBlockedError(
                        "kw.approvals.wait(...)",
                        "await kw.approvals.await_(...)",
                        "an approval",
                        approval_id=approval_id,
                    )
                self._signals.sleep((approval_id,), step.epoch, step.timeout_s, self._clock)
                self._check_open()
                step = next(flow)
        except StopIteration as done:
            decided: Approval = done.value
            return decided

    async def await_(self, approval_id: str, timeout_s: float | None = None) -> Approval:
        """Async twin of :meth:`wait` (``await kw.approvals.await_(id)``); never blocks the loop."""
        _check_id(approval_id)
        flow = self._wait_flow(approval_id, timeout_s)
        step = next(flow)
        try:
            while True:
                step = flow.send(await self.aget(approval_id))
                await self._signals.asleep((approval_id,), step.epoch, step.timeout_s, self._clock)
                self._check_open()
                step = next(flow)
        except StopIteration as done:
            decided: Approval = done.value
            return decided

    def _check_open(self) -> None:
        if self._signals.closed:
            raise StoreUnavailableError("the engine closed while waiting for an approval")

    def close(self) -> None:
        """Wake every waiter (they fail with StoreUnavailableError)."""
        self._signals.close()


def _check_id(approval_id: object) -> None:
    check_key(approval_id, "approval_id")
