"""Approvals in LangChain's human-in-the-loop format (``HITLRequest`` / ``HITLResponse``).

:class:`~.middleware.KlockworkMiddleware` and
:class:`~klockwork.integrations.langgraph.CoordinatedToolNode` interrupt a
checkpointed run with a value shaped as LangChain's ``HITLRequest``, so
existing HITL UIs (Agent Inbox) can show it unchanged, plus a ``klockwork``
field with what held the call::

    {"action_requests": [{"name": "write_file", "args": {...}, "description": "..."}],
     "review_configs": [{"action_name": "write_file",
                         "allowed_decisions": ["approve", "edit", "reject", "respond"]}],
     "klockwork": {"approval_ids": ["apr_..."], "approvals": [{policy, conditions,
                   deadline_ms, approvers, quorum, ...}], "resume": "<the resume format>"}}

and are resumed with LangChain's ``HITLResponse`` plus who decides::

    Command(resume={"decisions": [{"type": "approve"}], "approver": "alice"})

A decision is ``{"type": "approve"}``, ``{"type": "edit", "edited_action":
{"name": <the tool>, "args": {...}}}``, ``{"type": "reject", "message":
"why"}`` or ``{"type": "respond", "message": "the tool's answer"}``
(``respond`` declines the call and gives the model ``message`` as the
tool's result). The approver is checked exactly as ``kw.approvals`` checks
it (see :mod:`.approval_flow`): a refused one leaves the approval pending
and the run paused.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from klockwork.integrations.langchain.approval_flow import ApprovalResponse

__all__ = ["HITL_DECISIONS", "HITL_RESUME_SHAPE", "HITLResume", "hitl_request"]

HITL_DECISIONS = ("approve", "edit", "reject", "respond")
HITL_RESUME_SHAPE = (
    "A klockwork approval in HITL format is resumed with Command(resume={'decisions': "
    "[{'type': 'approve'} | {'type': 'edit', 'edited_action': {'name': <tool>, 'args': "
    "{...}}} | {'type': 'reject', 'message': '<why>'} | {'type': 'respond', 'message': "
    "'<answer>'}], 'approver': '<who decides>'}), one decision per action request."
)


class HITLResume(BaseModel):
    """A ``HITLResponse`` with the approver: the resume value of a klockwork HITL interrupt.

    Validating it applies the decision (through the :class:`ApprovalResponse`
    it builds), so a refused approver raises while LangGraph validates the
    resume value, before anything is stored.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    decisions: list[dict[str, Any]] = Field(min_length=1, max_length=1)
    approver: str = Field(min_length=1)
    _approval: ApprovalResponse | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, value: Any) -> Any:
        if not isinstance(value, dict) or "decisions" not in value or "approver" not in value:
            raise ValueError(f"{HITL_RESUME_SHAPE} Got {value!r}.")
        return value

    @model_validator(mode="after")
    def _apply(self) -> HITLResume:
        decision = self.decisions[0]
        kind = decision.get("type")
        if kind not in HITL_DECISIONS:
            raise ValueError(f"unknown decision type {kind!r}. {HITL_RESUME_SHAPE}")
        message = decision.get("message") or ""
        if not isinstance(message, str):
            raise ValueError(f"'message' must be a string. {HITL_RESUME_SHAPE}")
        args: dict[str, Any] | None = None
        if kind == "edit":
            edited = decision.get("edited_action")
            if not isinstance(edited, dict) or not isinstance(edited.get("args"), dict):
                raise ValueError(f"an 'edit' needs 'edited_action': {{'name', 'args'}}. "
                                 f"{HITL_RESUME_SHAPE}")  # fmt: skip
            args = edited["args"]
        if kind == "respond" and not message:
            raise ValueError(
                f"a 'respond' needs 'message' (the tool's answer). {HITL_RESUME_SHAPE}"
            )
        # Building the ApprovalResponse applies it (approval_flow's hook): here,
        # inside LangGraph's validation of the resume value.
        self._approval = ApprovalResponse(
            type="edit" if kind == "edit" else "approve" if kind == "approve" else "reject",
            approver=self.approver,
            message=message,
            args=args,
        )
        return self

    @property
    def kind(self) -> Literal["approve", "edit", "reject", "respond"]:
        """The decision's type."""
        kind: Any = self.decisions[0]["type"]
        return kind  # type: ignore[no-any-return]

    @property
    def edited_name(self) -> str | None:
        """For an edit: the tool name the approver wrote, if any."""
        edited = self.decisions[0].get("edited_action") or {}
        name = edited.get("name") if isinstance(edited, dict) else None
        return name if isinstance(name, str) else None

    def approval(self) -> ApprovalResponse:
        """The klockwork answer this decision was applied as."""
        assert self._approval is not None
        return self._approval


def hitl_request(value: dict[str, Any], *, tool: str, description: str = "") -> dict[str, Any]:
    """The ``HITLRequest``-shaped interrupt value for klockwork's approval request ``value``."""
    text = value.get("message") or ""
    return {
        "action_requests": [
            {"name": tool, "args": value.get("args", {}), "description": description or text}
        ],
        "review_configs": [{"action_name": tool, "allowed_decisions": list(HITL_DECISIONS)}],
        "klockwork": {
            "approval_ids": [value["approval_id"]],
            "approvals": [value],
            "resume": HITL_RESUME_SHAPE,
        },
    }
