"""Gate nodes for LangGraph: :func:`gate_node` and :func:`add_approval_gate`.

A gate node asks ``kw.gates`` whether the graph may go on. Inside a run
with a checkpointer an approval becomes an ``interrupt()`` (the same value
and resume vocabulary as :func:`~klockwork.integrations.langchain.gated_tool`);
without one, the node blocks until the approval is decided. The node's
``event_id`` comes from the run (``thread_id`` and ``checkpoint_ns``, which
names the task), so the re-run LangGraph does on resume finds the same gate
record: no second approval, no second audit entry.

What the node returns:

* allowed or approved: ``{result_key: <ActionResult as a dict>}`` (nothing
  when ``result_key`` is None), plus, for an ``edit`` answer, its ``args``
  as a further state update; wrapped in ``Command(goto=on_approved)`` when
  ``on_approved`` is given;
* denied: ``Command(goto=on_denied, update={result_key: ...})`` when
  ``on_denied`` names a node, else it raises :class:`GateDeniedError`.

Note that ``Command(goto=...)`` adds to a node's static edges: a gate node
that routes itself (``on_approved`` / ``on_denied``) should have no
outgoing edge of its own — :func:`add_approval_gate` builds it that way.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.graph import StateGraph
from langgraph.types import Command

from klockwork.core.engine import Klockwork
from klockwork.core.errors import GateDeniedError, InvalidRequestError
from klockwork.core.governance.outcomes import ActionResult
from klockwork.integrations.langchain.approval_flow import (
    checkpointed_run,
    interrupt_until_decided,
    run_event_id,
)
from klockwork.integrations.langchain.identity import resolve_identity

__all__ = ["RESULT_KEY", "add_approval_gate", "gate_node"]

#: The state key a gate node writes its ``ActionResult`` (as a dict) to by default.
RESULT_KEY = "klockwork_gate"

StateMetadata = Mapping[str, Any] | Callable[[Any], Mapping[str, Any]] | None


def gate_node(
    kw: Klockwork,
    action: str,
    metadata: StateMetadata = None,
    on_denied: str | None = None,
    agent_id: str | None = None,
    *,
    on_approved: str | None = None,
    result_key: str | None = RESULT_KEY,
    timeout_s: float | None = None,
) -> Callable[[Any, RunnableConfig], Any]:
    """A node function ``(state, config)`` that gates ``action``.

    Args:
        kw: the engine.
        action: the gated action, e.g. ``"deploy.prod"``.
        metadata: what policies' conditions look at: a dict, or a callable
            taking the state and returning one.
        on_denied: a node to go to when denied (else :class:`GateDeniedError`).
        agent_id: fixed agent; by default read from the run's config.
        on_approved: a node to go to when allowed (``Command(goto=...)``);
            None leaves routing to the graph's edges.
        result_key: the state key for the result (must be a key of the
            graph's state); None writes nothing.
        timeout_s: without a checkpointer, how long to wait for an approval.

    Returns:
        The node function (add it with ``builder.add_node(name, node)``).

    Raises:
        InvalidRequestError: an invalid option.
    """
    if not isinstance(kw, Klockwork):
        raise InvalidRequestError("kw", kw, "expected a Klockwork engine")
    if not isinstance(action, str) or not action:
        raise InvalidRequestError("action", action, "must be a non-empty string")
    if metadata is not None and not (callable(metadata) or isinstance(metadata, Mapping)):
        raise InvalidRequestError("metadata", metadata, "expected a dict, a callable or None")

    def update_for(result: ActionResult) -> dict[str, Any]:
        return {} if result_key is None else {result_key: result.model_dump(mode="json")}

    def node(state: Any, config: RunnableConfig) -> Any:
        ident = resolve_identity(config, agent_id=agent_id)
        meta = metadata(state) if callable(metadata) else metadata
        conf = checkpointed_run()
        edits: dict[str, Any] = {}
        if conf is None:  # no checkpointer: one blocking call
            try:
                result = kw.gates.gate(
                    ident.agent_id, action, meta, None, timeout_s, session_id=ident.session_id
                )
            except GateDeniedError as exc:
                if on_denied is None:
                    raise
                return Command(goto=on_denied, update=update_for(_as_result(exc)))
        else:  # one question; a pending answer becomes an interrupt
            answer = kw.gates.ask(
                ident.agent_id,
                action,
                meta,
                run_event_id(conf, action),
                session_id=ident.session_id,
            )
            edited_metadata = None
            if callable(metadata) and isinstance(state, Mapping):
                # An edit updates the state: judge the action the new state makes.
                edited_metadata = lambda edits: metadata({**state, **edits})  # noqa: E731
            answer, _, edits = interrupt_until_decided(
                kw, answer, agent_id=ident.agent_id, metadata_for=edited_metadata
            )
            result = answer.result
            if result.status == "denied":
                if on_denied is None:
                    raise answer.denied_error()
                return Command(goto=on_denied, update=update_for(result))
        update = {**update_for(result), **edits}
        if on_approved is not None:
            return Command(goto=on_approved, update=update)
        return update

    node.__name__ = f"gate_{action}".replace(".", "_").replace("*", "_")
    return node


def add_approval_gate(
    builder: StateGraph[Any, Any, Any, Any],
    *,
    before: str,
    kw: Klockwork,
    action: str,
    metadata: StateMetadata = None,
    name: str | None = None,
    on_denied: str | None = None,
    agent_id: str | None = None,
    result_key: str | None = RESULT_KEY,
) -> StateGraph[Any, Any, Any, Any]:
    """Route every edge into node ``before`` through a new gate node.

    Rerouted: plain edges (``START`` included), join edges
    (``add_edge([a, b], before)``) and conditional edges whose path map
    names ``before``. The gate node goes on to ``before`` when allowed (by
    ``Command(goto=before)``), to ``on_denied`` or raising when denied (see
    :func:`gate_node`).

    Not reroutable, so refused with an error: a conditional edge without a
    path map (it might return ``before`` itself), and a node declaring
    ``before`` among its ``destinations`` (it routes by ``Command``).
    ``Send("before", ...)`` from a branch and undeclared
    ``Command(goto="before")`` cannot be seen here and bypass the gate.

    Args:
        builder: the ``StateGraph`` (not yet compiled).
        before: the node to protect.
        kw, action, metadata, on_denied, agent_id, result_key: as for :func:`gate_node`.
        name: the gate node's name; default ``"gate_<before>"``.

    Returns:
        ``builder``, changed in place.

    Raises:
        InvalidRequestError: unknown ``before``/``on_denied``, a name taken,
            or an edge that cannot be rerouted (nothing was changed).
    """
    if not isinstance(builder, StateGraph):
        raise InvalidRequestError("builder", builder, "expected a langgraph StateGraph")
    if before not in builder.nodes:
        raise InvalidRequestError(
            "before", before, f"no such node (nodes: {sorted(builder.nodes)})"
        )
    if on_denied is not None and on_denied not in builder.nodes:
        raise InvalidRequestError("on_denied", on_denied, "no such node")
    gate_name = name or f"gate_{before}"
    if gate_name in builder.nodes:
        raise InvalidRequestError("name", gate_name, "a node of this name exists")

    # Check everything first, so a refusal leaves the builder as it was.
    new_branches: dict[tuple[str, str], Any] = {}
    for source, branches in builder.branches.items():
        for branch_name, spec in branches.items():
            if spec.ends is None:
                raise InvalidRequestError(
                    "builder",
                    f"conditional edge {branch_name!r} from {source!r}",
                    "has no path map, so it cannot be routed through the gate; "
                    "pass path_map (or annotate the path's return type with a Literal)",
                )
            if before in spec.ends.values():
                ends: dict[Hashable, str] = {
                    k: gate_name if v == before else v for k, v in spec.ends.items()
                }
                new_branches[(source, branch_name)] = spec._replace(ends=ends)
    for node_name, node_spec in builder.nodes.items():
        if node_spec.ends and before in node_spec.ends:
            raise InvalidRequestError(
                "builder",
                node_name,
                f"routes to {before!r} by Command (destinations), which cannot be gated here",
            )

    destinations = (before,) if on_denied is None else (before, on_denied)
    node: Any = gate_node(
        kw, action, metadata, on_denied, agent_id, on_approved=before, result_key=result_key
    )
    builder.add_node(gate_name, node, destinations=destinations)
    builder.edges = {(s, gate_name if e == before else e) for s, e in builder.edges}
    builder.waiting_edges = {
        (starts, gate_name if e == before else e) for starts, e in builder.waiting_edges
    }
    for (source, branch_name), spec in new_branches.items():
        builder.branches[source][branch_name] = spec
    return builder


def _as_result(exc: GateDeniedError) -> ActionResult:
    """A blocking gate's refusal as the result a routed graph writes to its state."""
    return ActionResult(
        status="denied",
        approval_id=exc.approval_id,
        policy_name=exc.policy,
        denial_reason=exc.reason,
        conditions_evaluated=list(exc.conditions),
        message=str(exc),
    )
