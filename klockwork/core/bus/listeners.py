"""In-process listeners (``kw.bus.on``) and the pump that puts governance events on the bus.

Governance events (``lease.granted``, ``action.denied``, ``approval.requested``, ...)
reach ``klockwork.events`` only while someone follows them, so that the
lease hot path pays nothing otherwise (one attribute check, as before):

* an ``on()`` listener in this process whose pattern matches the channel or
  an event kind;
* a consumer group on ``klockwork.events`` — created in this process
  (noticed at once) or, on a store shared by processes, by another
  process (noticed within :data:`FOLLOW_CHECK_S`).

While followed, the engine's event hub hands each event to the pump, which
only appends it to a queue; a thread publishes queued events in batches
(one store transaction each), because decisions record their events inside
the store's own atomic section, where a publish cannot nest. Events are
notifications: the audit trail, not the bus, is the record of what happened.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from klockwork.core.audit.chain import to_json_value
from klockwork.core.bus.model import EVENT_KINDS, EVENTS_CHANNEL, Message, encode_payload
from klockwork.core.errors import InvalidRequestError
from klockwork.core.events import EventHub
from klockwork.core.model import GovernanceEvent
from klockwork.core.stores.bus_base import PublishItem

if TYPE_CHECKING:
    from klockwork.core.bus.channels import Bus

__all__ = ["FOLLOW_CHECK_S", "EventPump", "Listeners", "Subscription"]

_log = logging.getLogger("klockwork.bus")

#: How often an engine on a shared store checks whether another process follows events.
FOLLOW_CHECK_S = 1.0
_BATCH = 512


class Subscription:
    """What :meth:`Bus.on` returns: call it (or ``.cancel()``) to stop listening."""

    def __init__(self, cancel: Callable[[], None]) -> None:
        self._cancel = cancel
        self.active = True

    def cancel(self) -> None:
        """Stop the callback. Idempotent."""
        if self.active:
            self.active = False
            self._cancel()

    def __call__(self) -> None:
        self.cancel()


class Listeners:
    """Glob patterns → callbacks, for messages published by this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: tuple[tuple[str, Callable[[Message], object]], ...] = ()
        #: True while any listener is registered (checked on each publish).
        self.active = False
        #: Called after listeners change (the event pump re-checks whether it is followed).
        self.changed: Callable[[], None] = lambda: None

    def add(self, pattern: object, callback: object) -> Subscription:
        if not isinstance(pattern, str) or not pattern or len(pattern) > 200:
            raise InvalidRequestError("pattern", pattern, "expected a glob of 1-200 characters")
        if not callable(callback):
            raise InvalidRequestError("callback", callback, "expected a callable(message)")
        entry = (pattern, callback)
        with self._lock:
            self._entries = (*self._entries, entry)
            self.active = True

        def remove() -> None:
            with self._lock:
                self._entries = tuple(e for e in self._entries if e is not entry)
                self.active = bool(self._entries)
            self.changed()

        self.changed()
        return Subscription(remove)

    @property
    def follow_events(self) -> bool:
        """Whether a listener wants governance events (by channel or by kind)."""
        return any(
            fnmatch.fnmatchcase(EVENTS_CHANNEL, p)
            or any(fnmatch.fnmatchcase(k, p) for k in EVENT_KINDS)
            for p, _ in self._entries
        )

    def dispatch(self, message: Message) -> None:
        """Call every listener whose pattern matches; failures are logged, not raised."""
        kind = message.payload.get("kind") if message.channel == EVENTS_CHANNEL else None
        for pattern, callback in self._entries:
            if fnmatch.fnmatchcase(message.channel, pattern) or (
                isinstance(kind, str) and fnmatch.fnmatchcase(kind, pattern)
            ):
                try:
                    callback(message)
                except Exception:  # a listener must never break the publisher
                    _log.exception("klockwork bus listener %r failed", pattern)


def event_payload(event: GovernanceEvent) -> dict[str, Any]:
    """The ``klockwork.events`` payload of a governance event."""
    return {
        "kind": event.kind,
        "ts": event.ts,
        "agent_id": event.agent_id,
        "session_id": event.session_id,
        "data": to_json_value(event.data),
    }


def _event_bytes(event: GovernanceEvent) -> bytes:
    """One event's payload; data too large for a message is replaced by a note, not lost."""
    payload = event_payload(event)
    try:
        return encode_payload(payload)
    except InvalidRequestError as exc:
        payload["data"] = {"omitted": f"the event's data could not be published: {exc.problem}"}
        return encode_payload(payload)


class EventPump:
    """Publishes governance events on ``klockwork.events`` while someone follows them."""

    def __init__(self, bus: Bus, hub: EventHub) -> None:
        self._bus = bus
        self._hub = hub
        self._lock = threading.Lock()
        self._queue: deque[GovernanceEvent] = deque()
        self._drain_lock = threading.Lock()
        self._wake = threading.Event()
        self._unhook: Callable[[], None] | None = None
        self._remote = False
        self._closed = False
        self._thread: threading.Thread | None = None
        bus.listeners.changed = self.refresh
        if bus._store.cross_process:
            self._remote = self._groups_follow()
            self._start()
        self.refresh()

    @property
    def following(self) -> bool:
        """Whether events are being published now."""
        return self._unhook is not None

    def group_created(self, channel: str) -> None:
        """A group was created in this process: on the events channel, start publishing."""
        if channel == EVENTS_CHANNEL and not self._remote:
            self._remote = True
            self.refresh()

    def refresh(self) -> None:
        """Hook into (or out of) the event hub as followers come and go."""
        with self._lock:
            want = not self._closed and (self._remote or self._bus.listeners.follow_events)
            if want and self._unhook is None:
                self._unhook = self._hub.subscribe(self._enqueue)
                self._start()
            elif not want and self._unhook is not None:
                self._unhook()
                self._unhook = None

    def _enqueue(self, event: GovernanceEvent) -> None:
        self._queue.append(event)
        self._wake.set()

    def _start(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="klockwork-events", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        cross = self._bus._store.cross_process
        while not self._closed:
            self._wake.wait(FOLLOW_CHECK_S if cross else None)
            self._wake.clear()
            self.drain()
            if cross and not self._closed:
                followed = self._groups_follow()
                if followed != self._remote:
                    self._remote = followed
                    self.refresh()

    def _groups_follow(self) -> bool:
        try:
            return bool(self._bus._store.bus_groups(EVENTS_CHANNEL, self._bus._clock.now_ms()))
        except Exception:  # an unreachable store: keep what we knew
            return self._remote

    def drain(self) -> None:
        """Publish every queued event (in batches); a failing store drops them, logged.

        One drainer at a time (the pump thread, ``close``, a benchmark), so
        events reach the channel in the order they were decided.
        """
        queue = self._queue
        with self._drain_lock:
            while queue:
                batch: list[GovernanceEvent] = []
                with contextlib.suppress(IndexError):
                    while len(batch) < _BATCH:
                        batch.append(queue.popleft())
                try:
                    self._publish(batch)
                except Exception:
                    _log.exception("klockwork could not publish %d governance events", len(batch))

    def _publish(self, events: list[GovernanceEvent]) -> None:
        bus = self._bus
        now = bus._clock.now_ms()
        items = [PublishItem(EVENTS_CHANNEL, _event_bytes(e), None, now) for e in events]
        bus._published(bus._store.bus_publish(items, now, bus._retention_of))

    def close(self) -> None:
        """Stop following; publish what is queued (while the store is still open)."""
        with self._lock:
            self._closed = True
            if self._unhook is not None:
                self._unhook()
                self._unhook = None
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self.drain()
