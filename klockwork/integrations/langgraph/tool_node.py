"""``CoordinatedToolNode``: LangGraph's ``ToolNode`` with klockwork around every tool call.

::

    from klockwork.integrations.langgraph import CoordinatedToolNode

    tools = CoordinatedToolNode(
        [write_file, deploy],
        kw,
        resources={"write_file": "FILE:{path}"},
        gates={"deploy": "deploy.prod"},
    )
    builder.add_node("tools", tools)

A subclass of ``ToolNode`` (so ``Send`` fan-out, ``InjectedState``,
``ToolRuntime``, ``handle_tool_errors`` and ``Command`` results work as
they do there) whose ``wrap_tool_call`` / ``awrap_tool_call`` hooks are a
:class:`~klockwork.integrations.langchain.coordination.ToolCallCoordinator`'s:
the same per-call logic as ``KlockworkMiddleware`` — the gate first
(approvals as LangChain ``HITLRequest`` interrupts in a checkpointed run),
then the leases around the call in a per-call sub-session; refusals are
error ``ToolMessage``\\ s.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from langchain_core.messages import ToolMessage
from langchain_core.tools import BaseTool
from langgraph.prebuilt import ToolNode
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command

from klockwork.core.engine import Klockwork
from klockwork.core.model import Predicate
from klockwork.integrations.langchain.coordination import (
    DEFAULT_TIMEOUT_S,
    GateSpec,
    ToolCallCoordinator,
    ToolResourceSpec,
)

__all__ = ["CoordinatedToolNode"]

Result = ToolMessage | Command[Any]
Wrapper = Callable[[ToolCallRequest, Callable[[ToolCallRequest], Result]], Result]
AsyncWrapper = Callable[
    [ToolCallRequest, Callable[[ToolCallRequest], Awaitable[Result]]], Awaitable[Result]
]


class CoordinatedToolNode(ToolNode):
    """A ``ToolNode`` whose tool calls pass klockwork's gates and hold its leases.

    Args:
        tools: the tools, as for ``ToolNode``.
        kw: the engine; ``Klockwork.default()`` when None (looked up per call).
        resources, gates, default_predicate, ttl_ms, timeout_s,
            approval_timeout_s, audit, agent_id: as for
            :class:`~klockwork.integrations.langchain.KlockworkMiddleware`.
        wrap_tool_call, awrap_tool_call: your own hooks, run inside
            klockwork's (after the gate, under the leases).
        **node_options: ``ToolNode``'s (``name``, ``tags``,
            ``handle_tool_errors``, ``messages_key``).

    Raises:
        InvalidRequestError: an invalid option, or a template naming an
            argument its tool does not take (at construction).
    """

    def __init__(
        self,
        tools: Sequence[BaseTool | Callable[..., Any]],
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
        wrap_tool_call: Wrapper | None = None,
        awrap_tool_call: AsyncWrapper | None = None,
        **node_options: Any,
    ) -> None:
        coordinator = ToolCallCoordinator(
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
        inner, ainner = wrap_tool_call, awrap_tool_call

        def wrap(request: ToolCallRequest, execute: Callable[[ToolCallRequest], Result]) -> Result:
            if inner is None:
                return coordinator.wrap(request, execute)
            return coordinator.wrap(request, lambda r: inner(r, execute))

        async def awrap(
            request: ToolCallRequest, execute: Callable[[ToolCallRequest], Awaitable[Result]]
        ) -> Result:
            if ainner is None:
                return await coordinator.awrap(request, execute)
            return await coordinator.awrap(request, lambda r: ainner(r, execute))

        super().__init__(tools, wrap_tool_call=wrap, awrap_tool_call=awrap, **node_options)
        coordinator.check_tools(list(self.tools_by_name.values()))
        self.coordinator = coordinator
