"""``KlockworkMiddleware``: leases, gates, approvals and audit for ``create_agent``.

::

    from langchain.agents import create_agent
    from klockwork.integrations.langchain import KlockworkMiddleware

    agent = create_agent(
        model,
        tools=[write_file, deploy],
        middleware=[
            KlockworkMiddleware(
                kw,
                resources={"write_file": "FILE:{path}"},
                gates={"deploy": "deploy.prod"},
            )
        ],
    )

Every tool call of the agent passes the gate first, then runs under its
leases; the per-call logic is :class:`~.coordination.ToolCallCoordinator`'s
(shared with ``CoordinatedToolNode``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from langchain.agents.middleware.types import AgentMiddleware, ToolCallRequest
from langchain_core.messages import ToolMessage
from langgraph.types import Command

from klockwork.core.engine import Klockwork
from klockwork.core.model import Predicate
from klockwork.integrations.langchain.coordination import (
    DEFAULT_TIMEOUT_S,
    GateSpec,
    ToolCallCoordinator,
    ToolResourceSpec,
)
from klockwork.integrations.langchain.turn_approvals import TurnApprovals

__all__ = ["KlockworkMiddleware"]


class KlockworkMiddleware(AgentMiddleware):
    """Coordinate every tool call of a ``create_agent`` agent through klockwork.

    Per call (see :mod:`.coordination`): the gate first (an approval pauses
    before anything is leased), then the lease around the call, released in
    ``finally``. Refusals — denied, rejected, an approval that timed out, a
    lease not had within ``timeout_s``, an argument that makes no resource —
    end as ``ToolMessage(status="error")`` telling the model what happened
    and what to do; they never end the run.

    Approvals: in a run with a checkpointer, one interrupt per model turn
    for all the turn's calls that need one (:mod:`.turn_approvals`), shaped
    as LangChain's ``HITLRequest`` plus a ``klockwork`` field, and resumed
    with ``{"decisions": [one per action request], "approver": "alice"}``
    (see :mod:`.hitl`). Without a checkpointer each call waits for its
    approval (``approval_timeout_s``).

    Args:
        kw: the engine; ``Klockwork.default()`` when None (looked up per call).
        resources: tool name → resource spec: a template (``"FILE:{path}"``,
            leased with ``default_predicate``), a ``(template, predicate)``
            pair, a dict ``{"resource": ..., "predicate": ...}``, or a list of
            these (one atomic manifest). Templates may also be extractors
            (callables of the arguments dict).
        gates: tool name → action (``"deploy.prod"``) or ``{"action": ...,
            "metadata": dict | callable(args)}``; the gate's metadata is
            ``{"tool": name, "args": {...}}`` merged with it.
        default_predicate: predicate of templates given without one.
        ttl_ms: the leases' TTL (renewed every ttl/3 while the tool runs).
        timeout_s: how long a call waits for its leases before the model
            is told the resource is busy (None: no limit).
        approval_timeout_s: without a checkpointer, how long a call waits
            for an approval (None: until its stored deadline).
        audit: report each gated call's outcome (``kw.gates.report``);
            gates and leases are audited by the engine itself.
        agent_id: a fixed agent; by default read from the run's config,
            metadata, runtime context or agent name (``resolve_identity``).

    Raises:
        InvalidRequestError: an invalid option (at construction).
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
        super().__init__()
        self.coordinator = ToolCallCoordinator(
            kw,
            resources=resources,
            gates=gates,
            default_predicate=default_predicate,
            ttl_ms=ttl_ms,
            timeout_s=timeout_s,
            approval_timeout_s=approval_timeout_s,
            audit=audit,
            agent_id=agent_id,
        )
        self.coordinator.turns = TurnApprovals(self.coordinator)

    @property
    def name(self) -> str:
        """The middleware's name in the agent graph."""
        return "KlockworkMiddleware"

    def wrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], ToolMessage | Command[Any]],
    ) -> ToolMessage | Command[Any]:
        """Gate, then lease, around the tool call."""
        return self.coordinator.wrap(request, handler)

    async def awrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]],
    ) -> ToolMessage | Command[Any]:
        """Async twin of :meth:`wrap_tool_call`: waiting never blocks the event loop."""
        return await self.coordinator.awrap(request, handler)
