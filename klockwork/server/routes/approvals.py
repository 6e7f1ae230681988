"""Approvals: list, read, approve, deny, edit — as the key's principal, never as another.

The rules of deciding (the owner of the requesting agent never decides its
requests; every refusal audited) are :mod:`klockwork.server.decisions`,
which the inbox shares.

An agent key sees only its own approvals (to follow what it asked for).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from klockwork.core.governance.outcomes import ActionResult
from klockwork.server.context import Server
from klockwork.server.decisions import ApprovalView, Decisions
from klockwork.server.errors import COMMON_REFUSALS, refusals
from klockwork.server.keys import ApiKey

__all__ = ["ApprovalView", "EditOutcome", "router"]

StatusFilter = Literal["pending", "approved", "denied", "expired", "all"]


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
        responses=refusals(*COMMON_REFUSALS, 404, 409),
    )
    kw = server.kw
    decisions = Decisions(server)
    view = decisions.view
    reader = Depends(server.gatekeeper.require("agent", "approver", "admin"))
    decider = Depends(server.gatekeeper.require("approver", "admin"))

    @api.get("")
    def list_approvals(
        key: ApiKey = reader, status: StatusFilter = "pending"
    ) -> list[ApprovalView]:
        """Approvals, oldest first (an agent key: only its own)."""
        found = kw.approvals.list(status=None if status == "all" else status)
        return [view(a) for a in found if decisions.visible(a, key)]

    @api.get("/{approval_id}")
    def get_approval(approval_id: str, request: Request, key: ApiKey = reader) -> ApprovalView:
        """One approval, with the conditions that sent it to a human."""
        return view(decisions.fetch(request, approval_id, key))

    @api.post("/{approval_id}/approve")
    def approve(
        approval_id: str, body: Vote, request: Request, key: ApiKey = decider
    ) -> ApprovalView:
        """Approve as the key's principal (a retried vote that counted answers 200)."""
        return view(decisions.vote(request, approval_id, key, "approve", body.comment))

    @api.post("/{approval_id}/deny")
    def deny(approval_id: str, body: Vote, request: Request, key: ApiKey = decider) -> ApprovalView:
        """Deny as the key's principal; one eligible deny decides."""
        return view(decisions.vote(request, approval_id, key, "deny", body.comment))

    @api.post("/{approval_id}/edit")
    def edit(approval_id: str, body: Edit, request: Request, key: ApiKey = decider) -> EditOutcome:
        """Replace the action's arguments; the edited action is judged by the policies again."""
        edited = decisions.edit(request, approval_id, key, body.arguments, body.comment)
        answer = edited.answer
        return EditOutcome(
            replaced=view(edited.replaced),
            replaced_by=edited.replaced_by,
            result=answer.result,
            approval=None if answer.approval is None else view(answer.approval),
        )

    return api
