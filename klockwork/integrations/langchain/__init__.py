"""klockwork for LangChain: leases around tool calls, without retry loops.

::

    from langchain_core.tools import tool
    from klockwork.integrations.langchain import agent_config, klock_protected

    @tool
    @klock_protected("FILE:{path}", predicate="MUTATES")
    def write_file(path: str, text: str) -> str:
        '''Write text to a file.'''
        ...

    write_file.invoke({"path": "/a", "text": "hi"}, config=agent_config("writer"))

* :func:`klock_protected` — decorator: Klock's own signature or the short
  form; below or above ``@tool``, on ``BaseTool._run``/``_arun``; sync and async.
* :func:`protect_tool` / :func:`protect_tools` — protected copies of tool objects.
* :func:`gated_tool` — copies of tools that pass ``kw.gates`` first; approvals
  become LangGraph interrupts (answered with :class:`ApprovalResponse`).
* :func:`bus_tools` — ``send_message`` / ``read_messages`` / ``wait_for_messages``:
  agents coordinate by messages over ``kw.bus``, as who the run config says.
* :class:`KlockworkMiddleware` — ``create_agent(..., middleware=[...])``: the gate,
  then the lease, around every tool call; approvals as HITL interrupts.
* :func:`agent_config` / :func:`resolve_identity` — who a call leases as.
* :class:`KlockConflictError` — a ``LeaseConflictError`` and a ``ToolException``.
* :class:`AuditCallbackHandler` / :class:`AsyncAuditCallbackHandler` — tool,
  chain and chat-model runs recorded in ``kw.audit``; :func:`audit_context`
  turns auditing on for every run inside a ``with`` block.
"""

from klockwork.integrations.langchain.bus_tools import DEFAULT_WAIT_S, bus_tools
from klockwork.integrations.langchain.callbacks import (
    REDACTED,
    AsyncAuditCallbackHandler,
    AuditCallbackHandler,
    AuditContext,
    audit_context,
)
from klockwork.integrations.langchain.decorator import RETRY_BUDGET_S, klock_protected
from klockwork.integrations.langchain.errors import KlockConflictError
from klockwork.integrations.langchain.gating import ApprovalResponse, gated_tool
from klockwork.integrations.langchain.identity import Identity, agent_config, resolve_identity
from klockwork.integrations.langchain.middleware import KlockworkMiddleware
from klockwork.integrations.langchain.tools import DEFAULT_TIMEOUT_S, protect_tool, protect_tools

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_WAIT_S",
    "REDACTED",
    "RETRY_BUDGET_S",
    "ApprovalResponse",
    "AsyncAuditCallbackHandler",
    "AuditCallbackHandler",
    "AuditContext",
    "Identity",
    "KlockConflictError",
    "KlockworkMiddleware",
    "agent_config",
    "audit_context",
    "bus_tools",
    "gated_tool",
    "klock_protected",
    "protect_tool",
    "protect_tools",
    "resolve_identity",
]
