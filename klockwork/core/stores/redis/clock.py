"""A clock that tells the Redis server's time, read locally.

Lease expiries are decided inside the scripts by the server's ``TIME``.
What the engine decides in Python (approval deadlines, gate timestamps,
audit entries) reads its own clock; on machines whose clocks disagree by
minutes they would disagree too. :class:`ServerClock` is real time with the
server's offset: it asks the server once, then adds the local monotonic
clock's progress, and asks again every ``resync_s`` seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from klockwork.core.clock import SystemClock
from klockwork.core.errors import StoreUnavailableError

__all__ = ["ServerClock"]


class ServerClock(SystemClock):
    """Epoch milliseconds as the server counts them; waits and sleeps are local.

    Args:
        server_now_ms: reads the server's clock (``RedisStore.server_now_ms``).
        resync_s: how often the offset is measured again (local clocks drift).

    ``now_ms()`` never goes backwards, even when a resync finds the server
    behind the last value returned; if the server does not answer a resync,
    the last offset is kept (the next call tries again).
    """

    def __init__(self, server_now_ms: Callable[[], int], resync_s: float = 30.0) -> None:
        self._source = server_now_ms
        self._resync_s = resync_s
        self._lock = threading.Lock()
        self._last = 0
        self._base_ms = 0.0
        self._base_mono = 0.0
        self._synced = 0.0
        self._sync()

    def _sync(self) -> None:
        before = time.monotonic()
        server = self._source()
        after = time.monotonic()
        # The server read its clock somewhere in the round trip: assume the middle.
        self._base_ms = server + (after - before) * 500
        self._base_mono = after
        self._synced = after

    def now_ms(self) -> int:
        mono = time.monotonic()
        with self._lock:
            if mono - self._synced >= self._resync_s:
                try:
                    self._sync()
                except StoreUnavailableError:
                    self._synced = mono  # keep the old offset; try again later
                mono = time.monotonic()
            now = int(self._base_ms + (mono - self._base_mono) * 1000)
            if now < self._last:
                now = self._last
            self._last = now
            return now

    @property
    def offset_ms(self) -> int:
        """The server's clock minus this machine's (as last measured)."""
        return int(self._base_ms + (time.monotonic() - self._base_mono) * 1000) - (
            time.time_ns() // 1_000_000
        )
