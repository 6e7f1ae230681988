"""The one internal hook every governance event goes through.

Leases (and later gates, approvals, delegation) report what happened here;
the audit trail and the event bus subscribe. With no listener, emitting
costs one truthiness check: callers test :attr:`EventHub.active` before
building an event.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from klockwork.core.model import GovernanceEvent

__all__ = ["AuditRecorder", "EventHub", "Listener"]

Listener = Callable[[GovernanceEvent], None]
_log = logging.getLogger("klockwork.events")


class AuditRecorder(Protocol):
    """The audit trail's ``record``: queue one entry in order, return its seq.

    ``data`` may be an immutable object whose class has ``__audit_data__()``;
    the audit writer calls it off the caller's thread.
    """

    def __call__(
        self,
        kind: str,
        agent_id: str | None,
        session_id: str | None,
        data: Any = None,
        *,
        ts: int | None = None,
    ) -> int: ...


class EventHub:
    """Fan-out of :class:`GovernanceEvent` to in-process listeners."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: tuple[Listener, ...] = ()
        #: True when someone listens: build events only then (a plain
        #: attribute, because it is read on every lease decision).
        self.active = False

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Add a listener; returns a function that removes it."""
        with self._lock:
            self._listeners = (*self._listeners, listener)
            self.active = True

        def unsubscribe() -> None:
            with self._lock:
                self._listeners = tuple(x for x in self._listeners if x is not listener)
                self.active = bool(self._listeners)

        return unsubscribe

    def emit_all(self, events: Iterable[GovernanceEvent]) -> None:
        """:meth:`emit` each of ``events``, in order."""
        for event in events:
            self.emit(event)

    def emit(self, event: GovernanceEvent) -> None:
        """Hand ``event`` to every listener; a failing listener is logged, not raised."""
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a listener must never break the decision it observes
                _log.exception("klockwork event listener failed on %s", event.kind)
