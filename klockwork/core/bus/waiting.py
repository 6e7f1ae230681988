"""The timing of one blocking bus call, shared by its sync and async loops.

A subscriber or an awaiter asks the store, and if nothing is there sleeps
until one of these happens, then asks again:

* a publish in this process on a channel it waits on (an in-process
  wake-up through :mod:`klockwork.core.notify`: no polling);
* something it was told is due (a delayed message becoming visible, a
  delivery timing out for redelivery);
* on a store shared by processes, another process published: a store that
  pushes such wake-ups (Redis: Pub/Sub, see :meth:`Store.bus_watch`) has
  the engine's bus notify the waiter like a publish in this process;
  otherwise :meth:`Store.bus_version` moved (another process committed):
  checked every :data:`POLL_S`, a read-only check far cheaper than asking
  the store again;
* its wait runs out;
* the engine closes (the call raises :class:`~klockwork.StoreUnavailableError`).

The race between asking and sleeping is closed the way lease waits close
it: the epoch is read before the store is asked, and a publish since then
makes the sleep return at once.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from klockwork.core.bus.rules import seconds_until
from klockwork.core.clock import Clock
from klockwork.core.errors import StoreUnavailableError
from klockwork.core.notify import Signals
from klockwork.core.stores.base import Store

__all__ = ["POLL_S", "Attempt", "Waiting"]

#: How often a waiter on a cross-process store checks whether another process wrote.
POLL_S = 0.002

_R = TypeVar("_R")
#: One try: (its result, done?, when something is next due in epoch ms).
Attempt = tuple[_R, bool, int | None]


class Waiting(Generic[_R]):
    """One blocking call: keys it wakes on, its deadline, the sleeps between tries."""

    def __init__(
        self, store: Store, clock: Clock, signals: Signals, keys: tuple[str, ...], wait_s: float
    ) -> None:
        self._store, self._clock, self._signals, self._keys = store, clock, signals, keys
        self._deadline = clock.monotonic() + wait_s
        self._poll = self._polls()

    def _polls(self) -> bool:
        """Whether this waiter must poll: other processes write, and do not wake it."""
        return self._store.cross_process and not self._store.bus_pushes_wakeups()

    def _nap(self, due_ms: int | None) -> float | None:
        """How long to sleep before the next check; None when the wait is over."""
        left = self._deadline - self._clock.monotonic()
        if left <= 0:
            return None
        until_due = seconds_until(self._clock.now_ms(), due_ms)
        nap = left if until_due is None else min(left, until_due)
        # Asked live: a store whose wake-ups start reaching us (a listener just
        # subscribed, and woke every waiter as it did) ends the polling at once.
        return min(nap, POLL_S) if self._poll and self._polls() else nap

    def _check_open(self) -> None:
        if self._signals.closed:
            raise StoreUnavailableError("the engine closed while this call waited")

    def _again(self, epoch: int, version: int, due_ms: int | None) -> bool:
        """After a nap: is it worth asking the store again?"""
        if not self._poll or self._signals.epoch != epoch:
            return True
        if due_ms is not None and self._clock.now_ms() >= due_ms:
            return True
        return self._store.bus_version() != version

    def run(self, attempt: Callable[[], Attempt[_R]]) -> _R:
        """Try until done or out of time (sync: this thread sleeps)."""
        while True:
            epoch = self._signals.epoch
            self._poll = self._polls()
            version = self._store.bus_version() if self._poll else 0
            result, done, due = attempt()
            if done:
                return result
            while True:
                nap = self._nap(due)
                if nap is None:
                    return result
                self._signals.sleep(self._keys, epoch, _finite(nap), self._clock)
                self._check_open()
                if self._again(epoch, version, due):
                    break

    async def arun(self, attempt: Callable[[], Awaitable[Attempt[_R]]]) -> _R:
        """Async twin of :meth:`run`: only this task sleeps."""
        while True:
            epoch = self._signals.epoch
            self._poll = self._polls()
            version = await self._version()
            result, done, due = await attempt()
            if done:
                return result
            while True:
                nap = self._nap(due)
                if nap is None:
                    return result
                await self._signals.asleep(self._keys, epoch, _finite(nap), self._clock)
                self._check_open()
                if self._signals.epoch != epoch or not self._poll:
                    break
                if await self._store.run_io(self._again, epoch, version, due):
                    break

    async def _version(self) -> int:
        if not self._poll:
            return 0
        return await self._store.run_io(self._store.bus_version)


def _finite(seconds: float) -> float:
    return seconds if math.isfinite(seconds) else 365 * 24 * 3600.0
