"""In-memory store: one process, every transition under one lock.

Indexes are chosen so a request costs O(depth of its path), whatever the
number of unrelated leases: active leases by exact key, and for each
ancestor key the multiset of descendant keys that have active leases.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Sequence
from typing import TypeVar, cast

from pydantic import BaseModel

from klockwork.core.errors import InvalidRequestError, LeaseNotFoundError, StoreUnavailableError
from klockwork.core.leases.rules import (
    ParsedIntent,
    ancestors,
    descendant_range,
    judge,
    overlaps,
)
from klockwork.core.model import AgentInfo, LeaseRecord, LeaseState, Reservation, VerdictStatus
from klockwork.core.stores.base import (
    DEFAULT_AUDIT_RETAIN,
    DEFAULT_RETAIN,
    RETAINED_KINDS,
    AcquireOutcome,
    AcquireRequest,
    FenceState,
    IdPool,
    Store,
    Transition,
    check_retain,
    fence_with_floor,
    in_play,
    raise_unless_active,
    record_status,
    refuse_revoked,
)
from klockwork.core.stores.memory_bus import MemoryBus
from klockwork.core.validation import check_int

__all__ = ["MemoryStore"]

_M = TypeVar("_M", bound=BaseModel)
_T = TypeVar("_T")
_new_outcome = AcquireOutcome._make  # tuple.__new__: skips the NamedTuple's Python __new__

_ACTIVE = LeaseState.ACTIVE
_GRANTED = VerdictStatus.GRANTED


class MemoryStore(MemoryBus, Store):
    """The default store: fast, in-process, nothing persisted.

    Args:
        retain_inactive: how many released/expired/revoked leases are kept
            so that late heartbeats get a precise error; also how many settled
            gate outcomes (``event_id`` idempotency, reports) and decided
            approvals are kept, and, times two, how many resources' fencing
            history (older history leaves a floor: see ``fence_with_floor``).
        audit_retain: how many of the newest audit entries ``kw.audit``
            keeps (None: all). The kept tail links to the checkpoint of the
            last dropped entry, so it still verifies
            (``kw.audit.retained_from()``).
    """

    cross_process = False
    blocking_io = False

    def __init__(
        self,
        retain_inactive: int = DEFAULT_RETAIN,
        *,
        audit_retain: int | None = DEFAULT_AUDIT_RETAIN,
    ) -> None:
        super().__init__()
        check_retain(retain_inactive)
        if audit_retain is not None:
            check_int(audit_retain, "audit_retain", low=1)
        self.audit_retain = audit_retain
        self._lock = threading.Lock()
        self._agents: dict[str, AgentInfo] = {}
        # Agents known only from their lease requests, oldest first (prunable when idle).
        self._implicit: dict[str, None] = {}
        self._agent_limit = max(2 * retain_inactive, 1024)
        self._leases: dict[str, LeaseRecord] = {}
        self._active: dict[str, list[LeaseRecord]] = {}
        # ancestor key -> descendant keys that have active leases
        self._below: dict[str, set[str]] = {}
        self._fence: dict[str, int] = {}
        self._fence_keys: list[str] = []
        self._fence_floor = 0  # the newest token whose key's history was pruned
        self._fence_limit = max(2 * retain_inactive, 1024)
        self._reservations: dict[tuple[str, str], list[Reservation]] = {}
        self._retired: deque[str] = deque()
        self._retain = retain_inactive
        self._token = 0
        self._ids = IdPool()
        self._closed = False
        # Governance records, one dict per kind (insertion order = creation
        # order); their own lock, so gates never wait behind lease decisions.
        self._records: dict[str, dict[str, BaseModel]] = {}
        # Settled gate outcomes are only needed for idempotency and reports:
        # keep the newest ones, like retired leases (memory must not grow forever).
        self._retain_records = dict.fromkeys(RETAINED_KINDS, retain_inactive)
        self._record_order: dict[str, deque[str]] = {}
        self._records_lock = threading.Lock()

    # -- agents -------------------------------------------------------------
    def register_agent(self, agent_id: str, priority: int | None, now_ms: int) -> AgentInfo:
        with self._lock:
            self._implicit.pop(agent_id, None)  # registered: never forgotten
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

    def _prune_agents(self) -> None:
        """Forget the oldest agents that only ever appeared in a lease request and are idle.

        An agent registered with ``register_agent`` or revoked is kept, and
        so is one holding or waiting for a lease; one forgotten gets a new
        wait-die age (now) if it comes back. Runs once per ``limit / 2`` new
        agents: amortised O(1) per agent.
        """
        busy = {r.agent_id for records in self._active.values() for r in records}
        busy.update(agent for agent, _ in self._reservations)
        agents, implicit = self._agents, self._implicit
        for agent_id in list(implicit):
            if len(agents) <= self._agent_limit // 2:
                break
            if agent_id not in busy:
                del implicit[agent_id]
                agents.pop(agent_id, None)

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

    def revoke_agent(self, agent_id: str, now_ms: int) -> None:
        with self._lock:
            self._implicit.pop(agent_id, None)  # a revocation is never forgotten
            agent = self._agents.get(agent_id) or self._new_agent(agent_id, None, now_ms)
            if agent.revoked_at is None:
                self._agents[agent_id] = agent.model_copy(update={"revoked_at": now_ms})

    # -- acquire --------------------------------------------------------------
    def try_acquire(self, request: AcquireRequest) -> AcquireOutcome:
        # Explicit acquire/release instead of `with`: this is the hot path, and
        # the context-manager protocol costs twice as much as the lock itself.
        lock = self._lock
        lock.acquire()
        try:
            outcome, expired = self._decide(request)
            hooks = self.lease_hooks
            if hooks is not None:  # recorded before anyone can see the decision
                if expired:
                    self._hook_expired(expired, request.now_ms)
                try:
                    hooks.decided(request, outcome)
                except BaseException:
                    self._undo(outcome.granted)  # nothing granted without its entry
                    raise
        finally:
            lock.release()
        if expired:
            self._report_expired(expired)
        return outcome

    def _undo(self, granted: Sequence[LeaseRecord]) -> None:
        """Take back a grant whose audit entry could not be recorded (lock held)."""
        for rec in granted:
            if rec.state is _ACTIVE:
                self._deactivate(rec, LeaseState.RELEASED)

    def _decide(self, request: AcquireRequest) -> tuple[AcquireOutcome, Sequence[LeaseRecord]]:
        """The atomic section of try_acquire (called with the lock held)."""
        agent_id, session_id, intents, ttl_ms, now, reserve_ms, clear_reservation, _, _ = request
        if self._closed:
            raise StoreUnavailableError("memory store is closed")
        agent = self._agents.get(agent_id)
        if agent is None:
            agent = self._new_agent(agent_id, None, now)
            self._implicit[agent_id] = None
            if len(self._agents) > self._agent_limit:
                self._prune_agents()
        elif agent.revoked_at is not None:
            refuse_revoked(agent)
        if len(intents) == 1:
            candidates: Sequence[Sequence[LeaseRecord]] = (self._overlapping(intents[0]),)
        else:
            candidates = [self._overlapping(i) for i in intents]
        reservations = self._overlapping_reservations(intents) if self._reservations else ()
        j = judge(agent_id, session_id, agent.priority, intents, candidates, reservations, now)
        for rec in j.expired:
            self._deactivate(rec, LeaseState.EXPIRED)
        if j.status is not _GRANTED:
            if reserve_ms:  # a blocked acquire (WAIT or backing off after DIE)
                until = now + reserve_ms
                self._reservations[(agent_id, session_id)] = [
                    Reservation(agent_id, session_id, i.key, i.predicate, agent.priority, until)
                    for i in intents
                ]
            return _new_outcome((j.status, (), j.blockers, j.wait_time_ms)), j.expired
        granted: list[LeaseRecord] = []
        expires = now + ttl_ms
        for i in intents:
            self._token = token = self._token + 1
            rec = LeaseRecord(
                self._ids.next(),
                agent_id,
                session_id,
                i.key,
                i.predicate,
                agent.priority,
                token,
                now,
                expires,
                ttl_ms,
            )
            self._activate(rec, i.ancestors)
            granted.append(rec)
        if clear_reservation:
            self._reservations.pop((agent_id, session_id), None)
        return _new_outcome((_GRANTED, granted, (), None)), j.expired

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

    def _activate(self, rec: LeaseRecord, key_ancestors: tuple[str, ...]) -> None:
        key = rec.resource
        self._leases[rec.lease_id] = rec
        if key not in self._fence:
            bisect.insort(self._fence_keys, key)  # kept sorted: descendants are one range
        self._fence[key] = rec.fencing_token
        held = self._active.get(key)
        if held is not None:
            held.append(rec)
            return
        # First active lease on this key: make it findable from its ancestors.
        self._active[key] = [rec]
        below_index = self._below
        for a in key_ancestors:
            below = below_index.get(a)
            if below is None:
                below_index[a] = {key}
            else:
                below.add(key)

    def _deactivate(self, rec: LeaseRecord, state: LeaseState) -> None:
        rec.state = state
        key = rec.resource
        held = self._active[key]
        held.remove(rec)
        if not held:
            # Last active lease on this key: unlink it from its ancestors.
            del self._active[key]
            below_index = self._below
            for a in ancestors(key):
                below = below_index[a]
                below.discard(key)
                if not below:
                    del below_index[a]
        retired = self._retired
        retired.append(rec.lease_id)
        if len(retired) > self._retain:
            self._leases.pop(retired.popleft(), None)
            if len(self._fence) > self._fence_limit:
                self._prune_fences()

    def _prune_fences(self) -> None:
        """Forget the fencing history of the least recently granted idle keys.

        Keeps the newest half of the limit, and every key on, above or below
        an active lease (so a live lease's token is judged by its full
        history); the newest token forgotten becomes the floor. Runs once per
        ``limit / 2`` new keys: amortised O(log n) per key.
        """
        fence, active, below = self._fence, self._active, self._below
        keep = self._fence_limit // 2
        by_age = sorted(fence, key=fence.__getitem__, reverse=True)
        for key in by_age[keep:]:
            if key in active or key in below or any(a in active for a in ancestors(key)):
                continue  # history around a live lease is never forgotten (see fence_state)
            self._fence_floor = max(self._fence_floor, fence.pop(key))
        self._fence_keys = sorted(fence)

    # -- other transitions ----------------------------------------------------
    def _expire_if_due(self, rec: LeaseRecord, now_ms: int, expired: list[LeaseRecord]) -> None:
        if rec.state is _ACTIVE and rec.expires_at <= now_ms:
            self._deactivate(rec, LeaseState.EXPIRED)
            expired.append(rec)

    def release(self, lease_id: str, now_ms: int) -> LeaseRecord | None:
        lock = self._lock
        lock.acquire()  # hot path: see try_acquire
        try:
            rec = self._leases.get(lease_id)
            if rec is None or rec.state is not _ACTIVE:
                return None
            hooks = self.lease_hooks
            if rec.expires_at > now_ms:
                self._deactivate(rec, LeaseState.RELEASED)
                if hooks is not None:
                    hooks.ended("lease.released", rec, now_ms)
                return rec
            self._deactivate(rec, LeaseState.EXPIRED)
            self._hook_expired([rec], now_ms)
        finally:
            lock.release()
        self._report_expired([rec])
        return None

    def release_many(self, lease_ids: Sequence[str], now_ms: int) -> list[LeaseRecord | None]:
        """:meth:`release` of each id, under one hold of the lock."""
        out: list[LeaseRecord | None] = []
        expired: list[LeaseRecord] = []
        with self._lock:
            hooks = self.lease_hooks
            for lease_id in lease_ids:
                rec = self._leases.get(lease_id)
                if rec is None or rec.state is not _ACTIVE:
                    out.append(None)
                elif rec.expires_at > now_ms:
                    self._deactivate(rec, LeaseState.RELEASED)
                    if hooks is not None:
                        hooks.ended("lease.released", rec, now_ms)
                    out.append(rec)
                else:
                    self._deactivate(rec, LeaseState.EXPIRED)
                    self._hook_expired([rec], now_ms)
                    expired.append(rec)
                    out.append(None)
        self._report_expired(expired)
        return out

    def heartbeat(self, lease_id: str, ttl_ms: int | None, now_ms: int) -> LeaseRecord:
        expired: list[LeaseRecord] = []
        try:
            with self._lock:
                rec = self._leases.get(lease_id)
                if rec is None:
                    raise LeaseNotFoundError(lease_id, f"no lease {lease_id!r}")
                self._expire_if_due(rec, now_ms, expired)
                self._hook_expired(expired, now_ms)
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
            self._hook_expired(expired, now_ms)
            if rec.state is _ACTIVE:
                rec.reason = reason
                self._deactivate(rec, LeaseState.REVOKED)
                if self.lease_hooks is not None:
                    self.lease_hooks.ended("lease.revoked", rec, now_ms)
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
                self._hook_expired(expired, now_ms)
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

    def list_reservations(self, now_ms: int) -> list[Reservation]:
        with self._lock:
            return [r for rs in self._reservations.values() for r in rs if r.expires_at > now_ms]

    def fence_state(self, intent: ParsedIntent, token: int, now_ms: int) -> FenceState:
        with self._lock:
            fence = self._fence
            tokens = [fence[k] for k in (intent.key, *intent.ancestors) if k in fence]
            span = descendant_range(intent.key)
            if span is not None:  # a newer grant inside a directory supersedes it too
                keys = self._fence_keys
                lo = bisect.bisect_left(keys, span[0])
                hi = bisect.bisect_left(keys, span[1], lo)
                tokens.extend(fence[k] for k in keys[lo:hi])
            held = self._active
            active = any(
                r.fencing_token == token and r.expires_at > now_ms for r in held.get(intent.key, ())
            )
            live = active or any(
                r.fencing_token == token and r.expires_at > now_ms
                for k in intent.ancestors
                for r in held.get(k, ())
            )
        newest = max(tokens) if tokens else None
        return FenceState(fence_with_floor(newest, self._fence_floor, live), active)

    def unreserve(self, agent_id: str, session_id: str) -> None:
        with self._lock:
            self._reservations.pop((agent_id, session_id), None)

    def sweep(self, now_ms: int) -> list[LeaseRecord]:
        expired: list[LeaseRecord] = []
        with self._lock:
            due = [r for rs in self._active.values() for r in rs if r.expires_at <= now_ms]
            for rec in due:
                self._expire_if_due(rec, now_ms, expired)
            self._hook_expired(expired, now_ms)
            stale = [
                k for k, rs in self._reservations.items() if all(r.expires_at <= now_ms for r in rs)
            ]
            for k in stale:
                del self._reservations[k]
        self._report_expired(expired)
        return expired

    # -- records -------------------------------------------------------------
    def update_record(
        self, kind: str, key: str, model: type[_M], transition: Transition[_M, _T]
    ) -> _T:
        with self._records_lock:
            self._check_open()
            table = self._records.setdefault(kind, {})
            current = cast("_M | None", table.get(key))
            new, result = transition(current)
            if new is not current:
                if new is None:
                    table.pop(key, None)
                else:
                    table[key] = new
                    limit = self._retain_records.get(kind)
                    if limit is not None and current is None:
                        self._retire(kind, table, key, limit)
            return result

    def _retire(self, kind: str, table: dict[str, BaseModel], key: str, limit: int) -> None:
        """Track a new bounded record; drop the oldest settled ones beyond ``limit``.

        A record still in play (``requested``, ``pending``) is never dropped: it goes to the back of
        the queue. A deque of keys keeps this O(1) amortised (scanning the dict
        from its start would walk every slot deleted before).
        """
        order = self._record_order.setdefault(kind, deque())
        order.append(key)
        spins = len(order)
        while len(table) > limit and order and spins > 0:
            spins -= 1
            oldest = order.popleft()
            record = table.get(oldest)
            if record is None:
                continue
            if in_play(record, self._status_of):
                order.append(oldest)
                continue
            del table[oldest]

    def _status_of(self, kind: str, key: str) -> str | None:
        record = self._records.get(kind, {}).get(key)
        return None if record is None else record_status(record)

    def get_record(self, kind: str, key: str, model: type[_M]) -> _M | None:
        self._check_open()
        return cast("_M | None", self._records.get(kind, {}).get(key))

    def list_records(self, kind: str, model: type[_M], status: str | None = None) -> list[_M]:
        with self._records_lock:
            self._check_open()
            records = list(self._records.get(kind, {}).values())
        if status is not None:
            records = [r for r in records if record_status(r) == status]
        return cast("list[_M]", records)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailableError("memory store is closed")

    def close(self) -> None:
        with self._lock:
            self._closed = True
