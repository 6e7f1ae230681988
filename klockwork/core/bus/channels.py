"""``kw.bus``: publish, subscribe through consumer groups, ack, peek, await, broadcast.

Delivery is at least once: a delivery not acked within its group's
visibility timeout is handed out again with ``attempt + 1``, and after
``max_deliveries`` attempts it becomes a dead letter on ``<channel>.dead``.
Every call validates its arguments before the store is touched, so bad
input changes nothing (:class:`~klockwork.InvalidRequestError` names the
argument). The decisions live in :mod:`.rules`, the atomic steps in the
store (:mod:`klockwork.core.stores.bus_base`), the waiting in
:mod:`.waiting`; this module checks, converts and wires them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from klockwork.core.bus.awaiting import AwaitCall
from klockwork.core.bus.listeners import EventPump, Listeners, Subscription
from klockwork.core.bus.model import (
    DEFAULT_MAX_AGE_S,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_MAX_LEN,
    DEFAULT_VISIBILITY_TIMEOUT_S,
    AwaitMode,
    AwaitResult,
    ChannelInfo,
    Delivery,
    GroupInfo,
    Message,
    channel_list,
    check_channel,
    check_dedup_key,
    check_group_name,
    decode_payload,
    encode_payload,
    to_epoch_ms,
)
from klockwork.core.bus.waiting import Attempt, Waiting
from klockwork.core.clock import Clock
from klockwork.core.errors import InvalidRequestError
from klockwork.core.events import EventHub
from klockwork.core.notify import Signals
from klockwork.core.stores.base import Store, io_twin
from klockwork.core.stores.bus_base import (
    GroupSpec,
    PublishItem,
    ReadOutcome,
    Retention,
    StoredMessage,
)
from klockwork.core.validation import check_int, check_text, check_timeout

__all__ = ["Bus", "to_message"]

_STARTS = ("new", "earliest")
_MAX_BATCH = 1000


def to_message(stored: StoredMessage) -> Message:
    """What callers get for a stored message (a fresh payload dict each time)."""
    return Message(
        stored.id,
        stored.channel,
        stored.seq,
        decode_payload(stored.payload),
        stored.published_at,
        stored.visible_at,
    )


def _wake_key(channel: str) -> str:
    return "bus:" + channel


def _ids(message_ids: object) -> list[str]:
    """Ack/nack arguments: ids, or the messages/deliveries themselves."""
    if isinstance(message_ids, (str, Message, Delivery)):
        message_ids = [message_ids]
    if not isinstance(message_ids, Iterable):
        raise InvalidRequestError("message_ids", message_ids, "expected message ids")
    out = []
    for item in message_ids:
        if isinstance(item, (Message, Delivery)):
            item = item.id
        if not isinstance(item, str) or not item or len(item) > 200:
            raise InvalidRequestError("message_ids", item, "expected message ids (str)")
        out.append(item)
    return out


class Bus:
    """The event bus of one engine (``kw.bus``); see DESIGN "Event bus".

    Args:
        store: where channels live (memory: this process; SQLite: the machine).
        clock: the engine's clock.
        max_len: default retention: messages each channel keeps (newest first).
        max_age_s: default retention: how old a kept message may be (None: any age).
        visibility_timeout_s: default of groups created on first subscribe.
        max_deliveries: default of groups created on first subscribe.
        hub: the engine's event hub: its governance events are published on
            ``klockwork.events`` while someone follows them (see :mod:`.listeners`).
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        max_len: int = DEFAULT_MAX_LEN,
        max_age_s: float | None = DEFAULT_MAX_AGE_S,
        visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        hub: EventHub | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._signals = Signals()
        self._retention = _retention(max_len, max_age_s)
        self._default_spec = _spec(visibility_timeout_s, max_deliveries, "new")
        self.listeners = Listeners()
        #: Puts the engine's governance events on ``klockwork.events`` (with a hub).
        self.events: EventPump | None = None if hub is None else EventPump(self, hub)
        # Other processes' publishes wake this bus's waiters, on a store that
        # pushes them (see ``Store.bus_watch``); elsewhere waiters poll.
        self._unwatch = store.bus_watch(self._woken)

    def _woken(self, channel: str) -> None:
        self._signals.notify(_wake_key(channel))

    def _retention_of(self, channel: str) -> Retention:
        return self._retention

    # -- publishing ---------------------------------------------------------------------
    def _items(
        self, channels: Sequence[str], payload: object, deliver_at: object, key: object
    ) -> list[PublishItem]:
        data = encode_payload(payload)
        visible_at = self._visible_at(deliver_at)
        dedup = None if key is None else check_dedup_key(key)
        return [PublishItem(c, data, dedup, visible_at) for c in channels]

    def _visible_at(self, deliver_at: object) -> int:
        return self._clock.now_ms() if deliver_at is None else to_epoch_ms(deliver_at, "deliver_at")

    def _published(self, stored: Sequence[StoredMessage]) -> list[Message]:
        messages = [to_message(s) for s in stored]
        for channel in {s.channel for s in stored}:
            self._signals.notify(_wake_key(channel))
        if self.listeners.active:
            for msg in messages:
                self.listeners.dispatch(msg)
        return messages

    def _store_items(self, items: list[PublishItem]) -> list[Message]:
        stored = self._store.bus_publish(items, self._clock.now_ms(), self._retention_of)
        return self._published(stored)

    async def _astore_items(self, items: list[PublishItem]) -> list[Message]:
        stored = await self._store.abus_publish(items, self._clock.now_ms(), self._retention_of)
        return self._published(stored)

    def publish(
        self,
        channel: str,
        payload: dict[str, Any],
        deliver_at: int | datetime | None = None,
        key: str | None = None,
    ) -> Message:
        """Append ``payload`` to ``channel`` (created on first publish) and return it.

        Args:
            channel: ``[A-Za-z0-9_.:-]``, 1-200 characters.
            payload: a JSON object (at most 1 MiB as JSON).
            deliver_at: epoch ms or an aware datetime; hidden from
                subscribers and ``peek`` until then.
            key: idempotency key: publishing it again on this channel
                returns the original message and publishes nothing.

        Raises:
            InvalidRequestError: a bad argument; nothing was published.
            StoreUnavailableError: the store cannot answer; nothing was published.
        """
        items = self._items([check_channel(channel)], payload, deliver_at, key)
        return self._store_items(items)[0]

    async def apublish(
        self,
        channel: str,
        payload: dict[str, Any],
        deliver_at: int | datetime | None = None,
        key: str | None = None,
    ) -> Message:
        """Async twin of :meth:`publish`; never blocks the event loop."""
        items = self._items([check_channel(channel)], payload, deliver_at, key)
        return (await self._astore_items(items))[0]

    def _batch_items(self, channel: str, payloads: object, deliver_at: object) -> list[PublishItem]:
        check_channel(channel)
        if isinstance(payloads, dict) or not isinstance(payloads, Sequence):
            raise InvalidRequestError("payloads", payloads, "expected a list of JSON objects")
        if not 1 <= len(payloads) <= _MAX_BATCH:
            raise InvalidRequestError(
                "payloads", f"<{len(payloads)} payloads>", f"expected 1-{_MAX_BATCH} payloads"
            )
        visible_at = self._visible_at(deliver_at)
        return [
            PublishItem(channel, encode_payload(p, "payloads"), None, visible_at) for p in payloads
        ]

    def publish_many(
        self,
        channel: str,
        payloads: Sequence[dict[str, Any]],
        deliver_at: int | datetime | None = None,
    ) -> list[Message]:
        """Publish several payloads on one channel in one atomic step (all or none), in order."""
        items = self._batch_items(channel, payloads, deliver_at)
        return self._store_items(items)

    async def apublish_many(
        self,
        channel: str,
        payloads: Sequence[dict[str, Any]],
        deliver_at: int | datetime | None = None,
    ) -> list[Message]:
        """Async twin of :meth:`publish_many`."""
        items = self._batch_items(channel, payloads, deliver_at)
        return await self._astore_items(items)

    def _broadcast_items(self, channels: object, payload: object) -> list[PublishItem]:
        names = channel_list(channels)
        return self._items(names, payload, None, None)

    def broadcast(self, channels: Sequence[str], payload: dict[str, Any]) -> list[Message]:
        """Publish ``payload`` on every channel of ``channels`` at once (all or none)."""
        items = self._broadcast_items(channels, payload)
        return self._store_items(items)

    async def abroadcast(self, channels: Sequence[str], payload: dict[str, Any]) -> list[Message]:
        """Async twin of :meth:`broadcast`."""
        items = self._broadcast_items(channels, payload)
        return await self._astore_items(items)

    # -- groups ---------------------------------------------------------------------------
    def create_group(
        self,
        channel: str,
        group: str,
        visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        start: str = "new",
    ) -> GroupInfo:
        """Create a consumer group (idempotent: an existing group is returned unchanged).

        Args:
            visibility_timeout_s: how long a delivery may go unacked before
                it is handed out again.
            max_deliveries: attempts before a message becomes a dead letter.
            start: ``"new"`` — messages published from now on; ``"earliest"``
                — every message the channel still retains.
        """
        spec = _spec(visibility_timeout_s, max_deliveries, start)
        info, _ = self._store.bus_create_group(
            check_channel(channel), check_group_name(group, "group"), spec, self._clock.now_ms()
        )
        self._grouped(channel)
        return info

    def _grouped(self, channel: str) -> None:
        if self.events is not None:
            self.events.group_created(channel)

    acreate_group = io_twin(create_group)

    def groups(self, channel: str | None = None) -> list[GroupInfo]:
        """Consumer groups (of one channel, or all) with pending and lag counts."""
        name = None if channel is None else check_channel(channel)
        return self._store.bus_groups(name, self._clock.now_ms())

    def channels(self) -> list[ChannelInfo]:
        """Every channel with its newest seq, length, groups and retention."""
        return self._store.bus_channels(self._retention_of)

    def set_retention(
        self, channel: str, max_len: int | None = None, max_age_s: float | None = None
    ) -> None:
        """Give ``channel`` its own retention (missing values: the bus default); trims now."""
        default = self._retention
        retention = Retention(
            default.max_len if max_len is None else _retention(max_len, None).max_len,
            default.max_age_ms if max_age_s is None else _retention(1, max_age_s).max_age_ms,
        )
        self._store.bus_set_retention(check_channel(channel), retention, self._clock.now_ms())

    # -- consuming -----------------------------------------------------------------------------
    def _read_args(
        self, channel: str, group: str, consumer: str, max_messages: int
    ) -> tuple[Any, ...]:
        self._grouped(channel)
        return (
            channel,
            group,
            consumer,
            max_messages,
            self._clock.now_ms(),
            self._default_spec,
            self._retention_of,
        )

    def _deliveries(self, out: ReadOutcome, group: str, consumer: str) -> list[Delivery]:
        if out.dead:  # dead letters published by this read: wake and tell their listeners
            self._published(out.dead)
        now = self._clock.now_ms()
        return [
            Delivery(to_message(m), attempt, now, consumer, group) for m, attempt in out.deliveries
        ]

    def _tried(self, out: ReadOutcome, group: str, consumer: str) -> Attempt[list[Delivery]]:
        """One subscribe try's result: done as soon as something was delivered."""
        return self._deliveries(out, group, consumer), bool(out.deliveries), out.next_due_ms

    def subscribe(
        self,
        channel: str,
        group: str,
        consumer: str,
        max_messages: int = 10,
        wait_s: float = 0,
    ) -> list[Delivery]:
        """Take up to ``max_messages`` deliveries for ``consumer`` of ``group``.

        Returns as soon as something is there, or empty after ``wait_s``
        seconds. The group is created with the bus defaults if new. Ack
        what you processed (:meth:`ack`); what you do not is handed out
        again after the group's visibility timeout.
        """
        check = self._check_read(channel, group, consumer, max_messages, wait_s)
        waiting: Waiting[list[Delivery]] = Waiting(
            self._store, self._clock, self._signals, (_wake_key(channel),), check, (channel,)
        )

        def attempt() -> Attempt[list[Delivery]]:
            out = self._store.bus_read(*self._read_args(channel, group, consumer, max_messages))
            return self._tried(out, group, consumer)

        return waiting.run(attempt)

    async def asubscribe(
        self,
        channel: str,
        group: str,
        consumer: str,
        max_messages: int = 10,
        wait_s: float = 0,
    ) -> list[Delivery]:
        """Async twin of :meth:`subscribe`. Cancelling it loses nothing.

        A read cancelled while the store worked on it hands what it took
        back to the group at once (redelivered, the attempt not counted).
        """
        check = self._check_read(channel, group, consumer, max_messages, wait_s)
        waiting: Waiting[list[Delivery]] = Waiting(
            self._store, self._clock, self._signals, (_wake_key(channel),), check, (channel,)
        )

        async def attempt() -> Attempt[list[Delivery]]:
            out = await self._aread(channel, group, consumer, max_messages)
            return self._tried(out, group, consumer)

        return await waiting.arun(attempt)

    async def _aread(self, channel: str, group: str, consumer: str, count: int) -> ReadOutcome:
        args = self._read_args(channel, group, consumer, count)
        if not self._store.blocking_io:
            return self._store.bus_read(*args)
        task = asyncio.ensure_future(self._store.abus_read(*args))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda t: self._give_back_later(t, channel, group, consumer))
            raise

    def _give_back_later(
        self, task: asyncio.Future[ReadOutcome], channel: str, group: str, consumer: str
    ) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        ids = [m.id for m, _ in task.result().deliveries]
        if ids:  # off the loop: the store does I/O
            asyncio.get_running_loop().run_in_executor(
                None,
                self._store.bus_nack,
                channel,
                group,
                ids,
                self._clock.now_ms(),
                None,
                True,
                consumer,
            )

    def _check_read(
        self, channel: str, group: str, consumer: str, max_messages: int, wait_s: float
    ) -> float:
        check_channel(channel)
        check_group_name(group, "group")
        check_group_name(consumer, "consumer")
        check_int(max_messages, "max_messages", low=1, high=_MAX_BATCH)
        timeout = check_timeout(wait_s, "wait_s")
        return 0.0 if timeout is None else timeout

    def ack(self, channel: str, group: str, message_ids: Iterable[str | Message | Delivery]) -> int:
        """Mark deliveries processed; returns how many were pending (acking twice is harmless).

        Raises:
            InvalidRequestError: the channel has no such group, or a bad id.
        """
        return self._store.bus_ack(*_ack_args(channel, group, message_ids))

    async def aack(
        self, channel: str, group: str, message_ids: Iterable[str | Message | Delivery]
    ) -> int:
        """Async twin of :meth:`ack`; never blocks the event loop."""
        return await self._store.abus_ack(*_ack_args(channel, group, message_ids))

    def nack(
        self,
        channel: str,
        group: str,
        message_ids: Iterable[str | Message | Delivery],
        error: str | None = None,
    ) -> int:
        """Hand deliveries back now (processing failed): the next read redelivers them.

        The attempt counts; ``error`` is kept for the dead letter if this
        was the last attempt. Returns how many were pending.
        """
        return self._store.bus_nack(*self._nack_args(channel, group, message_ids, error))

    async def anack(
        self,
        channel: str,
        group: str,
        message_ids: Iterable[str | Message | Delivery],
        error: str | None = None,
    ) -> int:
        """Async twin of :meth:`nack`; never blocks the event loop."""
        return await self._store.abus_nack(*self._nack_args(channel, group, message_ids, error))

    def _nack_args(
        self,
        channel: str,
        group: str,
        message_ids: Iterable[str | Message | Delivery],
        error: str | None,
    ) -> tuple[str, str, list[str], int, str | None, bool]:
        ids = _ids(message_ids)
        text = None if error is None else check_text(error, "error")
        return (
            check_channel(channel),
            check_group_name(group, "group"),
            ids,
            self._clock.now_ms(),
            text,
            False,
        )

    # -- looking --------------------------------------------------------------------------------
    def peek(self, channel: str, after_seq: int = 0, limit: int = 100) -> list[Message]:
        """Visible messages with ``seq > after_seq``, oldest first, consuming nothing."""
        stored = self._store.bus_range(
            check_channel(channel),
            check_int(after_seq, "after_seq"),
            check_int(limit, "limit", low=1, high=_MAX_BATCH),
            self._clock.now_ms(),
        )
        return [to_message(s) for s in stored]

    apeek = io_twin(peek)

    # -- awaiting --------------------------------------------------------------------------------
    def await_channels(
        self,
        channels: Sequence[str],
        mode: AwaitMode = "any",
        n: int = 1,
        group: str | None = None,
        wait_s: float = 0,
        *,
        consumer: str = "await",
        after: Mapping[str, int] | None = None,
        key: str | None = None,
    ) -> AwaitResult:
        """Wait until messages on ``channels`` satisfy ``mode``.

        ``"any"``: a message on any channel; ``"all"``: one on every
        channel; ``"at_least"``: ``n`` in all. Without a group, it waits for
        messages published after the call (or after ``after[channel]``)
        and consumes nothing. With a group, it takes deliveries as
        ``consumer`` and, once satisfied, acks them (consumed for that
        group); if the wait runs out first, it hands them back and consumes
        nothing. ``key`` (with a group) makes the await idempotent: a call
        with a key already satisfied returns that result again without
        consuming more (a LangGraph step re-run after a crash).
        """
        call = AwaitCall(self, channels, mode, n, group, wait_s, consumer, after, key)
        return call.run()

    async def aawait_channels(
        self,
        channels: Sequence[str],
        mode: AwaitMode = "any",
        n: int = 1,
        group: str | None = None,
        wait_s: float = 0,
        *,
        consumer: str = "await",
        after: Mapping[str, int] | None = None,
        key: str | None = None,
    ) -> AwaitResult:
        """Async twin of :meth:`await_channels`; cancelling it consumes nothing."""
        call = AwaitCall(self, channels, mode, n, group, wait_s, consumer, after, key)
        return await call.arun()

    # -- listeners --------------------------------------------------------------------------------
    def on(self, pattern: str, callback: Callable[[Message], object]) -> Subscription:
        """Call ``callback(message)`` for each message this process publishes on a matching channel.

        ``pattern`` is a glob over channel names; for ``klockwork.events``
        it also matches the event kind (``"lease.*"``). Callbacks run on the
        publishing thread after the publish; an exception in one is logged
        and never reaches the publisher. Returns a handle: ``.cancel()``
        (or call it) to stop.
        """
        return self.listeners.add(pattern, callback)

    def close(self) -> None:
        """Publish the queued governance events and wake every waiter (before the store closes)."""
        if self.events is not None:
            self.events.close()
        if self._unwatch is not None:
            self._unwatch()
        self._signals.close()


def _ack_args(
    channel: str, group: str, message_ids: Iterable[str | Message | Delivery]
) -> tuple[str, str, list[str]]:
    ids = _ids(message_ids)
    return check_channel(channel), check_group_name(group, "group"), ids


def _retention(max_len: object, max_age_s: object) -> Retention:
    length = check_int(max_len, "max_len", low=1)
    if max_age_s is None:
        return Retention(length, None)
    age = check_timeout(max_age_s, "max_age_s")
    if age is None or age <= 0:
        raise InvalidRequestError("max_age_s", max_age_s, "expected seconds > 0, or None")
    return Retention(length, max(1, round(age * 1000)))


def _spec(visibility_timeout_s: object, max_deliveries: object, start: object) -> GroupSpec:
    timeout = check_timeout(visibility_timeout_s, "visibility_timeout_s")
    if timeout is None or timeout <= 0:
        raise InvalidRequestError(
            "visibility_timeout_s", visibility_timeout_s, "expected seconds > 0"
        )
    if not isinstance(start, str) or start not in _STARTS:
        raise InvalidRequestError("start", start, "expected 'new' or 'earliest'")
    tries = check_int(max_deliveries, "max_deliveries", low=1, high=1000)
    return GroupSpec(max(1, round(timeout * 1000)), tries, start)
