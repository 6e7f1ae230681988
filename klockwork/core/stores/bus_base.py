"""The bus half of the Store contract: a few atomic primitives on channels and groups.

Each primitive maps one to one onto a Redis Streams command, so a Redis
store implements them with a script each:

============================  ==============================================
``bus_publish``               ``XADD`` (+ ``SET NX`` per idempotency key, ``MAXLEN``/``MINID``)
``bus_create_group``          ``XGROUP CREATE``
``bus_read``                  ``XAUTOCLAIM`` then ``XREADGROUP`` (dead letters: ``XADD``)
``bus_ack``                   ``XACK``
``bus_nack``                  ``XCLAIM ... IDLE`` (hand a delivery back early)
``bus_range``                 ``XRANGE``
``bus_groups``/``bus_channels`` ``XINFO``
============================  ==============================================

The decisions inside ``bus_read`` (redeliver, dead-letter, hand out new
messages) are :func:`klockwork.core.bus.rules.plan_read`'s. Payloads cross
this boundary as JSON bytes. Everything a primitive changes, it changes
atomically: a publish of several messages (``broadcast``) stores all or
none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar, NamedTuple

from klockwork.core.bus.model import ChannelInfo, GroupInfo

__all__ = [
    "BusPrimitives",
    "GroupSpec",
    "PublishItem",
    "ReadOutcome",
    "Retention",
    "StoredMessage",
]


class StoredMessage(NamedTuple):
    """A message as a store keeps it (payload still JSON bytes)."""

    id: str
    channel: str
    seq: int
    payload: bytes
    published_at: int
    visible_at: int


class PublishItem(NamedTuple):
    """One message to publish."""

    channel: str
    payload: bytes
    key: str | None
    visible_at: int


class GroupSpec(NamedTuple):
    """How a consumer group treats its deliveries."""

    visibility_timeout_ms: int
    max_deliveries: int
    #: "new": only messages published after the group was created; "earliest":
    #: every message the channel still retains.
    start: str


class Retention(NamedTuple):
    """How many messages a channel keeps: the newest ``max_len``, none older than ``max_age_ms``."""

    max_len: int
    max_age_ms: int | None


class ReadOutcome(NamedTuple):
    """What one :meth:`BusPrimitives.bus_read` did."""

    #: (message, attempt) handed to the consumer, redeliveries first.
    deliveries: list[tuple[StoredMessage, int]]
    #: When the group next has something to hand out (a delayed message
    #: becoming visible, a delivery timing out), epoch ms; None if nothing is due.
    next_due_ms: int | None
    #: Dead letters this read published on ``<channel>.dead`` (waiters there are woken).
    dead: Sequence[StoredMessage] = ()


class BusPrimitives:
    """The bus primitives every store implements (sync; ``Store.run_io`` makes them async)."""

    #: True when other processes' wake-ups reach this one without polling
    #: (:meth:`bus_watch`, :meth:`bus_listen`, :meth:`bus_hears`).
    pushes_bus_wakeups: ClassVar[bool] = False

    def bus_publish(
        self, items: Sequence[PublishItem], now_ms: int, retention: Callable[[str], Retention]
    ) -> list[StoredMessage]:
        """Append ``items`` atomically (all or none); return what each one is stored as.

        An item whose ``key`` its channel already holds is not stored again:
        the original message is returned in its place. Each channel touched
        is then trimmed to ``retention(channel)`` — unless it has its own,
        set by :meth:`bus_set_retention` — oldest first, whether or not its
        groups have read what is trimmed (as ``XADD MAXLEN`` does).
        """
        raise NotImplementedError

    def bus_set_retention(self, channel: str, retention: Retention, now_ms: int) -> None:
        """Give ``channel`` (created if new) its own retention; trims at once."""
        raise NotImplementedError

    def bus_create_group(
        self, channel: str, group: str, spec: GroupSpec, now_ms: int
    ) -> tuple[GroupInfo, bool]:
        """Create ``group`` on ``channel`` (and the channel); ``(info, created)``.

        An existing group is left as it is (``created`` False).
        """
        raise NotImplementedError

    def bus_read(
        self,
        channel: str,
        group: str,
        consumer: str,
        count: int,
        now_ms: int,
        spec: GroupSpec,
        retention: Callable[[str], Retention],
    ) -> ReadOutcome:
        """Hand ``consumer`` up to ``count`` deliveries of ``group`` (created with ``spec`` if new).

        Timed-out deliveries are redelivered or dead-lettered first (see
        :func:`~klockwork.core.bus.rules.plan_read`); a dead letter is
        published on ``<channel>.dead`` in the same atomic step.
        """
        raise NotImplementedError

    def bus_ack(self, channel: str, group: str, ids: Sequence[str]) -> int:
        """Mark deliveries done; returns how many were pending. Unknown ids are ignored.

        Raises:
            InvalidRequestError: the group does not exist (argument ``group``).
        """
        raise NotImplementedError

    def bus_nack(
        self,
        channel: str,
        group: str,
        ids: Sequence[str],
        now_ms: int,
        error: str | None,
        undo: bool,
        consumer: str | None = None,
    ) -> int:
        """Hand pending deliveries back now: the next read redelivers them.

        ``error`` is kept for the dead letter; ``undo`` also takes back the
        attempt (the consumer never saw the message: a cancelled read, an
        await that timed out). With ``consumer``, only deliveries that
        consumer still holds are handed back (one redelivered to another
        consumer meanwhile is left alone). Returns how many were handed back.

        Raises:
            InvalidRequestError: the group does not exist (argument ``group``).
        """
        raise NotImplementedError

    def bus_range(
        self, channel: str, after_seq: int, limit: int, now_ms: int
    ) -> list[StoredMessage]:
        """Visible messages of ``channel`` with ``seq > after_seq``, oldest first."""
        raise NotImplementedError

    def bus_last_seqs(self, channels: Sequence[str]) -> dict[str, int]:
        """The newest seq of each channel (0 for a channel never published to)."""
        raise NotImplementedError

    def bus_groups(self, channel: str | None, now_ms: int) -> list[GroupInfo]:
        """Groups of ``channel`` (of every channel when None), with their stats."""
        raise NotImplementedError

    def bus_channels(self, retention: Callable[[str], Retention]) -> list[ChannelInfo]:
        """Every channel, by name (``retention`` names the default of those without their own)."""
        raise NotImplementedError

    def bus_version(self) -> int:
        """A number that changes when another process may have changed the bus.

        Cheap enough to poll every few ms (SQLite: ``PRAGMA data_version``);
        a store that no other process shares returns 0 always.
        """
        return 0

    def bus_watch(self, wake: Callable[[str], None]) -> Callable[[], None] | None:
        """Have ``wake(channel)`` called when another process makes something deliverable there.

        For stores that can push wake-ups across processes (Redis: Pub/Sub),
        on the channels some wait of this process listens to
        (:meth:`bus_listen`). Returns the function that stops watching, or
        None when the store cannot push: its waiters poll :meth:`bus_version`.
        """
        return None

    def bus_listen(self, channels: Sequence[str]) -> Callable[[], None] | None:
        """A wait is about to sleep on ``channels``: push their wake-ups until the stopper runs.

        None when the store cannot push wake-ups.
        """
        return None

    def bus_hears(self, channels: Sequence[str]) -> bool:
        """True if every other process's wake-up on ``channels`` reaches this one now.

        A waiter that hears them need not poll :meth:`bus_version`.
        """
        return False
