"""Releasing several leases in one store call: ``kw.leases.release_many``.

A manifest is granted in one atomic call (``try_acquire`` of a list of
intents); :class:`ReleaseMany` gives it the matching end. The store ends
the leases in one step where it can (one lock on memory, one transaction
on SQLite, one script call on Redis: a round trip instead of one per
lease) and the manager then does, for each lease it ended, exactly what
:meth:`~klockwork.core.leases.manager.LeaseManager.release` does: wake the
waiters on its resource, announce ``lease.released``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from klockwork.core.errors import InvalidRequestError
from klockwork.core.model import LeaseRecord
from klockwork.core.validation import MAX_KEY_CHARS, text_problem

if TYPE_CHECKING:
    from klockwork.core.clock import Clock
    from klockwork.core.notify import Signals
    from klockwork.core.stores.base import Store

__all__ = ["ReleaseMany", "check_lease_ids"]


def check_lease_ids(lease_ids: object) -> list[str]:
    """``lease_ids`` as a list, if it is an iterable of lease ids; else raise.

    Raises:
        InvalidRequestError: (naming ``lease_ids``) a single string instead
            of a collection, something not iterable, or an item that is not
            text a store could look up; checked before anything is released.
    """
    if isinstance(lease_ids, (str, bytes)) or not isinstance(lease_ids, Iterable):
        raise InvalidRequestError(
            "lease_ids", lease_ids, "must be a list of lease ids (for one id: release)"
        )
    ids = list(lease_ids)
    for i, lease_id in enumerate(ids):
        # Any text is a fine question (an unknown id releases nothing); only
        # what no store could look up is refused, as release does.
        problem = (
            "must be a string"
            if not isinstance(lease_id, str)
            else text_problem(lease_id, MAX_KEY_CHARS)
        )
        if problem is not None:
            raise InvalidRequestError("lease_ids", lease_ids, f"item {i} ({lease_id!r}) {problem}")
    return ids


class ReleaseMany:
    """``release_many`` / ``arelease_many``: the part of ``LeaseManager`` that ends manifests."""

    _store: Store
    _clock: Clock
    _signals: Signals
    _settle: Callable[[], None]

    if TYPE_CHECKING:  # what LeaseManager provides

        def _announce(self, kind: str, rec: LeaseRecord, now_ms: int) -> None: ...

    def release_many(self, lease_ids: Iterable[str]) -> list[bool]:
        """Release several leases in one store call (a manifest's, say).

        Each lease ends as :meth:`release` would end it, in the order given:
        the same audit entry (``lease.released``), the same event, the same
        wake-up of the agents waiting for its resource. The store does it in
        one step (one round trip on Redis, one transaction on SQLite).

        Args:
            lease_ids: the ids, e.g. ``[lease.lease_id for lease in
                verdict.leases]``. Unknown and ended ids release nothing; an
                id given twice is released once.

        Returns:
            One bool per id, in order: True if that id's lease was active
            and is now released; False if it was not active (unknown,
            already released, revoked, expired, or the same id earlier in
            the list).

        Raises:
            InvalidRequestError: ``lease_ids`` is a single string, or holds
                something that is not a lease id; nothing was released.
            StoreUnavailableError: the store could not answer.
        """
        ids = check_lease_ids(lease_ids)
        if not ids:
            return []
        now = self._clock.now_ms()
        return self._released(self._store.release_many(ids, now), now)

    async def arelease_many(self, lease_ids: Iterable[str]) -> list[bool]:
        """Async twin of :meth:`release_many`; never blocks the event loop."""
        ids = check_lease_ids(lease_ids)
        if not ids:
            return []
        now = self._clock.now_ms()
        return self._released(await self._store.arelease_many(ids, now), now)

    def _released(self, records: Sequence[LeaseRecord | None], now: int) -> list[bool]:
        """What ``release`` does after the store, for each lease the store ended."""
        for rec in records:
            if rec is not None:
                self._signals.notify(rec.resource)  # first: a hand-off waits for this
                self._announce("lease.released", rec, now)
        self._settle()
        return [rec is not None for rec in records]
