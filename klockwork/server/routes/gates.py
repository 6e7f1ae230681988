"""Gates over HTTP: execute, can_i, read (long-poll) and report — as the key's agent.

An agent key (or an admin key) is gated as its own principal: the agent
id is the key's, never the body's. ``POST /v1/gates/execute`` asks the
engine once (``kw.gates.ask``) and answers everything a client needs to
act: the decision, the approval a human decides, the refusal's sentence.
``GET /v1/gates/{audit_event_id}?wait_s=`` reads that answer again, with
the approval's decision applied once made; with ``wait_s`` it long-polls
until the approval is decided or expires (never blocking the event loop).

A key sees and reports only its own gate events: another agent's answer
404 as if they did not exist (and audited as ``access.denied``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from klockwork.core.errors import ApprovalTimeoutError
from klockwork.core.governance.approvals import Approval
from klockwork.core.governance.outcomes import (
    ActionResult,
    GateAnswer,
    GateRecord,
)
from klockwork.core.validation import (
    MAX_IDENTITY_CHARS,
    MAX_TEXT_CHARS,
    check_identity,
    check_key,
)
from klockwork.server.context import Server
from klockwork.server.errors import COMMON_REFUSALS, ApiError, refusals
from klockwork.server.keys import ApiKey
from klockwork.server.routes.leases import check_wait, unless_disconnected

__all__ = [
    "GateCheck",
    "GateReport",
    "GateRequest",
    "GateView",
    "ReportOutcome",
    "agent_event_id",
    "router",
]

#: The longest action name the engine accepts.
MAX_ACTION_CHARS = 512
#: The longest idempotency key of a request (the engine's 2 048 less the agent's prefix).
MAX_EVENT_ID_CHARS = 1024


def agent_event_id(principal: str, event_id: str) -> str:
    """The engine's event id for one agent's ``event_id``: each agent has its own.

    Without it, one agent could take another's ids first (blocking its
    requests) and learn from the refusal what the other's was for. The
    length prefix keeps ``("a:b", "c")`` and ``("a", "b:c")`` apart.
    """
    return f"{len(principal)}:{principal}:{event_id}"


class GateCheck(BaseModel):
    """An action to judge (a dry run: nothing is recorded)."""

    action: str = Field(min_length=1, max_length=MAX_ACTION_CHARS, examples=["deploy.prod"])
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="the action's arguments, as the policies see them"
    )


class GateRequest(GateCheck):
    """An action the key's agent means to run (a body ``agent_id`` is ignored).

    ``event_id`` makes it idempotent: the same ``event_id`` answers the
    stored outcome and records nothing new. Event ids are the agent's own:
    another agent's ``deploy-42`` is another gate (see :func:`agent_event_id`).
    """

    event_id: str | None = Field(default=None, min_length=1, max_length=MAX_EVENT_ID_CHARS)
    session_id: str | None = Field(default=None, min_length=1, max_length=MAX_IDENTITY_CHARS)


class GateView(BaseModel):
    """One gate decision and everything a client needs to act on it.

    Attributes:
        result: the decision (``executed``, ``requested`` or ``denied``),
            with its approval's outcome applied once decided;
            ``result.audit_event_id`` names the gate for reads and reports.
        approval: the approval a human decides (pending or decided), if any.
        refusal: for a denied action, a sentence for people and models.
        action: the gated action.
        replaced_by: set when an approver's edit replaced this request: the
            edit's event id (its own gate, judged again).
        pending: True while the action waits for a human's decision.
    """

    result: ActionResult
    approval: Approval | None = None
    refusal: str = ""
    action: str
    replaced_by: str | None = None
    pending: bool = False


class GateReport(BaseModel):
    """How an executed action went (consecutive failures open the agent's breaker)."""

    status: Literal["success", "failure", "partial"]
    message: str = Field(default="", max_length=MAX_TEXT_CHARS)


class ReportOutcome(BaseModel):
    """``recorded`` is False when the action was reported already (nothing changed)."""

    recorded: bool


def _view(answer: GateAnswer) -> GateView:
    return GateView(
        result=answer.result,
        approval=answer.approval,
        refusal=answer.refusal,
        action=answer.action,
        replaced_by=answer.replaced_by,
        pending=answer.pending,
    )


def router(server: Server) -> APIRouter:
    """``/v1/gates``."""
    api = APIRouter(
        prefix="/v1/gates",
        tags=["gates"],
        responses=refusals(*COMMON_REFUSALS),
    )
    kw = server.kw
    gatekeeper = server.gatekeeper
    max_wait_s = server.settings.max_wait_s
    actor = Depends(gatekeeper.require("agent", "admin"))
    not_found = refusals(404)

    def missing(audit_event_id: str) -> ApiError:
        return ApiError(
            404, "gate_not_found", f"no gate event {audit_event_id!r}", "audit_event_id"
        )

    def own_record(request: Request, audit_event_id: str, key: ApiKey) -> GateRecord:
        """One of the key's gate events; another agent's is answered as an unknown one.

        (Asking for another agent's is audited; what the caller sees is the same.)
        """
        check_key(audit_event_id, "audit_event_id")
        record = kw.gates.get(audit_event_id)
        if record is not None and record.agent_id != key.principal:
            raise gatekeeper.refuse(
                request,
                404,
                "gate_not_found",
                f"no gate event {audit_event_id!r}",
                key,
                argument="audit_event_id",
                audit_event_id=audit_event_id,
            )
        if record is None:
            raise missing(audit_event_id)
        return record

    def answer_of(request: Request, audit_event_id: str, key: ApiKey) -> GateAnswer:
        """The gate's answer now (its approval's decision applied, audited once)."""
        own_record(request, audit_event_id, key)
        answer = kw.gates.outcome(audit_event_id)
        if answer is None:  # pragma: no cover - gate records are not deleted while in play
            raise missing(audit_event_id)
        return answer

    @api.post("/execute")
    def execute(body: GateRequest, key: ApiKey = actor) -> GateView:
        """Decide once, never block: ``executed``, ``denied``, or ``requested`` (an approval).

        Idempotent on ``event_id``; the same ``event_id`` for another action is 422.
        """
        if body.session_id is not None:
            check_identity(body.session_id, "session_id")
        answer = kw.gates.ask(
            key.principal,
            body.action,
            body.metadata,
            None if body.event_id is None else agent_event_id(key.principal, body.event_id),
            session_id=body.session_id,
        )
        return _view(answer)

    @api.post("/can_i")
    def can_i(body: GateCheck, key: ApiKey = actor) -> ActionResult:
        """What ``execute`` would decide now; records nothing, opens no approval."""
        return kw.gates.can_i(key.principal, body.action, body.metadata)

    @api.get(
        "/{audit_event_id}",
        responses=not_found,
        description=(
            "The gate's answer now. With `wait_s` > 0 (at most "
            f"{max_wait_s} s on this server) a pending approval is waited for until "
            "it is decided or expires, or `wait_s` passes (then the pending answer, 200)."
        ),
    )
    async def get_gate(
        audit_event_id: str,
        request: Request,
        wait_s: float = Query(default=0.0, ge=0, allow_inf_nan=False),
        key: ApiKey = actor,
    ) -> GateView:
        """One of the key's gate events, long-polling its approval for up to ``wait_s``."""
        check_wait(wait_s, max_wait_s)
        answer = await kw.store.run_io(answer_of, request, audit_event_id, key)
        if wait_s > 0 and answer.pending and answer.approval is not None:
            with contextlib.suppress(ApprovalTimeoutError):  # still pending: answer so
                decided = kw.approvals.await_(answer.approval.approval_id, wait_s)
                await unless_disconnected(request, decided)
            answer = await kw.store.run_io(answer_of, request, audit_event_id, key)
        return _view(answer)

    @api.post("/{audit_event_id}/report", responses=not_found)
    def report(
        audit_event_id: str, body: GateReport, request: Request, key: ApiKey = actor
    ) -> ReportOutcome:
        """Report how one of the key's executed actions went (once; a repeat records nothing)."""
        own_record(request, audit_event_id, key)
        return ReportOutcome(recorded=kw.gates.report(audit_event_id, body.status, body.message))

    return api
