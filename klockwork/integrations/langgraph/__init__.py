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
from klockwork.integrations.langgraph.nodes import RESULT_KEY, add_approval_gate, gate_node

__all__ = [
    "BUS_STATE_KEYS",
    "MESSAGES_KEY",
    "PUBLISHED_KEY",
    "RESULT_KEY",
    "TIMED_OUT_KEY",
    "BusState",
    "add_approval_gate",
    "await_node",
    "gate_node",
    "publish_node",
]
