"""Lease requests whose outcome Redis never told: found out, then recorded or undone.

A request is sent once more when its reply is lost (see :mod:`.scripts`,
request ids). When that fails too, the caller gets
:class:`~klockwork.StoreUnavailableError`, yet the server may still run the
request: a frozen server runs what it had received when it resumes::

    1. try_acquire sends ACQUIRE (request id R); the server is frozen
    2. the reply never comes, nor that of the retry: StoreUnavailableError
    3. the server resumes and runs ACQUIRE: a lease is ACTIVE on Redis
       that its caller never saw (audited: the script wrote its entry)

So the store remembers R and, at its next call (or from a thread every
``RETRY_S``, until Redis answers), asks the server what became of it (:data:`.scripts.RESOLVE`):
either R ran, and its stored outcome comes back — a grant is then released
at once, since nobody holds it (the release script audits that too) — or R
did not run, and R is marked done for an hour, so that it changes nothing
if it arrives later. Either way no grant stays held by nobody, and every
grant Redis made has its audit entry.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from klockwork.core.model import VerdictStatus
from klockwork.core.stores.base import AcquireRequest
from klockwork.core.stores.redis import scripts
from klockwork.core.stores.redis.codec import acquire_outcome, lease_record

if TYPE_CHECKING:
    from klockwork.core.model import LeaseRecord

__all__ = ["UnknownOutcomes"]

_log = logging.getLogger(__name__)

#: How long a request found not to have run stays marked done (ms).
ABANDONED_MS = 3_600_000
#: How often the thread asks again while Redis does not answer (s).
RETRY_S = 0.1
#: How many requests one resolution call asks about.
BATCH = 500


class UnknownOutcomes:
    """The resolution half of :class:`~klockwork.core.stores.redis.store.RedisStore`."""

    _closed: bool
    _lease_token: str
    _prefix: str

    def _init_unknown(self) -> None:
        self._unknown: list[tuple[str, AcquireRequest]] = []
        self._unknown_lock = threading.Lock()
        # Held while a resolution runs: a call waits for it (it must not see a
        # grant that is about to be given back), see _check_unknown. Reentrant:
        # the expiry listener a resolution calls may call the store again.
        self._resolve_lock = threading.RLock()
        #: True while a resolution runs (calls then wait for it).
        self.resolving = False
        self._resolver: threading.Thread | None = None
        self._resolver_stop = threading.Event()

    if TYPE_CHECKING:  # what RedisStore (and Store) provide

        def _argv(
            self, args: Sequence[str], now_ms: int | None, mutating: bool, rid: str | None = None
        ) -> list[str]: ...

        def _raw(self, source: str, argv: list[str]) -> Any: ...

        def _raw_list(self, source: str, argv: list[str]) -> list[Any]: ...

        def _journaled(self, res: Any) -> None: ...

        def _audit_flag(self) -> str: ...

        def _report_expired(self, records: Sequence[LeaseRecord]) -> None: ...

        def _lease_wake(self, resource: str) -> None: ...

    def _remember_unknown(self, rid: str, request: AcquireRequest, exc: BaseException) -> None:
        """After a failed acquire: remember it if Redis may still run it."""
        import redis

        if self._closed or not isinstance(
            exc.__cause__, redis.ConnectionError | redis.TimeoutError
        ):
            return  # refused before sending, or the store is closed: it never ran
        with self._unknown_lock:
            self._unknown.append((rid, request))
            if self._resolver is None or not self._resolver.is_alive():
                self._resolver = threading.Thread(
                    target=self._resolve_until_known, name="klockwork-redis-resolve", daemon=True
                )
                self._resolver.start()

    def _resolve_until_known(self) -> None:
        # The next call of the store resolves first; this thread covers a
        # store nobody calls (it asks every RETRY_S until Redis answers).
        while not self._resolver_stop.wait(RETRY_S) and self._unknown:
            self._check_unknown()

    async def _aresolve_unknown(self) -> None:
        await asyncio.to_thread(self._check_unknown)

    def _check_unknown(self) -> None:
        """Resolve what is pending, or wait for the resolution running (before a call)."""
        with self._resolve_lock:
            with self._unknown_lock:
                if not self._unknown:
                    return
                # Set before the list empties: a call never sees neither.
                self.resolving = True
                pending, self._unknown = self._unknown, []
            try:
                self._resolve(pending)
            finally:
                self.resolving = False

    def _resolve(self, pending: list[tuple[str, AcquireRequest]]) -> None:
        # In batches, one round trip each: an outage may leave many behind.
        for start in range(0, len(pending), BATCH):
            batch = pending[start : start + BATCH]
            argv = [self._prefix, str(ABANDONED_MS), *(rid for rid, _ in batch)]
            try:
                outcomes = self._raw_list(scripts.RESOLVE, argv)
            except Exception:  # still unreachable: ask again later
                _log.debug("could not resolve lost lease requests yet", exc_info=True)
                with self._unknown_lock:
                    self._unknown[:0] = pending[start:]
                return
            for (_, request), res in zip(batch, outcomes, strict=True):
                try:
                    self._settle(request, res)
                except Exception:  # a listener failed: logged, never tried twice
                    _log.exception("could not settle a lost lease request's outcome")

    def _settle(self, request: AcquireRequest, res: Any) -> None:
        """Give back the grant of a request whose caller never heard (its script audited it)."""
        if "abandoned" in res or "revoked" in res or "lost" in res:
            return  # it changed nothing
        outcome, expired, now = acquire_outcome(res)
        self._journaled(res)
        self._report_expired(expired)
        if outcome.status is not VerdictStatus.GRANTED:
            return  # a refusal nobody saw (its reservation expires)
        try:
            for rec in outcome.granted:  # given back: nobody holds it
                args = [rec.lease_id, "RELEASED", "", self._lease_token, self._audit_flag()]
                ended = self._raw(scripts.END, self._argv(args, now, True))
                self._journaled(ended)  # the release (or expiry) is audited by the script
                if "expired" in ended:
                    self._report_expired([lease_record(ended["expired"])])
                self._lease_wake(rec.resource)  # this process's waiters (Pub/Sub skips ours)
        except Exception:  # left to expire at its TTL (the expiry is audited then)
            _log.warning("could not give back a lease granted to a lost request", exc_info=True)
