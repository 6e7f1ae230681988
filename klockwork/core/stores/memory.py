"""In-memory store: one process, every transition under one lock.

Indexes are chosen so a request costs O(depth of its path), whatever the
number of unrelated leases: active leases by exact key, and for each
ancestor key the multiset of descendant keys that have active leases.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

from klockwork.core.errors import InvalidRequestError, LeaseNotFoundError, StoreUnavailableError
from klockwork.core.model import AgentInfo, LeaseRecord, LeaseState, Reservation, VerdictStatus
from klockwork.core.rules import ParsedIntent, ancestors, judge, overlaps
from klockwork.core.stores.base import (
    AcquireOutcome,
    AcquireRequest,
    FenceState,
    IdPool,
    Store,
    raise_unless_active,
)

__all__ = ["MemoryStore"]

_ACTIVE = LeaseState.ACTIVE
_GRANTED = VerdictStatus.GRANTED


class MemoryStore(Store):
    """The default store: fast, in-process, nothing persisted.

    Args:
        retain_inactive: how many released/expired/revoked leases are kept
            so that late heartbeats get a precise error.
    """

    cross_process = False
    blocking_io = False

    def __init__(self, retain_inactive: int = 100_000) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._agents: dict[str, AgentInfo] = {}
        self._leases: dict[str, LeaseRecord] = {}
        self._active: dict[str, list[LeaseRecord]] = {}
        self._below: dict[str, dict[str, int]] = {}
        self._fence: dict[str, int] = {}
        self._reservations: dict[tuple[str, str], list[Reservation]] = {}
        self._retired: deque[str] = deque()
        self._retain = retain_inactive
        self._token = 0
        self._ids = IdPool()
        self._closed = False

    # -- agents -------------------------------------------------------------
    def register_agent(self, agent_id: str, priority: int | None, now_ms: int) -> AgentInfo:
        with self._lock:
            known = self._agents.get(agent_id)
            if known is None:
                return self._new_agent(agent_id, priority, now_ms)
            if priority is None or priority == known.priority:
                return known
            if self._is_busy(agent_id, now_ms):
                raise InvalidRequestError(
                    "priority",
                    priority,
                    f"agent {agent_id!r} holds or waits for a lease; its priority "
                    f"({known.priority}) cannot change until it releases",
                )
            info = known.model_copy(update={"priority": priority})
            self._agents[agent_id] = info
            return info

    def _new_agent(self, agent_id: str, priority: int | None, now_ms: int) -> AgentInfo:
        info = AgentInfo(
            agent_id=agent_id,
            priority=now_ms if priority is None else priority,
            registered_at=now_ms,
        )
        self._agents[agent_id] = info
        return info

    def _is_busy(self, agent_id: str, now_ms: int) -> bool:
        for records in self._active.values():
            for r in records:
                if r.agent_id == agent_id and r.expires_at > now_ms:
                    return True
        return any(
            r.expires_at > now_ms
            for (a, _), rs in self._reservations.items()
            if a == agent_id
            for r in rs
        )

    def get_agent(self, agent_id: str) -> AgentInfo | None:
        return self._agents.get(agent_id)

    # -- acquire --------------------------------------------------------------
    def try_acquire(self, request: AcquireRequest) -> AcquireOutcome:
        now = request.now_ms
        agent_id = request.agent_id
        session_id = request.session_id
        intents = request.intents
        with self._lock:
            if self._closed:
                raise StoreUnavailableError("memory store is closed")
            agent = self._agents.get(agent_id)
            if agent is None:
                agent = self._new_agent(agent_id, None, now)
            if len(intents) == 1:
                candidates: Sequence[Sequence[LeaseRecord]] = (self._overlapping(intents[0]),)
            else:
                candidates = [self._overlapping(i) for i in intents]
            reservations = self._overlapping_reservations(intents) if self._reservations else ()
            j = judge(agent_id, session_id, agent.priority, intents, candidates, reservations, now)
            for rec in j.expired:
                self._deactivate(rec, LeaseState.EXPIRED)
            granted: list[LeaseRecord] = []
            if j.status is _GRANTED:
                expires = now + request.ttl_ms
                for i in intents:
                    self._token += 1
                    rec = LeaseRecord(
                        self._ids.next(),
                        agent_id,
                        session_id,
                        i.key,
                        i.predicate,
                        agent.priority,
                        self._token,
                        now,
                        expires,
                        request.ttl_ms,
                    )
                    self._activate(rec, i)
                    granted.append(rec)
                if request.clear_reservation:
                    self._reservations.pop((agent_id, session_id), None)
            elif j.status is VerdictStatus.WAIT and request.reserve_ms:
                until = now + request.reserve_ms
                self._reservations[(agent_id, session_id)] = [
                    Reservation(agent_id, session_id, i.key, i.predicate, agent.priority, until)
                    for i in intents
                ]
        self._report_expired(j.expired)
        return AcquireOutcome(j.status, granted, j.blockers, j.wait_time_ms)

    def _overlapping(self, intent: ParsedIntent) -> Sequence[LeaseRecord]:
        active = self._active
        found: Sequence[LeaseRecord] = active.get(intent.key, ())
        for a in intent.ancestors:
            held = active.get(a)
            if held:
                found = [*found, *held]
        below = self._below.get(intent.key)
        if below:
            found = [*found, *(r for k in below for r in active[k])]
        return found

    def _overlapping_reservations(self, intents: tuple[ParsedIntent, ...]) -> list[Reservation]:
        return [
            r
            for rs in self._reservations.values()
            for r in rs
            if any(overlaps(r.resource, i.key) for i in intents)
        ]

    def _activate(self, rec: LeaseRecord, intent: ParsedIntent) -> None:
        self._leases[rec.lease_id] = rec
        held = self._active.get(rec.resource)
        if held is None:
            self._active[rec.resource] = [rec]
        else:
            held.append(rec)
        self._fence[rec.resource] = rec.fencing_token
        for a in intent.ancestors:
            below = self._below.get(a)
            if below is None:
                self._below[a] = {rec.resource: 1}
            else:
                below[rec.resource] = below.get(rec.resource, 0) + 1

    def _deactivate(self, rec: LeaseRecord, state: LeaseState) -> None:
        rec.state = state
        key = rec.resource
        held = self._active[key]
        held.remove(rec)
        if not held:
            del self._active[key]
        for a in ancestors(key):
            below = self._below[a]
            n = below[key] - 1
            if n:
                below[key] = n
            else:
                del below[key]
                if not below:
                    del self._below[a]
        self._retired.append(rec.lease_id)
        if len(self._retired) > self._retain:
            self._leases.pop(self._retired.popleft(), None)

    # -- other transitions ----------------------------------------------------
    def _expire_if_due(self, rec: LeaseRecord, now_ms: int, expired: list[LeaseRecord]) -> None:
        if rec.state is _ACTIVE and rec.expires_at <= now_ms:
            self._deactivate(rec, LeaseState.EXPIRED)
            expired.append(rec)

    def release(self, lease_id: str, now_ms: int) -> LeaseRecord | None:
        expired: list[LeaseRecord] = []
        with self._lock:
            rec = self._leases.get(lease_id)
            if rec is None:
                return None
            self._expire_if_due(rec, now_ms, expired)
            if rec.state is _ACTIVE:
                self._deactivate(rec, LeaseState.RELEASED)
            else:
                rec = None
        self._report_expired(expired)
        return rec

    def heartbeat(self, lease_id: str, ttl_ms: int | None, now_ms: int) -> LeaseRecord:
        expired: list[LeaseRecord] = []
        try:
            with self._lock:
                rec = self._leases.get(lease_id)
                if rec is None:
                    raise LeaseNotFoundError(lease_id, f"no lease {lease_id!r}")
                self._expire_if_due(rec, now_ms, expired)
                raise_unless_active(rec)
                rec.expires_at = now_ms + (ttl_ms or rec.ttl_ms)
                return rec
        finally:
            self._report_expired(expired)

    def revoke(self, lease_id: str, reason: str, now_ms: int) -> LeaseRecord | None:
        expired: list[LeaseRecord] = []
        with self._lock:
            rec = self._leases.get(lease_id)
            if rec is None:
                return None
            self._expire_if_due(rec, now_ms, expired)
            if rec.state is _ACTIVE:
                rec.reason = reason
                self._deactivate(rec, LeaseState.REVOKED)
            else:
                rec = None
        self._report_expired(expired)
        return rec

    def get_lease(self, lease_id: str, now_ms: int) -> LeaseRecord | None:
        expired: list[LeaseRecord] = []
        with self._lock:
            rec = self._leases.get(lease_id)
            if rec is not None:
                self._expire_if_due(rec, now_ms, expired)
        self._report_expired(expired)
        return rec

    def list_leases(
        self, agent_id: str | None, resource: ParsedIntent | None, now_ms: int
    ) -> list[LeaseRecord]:
        with self._lock:
            pool: Sequence[LeaseRecord]
            if resource is not None:
                pool = self._overlapping(resource)
            else:
                pool = [r for rs in self._active.values() for r in rs]
        return sorted(
            (
                r
                for r in pool
                if r.expires_at > now_ms and (agent_id is None or r.agent_id == agent_id)
            ),
            key=lambda r: r.fencing_token,
        )

    def fence_state(self, intent: ParsedIntent, token: int, now_ms: int) -> FenceState:
        with self._lock:
            tokens = [self._fence[k] for k in (intent.key, *intent.ancestors) if k in self._fence]
            active = any(
                r.fencing_token == token and r.expires_at > now_ms
                for r in self._active.get(intent.key, ())
            )
        return FenceState(max(tokens) if tokens else None, active)

    def unreserve(self, agent_id: str, session_id: str) -> None:
        with self._lock:
            self._reservations.pop((agent_id, session_id), None)

    def sweep(self, now_ms: int) -> list[LeaseRecord]:
        expired: list[LeaseRecord] = []
        with self._lock:
            due = [r for rs in self._active.values() for r in rs if r.expires_at <= now_ms]
            for rec in due:
                self._expire_if_due(rec, now_ms, expired)
            stale = [
                k for k, rs in self._reservations.items() if all(r.expires_at <= now_ms for r in rs)
            ]
            for k in stale:
                del self._reservations[k]
        self._report_expired(expired)
        return expired

    def close(self) -> None:
        with self._lock:
            self._closed = True
