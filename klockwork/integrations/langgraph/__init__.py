"""klockwork for LangGraph graphs: gate nodes that turn approvals into interrupts, bus nodes.

::

    from klockwork.integrations.langgraph import add_approval_gate

    add_approval_gate(builder, before="deploy", kw=kw, action="deploy.prod")
    graph = builder.compile(checkpointer=SqliteSaver(conn))

* :func:`gate_node` — a node that gates an action (interrupts for approvals
  in a checkpointed run, blocks otherwise; idempotent on resume).
* :func:`add_approval_gate` — route every edge into a node through a gate.
* :func:`publish_node` / :func:`await_node` — publish on, and wait for, bus
  channels (``klockwork_published``, ``klockwork_messages``, ``timed_out``;
  see :class:`BusState`); idempotent on resume.
* :func:`lease_node` / :func:`release_node` — leases that span several nodes
  (``klockwork_leases``: lease ids and fencing tokens, see :class:`LeasesState`),
  renewed while the run goes on; :func:`leases_released` releases them however
  the run ends; :func:`ensure_leases` re-acquires them after a pause.
* :class:`CoordinatedToolNode` — a ``ToolNode`` that gates and leases every
  tool call (the per-call logic of ``KlockworkMiddleware``).
"""

from klockwork.integrations.langgraph.bus_nodes import (
    BUS_STATE_KEYS,
    MESSAGES_KEY,
    PUBLISHED_KEY,
    TIMED_OUT_KEY,
    BusState,
    await_node,
    publish_node,
)
from klockwork.integrations.langgraph.lease_nodes import (
    LEASES_KEY,
    LeasesState,
    aensure_leases,
    ensure_leases,
    lease_node,
    leases_released,
    merge_leases,
    release_node,
)
from klockwork.integrations.langgraph.nodes import RESULT_KEY, add_approval_gate, gate_node
from klockwork.integrations.langgraph.tool_node import CoordinatedToolNode

__all__ = [
    "BUS_STATE_KEYS",
    "LEASES_KEY",
    "MESSAGES_KEY",
    "PUBLISHED_KEY",
    "RESULT_KEY",
    "TIMED_OUT_KEY",
    "BusState",
    "CoordinatedToolNode",
    "LeasesState",
    "add_approval_gate",
    "aensure_leases",
    "await_node",
    "ensure_leases",
    "gate_node",
    "lease_node",
    "leases_released",
    "merge_leases",
    "publish_node",
    "release_node",
]
