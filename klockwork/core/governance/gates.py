"""Gates: whether an agent's action runs, is refused with reasons, or waits for approval.

``kw.policies`` holds the rules (:mod:`klockwork.core.governance.policy` decides);
``kw.gates`` applies them. One gate decision, in order:

1. the agent's capabilities (:mod:`klockwork.core.governance.delegation`): outside
   them, or revoked/expired → denied ``CAPABILITY_DENIED``;
2. its circuit breaker: open → denied ``CIRCUIT_OPEN``;
3. the most specific policy (no policy → the engine's ``default_effect``,
   deny unless configured otherwise, reason ``NO_POLICY``).

``require_approval`` creates an approval (``kw.approvals``); :meth:`Gates.gate`
then waits for it. Every outcome is one audit entry (``action.executed``,
``action.denied``, ``action.requested``; an approved request adds
``action.executed`` when its gate completes) and one stored gate record,
keyed by ``audit_event_id``. With an ``event_id`` the key is derived from it,
which makes the gate idempotent: the same ``event_id`` returns the stored
outcome (updated once its approval is decided) and creates no second
approval or audit entry, from any process sharing the store.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Literal

from klockwork.core.clock import Clock, in_running_loop
from klockwork.core.errors import EventLoopBlockedError, InvalidRequestError
from klockwork.core.events import AuditRecorder
from klockwork.core.governance.approval_desk import Approvals
from klockwork.core.governance.approvals import (
    CIRCUIT_OPEN,
    Approval,
    ApprovalClosedError,
    ApprovalStatus,
    BreakerConfig,
    BreakerState,
    changes_breaker,
    denial_reason,
    expire_if_due,
    is_open,
    new_approval,
    on_report,
    outcome,
    reset,
)
from klockwork.core.governance.delegation import Delegations
from klockwork.core.governance.outcomes import (
    BREAKER,
    CAPABILITY_DENIED,
    GATE,
    GATE_NAMES,
    OUTCOME_KIND,
    REPORT_STATUSES,
    ActionResult,
    GateAnswer,
    GateEntry,
    GateRecord,
    action_digest,
    approval_id_for,
    check_gate_args,
    edit_event_id,
    explain_approval,
    explain_policy,
    gate_key,
    new_gate_key,
    refusal_text,
    result_fields,
    waits,
)
from klockwork.core.governance.policies import Policies
from klockwork.core.governance.policy import Effect, Policy, decide
from klockwork.core.model import _build
from klockwork.core.stores.base import Store, io_twin
from klockwork.core.validation import (
    check_json_object,
    check_key,
    check_text,
    check_timeout,
)

__all__ = ["CAPABILITY_DENIED", "ActionResult", "GateAnswer", "GateRecord", "Gates", "Policies"]


class Gates:
    """Gate decisions of one engine (``kw.gates``)."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        audit: AuditRecorder,
        policies: Policies,
        approvals: Approvals,
        delegations: Delegations,
        default_effect: str,
    ) -> None:
        self._store = store
        self._clock = clock
        self._audit = audit
        self._policies = policies
        self._approvals = approvals
        self._delegations = delegations
        self._default = Effect(default_effect)
        #: When a breaker opens and how long it stays open.
        self.breaker = BreakerConfig()

    # -- decisions -------------------------------------------------------------------
    def _judge(
        self, agent_id: str, action: str, metadata: Mapping[str, Any] | None, now: int
    ) -> tuple[Effect, dict[str, Any]]:
        """The pure part: capability, breaker, policy.

        Returns the effect and the :class:`ActionResult` fields (``audit_event_id``
        and ``approval_id`` still None), so the caller builds the result once.
        """
        refusal = self._delegations.allows(agent_id, action, now)
        if refusal is not None:
            return Effect.DENY, result_fields("denied", None, CAPABILITY_DENIED, [], refusal)
        state = self._store.get_record(BREAKER, agent_id, BreakerState)
        if state is not None and is_open(state, now, self.breaker):
            return Effect.DENY, result_fields(
                "denied",
                None,
                CIRCUIT_OPEN,
                [],
                f"the circuit breaker of {agent_id!r} is open after "
                f"{state.consecutive_failures} consecutive failures",
            )
        d = decide(self._policies.index, agent_id, action, metadata, self._default)
        effect = d.effect
        if effect is Effect.ALLOW:
            return effect, result_fields(
                "executed", d.policy_name, None, d.conditions_evaluated, ""
            )
        return effect, result_fields(
            "denied" if effect is Effect.DENY else "requested",
            d.policy_name,
            d.reason if effect is Effect.DENY else None,
            d.conditions_evaluated,
            explain_policy(action, d.policy_name, d.reason, d.conditions_evaluated),
        )

    def can_i(
        self, agent_id: str, action: str, metadata: Mapping[str, Any] | None = None
    ) -> ActionResult:
        """Dry run: what :meth:`execute` would decide now. No audit entry, no approval."""
        check_gate_args(agent_id, action, metadata, None)
        return _build(
            ActionResult, self._judge(agent_id, action, metadata, self._clock.now_ms())[1]
        )

    def execute(
        self,
        agent_id: str,
        action: str,
        metadata: Mapping[str, Any] | None = None,
        event_id: str | None = None,
        *,
        session_id: str | None = None,
    ) -> ActionResult:
        """Decide once, never block: ``executed``, ``requested`` (approval) or ``denied``.

        Idempotent on ``event_id``: a repeat returns the stored outcome (with
        its approval's decision applied) and records nothing new.

        Raises:
            InvalidRequestError: bad arguments; nothing recorded.
            StoreUnavailableError: the store cannot answer; nothing runs.
        """
        metadata_json = check_gate_args(agent_id, action, metadata, event_id)
        # The digest binds an event_id to one action; without one, nothing
        # ever looks this record up by id to compare it (stored as "").
        digest = ""
        if event_id is not None:
            digest = action_digest(agent_id, action, metadata, metadata_json)
            stored = self._store.get_record(GATE, gate_key(event_id), GateRecord)
            if stored is not None:
                # An event_id stands for one action: its outcome (an approval
                # above all) is never handed to another one.
                if stored.digest and stored.digest != digest:
                    raise InvalidRequestError(
                        "event_id",
                        event_id,
                        f"was used for another action (agent, action or metadata differ from "
                        f"the {stored.action!r} it decided)",
                    )
                return self._settled(stored)
        now = self._clock.now_ms()
        effect, fields = self._judge(agent_id, action, metadata, now)
        key = gate_key(event_id) if event_id is not None else new_gate_key()
        approval: Approval | None = None
        if effect is Effect.REQUIRE_APPROVAL:
            policy = self._policies.get(fields["policy_name"] or "")
            if policy is None:  # the default effect asks for approval
                policy = Policy(name="default", action="*", effect=Effect.REQUIRE_APPROVAL)
            approval = new_approval(
                approval_id_for(key), agent_id, action, dict(metadata or {}), policy, now, event_id
            ).model_copy(update={"audit_event_id": key})
        fields["audit_event_id"] = key
        if approval is not None:
            fields["approval_id"] = approval.approval_id
        result = _build(ActionResult, fields)
        record = _build(
            GateRecord,
            {
                "audit_event_id": key,
                "event_id": event_id,
                "agent_id": agent_id,
                "session_id": session_id,
                "action": action,
                "metadata": dict(metadata or {}),
                "result": result,
                "created_at_ms": now,
                "reported": None,
                "digest": digest,
                "replaced_by": None,
            },
        )
        kind = OUTCOME_KIND[result.status]

        def audit() -> None:
            self._audit(
                kind,
                agent_id,
                session_id,
                GateEntry(result, action, record.metadata, event_id, metadata_json),
                ts=now,
            )

        if approval is not None:  # first, so a stored "requested" always has its approval
            # Audited by whoever creates the approval, before approvers can see it.
            self._approvals._create(approval, audit)

        def create(current: GateRecord | None) -> tuple[GateRecord | None, GateRecord]:
            if current is not None:
                return current, current
            if approval is None:
                # Recorded inside the atomic section: if the audit trail cannot
                # take it, nothing is stored (a retry with the same event_id
                # must not find an unaudited "executed").
                audit()
            return record, record

        stored = self._store.update_record(GATE, key, GateRecord, create)
        if stored is not record:  # a concurrent twin with the same event_id won
            return self._settled(stored)
        return result

    def _settled(self, record: GateRecord) -> ActionResult:
        """A stored outcome, with its approval's decision applied once (and audited once)."""
        result = record.result
        if result.status != "requested" or result.approval_id is None:
            return result
        approval = self._approvals.get(result.approval_id)
        return self._complete(record, approval)

    def _complete(self, record: GateRecord, approval: Approval) -> ActionResult:
        approval = expire_if_due(approval, self._clock.now_ms())
        verdict = outcome(approval)
        if verdict == "pending":
            return record.result
        reason = denial_reason(approval)
        final = record.result.model_copy(
            update={
                "status": "executed" if verdict == "allow" else "denied",
                "denial_reason": reason,
                "message": explain_approval(approval),
            }
        )

        def settle(current: GateRecord | None) -> tuple[GateRecord | None, ActionResult]:
            assert current is not None
            if current.result.status != "requested":
                return current, current.result
            # Audited once, by the call that settles it, with the settling.
            self._audit(
                OUTCOME_KIND[final.status],
                record.agent_id,
                record.session_id,
                GateEntry(final, record.action, record.metadata, record.event_id),
                ts=approval.decided_at_ms,
            )
            return current.model_copy(update={"result": final}), final

        return self._store.update_record(GATE, record.audit_event_id, GateRecord, settle)

    # -- one call per decision, for the edges -------------------------------------------
    def ask(
        self,
        agent_id: str,
        action: str,
        metadata: Mapping[str, Any] | None = None,
        event_id: str | None = None,
        *,
        session_id: str | None = None,
    ) -> GateAnswer:
        """Decide once, never block, and say everything an edge needs to act.

        What :meth:`execute` decides (idempotent on ``event_id`` alike), with
        the approval's decision applied once made, the approval itself while
        a human must decide, and for a refusal the sentence for people and
        models (:func:`~klockwork.core.governance.outcomes.refusal_text`).
        An integration maps this one answer to a tool message, an
        ``interrupt()`` or a wait, without asking again.

        Raises:
            InvalidRequestError: bad arguments; nothing recorded.
            StoreUnavailableError: the store cannot answer; nothing runs.
        """
        result = self.execute(agent_id, action, metadata, event_id, session_id=session_id)
        replaced_by = None
        if result.status == "denied" and result.approval_id and result.audit_event_id:
            record = self._store.get_record(GATE, result.audit_event_id, GateRecord)
            replaced_by = None if record is None else record.replaced_by
        return self._answer_for(action, result, replaced_by)

    aask = io_twin(ask)

    def answer(
        self,
        audit_event_id: str,
        approver: str,
        decision: Literal["approve", "reject", "edit"],
        comment: str = "",
        *,
        edited: Mapping[str, Any] | None = None,
    ) -> GateAnswer:
        """Apply a human's decision to the approval a gate waits for; return the gate's answer.

        An **edit** is a new action: the original request is declined (one
        vote: "replaced by an edit") and the edited one — the same agent and
        action with the ``edited`` metadata — is judged by the policies again,
        under an event id of its own. A deny still wins; an edit that still
        needs approval opens a new approval (the answer returned is then
        pending on it). Nothing the approver wrote can run unjudged.

        Idempotent, so an edge may apply the same answer again (LangGraph
        re-validates a stored resume value on every re-run): an approver who
        already voted, or an approval already decided or expired (out of
        band, e.g. from the CLI), changes nothing — the stored outcome wins.

        Args:
            audit_event_id: the gate's id (``GateAnswer.result.audit_event_id``).
            approver: who decides; checked as by :meth:`Approvals.approve`.
            decision: ``"approve"``, ``"reject"`` or ``"edit"``.
            comment: the approver's comment, or the reason of a rejection.
            edited: for ``"edit"``: the metadata of the action as edited.

        Raises:
            NotAnApproverError: ``approver`` may not decide it (the approval
                stays pending).
            InvalidRequestError: an unknown gate, one that asked for no
                approval, a bad decision, or edited metadata that is not JSON.
        """
        if decision not in ("approve", "reject", "edit"):
            raise InvalidRequestError(
                "decision", decision, "expected 'approve', 'reject' or 'edit'"
            )
        if (decision == "edit") != (edited is not None):
            raise InvalidRequestError("edited", edited, "goes with decision 'edit' (only)")
        if edited is not None:
            check_json_object(dict(edited), "edited")
        record = self._store.get_record(GATE, audit_event_id, GateRecord)
        if record is None:
            raise InvalidRequestError("audit_event_id", audit_event_id, "no such gate event")
        approval_id = record.result.approval_id
        if approval_id is None:
            raise InvalidRequestError(
                "audit_event_id", audit_event_id, "this gate asked for no approval"
            )
        approval = self._approvals.get(approval_id)
        mine = [d for d in approval.decisions if d.approver == approver]
        edit_id = None if edited is None else edit_event_id(record, edited)
        if approval.status is ApprovalStatus.PENDING and not mine:
            if edit_id is not None:
                comment = f"{comment} [replaced by an edit: {edit_id}]".strip()
            vote = self._approvals.approve if decision == "approve" else self._approvals.deny
            with contextlib.suppress(ApprovalClosedError):  # decided or expired meanwhile
                decided = vote(approval_id, approver, comment)
                mine = [d for d in decided.decisions if d.approver == approver]
        if edit_id is not None and any(edit_id in d.comment for d in mine):
            # The edit replaced the request: the edited action is judged anew.
            def replaced(current: GateRecord | None) -> tuple[GateRecord | None, None]:
                if current is None or current.replaced_by == edit_id:
                    return current, None
                return current.model_copy(update={"replaced_by": edit_id}), None

            self._store.update_record(GATE, record.audit_event_id, GateRecord, replaced)
            return self.ask(
                record.agent_id,
                record.action,
                edited,
                edit_id,
                session_id=record.session_id,
            )
        return self._answer_for(record.action, self._settled(record))

    aanswer = io_twin(answer)

    def _answer_for(
        self, action: str, result: ActionResult, replaced_by: str | None = None
    ) -> GateAnswer:
        approval = self._approvals.get(result.approval_id) if result.approval_id else None
        refusal = refusal_text(action, result, approval) if result.status == "denied" else ""
        return GateAnswer(result, approval, refusal, action, replaced_by)

    def gate(
        self,
        agent_id: str,
        action: str,
        metadata: Mapping[str, Any] | None = None,
        event_id: str | None = None,
        timeout_s: float | None = None,
        *,
        session_id: str | None = None,
    ) -> ActionResult:
        """Decide and, for an approval, wait for it: returns only when the action may run.

        Raises:
            GateDeniedError: denied (``reason``, ``policy``, ``conditions``, ``approval_id``).
            ApprovalTimeoutError: ``timeout_s`` ran out before the approval was
                decided (it stays pending; re-run with the same ``event_id``).
            EventLoopBlockedError: the action needs an approval and this
                thread runs an event loop: use :meth:`agate` there. Checked
                before anything is recorded (no approval is opened).
        """
        check_timeout(timeout_s)  # before anything is recorded
        if in_running_loop():
            self._refuse_waiting_on_loop(agent_id, action, metadata, event_id)
        result = self.execute(agent_id, action, metadata, event_id, session_id=session_id)
        if waits(result):
            try:
                approval = self._approvals.wait(result.approval_id or "", timeout_s)
            except EventLoopBlockedError as exc:  # the policies changed since the check
                raise exc.as_call(*GATE_NAMES) from None
            return self._settle_waited(action, result, approval)
        return self._finish(action, result, None, None)

    def _refuse_waiting_on_loop(
        self, agent_id: str, action: str, metadata: Mapping[str, Any] | None, event_id: str | None
    ) -> None:
        """Raise if a sync gate on an event loop's thread would wait for an approval."""
        stored = (
            None
            if not isinstance(event_id, str)
            else self._store.get_record(GATE, gate_key(event_id), GateRecord)
        )
        result = (
            self._settled(stored) if stored is not None else self.can_i(agent_id, action, metadata)
        )
        if result.status == "requested":
            raise EventLoopBlockedError(*GATE_NAMES, "an approval", approval_id=result.approval_id)

    async def agate(
        self,
        agent_id: str,
        action: str,
        metadata: Mapping[str, Any] | None = None,
        event_id: str | None = None,
        timeout_s: float | None = None,
        *,
        session_id: str | None = None,
    ) -> ActionResult:
        """Async twin of :meth:`gate`; waiting never blocks the event loop."""
        check_timeout(timeout_s)
        result = await self._store.run_io(
            self.execute, agent_id, action, metadata, event_id, session_id=session_id
        )
        if waits(result):
            approval = await self._approvals.await_(result.approval_id or "", timeout_s)
            # Settling writes the gate record: off the event loop.
            return await self._store.run_io(self._settle_waited, action, result, approval)
        return self._finish(action, result, None, None)

    def _settle_waited(self, action: str, result: ActionResult, approval: Approval) -> ActionResult:
        record = self._store.get_record(GATE, result.audit_event_id or "", GateRecord)
        return self._finish(action, result, record, approval)

    def _finish(
        self,
        action: str,
        result: ActionResult,
        record: GateRecord | None,
        approval: Approval | None,
    ) -> ActionResult:
        """The end of gate/agate: apply a decided approval, raise on a denial."""
        if approval is not None:
            assert record is not None  # stored before its approval could be decided
            result = self._complete(record, approval)
        if result.status == "denied":
            raise GateAnswer(result, approval, "", action).denied_error()
        return result

    def get(self, audit_event_id: str) -> GateRecord | None:
        """The stored gate record of ``audit_event_id``, or None."""
        return self._store.get_record(GATE, audit_event_id, GateRecord)

    def outcome(self, audit_event_id: str) -> GateAnswer | None:
        """A stored gate's answer now, as :meth:`ask` gives it (None: no such gate).

        Its approval's decision is applied once made (and audited once), so
        an edge that kept only the gate's id learns how it ended.
        """
        record = self.get(audit_event_id)
        if record is None:
            return None
        return self._answer_for(record.action, self._settled(record), record.replaced_by)

    # -- outcomes and the breaker -----------------------------------------------------
    def report(self, audit_event_id: str, status: str, message: str = "") -> bool:
        """Report how an executed action went: ``success``, ``failure`` or ``partial``.

        ``breaker.threshold`` consecutive failures of one agent open its
        breaker for ``breaker.cooldown_s``. Reporting the same action twice
        changes nothing (returns False).

        Raises:
            InvalidRequestError: unknown status or id, or the action did not execute.
        """
        check_key(audit_event_id, "audit_event_id")
        if not isinstance(status, str) or status not in REPORT_STATUSES:
            raise InvalidRequestError(
                "status", status, "expected 'success', 'failure' or 'partial'"
            )
        check_text(message, "message")

        def mark(current: GateRecord | None) -> tuple[GateRecord | None, GateRecord | None]:
            if current is None:
                raise InvalidRequestError("audit_event_id", audit_event_id, "no such gate event")
            if current.result.status != "executed":
                raise InvalidRequestError(
                    "audit_event_id", audit_event_id, f"the action was {current.result.status}"
                )
            if current.reported is not None:
                return current, None
            new = _build(GateRecord, {**current.__dict__, "reported": status})
            return new, new

        marked = self._store.update_record(GATE, audit_event_id, GateRecord, mark)
        if marked is None:
            return False
        agent_id = marked.agent_id
        if not changes_breaker(self._store.get_record(BREAKER, agent_id, BreakerState), status):
            # Nothing to write (the usual success): the report takes its
            # place at this read, before any concurrent one that changes it.
            return True
        now = self._clock.now_ms()
        config = self.breaker

        def apply(current: BreakerState | None) -> tuple[BreakerState | None, None]:
            state = current or BreakerState(agent_id=agent_id)
            new, opened = on_report(state, status, now, config)
            if opened:  # audited with the opening itself
                self._audit(
                    "breaker.opened",
                    agent_id,
                    marked.session_id,
                    {
                        "consecutive_failures": new.consecutive_failures,
                        "cooldown_s": config.cooldown_s,
                        "audit_event_id": audit_event_id,
                        "message": message,
                    },
                    ts=now,
                )
            return (new if new is not state else current), None

        self._store.update_record(BREAKER, agent_id, BreakerState, apply)
        return True

    def reset_breaker(self, agent_id: str) -> None:
        """Close ``agent_id``'s breaker and clear its failure count."""
        check_key(agent_id, "agent_id")

        def close(current: BreakerState | None) -> tuple[BreakerState | None, None]:
            return (None if current is None else reset(current)), None

        self._store.update_record(BREAKER, agent_id, BreakerState, close)

    def breaker_state(self, agent_id: str) -> BreakerState:
        """``agent_id``'s breaker as stored (closed when never reported)."""
        check_key(agent_id, "agent_id")
        state = self._store.get_record(BREAKER, agent_id, BreakerState)
        return state or BreakerState(agent_id=agent_id)
