"""The error a protected tool raises when it cannot get its leases.

:class:`KlockConflictError` is at once a klockwork
:class:`~klockwork.LeaseConflictError` (so ``except LeaseConflictError``
catches it next to engine errors) and a LangChain
:class:`~langchain_core.tools.ToolException` (so a tool with
``handle_tool_error=True``, or LangGraph's ``ToolNode``, turns it into an
error ``ToolMessage`` the model can read instead of crashing the run). It
keeps the attributes of Klock's own ``KlockConflictError`` — ``agent_id``,
``resource_path``, ``reason``, ``wait_time_ms`` — so code written against
Klock keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.tools import ToolException

from klockwork.core.errors import LeaseConflictError, LeaseTimeoutError
from klockwork.core.model import Conflict

__all__ = ["KlockConflictError", "conflict_from_timeout"]

#: ``reason`` after a blocking acquire ran out of time on WAIT (Klock's name).
WAIT_TIMEOUT = "WAIT_TIMEOUT"


class KlockConflictError(LeaseConflictError, ToolException):
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
            backing off from an older holder until its time ran out.
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
    exc: LeaseTimeoutError,
    *,
    agent_id: str,
    session_id: str,
    resource_path: str,
    resources: Sequence[str],
) -> KlockConflictError:
    """Translate the engine's :class:`~klockwork.LeaseTimeoutError` into Klock's terms.

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
