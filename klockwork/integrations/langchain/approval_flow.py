"""Approvals inside a LangGraph run: one ``interrupt()`` per pending decision.

Shared by :func:`~.gating.gated_tool` and the LangGraph gate nodes. The
decision itself is the core's: the edge asks ``kw.gates.ask`` once and
turns its :class:`~klockwork.core.governance.outcomes.GateAnswer` into an
``interrupt()`` while a human must decide; the resume value is handed to
``kw.gates.answer`` — one more call — which returns the new answer.

Why resuming is safe (LangGraph re-runs the whole node on resume):

1. the gate's ``event_id`` is derived from the run (``thread_id``,
   ``checkpoint_ns`` — which names the task — the tool call id and the
   action), so the re-run finds the *same* gate record: no second approval,
   no second ``action.requested`` entry;
2. the resume value is applied *while LangGraph validates it*
   (``response_schema``), before LangGraph stores it. A refused decider
   (the requester, its delegation lineage, someone not in ``approvers``)
   raises :class:`~klockwork.NotAnApproverError` from there: nothing is
   stored, the approval stays pending and the graph stays paused, so the
   right person can still answer. Had the refusal been raised after
   ``interrupt()`` returned, LangGraph would replay the refused answer on
   every later resume;
3. LangGraph validates a stored resume value again on each re-run, so the
   answer is applied again — and ``kw.gates.answer`` changes nothing the
   second time (the approver already voted, or it is decided);
4. an approval decided out of band (``klockwork approvals approve``, another
   process) before the resume is seen by the re-run's ``ask``: no interrupt
   is raised, and the stored decision wins over whatever the resume says.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal, NamedTuple

from langgraph.config import get_config
from langgraph.types import interrupt
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_validator,
)

from klockwork.core.engine import Klockwork
from klockwork.core.governance.outcomes import GateAnswer

__all__ = [
    "APPROVAL_REQUEST_TYPE",
    "RESUME_SHAPE",
    "ApprovalResponse",
    "GateOutcome",
    "answering",
    "apply_answer",
    "approval_request",
    "checkpointed_run",
    "interrupt_until_decided",
    "run_event_id",
]

#: What a resume value must look like (said by every refusal of a malformed one).
RESUME_SHAPE = (
    "A klockwork approval is resumed with Command(resume={'type': 'approve' | 'edit' | "
    "'reject', 'approver': '<who decides>', 'message': '<optional comment>', "
    "'args': {<edited arguments, for 'edit' only>}})."
)
#: The ``type`` of every interrupt value klockwork raises.
APPROVAL_REQUEST_TYPE = "klockwork.approval"
DECISIONS = ("approve", "edit", "reject")
# LangGraph's configurable keys for the run's checkpointer and its interrupt
# scratchpad (langgraph._internal._constants); both are set only inside a run.
_CHECKPOINTER_KEY = "__pregel_checkpointer"
_SCRATCHPAD_KEY = "__pregel_scratchpad"

#: What validating a resume value does with it (set around ``interrupt()``).
_ON_RESUME: ContextVar[Callable[[ApprovalResponse], None] | None] = ContextVar(
    "klockwork_on_resume", default=None
)


class ApprovalResponse(BaseModel):
    """How a human answers a klockwork interrupt (``Command(resume=...)``).

    Attributes:
        type: ``approve``, ``edit`` (approve, and run with ``args``) or ``reject``.
        approver: who decides; must be allowed to (not the requester, one of
            the policy's ``approvers`` when it names any).
        message: the approver's comment, or the reason of a rejection.
        args: for ``edit`` only: the arguments to run with, merged over the
            call's (a gated node applies them as a state update).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["approve", "edit", "reject"]
    approver: str = Field(min_length=1)
    message: str = ""
    args: dict[str, Any] | None = None

    @model_validator(mode="wrap")
    @classmethod
    def _explain(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> ApprovalResponse:
        # A resume value comes from a person or a UI: say what it must look
        # like, not only which pydantic rule it broke.
        try:
            response: ApprovalResponse = handler(value)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}"
                for e in exc.errors(include_url=False)
            )
            raise ValueError(f"{RESUME_SHAPE} Got {value!r} ({problems}).") from None
        return response

    @model_validator(mode="after")
    def _apply(self) -> ApprovalResponse:
        if self.type == "edit" and self.args is None:
            raise ValueError("an 'edit' needs 'args' (the arguments to run with)")
        if self.type != "edit" and self.args is not None:
            raise ValueError("'args' only goes with type 'edit'")
        hook = _ON_RESUME.get()
        if hook is not None:
            hook(self)  # NotAnApproverError is not a ValueError: it propagates as itself
        return self


class GateOutcome(NamedTuple):
    """The final word of a gate on one call.

    Attributes:
        answer: the core's answer on what runs (after edits: the edited action's).
        response: the last human answer, if any.
        edits: the arguments approvers' edits changed (merged in order); empty
            when nobody edited.
    """

    answer: GateAnswer
    response: ApprovalResponse | None
    edits: dict[str, Any]


# -- the run ------------------------------------------------------------------------
def checkpointed_run() -> Mapping[str, Any] | None:
    """The ``configurable`` of the enclosing LangGraph run if it can interrupt, else None.

    A run can interrupt (and be resumed) only with a checkpointer.
    """
    try:
        config = get_config()
    except RuntimeError:  # outside any runnable
        return None
    conf: Mapping[str, Any] = config.get("configurable") or {}
    if conf.get(_CHECKPOINTER_KEY) is None or conf.get(_SCRATCHPAD_KEY) is None:
        return None
    return conf


def run_event_id(conf: Mapping[str, Any], action: str, call_id: str | None = None) -> str:
    """The gate's ``event_id`` for this spot of this run: the same on every re-run.

    ``checkpoint_ns`` names the task (``node:<task id>``, nested for
    subgraphs), and a task id is fixed for the step it belongs to.
    """
    thread = conf.get("thread_id")
    ns = conf.get("checkpoint_ns") or ""
    return f"langgraph:{thread}:{ns}:{call_id or ''}:{action}"


def approval_request(
    answer: GateAnswer, *, agent_id: str, args: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The interrupt value describing the approval ``answer`` waits for (JSON-ready)."""
    result, approval = answer.result, answer.approval
    assert approval is not None, "only a pending answer is asked about"
    failed = [
        {
            "field": c.field,
            "operator": c.operator.value,
            "expected": c.expected,
            "actual": c.actual,
        }
        for c in result.conditions_evaluated
        if not c.result
    ]
    value: dict[str, Any] = {
        "type": APPROVAL_REQUEST_TYPE,
        "approval_id": approval.approval_id,
        "action": approval.action,
        "agent_id": agent_id,
        "policy": result.policy_name,
        "message": result.message
        or f"{approval.action} needs approval under policy {result.policy_name!r}",
        "conditions": failed,
        "deadline_ms": approval.deadline_ms,
        "approvers": list(approval.approvers),
        "quorum": approval.quorum,
        "decisions": [d.model_dump(mode="json") for d in approval.decisions],
        "allowed_decisions": list(DECISIONS),
    }
    if args is not None:
        value["args"] = json_safe(dict(args))
    return value


@contextmanager
def _answering(hook: Callable[[ApprovalResponse], None]) -> Iterator[None]:
    token = _ON_RESUME.set(hook)
    try:
        yield
    finally:
        _ON_RESUME.reset(token)


def interrupt_until_decided(
    kw: Klockwork,
    answer: GateAnswer,
    *,
    agent_id: str,
    args: Mapping[str, Any] | None = None,
    check_args: Callable[[dict[str, Any]], None] | None = None,
    metadata_for: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
    present: Callable[[dict[str, Any]], Any] | None = None,
    resume_schema: Any = ApprovalResponse,
    on_resumed: Callable[[Any], None] | None = None,
) -> GateOutcome:
    """Interrupt the run while ``answer`` waits for a human (see the module docstring).

    Each resume value is checked (``check_args`` for an edit's arguments)
    and handed to ``kw.gates.answer``; a quorum above one interrupts again.
    An edit is a new action: ``metadata_for(edited args)`` gives its
    metadata, which the policies judge again (an edit that still needs
    approval interrupts again, for the new approval). Without
    ``metadata_for`` the edit does not change what the gate judged (it
    only updates the run's state), and counts as an approval.

    Another resume format (LangChain's ``HITLResponse``, see :mod:`.hitl`):
    ``present`` turns klockwork's request (:func:`approval_request`) into
    the interrupt value, and ``resume_schema`` validates a resume value
    into an object whose ``approval()`` builds the :class:`ApprovalResponse`
    (building it applies the answer, exactly as above); ``on_resumed`` sees
    each validated resume value.
    """
    response: ApprovalResponse | None = None
    edits: dict[str, Any] = {}
    # A request an edit replaced asks again too: on a re-run LangGraph replays
    # the stored edit into this interrupt, and the core answers with the edit.
    while answer.pending or answer.replaced_by is not None:
        value = approval_request(answer, agent_id=agent_id, args={**dict(args or {}), **edits})
        answered: list[GateAnswer] = []

        def hook(
            given: ApprovalResponse, answered: list[GateAnswer] = answered, on: GateAnswer = answer
        ) -> None:
            answered.append(
                apply_answer(
                    kw,
                    on,
                    given,
                    args={**dict(args or {}), **edits},
                    check_args=check_args,
                    metadata_for=metadata_for,
                )
            )

        with _answering(hook):
            resumed = interrupt(
                value if present is None else present(value), response_schema=resume_schema
            )
        # interrupt() returns a value only after validating it, which ran the hook.
        if on_resumed is not None:
            on_resumed(resumed)
        response = resumed if isinstance(resumed, ApprovalResponse) else resumed.approval()
        answer = answered[-1]
        if response.type == "edit" and response.args:
            edits.update(response.args)
    return GateOutcome(answer, response, edits)


def apply_answer(
    kw: Klockwork,
    answer: GateAnswer,
    given: ApprovalResponse,
    *,
    args: Mapping[str, Any],
    check_args: Callable[[dict[str, Any]], None] | None = None,
    metadata_for: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
) -> GateAnswer:
    """Hand one human answer to ``kw.gates.answer``; return the gate's new answer.

    ``args`` are the call's arguments as they stand (earlier edits applied);
    an edit is checked (``check_args``) and judged as the action it makes
    (``metadata_for``), see :func:`interrupt_until_decided`.
    """
    edited = None
    if given.type == "edit":
        if check_args is not None:
            check_args(given.args or {})
        if metadata_for is not None:
            edited = dict(metadata_for({**dict(args), **(given.args or {})}))
    decision: Literal["approve", "reject", "edit"] = (
        "reject" if given.type == "reject" else "edit" if edited else "approve"
    )
    return kw.gates.answer(
        answer.result.audit_event_id or "", given.approver, decision, given.message, edited=edited
    )


#: Set what validating an :class:`ApprovalResponse` does with it (a context manager).
answering = _answering


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON data (what does not convert becomes its ``str``).

    The same as ``json.loads(json.dumps(value, default=str))``, a fresh copy
    detached from the caller's objects; data that is plain JSON already (a
    tool call's arguments, as a rule) is copied without the text round trip.
    """
    try:
        return _plain_copy(value, 0)
    except _NotPlain:
        return json.loads(json.dumps(value, default=str))


class _NotPlain(Exception):
    """A value the JSON round trip would change: take it."""


_SCALARS = (str, int, float, bool, type(None))


def _plain_copy(value: Any, depth: int) -> Any:
    cls = value.__class__
    if cls in _SCALARS:  # exact types only: a subclass may encode differently
        return value
    if depth > 64:
        raise _NotPlain
    if cls is dict:
        copy = {}
        for key, item in value.items():
            if key.__class__ is not str:  # json.dumps would turn it into a str
                raise _NotPlain
            copy[key] = _plain_copy(item, depth + 1)
        return copy
    if cls is list or cls is tuple:
        return [_plain_copy(item, depth + 1) for item in value]
    raise _NotPlain
