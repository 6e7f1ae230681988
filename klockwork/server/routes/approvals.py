"""Approvals: list, read, approve, deny, edit — as the key's principal, never as another.

An approver decides as the principal of their key. Besides the engine's
own rules (the requester and its delegates never decide their request; the
policy names who may), the server refuses a vote by the person a key names
as the ``owner`` of the requesting agent: whoever runs an agent does not
approve its actions. Every refusal is audited (``access.denied``).

An agent key sees only its own approvals (to follow what it asked for).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from klockwork.core.errors import ApprovalNotFoundError, NotAnApproverError
from klockwork.core.governance.approvals import Approval, ApprovalClosedError, ApprovalStatus
from klockwork.core.governance.outcomes import ActionResult
from klockwork.core.governance.policy import ConditionResult
from klockwork.server.context import Server
from klockwork.server.errors import ApiError, ErrorBody
from klockwork.server.keys import ApiKey

__all__ = ["ApprovalView", "EditOutcome", "router"]

StatusFilter = Literal["pending", "approved", "denied", "expired", "all"]


class ApprovalView(Approval):
    """An approval with why it needs a human: the policy's conditions, as evaluated.

    ``session_id`` is the requesting agent's session; ``now_ms`` the server's
    clock when this was read (for a deadline countdown).
    """

    conditions_evaluated: list[ConditionResult] = Field(default_factory=list)
    reason: str = ""
    session_id: str | None = None
    now_ms: int = 0


class Vote(BaseModel):
    """An approve or a deny: the comment (or the reason of a deny) is kept with the vote."""

    comment: str = Field(default="", max_length=4000)


class Edit(BaseModel):
    """An edit: the arguments the action should run with instead, judged again."""

    arguments: dict[str, Any]
    comment: str = Field(default="", max_length=4000)


class EditOutcome(BaseModel):
    """What an edit led to: the original approval (declined, replaced) and the new action.

    ``result`` is the edited action's gate decision (``executed``, ``denied``,
    or ``requested`` with ``approval`` when it needs approval again).
    """

    replaced: ApprovalView
    replaced_by: str | None
    result: ActionResult
    approval: ApprovalView | None = None


def router(server: Server) -> APIRouter:
    """``/v1/approvals``."""
    api = APIRouter(
        prefix="/v1/approvals",
        tags=["approvals"],
        responses={code: {"model": ErrorBody} for code in (401, 403, 404, 409, 422, 429, 503)},
    )
    kw = server.kw
    gatekeeper = server.gatekeeper
    reader = Depends(gatekeeper.require("agent", "approver", "admin"))
    decider = Depends(gatekeeper.require("approver", "admin"))

    def view(approval: Approval) -> ApprovalView:
        record = kw.gates.get(approval.audit_event_id) if approval.audit_event_id else None
        extra: dict[str, Any] = {"now_ms": kw.clock.now_ms()}
        if record is not None:
            extra.update(
                conditions_evaluated=record.result.conditions_evaluated,
                reason=record.result.message,
                session_id=record.session_id,
            )
        return ApprovalView.model_validate({**approval.model_dump(), **extra})

    def closed(approval: Approval) -> ApiError:
        return ApiError(
            409,
            "approval_closed",
            f"approval {approval.approval_id!r} is already {approval.status.value}",
        )

    def visible(approval: Approval, key: ApiKey) -> bool:
        return key.role != "agent" or approval.requester == key.principal

    def fetch(approval_id: str, key: ApiKey) -> Approval:
        try:
            approval = kw.approvals.get(approval_id)
        except ApprovalNotFoundError:
            approval = None
        if approval is None or not visible(approval, key):  # another agent's: not found
            raise ApiError(404, "approval_not_found", f"no approval {approval_id!r}", "approval_id")
        return approval

    def check_may_decide(request: Request, approval: Approval, key: ApiKey) -> None:
        root = approval.requester.split("/", 1)[0]
        owners = server.keys.owners_of(approval.requester) | server.keys.owners_of(root)
        if key.principal in owners:
            raise gatekeeper.refuse(
                request,
                403,
                "own_agent",
                f"{key.principal!r} runs {approval.requester!r}, the agent that asked: "
                "someone else must decide",
                key,
                approval_id=approval.approval_id,
            )

    def vote(request: Request, approval_id: str, key: ApiKey, verdict: str, note: str) -> Approval:
        approval = fetch(approval_id, key)
        check_may_decide(request, approval, key)
        try:
            if verdict == "approve":
                return kw.approvals.approve(approval_id, key.principal, comment=note)
            return kw.approvals.deny(approval_id, key.principal, reason=note)
        except NotAnApproverError as exc:
            raise gatekeeper.refuse(
                request, 403, "not_an_approver", str(exc), key, approval_id=approval_id
            ) from None
        except ApprovalClosedError as exc:
            mine = [d.verdict for d in exc.approval.decisions if d.approver == key.principal]
            outcome = ApprovalStatus.APPROVED if verdict == "approve" else ApprovalStatus.DENIED
            if mine == [verdict] and exc.status is outcome:  # a retried vote that counted
                return exc.approval
            raise

    @api.get("")
    def list_approvals(
        key: ApiKey = reader, status: StatusFilter = "pending"
    ) -> list[ApprovalView]:
        """Approvals, oldest first (an agent key: only its own)."""
        found = kw.approvals.list(status=None if status == "all" else status)
        return [view(a) for a in found if visible(a, key)]

    @api.get("/{approval_id}")
    def get_approval(approval_id: str, key: ApiKey = reader) -> ApprovalView:
        """One approval, with the conditions that sent it to a human."""
        return view(fetch(approval_id, key))

    @api.post("/{approval_id}/approve")
    def approve(
        approval_id: str, body: Vote, request: Request, key: ApiKey = decider
    ) -> ApprovalView:
        """Approve as the key's principal (a retried vote that counted answers 200)."""
        return view(vote(request, approval_id, key, "approve", body.comment))

    @api.post("/{approval_id}/deny")
    def deny(approval_id: str, body: Vote, request: Request, key: ApiKey = decider) -> ApprovalView:
        """Deny as the key's principal; one eligible deny decides."""
        return view(vote(request, approval_id, key, "deny", body.comment))

    @api.post("/{approval_id}/edit")
    def edit(approval_id: str, body: Edit, request: Request, key: ApiKey = decider) -> EditOutcome:
        """Replace the action's arguments; the edited action is judged by the policies again."""
        approval = fetch(approval_id, key)
        check_may_decide(request, approval, key)
        if approval.audit_event_id is None:
            raise ApiError(409, "not_editable", "this approval was not asked for by a gate")
        if approval.status is not ApprovalStatus.PENDING:
            raise closed(approval)
        try:
            answer = kw.gates.answer(
                approval.audit_event_id,
                key.principal,
                "edit",
                body.comment,
                edited=body.arguments,
            )
        except NotAnApproverError as exc:
            raise gatekeeper.refuse(
                request, 403, "not_an_approver", str(exc), key, approval_id=approval_id
            ) from None
        record = kw.gates.get(approval.audit_event_id)
        replaced_by = None if record is None else record.replaced_by
        now = kw.approvals.get(approval_id)
        mine = [d.comment for d in now.decisions if d.approver == key.principal]
        if replaced_by is None or not any(replaced_by in c for c in mine):
            raise closed(now)  # decided or expired meanwhile: the edit changed nothing
        return EditOutcome(
            replaced=view(now),
            replaced_by=replaced_by,
            result=answer.result,
            approval=None if answer.approval is None else view(answer.approval),
        )

    return api
