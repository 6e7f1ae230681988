"""Time, injected: every place klockwork reads the time or sleeps uses a Clock.

:class:`SystemClock` is real time. :class:`ManualClock` only moves when a
test calls :meth:`ManualClock.advance`; anything sleeping or waiting on it
(lease waiters, DIE back-off, the auto-renewer) wakes when advanced time
passes its deadline, so tests never wait in real time.

Waiting is done on *alarms*: one-shot wake-ups that any thread may fire.
:class:`ThreadAlarm` is for threads, :class:`LoopAlarm` for an asyncio task
(fired thread-safely through its loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "LoopAlarm", "ManualClock", "SystemClock", "ThreadAlarm", "in_running_loop"]


def in_running_loop() -> bool:
    """True on a thread that is running an asyncio event loop right now.

    A sync call that would wait there would freeze every task of that loop;
    such calls raise :class:`~klockwork.EventLoopBlockedError` instead.
    """
    # _get_running_loop() returns None outside a loop where get_running_loop()
    # would raise, and raising costs more than the whole check.
    return asyncio._get_running_loop() is not None


class ThreadAlarm:
    """A one-shot wake-up for a waiting thread."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = threading.Event()

    def fire(self) -> None:
        """Wake the waiter (safe from any thread, idempotent)."""
        self._event.set()

    @property
    def fired(self) -> bool:
        """True once fired."""
        return self._event.is_set()

    def wait(self, timeout_s: float | None) -> bool:
        """Block in real time until fired or ``timeout_s`` passes."""
        return self._event.wait(timeout_s)


class LoopAlarm:
    """A one-shot wake-up for an asyncio task; may be fired from any thread."""

    __slots__ = ("_event", "_loop")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()

    def fire(self) -> None:
        """Wake the waiting task (safe from any thread, idempotent)."""
        # A closed loop means nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._event.set)

    @property
    def fired(self) -> bool:
        """True once the wake-up has reached the loop."""
        return self._event.is_set()

    async def wait(self, timeout_s: float | None) -> bool:
        """Wait in real time until fired or ``timeout_s`` passes."""
        if timeout_s is None:
            await self._event.wait()
            return True
        try:
            await asyncio.wait_for(self._event.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True


Alarm = ThreadAlarm | LoopAlarm


@runtime_checkable
class Clock(Protocol):
    """Source of time and of timed waits for the whole engine."""

    def now_ms(self) -> int:
        """Wall-clock epoch milliseconds (stored in leases, shared across processes)."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin, for local deadlines."""
        ...

    def wait(self, alarm: ThreadAlarm, timeout_s: float | None) -> None:
        """Block until ``alarm`` fires or ``timeout_s`` of this clock's time passes."""
        ...

    async def await_alarm(self, alarm: LoopAlarm, timeout_s: float | None) -> None:
        """Async twin of :meth:`wait`; never blocks the event loop."""
        ...

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` of this clock's time."""
        ...

    async def asleep(self, seconds: float) -> None:
        """Async twin of :meth:`sleep`."""
        ...


class SystemClock:
    """Real time: ``time.time_ns`` for timestamps, ``time.monotonic`` for deadlines."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, alarm: ThreadAlarm, timeout_s: float | None) -> None:
        alarm.wait(None if timeout_s is None else max(0.0, timeout_s))

    async def await_alarm(self, alarm: LoopAlarm, timeout_s: float | None) -> None:
        await alarm.wait(None if timeout_s is None else max(0.0, timeout_s))

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    async def asleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """A clock that moves only when told to; for deterministic tests.

    Args:
        start_ms: the initial time in epoch milliseconds.

    Waits and sleeps block (in real time) until :meth:`advance` moves the
    clock past their deadline, or until their alarm fires. Time is kept in
    whole microseconds, so ``advance(2007)`` wakes a 2.007 s sleeper exactly
    (no float rounding drift).
    """

    def __init__(self, start_ms: int = 0) -> None:
        self._now_us = round(start_ms * 1000)
        self._lock = threading.Lock()
        self._timers: list[tuple[int, int, Alarm]] = []
        self._seq = itertools.count()

    def now_ms(self) -> int:
        return self._now_us // 1000

    def monotonic(self) -> float:
        return self._now_us / 1_000_000

    def advance(self, ms: float) -> None:
        """Move time forward by ``ms`` and wake everything whose deadline passed."""
        if ms < 0:
            raise ValueError("ManualClock cannot go backwards")
        due: list[Alarm] = []
        with self._lock:
            self._now_us += round(ms * 1000)
            while self._timers and self._timers[0][0] <= self._now_us:
                due.append(heapq.heappop(self._timers)[2])
        for alarm in due:
            alarm.fire()

    @property
    def pending_timers(self) -> int:
        """How many waits/sleeps are currently scheduled (for tests)."""
        with self._lock:
            return sum(1 for _, _, a in self._timers if not a.fired)

    def _schedule(self, alarm: Alarm, timeout_s: float | None) -> None:
        if timeout_s is None:
            return
        with self._lock:
            delay_us = round(max(0.0, timeout_s) * 1_000_000)
            if delay_us <= 0:
                due = True
            else:
                heapq.heappush(self._timers, (self._now_us + delay_us, next(self._seq), alarm))
                due = False
        if due:
            alarm.fire()

    def wait(self, alarm: ThreadAlarm, timeout_s: float | None) -> None:
        self._schedule(alarm, timeout_s)
        alarm.wait(None)

    async def await_alarm(self, alarm: LoopAlarm, timeout_s: float | None) -> None:
        self._schedule(alarm, timeout_s)
        await alarm.wait(None)

    def sleep(self, seconds: float) -> None:
        self.wait(ThreadAlarm(), seconds)

    async def asleep(self, seconds: float) -> None:
        await self.await_alarm(LoopAlarm(), seconds)
