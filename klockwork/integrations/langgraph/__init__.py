"""klockwork for LangGraph graphs: gate nodes that turn approvals into interrupts.

::

    from klockwork.integrations.langgraph import add_approval_gate

    add_approval_gate(builder, before="deploy", kw=kw, action="deploy.prod")
    graph = builder.compile(checkpointer=SqliteSaver(conn))

* :func:`gate_node` — a node that gates an action (interrupts for approvals
  in a checkpointed run, blocks otherwise; idempotent on resume).
* :func:`add_approval_gate` — route every edge into a node through a gate.
"""

from klockwork.integrations.langgraph.nodes import RESULT_KEY, add_approval_gate, gate_node

__all__ = ["RESULT_KEY", "add_approval_gate", "gate_node"]
