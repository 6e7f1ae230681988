"""The Redis store: agents on several machines share leases, agents and records.

Every lease transition is one Lua script (:mod:`.scripts`), so Redis runs
it atomically: the acquire script gathers the facts (active leases on the
key, above it and below it, older waiters' reservations) and makes exactly
the decision of :func:`klockwork.core.leases.rules.judge` (checked against
the same JSON vectors). Intents are parsed and normalised here in Python
(:class:`~klockwork.core.leases.rules.ParsedIntent` carries each key's
ancestors) and handed to the script.

* **Time** comes from the Redis server (``TIME`` inside each script) for
  every expiry and deadline, so machines with skewed clocks agree; with
  ``server_time=False`` the caller's ``now_ms`` is used instead (tests on a
  :class:`~klockwork.ManualClock`). :meth:`RedisStore.server_now_ms` reads
  the server's clock for the engine (see :mod:`.clock`).
* **Unknown outcomes.** A reply lost to a timeout or a broken connection
  does not say whether the script ran. Every mutating call carries a
  request id, under which the script keeps its outcome for a while; the
  call is sent once more with the same id and answers with what really
  happened. If Redis still cannot be reached: StoreUnavailableError, and a
  lease request is resolved later (:mod:`.unknown`): a grant it made once
  Redis ran it is audited and given back, or it is marked done unrun.
* **Persistence.** Opening warns (once per server) when Redis keeps
  nothing across a restart (no AOF, no RDB): leases would be forgotten.
* **Audit** (``durable_journal``): every decision's audit entries are
  written by the decision's own script, so a decision a caller has seen
  has its entries, and one that never reached Redis has none
  (:mod:`.journal`). The lease scripts write the lease entries themselves
  when the engine audits leases (``lease_hooks`` is set; the store never
  calls the hooks); a record's entries travel with its compare-and-set.
  Any process seals them into the one chain of the namespace
  (:mod:`klockwork.core.audit.redis`).
* **Waiters** in other processes learn of a release without polling: the
  release script publishes the resource on the namespace's ``lease:wake``
  channel and each store's listener thread (:class:`.lease_wake.LeaseWakeListener`,
  started by the first waiter) wakes its engine's waiters on it
  (:meth:`RedisStore.lease_watch`). While the listener is not subscribed
  (starting, or Redis unreachable) waiters poll, and on each
  (re)subscription every waiter is woken: what was published meanwhile is
  not lost. Waiters in this process are woken by the manager at once.
* **Cluster.** Every key of a namespace carries its hash tag, so one
  namespace lives in one slot (one shard) and the scripts, which build
  the keys they touch from ``ARGV[1]``, touch only that slot; ``KEYS[1]``
  routes each call there.
* The async twins of the hot path (``atry_acquire``, ``arelease``,
  ``aheartbeat``) use ``redis.asyncio``; they share argument building and
  result parsing with the sync calls, only the I/O differs.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from klockwork.core.clock import Clock
from klockwork.core.errors import (
    InvalidRequestError,
    KlockworkError,
    KlockworkWarning,
    LeaseNotFoundError,
    StoreUnavailableError,
)
from klockwork.core.leases.rules import ParsedIntent, descendant_range
from klockwork.core.model import (
    AgentInfo,
    LeaseRecord,
    Reservation,
)
from klockwork.core.stores.base import (
    DEFAULT_RETAIN,
    AcquireOutcome,
    AcquireRequest,
    FenceState,
    IdPool,
    Store,
    check_retain,
    fence_with_floor,
    raise_unless_active,
    refuse_revoked,
)
from klockwork.core.stores.redis import scripts
from klockwork.core.stores.redis.bus import RedisBus
from klockwork.core.stores.redis.codec import (
    acquire_outcome,
    agent_info,
    intent_args,
    lease_record,
    reservations,
    rows,
)
from klockwork.core.stores.redis.connection import RedisConnection
from klockwork.core.stores.redis.journaling import RedisJournal
from klockwork.core.stores.redis.lease_wake import LeaseWakeups
from klockwork.core.stores.redis.records import RedisRecords
from klockwork.core.stores.redis.unknown import UnknownOutcomes
from klockwork.core.validation import check_flag

__all__ = ["RedisStore"]

_DECIDE = "decide a lease request"


class RedisStore(RedisBus, RedisRecords, RedisJournal, UnknownOutcomes, LeaseWakeups, Store):
    """A store on one Redis server (or one Cluster shard per namespace), shared by machines.

    Args:
        url: ``redis://[user:pass@]host:port/db[?namespace=...]`` or
            ``rediss://...`` (TLS); see :func:`.connection.parse_redis_url`.
        server_time: True (the default): every expiry and deadline is
            decided by the server's clock (``TIME``), whatever the clocks of
            the machines calling. False: by the ``now_ms`` the caller passes
            (deterministic tests on a manual clock).
        retain_inactive: how many ended leases are kept (so late heartbeats
            get a precise error), and how many settled records of each
            retained kind (see ``RETAINED_KINDS``); fencing history of twice
            as many keys, older history leaving a floor (``fence_with_floor``).

    Raises:
        StoreUnavailableError: the server does not answer.
    """

    cross_process = True
    blocking_io = True
    # Audit entries are written by the decisions' scripts (see journal.py).
    durable_journal = True

    def __init__(
        self, url: str, *, server_time: bool = True, retain_inactive: int = DEFAULT_RETAIN
    ) -> None:
        super().__init__()
        self._retain = check_retain(retain_inactive)
        self.server_time = check_flag(server_time, "server_time")
        self._conn: RedisConnection = RedisConnection(url)
        # The hot path's scripts run as functions of one library (see functions.py).
        self._conn.use_functions(scripts.LEASE_LIBRARY, scripts.FUNCTIONS)
        self._prefix = self._conn.key("")
        # Every script names this key first: it routes the call to the
        # namespace's Cluster slot (all keys share its hash tag).
        self._anchor = self._conn.key("token")
        # Lease and request ids are drawn here, not in Lua: a script has no
        # unguessable randomness (math.random is seeded identically), and ids
        # drawn by the caller let a retried call name the same request.
        self._ids = IdPool()
        self._ids_lock = threading.Lock()
        self._closed = False
        self._init_unknown()
        self._init_journal()
        self._init_lease_wakeups()
        #: The namespace incarnation this store opened (see scripts.BORN): it
        #: grants only there. None until learned (opened on a read-only replica).
        self._born: str | None = None
        try:
            self._born = self._learn_born()
        except StoreUnavailableError as exc:
            import redis

            if not isinstance(exc.__cause__, redis.ReadOnlyError):
                self._conn.close()  # a store that failed to open holds no connections
                raise
            # A replica answers reads; writes fail closed, saying it is read only.
        _warn_if_volatile(self._conn)

    def _learn_born(self) -> str:
        with self._conn.translated("learn the namespace's incarnation"):
            born = self._conn.sync.register_script(scripts.BORN)(
                keys=[self._conn.key("born")], args=[self._new_ids(1)[0]]
            )
        return born.decode() if isinstance(born, bytes) else str(born)

    def __repr__(self) -> str:
        return f"RedisStore({self._conn.url!r})"

    @property
    def redis_connection(self) -> RedisConnection:
        """The connection to the server (the audit chain's sealer and readers share it)."""
        return self._conn

    def _audit_flag(self) -> str:
        """'1' when the scripts write lease entries: the engine audits leases."""
        return "" if self.lease_hooks is None else "1"

    # -- plumbing: one call of a script, sync or async ------------------------------------
    def _new_ids(self, n: int) -> list[str]:
        with self._ids_lock:
            return [self._ids.next() for _ in range(n)]

    def _argv(
        self, args: Sequence[str], now_ms: int | None, mutating: bool, rid: str | None = None
    ) -> list[str]:
        if rid is None:
            rid = self._new_ids(1)[0] if mutating else ""
        now = "" if self.server_time or now_ms is None else str(now_ms)
        return [self._prefix, rid, now, str(self._retain), *args]

    def _call(
        self,
        source: str,
        args: Sequence[str],
        doing: str,
        now_ms: int | None = None,
        *,
        mutating: bool = True,
        rid: str | None = None,
    ) -> Any:
        """Run one script and parse its JSON reply (StoreUnavailableError if Redis fails)."""
        import redis

        if self._unknown or self.resolving:  # a lost request first: unknown.py
            self._check_unknown()
        argv = self._argv(args, now_ms, mutating, rid)
        keys = [self._anchor]
        with self._io(doing):
            self._check_open()
            script = self._conn.script(source)
            try:
                raw = script(keys=keys, args=argv)
            except (redis.ConnectionError, redis.TimeoutError):
                # The outcome is unknown: ask again under the same request id;
                # a script that ran answers with what it did (see scripts).
                raw = script(keys=keys, args=argv)
        return json.loads(raw)

    async def _acall(
        self,
        source: str,
        args: Sequence[str],
        doing: str,
        now_ms: int | None = None,
        rid: str | None = None,
    ) -> Any:
        """Async twin of :meth:`_call` on the running loop's ``redis.asyncio`` client."""
        import redis

        if self._unknown or self.resolving:
            await self._aresolve_unknown()
        argv = self._argv(args, now_ms, True, rid)
        keys = [self._anchor]
        with self._io(doing):
            self._check_open()
            script = self._conn.ascript(source)
            try:
                raw = await script(keys=keys, args=argv)
            except (redis.ConnectionError, redis.TimeoutError):
                raw = await script(keys=keys, args=argv)  # same request id: see _call
        return json.loads(raw)

    def _raw(self, source: str, argv: list[str]) -> Any:
        """One call of a script as it is, no retry (resolving unknown outcomes)."""
        with self._io("resolve a lost reply"):
            self._check_open()
            return json.loads(self._conn.script(source)(keys=[self._anchor], args=argv))

    def _raw_list(self, source: str, argv: list[str]) -> list[Any]:
        """A script answering a list of JSON texts (RESOLVE), called with ``argv`` as is."""
        with self._io("resolve lost replies"):
            self._check_open()
            replies = self._conn.script(source)(keys=[self._anchor], args=argv)
        return [json.loads(r) for r in replies]

    @contextmanager
    def _io(self, doing: str) -> Iterator[None]:
        """Redis I/O: every failure to answer is StoreUnavailableError (fail closed).

        Also whatever redis-py raises when :meth:`close` pulls a connection
        from under a call in flight on another thread (``ValueError: I/O
        operation on closed file``, ``OSError``, ``AttributeError`` on a
        dropped reader): once the store is closed, that call fails closed too.
        """
        import redis

        with self._conn.translated(doing):
            try:
                yield
            except (redis.RedisError, KlockworkError):
                raise
            except Exception as exc:
                if not self._closed:
                    raise
                raise redis.ConnectionError("the store was closed during the call") from exc

    def _check_open(self) -> None:
        if self._closed:
            import redis

            raise redis.ConnectionError("the store is closed")  # translated: fails closed

    def server_now_ms(self) -> int:
        """The Redis server's clock (``TIME``), epoch milliseconds."""
        with self._io("read the server's time"):
            self._check_open()
            seconds, micros = self._conn.sync.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def engine_clock(self) -> Clock:
        """The clock ``Klockwork.open`` gives an engine on this store by default.

        Real time as the server tells it (:class:`.clock.ServerClock`), so
        what the engine decides in Python (approval deadlines, records'
        timestamps) agrees with what the scripts decide on the server.
        """
        from klockwork.core.stores.redis.clock import ServerClock

        return ServerClock(self.server_now_ms)

    # -- agents -----------------------------------------------------------------------------
    def register_agent(self, agent_id: str, priority: int | None, now_ms: int) -> AgentInfo:
        args = [agent_id, "" if priority is None else str(priority)]
        res = self._call(scripts.REGISTER, args, "register an agent", now_ms)
        if "busy" in res:
            raise InvalidRequestError(
                "priority",
                priority,
                f"agent {agent_id!r} holds or waits for a lease; its priority "
                f"({res['busy']}) cannot change until it releases",
            )
        return agent_info(agent_id, res["p"], res["r"], res["v"])

    def get_agent(self, agent_id: str) -> AgentInfo | None:
        with self._io("read an agent"):
            self._check_open()
            p, r, v = self._conn.sync.hmget(self._conn.key("ag", agent_id), "p", "r", "v")
        if p is None:
            return None
        return agent_info(agent_id, p, r, v)

    def revoke_agent(self, agent_id: str, now_ms: int) -> None:
        self._call(scripts.REVOKE_AGENT, [agent_id], "revoke an agent", now_ms)

    # -- acquire ----------------------------------------------------------------------------
    def _acquire_args(self, request: AcquireRequest) -> list[str]:
        ids = self._new_ids(len(request.intents))
        args = [
            request.agent_id,
            request.session_id,
            str(request.ttl_ms),
            "" if not request.reserve_ms else str(request.reserve_ms),
            "1" if request.clear_reservation else "0",
            str(len(request.intents)),
        ]
        for intent, lease_id in zip(request.intents, ids, strict=True):
            args += intent_args(intent, lease_id)
        if self._born is None:
            self._born = self._learn_born()  # a read-only replica still says so here
        args.append(self._born)
        args += self._acquire_audit(request)
        return args

    def _acquire_audit(self, request: AcquireRequest) -> list[str]:
        """What the acquire script audits: as ``LeaseAudit.decided`` would (see ACQUIRE)."""
        if self.lease_hooks is None:
            return ["", "", ""]
        tries = request.tries
        if tries is None:  # a single try: its outcome, granted or refused
            return ["a", "", ""]
        if tries.count == 0 or self.clock is None:  # a blocking acquire's first try
            return ["g", "", ""]
        # A grant after waiting says how long (known now: the script takes no longer).
        return ["g", str(tries.count + 1), str(tries.waited_ms(self.clock))]

    def _acquire_done(self, request: AcquireRequest, res: Any) -> AcquireOutcome:
        """Parse the acquire script's reply (its entries are written: wake the sealer)."""
        if "lost" in res:
            raise StoreUnavailableError(
                f"redis store {self._conn.url} lost its data since it was opened (a restart "
                "without persistence, or its keys deleted): it grants nothing more, since "
                "leases held before would be granted again; open the engine again to start "
                "afresh"
            )
        if "revoked" in res:
            refuse_revoked(
                AgentInfo(
                    agent_id=request.agent_id,
                    priority=int(res["pr"]),
                    registered_at=0,
                    revoked_at=int(res["revoked"]),
                )
            )
        outcome, expired, _ = acquire_outcome(res)
        self._journaled(res)
        self._report_expired(expired)
        return outcome

    def try_acquire(self, request: AcquireRequest) -> AcquireOutcome:
        rid = self._new_ids(1)[0]
        args = self._acquire_args(request)
        try:
            res = self._call(scripts.ACQUIRE, args, _DECIDE, request.now_ms, rid=rid)
        except StoreUnavailableError as exc:
            self._remember_unknown(rid, request, exc)  # Redis may still run it: see unknown.py
            raise
        return self._acquire_done(request, res)

    async def atry_acquire(self, request: AcquireRequest) -> AcquireOutcome:
        rid = self._new_ids(1)[0]
        args = self._acquire_args(request)
        try:
            res = await self._acall(scripts.ACQUIRE, args, _DECIDE, request.now_ms, rid)
        except StoreUnavailableError as exc:
            self._remember_unknown(rid, request, exc)
            raise
        return self._acquire_done(request, res)

    # -- release, revoke, heartbeat -------------------------------------------------------------
    def _end_done(self, res: Any) -> LeaseRecord | None:
        self._journaled(res)  # the end (or the expiry it found) is audited by the script
        if "expired" in res:
            self._report_expired([lease_record(res["expired"])])
            return None
        if "ended" not in res:
            return None
        return lease_record(res["ended"])

    def release(self, lease_id: str, now_ms: int) -> LeaseRecord | None:
        args = [lease_id, "RELEASED", "", self._lease_token, self._audit_flag()]
        return self._end_done(self._call(scripts.END, args, "release a lease", now_ms))

    async def arelease(self, lease_id: str, now_ms: int) -> LeaseRecord | None:
        args = [lease_id, "RELEASED", "", self._lease_token, self._audit_flag()]
        return self._end_done(await self._acall(scripts.END, args, "release a lease", now_ms))

    def _ends_done(self, res: Any) -> list[LeaseRecord | None]:
        """RELEASE_MANY's reply: :meth:`_end_done` of each id's outcome, in order."""
        self._journaled(res)
        out: list[LeaseRecord | None] = []
        expired = []
        for one in rows(res["ends"]):
            if "expired" in one:
                expired.append(lease_record(one["expired"]))
            out.append(lease_record(one["ended"]) if "ended" in one else None)
        self._report_expired(expired)
        return out

    def release_many(self, lease_ids: Sequence[str], now_ms: int) -> list[LeaseRecord | None]:
        """Release several leases in one script call (see ``scripts.RELEASE_MANY``)."""
        if not lease_ids:
            return []
        args = [self._lease_token, self._audit_flag(), *lease_ids]
        return self._ends_done(self._call(scripts.RELEASE_MANY, args, "release leases", now_ms))

    async def arelease_many(
        self, lease_ids: Sequence[str], now_ms: int
    ) -> list[LeaseRecord | None]:
        if not lease_ids:
            return []
        args = [self._lease_token, self._audit_flag(), *lease_ids]
        res = await self._acall(scripts.RELEASE_MANY, args, "release leases", now_ms)
        return self._ends_done(res)

    def revoke(self, lease_id: str, reason: str, now_ms: int) -> LeaseRecord | None:
        args = [lease_id, "REVOKED", reason, self._lease_token, self._audit_flag()]
        return self._end_done(self._call(scripts.END, args, "revoke a lease", now_ms))

    def _heartbeat_args(self, lease_id: str, ttl_ms: int | None) -> list[str]:
        return [lease_id, "" if ttl_ms is None else str(ttl_ms), self._audit_flag()]

    def _heartbeat_done(self, lease_id: str, res: Any) -> LeaseRecord:
        if "ok" in res:
            return lease_record(res["ok"])
        if "expired" in res:
            rec = lease_record(res["expired"])
            self._journaled(res)
            self._report_expired([rec])
            raise_unless_active(rec)
        if "ended" in res:
            raise_unless_active(lease_record(res["ended"]))
        raise LeaseNotFoundError(lease_id, f"no lease {lease_id!r}")

    def heartbeat(self, lease_id: str, ttl_ms: int | None, now_ms: int) -> LeaseRecord:
        args = self._heartbeat_args(lease_id, ttl_ms)
        return self._heartbeat_done(
            lease_id, self._call(scripts.HEARTBEAT, args, "renew a lease", now_ms)
        )

    async def aheartbeat(self, lease_id: str, ttl_ms: int | None, now_ms: int) -> LeaseRecord:
        args = self._heartbeat_args(lease_id, ttl_ms)
        return self._heartbeat_done(
            lease_id, await self._acall(scripts.HEARTBEAT, args, "renew a lease", now_ms)
        )

    # -- reads --------------------------------------------------------------------------------
    def get_lease(self, lease_id: str, now_ms: int) -> LeaseRecord | None:
        args = [lease_id, self._audit_flag()]
        res = self._call(scripts.GET_LEASE, args, "read a lease", now_ms)
        if "lease" not in res:
            return None
        rec = lease_record(res["lease"])
        if res["expired"]:
            self._journaled(res)
            self._report_expired([rec])
        return rec

    def list_leases(
        self, agent_id: str | None, resource: ParsedIntent | None, now_ms: int
    ) -> list[LeaseRecord]:
        if resource is not None:
            args = ["1", "1", *intent_args(resource)]
        else:  # one agent's leases from its own set, not every active lease
            args = ["0"] if agent_id is None else ["a", agent_id]
        res = self._call(scripts.LIST, args, "list leases", now_ms, mutating=False)
        now = int(res["now"])
        return sorted(
            (
                rec
                for rec in map(lease_record, rows(res["leases"]))
                if rec.expires_at > now and (agent_id is None or rec.agent_id == agent_id)
            ),
            key=lambda r: r.fencing_token,
        )

    def list_reservations(self, now_ms: int) -> list[Reservation]:
        with self._io("list the waiters"):
            self._check_open()
            stored = self._conn.sync.hvals(self._conn.key("resv"))
        return [r for value in stored for r in reservations(value) if r.expires_at > now_ms]

    def fence_state(self, intent: ParsedIntent, token: int, now_ms: int) -> FenceState:
        span = descendant_range(intent.key) or ("", "")
        args = [str(token), *span, "1", *intent_args(intent)]
        res = self._call(scripts.FENCE, args, "read fencing tokens", now_ms, mutating=False)
        newest = None if res["newest"] is None else int(res["newest"])
        floor = int(res["floor"])
        return FenceState(fence_with_floor(newest, floor, bool(res["live"])), bool(res["active"]))

    def unreserve(self, agent_id: str, session_id: str) -> None:
        self._call(scripts.UNRESERVE, [agent_id, session_id], "drop a reservation")

    def sweep(self, now_ms: int) -> list[LeaseRecord]:
        res = self._call(scripts.SWEEP, [self._audit_flag()], "sweep expired leases", now_ms)
        expired = [lease_record(r) for r in rows(res["expired"])]
        self._journaled(res)
        self._report_expired(expired)
        return expired

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._resolver_stop.set()
        self._close_lease_wakeups()
        # The bus half may hold resources of its own (listeners): released first.
        close_bus = getattr(self, "_close_bus", None)
        if close_bus is not None:
            close_bus()
        self._conn.close()


#: Servers already warned about in this process (one warning each, not one per store).
_VOLATILE_WARNED: set[str] = set()


def _warn_if_volatile(conn: RedisConnection) -> None:
    """Warn (once per server) when Redis keeps nothing across a restart.

    With neither AOF nor RDB snapshots, a restart forgets every lease (a
    holder's lease vanishes and someone else is granted the resource),
    approval, message and the audit chain. A server that does not let us
    read its configuration (``CONFIG`` renamed, as on managed services) is
    not second-guessed.
    """
    import redis

    try:
        aof = int(conn.sync.info("persistence").get("aof_enabled", 0))
        save = conn.sync.config_get("save").get("save", "")
    except (redis.RedisError, ValueError):
        return
    where = conn.url.split("?", 1)[0]
    if aof or save or where in _VOLATILE_WARNED:
        return
    _VOLATILE_WARNED.add(where)
    warnings.warn(
        f"redis store {where}: the server runs without persistence (appendonly no, "
        "save ''): a restart loses every lease, approval, bus message and audit entry, "
        "and a holder's lease may then be granted to another agent. Turn on AOF (appendonly yes, "
        "appendfsync everysec or always) on a server klockwork relies on.",
        KlockworkWarning,
        stacklevel=3,
    )
