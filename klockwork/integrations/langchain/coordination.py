"""The per-call logic of :class:`~.middleware.KlockworkMiddleware` and ``CoordinatedToolNode``.

One :class:`ToolCallCoordinator` is built (and checked) once; its
:meth:`~ToolCallCoordinator.wrap` / :meth:`~ToolCallCoordinator.awrap` have
the signature of LangChain's ``wrap_tool_call(request, handler)`` hooks
(the same hooks LangGraph's ``ToolNode`` takes), so the middleware and the
node share this one implementation. For each tool call:

1. **the gate** (if the tool is gated): ``kw.gates`` judges the action with
   metadata ``{"tool": name, "args": {...}}`` merged with the configured
   metadata. In a checkpointed LangGraph run the middleware judges the
   calls of a model turn together and asks about all that need approval
   in one interrupt (:mod:`.turn_approvals`); otherwise (the node, or a
   call that is not one of a model turn) an approval is an
   ``interrupt()`` for this call, shaped as LangChain's ``HITLRequest``
   (:mod:`.hitl`), idempotent on resume (the gate's event id comes from the
   run and the tool call id, see :mod:`.approval_flow`); an edit is judged
   again (deny wins) and runs with the edited arguments. Elsewhere the
   call waits for the approval (``kw.gates.gate`` / ``agate``);
2. **the lease** (if the tool names resources): its resources are resolved
   from the (possibly edited) arguments and held in a sub-session of the
   caller's (:func:`.identity.call_session`), so parallel calls of one
   turn on one resource are serialised and on different resources overlap;
   renewed while the tool runs, released in ``finally``;
3. **the call** (``handler(request)``); with ``audit=True`` a gated call's
   outcome is reported to ``kw.gates.report`` (``success`` / ``failure``).

A refusal (denied, rejected, an approval that timed out, a lease not had in
time, an argument that makes no resource) ends as ``ToolMessage(status=
"error")`` for the model; nothing raises out of the run except a mistake in
this configuration itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

from langchain_core.messages import ToolMessage
from langchain_core.tools import BaseTool
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command

from klockwork.core.engine import Klockwork
from klockwork.core.errors import (
    ApprovalTimeoutError,
    GateDeniedError,
    InvalidRequestError,
    LeaseConflictError,
    LeaseTimeoutError,
)
from klockwork.core.leases.manager import DEFAULT_TTL_MS
from klockwork.core.leases.rules import parse_predicate, validate_ttl
from klockwork.core.model import Predicate
from klockwork.core.validation import check_identity, check_timeout
from klockwork.integrations.langchain.approval_flow import (
    checkpointed_run,
    interrupt_until_decided,
    json_safe,
    run_event_id,
)
from klockwork.integrations.langchain.errors import ToolArgumentError, conflict_from_timeout
from klockwork.integrations.langchain.gating import args_checker
from klockwork.integrations.langchain.guard import EngineLeases
from klockwork.integrations.langchain.hitl import HITLResume, expecting, hitl_request
from klockwork.integrations.langchain.identity import Identity, active_call, resolve_identity
from klockwork.integrations.langchain.resources import (
    ArgumentProblem,
    Resolver,
    template_resolver,
)
from klockwork.integrations.langchain.turn_approvals import (
    REJECTED,
    GateDecision,
    Seat,
    TurnApprovals,
)
from klockwork.integrations.langchain.turn_order import CallOrder, TurnOrder

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "REJECTED",
    "GateDecision",
    "GateSpec",
    "ToolCallCoordinator",
    "ToolResourceSpec",
]

_T = TypeVar("_T")
DEFAULT_TIMEOUT_S = 30.0
Result = ToolMessage | Command[Any]
Handler = Callable[[ToolCallRequest], Result]
AsyncHandler = Callable[[ToolCallRequest], Awaitable[Result]]
#: ``"FILE:{path}"``, ``(template, predicate)``, ``{"resource", "predicate"}``, or a list.
ToolResourceSpec = Any
#: ``"action"`` or ``{"action": ..., "metadata": dict | callable(args)}``.
GateSpec = str | Mapping[str, Any]


class _Gate(NamedTuple):
    action: str
    metadata: Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any]] | None


class _GateStep(NamedTuple):
    """A call its gate still has to decide (``conf``: the checkpointed run, if any)."""

    gate: _Gate
    args: dict[str, Any]
    conf: Mapping[str, Any] | None


class _Decided(NamedTuple):
    args: dict[str, Any]
    audit_event_id: str | None


def _parse_resources(
    tool: str, spec: ToolResourceSpec, default: Predicate
) -> list[tuple[Resolver, Predicate]]:
    """One ``(resolver, predicate)`` per item of a tool's resource spec (checked now)."""
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"resource", "predicate"})
        if "resource" not in spec or unknown:
            raise InvalidRequestError(
                f"resources[{tool!r}]", spec, "a dict spec takes 'resource' and 'predicate' only"
            )
        return [
            (template_resolver(spec["resource"]), parse_predicate(spec.get("predicate", default)))
        ]
    if (
        isinstance(spec, tuple)
        and len(spec) == 2
        and (isinstance(spec[1], Predicate) or (isinstance(spec[1], str) and ":" not in spec[1]))
    ):  # a resource key always has "TYPE:", a predicate never
        return [(template_resolver(spec[0]), parse_predicate(spec[1]))]
    if isinstance(spec, str) or callable(spec):
        return [(template_resolver(spec), default)]
    if isinstance(spec, Sequence) and spec:
        return [part for item in spec for part in _parse_resources(tool, item, default)]
    raise InvalidRequestError(
        f"resources[{tool!r}]",
        spec,
        "expected a 'TYPE:{argument}' template, a (template, predicate) pair, a dict "
        "{'resource', 'predicate'}, or a non-empty list of these",
    )


def _parse_gate(tool: str, spec: GateSpec) -> _Gate:
    if isinstance(spec, str) and spec:
        return _Gate(spec, None)
    if isinstance(spec, Mapping):
        action, metadata = spec.get("action"), spec.get("metadata")
        unknown = sorted(set(spec) - {"action", "metadata"})
        usable = metadata is None or callable(metadata) or isinstance(metadata, Mapping)
        if isinstance(action, str) and action and not unknown and usable:
            return _Gate(action, metadata)
    raise InvalidRequestError(
        f"gates[{tool!r}]",
        spec,
        "expected an action name or {'action': name, 'metadata': dict | callable(args)}",
    )


async def _maybe_thread(offload: bool, fn: Callable[..., _T], /, *args: Any) -> _T:
    """``fn(*args)`` on a worker thread when ``offload`` (a store doing I/O), else inline."""
    if offload:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def _error(request: ToolCallRequest, text: str) -> ToolMessage:
    call = request.tool_call
    return ToolMessage(text, tool_call_id=call["id"] or "", name=call["name"], status="error")


class ToolCallCoordinator:
    """Gates, leases and approvals around tool calls, as ``wrap_tool_call`` hooks.

    See the module docstring; the arguments are :class:`~.middleware.KlockworkMiddleware`'s.
    """

    def __init__(
        self,
        kw: Klockwork | None = None,
        *,
        resources: Mapping[str, ToolResourceSpec] | None = None,
        gates: Mapping[str, GateSpec] | None = None,
        default_predicate: str | Predicate = "MUTATES",
        ttl_ms: int | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        approval_timeout_s: float | None = None,
        audit: bool = True,
        agent_id: str | None = None,
    ) -> None:
        if kw is not None and not isinstance(kw, Klockwork):
            raise InvalidRequestError("kw", kw, "expected a Klockwork engine or None")
        for name, value in (("resources", resources), ("gates", gates)):
            if value is not None and not isinstance(value, Mapping):
                raise InvalidRequestError(name, value, "expected a dict keyed by tool name")
        if agent_id is not None:
            check_identity(agent_id, "agent_id")
        predicate = parse_predicate(default_predicate)
        self._leases = EngineLeases(kw)
        self.resources = {
            t: _parse_resources(t, spec, predicate) for t, spec in (resources or {}).items()
        }
        self.gates = {t: _parse_gate(t, spec) for t, spec in (gates or {}).items()}
        self.ttl_ms = validate_ttl(DEFAULT_TTL_MS if ttl_ms is None else ttl_ms)
        self.timeout_s = check_timeout(timeout_s)
        self.approval_timeout_s = check_timeout(approval_timeout_s)
        self.audit = bool(audit)
        self.agent_id = agent_id
        self._order = TurnOrder()
        #: One interrupt per model turn (set by KlockworkMiddleware; a node has no turns).
        self.turns: TurnApprovals | None = None
        # id(tool) -> (tool, its argument defaults): see _defaults.
        self._tool_defaults: dict[int, tuple[BaseTool, dict[str, Any]]] = {}

    @property
    def kw(self) -> Klockwork:
        """The engine given, else ``Klockwork.default()`` (looked up per call)."""
        return self._leases.engine()

    def check_tools(self, tools: Sequence[BaseTool]) -> None:
        """Refuse templates naming arguments their tool does not take.

        Raises:
            InvalidRequestError: a template names an argument its tool lacks.
        """
        by_name = {t.name: t for t in tools}
        for name, parts in self.resources.items():
            tool = by_name.get(name)
            if tool is not None:
                self._check_fields(tool, parts)

    @staticmethod
    def _check_fields(tool: BaseTool, parts: list[tuple[Resolver, Predicate]]) -> None:
        missing = sorted({f for r, _ in parts for f in r.fields} - set(tool.args))
        if missing:
            raise InvalidRequestError(
                "resources",
                missing,
                f"names arguments tool {tool.name!r} does not take "
                f"(its arguments: {', '.join(tool.args) or 'none'})",
            )

    def _defaults(self, tool: BaseTool, parts: list[tuple[Resolver, Predicate]]) -> dict[str, Any]:
        """The tool's argument defaults, its fields checked once per tool.

        ``tool.args`` rebuilds the tool's JSON schema on every read: read it
        the first time a tool is seen (tools live as long as their agent).
        """
        known = self._tool_defaults.get(id(tool))
        if known is not None and known[0] is tool:
            return known[1]
        self._check_fields(tool, parts)
        defaults = {
            field: schema["default"]
            for field, schema in tool.args.items()
            if isinstance(schema, Mapping) and "default" in schema
        }
        self._tool_defaults[id(tool)] = (tool, defaults)
        return defaults

    # -- the parts of one call ----------------------------------------------------------
    def _identity(self, request: ToolCallRequest) -> Identity:
        runtime = request.runtime
        config = getattr(runtime, "config", None) if runtime is not None else None
        return resolve_identity(config, agent_id=self.agent_id)

    def gate_metadata(self, gate: _Gate, name: str, args: dict[str, Any]) -> dict[str, Any]:
        meta: dict[str, Any] = {"tool": name, "args": json_safe(args)}
        extra = gate.metadata
        if callable(extra):
            try:
                extra = extra(dict(args))
            except Exception as exc:  # the model's arguments broke the user's callable
                raise ToolArgumentError(
                    name, "args", args, f"do not fit the tool's gate ({type(exc).__name__}: {exc})"
                ) from exc
        if extra is not None:
            if not isinstance(extra, Mapping):
                raise InvalidRequestError("metadata", extra, "the callable must return a dict")
            meta.update(extra)
        return meta

    def _intents(
        self, request: ToolCallRequest, args: dict[str, Any]
    ) -> tuple[list[tuple[str, Predicate]], list[str], str]:
        """The call's intents, keys and label; raises ToolArgumentError for the model."""
        return self._intents_for(request.tool_call["name"], request.tool, args)

    def _intents_for(
        self, name: str, tool: BaseTool | None, args: Mapping[str, Any]
    ) -> tuple[list[tuple[str, Predicate]], list[str], str]:
        parts = self.resources[name]
        arguments = dict(args)
        if tool is not None:
            for field, default in self._defaults(tool, parts).items():
                arguments.setdefault(field, default)  # defaults the model left out
        intents: list[tuple[str, Predicate]] = []
        labels: list[str] = []
        for resolver, predicate in parts:
            missing = sorted(f for f in resolver.fields if f not in arguments)
            if missing:
                raise ToolArgumentError(name, missing[0], None, "is missing")
            try:
                found = resolver(arguments)
            except ArgumentProblem as problem:
                raise ToolArgumentError(
                    name, problem.argument, problem.value, problem.problem
                ) from problem.__cause__
            intents.extend((key, predicate) for key in found.keys)
            labels.append(found.label)
        return intents, [k for k, _ in intents], ", ".join(labels)

    def _refusal(self, exc: GateDeniedError | ApprovalTimeoutError, action: str) -> str:
        if isinstance(exc, ApprovalTimeoutError):
            return f"{action} was not run: {exc} The approval is still pending; try later."
        text = str(exc)
        return text + REJECTED if exc.reason == "DENIED_BY_REVIEWER" else text

    def _in_run(
        self,
        request: ToolCallRequest,
        gate: _Gate,
        ident: Identity,
        args: dict[str, Any],
        conf: Mapping[str, Any],
    ) -> _Decided | ToolMessage:
        """The gate inside a checkpointed run: approvals are HITL interrupts."""
        kw, name, call_id = self.kw, request.tool_call["name"], request.tool_call["id"]
        answer = kw.gates.ask(
            ident.agent_id,
            gate.action,
            self.gate_metadata(gate, name, args),
            run_event_id(conf, gate.action, call_id or None),
            session_id=ident.session_id,
        )
        resumed: list[HITLResume] = []
        tool = request.tool
        with expecting([name]):
            outcome = interrupt_until_decided(
                kw,
                answer,
                agent_id=ident.agent_id,
                args=args,
                check_args=None if tool is None else args_checker(tool, args),
                metadata_for=lambda edited: self.gate_metadata(gate, name, edited),
                present=lambda value: hitl_request((name, value)),
                resume_schema=HITLResume,
                on_resumed=resumed.append,
            )
        answer = outcome.answer
        if answer.result.status == "denied":
            last = resumed[-1] if resumed else None
            if last is not None and last.kind == "respond":
                message = last.decisions[0]["message"]
                return ToolMessage(message, tool_call_id=call_id or "", name=name)
            return _error(request, self._refusal(answer.denied_error(), gate.action))
        return _Decided({**args, **outcome.edits}, answer.result.audit_event_id)

    def _in_turn(
        self, request: ToolCallRequest, ident: Identity, conf: Mapping[str, Any]
    ) -> _Decided | ToolMessage | Seat | None:
        """The call's gate as one of its model turn's calls (the middleware only).

        A decision; or its ballot, to lead or wait on; or None: judge it alone.
        """
        if self.turns is None:
            return None
        taken = self.turns.take(request, ident, conf)
        if taken is None or isinstance(taken, Seat):
            return taken
        return self._turn_result(request, taken)

    @staticmethod
    def _turn_result(request: ToolCallRequest, entry: GateDecision) -> _Decided | ToolMessage:
        if entry["status"] == "executed":
            return _Decided(dict(entry["args"]), entry["gate"])
        if entry["status"] == "respond":
            call = request.tool_call
            return ToolMessage(entry["text"], tool_call_id=call["id"] or "", name=call["name"])
        return _error(request, entry["text"])

    def _prepare(self, request: ToolCallRequest) -> _Decided | ToolMessage | _GateStep:
        """What deciding this call takes: nothing (no gate, or the turn decided), or a gate."""
        args = dict(request.tool_call["args"])
        gate = self.gates.get(request.tool_call["name"])
        if gate is None:
            return _Decided(args, None)
        return _GateStep(gate, args, checkpointed_run())

    def _gate_call(
        self, request: ToolCallRequest, step: _GateStep, ident: Identity
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments of ``kw.gates.gate``/``agate`` outside a checkpointed run."""
        metadata = self.gate_metadata(step.gate, request.tool_call["name"], step.args)
        args = (ident.agent_id, step.gate.action, metadata, None, self.approval_timeout_s)
        return args, {"session_id": ident.session_id}

    def _decide(self, request: ToolCallRequest, ident: Identity) -> _Decided | ToolMessage:
        step = self._prepare(request)
        if not isinstance(step, _GateStep):
            return step
        if step.conf is not None:
            taken = self._in_turn(request, ident, step.conf)
            if isinstance(taken, Seat):
                return self._turn_result(request, taken.settle(ident))
            if taken is not None:
                return taken
            return self._in_run(request, step.gate, ident, step.args, step.conf)
        args, kwargs = self._gate_call(request, step, ident)
        try:
            result = self.kw.gates.gate(*args, **kwargs)
        except (GateDeniedError, ApprovalTimeoutError) as exc:
            return _error(request, self._refusal(exc, step.gate.action))
        return _Decided(step.args, result.audit_event_id)

    async def _adecide(self, request: ToolCallRequest, ident: Identity) -> _Decided | ToolMessage:
        step = self._prepare(request)
        if not isinstance(step, _GateStep):
            return step
        if step.conf is not None:
            # Short store calls, but not on the loop.
            offload = self.kw.store.blocking_io
            taken = await _maybe_thread(offload, self._in_turn, request, ident, step.conf)
            if isinstance(taken, Seat):  # a call waiting for its leader waits on a thread
                settled = await _maybe_thread(offload or not taken.leads, taken.settle, ident)
                return self._turn_result(request, settled)
            if taken is not None:
                return taken
            return await _maybe_thread(
                offload, self._in_run, request, step.gate, ident, step.args, step.conf
            )
        args, kwargs = self._gate_call(request, step, ident)
        try:
            result = await self.kw.gates.agate(*args, **kwargs)
        except (GateDeniedError, ApprovalTimeoutError) as exc:
            return _error(request, self._refusal(exc, step.gate.action))
        return _Decided(step.args, result.audit_event_id)

    def _edited(self, request: ToolCallRequest, decided: _Decided) -> ToolCallRequest:
        if decided.args == request.tool_call["args"]:
            return request
        return request.override(tool_call={**request.tool_call, "args": decided.args})

    def _conflict(
        self,
        request: ToolCallRequest,
        ident: Identity,
        keys: list[str],
        label: str,
        exc: LeaseTimeoutError | LeaseConflictError,
    ) -> ToolMessage:
        error = conflict_from_timeout(
            exc,
            agent_id=ident.agent_id,
            session_id=ident.session_id,
            resource_path=label,
            resources=keys,
        )
        return _error(request, str(error))

    def _report(self, decided: _Decided, result: Result) -> None:
        if self.audit and decided.audit_event_id is not None:
            failed = isinstance(result, ToolMessage) and result.status == "error"
            self.kw.gates.report(decided.audit_event_id, "failure" if failed else "success")

    def _place(self, request: ToolCallRequest) -> CallOrder | None:
        """Where this call stands among its turn's calls on the same resources (see turn_order)."""
        call = request.tool_call
        if call["name"] not in self.resources:
            return None

        def keys_of(other: Mapping[str, Any]) -> set[str]:
            if other.get("name") not in self.resources:
                return set()
            tool = request.tool if other.get("name") == call["name"] else None
            try:
                return set(self._intents_for(other["name"], tool, other.get("args") or {})[1])
            except (ToolArgumentError, InvalidRequestError):
                return set()  # a call that makes no resource waits for nothing

        return self._order.place(request.state, call, keys_of)

    # -- the hooks ----------------------------------------------------------------------
    def wrap(self, request: ToolCallRequest, handler: Handler) -> Result:
        """``wrap_tool_call``: gate, then lease, around ``handler(request)``."""
        name = request.tool_call["name"]
        if name not in self.gates and name not in self.resources:
            return handler(request)
        order = self._place(request)
        try:
            return self._wrap(request, handler, order)
        finally:
            if order is not None:
                self._order.finished(order, self.kw)

    def _wrap(self, request: ToolCallRequest, handler: Handler, order: CallOrder | None) -> Result:
        name = request.tool_call["name"]
        ident = self._identity(request)
        try:
            decided = self._decide(request, ident)
        except ToolArgumentError as exc:
            return _error(request, str(exc))
        if isinstance(decided, ToolMessage):
            return decided
        request = self._edited(request, decided)
        if name not in self.resources:
            result = handler(request)
        else:
            try:
                intents, keys, label = self._intents(request, decided.args)
            except ToolArgumentError as exc:
                return _error(request, str(exc))
            lease_ident = self._leases.identity(ident)
            if order is not None:
                self._order.wait(order, self.kw, self.timeout_s)
            acquired = False
            try:
                with self._leases.hold(lease_ident, intents, self.ttl_ms, self.timeout_s):
                    acquired = True
                    with active_call(lease_ident):
                        result = handler(request)
            except (LeaseTimeoutError, LeaseConflictError) as exc:
                if acquired:  # raised by the tool itself
                    raise
                return self._conflict(request, lease_ident, keys, label, exc)
        self._report(decided, result)
        return result

    async def awrap(self, request: ToolCallRequest, handler: AsyncHandler) -> Result:
        """``awrap_tool_call``: the async twin of :meth:`wrap` (never blocks the loop)."""
        name = request.tool_call["name"]
        if name not in self.gates and name not in self.resources:
            return await handler(request)
        order = self._place(request)
        try:
            return await self._awrap(request, handler, order)
        finally:
            if order is not None:
                await self.kw.store.run_io(self._order.finished, order, self.kw)

    async def _awrap(
        self, request: ToolCallRequest, handler: AsyncHandler, order: CallOrder | None
    ) -> Result:
        name = request.tool_call["name"]
        ident = self._identity(request)
        try:
            decided = await self._adecide(request, ident)
        except ToolArgumentError as exc:
            return _error(request, str(exc))
        if isinstance(decided, ToolMessage):
            return decided
        request = self._edited(request, decided)
        if name not in self.resources:
            result = await handler(request)
        else:
            try:
                intents, keys, label = self._intents(request, decided.args)
            except ToolArgumentError as exc:
                return _error(request, str(exc))
            lease_ident = self._leases.identity(ident)
            if order is not None:
                await self._order.await_(order, self.kw, self.timeout_s)
            acquired = False
            try:
                async with self._leases.ahold(lease_ident, intents, self.ttl_ms, self.timeout_s):
                    acquired = True
                    with active_call(lease_ident):
                        result = await handler(request)
            except (LeaseTimeoutError, LeaseConflictError) as exc:
                if acquired:
                    raise
                return self._conflict(request, lease_ident, keys, label, exc)
        if self.audit and decided.audit_event_id is not None:
            await self.kw.store.run_io(self._report, decided, result)
        return result
