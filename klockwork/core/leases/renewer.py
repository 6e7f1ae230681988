"""One background thread that renews every auto-renewed lease of an engine.

Each held set of leases is scheduled for a heartbeat every ``ttl/3``; the
thread sleeps (on the engine's clock) until the earliest one is due. A
thousand held leases cost one thread and one heap, not a thousand timers.
A renewal that fails (expired, revoked, store unreachable) marks the holder
lost at once; the holder raises :class:`~klockwork.LeaseLostError` when it
leaves its block.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from typing import Protocol

from klockwork.core.clock import Clock, ThreadAlarm
from klockwork.core.errors import KlockworkError

__all__ = ["Renewable", "Renewer"]


class Renewable(Protocol):
    """What the renewer needs from a holder."""

    @property
    def lease_ids(self) -> list[str]: ...

    def mark_lost(self, reason: str) -> None: ...


Heartbeat = Callable[[str], object]


class Renewer:
    """Schedules heartbeats for many holders on one daemon thread."""

    def __init__(self, clock: Clock, heartbeat: Heartbeat) -> None:
        self._clock = clock
        self._heartbeat = heartbeat
        self._lock = threading.Lock()
        # (due, seq, holder, interval), times in whole microseconds so that a
        # renewal due at exactly the time a ManualClock advanced to is never
        # missed by float rounding.
        self._heap: list[tuple[int, int, Renewable, int]] = []
        self._active: set[int] = set()
        self._seq = itertools.count()
        self._alarm = ThreadAlarm()
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, holder: Renewable, interval_s: float) -> None:
        """Renew ``holder``'s leases every ``interval_s`` until :meth:`remove`."""
        with self._lock:
            if self._closed:
                return
            self._active.add(id(holder))
            interval_us = max(1, round(interval_s * 1_000_000))
            due = self._now_us() + interval_us
            # Wake the thread only if this entry is now the earliest: otherwise
            # it already sleeps until something sooner (saves a thread switch
            # per lease taken).
            earliest = not self._heap or due < self._heap[0][0]
            heapq.heappush(self._heap, (due, next(self._seq), holder, interval_us))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="klockwork-renewer", daemon=True
                )
                self._thread.start()
            alarm = self._alarm
        if earliest:
            alarm.fire()

    def remove(self, holder: Renewable) -> None:
        """Stop renewing ``holder``.

        Its heap entry is dropped when it comes due, or at once when the heap
        holds mostly removed entries (so short holds do not pile up).
        """
        with self._lock:
            self._active.discard(id(holder))
            if len(self._heap) > 64 and len(self._heap) > 2 * len(self._active):
                self._heap = [e for e in self._heap if id(e[2]) in self._active]
                heapq.heapify(self._heap)

    def close(self) -> None:
        """Stop the thread. Holders still registered are no longer renewed."""
        with self._lock:
            self._closed = True
            alarm = self._alarm
            thread = self._thread
        alarm.fire()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                self._alarm = alarm = ThreadAlarm()
                now = self._now_us()
                due: list[tuple[Renewable, int]] = []
                while self._heap and self._heap[0][0] <= now:
                    _, _, holder, interval = heapq.heappop(self._heap)
                    if id(holder) in self._active:
                        due.append((holder, interval))
                timeout = self._heap[0][0] - now if self._heap else None  # µs
            for holder, interval in due:
                if self._renew(holder):
                    with self._lock:
                        if id(holder) in self._active:
                            heapq.heappush(
                                self._heap,
                                (now + interval, next(self._seq), holder, interval),
                            )
                            if timeout is None or interval < timeout:
                                timeout = interval
            if not due:
                self._clock.wait(alarm, None if timeout is None else timeout / 1_000_000)

    def _now_us(self) -> int:
        return round(self._clock.monotonic() * 1_000_000)

    def _renew(self, holder: Renewable) -> bool:
        for lease_id in holder.lease_ids:
            try:
                self._heartbeat(lease_id)
            except KlockworkError as exc:
                holder.mark_lost(f"{type(exc).__name__}: {exc}")
                self.remove(holder)
                return False
            except Exception as exc:  # a broken store must not kill the renewer
                holder.mark_lost(f"renewal failed: {exc!r}")
                self.remove(holder)
                return False
        return True
