"""Wake-ups from other processes: one Pub/Sub listener thread per store.

Scripts that make something deliverable publish ``'<token> <name>'`` on a
namespace channel (``PUBLISH`` runs inside the script, so the wake-up
leaves only once the change is committed). The listener hands each name to
its watchers, unless the token is its own store's: that store told its
watchers itself (:meth:`WakeListener.tell`), without the round trip.

A waiter closes the race between asking and sleeping with the engine's
epoch (see :mod:`klockwork.core.notify`): a wake-up arriving after it read
the epoch, however late, makes its sleep return at once. What the
listener cannot hear is what was published while it was not subscribed
(before it first subscribes, or while Redis was unreachable), so on every
(re)subscription it wakes every name ``names()`` lists; until then
:attr:`WakeListener.connected` is False and waiters poll the version
counter, as on any store shared by processes.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from klockwork.core.stores.redis.connection import RedisConnection

__all__ = ["WakeListener"]

_log = logging.getLogger(__name__)

#: How long one wait for a message lasts: bounds how long ``close`` takes.
_LISTEN_S = 0.25
#: Pause before resubscribing after Redis failed to answer.
_RETRY_S = 0.2


class WakeListener:
    """Subscribes to one channel and calls watchers with the names published there.

    Args:
        conn: the store's connection (the listener uses a connection of
            its own from the sync pool, held while it runs).
        channel: the Pub/Sub channel.
        token: this store's token; its own wake-ups are skipped.
        names: every name there is (woken after a (re)subscription).
    """

    def __init__(
        self,
        conn: RedisConnection,
        channel: str,
        token: str,
        names: Callable[[], list[str]],
    ) -> None:
        self._conn = conn
        self._channel = channel
        self._own = token.encode() + b" "
        self._names = names
        self._lock = threading.Lock()
        self._watchers: tuple[Callable[[str], None], ...] = ()
        self._closed = threading.Event()
        self._pubsub: Any = None  # the subscription in use (close breaks its wait)
        self._connected = False
        # A forked child inherits this object but not its thread: it must poll.
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="klockwork-bus-wake", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        """True while subscribed in this process (every wake-up since then is heard)."""
        return self._connected and self._pid == os.getpid()

    def watch(self, wake: Callable[[str], None]) -> Callable[[], None]:
        """Call ``wake(name)`` for every wake-up from another process; returns the stopper."""
        with self._lock:
            self._watchers = (*self._watchers, wake)

        def stop() -> None:
            with self._lock:
                self._watchers = tuple(w for w in self._watchers if w is not wake)

        return stop

    def tell(self, name: str) -> None:
        """Call every watcher with ``name`` now (a change made in this process)."""
        self._tell(name)

    def _tell(self, name: str) -> None:
        for wake in self._watchers:
            try:
                wake(name)
            except Exception:  # a watcher's bug must not stop the others' wake-ups
                _log.exception("a bus wake-up watcher failed")

    def _run(self) -> None:
        while not self._closed.is_set():
            pubsub: Any = None
            try:
                # Subscribe confirmations are kept: redis-py resubscribes by itself
                # after a dropped connection, and each confirmation means wake-ups
                # may have been missed meanwhile.
                pubsub = self._pubsub = self._conn.sync.pubsub()  # type: ignore[no-untyped-call]
                pubsub.subscribe(self._channel)
                while not self._closed.is_set():
                    msg = pubsub.get_message(timeout=_LISTEN_S)
                    if msg is None:
                        continue
                    kind, data = msg.get("type"), msg.get("data")
                    if kind == "message":
                        if isinstance(data, bytes) and not data.startswith(self._own):
                            self._tell(data.partition(b" ")[2].decode())
                    elif kind == "subscribe":
                        self._connected = True
                        for name in self._names():  # what came while we did not listen
                            self._tell(name)
            except Exception:  # Redis unreachable, or the store closing under us
                self._connected = False
                if not self._closed.is_set():
                    _log.debug("bus wake-up listener lost Redis; resubscribing", exc_info=True)
                    self._closed.wait(_RETRY_S)
            finally:
                self._connected = False
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # already broken: nothing to release
                        _log.debug("closing the wake-up subscription failed", exc_info=True)

    def close(self) -> None:
        """Stop listening (waits for the thread, briefly). Idempotent."""
        self._closed.set()
        pubsub = self._pubsub
        connection = None if pubsub is None else pubsub.connection
        if connection is not None:
            try:  # wakes the thread from its wait at once, instead of within _LISTEN_S
                connection.disconnect()
            except Exception:  # already broken: the thread ends by itself
                _log.debug("breaking the wake-up subscription failed", exc_info=True)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * _LISTEN_S + 1)
