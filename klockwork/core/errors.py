"""The typed error tree of klockwork.

Every error klockwork raises on purpose derives from :class:`KlockworkError`.
The root is deliberately *not* a ``RuntimeError`` or ``ValueError`` so that
LangGraph's default ``RetryPolicy`` (which skips those) can retry it where a
retry is right; only :class:`InvalidRequestError` is also a ``ValueError``,
because retrying bad input never helps::

    KlockworkError
    ├── InvalidRequestError (+ ValueError)   bad argument, nothing was changed
    ├── StoreUnavailableError                the store cannot answer: fail closed
    ├── EventLoopBlockedError (+ RuntimeError) a sync call would block a running loop
    ├── AuditIntegrityError                  the audit chain does not verify
    ├── LeaseError
    │   ├── LeaseConflictError               WAIT / DIE: who holds what, until when
    │   ├── LeaseTimeoutError                a blocking acquire gave up
    │   ├── LeaseNotFoundError               no such lease (or not active)
    │   ├── LeaseExpiredError                its TTL ran out; never revived
    │   ├── LeaseRevokedError                revoked by an operator or a parent
    │   ├── LeaseLostError                   a held lease could not be renewed
    │   └── StaleLeaseError                  a newer lease supersedes this one
    └── GateError
        ├── GateDeniedError                  the gate refused the action
        ├── ApprovalTimeoutError             the caller's wait ran out first
        ├── ApprovalNotFoundError
        ├── NotAnApproverError
        └── CapabilityError

:class:`KlockworkWarning` (a ``UserWarning``) flags a set-up that works
but probably not as meant, such as the private in-memory default engine.

Errors carry the facts a caller needs as attributes (``lease_id``,
``resource``, ``conflicts``...), not only in their message.
"""

from __future__ import annotations

import reprlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from klockwork.core.model import Conflict

__all__ = [
    "ApprovalNotFoundError",
    "ApprovalTimeoutError",
    "AuditIntegrityError",
    "CapabilityError",
    "EventLoopBlockedError",
    "GateDeniedError",
    "GateError",
    "InvalidRequestError",
    "KlockworkError",
    "KlockworkWarning",
    "LeaseConflictError",
    "LeaseError",
    "LeaseExpiredError",
    "LeaseLostError",
    "LeaseNotFoundError",
    "LeaseRevokedError",
    "LeaseTimeoutError",
    "NotAnApproverError",
    "StaleLeaseError",
    "StoreUnavailableError",
]


class KlockworkError(Exception):
    """Root of every error klockwork raises on purpose."""


class InvalidRequestError(KlockworkError, ValueError):
    """An argument is invalid; the request changed nothing.

    Attributes:
        argument: the name of the offending argument.
        value: the value that was rejected.
    """

    def __init__(self, argument: str, value: Any, problem: str) -> None:
        self.argument = argument
        self.value = value
        self.problem = problem
        super().__init__(f"invalid {argument}={describe(value)}: {problem}")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 80, 80, 40


def describe(value: object) -> str:
    """A short ``repr`` of ``value`` for an error message; never raises.

    Bad input is what error messages are about, so the value may be huge,
    nested thousands deep, or have a ``__repr__`` that raises: the message
    must still be built (a failing repr would replace the typed error with
    whatever the repr raised).
    """
    try:
        return _REPR.repr(value)
    except Exception:
        return f"<{type(value).__name__} object>"


class StoreUnavailableError(KlockworkError):
    """The store could not answer. Nothing was granted or approved (fail closed)."""


class EventLoopBlockedError(KlockworkError, RuntimeError):
    """A sync call would have to wait on a running event loop's thread.

    Use the async twin the message names (``await kw.leases.aacquire(...)``,
    ``async with kw.alease(...)``, ``await kw.gates.agate(...)``, ``await
    tool.ainvoke(...)``...); klockwork never freezes your event loop for
    longer than a store round trip. Nothing was left half done: a lease
    request withdrew its reservation, a gate created no approval.

    Attributes:
        call: the sync call that was made, as the user wrote it.
        use: the async twin to call instead.
        waiting_for: what it would have waited for (``"a lease"``, ``"an approval"``).
        approval_id: the approval it would have waited for, if one exists.
    """

    def __init__(
        self,
        call: str,
        use: str,
        waiting_for: str = "a lease",
        *,
        approval_id: str | None = None,
    ) -> None:
        self.call = call
        self.use = use
        self.waiting_for = waiting_for
        self.approval_id = approval_id
        pending = f" (approval {approval_id} stays pending)" if approval_id else ""
        super().__init__(
            f"{call} would block the running event loop while waiting for {waiting_for}"
            f"{pending}; use {use} instead"
        )

    def as_call(self, call: str, use: str) -> EventLoopBlockedError:
        """The same refusal, named after the call the user made at an outer layer."""
        return EventLoopBlockedError(call, use, self.waiting_for, approval_id=self.approval_id)


class KlockworkWarning(UserWarning):
    """Something works, but probably not as you meant it (e.g. a private in-memory engine)."""


class AuditIntegrityError(KlockworkError):
    """The audit chain failed verification."""


class LeaseError(KlockworkError):
    """Base class of lease errors."""


class _ConflictInfo(LeaseError):
    """Shared shape of errors that report who blocks a request."""

    def __init__(
        self,
        reason: str,
        conflicts: Sequence[Conflict] = (),
        wait_time_ms: int | None = None,
        message: str | None = None,
    ) -> None:
        self.reason = reason
        self.conflicts: list[Conflict] = list(conflicts)
        self.wait_time_ms = wait_time_ms
        super().__init__(message or describe_conflict(reason, self.conflicts, wait_time_ms))


class LeaseConflictError(_ConflictInfo):
    """A lease request was refused (reason ``WAIT`` or ``DIE``).

    Attributes:
        reason: ``"WAIT"``, ``"DIE"`` (or ``"WAIT_TIMEOUT"`` from integrations).
        conflicts: one :class:`~klockwork.Conflict` per blocking holder.
        wait_time_ms: soonest time a conflicting holder's TTL runs out.
    """


class LeaseTimeoutError(_ConflictInfo):
    """A blocking acquire gave up; ``reason`` is the last verdict (``WAIT``/``DIE``)."""


class _LeaseRef(LeaseError):
    def __init__(self, lease_id: str, message: str) -> None:
        self.lease_id = lease_id
        super().__init__(message)


class LeaseNotFoundError(_LeaseRef):
    """No active lease has this id."""


class LeaseExpiredError(_LeaseRef):
    """The lease's TTL ran out; an expired lease is never revived."""


class LeaseRevokedError(_LeaseRef):
    """The lease was revoked."""


class LeaseLostError(_LeaseRef):
    """A held lease could not be renewed (expired or revoked) while in use."""


class StaleLeaseError(LeaseError):
    """The lease or fencing token is no longer current.

    Attributes:
        resource: the resource key.
        fencing_token: the token that was checked.
        current_token: the newest token granted on the resource (or None).
    """

    def __init__(
        self, resource: str, fencing_token: int, current_token: int | None, message: str
    ) -> None:
        self.resource = resource
        self.fencing_token = fencing_token
        self.current_token = current_token
        super().__init__(message)


class GateError(KlockworkError):
    """Base class of gate, approval and delegation errors."""


class GateDeniedError(GateError):
    """The gate refused the action."""

    def __init__(
        self,
        reason: str,
        policy: str | None = None,
        conditions: Sequence[Any] = (),
        approval_id: str | None = None,
        message: str | None = None,
    ) -> None:
        self.reason = reason
        self.policy = policy
        self.conditions = list(conditions)
        self.approval_id = approval_id
        super().__init__(message or f"action denied: {reason} (policy {policy!r})")


class ApprovalTimeoutError(GateError):
    """The caller's own wait for an approval ran out before a decision.

    The approval stays pending (its stored deadline still applies); wait
    again with the same ``approval_id`` or re-run the gate with the same
    ``event_id``.
    """

    def __init__(self, message: str, approval_id: str | None = None) -> None:
        self.approval_id = approval_id
        super().__init__(message)


class ApprovalNotFoundError(GateError):
    """No approval has this id."""


class NotAnApproverError(GateError):
    """The decider may not decide this approval."""


class CapabilityError(GateError):
    """An agent asked for more than its capabilities allow."""


def describe_conflict(reason: str, conflicts: Sequence[Conflict], wait_time_ms: int | None) -> str:
    """Human sentence for a refused request: who holds what, and when it frees."""
    if not conflicts:
        return f"lease refused ({reason})"
    parts = []
    for c in conflicts[:5]:
        what = "holds" if c.lease_id is not None else "waits for"
        parts.append(f"{c.agent_id} (session {c.session_id}) {what} {c.predicate} on {c.resource}")
    more = f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else ""
    frees = f"; frees in at most {wait_time_ms} ms" if wait_time_ms is not None else ""
    return f"lease refused ({reason}): " + "; ".join(parts) + more + frees
