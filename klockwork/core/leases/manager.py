"""LeaseManager (``kw.leases``): requests, outcomes, renewals and fencing.

Every request is validated completely before anything changes, decided
atomically by the store (:mod:`klockwork.core.leases.rules` inside its
atomic section), and leaves one outcome: one audit entry and one event.
A blocking acquire that is refused at first goes on in
:mod:`klockwork.core.leases.acquiring` (waiting and back-off, written once).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from klockwork.core.audit.records import Denied
from klockwork.core.clock import Clock
from klockwork.core.errors import (
    LeaseNotFoundError,
    StaleLeaseError,
    StoreUnavailableError,
)
from klockwork.core.events import EventHub
from klockwork.core.leases.acquiring import AcquireFlow, Tries, busy_until_deadline
from klockwork.core.leases.auditing import LeaseAudit, verdict_events
from klockwork.core.leases.holding import AsyncHolding, HeldLeases, Holding
from klockwork.core.leases.releasing import ReleaseMany
from klockwork.core.leases.renewer import Renewer
from klockwork.core.leases.rules import (
    ParsedIntent,
    normalize_resource,
    overlaps,
    parse_intents,
    validate_ttl,
)
from klockwork.core.model import (
    Conflict,
    GovernanceEvent,
    Lease,
    LeaseRecord,
    LeaseState,
    Reservation,
    Verdict,
    VerdictStatus,
    Waiter,
    _build,
)
from klockwork.core.notify import Signals
from klockwork.core.stores.base import AcquireOutcome, AcquireRequest, Store
from klockwork.core.validation import (
    MAX_KEY_CHARS,
    MAX_TTL_MS,
    check_identity,
    check_int,
    check_key,
    check_text,
    check_timeout,
)

if TYPE_CHECKING:
    from klockwork.core.audit.log import AuditLog

__all__ = ["DEFAULT_TTL_MS", "HeldLeases", "LeaseManager"]

_log = logging.getLogger("klockwork")

DEFAULT_TTL_MS = 30_000
#: How long a cross-process waiter's reservation outlives its last refresh.
_RESERVE_CROSS_PROCESS_MS = 2_000
#: In one process a waiter always removes its reservation itself.
_RESERVE_IN_PROCESS_MS = 2**62
_GRANTED = VerdictStatus.GRANTED


_ONE_TRY: Any = object()  # _request's timeout_s for a single try (None means no limit)


class LeaseManager(ReleaseMany):
    """All lease operations of one engine (``kw.leases``)."""

    def __init__(
        self, store: Store, clock: Clock, hub: EventHub, audit: AuditLog | None = None
    ) -> None:
        self._store = store
        self._clock = clock
        store.clock = clock
        self._hub = hub
        # The audit trail (None: lease decisions are not audited). Entries are
        # recorded by the store's atomic section itself (LeaseAudit): stored
        # with the decision, both or neither.
        self._audit = audit
        # Seals queued entries on this thread once enough have gathered (outside the store's lock).
        self._settle: Callable[[], None] = _nothing
        if audit is not None:
            store.lease_hooks = LeaseAudit(audit, clock)
            self._settle = audit.settle
        self._signals = Signals()
        self._renewer = Renewer(clock, self.heartbeat)
        self._reserve_ms = (
            _RESERVE_CROSS_PROCESS_MS if store.cross_process else _RESERVE_IN_PROCESS_MS
        )
        store.expiry_listener = self._on_expired
        # Releases in other processes, when the store pushes them (Redis), wake
        # our waiters (who then need not poll); closing the store stops them.
        store.lease_watch(self._signals.notify_remote)

    # -- requests -------------------------------------------------------------
    def _request(
        self,
        agent_id: str,
        session_id: str,
        intents: Any,
        ttl_ms: int,
        timeout_s: Any = _ONE_TRY,
    ) -> AcquireRequest:
        """Validate a request completely before anything is changed.

        With ``timeout_s`` (None: no limit) it is a blocking acquire's
        request, which counts its tries and knows its deadline.
        """
        check_identity(agent_id, "agent_id")
        check_identity(session_id, "session_id")
        if type(ttl_ms) is not int or not 0 < ttl_ms <= MAX_TTL_MS:
            validate_ttl(ttl_ms)  # raises, naming the argument
        parsed = parse_intents(intents)
        tries: Tries | None = None
        deadline: float | None = None
        if timeout_s is not _ONE_TRY:
            check_timeout(timeout_s)
            tries = Tries(self._clock)
            if timeout_s is not None:
                deadline = time.monotonic() + timeout_s
        return _new_request(
            (
                agent_id,
                session_id,
                parsed,
                ttl_ms,
                self._clock.now_ms(),
                None,
                False,
                tries,
                deadline,
            )
        )

    def try_acquire(
        self, agent_id: str, session_id: str, intents: Any, ttl_ms: int = DEFAULT_TTL_MS
    ) -> Verdict:
        """Ask for leases once; never blocks.

        Args:
            intents: an ``Intent``, a ``(resource, predicate)`` tuple, or a list
                of either (a manifest: all granted or none).
            ttl_ms: lease lifetime in milliseconds (> 0).

        Returns:
            A :class:`~klockwork.Verdict`: GRANTED, WAIT or DIE.

        Raises:
            InvalidRequestError: bad resource, predicate, ttl or id; nothing changed.
            StoreUnavailableError: the store could not answer; nothing granted.
        """
        request = self._request(agent_id, session_id, intents, ttl_ms)
        return self._verdict(request, self._store.try_acquire(request))

    async def atry_acquire(
        self, agent_id: str, session_id: str, intents: Any, ttl_ms: int = DEFAULT_TTL_MS
    ) -> Verdict:
        """Async twin of :meth:`try_acquire`."""
        request = self._request(agent_id, session_id, intents, ttl_ms)
        return self._verdict(request, await self._atry(request))

    async def _atry(self, request: AcquireRequest) -> AcquireOutcome:
        """The store's answer to one try, from async code; cancelling withdraws it.

        On a store with I/O the try runs on a worker thread that a
        cancellation cannot stop: a grant (or a reservation) it makes after
        the caller was cancelled is given back as soon as it lands, instead
        of being held by nobody until its TTL.
        """
        store = self._store
        if not store.blocking_io:
            return store.try_acquire(request)
        pending = asyncio.ensure_future(store.atry_acquire(request))
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            # Let the in-flight call finish (one store round trip), then undo
            # what it did before the cancellation goes on: the next request
            # sees neither a grant nor a reservation of ours.
            try:
                outcome = await asyncio.shield(pending)
                await asyncio.shield(asyncio.to_thread(self._withdraw, request, outcome))
            except BaseException:  # cancelled again, or the call failed: undo when it lands
                pending.add_done_callback(lambda done: self._withdraw_later(request, done))
            raise

    def _withdraw(self, request: AcquireRequest, outcome: AcquireOutcome) -> None:
        """Give back what a try did for a caller that is gone (best effort: TTLs bound the rest)."""
        with contextlib.suppress(Exception):
            for rec in outcome.granted:
                self.release(rec.lease_id)
            if not outcome.granted and request.reserve_ms is not None:
                self._store.unreserve(request.agent_id, request.session_id)

    def _withdraw_later(
        self, request: AcquireRequest, done: asyncio.Future[AcquireOutcome]
    ) -> None:
        if not done.cancelled() and done.exception() is None:
            outcome = done.result()
            threading.Thread(
                target=self._withdraw,
                args=(request, outcome),
                name="klockwork-withdraw",
                daemon=True,
            ).start()

    def _verdict(self, request: AcquireRequest, outcome: AcquireOutcome) -> Verdict:
        """The caller's verdict, announced to listeners as the call's outcome.

        (Its audit entry was recorded inside the store's atomic section.) A
        refused try of a blocking acquire (``request.tries``) is not an
        outcome: the blocking acquire announces one at its end.
        """
        self._settle()
        if outcome.status is _GRANTED:
            verdict = _build(
                Verdict,
                {
                    "status": _GRANTED,
                    "leases": list(map(_snapshot, outcome.granted)),
                    "conflicts": [],
                    "wait_time_ms": None,
                },
            )
        else:
            verdict = _build(
                Verdict,
                {
                    "status": outcome.status,
                    "leases": [],
                    "conflicts": [_conflict(b) for b in outcome.blockers],
                    "wait_time_ms": outcome.wait_time_ms,
                },
            )
            if request.tries is not None:
                return verdict
        if self._hub.active:
            self._hub.emit_all(verdict_events(request, verdict))
        return verdict

    def _gave_up(self, request: AcquireRequest, last: Verdict, tries: Tries) -> None:
        """A blocking acquire's one refusal entry: its last verdict, tries and wait."""
        if self._audit is not None:
            denied = Denied(
                last.status,
                last.conflicts,
                last.wait_time_ms,
                request.intents,
                tries.count,
                tries.waited_ms(self._clock),
            )
            try:  # it changed nothing: a store too busy to take it now must not delay the caller
                with self._store.waiting_until(request.deadline):
                    self._audit.record(
                        "lease.denied",
                        request.agent_id,
                        request.session_id,
                        denied,
                        ts=request.now_ms,
                    )
            except StoreUnavailableError as exc:
                _log.warning("klockwork: a timed-out acquire was not audited: %s", exc)
        if self._hub.active:
            self._hub.emit_all(verdict_events(request, last))

    # -- blocking acquire -----------------------------------------------------
    def acquire(
        self,
        agent_id: str,
        session_id: str,
        intents: Any,
        ttl_ms: int = DEFAULT_TTL_MS,
        timeout_s: float | None = None,
    ) -> Verdict:
        """Acquire, blocking until granted or ``timeout_s`` runs out.

        WAIT sleeps until a release/expiry notification; DIE backs off and
        retries with the same priority (so the agent keeps its age).

        Raises:
            LeaseTimeoutError: not granted within ``timeout_s``.
            EventLoopBlockedError: it would have to wait on a running event
                loop's thread — use :meth:`aacquire` there.
        """
        request = self._blocking(agent_id, session_id, intents, ttl_ms, timeout_s)
        try:
            first: AcquireOutcome | StoreUnavailableError = self._store.try_acquire(request)
        except StoreUnavailableError as exc:
            first = exc
        then = self._after_first(request, first, timeout_s)
        return then if isinstance(then, Verdict) else then.block()

    async def aacquire(
        self,
        agent_id: str,
        session_id: str,
        intents: Any,
        ttl_ms: int = DEFAULT_TTL_MS,
        timeout_s: float | None = None,
    ) -> Verdict:
        """Async twin of :meth:`acquire`; never blocks the event loop.

        Cancelling the task withdraws the request (and its reservation).
        """
        request = self._blocking(agent_id, session_id, intents, ttl_ms, timeout_s)
        try:
            first: AcquireOutcome | StoreUnavailableError = await self._atry(request)
        except StoreUnavailableError as exc:
            first = exc
        then = self._after_first(request, first, timeout_s)
        return then if isinstance(then, Verdict) else await then.ablock()

    def _blocking(
        self, agent_id: str, session_id: str, intents: Any, ttl_ms: int, timeout_s: float | None
    ) -> AcquireRequest:
        """A blocking acquire's request: it counts its tries and knows its deadline."""
        return self._request(agent_id, session_id, intents, ttl_ms, timeout_s)

    def _after_first(
        self,
        request: AcquireRequest,
        first: AcquireOutcome | StoreUnavailableError,
        timeout_s: float | None,
    ) -> Verdict | AcquireFlow:
        """The verdict of a first try that was granted (most are), else the flow that waits."""
        if isinstance(first, StoreUnavailableError):  # busy past the caller's deadline
            return AcquireFlow(self, request, busy_until_deadline(request, first), 0)
        verdict = self._verdict(request, first)
        if verdict.status is _GRANTED:
            return verdict
        return AcquireFlow(self, request, verdict, timeout_s)

    # -- holding ----------------------------------------------------------------
    def hold(
        self,
        agent_id: str,
        session_id: str,
        intents: Any,
        ttl_ms: int = DEFAULT_TTL_MS,
        *,
        auto_renew: bool = True,
        timeout_s: float | None = None,
    ) -> Holding:
        """``with kw.leases.hold(...) as held:`` acquire (blocking), renew every
        ttl/3 while inside, release on exit.

        Raises:
            LeaseTimeoutError: on entry, not granted within ``timeout_s``.
            LeaseLostError: on exit, if a renewal failed while inside (and the
                block itself raised nothing).
        """
        return Holding(self, (agent_id, session_id, intents, ttl_ms, timeout_s), auto_renew)

    def ahold(
        self,
        agent_id: str,
        session_id: str,
        intents: Any,
        ttl_ms: int = DEFAULT_TTL_MS,
        *,
        auto_renew: bool = True,
        timeout_s: float | None = None,
    ) -> AsyncHolding:
        """``async with kw.leases.ahold(...) as held:`` — the async twin of :meth:`hold`."""
        return AsyncHolding(self, (agent_id, session_id, intents, ttl_ms, timeout_s), auto_renew)

    # -- other operations ---------------------------------------------------------
    def release(self, lease_id: str) -> bool:
        """Release an active lease. Returns False if it was not active."""
        _check_lease_id(lease_id)
        now = self._clock.now_ms()
        rec = self._store.release(lease_id, now)
        if rec is None:
            return False
        self._signals.notify(rec.resource)  # first: a hand-off waits for this wake-up
        self._announce("lease.released", rec, now)
        self._settle()
        return True

    async def arelease(self, lease_id: str) -> bool:
        """Async twin of :meth:`release`."""
        _check_lease_id(lease_id)
        rec = await self._store.arelease(lease_id, self._clock.now_ms())
        return self._ended(rec, "lease.released")

    def revoke(self, lease_id: str, reason: str = "revoked") -> bool:
        """Revoke an active lease (its holder loses it at the next renewal)."""
        _check_revoke(lease_id, reason)
        rec = self._store.revoke(lease_id, reason, self._clock.now_ms())
        return self._ended(rec, "lease.revoked")

    async def arevoke(self, lease_id: str, reason: str = "revoked") -> bool:
        """Async twin of :meth:`revoke`."""
        _check_revoke(lease_id, reason)
        rec = await self._store.arevoke(lease_id, reason, self._clock.now_ms())
        return self._ended(rec, "lease.revoked")

    def heartbeat(self, lease_id: str, ttl_ms: int | None = None) -> Lease:
        """Extend an active lease to now + ttl (its own TTL by default).

        Raises:
            LeaseExpiredError / LeaseRevokedError: never revived.
            LeaseNotFoundError: unknown or released.
        """
        _check_heartbeat(lease_id, ttl_ms)
        return self._store.heartbeat(lease_id, ttl_ms, self._clock.now_ms()).snapshot()

    async def aheartbeat(self, lease_id: str, ttl_ms: int | None = None) -> Lease:
        """Async twin of :meth:`heartbeat`."""
        _check_heartbeat(lease_id, ttl_ms)
        rec = await self._store.aheartbeat(lease_id, ttl_ms, self._clock.now_ms())
        return rec.snapshot()

    def get(self, lease_id: str) -> Lease | None:
        """The lease with this id in its current state, or None."""
        _check_lease_id(lease_id)
        rec = self._store.get_lease(lease_id, self._clock.now_ms())
        return None if rec is None else rec.snapshot()

    def list(
        self, agent_id: str | None = None, resource: str | None = None
    ) -> builtins.list[Lease]:
        """Active leases, of one agent and/or overlapping ``resource``, oldest first."""
        if agent_id is not None:
            check_key(agent_id, "agent_id")
        key = None if resource is None else _resource_intent(resource)
        records = self._store.list_leases(agent_id, key, self._clock.now_ms())
        return [r.snapshot() for r in records]

    def waiters(self, resource: str | None = None) -> builtins.list[Waiter]:
        """Agents blocked in ``acquire`` (any process), each intent it waits for, oldest first.

        A blocking acquire that was refused (waiting after WAIT, or backing
        off after DIE) holds its place in line (a reservation) until it is
        granted or gives up. ``resource`` keeps those overlapping it (a
        directory and the files in it).
        """
        key = None if resource is None else _resource_intent(resource)
        found = self._store.list_reservations(self._clock.now_ms())
        if key is not None:
            found = [r for r in found if overlaps(r.resource, key.key)]
        found.sort(key=lambda r: (r.priority, r.agent_id, r.session_id, r.resource))
        return [r.waiter() for r in found]

    def validate(self, lease_id: str) -> Lease:
        """Return the lease if it is still active.

        Raises:
            LeaseNotFoundError: unknown id.
            StaleLeaseError: it is no longer active (expired, revoked or
                released): whatever it guarded may have changed hands.
        """
        _check_lease_id(lease_id)
        now = self._clock.now_ms()
        rec = self._store.get_lease(lease_id, now)
        if rec is None:
            raise LeaseNotFoundError(lease_id, f"no lease {lease_id!r}")
        if rec.state is LeaseState.ACTIVE:
            return rec.snapshot()
        intent = parse_intents((rec.resource, rec.predicate))[0]
        fence = self._store.fence_state(intent, rec.fencing_token, now)
        raise StaleLeaseError(
            rec.resource,
            rec.fencing_token,
            fence.newest_token,
            f"lease {lease_id!r} on {rec.resource} is {rec.state.value}",
        )

    def check_fencing(self, resource: str, token: int) -> None:
        """Refuse a write carrying a superseded fencing token.

        A token is current while its lease is active, or when no newer lease
        was granted on ``resource``, a directory above it or a path inside it
        since (a zombie holder of ``FILE:/repo`` may not write into
        ``/repo/a.py`` once someone else was granted that).

        Raises:
            StaleLeaseError: a newer lease exists and this one ended.
        """
        check_int(token, "token")
        intent = _resource_intent(resource)
        fence = self._store.fence_state(intent, token, self._clock.now_ms())
        if fence.token_active or fence.newest_token is None or fence.newest_token <= token:
            return
        raise StaleLeaseError(
            intent.key,
            token,
            fence.newest_token,
            f"fencing token {token} on {intent.key} is stale (newest is {fence.newest_token})",
        )

    def sweep(self) -> int:
        """Mark every lease past its TTL expired now; returns how many."""
        return len(self._store.sweep(self._clock.now_ms()))

    @property
    def renewer(self) -> Renewer:
        """The engine's one renewal thread, for holders that outlive a call (graph leases)."""
        return self._renewer

    def close(self) -> None:
        """Stop the renewer and wake every waiter (they fail closed)."""
        self._signals.close()
        self._renewer.close()

    def _check_open(self) -> None:
        if self._signals.closed:
            raise StoreUnavailableError("the engine was closed while waiting for a lease")

    @property
    def waiting(self) -> int:
        """How many waits are armed right now (for stats and tests)."""
        return self._signals.waiting

    # -- events ---------------------------------------------------------------------
    def _ended(self, rec: LeaseRecord | None, kind: str) -> bool:
        if rec is None:
            return False
        self._signals.notify(rec.resource)
        self._announce(kind, rec, self._clock.now_ms())
        self._settle()
        return True

    def _on_expired(self, records: builtins.list[LeaseRecord]) -> None:
        now = self._clock.now_ms()
        for rec in records:
            self._signals.notify(rec.resource)
            self._announce("lease.expired", rec, now)

    def _announce(self, kind: str, rec: LeaseRecord, now_ms: int) -> None:
        """Tell listeners that a lease ended (its audit entry is already recorded)."""
        if self._hub.active:
            self._hub.emit(
                GovernanceEvent(kind, now_ms, rec.agent_id, rec.session_id, rec.__audit_data__())
            )


_snapshot = LeaseRecord.snapshot
_new_request = AcquireRequest._make  # tuple.__new__: skips the NamedTuple's Python __new__


def _conflict(blocker: LeaseRecord | Reservation) -> Conflict:
    return _build(
        Conflict,
        {
            "agent_id": blocker.agent_id,
            "session_id": blocker.session_id,
            "resource": blocker.resource,
            "predicate": blocker.predicate,
            "lease_id": blocker.lease_id if isinstance(blocker, LeaseRecord) else None,
        },
    )


def _nothing() -> None:
    """What ``_settle`` is when lease decisions are not audited."""


def _resource_intent(resource: object) -> ParsedIntent:
    """``resource`` as an intent (to find what overlaps it); a bad one names ``resource``."""
    return parse_intents((normalize_resource(resource), "CONSUMES"))[0]


def _check_lease_id(lease_id: object) -> None:
    # Any text is a fine question ("" or a guessed id: no such lease); only
    # what no store could look up is refused.
    check_text(lease_id, "lease_id", max_chars=MAX_KEY_CHARS)


def _check_revoke(lease_id: object, reason: object) -> None:
    _check_lease_id(lease_id)
    check_text(reason, "reason")


def _check_heartbeat(lease_id: object, ttl_ms: object) -> None:
    _check_lease_id(lease_id)
    if ttl_ms is not None:
        validate_ttl(ttl_ms)
