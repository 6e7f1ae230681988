"""Models and enums shared by every part of klockwork.

Public models are frozen pydantic v2 models. Objects that klockwork builds
itself on the hot path (a granted :class:`Lease`, a :class:`Verdict`) are
made with :func:`_build`, which skips validation: their fields come from
our own store, already checked, and validating them again would cost more
than the whole lease decision.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from klockwork.core.errors import InvalidRequestError, LeaseConflictError

__all__ = [
    "AgentInfo",
    "Conflict",
    "GovernanceEvent",
    "Intent",
    "Lease",
    "LeaseRecord",
    "LeaseState",
    "Predicate",
    "Reservation",
    "Verdict",
    "VerdictStatus",
    "Waiter",
]


class Predicate(str, enum.Enum):
    """What an agent means to do with a resource (the KLIS intents)."""

    PROVIDES = "PROVIDES"
    CONSUMES = "CONSUMES"
    MUTATES = "MUTATES"
    DELETES = "DELETES"
    DEPENDS_ON = "DEPENDS_ON"
    RENAMES = "RENAMES"

    def __str__(self) -> str:
        return self.value


class LeaseState(str, enum.Enum):
    """Lifecycle of a lease. Only ``ACTIVE`` leases (not past expiry) block anyone."""

    ACTIVE = "ACTIVE"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"
    REVOKED = "REVOKED"

    def __str__(self) -> str:
        return self.value


class VerdictStatus(str, enum.Enum):
    """Outcome of one lease request."""

    GRANTED = "GRANTED"
    WAIT = "WAIT"
    DIE = "DIE"

    def __str__(self) -> str:
        return self.value


_FROZEN = ConfigDict(frozen=True)
_M = TypeVar("_M", bound=BaseModel)
_setattr = object.__setattr__
_new = object.__new__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__


def _build(cls: type[_M], values: dict[str, Any]) -> _M:
    """Create a model from values we produced ourselves, without validation.

    Equivalent to ``cls.model_construct(**values)`` for complete values (every
    field given), at a fifth of its cost.
    """
    obj = _new(cls)
    _setattr(obj, "__dict__", values)
    # Slot descriptors directly: BaseModel.__setattr__ is bypassed either way,
    # this skips the attribute lookup. pydantic copies the fields set before
    # changing it (model_copy), so one shared set per class is safe.
    _set_fields_set(obj, _FIELDS_SET[cls])
    _set_extra(obj, None)
    _set_private(obj, None)
    return obj


class _FieldSets(dict[type, set[str]]):
    def __missing__(self, cls: type) -> set[str]:
        fields = set(cls.model_fields)  # type: ignore[attr-defined]
        self[cls] = fields
        return fields


_FIELDS_SET = _FieldSets()


class Intent(BaseModel):
    """One resource an agent asks for, and what it means to do with it.

    ``resource`` is a ``TYPE:path`` key such as ``FILE:/src/auth.ts``.
    """

    model_config = _FROZEN
    resource: str
    predicate: Predicate


class Lease(BaseModel):
    """A snapshot of a lease as the store recorded it.

    ``fencing_token`` is strictly increasing per resource (klockwork uses one
    counter per store, so tokens also order leases globally). Times are epoch
    milliseconds from the engine's clock.
    """

    model_config = _FROZEN
    lease_id: str
    agent_id: str
    session_id: str
    resource: str
    predicate: Predicate
    fencing_token: int
    acquired_at: int
    expires_at: int
    state: LeaseState

    def __audit_data__(self) -> dict[str, Any]:
        """What a ``lease.granted`` audit entry records (built off the hot path)."""
        return {
            "lease_id": self.lease_id,
            "resource": self.resource,
            "predicate": self.predicate.value,
            "fencing_token": self.fencing_token,
            "expires_at": self.expires_at,
        }


class Conflict(BaseModel):
    """One holder (or older waiter) that blocks a request.

    ``lease_id`` is ``None`` when the blocker is an older agent *waiting* for
    the resource (its reservation), not a holder.
    """

    model_config = _FROZEN
    agent_id: str
    session_id: str
    resource: str
    predicate: Predicate
    lease_id: str | None


class Waiter(BaseModel):
    """An agent blocked in ``acquire``, holding its place in line (its reservation).

    ``until`` (epoch ms) is when the place lapses unless the waiter keeps
    it: one waiting in another process renews it every moment it waits; an
    agent that crashed while waiting drops out of line by then.
    """

    model_config = _FROZEN
    agent_id: str
    session_id: str
    resource: str
    predicate: Predicate
    priority: int
    until: int


class Verdict(BaseModel):
    """Result of a lease request.

    ``GRANTED`` carries the leases (all intents of a manifest, or none);
    ``WAIT`` means the requester is older than every conflicting holder and
    may wait; ``DIE`` means it is younger than one and must back off.
    ``wait_time_ms`` is the soonest a conflicting holder's TTL runs out.
    """

    model_config = _FROZEN
    status: VerdictStatus
    leases: list[Lease] = []
    conflicts: list[Conflict] = []
    wait_time_ms: int | None = None

    @property
    def granted(self) -> bool:
        """True when the request was granted."""
        return self.status is VerdictStatus.GRANTED

    @property
    def lease(self) -> Lease:
        """The single lease of a one-intent grant.

        Raises:
            LeaseConflictError: the verdict is ``WAIT`` or ``DIE``.
            InvalidRequestError: the grant holds several leases (use ``leases``).
        """
        if self.status is not VerdictStatus.GRANTED:
            raise LeaseConflictError(self.status.value, self.conflicts, self.wait_time_ms)
        if len(self.leases) != 1:
            raise InvalidRequestError(
                "lease", f"{len(self.leases)} leases", "a manifest grant has several; use .leases"
            )
        return self.leases[0]


class AgentInfo(BaseModel):
    """A registered agent. Lower ``priority`` means older, and older wins."""

    model_config = _FROZEN
    agent_id: str
    priority: int
    registered_at: int
    capabilities: list[str] = ["*"]
    parent_id: str | None = None
    #: When the agent was revoked (it can take no lease any more); None while it stands.
    revoked_at: int | None = None


@dataclass(frozen=True, slots=True)
class GovernanceEvent:
    """One lease/gate/audit-relevant happening, handed to engine listeners.

    ``kind`` is a lowercase dotted name such as ``lease.granted``.
    """

    kind: str
    ts: int
    agent_id: str | None
    session_id: str | None
    data: dict[str, Any] = field(default_factory=dict)


class LeaseRecord:
    """The store's own mutable record of a lease (internal).

    ``priority`` is the holder's priority at grant time; it cannot change
    while the lease is active, so the copy stays exact.
    """

    __slots__ = (
        "acquired_at",
        "agent_id",
        "expires_at",
        "fencing_token",
        "lease_id",
        "predicate",
        "priority",
        "reason",
        "resource",
        "session_id",
        "state",
        "ttl_ms",
    )

    def __init__(
        self,
        lease_id: str,
        agent_id: str,
        session_id: str,
        resource: str,
        predicate: Predicate,
        priority: int,
        fencing_token: int,
        acquired_at: int,
        expires_at: int,
        ttl_ms: int,
        state: LeaseState = LeaseState.ACTIVE,
        reason: str | None = None,
    ) -> None:
        self.lease_id = lease_id
        self.agent_id = agent_id
        self.session_id = session_id
        self.resource = resource
        self.predicate = predicate
        self.priority = priority
        self.fencing_token = fencing_token
        self.acquired_at = acquired_at
        self.expires_at = expires_at
        self.ttl_ms = ttl_ms
        self.state = state
        self.reason = reason

    def snapshot(self) -> Lease:
        """A frozen public copy of this record."""
        return _build(
            Lease,
            {
                "lease_id": self.lease_id,
                "agent_id": self.agent_id,
                "session_id": self.session_id,
                "resource": self.resource,
                "predicate": self.predicate,
                "fencing_token": self.fencing_token,
                "acquired_at": self.acquired_at,
                "expires_at": self.expires_at,
                "state": self.state,
            },
        )

    def __audit_data__(self) -> dict[str, Any]:
        """What a ``lease.released/expired/revoked`` audit entry records."""
        data: dict[str, Any] = {
            "lease_id": self.lease_id,
            "resource": self.resource,
            "predicate": self.predicate.value,
            "fencing_token": self.fencing_token,
        }
        if self.reason:
            data["reason"] = self.reason
        return data

    def __repr__(self) -> str:
        return (
            f"LeaseRecord({self.lease_id[:8]}.. {self.agent_id}/{self.session_id} "
            f"{self.predicate.value} {self.resource} #{self.fencing_token} {self.state.value})"
        )


class Reservation:
    """An older waiter's claim on a resource (internal): younger newcomers die."""

    __slots__ = ("agent_id", "expires_at", "predicate", "priority", "resource", "session_id")

    def __init__(
        self,
        agent_id: str,
        session_id: str,
        resource: str,
        predicate: Predicate,
        priority: int,
        expires_at: int,
    ) -> None:
        self.agent_id = agent_id
        self.session_id = session_id
        self.resource = resource
        self.predicate = predicate
        self.priority = priority
        self.expires_at = expires_at

    def waiter(self) -> Waiter:
        """The public view of this place in line."""
        return Waiter(
            agent_id=self.agent_id,
            session_id=self.session_id,
            resource=self.resource,
            predicate=self.predicate,
            priority=self.priority,
            until=self.expires_at,
        )
