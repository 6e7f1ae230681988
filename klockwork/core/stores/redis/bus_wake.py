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

**Losing Redis.** A waiter that went to sleep hearing wake-ups sleeps its
whole wait unless someone wakes it, so the listener owns what happens when
its connection drops:

1. the connection fails (the server died, the network broke): every name
   stops being heard at once (:meth:`hears` is False: new waits poll);
2. the listener opens a new connection every :data:`_RETRY_S` and
   subscribes to every name still wanted (waited on or idle), whatever
   failed before: a subscription is never left to a retry that nothing
   makes;
3. if Redis is back within :data:`LOST_S` (a restart, a failover), the
   confirmations wake the waiters, which ask again what was published
   meanwhile: the outage cost them nothing;
4. otherwise the listener wakes every waiter once: its next read fails
   (:class:`~klockwork.StoreUnavailableError`), instead of the outage going
   unnoticed until its wait runs out (a waiter Redis still answers polls
   until the subscription is back).

A server that stops answering but keeps the connection open (frozen, or
a network that drops packets) is not noticed here: the listener's socket
stays silent, and its waiters learn of it when their wait ends.
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

__all__ = ["IDLE_S", "LOST_S", "ChannelWakes"]

_log = logging.getLogger(__name__)

#: How long a name stays subscribed after its last wait ended.
IDLE_S = 30.0
#: How long one wait for a message lasts: bounds how late idle names go.
_LISTEN_S = 0.25
#: Pause before subscribing again after Redis failed to answer.
_RETRY_S = 0.2
#: How long the listener tries to get Redis back before it wakes the waiters
#: sleeping on its wake-ups. Shorter outages (a restart) pass unnoticed by
#: them: nothing is published on a server that is down, and the
#: resubscription wakes them for anything published meanwhile. Longer ones
#: reach them through their next read, well within the socket timeout a
#: command of theirs takes to fail.
LOST_S = 2.0


class _Lost(Exception):
    """A (un)subscribe failed on the subscription in use: the listener starts again."""


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
        self._broken = False  # a command on it failed: subscribe everything anew
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

        A failure marks the subscription broken: the listener thread then
        starts again on a new connection and subscribes every name wanted.
        """
        pubsub = self._pubsub
        if not names or pubsub is None:
            return
        try:
            getattr(pubsub, command)(*[self._prefix + name for name in names])
        except Exception:
            self._broken = True
            _log.debug("bus wake-up %s failed; the listener starts again", command, exc_info=True)

    def _run(self) -> None:
        lost_at: float | None = None  # when Redis stopped answering the listener
        told = False  # the waiters were woken for this outage
        while not self._closed.is_set():
            pubsub = None
            try:
                pubsub = self._conn.sync.pubsub()  # type: ignore[no-untyped-call]
                self._subscribe_all(pubsub)
                lost_at, told = None, False
                self._listen_on(pubsub)
            except Exception:  # Redis unreachable, or the store closing under us
                if self._closed.is_set():
                    break
                now = time.monotonic()
                if lost_at is None:
                    lost_at = now
                    _log.debug("bus wake-up listener lost Redis; subscribing again", exc_info=True)
                elif not told and now - lost_at >= LOST_S:
                    told = True
                    self._tell_waiting()
            finally:
                self._drop(pubsub)
            self._closed.wait(_RETRY_S)

    def _subscribe_all(self, pubsub: Any) -> None:
        """Make ``pubsub`` the subscription in use, on every name wanted; raises if Redis fails.

        Under the lock, so a name :meth:`listen` adds meanwhile is either in
        this subscribe or sent on ``pubsub`` after it.
        """
        with self._lock:
            self._pubsub, self._broken = pubsub, False
            names = [self._prefix + name for name in (*self._waits, *self._idle)]
            if names:
                pubsub.subscribe(*names)

    def _drop(self, pubsub: Any) -> None:
        """Stop using ``pubsub``: nothing is heard until a new one is confirmed."""
        with self._lock:
            self._confirmed = set()
            if self._pubsub is pubsub:
                self._pubsub = None
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # already broken: nothing to release
                _log.debug("closing the wake-up subscription failed", exc_info=True)

    def _tell_waiting(self) -> None:
        """Wake every waiter: Redis stayed down past LOST_S, and its next read says so."""
        with self._lock:
            names = list(self._waits)
        _log.debug(
            "bus wake-up listener: Redis still down after %ss; waking %d", LOST_S, len(names)
        )
        for name in names:
            self.tell(name)

    def _listen_on(self, pubsub: Any) -> None:
        skip = len(self._prefix)
        while not self._closed.is_set():
            if self._broken:
                raise _Lost
            msg = pubsub.get_message(timeout=_LISTEN_S)
            if msg is not None:
                kind, channel = msg.get("type"), msg.get("channel")
                name = channel[skip:].decode() if isinstance(channel, bytes) else ""
                if kind == "message":
                    if msg.get("data") != self._own:
                        self.tell(name)
                elif kind == "subscribe":
                    # Redis confirmed it: what was published before was not heard.
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
