"""The Store contract: a thin layer of atomic state transitions.

A store keeps agents, leases and waiters' reservations, and performs each
transition atomically. It makes no decision of its own: inside its atomic
section it gathers the facts and calls :func:`klockwork.core.leases.rules.judge`.

Governance state (approvals, gate outcomes, breakers, delegations) is kept
as *records*: frozen pydantic models filed under ``(kind, key)``.
:meth:`Store.update_record` loads one, hands it to a pure transition
function (from :mod:`klockwork.core.governance.approvals` and friends) inside the
store's atomic section and persists what it returns, the same way leases
use :func:`~klockwork.core.leases.rules.judge`.

Like LangGraph's ``BaseCheckpointSaver``, a store implements a few sync
primitives; the async twins are written once here. A store whose
primitives do I/O (``blocking_io = True``) has them run on a worker thread
so the event loop never blocks; an in-memory store answers inline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Concatenate, NamedTuple, ParamSpec, Protocol, TypeVar

from pydantic import BaseModel

from klockwork.core.clock import Clock
from klockwork.core.errors import (
    CapabilityError,
    LeaseExpiredError,
    LeaseNotFoundError,
    LeaseRevokedError,
)
from klockwork.core.leases.rules import ParsedIntent
from klockwork.core.model import AgentInfo, LeaseRecord, LeaseState, Reservation, VerdictStatus
from klockwork.core.stores.bus_base import (
    BusPrimitives,
    GroupSpec,
    PublishItem,
    ReadOutcome,
    Retention,
    StoredMessage,
)
from klockwork.core.validation import check_int

__all__ = [
    "DEFAULT_AUDIT_RETAIN",
    "DEFAULT_RETAIN",
    "RETAINED_KINDS",
    "UNSETTLED_STATUSES",
    "check_retain",
    "fence_with_floor",
    "in_play",
    "io_twin",
    "AcquireOutcome",
    "AcquireRequest",
    "AuditJournal",
    "FenceState",
    "JournalRow",
    "JournalSection",
    "LeaseHooks",
    "IdPool",
    "Store",
    "Transition",
    "raise_unless_active",
    "refuse_revoked",
    "record_status",
]

_P = ParamSpec("_P")
_T = TypeVar("_T")


class _UsesStore(Protocol):
    _store: Store


_S = TypeVar("_S", bound=_UsesStore)


def io_twin(
    method: Callable[Concatenate[_S, _P], _T],
) -> Callable[Concatenate[_S, _P], Coroutine[Any, Any, _T]]:
    """The async twin of a sync method of an engine part that only calls its store.

    ``aask = io_twin(ask)`` in a class body: the same call, with the same
    arguments and checks, run through :meth:`Store.run_io` (inline for a
    store without I/O, on a worker thread otherwise), so the logic exists
    once and the event loop never waits on the store.
    """

    async def twin(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return await self._store.run_io(method, self, *args, **kwargs)

    twin.__name__ = twin.__qualname__ = f"a{method.__name__}"
    twin.__doc__ = f"Async twin of :meth:`{method.__name__}`; never blocks the event loop."
    return twin


_M = TypeVar("_M", bound=BaseModel)

#: A pure transition of one record: given the stored record (None when there
#: is none) return ``(new, result)``. ``new`` is what to store: the *same
#: object* to change nothing, ``None`` to delete. It may raise; then nothing
#: changes. ``result`` is handed back to the caller of ``update_record``.
Transition = Callable[[_M | None], tuple[_M | None, _T]]


class AcquireRequest(NamedTuple):
    """One atomic lease request, already validated.

    Attributes:
        reserve_ms: when set and the request is refused (WAIT or DIE), record
            (or refresh) a reservation for its intents lasting this long.
        clear_reservation: on GRANTED, drop the requester's reservations.
    """

    agent_id: str
    session_id: str
    intents: tuple[ParsedIntent, ...]
    ttl_ms: int
    now_ms: int
    reserve_ms: int | None = None
    clear_reservation: bool = False
    #: A blocking acquire's count of tries (its refusals are not outcomes);
    #: None for a single try.
    tries: Any = None
    #: When the caller stops waiting (``time.monotonic()``): bounds how long
    #: the store may wait for a lock held by another process.
    deadline: float | None = None


class AcquireOutcome(NamedTuple):
    """What a store did with an :class:`AcquireRequest`."""

    status: VerdictStatus
    granted: Sequence[LeaseRecord]
    blockers: Sequence[LeaseRecord | Reservation]
    wait_time_ms: int | None


@dataclass(slots=True)
class FenceState:
    """Facts needed to judge a fencing token (see ``LeaseManager.check_fencing``)."""

    newest_token: int | None
    token_active: bool


# -- retention -------------------------------------------------------------------------
#: How many ended leases, and settled gate outcomes and approvals, a store
#: keeps by default (``retain_inactive=``). Older ones are pruned.
DEFAULT_RETAIN = 100_000
#: How many of the newest entries an in-memory audit log keeps (about 40 MB).
DEFAULT_AUDIT_RETAIN = 100_000
#: Record kinds retention prunes (their settled records only).
RETAINED_KINDS = ("gate", "approval", "bus.await", "tool_call")
#: Statuses of records still in play: never pruned.
UNSETTLED_STATUSES = frozenset({"requested", "pending"})


def check_retain(value: object) -> int:
    """``retain_inactive`` if it is an int >= 1; else raise InvalidRequestError."""
    return check_int(value, "retain_inactive", low=1)


def fence_with_floor(newest: int | None, floor: int, live: bool) -> int | None:
    """The newest token to judge a fencing token by, once history was pruned.

    Pruning forgets which key an old lease was on; ``floor`` is the newest
    token pruned. A token below it whose lease is no longer ``live`` (active
    on the resource or a directory above it) is refused as stale even if
    its own key saw no newer grant: fail closed, since a lease that ended
    that long ago guards nothing.
    """
    if floor and not live and (newest is None or newest < floor):
        return floor
    return newest


def in_play(record: BaseModel, status_of: Callable[[str, str], str | None]) -> bool:
    """True if retention must keep ``record`` (a request still being decided).

    A record may say so itself with ``in_play(linked_status)`` and
    ``retention_link() -> (kind, key) | None`` (the record its fate is tied
    to; ``status_of`` reads that one's status). Otherwise its status
    decides: ``requested`` and ``pending`` are in play.
    """
    decide = getattr(record, "in_play", None)
    if decide is None:
        return record_status(record) in UNSETTLED_STATUSES
    link = record.retention_link()  # type: ignore[attr-defined]
    return bool(decide(None if link is None else status_of(*link)))


ExpiryListener = Callable[[list[LeaseRecord]], None]


class LeaseHooks(Protocol):
    """What the lease manager records *inside* a store's atomic section.

    A store calls these after it changed its state and before that change
    is visible (committed, or its lock released), so an audit entry is
    stored with its decision: both or neither. If a hook raises, a durable
    store rolls the decision back and the in-memory store undoes a grant.
    """

    def decided(self, request: AcquireRequest, outcome: AcquireOutcome) -> None:
        """A request was decided (granted, or refused)."""

    def ended(self, kind: str, rec: LeaseRecord, now_ms: int) -> None:
        """A lease ended: ``lease.released``, ``lease.revoked`` or ``lease.expired``."""


class JournalSection(Protocol):
    """Audit entries written in the store transaction running on this thread."""

    def append(
        self,
        ts: int,
        kind: str,
        agent_id: str | None,
        session_id: str | None,
        data: Any,
        how: Any,
    ) -> int:
        """Store one entry with the transaction; return its (final) seq."""


#: One audit entry as a durable store writes it: (seq, ts, kind, agent_id,
#: session_id, data as canonical JSON text).
JournalRow = tuple[int, int, str, str | None, str | None, str]


class AuditJournal(Protocol):
    """What a durable store asks of the audit trail whose entries it keeps."""

    def text(self, data: Any, how: Any) -> str:
        """An entry's data as canonical JSON text (see ``klockwork.core.audit.chain``)."""

    def committed(self) -> None:
        """New entries were committed: seal them (off the caller's thread)."""

    def write(self, conn: Any, rows: Sequence[JournalRow]) -> bool:
        """Write audit rows in ``conn``'s transaction (the store's own, still open).

        Returns True if they are sealed onto the chain already, False if
        they wait for :meth:`committed`'s sealer.
        """


class IdPool:
    """Unguessable 128-bit hex ids, drawn from ``os.urandom`` in batches.

    Same entropy source as :mod:`secrets`, at a fraction of the per-id cost.
    Not thread-safe: call it under the owner's lock.
    """

    def __init__(self, batch: int = 512) -> None:
        self._batch = batch
        self._buf = ""
        self._pos = 0

    def next(self) -> str:
        """A fresh id: 32 hex characters (128 random bits)."""
        pos = self._pos
        if pos >= len(self._buf):
            self._buf = os.urandom(16 * self._batch).hex()
            pos = 0
        self._pos = pos + 32
        return self._buf[pos : pos + 32]


class Store(BusPrimitives):
    """Base of every store. Subclasses implement the sync primitives.

    A primitive that cannot reach its backend raises
    :class:`~klockwork.StoreUnavailableError` and changes nothing.
    """

    #: True when other processes change the same state (waiters must poll).
    cross_process: ClassVar[bool] = False
    #: True when primitives do I/O; async twins then run them on a thread.
    blocking_io: ClassVar[bool] = False

    #: True when audit entries are kept by the store itself, written in the
    #: same transaction as the decision they record (see :meth:`journal_section`).
    durable_journal: ClassVar[bool] = False

    def __init__(self) -> None:
        #: Called (outside the store's atomic section) with leases the store
        #: found past their expiry and marked EXPIRED.
        self.expiry_listener: ExpiryListener | None = None
        #: Called inside the atomic section (see :class:`LeaseHooks`).
        self.lease_hooks: LeaseHooks | None = None
        #: For a durable journal: encodes entries, hears of commits.
        self.journal: AuditJournal | None = None
        #: Where a store that may wait for a lock reads the time *after*
        #: taking it, so that nothing it grants is born expired.
        self.clock: Clock | None = None

    def journal_section(self) -> JournalSection | None:
        """The transaction running on this thread, if entries can join it (durable stores)."""
        return None

    def waiting_until(self, deadline: float | None) -> AbstractContextManager[None]:
        """Within the block, this thread's store calls wait for a lock no later than ``deadline``.

        (``time.monotonic()``; a store without locks to wait for ignores it.)
        For what a caller with its own deadline still has to write, such as
        the audit entry of a blocking acquire that gave up.
        """
        return contextlib.nullcontext()

    def lease_watch(self, wake: Callable[[str], None]) -> Callable[[], None] | None:
        """Have ``wake(resource)`` called when another process ends a lease on ``resource``.

        For stores that can push wake-ups across processes (Redis: Pub/Sub);
        ``wake("*")`` means wake-ups may have been missed (wake every
        waiter). Returns the function that stops watching, or None when the
        store cannot push: waiters of a ``cross_process`` store then poll.
        """
        return None

    def lease_pushes_wakeups(self) -> bool:
        """True while :meth:`lease_watch` hears every other process's release (no need to poll)."""
        return False

    def append_journal(
        self, entries: Sequence[tuple[int, str, str | None, str | None, Any, Any]]
    ) -> list[int]:
        """Store entries ``(ts, kind, agent_id, session_id, data, how)`` in one transaction.

        Only for stores with a durable journal; returns their seqs.
        """
        raise NotImplementedError

    # -- sync primitives -------------------------------------------------
    def register_agent(self, agent_id: str, priority: int | None, now_ms: int) -> AgentInfo:
        """Create or update an agent; ``priority=None`` keeps it (or uses ``now_ms``).

        Raises InvalidRequestError when the priority would change while the
        agent holds an active lease or waits for one.
        """
        raise NotImplementedError

    def get_agent(self, agent_id: str) -> AgentInfo | None:
        """The agent, or None if never registered."""
        raise NotImplementedError

    def revoke_agent(self, agent_id: str, now_ms: int) -> None:
        """Mark an agent revoked (registering it if unknown): it can take no lease any more.

        Revocation is final: registering the agent again does not undo it.
        """
        raise NotImplementedError

    def try_acquire(self, request: AcquireRequest) -> AcquireOutcome:
        """Decide and apply one request atomically (see :func:`rules.judge`).

        Raises:
            CapabilityError: the agent was revoked; nothing changed.
        """
        raise NotImplementedError

    def release(self, lease_id: str, now_ms: int) -> LeaseRecord | None:
        """Mark an active lease RELEASED; None if it was not active."""
        raise NotImplementedError

    def release_many(self, lease_ids: Sequence[str], now_ms: int) -> list[LeaseRecord | None]:
        """:meth:`release` of each id in order (a repeated id: None the second time).

        Written here as that loop; a store overrides it to end them all in
        one atomic step (one lock, transaction or script call), with the
        same records, audit entries and wake-ups as the loop.
        """
        return [self.release(lease_id, now_ms) for lease_id in lease_ids]

    def heartbeat(self, lease_id: str, ttl_ms: int | None, now_ms: int) -> LeaseRecord:
        """Extend an active lease to ``now + ttl`` (its own TTL when None).

        Raises LeaseNotFoundError, LeaseExpiredError or LeaseRevokedError;
        an expired lease is never revived.
        """
        raise NotImplementedError

    def revoke(self, lease_id: str, reason: str, now_ms: int) -> LeaseRecord | None:
        """Mark an active lease REVOKED; None if it was not active."""
        raise NotImplementedError

    def get_lease(self, lease_id: str, now_ms: int) -> LeaseRecord | None:
        """The lease record (expiry applied), or None if unknown."""
        raise NotImplementedError

    def list_leases(
        self, agent_id: str | None, resource: ParsedIntent | None, now_ms: int
    ) -> list[LeaseRecord]:
        """Active leases, optionally of one agent and/or overlapping one key."""
        raise NotImplementedError

    def list_reservations(self, now_ms: int) -> list[Reservation]:
        """Live reservations: the places in line of agents blocked in ``acquire``."""
        raise NotImplementedError

    def fence_state(self, intent: ParsedIntent, token: int, now_ms: int) -> FenceState:
        """Newest token granted on the key or its ancestors, and whether ``token`` is active."""
        raise NotImplementedError

    def unreserve(self, agent_id: str, session_id: str) -> None:
        """Drop the reservations of a waiter that stopped waiting."""
        raise NotImplementedError

    def sweep(self, now_ms: int) -> list[LeaseRecord]:
        """Mark every active lease past its expiry EXPIRED; return them."""
        raise NotImplementedError

    # -- records (governance state) ---------------------------------------
    def update_record(
        self, kind: str, key: str, model: type[_M], transition: Transition[_M, _T]
    ) -> _T:
        """Apply ``transition`` to record ``(kind, key)`` atomically; return its result.

        Concurrent updates of one record (from any thread or process sharing
        the store) are applied one after the other, each seeing the last.
        """
        raise NotImplementedError

    def get_record(self, kind: str, key: str, model: type[_M]) -> _M | None:
        """The stored record, or None."""
        raise NotImplementedError

    def list_records(self, kind: str, model: type[_M], status: str | None = None) -> list[_M]:
        """Records of ``kind`` in creation order; only those whose ``status`` matches."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the store's resources. Idempotent."""

    # -- async twins, written once --------------------------------------
    async def run_io(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run ``fn`` (which calls this store) from async code without blocking the loop.

        Inline for a store without I/O; on a worker thread otherwise. Every
        async twin, here and in the engine's parts, goes through this.
        """
        if not self.blocking_io:
            return fn(*args, **kwargs)
        return await asyncio.to_thread(fn, *args, **kwargs)

    # The bus's hot path from async code. A store with an async client
    # (Redis) overrides these so that no thread is parked per call.
    async def abus_publish(
        self, items: Sequence[PublishItem], now_ms: int, retention: Callable[[str], Retention]
    ) -> list[StoredMessage]:
        return await self.run_io(self.bus_publish, items, now_ms, retention)

    async def abus_read(
        self,
        channel: str,
        group: str,
        consumer: str,
        count: int,
        now_ms: int,
        spec: GroupSpec,
        retention: Callable[[str], Retention],
    ) -> ReadOutcome:
        return await self.run_io(
            self.bus_read, channel, group, consumer, count, now_ms, spec, retention
        )

    async def abus_ack(self, channel: str, group: str, ids: Sequence[str]) -> int:
        return await self.run_io(self.bus_ack, channel, group, ids)

    async def abus_nack(
        self,
        channel: str,
        group: str,
        ids: Sequence[str],
        now_ms: int,
        error: str | None,
        undo: bool,
        consumer: str | None = None,
    ) -> int:
        return await self.run_io(self.bus_nack, channel, group, ids, now_ms, error, undo, consumer)

    async def aregister_agent(self, agent_id: str, priority: int | None, now_ms: int) -> AgentInfo:
        return await self.run_io(self.register_agent, agent_id, priority, now_ms)

    async def aget_agent(self, agent_id: str) -> AgentInfo | None:
        return await self.run_io(self.get_agent, agent_id)

    async def atry_acquire(self, request: AcquireRequest) -> AcquireOutcome:
        return await self.run_io(self.try_acquire, request)

    async def arelease(self, lease_id: str, now_ms: int) -> LeaseRecord | None:
        return await self.run_io(self.release, lease_id, now_ms)

    async def arelease_many(
        self, lease_ids: Sequence[str], now_ms: int
    ) -> list[LeaseRecord | None]:
        return await self.run_io(self.release_many, lease_ids, now_ms)

    async def aheartbeat(self, lease_id: str, ttl_ms: int | None, now_ms: int) -> LeaseRecord:
        return await self.run_io(self.heartbeat, lease_id, ttl_ms, now_ms)

    async def arevoke(self, lease_id: str, reason: str, now_ms: int) -> LeaseRecord | None:
        return await self.run_io(self.revoke, lease_id, reason, now_ms)

    async def aget_lease(self, lease_id: str, now_ms: int) -> LeaseRecord | None:
        return await self.run_io(self.get_lease, lease_id, now_ms)

    async def alist_leases(
        self, agent_id: str | None, resource: ParsedIntent | None, now_ms: int
    ) -> list[LeaseRecord]:
        return await self.run_io(self.list_leases, agent_id, resource, now_ms)

    async def alist_reservations(self, now_ms: int) -> list[Reservation]:
        return await self.run_io(self.list_reservations, now_ms)

    async def afence_state(self, intent: ParsedIntent, token: int, now_ms: int) -> FenceState:
        return await self.run_io(self.fence_state, intent, token, now_ms)

    async def aunreserve(self, agent_id: str, session_id: str) -> None:
        await self.run_io(self.unreserve, agent_id, session_id)

    async def asweep(self, now_ms: int) -> list[LeaseRecord]:
        return await self.run_io(self.sweep, now_ms)

    async def aupdate_record(
        self, kind: str, key: str, model: type[_M], transition: Transition[_M, _T]
    ) -> _T:
        return await self.run_io(self.update_record, kind, key, model, transition)

    async def aget_record(self, kind: str, key: str, model: type[_M]) -> _M | None:
        return await self.run_io(self.get_record, kind, key, model)

    async def alist_records(
        self, kind: str, model: type[_M], status: str | None = None
    ) -> list[_M]:
        return await self.run_io(self.list_records, kind, model, status)

    # -- helpers shared by stores -----------------------------------------
    def _hook_expired(self, records: Sequence[LeaseRecord], now_ms: int) -> None:
        """Inside the atomic section: record the leases this section marked EXPIRED."""
        hooks = self.lease_hooks
        if hooks is not None:
            for rec in records:
                hooks.ended("lease.expired", rec, now_ms)

    def _report_expired(self, records: Sequence[LeaseRecord]) -> None:
        if records and self.expiry_listener is not None:
            self.expiry_listener(list(records))


def refuse_revoked(agent: AgentInfo) -> None:
    """Raise for a revoked agent's lease request (called in the atomic section)."""
    if agent.revoked_at is not None:
        raise CapabilityError(
            f"agent {agent.agent_id!r} was revoked at {agent.revoked_at} and can take no lease"
        )


def record_status(record: BaseModel) -> str | None:
    """The ``status`` a record is listed under (its enum value), if it has one."""
    status = getattr(record, "status", None)
    if status is None:
        return None
    return str(getattr(status, "value", status))


def raise_unless_active(rec: LeaseRecord) -> None:
    """Raise the error that says why a lease is not active (shared by stores)."""
    if rec.state is LeaseState.ACTIVE:
        return
    if rec.state is LeaseState.EXPIRED:
        raise LeaseExpiredError(rec.lease_id, f"lease {rec.lease_id!r} on {rec.resource} expired")
    if rec.state is LeaseState.REVOKED:
        raise LeaseRevokedError(
            rec.lease_id, f"lease {rec.lease_id!r} on {rec.resource} was revoked: {rec.reason}"
        )
    raise LeaseNotFoundError(rec.lease_id, f"lease {rec.lease_id!r} was released")
