"""Releases in other processes, heard over Pub/Sub: the lease half's listener thread.

The end script (:data:`.scripts.END`) publishes ``'<store token> <key>'``
on the namespace's ``lease:wake`` channel when it releases or revokes a
lease; ``PUBLISH`` runs inside the script, so the wake-up leaves only once
the end is committed. A store's :class:`LeaseWakeListener` hands each key
to the engine (``Signals.notify_remote``), unless the token is the store's
own: its engine woke its waiters itself.

What the listener cannot hear is what was published while it was not
subscribed (starting, Redis unreachable, a dropped connection redis-py
resubscribed): on every subscription confirmation it passes ``"*"`` (wake
every waiter, who then asks the store again), and until the first one
:attr:`LeaseWakeListener.live` is False and waiters poll, as on any store
shared by processes. A forked child does not inherit the thread: there the
listener is not live, and the store starts a new one.

:class:`LeaseWakeups` is the store's side: ``Store.lease_watch`` and
``Store.lease_pushes_wakeups``, the listener started by the first waiter.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from klockwork.core.stores.redis.connection import RedisConnection

__all__ = ["LeaseWakeListener", "LeaseWakeups"]

_log = logging.getLogger(__name__)

#: How long one wait for a message lasts (the thread checks for close between).
_LISTEN_S = 0.25
#: Pause before subscribing again after Redis failed to answer.
_RETRY_S = 0.2


class LeaseWakeListener:
    """One thread subscribed to ``channel``, calling ``wake(key)`` per release elsewhere.

    Args:
        conn: the store's connection (the subscription holds one connection
            of its sync pool while it runs).
        channel: the namespace's ``lease:wake`` channel.
        token: the store's token; its own releases are skipped.
        wake: called with each released key, or ``"*"`` after subscribing.
    """

    def __init__(
        self, conn: RedisConnection, channel: str, token: str, wake: Callable[[str], None]
    ) -> None:
        self._conn = conn
        self._channel = channel
        self._token = token
        self._own = token.encode() + b" "
        self._wake = wake
        self._pid = os.getpid()
        self._closed = threading.Event()
        self._subscribed = False
        self._thread = threading.Thread(target=self._run, name="klockwork-lease-wake", daemon=True)
        self._thread.start()

    @property
    def forked(self) -> bool:
        """True in a child forked after the listener started (it has no thread there)."""
        return self._pid != os.getpid()

    @property
    def live(self) -> bool:
        """True while subscribed in this process: every release elsewhere is heard."""
        return self._subscribed and self._pid == os.getpid()

    def _tell(self, key: str) -> None:
        try:
            self._wake(key)
        except Exception:  # a watcher's bug must not stop the thread
            _log.exception("a lease wake-up watcher failed")

    def _run(self) -> None:
        while not self._closed.is_set():
            pubsub: Any = None
            try:
                pubsub = self._conn.sync.pubsub()  # type: ignore[no-untyped-call]
                pubsub.subscribe(self._channel)
                while not self._closed.is_set():
                    msg = pubsub.get_message(timeout=_LISTEN_S)
                    if msg is None:
                        continue
                    kind, data = msg.get("type"), msg.get("data")
                    if kind == "message" and isinstance(data, bytes):
                        if not data.startswith(self._own):
                            self._tell(data.partition(b" ")[2].decode())
                    elif kind == "subscribe":
                        # Kept confirmations: redis-py resubscribes by itself after
                        # a dropped connection, and releases may have been missed.
                        self._subscribed = True
                        self._tell("*")
            except Exception:  # Redis unreachable, or the store closing under us
                self._subscribed = False
                if not self._closed.is_set():
                    _log.debug(
                        "lease wake-up listener lost Redis; subscribing again", exc_info=True
                    )
                    self._closed.wait(_RETRY_S)
            finally:
                self._subscribed = False
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # already broken: nothing to release
                        _log.debug("closing the lease wake-up subscription failed", exc_info=True)

    def close(self) -> None:
        """Stop listening. Idempotent; returns as soon as the thread has stopped."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._pid != os.getpid() or self._thread is threading.current_thread():
            return  # a forked child has no such thread to wait for
        try:
            # Our own token: no watcher hears it, but the thread's wait ends at once.
            self._conn.sync.publish(self._channel, self._own)
        except Exception:  # Redis gone: the wait ends by its timeout instead
            _log.debug("could not wake the lease wake-up listener to close it", exc_info=True)
        self._thread.join(timeout=2 * _LISTEN_S + 1)


class LeaseWakeups:
    """The wake-up half of :class:`~klockwork.core.stores.redis.store.RedisStore`."""

    _closed: bool
    _conn: RedisConnection

    def _init_lease_wakeups(self) -> None:
        # Marks this store's own lease wake-ups: its engine woke its waiters already.
        self._lease_token = os.urandom(8).hex()
        self._lease_listener: LeaseWakeListener | None = None
        self._lease_watchers: tuple[Callable[[str], None], ...] = ()
        self._lease_lock = threading.Lock()

    def lease_watch(self, wake: Callable[[str], None]) -> Callable[[], None] | None:
        """Call ``wake(resource)`` when another process releases or revokes a lease on it.

        ``wake("*")`` after each (re)subscription of the listener: releases
        published while it was not listening were missed. The listener
        thread starts with the first :meth:`lease_pushes_wakeups` (a waiter's
        first wait), not here: engines that never wait start none.
        """
        with self._lease_lock:
            self._lease_watchers = (*self._lease_watchers, wake)

        def stop() -> None:
            with self._lease_lock:
                self._lease_watchers = tuple(w for w in self._lease_watchers if w is not wake)

        return stop

    def _lease_wake(self, resource: str) -> None:
        for wake in self._lease_watchers:
            wake(resource)

    def lease_pushes_wakeups(self) -> bool:
        """True while the listener is subscribed (starts it on first use, and in a fork)."""
        listener = self._lease_listener
        if listener is None or not listener.live:
            listener = self._start_lease_listener()
        return listener is not None and listener.live

    def _start_lease_listener(self) -> LeaseWakeListener | None:
        with self._lease_lock:
            listener = self._lease_listener
            if self._closed:
                return None
            if listener is not None and listener.forked:
                listener = None  # the parent's thread did not come along
            if listener is None:
                listener = self._lease_listener = LeaseWakeListener(
                    self._conn, self._conn.key("lease:wake"), self._lease_token, self._lease_wake
                )
            return listener

    def _close_lease_wakeups(self) -> None:
        with self._lease_lock:
            listener, self._lease_listener = self._lease_listener, None
        if listener is not None:
            listener.close()
