"""Deciding approvals as the signed-in principal: the rules the API and the inbox share.

Whoever decides is the principal of the key (an API key, or the key an
inbox session stands for), never a name from the request. Besides the
engine's own rules (the requester and its delegates never decide their
request; the policy names who may), a vote by the person a key names as the
``owner`` of the requesting agent is refused: whoever runs an agent does not
approve its actions. Every refusal is audited (``access.denied``) through
the gatekeeper; the caller turns the :class:`ApiError` into JSON or a page.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import Field

from klockwork.core.errors import ApprovalNotFoundError, NotAnApproverError
from klockwork.core.governance.approvals import Approval, ApprovalClosedError, ApprovalStatus
from klockwork.core.governance.outcomes import GateAnswer, gate_key
from klockwork.core.governance.policy import ConditionResult
from klockwork.core.validation import same_identity
from klockwork.server.context import Server
from klockwork.server.errors import ApiError
from klockwork.server.keys import ApiKey

#: How the engine names an edited request's event id: ``<original>#edit-<digest>``.
EDIT_MARK = "#edit-"

__all__ = ["ApprovalView", "Decisions", "Edited"]


class ApprovalView(Approval):
    """An approval with why it needs a human: the policy's conditions, as evaluated.

    ``session_id`` is the requesting agent's session; ``now_ms`` the server's
    clock when this was read (for a deadline countdown).
    """

    conditions_evaluated: list[ConditionResult] = Field(default_factory=list)
    reason: str = ""
    session_id: str | None = None
    now_ms: int = 0


@dataclass(frozen=True)
class Edited:
    """What an edit did: the approval it replaced (now declined) and the edited action's answer.

    Attributes:
        replaced: the original approval, as it stands after the edit.
        replaced_by: the event id of the edited action (its own gate).
        answer: the edited action's gate answer (executed, denied, or
            pending on a new approval).
    """

    replaced: Approval
    replaced_by: str
    answer: GateAnswer


class Decisions:
    """Reading and deciding approvals on behalf of one key, with the server's rules."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._kw = server.kw

    def view(self, approval: Approval) -> ApprovalView:
        """``approval`` with the conditions and the reason that sent it to a human."""
        kw = self._kw
        record = kw.gates.get(approval.audit_event_id) if approval.audit_event_id else None
        extra: dict[str, Any] = {"now_ms": kw.clock.now_ms()}
        if record is not None:
            extra.update(
                conditions_evaluated=record.result.conditions_evaluated,
                reason=record.result.message,
                session_id=record.session_id,
            )
        return ApprovalView.model_validate({**approval.model_dump(), **extra})

    @staticmethod
    def visible(approval: Approval, key: ApiKey) -> bool:
        """An agent key sees only what its agent asked for; people see everything."""
        return key.role != "agent" or approval.requester == key.principal

    def fetch(self, request: Request, approval_id: str, key: ApiKey) -> Approval:
        """The approval ``key`` may see; raises 404 otherwise.

        Another agent's approval is answered exactly as an unknown one (its
        existence is not told), but that refusal is audited.
        """
        try:
            approval = self._kw.approvals.get(approval_id)
        except ApprovalNotFoundError:
            approval = None
        message = f"no approval {approval_id!r}"
        if approval is None:
            raise ApiError(404, "approval_not_found", message, "approval_id")
        if not self.visible(approval, key):
            raise self._server.gatekeeper.refuse(
                request,
                404,
                "approval_not_found",
                message,
                key,
                argument="approval_id",
                approval_id=approval_id,
            )
        return approval

    def runs_the_agent(self, approval: Approval, key: ApiKey) -> bool:
        """True when the principal of ``key`` runs the agent that asked (or its root agent)."""
        return self._server.keys.runs(key.principal, approval.requester)

    def edited_by(self, approval: Approval) -> str | None:
        """Who wrote the arguments of ``approval``, when it replaces a request they edited."""
        edit_id = approval.event_id or ""
        base, mark, _ = edit_id.rpartition(EDIT_MARK)
        if not mark:
            return None
        # The edited request is keyed by its own event id when it had one, else by its id.
        gates = self._kw.gates
        record = gates.get(gate_key(base)) or gates.get(base)
        if record is None or record.replaced_by != edit_id or record.result.approval_id is None:
            return None
        original = self._kw.approvals.get(record.result.approval_id)
        editors = [d.approver for d in original.decisions if edit_id in d.comment]
        return editors[0] if editors else None

    def check_may_decide(self, request: Request, approval: Approval, key: ApiKey) -> None:
        """Refuse (403, audited) the person who runs the agent that asked, and the
        editor of an edited request: the arguments they wrote need another pair of eyes."""
        gatekeeper = self._server.gatekeeper
        if self.runs_the_agent(approval, key):
            raise gatekeeper.refuse(
                request,
                403,
                "own_agent",
                f"{key.principal!r} runs {approval.requester!r}, the agent that asked: "
                "someone else must decide",
                key,
                approval_id=approval.approval_id,
            )
        editor = self.edited_by(approval)
        if editor is not None and same_identity(editor, key.principal):
            raise gatekeeper.refuse(
                request,
                403,
                "own_edit",
                f"{key.principal!r} edited these arguments: someone else must decide them",
                key,
                approval_id=approval.approval_id,
            )

    def _not_an_approver(
        self, request: Request, exc: NotAnApproverError, key: ApiKey, approval_id: str
    ) -> ApiError:
        return self._server.gatekeeper.refuse(
            request, 403, "not_an_approver", str(exc), key, approval_id=approval_id
        )

    def vote(
        self, request: Request, approval_id: str, key: ApiKey, verdict: str, note: str
    ) -> Approval:
        """Approve or deny as ``key``'s principal; a retried vote that counted answers again.

        Raises:
            ApiError: not found (404), the owner or a non-approver (403, audited).
            ApprovalClosedError: already decided or expired (409).
        """
        kw = self._kw
        approval = self.fetch(request, approval_id, key)
        self.check_may_decide(request, approval, key)
        try:
            if verdict == "approve":
                return kw.approvals.approve(approval_id, key.principal, comment=note)
            return kw.approvals.deny(approval_id, key.principal, reason=note)
        except NotAnApproverError as exc:
            raise self._not_an_approver(request, exc, key, approval_id) from None
        except ApprovalClosedError as exc:
            mine = [d.verdict for d in exc.approval.decisions if d.approver == key.principal]
            outcome = ApprovalStatus.APPROVED if verdict == "approve" else ApprovalStatus.DENIED
            if mine == [verdict] and exc.status is outcome:  # a retried vote that counted
                return exc.approval
            raise

    def edit(
        self,
        request: Request,
        approval_id: str,
        key: ApiKey,
        arguments: Mapping[str, Any],
        comment: str,
    ) -> Edited:
        """Replace the action's arguments as ``key``'s principal; the policies judge it again.

        Raises:
            ApiError: not found (404), the owner or a non-approver (403,
                audited), not asked for by a gate (409 ``not_editable``), or
                decided or expired before the edit counted (409).
            InvalidRequestError: arguments that are not a JSON object (422).
        """
        kw = self._kw
        approval = self.fetch(request, approval_id, key)
        self.check_may_decide(request, approval, key)
        if approval.audit_event_id is None:
            raise ApiError(409, "not_editable", "this approval was not asked for by a gate")
        if approval.status is not ApprovalStatus.PENDING:
            raise self.closed(approval)
        try:
            answer = kw.gates.answer(
                approval.audit_event_id, key.principal, "edit", comment, edited=arguments
            )
        except NotAnApproverError as exc:
            raise self._not_an_approver(request, exc, key, approval_id) from None
        record = kw.gates.get(approval.audit_event_id)
        replaced_by = None if record is None else record.replaced_by
        now = kw.approvals.get(approval_id)
        mine = [d.comment for d in now.decisions if d.approver == key.principal]
        if replaced_by is None or not any(replaced_by in c for c in mine):
            raise self.closed(now)  # decided or expired meanwhile: the edit changed nothing
        return Edited(now, replaced_by, answer)

    @staticmethod
    def closed(approval: Approval) -> ApiError:
        """The 409 of a decision that reached an approval no longer pending."""
        return ApiError(
            409,
            "approval_closed",
            f"approval {approval.approval_id!r} is already {approval.status.value}",
        )
