"""Gate tool calls: :func:`gated_tool` and the approval flow shared with LangGraph nodes.

A gated tool asks ``kw.gates`` before each call. ``executed`` runs the tool;
``denied`` answers with an error ``ToolMessage`` (reason, policy, failed
conditions) and never runs it; ``requested`` waits for a human:

* inside a LangGraph run with a checkpointer, the wait is an
  ``interrupt()`` whose value describes the approval (see
  :func:`approval_request`); the graph is resumed with
  ``Command(resume={"type": "approve" | "edit" | "reject", "approver":
  "alice", "message": "...", "args": {...}})``;
* anywhere else, the call blocks on the approval (``timeout_s``).

Why resuming is safe (LangGraph re-runs the whole node on resume):

1. the gate's ``event_id`` is derived from the run (``thread_id``,
   ``checkpoint_ns`` — which names the task — the tool call id and the
   action), so the re-run finds the *same* gate record: no second approval,
   no second ``action.requested`` entry;
2. the resume value is applied to the approval *while LangGraph validates
   it* (``response_schema``), before LangGraph stores it. A refused decider
   (the requester, its delegates, someone not in ``approvers``) raises
   :class:`NotAnApproverError` from there: nothing is stored, the approval
   stays pending and the graph stays paused, so the right person can still
   answer. Had the refusal been raised after ``interrupt()`` returned,
   LangGraph would replay the refused answer on every later resume;
3. replaying a stored answer on a later re-run changes nothing (the
   approval is no longer pending, or the approver already voted);
4. an approval decided out of band (``klockwork approvals approve``, another
   process) before the resume is seen by the re-run: the gate record is
   settled, no interrupt is raised, and the stored decision wins over
   whatever the resume says.

A refused call returns its error ``ToolMessage`` from ``run`` itself, so the
tool's callbacks do not see it; the gate's own audit entry records it.

What the gate cannot undo: LangGraph re-runs a whole node on resume, so in a
node that makes several gated calls itself (``tool.invoke`` without a tool
call id: the arguments then tell the calls apart), a call that already ran
runs again when a later one is resumed — its gate does not ask again, but
its body repeats. Under ``ToolNode`` / ``create_agent`` each tool call is
its own unit and this does not arise.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal, cast

from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool
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
from klockwork.core.errors import (
    ApprovalTimeoutError,
    EventLoopBlockedError,
    GateDeniedError,
    InvalidRequestError,
)
from klockwork.core.governance.approvals import Approval, ApprovalClosedError, ApprovalStatus
from klockwork.core.governance.gates import ActionResult
from klockwork.integrations.langchain.identity import Identity, resolve_identity

__all__ = [
    "APPROVAL_REQUEST_TYPE",
    "ApprovalResponse",
    "GateOutcome",
    "approval_request",
    "checkpointed_run",
    "gated_tool",
    "refusal_text",
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

Metadata = Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any]] | None
OnDenied = Literal["tool_error", "raise"]

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


class GateOutcome(BaseModel):
    """The final word of a gate on one call: the result, and the human's answer if any."""

    model_config = ConfigDict(frozen=True)
    result: ActionResult
    response: ApprovalResponse | None = None


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
    result: ActionResult,
    approval: Approval,
    *,
    agent_id: str,
    args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The interrupt value describing a pending approval (JSON-ready)."""
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
        value["args"] = _json_safe(dict(args))
    return value


def refusal_text(action: str, result: ActionResult, approval: Approval | None = None) -> str:
    """A sentence for people and models: why ``action`` did not run."""
    reason = result.denial_reason or "DENIED"
    text = f"{action} was not run: {reason}"
    if result.policy_name:
        text += f" (policy {result.policy_name!r})"
    # a deny policy refuses when its conditions hold; any other when they fail
    matched = result.denial_reason == "POLICY_DENIED"
    shown = [c for c in result.conditions_evaluated if c.result is matched]
    if shown:
        text += ("; matched: " if matched else "; failed: ") + "; ".join(
            f"{c.field} {c.operator.value} {c.expected!r} (actual {c.actual!r})" for c in shown
        )
    if approval is not None:
        said = [f"{d.approver}: {d.comment}" for d in approval.decisions if d.comment]
        if said:
            text += "; " + "; ".join(said)
    elif result.message and not shown:  # e.g. a capability or breaker refusal
        text += f"; {result.message}"
    return text


def _apply_response(
    kw: Klockwork,
    approval_id: str,
    check_args: Callable[[dict[str, Any]], None] | None,
    response: ApprovalResponse,
) -> None:
    """Record a resume value's decision on the approval (idempotent on replay)."""
    approval = kw.approvals.get(approval_id)
    if approval.status is not ApprovalStatus.PENDING or any(
        d.approver == response.approver for d in approval.decisions
    ):
        return  # decided already (out of band, or by this very answer before)
    comment = response.message
    if response.type == "edit":
        assert response.args is not None
        if check_args is not None:
            check_args(response.args)
        edited = json.dumps(_json_safe(response.args), sort_keys=True)
        comment = f"{comment} [edited args: {edited}]".strip()
    try:
        if response.type == "reject":
            kw.approvals.deny(approval_id, response.approver, comment)
        else:
            kw.approvals.approve(approval_id, response.approver, comment)
    except ApprovalClosedError:
        return  # expired or decided meanwhile: the stored outcome wins


@contextmanager
def _answering(hook: Callable[[ApprovalResponse], None]) -> Iterator[None]:
    token = _ON_RESUME.set(hook)
    try:
        yield
    finally:
        _ON_RESUME.reset(token)


def interrupt_until_decided(
    kw: Klockwork,
    result: ActionResult,
    *,
    ident: Identity,
    action: str,
    event_id: str,
    args: Mapping[str, Any] | None = None,
    check_args: Callable[[dict[str, Any]], None] | None = None,
) -> GateOutcome:
    """Interrupt the run until the approval of ``result`` is decided (see module docstring)."""
    response: ApprovalResponse | None = None
    while result.status == "requested" and result.approval_id is not None:
        approval_id = result.approval_id
        value = approval_request(
            result, kw.approvals.get(approval_id), agent_id=ident.agent_id, args=args
        )

        def hook(answer: ApprovalResponse, approval_id: str = approval_id) -> None:
            _apply_response(kw, approval_id, check_args, answer)

        with _answering(hook):
            response = interrupt(value, response_schema=ApprovalResponse)
        # a quorum above 1 may still be pending: the loop asks again
        result = kw.gates.execute(
            ident.agent_id, action, None, event_id, session_id=ident.session_id
        )
    return GateOutcome(result=result, response=response)


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# -- gated tools --------------------------------------------------------------------
class _Gate:
    """One gated tool's settings; decides each call."""

    def __init__(
        self,
        tool: BaseTool,
        action: str,
        metadata: Metadata,
        kw: Klockwork | None,
        agent_id: str | None,
        timeout_s: float | None,
        on_denied: OnDenied,
    ) -> None:
        self.name = tool.name
        self.tool = tool
        self.action = action
        self.metadata = metadata
        self._kw = kw
        self.agent_id = agent_id
        self.timeout_s = timeout_s
        self.on_denied = on_denied

    @property
    def kw(self) -> Klockwork:
        return self._kw if self._kw is not None else Klockwork.default()

    def _metadata(self, args: dict[str, Any]) -> Mapping[str, Any]:
        if self.metadata is None:
            return {"tool": self.name, "args": _json_safe(args)}
        if callable(self.metadata):
            meta = self.metadata(args)
            if not isinstance(meta, Mapping):
                raise InvalidRequestError("metadata", meta, "the callable must return a dict")
            return meta
        return self.metadata

    def _check_args(self, tool_input: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
        def check(edited: dict[str, Any]) -> None:
            unknown = sorted(set(edited) - set(self.tool.args))
            if unknown:
                raise InvalidRequestError("args", unknown, f"{self.name} takes no such arguments")
            schema = self.tool.args_schema
            if isinstance(schema, type) and issubclass(schema, BaseModel):
                try:
                    schema.model_validate({**tool_input, **edited})
                except ValueError as exc:
                    raise InvalidRequestError("args", edited, str(exc)) from exc

        return check

    def _prepare(
        self, tool_input: Any, config: RunnableConfig | None, call_id: str | None
    ) -> tuple[Identity, dict[str, Any], Mapping[str, Any], Mapping[str, Any] | None]:
        ident = resolve_identity(config, agent_id=self.agent_id)
        args = dict(tool_input) if isinstance(tool_input, Mapping) else {"input": tool_input}
        return ident, args, self._metadata(args), checkpointed_run()

    def decide(self, tool_input: Any, config: RunnableConfig | None, call_id: str | None) -> Any:
        """The input to run with, or a refusal (``_Refused``)."""
        ident, args, meta, conf = self._prepare(tool_input, config, call_id)
        kw = self.kw
        if conf is None:
            try:
                kw.gates.gate(
                    ident.agent_id, self.action, meta, None, self.timeout_s,
                    session_id=ident.session_id,
                )  # fmt: skip
            except (GateDeniedError, ApprovalTimeoutError) as exc:
                return self._refused(exc, kw)
            except EventLoopBlockedError as exc:  # name the call the user made
                name = self.name
                raise exc.as_call(f"{name}.invoke(...)", f"await {name}.ainvoke(...)") from None
            return tool_input
        return self._in_run(kw, ident, args, meta, conf, tool_input, call_id)

    async def adecide(
        self, tool_input: Any, config: RunnableConfig | None, call_id: str | None
    ) -> Any:
        """Async twin of :meth:`decide`: waiting never blocks the event loop."""
        ident, args, meta, conf = self._prepare(tool_input, config, call_id)
        kw = self.kw
        if conf is None:
            try:
                await kw.gates.agate(
                    ident.agent_id, self.action, meta, None, self.timeout_s,
                    session_id=ident.session_id,
                )  # fmt: skip
            except (GateDeniedError, ApprovalTimeoutError) as exc:
                return self._refused(exc, kw)
            return tool_input
        if kw.store.blocking_io:  # short store calls, but not on the loop
            return await asyncio.to_thread(
                self._in_run, kw, ident, args, meta, conf, tool_input, call_id
            )
        return self._in_run(kw, ident, args, meta, conf, tool_input, call_id)

    def _in_run(
        self,
        kw: Klockwork,
        ident: Identity,
        args: dict[str, Any],
        meta: Mapping[str, Any],
        conf: Mapping[str, Any],
        tool_input: Any,
        call_id: str | None,
    ) -> Any:
        # Without a tool call id (a node calling tool.invoke itself), the
        # arguments tell two calls of one node apart.
        key = (
            call_id
            or "args-"
            + hashlib.sha256(json.dumps(_json_safe(args), sort_keys=True).encode()).hexdigest()[:16]
        )
        event_id = run_event_id(conf, self.action, key)
        result = kw.gates.execute(
            ident.agent_id, self.action, meta, event_id, session_id=ident.session_id
        )
        response = None
        if result.status == "requested":
            outcome = interrupt_until_decided(
                kw,
                result,
                ident=ident,
                action=self.action,
                event_id=event_id,
                args=args,
                check_args=self._check_args(args),
            )
            result, response = outcome.result, outcome.response
        if result.status == "denied":
            approval = kw.approvals.get(result.approval_id) if result.approval_id else None
            return self._refused(_denied(result), kw, approval)
        if response is not None and response.type == "edit" and response.args is not None:
            if isinstance(tool_input, Mapping):
                return {**tool_input, **response.args}
            return response.args
        return tool_input

    def _refused(
        self,
        exc: GateDeniedError | ApprovalTimeoutError,
        kw: Klockwork,
        approval: Approval | None = None,
    ) -> _Refused:
        if self.on_denied == "raise":
            raise exc
        if isinstance(exc, ApprovalTimeoutError):
            return _Refused(f"{self.action} was not run: {exc}")
        if approval is None and exc.approval_id is not None:
            approval = kw.approvals.get(exc.approval_id)
        result = ActionResult(
            status="denied",
            approval_id=exc.approval_id,
            policy_name=exc.policy,
            denial_reason=exc.reason,
            conditions_evaluated=list(exc.conditions),
            message=str(exc),
        )
        return _Refused(refusal_text(self.action, result, approval))


def _denied(result: ActionResult) -> GateDeniedError:
    return GateDeniedError(
        result.denial_reason or "POLICY_DENIED",
        result.policy_name,
        result.conditions_evaluated,
        result.approval_id,
        message=result.message or None,
    )


class _Refused:
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _refusal(tool: BaseTool, refused: _Refused, call_id: str | None) -> Any:
    if call_id is None:
        return refused.text
    return ToolMessage(refused.text, tool_call_id=call_id, name=tool.name, status="error")


def _gated_class(cls: type[BaseTool], gate: _Gate) -> type[BaseTool]:
    """A subclass of ``cls`` whose ``run``/``arun`` pass ``gate`` first.

    The gate is bound in the methods' closure, not looked up on the
    instance, so a tool gated twice passes both gates, outer first.
    """

    def run(self: BaseTool, tool_input: Any, *args: Any, **kwargs: Any) -> Any:
        decided = gate.decide(tool_input, kwargs.get("config"), kwargs.get("tool_call_id"))
        if isinstance(decided, _Refused):
            return _refusal(self, decided, kwargs.get("tool_call_id"))
        return cast("Any", super(gated, self)).run(decided, *args, **kwargs)

    async def arun(self: BaseTool, tool_input: Any, *args: Any, **kwargs: Any) -> Any:
        decided = await gate.adecide(tool_input, kwargs.get("config"), kwargs.get("tool_call_id"))
        if isinstance(decided, _Refused):
            return _refusal(self, decided, kwargs.get("tool_call_id"))
        return await cast("Any", super(gated, self)).arun(decided, *args, **kwargs)

    name = cls.__name__ if cls.__name__.startswith("Gated") else f"Gated{cls.__name__}"
    gated: type[BaseTool] = type(name, (cls,), {"__module__": __name__, "run": run, "arun": arun})
    return gated


def gated_tool(
    tool: BaseTool,
    *,
    action: str,
    metadata: Metadata = None,
    kw: Klockwork | None = None,
    agent_id: str | None = None,
    timeout_s: float | None = None,
    on_denied: OnDenied = "tool_error",
) -> BaseTool:
    """Return a copy of ``tool`` that passes ``kw.gates`` before every call.

    Args:
        tool: the tool; the copy keeps its name, description, args schema
            and settings (the original is left unchanged).
        action: the gated action (what policies match), e.g. ``"pr.merge"``.
        metadata: what policies' conditions look at: a dict, or a callable
            taking the call's arguments and returning one. Default:
            ``{"tool": name, "args": arguments}``.
        kw: the engine; ``Klockwork.default()`` when None.
        agent_id: fixed agent; by default read from the call's config.
        timeout_s: outside a checkpointed LangGraph run, how long a call
            waits for an approval (None: until its stored deadline).
        on_denied: ``"tool_error"`` — a denied call ends as
            ``ToolMessage(status="error")`` with the reason and the failed
            conditions (also for a wait that timed out); ``"raise"`` — it
            raises :class:`GateDeniedError` / :class:`ApprovalTimeoutError`.

    Returns:
        The gated copy.

    Raises:
        InvalidRequestError: an invalid option (nothing was wrapped).
    """
    if not isinstance(tool, BaseTool):
        raise InvalidRequestError("tool", tool, "expected a BaseTool")
    if not isinstance(action, str) or not action:
        raise InvalidRequestError("action", action, "must be a non-empty string")
    if metadata is not None and not (callable(metadata) or isinstance(metadata, Mapping)):
        raise InvalidRequestError("metadata", metadata, "expected a dict, a callable or None")
    if on_denied not in ("tool_error", "raise"):
        raise InvalidRequestError("on_denied", on_denied, "expected 'tool_error' or 'raise'")
    if timeout_s is not None and timeout_s < 0:
        raise InvalidRequestError("timeout_s", timeout_s, "must be >= 0 seconds or None")
    gate = _Gate(tool, action, metadata, kw, agent_id, timeout_s, on_denied)
    gated_cls = _gated_class(type(tool), gate)
    # Annotated: newer langchain-core types model_copy as returning Self,
    # which mypy reads as Any with python_version 3.10.
    copy: BaseTool = tool.model_copy()
    # Same fields, same layout: switching the class of the copy only adds methods.
    object.__setattr__(copy, "__class__", gated_cls)
    return copy
