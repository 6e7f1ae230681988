"""The timing of one blocking bus call, shared by its sync and async loops.

A subscriber or an awaiter asks the store, and if nothing is there sleeps
until one of these happens, then asks again:

* a publish in this process on a channel it waits on (an in-process
  wake-up through :mod:`klockwork.core.notify`: no polling);
* something it was told is due (a delayed message becoming visible, a
  delivery timing out for redelivery);
* on a store shared by processes, another process published: a store that
  pushes such wake-ups (Redis: Pub/Sub, see :meth:`Store.bus_watch` and
  :meth:`Store.bus_listen`) has the engine's bus notify the waiter like a
  publish in this process; otherwise :meth:`Store.bus_version` moved:
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
    """One blocking call: keys it wakes on, its deadline, the sleeps between tries.

    ``channels`` are the bus channels behind ``keys``: a store that pushes
    wake-ups across processes (``pushes_bus_wakeups``) is asked to listen to
    them once the call is about to sleep, and until the end of the call.
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        signals: Signals,
        keys: tuple[str, ...],
        wait_s: float,
        channels: tuple[str, ...] = (),
    ) -> None:
        self._store, self._clock, self._signals, self._keys = store, clock, signals, keys
        self._deadline = clock.monotonic() + wait_s
        self._channels = channels
        # A call that cannot sleep needs no version to compare after a nap.
        self._sleeps = wait_s > 0
        self._listened = False
        self._listening: Callable[[], None] | None = None
        self._poll = self._polls()

    def _polls(self) -> bool:
        """Whether this waiter must poll: other processes write, and their wake-ups miss it."""
        store = self._store
        if not store.cross_process or not self._sleeps:
            return False
        return not (store.pushes_bus_wakeups and store.bus_hears(self._channels))

    def _listen(self) -> None:
        """About to sleep for the first time: have the store push the channels' wake-ups."""
        if not self._listened and self._store.pushes_bus_wakeups:
            self._listened = True
            self._listening = self._store.bus_listen(self._channels)

    def _unlisten(self) -> None:
        stop, self._listening = self._listening, None
        if stop is not None:
            stop()

    def _nap(self, due_ms: int | None) -> float | None:
        """How long to sleep before the next check; None when the wait is over."""
        left = self._deadline - self._clock.monotonic()
        if left <= 0:
            return None
        until_due = seconds_until(self._clock.now_ms(), due_ms)
        nap = left if until_due is None else min(left, until_due)
        # Asked live: once the store's wake-ups reach this waiter (its
        # subscription was confirmed, which also woke it) polling ends.
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
        try:
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
                    self._listen()
                    self._signals.sleep(self._keys, epoch, _finite(nap), self._clock)
                    self._check_open()
                    if self._again(epoch, version, due):
                        break
        finally:
            self._unlisten()

    async def arun(self, attempt: Callable[[], Awaitable[Attempt[_R]]]) -> _R:
        """Async twin of :meth:`run`: only this task sleeps."""
        try:
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
                    if not self._listened and self._store.pushes_bus_wakeups:
                        await self._store.run_io(self._listen)  # may do I/O: off the loop
                    await self._signals.asleep(self._keys, epoch, _finite(nap), self._clock)
                    self._check_open()
                    if self._signals.epoch != epoch or not self._poll:
                        break
                    if await self._store.run_io(self._again, epoch, version, due):
                        break
        finally:
            self._unlisten()

    async def _version(self) -> int:
        if not self._poll:
            return 0
        return await self._store.run_io(self._store.bus_version)


def _finite(seconds: float) -> float:
    return seconds if math.isfinite(seconds) else 365 * 24 * 3600.0
