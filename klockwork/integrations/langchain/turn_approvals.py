"""One approval interrupt per model turn (``KlockworkMiddleware.after_model``).

In a checkpointed ``create_agent`` run, the middleware judges every gated
tool call of a model turn right after the model answered, and asks the
human about all calls that need approval in **one** ``interrupt()`` — a
LangChain ``HITLRequest`` with one action request per call (see
:mod:`.hitl`), resumed with one decision per call, in order. What was
decided is kept in the agent's state (``klockwork_decided``, private), so
``wrap_tool_call`` runs, refuses or answers each call without asking again.

Why a re-run is safe (LangGraph re-runs the node on resume): each call's
gate event id comes from the thread, the graph, the model message's id and
the tool call's id, so the re-run finds the same gate records; each round
of the interrupt lists the calls whose approval was not listed before, which
the re-run computes identically whether or not the approvals are decided
meanwhile; the stored resume value is validated — and so applied — again,
and ``kw.gates.answer`` changes nothing the second time. An approval
decided out of band before the resume wins over the resume's decision.
An edit that still needs approval is asked about in a further round.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Annotated, Any

from langchain.agents.middleware.types import AgentState, PrivateStateAttr
from langchain_core.messages import AIMessage
from langgraph.config import get_config
from langgraph.types import interrupt
from typing_extensions import NotRequired

from klockwork.core.governance.outcomes import GateAnswer
from klockwork.integrations.langchain.approval_flow import (
    ApprovalResponse,
    answering,
    apply_answer,
    approval_request,
    checkpointed_run,
)
from klockwork.integrations.langchain.coordination import (
    REJECTED,
    GateDecision,
    ToolCallCoordinator,
)
from klockwork.integrations.langchain.errors import ToolArgumentError
from klockwork.integrations.langchain.hitl import HITLResume, expecting, hitl_request
from klockwork.integrations.langchain.identity import resolve_identity

__all__ = ["DECIDED_KEY", "KlockworkState", "approve_turn", "turn_event_id"]

DECIDED_KEY = "klockwork_decided"


class KlockworkState(AgentState):
    """The agent state ``KlockworkMiddleware`` adds to: what the turn's gates decided."""

    klockwork_decided: NotRequired[Annotated[dict[str, GateDecision], PrivateStateAttr]]


def turn_event_id(conf: Mapping[str, Any], message_id: str, call_id: str, action: str) -> str:
    """The gate's event id of one tool call of a model turn: the same on every re-run."""
    ns = str(conf.get("checkpoint_ns") or "")
    graph = ns.rsplit("|", 1)[0] if "|" in ns else ""  # the enclosing graph, not the node's task
    return f"langgraph:{conf.get('thread_id')}:{graph}:turn:{message_id}:{call_id}:{action}"


class _Call:
    __slots__ = ("answer", "args", "call_id", "edits", "gate", "kind", "message", "name")

    def __init__(
        self, call_id: str, name: str, gate: Any, args: dict[str, Any], answer: GateAnswer
    ):
        self.call_id, self.name, self.gate, self.args, self.answer = (
            call_id,
            name,
            gate,
            args,
            answer,
        )
        self.edits: dict[str, Any] = {}
        self.kind = ""
        self.message = ""

    def decision(self) -> GateDecision:
        result = self.answer.result
        args = {**self.args, **self.edits}
        if result.status == "executed":
            return {"status": "executed", "gate": result.audit_event_id, "args": args, "text": ""}
        if self.kind == "respond":
            return {"status": "respond", "gate": result.audit_event_id, "args": args,
                    "text": self.message}  # fmt: skip
        text = self.answer.refusal or str(self.answer.denied_error())
        if result.denial_reason == "DENIED_BY_REVIEWER":
            text += REJECTED
        return {"status": "denied", "gate": result.audit_event_id, "args": args, "text": text}


def approve_turn(
    coordinator: ToolCallCoordinator, state: Mapping[str, Any]
) -> dict[str, Any] | None:
    """Judge the gated calls of the last model turn; one interrupt for those needing approval.

    Returns the state update (``klockwork_decided``), or None outside a
    checkpointed run (calls are then judged one by one in ``wrap_tool_call``).
    """
    conf = checkpointed_run()
    if conf is None:
        return None
    messages = state.get("messages") or []
    last = next((m for m in reversed(messages) if isinstance(m, AIMessage)), None)
    gated = [
        c
        for c in (last.tool_calls if last is not None else [])
        if c["name"] in coordinator.gates and c.get("id")
    ]
    if last is None or not gated:
        return {DECIDED_KEY: {}} if state.get(DECIDED_KEY) else None
    kw = coordinator.kw
    ident = resolve_identity(get_config(), agent_id=coordinator.agent_id)
    calls: list[_Call] = []
    for c in gated:
        gate, args, call_id = coordinator.gates[c["name"]], dict(c["args"]), str(c["id"])
        try:
            metadata = coordinator.gate_metadata(gate, c["name"], args)
        except ToolArgumentError:
            continue  # not judged here: the call itself tells the model (coordination)
        answer = kw.gates.ask(
            ident.agent_id,
            gate.action,
            metadata,
            turn_event_id(conf, str(last.id), call_id, gate.action),
            session_id=ident.session_id,
        )
        calls.append(_Call(call_id, c["name"], gate, args, answer))
    presented: set[str] = set()
    while True:
        # Each round lists the approvals not listed before: a re-run lists the same.
        waiting = [
            c
            for c in calls
            if c.answer.result.approval_id and c.answer.result.approval_id not in presented
        ]
        if not any(c.answer.pending or c.answer.replaced_by for c in waiting):
            break
        presented.update(str(c.answer.result.approval_id) for c in waiting)
        requests = [
            (
                c.name,
                approval_request(c.answer, agent_id=ident.agent_id, args={**c.args, **c.edits}),
            )
            for c in waiting
        ]
        answered: list[GateAnswer] = []

        def hook(
            given: ApprovalResponse,
            waiting: list[_Call] = waiting,
            answered: list[GateAnswer] = answered,
        ) -> None:
            call = waiting[len(answered)]
            answered.append(
                apply_answer(
                    kw,
                    call.answer,
                    given,
                    args={**call.args, **call.edits},
                    metadata_for=functools.partial(coordinator.gate_metadata, call.gate, call.name),
                )
            )

        with expecting([call.name for call in waiting]), answering(hook):
            resumed: HITLResume = interrupt(hitl_request(*requests), response_schema=HITLResume)
        for index, (call, given) in enumerate(zip(waiting, resumed.approvals(), strict=True)):
            call.answer = answered[index]
            call.kind = resumed.kind_of(index)
            call.message = given.message
            if given.type == "edit" and given.args:
                call.edits.update(given.args)
    return {DECIDED_KEY: {c.call_id: c.decision() for c in calls}}
