"""The bus's wake-ups from other processes: one Pub/Sub subscription per channel waited on.

Scripts that make something deliverable on a name (a bus channel) publish
their store's token on ``<prefix><name>`` (``PUBLISH`` runs inside the
script, so the wake-up leaves only once the change is committed). The
listener subscribes to the names this process waits on, and hands each
wake-up to its watchers, unless the token is its own store's: that store
told its watchers itself (:meth:`ChannelWakes.tell`), without the round
trip. A process hears only what it waits for: a publisher that waits on
nothing receives nothing, and costs no other process anything. (The lease
side's :class:`.lease_wake.LeaseWakeListener` hears every release of the namespace on
one channel; a bus publishes far more often, on many channels.)

Subscriptions follow the waits: :meth:`ChannelWakes.listen` (when a wait
is about to sleep) subscribes a name, the function it returns ends that
interest, and a name nobody waited on for :data:`IDLE_S` is unsubscribed
(a consumer looping on a channel keeps its subscription).

A waiter closes the race between asking and sleeping with the engine's
epoch (see :mod:`klockwork.core.notify`): a wake-up arriving after it read
the epoch, however late, makes its sleep return at once. What the
listener cannot hear is what was published before the server confirmed a
subscription (the first one, or again after a dropped connection), so each
confirmation wakes that name's waiters; until it comes, :meth:`hears` is
False for the name and waiters poll the version counter, as on any store
shared by processes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from klockwork.core.stores.redis.connection import RedisConnection

__all__ = ["IDLE_S", "ChannelWakes"]

_log = logging.getLogger(__name__)

#: How long a name stays subscribed after its last wait ended.
IDLE_S = 30.0
#: How long one wait for a message lasts: bounds how late idle names go.
_LISTEN_S = 0.25
#: Pause before subscribing again after Redis failed to answer.
_RETRY_S = 0.2


class ChannelWakes:
    """Subscribes to the names waited on; calls watchers with each wake-up heard.

    Args:
        conn: the store's connection (the listener holds a connection of
            its own from the sync pool while it runs).
        prefix: the Pub/Sub channel of a name is ``prefix + name``.
        token: this store's token; its own wake-ups are skipped.
    """

    def __init__(self, conn: RedisConnection, prefix: str, token: str) -> None:
        self._conn = conn
        self._prefix = prefix
        self._own = token.encode()
        self._lock = threading.Lock()
        self._watchers: tuple[Callable[[str], None], ...] = ()
        self._waits: dict[str, int] = {}  # name -> waits interested in it now
        self._idle: dict[str, float] = {}  # subscribed name nobody waits on -> since
        self._confirmed: set[str] = set()  # subscriptions the server confirmed
        self._pubsub: Any = None  # the subscription in use
        self._closed = threading.Event()
        # A forked child inherits this object but not its thread: it must poll.
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="klockwork-bus-wakes", daemon=True)
        self._thread.start()

    # -- what waiters and the store call ------------------------------------------------
    def watch(self, wake: Callable[[str], None]) -> Callable[[], None]:
        """Call ``wake(name)`` for every wake-up from another process; returns the stopper."""
        with self._lock:
            self._watchers = (*self._watchers, wake)

        def stop() -> None:
            with self._lock:
                self._watchers = tuple(w for w in self._watchers if w is not wake)

        return stop

    def listen(self, names: Iterable[str]) -> Callable[[], None]:
        """Subscribe ``names`` (if not yet); returns the function that ends this interest."""
        names = tuple(dict.fromkeys(names))
        with self._lock:
            new = []
            for name in names:
                self._waits[name] = self._waits.get(name, 0) + 1
                if self._idle.pop(name, None) is None and self._waits[name] == 1:
                    new.append(name)
            # Sent under the lock: a subscribe and an unsubscribe of one name
            # reach the server in the order they were decided.
            self._send("subscribe", new)
        done = False

        def stop() -> None:
            nonlocal done
            if done:
                return
            done = True
            now = time.monotonic()
            with self._lock:
                for name in names:
                    left = self._waits[name] - 1
                    if left:
                        self._waits[name] = left
                    else:
                        del self._waits[name]
                        self._idle[name] = now

        return stop

    def hears(self, names: Iterable[str]) -> bool:
        """True if every wake-up on ``names`` reaches this process now."""
        if self._pid != os.getpid() or self._closed.is_set():
            return False
        confirmed = self._confirmed
        return all(name in confirmed for name in names)

    def tell(self, name: str) -> None:
        """Call every watcher with ``name`` now (a change made in this process)."""
        for wake in self._watchers:
            try:
                wake(name)
            except Exception:  # a watcher's bug must not stop the others' wake-ups
                _log.exception("a bus wake-up watcher failed")

    def close(self) -> None:
        """Stop listening (waits for the thread, briefly). Idempotent."""
        self._closed.set()
        pubsub = self._pubsub
        connection = None if pubsub is None else pubsub.connection
        try:  # wake the thread from its wait at once, instead of within _LISTEN_S
            if connection is not None:
                connection.disconnect()
            elif pubsub is not None:
                pubsub.subscribed_event.set()  # it waits for a first subscription
        except Exception:  # already broken: the thread ends by itself
            _log.debug("breaking the wake-up subscription failed", exc_info=True)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * _LISTEN_S + 1)

    # -- the listener thread --------------------------------------------------------------
    def _send(self, command: str, names: list[str]) -> None:
        """(Un)subscribe ``names`` on the current subscription (under the lock).

        A failure is left to the thread: it subscribes everything wanted
        again on a new connection.
        """
        pubsub = self._pubsub
        if not names or pubsub is None:
            return
        try:
            getattr(pubsub, command)(*[self._prefix + name for name in names])
        except Exception:
            _log.debug("bus wake-up %s failed; the listener retries", command, exc_info=True)

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                self._listen_on(self._conn.sync.pubsub())  # type: ignore[no-untyped-call]
            except Exception:  # Redis unreachable, or the store closing under us
                if not self._closed.is_set():
                    _log.debug("bus wake-up listener lost Redis; subscribing again", exc_info=True)
                    self._closed.wait(_RETRY_S)
            finally:
                with self._lock:
                    self._confirmed = set()
                    pubsub, self._pubsub = self._pubsub, None
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # already broken: nothing to release
                        _log.debug("closing the wake-up subscription failed", exc_info=True)

    def _listen_on(self, pubsub: Any) -> None:
        with self._lock:
            self._pubsub = pubsub
            self._send("subscribe", [*self._waits, *self._idle])
        skip = len(self._prefix)
        while not self._closed.is_set():
            msg = pubsub.get_message(timeout=_LISTEN_S)
            if msg is not None:
                kind, channel = msg.get("type"), msg.get("channel")
                name = channel[skip:].decode() if isinstance(channel, bytes) else ""
                if kind == "message":
                    if msg.get("data") != self._own:
                        self.tell(name)
                elif kind == "subscribe":
                    # Redis confirmed it (again, after redis-py reconnected by
                    # itself): what was published meanwhile was not heard.
                    with self._lock:
                        self._confirmed = self._confirmed | {name}
                    self.tell(name)
                elif kind == "unsubscribe":
                    with self._lock:
                        self._confirmed = self._confirmed - {name}
            self._forget_idle()

    def _forget_idle(self) -> None:
        """Unsubscribe names nobody waited on for IDLE_S."""
        if not self._idle:
            return
        cutoff = time.monotonic() - IDLE_S
        with self._lock:
            gone = [name for name, since in self._idle.items() if since <= cutoff]
            for name in gone:
                del self._idle[name]
            self._confirmed = self._confirmed - set(gone)
            self._send("unsubscribe", gone)
