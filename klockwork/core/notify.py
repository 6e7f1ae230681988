"""In-process wake-ups for waiters (a release → the waiting agent; a vote → the gate), no polling.

A waiter that got ``WAIT`` registers an alarm on the keys of the holders
that block it; every release, expiry or revoke in this process fires the
alarms on its key. The race this defends against::

    1. waiter W reads the epoch (E), then asks the store: WAIT (H holds k)
    2. H releases k and notifies k — W has not registered yet
    3. W registers on k and would sleep until H's TTL runs out

Step 2 bumps the epoch, so in step 3 :meth:`Signals.register` sees that the
epoch moved past E and tells W to retry at once instead of sleeping. A
spurious retry costs one store round trip; a lost wake-up would cost a TTL.

Releases done by *other processes* reach these signals only when the store
pushes them (Redis: ``Store.lease_watch``); otherwise (SQLite) waiters on
cross-process stores also poll, with a short adaptive interval.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable

from klockwork.core.clock import Clock, LoopAlarm, ThreadAlarm

__all__ = ["Signals"]

Alarm = ThreadAlarm | LoopAlarm


class Signals:
    """Keyed wake-ups with an epoch that closes the register/notify race."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[Alarm]] = {}
        self._armed: set[Alarm] = set()  # every armed alarm, keyed or not (for close)
        self.closed = False
        # Each notification assigns a value never used before (next() on a
        # count is atomic), so the epoch can never return to a value a waiter
        # saw once it has moved: no ABA between concurrent notifiers.
        self._counter = itertools.count(1)
        #: Changed by every notification; read before a store request.
        self.epoch = 0

    def register(self, keys: Iterable[str], since_epoch: int, alarm: Alarm) -> bool:
        """Arm ``alarm`` on ``keys``; False (nothing armed) if a change came since."""
        with self._lock:
            if self.closed:
                return False
            keys = tuple(keys)
            for k in keys:
                self._waiters.setdefault(k, set()).add(alarm)
            self._armed.add(alarm)
            # Checked after adding: a concurrent notify either bumped the epoch
            # before this read, or will see the alarm in _waiters.
            if self.epoch != since_epoch:
                self._discard(keys, alarm)
                return False
            return True

    def sleep(
        self, keys: tuple[str, ...], since_epoch: int, timeout_s: float | None, clock: Clock
    ) -> None:
        """Sleep on this thread until ``keys`` are notified or ``timeout_s`` passes.

        Returns at once when a notification came since ``since_epoch`` (or the
        signals are closed): the caller re-checks what it waits for either way.
        """
        alarm = ThreadAlarm()
        if self.register(keys, since_epoch, alarm):
            try:
                clock.wait(alarm, timeout_s)
            finally:
                self.unregister(keys, alarm)

    async def asleep(
        self, keys: tuple[str, ...], since_epoch: int, timeout_s: float | None, clock: Clock
    ) -> None:
        """Async twin of :meth:`sleep`: only this task waits (cancelling it disarms)."""
        alarm = LoopAlarm()
        if self.register(keys, since_epoch, alarm):
            try:
                await clock.await_alarm(alarm, timeout_s)
            finally:
                self.unregister(keys, alarm)

    def unregister(self, keys: Iterable[str], alarm: Alarm) -> None:
        """Disarm ``alarm`` (after it fired, timed out, or its waiter was cancelled)."""
        with self._lock:
            self._discard(tuple(keys), alarm)

    def _discard(self, keys: tuple[str, ...], alarm: Alarm) -> None:
        self._armed.discard(alarm)
        for k in keys:
            alarms = self._waiters.get(k)
            if alarms is not None:
                alarms.discard(alarm)
                if not alarms:
                    del self._waiters[k]

    def notify(self, key: str) -> None:
        """A lease on ``key`` ended: wake everyone waiting on it."""
        self.epoch = next(self._counter)
        if not self._waiters:
            return
        with self._lock:
            alarms = self._waiters.pop(key, None)
            if alarms:
                self._armed -= alarms
        if alarms:
            for alarm in alarms:
                alarm.fire()

    def notify_all(self) -> None:
        """Wake every keyed waiter: any key may have changed (missed wake-ups from elsewhere)."""
        self.epoch = next(self._counter)
        with self._lock:
            alarms = {a for found in self._waiters.values() for a in found}
            self._waiters.clear()
            self._armed -= alarms
        for alarm in alarms:
            alarm.fire()

    def notify_remote(self, key: str) -> None:
        """A wake-up from another process: ``key``, or ``"*"`` when some were missed."""
        if key == "*":
            self.notify_all()
        else:
            self.notify(key)

    def close(self) -> None:
        """Wake every waiter for good: the engine is closing."""
        with self._lock:
            self.closed = True
            alarms = list(self._armed)
            self._armed.clear()
            self._waiters.clear()
        for alarm in alarms:
            alarm.fire()

    @property
    def waiting(self) -> int:
        """Number of armed alarms (for tests and stats)."""
        with self._lock:
            return len(self._armed)
