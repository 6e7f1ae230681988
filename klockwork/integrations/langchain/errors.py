"""The errors a protected tool call raises for the *model* to read.

A refusal (a lease that could not be had in time) or a resource argument
the model chose badly (``path="../etc/passwd"``, ``path=""``) is news for
the model, not a crash: the agent should read it and do something else.
LangGraph's ``ToolNode`` — and so ``create_agent`` — answers exactly one
kind of exception with an error ``ToolMessage`` by default, its own
``ToolInvocationError``; anything else ends the whole run. Both errors here
are therefore ``ToolInvocationError``\\ s (and so ``ToolException``\\ s, so a
tool with ``handle_tool_error=True`` answers with them too), whichever way
the tool was protected:

* :class:`KlockConflictError` — also a klockwork
  :class:`~klockwork.LeaseConflictError`, with the attributes of Klock's own
  ``KlockConflictError`` (``agent_id``, ``resource_path``, ``reason``,
  ``wait_time_ms``) so code written against Klock keeps working;
* :class:`ToolArgumentError` — also an :class:`~klockwork.InvalidRequestError`
  (a ``ValueError``, as Klock raises for a bad path).

A mistake in the protection's own configuration (a template naming a
parameter the function does not have) is a plain
:class:`~klockwork.InvalidRequestError`: it raises, and should.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.tools import ToolException
from langgraph.prebuilt.tool_node import ToolInvocationError

from klockwork.core.errors import InvalidRequestError, LeaseConflictError, LeaseTimeoutError
from klockwork.core.model import Conflict

__all__ = [
    "WAIT_TIMEOUT",
    "KlockConflictError",
    "ToolArgumentError",
    "ToolCallError",
    "conflict_from_timeout",
]

#: ``reason`` after a blocking acquire ran out of time on WAIT (Klock's name).
WAIT_TIMEOUT = "WAIT_TIMEOUT"


class ToolCallError(ToolInvocationError):
    """Base of the errors meant for the model: ``ToolNode`` answers them with an error message.

    Attributes:
        message: what the model reads (also ``str(error)``).
        tool_name: the tool that was called, when known.
        tool_kwargs: the arguments it was called with, when known.
    """

    def __init__(self, message: str) -> None:
        # ToolInvocationError.__init__ wants a pydantic ValidationError to
        # format; ours already has its message.
        ToolException.__init__(self, message)
        self.set_tool_call(message)

    def set_tool_call(
        self, message: str, tool_name: str = "", tool_kwargs: Mapping[str, Any] | None = None
    ) -> None:
        """Fill in the attributes ``ToolInvocationError`` handlers read."""
        self.message = message
        self.tool_name = tool_name
        self.tool_kwargs = dict(tool_kwargs or {})
        self.filtered_errors = None
        # No pydantic error behind it (the cause, if any, is __cause__).
        setattr(self, "source", None)  # noqa: B010  (typed as ValidationError upstream)


class KlockConflictError(LeaseConflictError, ToolCallError):
    """A protected tool call could not lease its resources in time.

    The message says who holds what and when it frees, in words a model can
    act on; the same facts are attributes.

    Attributes:
        agent_id: the agent that asked (Klock's meaning).
        session_id: its session, when known.
        resource_path: what was asked for, as the caller named it — the
            extractor's path with Klock's signature, else the resource key;
            several are joined with ``", "``.
        resources: every requested resource key (``TYPE:path``).
        reason: ``"WAIT_TIMEOUT"`` when the call waited (it was older than
            every holder) until its time ran out; ``"DIE"`` when it kept
            backing off from an older holder until its time ran out; or the
            reason a Klock server gave.
        conflicts: one :class:`~klockwork.Conflict` per blocking holder.
        wait_time_ms: soonest time a blocking holder's TTL runs out (renewed
            holders extend it), or None.
    """

    def __init__(
        self,
        agent_id: str,
        resource_path: str,
        reason: str,
        wait_time_ms: int | None = None,
        *,
        session_id: str | None = None,
        resources: Sequence[str] = (),
        conflicts: Sequence[Conflict] = (),
        message: str | None = None,
    ) -> None:
        # Positional order is Klock's: KlockConflictError(agent_id, resource_path,
        # reason, wait_time_ms) keeps working for code that builds or matches it.
        self.agent_id = agent_id
        self.session_id = session_id
        self.resource_path = resource_path
        self.resources = list(resources) if resources else [resource_path]
        if message is None:
            message = _message(agent_id, self.resources, reason, conflicts, wait_time_ms)
        super().__init__(reason, conflicts, wait_time_ms, message)


class ToolArgumentError(InvalidRequestError, ToolCallError):
    """An argument the model chose makes no usable resource; the tool did not run.

    E.g. ``edit(path="../etc/passwd")`` (escapes its root) or ``edit(path="")``.
    ``argument`` names the tool's argument when one template field made the
    resource, else ``"resource"``.
    """

    def __init__(self, tool_name: str, argument: str, value: Any, problem: str) -> None:
        super().__init__(argument, value, problem)
        tool = f"tool {tool_name!r}" if tool_name else "the tool"
        self.set_tool_call(
            f"Invalid argument for {tool}: {argument!r} {problem} (got {value!r}). The "
            "tool did not run; call it again with a valid value.",
            tool_name,
        )

    def __str__(self) -> str:
        return self.message


def _message(
    agent_id: str,
    resources: Sequence[str],
    reason: str,
    conflicts: Sequence[Conflict],
    wait_time_ms: int | None,
) -> str:
    # Written for the model that reads the error ToolMessage: what is busy,
    # who has it, when it may free, and that nothing was done.
    if reason == WAIT_TIMEOUT:
        why = "waited for it until its time ran out"
    elif reason == "DIE":
        why = "kept yielding to an older agent until its time ran out"
    else:
        why = f"was refused ({reason})"
    holders = "; ".join(
        f"{c.agent_id} (session {c.session_id}) "
        f"{'holds' if c.lease_id is not None else 'is waiting for'} {c.predicate} on {c.resource}"
        for c in conflicts[:5]
    )
    if len(conflicts) > 5:
        holders += f"; and {len(conflicts) - 5} more"
    who = f" {holders}." if holders else ""
    when = (
        f" The soonest lease runs out in {wait_time_ms} ms unless its holder renews it."
        if wait_time_ms is not None
        else ""
    )
    return (
        f"Resource busy: {', '.join(resources)}.{who}{when} {agent_id} {why} (reason "
        f"{reason}); the tool did not run. Try again later or do something else first."
    )


def conflict_from_timeout(
    exc: LeaseTimeoutError | LeaseConflictError,
    *,
    agent_id: str,
    session_id: str,
    resource_path: str,
    resources: Sequence[str],
) -> KlockConflictError:
    """Translate the engine's refusal into Klock's terms.

    The engine reports the last verdict (``WAIT`` or ``DIE``); Klock calls
    an exhausted wait ``WAIT_TIMEOUT``, and a DIE stays ``DIE``.
    """
    reason = WAIT_TIMEOUT if exc.reason == "WAIT" else exc.reason
    return KlockConflictError(
        agent_id,
        resource_path,
        reason,
        exc.wait_time_ms,
        session_id=session_id,
        resources=resources,
        conflicts=exc.conflicts,
    )
