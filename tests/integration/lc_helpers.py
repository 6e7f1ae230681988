"""Helpers shared by the LangChain integration tests."""

from __future__ import annotations

import threading
import time

from klockwork import Klockwork

#: Registered in every test engine: "old" wins wait-die against "young" (lower = older).
OLD, YOUNG = "old", "young"


class Probe:
    """Records when a tool body ran and how many bodies ran at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inside = 0
        self.max_inside = 0
        self.starts: list[float] = []

    def enter(self) -> None:
        with self._lock:
            self.inside += 1
            self.max_inside = max(self.max_inside, self.inside)
            self.starts.append(time.monotonic())

    def leave(self) -> None:
        with self._lock:
            self.inside -= 1


def release_later(kw: Klockwork, lease_ids: list[str], delay_s: float) -> list[float]:
    """Release ``lease_ids`` from another thread after ``delay_s``; returns [release time]."""
    released: list[float] = []

    def release() -> None:
        released.append(time.monotonic())
        for lease_id in lease_ids:
            kw.leases.release(lease_id)

    timer = threading.Timer(delay_s, release)
    timer.daemon = True
    timer.start()
    return released
