"""Klockwork: one engine wiring every part over one Store.

kw = Klockwork()                                   # in-memory, this process
kw = Klockwork.open("sqlite:///klockwork.db")      # processes on one machine
kw = Klockwork.open()                              # $KLOCKWORK_URL, else memory
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    contextmanager,
)
from types import TracebackType
from typing import Any, ClassVar, Literal

from klockwork.core.audit.chain import to_json_value
from klockwork.core.audit.log import AuditLog, MemoryAuditBackend
from klockwork.core.bus.channels import Bus
from klockwork.core.clock import Clock, SystemClock
from klockwork.core.errors import InvalidRequestError, KlockworkWarning, StoreUnavailableError
from klockwork.core.events import AuditRecorder, EventHub, Listener
from klockwork.core.governance.approval_desk import Approvals
from klockwork.core.governance.delegation import (
    Delegation,
    DelegationBlock,
    Delegations,
    check_capabilities,
)
from klockwork.core.governance.gates import Gates, Policies
from klockwork.core.leases.holding import Holding
from klockwork.core.leases.manager import DEFAULT_TTL_MS, HeldLeases, LeaseManager
from klockwork.core.leases.rules import normalize_resource
from klockwork.core.model import AgentInfo, GovernanceEvent
from klockwork.core.stores.base import DEFAULT_AUDIT_RETAIN, Store
from klockwork.core.stores.memory import MemoryStore
from klockwork.core.validation import (
    INT64_MAX,
    check_flag,
    check_identity,
    check_int,
    check_key,
    check_text,
)

__all__ = ["Klockwork", "audit_log_for", "open_store"]

Effect = Literal["allow", "deny", "require_approval"]
_EFFECTS = ("allow", "deny", "require_approval")


def open_store(url: str) -> Store:
    """Build the store a URL names (SQLAlchemy's spelling).

    ``memory://`` — in this process. ``sqlite:///relative.db`` or
    ``sqlite:////absolute/path.db`` — shared by processes on one machine.
    ``redis://[user:pass@]host:port/db[?namespace=...]`` or ``rediss://`` —
    shared by machines (needs the ``redis`` extra).

    Raises:
        InvalidRequestError: a malformed URL (``memory``, ``sqlite://kw.db``),
            an unknown scheme, or a store not available here.
    """
    if not isinstance(url, str) or "://" not in url:
        raise InvalidRequestError(
            "url",
            url,
            "expected memory://, sqlite:///relative.db, sqlite:////abs.db or redis://...",
        )
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme == "memory":
        if rest:
            raise InvalidRequestError("url", url, "a memory store takes nothing after memory://")
        return MemoryStore()
    if scheme == "sqlite":
        from klockwork.core.stores.sqlite import SqliteStore

        if not rest.startswith("/"):
            # sqlite://kw.db would name a host "kw.db" in SQLAlchemy's spelling.
            raise InvalidRequestError(
                "url",
                url,
                f"SQLite URLs have three slashes: sqlite:///{rest} (relative) "
                f"or sqlite:////{rest.lstrip('/')} (absolute)",
            )
        path = rest[1:]
        if not path or path == ":memory:":
            raise InvalidRequestError(
                "url", url, "SQLite needs a file path shared by processes, e.g. sqlite:///kw.db"
            )
        return SqliteStore(path)
    if scheme in ("redis", "rediss"):
        from klockwork.core.stores.redis.store import RedisStore

        return RedisStore(url)
    raise InvalidRequestError("url", url, f"unknown store scheme {scheme!r}")


# Engines still open when the interpreter exits are closed then, so that the
# audit entries their writer thread has not stored yet are not lost (the
# process-wide default engine, in particular, is rarely closed by anyone).
_open_engines: weakref.WeakSet[Klockwork] = weakref.WeakSet()


@atexit.register
def _close_open_engines() -> None:
    for kw in list(_open_engines):
        # Exiting anyway: one failing engine must not stop the others' flush.
        with contextlib.suppress(Exception):
            kw.close()


def audit_log_for(store: Store, clock: Clock, key: bytes | None) -> AuditLog:
    """The audit trail of an engine on ``store``.

    On a durable store (SQLite, Redis) every decision's entry is written
    with the decision and sealed into the chain afterwards by whichever
    process comes next (:class:`DurableAuditLog`; the chain lives with the
    store's state: table ``kw_audit``, Redis keys ``audit:*``). In memory the log queues entries
    in decision order and its writer thread seals them.
    """
    if store.durable_journal:
        from klockwork.core.audit.durable import DurableAuditLog, sealed_chain_for

        return DurableAuditLog(sealed_chain_for(store), store=store, clock=clock, key=key)
    retain = store.audit_retain if isinstance(store, MemoryStore) else DEFAULT_AUDIT_RETAIN
    return AuditLog(MemoryAuditBackend(retain), clock=clock, key=key)


class Klockwork:
    """The coordination engine: leases now; gates, audit and bus plug into it.

    Args:
        store: where state lives; a fresh :class:`MemoryStore` by default.
        clock: time source for everything (``ManualClock`` in tests).
        default_effect: what a gate does when no policy matches (fail closed).
        audit_key: HMAC key that signs audit checkpoints.
        audit_leases: record every lease decision (granted, denied, released,
            expired, revoked) in ``kw.audit`` (the default). False leaves
            them out of the trail, for lease-heavy workloads that do not need
            them audited; gates, approvals and delegations are audited either way.
    """

    _default: ClassVar[Klockwork | None] = None
    _default_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        store: Store | None = None,
        *,
        clock: Clock | None = None,
        default_effect: Effect = "deny",
        audit_key: bytes | str | None = None,
        audit_leases: bool = True,
    ) -> None:
        if not isinstance(default_effect, str) or default_effect not in _EFFECTS:
            raise InvalidRequestError(
                "default_effect", default_effect, f"expected one of {', '.join(_EFFECTS)}"
            )
        if store is not None and not isinstance(store, Store):
            raise InvalidRequestError("store", store, "expected a klockwork Store")
        check_flag(audit_leases, "audit_leases")
        audit_key = _check_audit_key(audit_key)
        self.store: Store = store if store is not None else MemoryStore()
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.default_effect: Effect = default_effect
        self.audit_key = audit_key
        self._hub = EventHub()
        self._audit = audit_log_for(self.store, self.clock, self.audit_key)
        record = _announcing(self._audit.record, self._hub, self.clock)
        self._leases = LeaseManager(
            self.store, self.clock, self._hub, self._audit if audit_leases else None
        )
        self._delegations = Delegations(
            self.store, self.clock, record, self._register_priority, self._revoke_leases_of
        )
        self._approvals = Approvals(self.store, self.clock, record, self._delegations.kinship)
        self._policies = Policies()
        self._gates = Gates(
            self.store,
            self.clock,
            record,
            self._policies,
            self._approvals,
            self._delegations,
            default_effect,
        )
        self._bus = Bus(self.store, self.clock, hub=self._hub)
        self._closed = False
        _open_engines.add(self)

    # -- construction -----------------------------------------------------------
    @classmethod
    def open(cls, url: str | None = None, **kwargs: Any) -> Klockwork:
        """Open an engine on the store a URL names (``$KLOCKWORK_URL``, else memory)."""
        if url is None:
            url = os.environ.get("KLOCKWORK_URL") or "memory://"
        store = open_store(url)
        try:
            # A store shared by machines may tell the time its own way (Redis:
            # the server's clock), so that what the engine decides in Python
            # agrees with what the store decides; an explicit clock wins.
            engine_clock = getattr(store, "engine_clock", None)
            if kwargs.get("clock") is None and engine_clock is not None:
                kwargs["clock"] = engine_clock()
            return cls(store, **kwargs)
        except BaseException:
            store.close()  # a bad keyword argument must not leak the open store
            raise

    @classmethod
    def default(cls) -> Klockwork:
        """The process-wide engine integrations use when given none.

        Opened on first use from ``$KLOCKWORK_URL``. When it is unset the
        engine is in memory and coordinates this process only: the first time
        that happens in a process, a :class:`~klockwork.KlockworkWarning` is
        issued (and logged on the ``klockwork`` logger) saying how to share one.
        """
        with cls._default_lock:
            if cls._default is None or cls._default.closed:
                url = os.environ.get("KLOCKWORK_URL")
                cls._default = cls.open(url)
                if not url:
                    _warn_private_default()
            return cls._default

    @classmethod
    def set_default(cls, kw: Klockwork | None) -> None:
        """Replace (or with None, forget) the process-wide default engine."""
        with cls._default_lock:
            cls._default = kw

    # -- parts --------------------------------------------------------------------
    @property
    def leases(self) -> LeaseManager:
        """Lease operations: try_acquire, acquire, release, heartbeat, ..."""
        self._check_open()
        return self._leases

    @property
    def policies(self) -> Policies:
        """The policy set gates apply: add, remove, list, load."""
        self._check_open()
        return self._policies

    @property
    def gates(self) -> Gates:
        """Gate decisions: execute, gate/agate, can_i, report, reset_breaker."""
        self._check_open()
        return self._gates

    @property
    def approvals(self) -> Approvals:
        """Approval requests: list, get, approve, deny, wait/await_."""
        self._check_open()
        return self._approvals

    @property
    def audit(self) -> AuditLog:
        """The hash-chained audit trail: verify, checkpoint, query, export."""
        self._check_open()
        return self._audit

    @property
    def bus(self) -> Bus:
        """The event bus: publish, subscribe, ack, peek, await_channels, broadcast, on."""
        self._check_open()
        return self._bus

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailableError("this Klockwork engine is closed")

    # -- agents ---------------------------------------------------------------------
    def register_agent(
        self,
        agent_id: str,
        priority: int | None = None,
        capabilities: Sequence[str] | None = None,
    ) -> AgentInfo:
        """Register an agent, or change its priority or capabilities.

        Lower priority = older = wins wait-die. ``None`` keeps a known agent's
        priority, or gives a new one its registration time (so age decides).
        ``capabilities`` (globs over actions; ``["*"]`` when never given)
        bound what its gates allow; ``None`` keeps them.

        Raises:
            InvalidRequestError: bad id/priority/capabilities, or a priority
                change while the agent holds or waits for a lease.
            CapabilityError: the agent is a delegate (its capabilities come
                from its delegation).
        """
        self._check_open()
        _check_agent(agent_id, priority)
        if capabilities is not None:
            check_capabilities(capabilities)
        info = self.store.register_agent(agent_id, priority, self.clock.now_ms())
        if capabilities is not None:
            self._delegations.set_capabilities(agent_id, capabilities)
        return self._with_profile(info)

    async def aregister_agent(
        self,
        agent_id: str,
        priority: int | None = None,
        capabilities: Sequence[str] | None = None,
    ) -> AgentInfo:
        """Async twin of :meth:`register_agent`."""
        self._check_open()
        return await self.store.run_io(self.register_agent, agent_id, priority, capabilities)

    def get_agent(self, agent_id: str) -> AgentInfo | None:
        """The registered agent (with its capabilities and parent), or None."""
        self._check_open()
        check_key(agent_id, "agent_id")
        info = self.store.get_agent(agent_id)
        return None if info is None else self._with_profile(info)

    def _with_profile(self, info: AgentInfo) -> AgentInfo:
        profile = self._delegations.profile(info.agent_id)
        if profile is None:
            return info
        return info.model_copy(
            update={"capabilities": list(profile.capabilities), "parent_id": profile.parent_id}
        )

    def _register_priority(self, agent_id: str, priority: int | None) -> int:
        return self.store.register_agent(agent_id, priority, self.clock.now_ms()).priority

    def _revoke_leases_of(self, agent_id: str, reason: str) -> int:
        return sum(
            self._leases.revoke(lease.lease_id, reason)
            for lease in self._leases.list(agent_id=agent_id)
        )

    # -- delegation -------------------------------------------------------------------
    def delegate(
        self, parent_id: str, name: str, capabilities: Sequence[str], ttl_s: float
    ) -> DelegationBlock:
        """``with kw.delegate(parent, "reviewer", ["pr.review"], ttl_s=300) as child:``
        (or ``async with``: the same call is both a sync and an async context manager).

        Creates a child agent ``"<parent_id>/<name>"`` whose capabilities are
        within the parent's and whose TTL ends no later than the parent's; it
        keeps the parent's wait-die age. Leaving the block revokes it (and its
        own delegates) and releases its leases.

        Raises (on entering):
            CapabilityError: an escalation; nothing is created.
        """
        self._check_open()
        return DelegationBlock(
            self._delegations,
            (parent_id, name, capabilities, ttl_s),
            self.store,
            lambda: self._closed,
        )

    def adelegate(
        self, parent_id: str, name: str, capabilities: Sequence[str], ttl_s: float
    ) -> DelegationBlock:
        """Alias of :meth:`delegate` for ``async with kw.adelegate(...) as child``."""
        return self.delegate(parent_id, name, capabilities, ttl_s)

    @contextmanager
    def parallel(
        self, parent_id: str, delegations: Iterable[tuple[str, Sequence[str], float]]
    ) -> Iterator[list[Delegation]]:
        """Delegate to several children at once: ``(name, capabilities, ttl_s)`` each.

        If one creation fails, every child already created is revoked before
        the error propagates; leaving the block revokes them all.
        """
        self._check_open()
        yield from self._delegations.parallel(parent_id, delegations)

    def revoke_agent(self, agent_id: str, reason: str = "revoked") -> list[str]:
        """Revoke an agent and every agent it delegated to, releasing their leases.

        Returns the ids revoked by this call.
        """
        self._check_open()
        return self._delegations.revoke(agent_id, reason)

    # -- lease shortcuts --------------------------------------------------------------
    def lease(
        self,
        agent_id: str,
        session_id: str,
        resource: str,
        predicate: str = "MUTATES",
        ttl_ms: int = DEFAULT_TTL_MS,
        auto_renew: bool = True,
        timeout_s: float | None = None,
    ) -> AbstractContextManager[HeldLeases]:
        """``with kw.lease(...) as held:`` acquire, auto-renew, release on exit."""
        normalize_resource(resource)  # a bad one is named as this call's argument
        return Holding(
            self.leases,
            (agent_id, session_id, (resource, predicate), ttl_ms, timeout_s),
            auto_renew,
            ("with kw.lease(...)", "async with kw.alease(...)"),
        )

    def alease(
        self,
        agent_id: str,
        session_id: str,
        resource: str,
        predicate: str = "MUTATES",
        ttl_ms: int = DEFAULT_TTL_MS,
        auto_renew: bool = True,
        timeout_s: float | None = None,
    ) -> AbstractAsyncContextManager[HeldLeases]:
        """``async with kw.alease(...) as held:`` — the async twin of :meth:`lease`."""
        normalize_resource(resource)
        return self.leases.ahold(
            agent_id,
            session_id,
            (resource, predicate),
            ttl_ms,
            auto_renew=auto_renew,
            timeout_s=timeout_s,
        )

    # -- events -------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Observe every governance event (``lease.granted``, ...); returns a remover.

        Listeners run synchronously on the thread that made the decision:
        keep them short and thread-safe.
        """
        return self._hub.subscribe(listener)

    # -- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Stop background work and close the store. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._approvals.close()
            self._leases.close()
            self._bus.close()  # publishes the governance events still queued
            self._audit.close()  # writes everything recorded so far
        finally:
            self.store.close()

    def __enter__(self) -> Klockwork:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"Klockwork(store={type(self.store).__name__}, {state})"


_PRIVATE_DEFAULT = (
    "klockwork: no engine was given (kw=...) and KLOCKWORK_URL is unset, so leases, "
    "gates and audit use a private in-memory engine that coordinates this process only: "
    "agents in other processes are not excluded. To share one engine, set "
    "KLOCKWORK_URL=sqlite:///kw.db (or redis://...) or pass kw=Klockwork.open(url)."
)
_warned_private_default = False


def _warn_private_default() -> None:
    global _warned_private_default
    if _warned_private_default:
        return
    _warned_private_default = True
    logging.getLogger("klockwork").warning(_PRIVATE_DEFAULT)
    warnings.warn(_PRIVATE_DEFAULT, KlockworkWarning, stacklevel=3)


def _announcing(record: AuditRecorder, hub: EventHub, clock: Clock) -> AuditRecorder:
    """``record``, also telling the event hub (when someone listens) what it recorded.

    Gates, approvals and delegations record through this, so ``kw.add_listener``
    and the bus's ``klockwork.events`` see their decisions as they see leases'.
    A gate that sends an action to a human is also announced as
    ``approval.requested``.
    """

    def announce(
        kind: str,
        agent_id: str | None,
        session_id: str | None,
        data: Any = None,
        *,
        ts: int | None = None,
    ) -> int:
        seq = record(kind, agent_id, session_id, data, ts=ts)
        if hub.active:
            when = clock.now_ms() if ts is None else ts
            body = to_json_value(data)
            hub.emit(GovernanceEvent(kind, when, agent_id, session_id, body))
            if kind == "action.requested":
                hub.emit(GovernanceEvent("approval.requested", when, agent_id, session_id, body))
        return seq

    return announce


def _check_agent(agent_id: object, priority: object) -> None:
    check_identity(agent_id, "agent_id")
    if priority is not None:
        check_int(priority, "priority", low=-INT64_MAX)


def _check_audit_key(key: object) -> bytes | None:
    """The HMAC key as bytes: None (no signing) or non-empty bytes or text."""
    if key is None:
        return None
    if isinstance(key, str):
        key = check_text(key, "audit_key").encode()
    if not isinstance(key, bytes) or not key:
        raise InvalidRequestError(
            "audit_key", key, "must be non-empty bytes or text (the HMAC key), or None"
        )
    return key
