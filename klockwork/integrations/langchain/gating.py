"""Gate tool calls: :func:`gated_tool`.

A gated tool asks ``kw.gates`` before each call. ``executed`` runs the tool;
``denied`` answers with an error ``ToolMessage`` (reason, policy, failed
conditions, the approvers' comments) and never runs it; ``requested`` waits
for a human:

* inside a LangGraph run with a checkpointer, the wait is an
  ``interrupt()`` (see :mod:`.approval_flow` for why resuming is safe); the
  graph is resumed with ``Command(resume={"type": "approve" | "edit" |
  "reject", "approver": "alice", "message": "...", "args": {...}})``;
* anywhere else, the call blocks on the approval (``timeout_s``).

The tool asks the core once per decision (``kw.gates.ask``, or the blocking
``kw.gates.gate``) and once more per human answer (``kw.gates.answer``):
every decision stays in the core; this module only translates it.

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
from collections.abc import Callable, Mapping
from typing import Any, Literal, cast

from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool
from pydantic import BaseModel

from klockwork.core.engine import Klockwork
from klockwork.core.errors import (
    ApprovalTimeoutError,
    EventLoopBlockedError,
    GateDeniedError,
    InvalidRequestError,
)
from klockwork.core.validation import check_timeout
from klockwork.integrations.langchain.approval_flow import (
    ApprovalResponse,
    checkpointed_run,
    interrupt_until_decided,
    json_safe,
    run_event_id,
)
from klockwork.integrations.langchain.identity import Identity, resolve_identity

__all__ = ["ApprovalResponse", "Metadata", "OnDenied", "args_checker", "gated_tool"]

Metadata = Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any]] | None
OnDenied = Literal["tool_error", "raise"]


# -- gated tools --------------------------------------------------------------------
def args_checker(tool: BaseTool, tool_input: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """A check of an approver's edited arguments against ``tool`` (names, then its schema).

    The check raises :class:`InvalidRequestError` for an argument the tool
    does not take, or arguments its args schema refuses (merged over ``tool_input``).
    """

    def check(edited: dict[str, Any]) -> None:
        unknown = sorted(set(edited) - set(tool.args))
        if unknown:
            raise InvalidRequestError("args", unknown, f"{tool.name} takes no such arguments")
        schema = tool.args_schema
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            try:
                schema.model_validate({**tool_input, **edited})
            except ValueError as exc:
                raise InvalidRequestError("args", edited, str(exc)) from exc

    return check


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
            return {"tool": self.name, "args": json_safe(args)}
        if callable(self.metadata):
            meta = self.metadata(args)
            if not isinstance(meta, Mapping):
                raise InvalidRequestError("metadata", meta, "the callable must return a dict")
            return meta
        return self.metadata

    def _check_args(self, tool_input: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
        return args_checker(self.tool, tool_input)

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
        if conf is not None:
            return self._in_run(kw, ident, args, meta, conf, tool_input, call_id)
        try:  # outside a checkpointed run: one blocking call
            kw.gates.gate(
                ident.agent_id, self.action, meta, None, self.timeout_s,
                session_id=ident.session_id,
            )  # fmt: skip
        except (GateDeniedError, ApprovalTimeoutError) as exc:
            return self._refused(exc)
        except EventLoopBlockedError as exc:  # name the call the user made
            name = self.name
            raise exc.as_call(f"{name}.invoke(...)", f"await {name}.ainvoke(...)") from None
        return tool_input

    async def adecide(
        self, tool_input: Any, config: RunnableConfig | None, call_id: str | None
    ) -> Any:
        """Async twin of :meth:`decide`: waiting never blocks the event loop."""
        ident, args, meta, conf = self._prepare(tool_input, config, call_id)
        kw = self.kw
        if conf is not None:
            if kw.store.blocking_io:  # short store calls, but not on the loop
                return await asyncio.to_thread(
                    self._in_run, kw, ident, args, meta, conf, tool_input, call_id
                )
            return self._in_run(kw, ident, args, meta, conf, tool_input, call_id)
        try:
            await kw.gates.agate(
                ident.agent_id, self.action, meta, None, self.timeout_s,
                session_id=ident.session_id,
            )  # fmt: skip
        except (GateDeniedError, ApprovalTimeoutError) as exc:
            return self._refused(exc)
        return tool_input

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
            + hashlib.sha256(json.dumps(json_safe(args), sort_keys=True).encode()).hexdigest()[:16]
        )
        answer = kw.gates.ask(  # the one question; a pending answer becomes an interrupt
            ident.agent_id,
            self.action,
            meta,
            run_event_id(conf, self.action, key),
            session_id=ident.session_id,
        )
        answer, _, edits = interrupt_until_decided(
            kw,
            answer,
            agent_id=ident.agent_id,
            args=args,
            check_args=self._check_args(args),
            metadata_for=self._metadata,  # an edit is judged again, as the action it now is
        )
        if answer.result.status == "denied":
            return self._refused(answer.denied_error())
        if edits:  # run what was approved: the call's arguments as edited
            return {**tool_input, **edits} if isinstance(tool_input, Mapping) else edits
        return tool_input

    def _refused(self, exc: GateDeniedError | ApprovalTimeoutError) -> _Refused:
        if self.on_denied == "raise":
            raise exc
        if isinstance(exc, ApprovalTimeoutError):
            return _Refused(f"{self.action} was not run: {exc}")
        return _Refused(str(exc))  # the core's refusal text: reason, policy, conditions, votes


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
    timeout_s = check_timeout(timeout_s)
    gate = _Gate(tool, action, metadata, kw, agent_id, timeout_s, on_denied)
    gated_cls = _gated_class(type(tool), gate)
    # Annotated: newer langchain-core types model_copy as returning Self,
    # which mypy reads as Any with python_version 3.10.
    copy: BaseTool = tool.model_copy()
    # Same fields, same layout: switching the class of the copy only adds methods.
    object.__setattr__(copy, "__class__", gated_cls)
    return copy
