"""One approval interrupt per model turn, asked from the turn's own tool calls.

In a checkpointed ``create_agent`` run, the first gated call of a model
turn to reach ``wrap_tool_call`` judges every gated call of that turn (the
gate decisions are idempotent by event id, so whichever call comes first
finds the same answers). Calls that need no human go on at once. If some
need approval, **one** of them — the first in the model's order among the
calls holding an approval, the *leader* — asks about all of them in one
``interrupt()``: a LangChain ``HITLRequest`` with one action request per
call (see :mod:`.hitl`), resumed with one decision per call, in order. The
other calls of that set wait for the leader in this process (the calls of
one model turn run as tasks of one LangGraph superstep, in one process):
when it pauses they pause too, without an interrupt of their own
(``GraphInterrupt(())``: LangGraph re-runs them on resume), and when it has
the decisions they take theirs.

Why not an ``after_model`` hook: ``create_agent`` runs such a hook as a
graph node after **every** model call, which costs every run a superstep
(~0.3 ms each here) although most turns need no approval.

Why a re-run is safe (LangGraph re-runs a paused task on resume): each
call's gate event id comes from the thread, the graph, the model message's
id and the tool call's id, so the re-run finds the same gate records; the
leader is the same call on every run (the model's order, not arrival), and
each round of its interrupt lists the calls whose approval was not listed
before, which the re-run computes identically whether or not the approvals
are decided meanwhile; the stored resume value is validated — and so
applied — again, and ``kw.gates.answer`` changes nothing the second time.
An approval decided out of band before the resume wins over the resume's
decision. An edit that still needs approval is asked about in a further
round.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple, Protocol, TypedDict

from langchain_core.messages import AIMessage
from langgraph.errors import GraphInterrupt
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import interrupt

from klockwork.core.engine import Klockwork
from klockwork.core.governance.outcomes import GateAnswer
from klockwork.integrations.langchain.approval_flow import (
    ApprovalResponse,
    answering,
    apply_answer,
    approval_request,
)
from klockwork.integrations.langchain.errors import ToolArgumentError
from klockwork.integrations.langchain.hitl import HITLResume, expecting, hitl_request
from klockwork.integrations.langchain.identity import Identity
from klockwork.integrations.langchain.turn_order import turn_message

__all__ = ["REJECTED", "Ballot", "GateDecision", "Seat", "TurnApprovals", "turn_event_id"]

REJECTED = (
    " A reviewer rejected this call: do not retry it, or a variant of it, unless the "
    "user asks for it; continue with something else or ask the user."
)


class GateDecision(TypedDict):
    """What the gate decided about one tool call of a model turn."""

    status: Literal["executed", "denied", "respond"]
    gate: str | None
    args: dict[str, Any]
    text: str


class _Coordinator(Protocol):
    """What the turn's judgement needs of its ``ToolCallCoordinator``."""

    @property
    def kw(self) -> Klockwork: ...

    @property
    def gates(self) -> Mapping[str, Any]: ...

    def gate_metadata(self, gate: Any, name: str, args: dict[str, Any]) -> dict[str, Any]: ...


#: How long a call waits for its turn's leader (a task of the same superstep,
#: which never waits for a human: it pauses or has the decisions at once).
LEADER_WAIT_S = 60.0
#: Ballots kept at most (a leak guard: a ballot is dropped once all its calls left).
MAX_BALLOTS = 1024


def turn_event_id(conf: Mapping[str, Any], message_id: str, call_id: str, action: str) -> str:
    """The gate's event id of one tool call of a model turn: the same on every re-run."""
    ns = str(conf.get("checkpoint_ns") or "")
    graph = ns.rsplit("|", 1)[0] if "|" in ns else ""  # the enclosing graph, not the node's task
    return f"langgraph:{conf.get('thread_id')}:{graph}:turn:{message_id}:{call_id}:{action}"


class _Call:
    """One gated call of the turn, as the leader's rounds see it."""

    __slots__ = ("answer", "args", "call_id", "edits", "gate", "kind", "message", "name")

    def __init__(
        self, call_id: str, name: str, gate: Any, args: dict[str, Any], answer: GateAnswer
    ):
        self.call_id, self.name, self.gate, self.args = call_id, name, gate, args
        self.answer = answer
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


class Ballot:
    """The gated calls of one turn waiting on one interrupt, in one run of their superstep.

    The leader settles it (:meth:`publish`, :meth:`pause` or :meth:`fail`);
    the other calls :meth:`wait` for that.
    """

    def __init__(self, key: str, members: frozenset[str], leader: str) -> None:
        self.key, self.members, self.leader = key, members, leader
        self.arrived: set[str] = set()
        self.left: set[str] = set()
        self.state: Literal["open", "paused", "done", "failed"] = "open"
        self.decisions: dict[str, GateDecision] = {}
        self._cond = threading.Condition()

    def publish(self, decisions: dict[str, GateDecision]) -> None:
        self._settle("done", decisions)

    def pause(self) -> None:
        self._settle("paused")

    def fail(self) -> None:
        self._settle("failed")

    def _settle(self, state: Literal["paused", "done", "failed"], decisions: Any = None) -> None:
        with self._cond:
            self.state = state
            self.decisions = decisions or {}
            self._cond.notify_all()

    def wait(self, call_id: str, timeout_s: float = LEADER_WAIT_S) -> GateDecision:
        """This call's decision once the leader has it; ``GraphInterrupt(())`` if it paused."""
        with self._cond:
            self._cond.wait_for(lambda: self.state != "open", timeout_s)
            state = self.state
        if state in ("paused", "failed"):
            # Paused with the leader, without an interrupt of its own: the run
            # shows one interrupt, and LangGraph re-runs this call on resume.
            # A leader that failed (a resume value that does not fit, say)
            # fails the run: this call runs again with it, so it records no
            # result now either.
            raise GraphInterrupt(())
        decision = self.decisions.get(call_id)
        if decision is not None:
            return decision
        why = f"no decision within {timeout_s:g} s"
        return {
            "status": "denied",
            "gate": None,
            "args": {},
            "text": f"This call was not run: the approvals of its turn could not be settled "
            f"({why}). Try again later.",
        }


class Seat(NamedTuple):
    """A call's place in its turn's ballot: it leads (``calls`` given) or waits."""

    turns: TurnApprovals
    ballot: Ballot
    call_id: str
    calls: list[_Call] | None

    @property
    def leads(self) -> bool:
        return self.calls is not None

    def settle(self, ident: Identity) -> GateDecision:
        """This call's decision: asked by leading, or waited for (may raise GraphInterrupt)."""
        try:
            if self.calls is not None:
                return self.turns.lead(self.ballot, self.calls, ident)
            return self.ballot.wait(self.call_id)
        finally:
            self.turns.leave(self.ballot, self.call_id)


class TurnApprovals:
    """Judge each model turn's gated calls once; one interrupt for those needing approval."""

    def __init__(self, coordinator: _Coordinator) -> None:
        self._coordinator = coordinator
        self._ballots: dict[str, Ballot] = {}
        self._lock = threading.Lock()

    def take(
        self, request: ToolCallRequest, ident: Identity, conf: Mapping[str, Any]
    ) -> GateDecision | Seat | None:
        """What this call's gate decided, or its seat in the turn's ballot.

        Returns the decision when the turn waits for no human; a
        :class:`Seat` when it does (the leader calls :meth:`lead`, the others
        :meth:`Ballot.wait`: no gated call of the turn runs before the
        human answered); None when the call is not one of a model turn
        (the caller judges it on its own).
        """
        call_id = request.tool_call.get("id")
        message = turn_message(request.state, call_id)
        if message is None or not call_id:
            return None
        calls = self._judge(message, ident, conf)
        mine = next((c for c in calls if c.call_id == call_id), None)
        if mine is None:
            return None  # its arguments make no metadata: the call itself says so
        waiting = [c for c in calls if c.answer.result.approval_id]
        if not any(c.answer.pending or c.answer.replaced_by for c in waiting):
            return mine.decision()
        key = turn_event_id(conf, str(message.id), "", "")
        members = frozenset(c.call_id for c in calls)
        ballot = self._join(key, call_id, members, waiting[0].call_id)
        return Seat(self, ballot, call_id, calls if ballot.leader == call_id else None)

    def _judge(self, message: AIMessage, ident: Identity, conf: Mapping[str, Any]) -> list[_Call]:
        coordinator = self._coordinator
        kw = coordinator.kw
        calls: list[_Call] = []
        for c in message.tool_calls:
            gate = coordinator.gates.get(c["name"])
            if gate is None or not c.get("id"):
                continue
            args, call_id = dict(c["args"]), str(c["id"])
            try:
                metadata = coordinator.gate_metadata(gate, c["name"], args)
            except ToolArgumentError:
                continue  # not judged here: the call itself tells the model (coordination)
            answer = kw.gates.ask(
                ident.agent_id,
                gate.action,
                metadata,
                turn_event_id(conf, str(message.id), call_id, gate.action),
                session_id=ident.session_id,
            )
            calls.append(_Call(call_id, c["name"], gate, args, answer))
        return calls

    def _join(self, key: str, call_id: str, members: frozenset[str], leader: str) -> Ballot:
        with self._lock:
            ballot = self._ballots.get(key)
            # A call comes once per run: finding itself already there means
            # this is a new run (a resume) of the same turn.
            if ballot is None or call_id in ballot.arrived:
                ballot = self._ballots[key] = Ballot(key, members, leader)
                while len(self._ballots) > MAX_BALLOTS:
                    del self._ballots[next(iter(self._ballots))]
            ballot.arrived.add(call_id)
            return ballot

    def leave(self, ballot: Ballot, call_id: str) -> None:
        """This call is done with its ballot (forgotten once all its calls are)."""
        with self._lock:
            ballot.left.add(call_id)
            if ballot.left >= ballot.members and self._ballots.get(ballot.key) is ballot:
                del self._ballots[ballot.key]

    def lead(self, ballot: Ballot, calls: list[_Call], ident: Identity) -> GateDecision:
        """Ask about the turn's calls in one interrupt per round; settle the ballot."""
        try:
            decisions = self._rounds(calls, ident)
        except GraphInterrupt:
            ballot.pause()
            raise
        except BaseException:
            ballot.fail()
            raise
        ballot.publish(decisions)
        return decisions[ballot.leader]

    def _rounds(self, calls: list[_Call], ident: Identity) -> dict[str, GateDecision]:
        coordinator = self._coordinator
        kw = coordinator.kw
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
                        metadata_for=functools.partial(
                            coordinator.gate_metadata, call.gate, call.name
                        ),
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
        return {c.call_id: c.decision() for c in calls}
