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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from klockwork.integrations.langchain.approval_flow import ApprovalResponse

__all__ = [
    "HITL_DECISIONS",
    "HITL_RESUME_SHAPE",
    "HITLResume",
    "expecting",
    "hitl_request",
]

HITL_DECISIONS = ("approve", "edit", "reject", "respond")
HITL_RESUME_SHAPE = (
    "A klockwork approval in HITL format is resumed with Command(resume={'decisions': "
    "[{'type': 'approve'} | {'type': 'edit', 'edited_action': {'name': <tool>, 'args': "
    "{...}}} | {'type': 'reject', 'message': '<why>'} | {'type': 'respond', 'message': "
    "'<answer>'}], 'approver': '<who decides>'}), one decision per action request."
)


#: The tools of the action requests the interrupt being resumed listed (one
#: decision each, in order); None: one request, any tool.
_EXPECTED: ContextVar[tuple[str, ...] | None] = ContextVar("klockwork_hitl_expected", default=None)


@contextmanager
def expecting(tools: Sequence[str]) -> Iterator[None]:
    """Validate resume values against action requests for ``tools`` inside the block.

    One decision per request, in order; an edit that names another tool than
    its request's is refused (the reviewer cannot turn ``write_file`` into ``rm``).
    """
    token = _EXPECTED.set(tuple(tools))
    try:
        yield
    finally:
        _EXPECTED.reset(token)


class HITLResume(BaseModel):
    """A ``HITLResponse`` with the approver: the resume value of a klockwork HITL interrupt.

    Validating it applies the decisions in order (through the
    :class:`ApprovalResponse` each builds), so a refused approver raises
    while LangGraph validates the resume value, before anything is stored.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    decisions: list[dict[str, Any]] = Field(min_length=1)
    approver: str = Field(min_length=1)
    _approvals: list[ApprovalResponse] = PrivateAttr(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, value: Any) -> Any:
        if not isinstance(value, dict) or "decisions" not in value or "approver" not in value:
            raise ValueError(f"{HITL_RESUME_SHAPE} Got {value!r}.")
        return value

    @model_validator(mode="after")
    def _apply(self) -> HITLResume:
        tools = _EXPECTED.get()
        expected = 1 if tools is None else len(tools)
        if len(self.decisions) != expected:
            raise ValueError(
                f"Number of human decisions ({len(self.decisions)}) does not match number "
                f"of action requests ({expected}). {HITL_RESUME_SHAPE}"
            )
        responses = [
            self._response(decision, None if tools is None else tools[i])
            for i, decision in enumerate(self.decisions)
        ]
        # Building the ApprovalResponses applies them (approval_flow's hook), in
        # order: here, inside LangGraph's validation of the resume value.
        self._approvals = [ApprovalResponse(**r) for r in responses]
        return self

    def _response(self, decision: dict[str, Any], tool: str | None) -> dict[str, Any]:
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
                raise ValueError(
                    f"an 'edit' needs 'edited_action': {{'name', 'args'}}. {HITL_RESUME_SHAPE}"
                )
            name = edited.get("name")
            if tool is not None and name is not None and name != tool:
                raise ValueError(
                    f"an 'edit' may change the arguments of {tool!r}, not make it another "
                    f"tool ({name!r}). {HITL_RESUME_SHAPE}"
                )
            args = edited["args"]
        if kind == "respond" and not message:
            raise ValueError(
                f"a 'respond' needs 'message' (the tool's answer). {HITL_RESUME_SHAPE}"
            )
        return {
            "type": "edit" if kind == "edit" else "approve" if kind == "approve" else "reject",
            "approver": self.approver,
            "message": message,
            "args": args,
        }

    @property
    def kind(self) -> Literal["approve", "edit", "reject", "respond"]:
        """The (first) decision's type."""
        return self.kind_of(0)

    def kind_of(self, index: int) -> Literal["approve", "edit", "reject", "respond"]:
        """The type of decision ``index``."""
        kind: Any = self.decisions[index]["type"]
        return kind  # type: ignore[no-any-return]

    def approval(self) -> ApprovalResponse:
        """The klockwork answer the (first) decision was applied as."""
        return self._approvals[0]

    def approvals(self) -> list[ApprovalResponse]:
        """The klockwork answers, one per decision, in order."""
        return list(self._approvals)


def hitl_request(*requests: tuple[str, dict[str, Any]], description: str = "") -> dict[str, Any]:
    """The ``HITLRequest``-shaped interrupt value for klockwork approval requests.

    Args:
        requests: ``(tool name, value)`` per action, ``value`` being
            :func:`~.approval_flow.approval_request`'s.
        description: overrides each action's description (default: its message).
    """
    return {
        "action_requests": [
            {
                "name": tool,
                "args": value.get("args", {}),
                "description": description or value.get("message") or "",
            }
            for tool, value in requests
        ],
        "review_configs": [
            {"action_name": tool, "allowed_decisions": list(HITL_DECISIONS)} for tool, _ in requests
        ],
        "klockwork": {
            "approval_ids": [value["approval_id"] for _, value in requests],
            "approvals": [value for _, value in requests],
            "resume": HITL_RESUME_SHAPE,
        },
    }
