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
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from klockwork.core.clock import Clock, ThreadAlarm
from klockwork.core.errors import KlockworkError

__all__ = ["Renewable", "Renewer"]

_log = logging.getLogger("klockwork")
_MAX_SLEEP_S = 3600.0


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
        # One holder's failure must never stop the renewals of every other
        # holder: a failing renewal marks only its holder lost (_renew), and
        # anything unexpected here is logged and the loop goes on.
        while True:
            try:
                if self._step():
                    return
            except Exception:
                _log.exception("klockwork: the lease renewer hit an unexpected error; going on")
                time.sleep(0.1)  # never spin if the error repeats

    def _step(self) -> bool:
        """One round: renew what is due, then sleep until the next is. True: closed."""
        with self._lock:
            if self._closed:
                return True
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
            # Sleep at most an hour at a time: waits are also bounded by
            # what the platform's timers take.
            wait_s = _MAX_SLEEP_S if timeout is None else min(timeout / 1e6, _MAX_SLEEP_S)
            self._clock.wait(alarm, wait_s)
        return False

    def _now_us(self) -> int:
        return round(self._clock.monotonic() * 1_000_000)

    def _renew(self, holder: Renewable) -> bool:
        """Renew one holder's leases; any failure marks that holder lost, and only it."""
        try:
            for lease_id in holder.lease_ids:
                self._heartbeat(lease_id)
        except Exception as exc:  # a broken store or holder must not stop the others
            reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, KlockworkError) else None
            try:
                holder.mark_lost(reason or f"renewal failed: {exc!r}")
            finally:
                self.remove(holder)
            return False
        return True
