"""The bus primitives on Redis Streams (see :mod:`klockwork.core.stores.bus_base`).

Each primitive is one Lua script of :mod:`.bus_scripts` (the key layout,
and why a few side structures sit next to each stream, are documented
there): a publish of several messages, or a read with its redeliveries and
dead letters, happens whole or not at all, and makes the decisions of
:func:`klockwork.core.bus.rules.plan_read`.

Each primitive is written once as a *call* (script, arguments, how to read
the reply); the sync primitive runs it on the sync client and the async
twin (``abus_*``) on the running loop's ``redis.asyncio`` client, so only
the I/O differs.

**Time.** With ``server_time`` (the store's default) the scripts read the
server's clock; what the caller means relative to its own clock (a
``deliver_at``, a nack's "due again at") is sent as an offset from the
caller's ``now_ms`` and applied to the server's, and a read's next due time
comes back translated to the caller's clock, so machines whose clocks
disagree still wake on time.

**Wake-ups across processes.** Every script that makes something
deliverable on a channel publishes the store's token on the channel's
Pub/Sub channel (``wake:<channel>``); one listener thread per store
(:class:`.bus_wake.ChannelWakes`) subscribes to the channels its waits
sleep on, and calls what the engine's bus registered with
:meth:`bus_watch`, which wakes its waiters there. Waiters sleep on that
wake-up instead of polling :meth:`bus_version` (see
:mod:`klockwork.core.bus.waiting`).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from klockwork.core.bus.model import DEAD_SUFFIX, ChannelInfo, GroupInfo
from klockwork.core.stores.base import IdPool
from klockwork.core.stores.bus_base import (
    BusPrimitives,
    GroupSpec,
    PublishItem,
    ReadOutcome,
    Retention,
    StoredMessage,
)
from klockwork.core.stores.bus_io import channel_info, unknown_group
from klockwork.core.stores.redis import bus_scripts as scripts

if TYPE_CHECKING:
    from klockwork.core.clock import Clock
    from klockwork.core.stores.redis.bus_wake import ChannelWakes
    from klockwork.core.stores.redis.connection import RedisConnection

__all__ = ["RedisBus"]

#: A message id of this store: ``<seq>-<channel number>``, canonical decimals.
_ID = re.compile(r"(?:0|[1-9][0-9]{0,15})-(?:0|[1-9][0-9]{0,15})")
#: Seqs are exact in Lua's doubles below this.
_MAX_SEQ = 2**53 - 2


class _Call(NamedTuple):
    """One script call: what to run, with what, and how to read its reply."""

    source: str
    args: Sequence[str | bytes]
    doing: str
    now_ms: int | None
    mutating: bool
    parse: Callable[[Any], Any]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _line(channel: str, line: bytes) -> StoredMessage:
    """A message line of a reply: ``id, published_at, visible_at, payload`` (tab-separated)."""
    mid, published_at, visible_at, payload = line.split(b"\t", 3)
    text = mid.decode()
    return StoredMessage(
        text, channel, int(text.partition("-")[0]), payload, int(published_at), int(visible_at)
    )


def _delivery(channel: str, line: bytes) -> tuple[StoredMessage, int]:
    """A delivery line of a read: ``id, published_at, visible_at, attempt, payload``."""
    mid, published_at, visible_at, attempt, payload = line.split(b"\t", 4)
    text = mid.decode()
    msg = StoredMessage(
        text, channel, int(text.partition("-")[0]), payload, int(published_at), int(visible_at)
    )
    return msg, int(attempt)


def _json(rows: list[list[Any]]) -> bytes:
    return json.dumps(rows, ensure_ascii=False, separators=(",", ":")).encode()


def _lines(raw: bytes) -> list[bytes]:
    return raw.split(b"\n") if raw else []


def _retention_args(retention: Retention) -> list[str]:
    age = retention.max_age_ms
    return [str(retention.max_len), "" if age is None else str(age)]


def _group_info(row: Sequence[Any]) -> GroupInfo:
    """A script's ``group_info`` row as a GroupInfo."""
    vis, max_deliveries, created = _text(row[2]).split()
    return GroupInfo(
        _text(row[0]),
        _text(row[1]),
        int(vis) / 1000,
        int(max_deliveries),
        int(created),
        int(row[3]),
        int(row[4]),
    )


def _known(ids: Sequence[str]) -> list[str]:
    """The ids that can be ours (any other id names nothing here: ignored, as elsewhere)."""
    return [mid for mid in ids if isinstance(mid, str) and _ID.fullmatch(mid)]


class RedisBus(BusPrimitives):
    """Bus primitives of :class:`~klockwork.core.stores.redis.store.RedisStore` (a mixin).

    Relies on the store's ``_conn`` (a :class:`.connection.RedisConnection`),
    ``server_time`` (read with a default of True) and ``clock``; calls the
    store's ``_check_open`` when it has one.
    """

    # Other processes' publishes reach waiters here over Pub/Sub (.bus_wake).
    pushes_bus_wakeups = True

    if TYPE_CHECKING:  # what the store provides
        _conn: RedisConnection
        clock: Clock | None

    def __init__(self) -> None:
        super().__init__()
        self._bus_rids = IdPool()
        self._bus_rids_lock = threading.Lock()
        # Marks this store's own wake-ups: its bus already woke its waiters.
        self._bus_token = os.urandom(8).hex()
        self._bus_listener: ChannelWakes | None = None
        self._bus_listener_lock = threading.Lock()

    # -- plumbing: one call of a script, sync or async ------------------------------------
    def _bus_server_time(self) -> bool:
        return bool(getattr(self, "server_time", True))

    def _bus_argv(self, call: _Call) -> list[str | bytes]:
        if call.mutating:
            with self._bus_rids_lock:
                rid = self._bus_rids.next()
        else:
            rid = ""
        now = "" if call.now_ms is None or self._bus_server_time() else str(call.now_ms)
        return [self._conn.key("bus", ""), rid, now, self._bus_token, *call.args]

    def _bus_check_open(self) -> None:
        check = getattr(self, "_check_open", None)
        if check is not None:
            check()

    def _bus_run(self, call: _Call) -> Any:
        """Run ``call`` on the sync client; a lost reply is asked again under its request id."""
        import redis

        argv = self._bus_argv(call)
        keys = [self._conn.key("bus", "ver")]
        with self._conn.translated(call.doing):
            self._bus_check_open()
            script = self._conn.script(call.source)
            try:
                raw = script(keys=keys, args=argv)
            except (redis.ConnectionError, redis.TimeoutError):
                if not call.mutating:
                    raise
                raw = script(keys=keys, args=argv)  # same request id: runs at most once
        return call.parse(raw)

    async def _abus_run(self, call: _Call) -> Any:
        """Async twin of :meth:`_bus_run` on the running loop's ``redis.asyncio`` client."""
        import redis

        argv = self._bus_argv(call)
        keys = [self._conn.key("bus", "ver")]
        async with self._conn.atranslated(call.doing):
            self._bus_check_open()
            script = self._conn.ascript(call.source)
            try:
                raw = await script(keys=keys, args=argv)
            except (redis.ConnectionError, redis.TimeoutError):
                if not call.mutating:
                    raise
                raw = await script(keys=keys, args=argv)
        return call.parse(raw)

    def _local_ms(self) -> int:
        """The caller's clock, against which its deadlines are offsets (server time)."""
        clock = self.clock
        return clock.now_ms() if clock is not None else int(time.time() * 1000)

    # -- publishing ---------------------------------------------------------------------
    def _publish_call(
        self, items: Sequence[PublishItem], now_ms: int, retention: Callable[[str], Retention]
    ) -> _Call:
        # Every retention is known before the script runs: all or none.
        index: dict[str, int] = {}
        chans: list[list[Any]] = []
        meta: list[list[Any]] = []
        for item in items:
            at = index.get(item.channel)
            if at is None:
                at = index[item.channel] = len(index) + 1
                keep = retention(item.channel)
                chans.append([item.channel, keep.max_len, keep.max_age_ms])
            meta.append([at, item.key or "", item.visible_at - now_ms])
        args: list[str | bytes] = [_json(chans), _json(meta)]
        args += [item.payload for item in items]

        def parse(raw: bytes) -> list[StoredMessage]:
            lines = raw.split(b"\n")
            head = lines[0].split(b"\t")
            server_now = int(head[0])
            numbers = [n.decode() for n in head[1::2]]
            seqs = [int(seq) for seq in head[2::2]]  # the next new seq of each channel
            out = []
            for item, (at, _, offset), line in zip(items, meta, lines[1:], strict=True):
                if line:  # the message its key held
                    parts = line.split(b"\t", 3)
                    mid = parts[0].decode()
                    payload = parts[3] if len(parts) > 3 else item.payload
                    seq, published_at, visible_at = int(mid.partition("-")[0]), parts[1], parts[2]
                    out.append(
                        StoredMessage(
                            mid, item.channel, seq, payload, int(published_at), int(visible_at)
                        )
                    )
                    continue
                seq = seqs[at - 1]
                seqs[at - 1] = seq + 1
                out.append(
                    StoredMessage(
                        f"{seq}-{numbers[at - 1]}",
                        item.channel,
                        seq,
                        item.payload,
                        server_now,
                        server_now + max(offset, 0),
                    )
                )
            return out

        return _Call(scripts.PUBLISH, args, "publish on the bus", now_ms, True, parse)

    def bus_publish(
        self, items: Sequence[PublishItem], now_ms: int, retention: Callable[[str], Retention]
    ) -> list[StoredMessage]:
        if not items:
            return []
        out: list[StoredMessage] = self._bus_run(self._publish_call(items, now_ms, retention))
        self._woke({item.channel for item in items})
        return out

    async def abus_publish(
        self, items: Sequence[PublishItem], now_ms: int, retention: Callable[[str], Retention]
    ) -> list[StoredMessage]:
        """Async twin of :meth:`bus_publish` (the async client, no thread)."""
        if not items:
            return []
        out: list[StoredMessage] = await self._abus_run(
            self._publish_call(items, now_ms, retention)
        )
        self._woke({item.channel for item in items})
        return out

    def bus_set_retention(self, channel: str, retention: Retention, now_ms: int) -> None:
        args = [channel, *_retention_args(retention)]
        self._bus_run(
            _Call(scripts.SET_RETENTION, args, "set a channel's retention", now_ms, True, _none)
        )

    # -- groups -----------------------------------------------------------------------
    def bus_create_group(
        self, channel: str, group: str, spec: GroupSpec, now_ms: int
    ) -> tuple[GroupInfo, bool]:
        args = [channel, group, str(spec.visibility_timeout_ms), str(spec.max_deliveries)]
        args.append(spec.start)

        def parse(raw: Any) -> tuple[GroupInfo, bool]:
            return _group_info(raw[1]), bool(int(raw[0]))

        result: tuple[GroupInfo, bool] = self._bus_run(
            _Call(scripts.CREATE_GROUP, args, "create a consumer group", now_ms, True, parse)
        )
        return result

    # -- reading ----------------------------------------------------------------------
    def _read_call(
        self,
        channel: str,
        group: str,
        consumer: str,
        count: int,
        now_ms: int,
        spec: GroupSpec,
        retention: Callable[[str], Retention],
    ) -> _Call:
        dead_channel = channel + DEAD_SUFFIX
        args = [channel, group, consumer, str(count), str(spec.visibility_timeout_ms)]
        args += [str(spec.max_deliveries), spec.start, *_retention_args(retention(dead_channel))]

        def parse(raw: bytes) -> ReadOutcome:
            lines = raw.split(b"\n")
            server_now, due_text, n = lines[0].split(b"\t")
            # The due time in the caller's clock: its waiter sleeps by that clock.
            due = int(due_text) - int(server_now) + now_ms if due_text else None
            last = 1 + int(n)
            deliveries = [_delivery(channel, line) for line in lines[1:last]]
            dead = [_line(dead_channel, line) for line in lines[last:]]
            return ReadOutcome(deliveries, due, dead)

        return _Call(scripts.READ, args, "read from the bus", now_ms, True, parse)

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
        call = self._read_call(channel, group, consumer, count, now_ms, spec, retention)
        out: ReadOutcome = self._bus_run(call)
        if out.dead:
            self._woke({channel + DEAD_SUFFIX})
        return out

    async def abus_read(
        self,
        channel: str,
        group: str,
        consumer: str,
        count: int,
        now_ms: int,
        spec: GroupSpec,
        retention: Callable[[str], Retention],
    ) -> ReadOutcome:
        """Async twin of :meth:`bus_read` (the async client, no thread)."""
        call = self._read_call(channel, group, consumer, count, now_ms, spec, retention)
        out: ReadOutcome = await self._abus_run(call)
        if out.dead:
            self._woke({channel + DEAD_SUFFIX})
        return out

    # -- acks ---------------------------------------------------------------------------
    @staticmethod
    def _ack_call(channel: str, group: str, ids: Sequence[str]) -> _Call:
        def parse(raw: Any) -> int:
            if int(raw) < 0:
                raise unknown_group(channel, group)
            return int(raw)

        args = [channel, group, " ".join(_known(ids))]
        return _Call(scripts.ACK, args, "ack bus deliveries", None, True, parse)

    def bus_ack(self, channel: str, group: str, ids: Sequence[str]) -> int:
        done: int = self._bus_run(self._ack_call(channel, group, ids))
        return done

    async def abus_ack(self, channel: str, group: str, ids: Sequence[str]) -> int:
        """Async twin of :meth:`bus_ack` (the async client, no thread)."""
        done: int = await self._abus_run(self._ack_call(channel, group, ids))
        return done

    def _nack_call(
        self,
        channel: str,
        group: str,
        ids: Sequence[str],
        now_ms: int,
        error: str | None,
        undo: bool,
        consumer: str | None,
    ) -> _Call:
        # ``now_ms`` is when the deliveries are due again; on the server's clock
        # that is the same distance from its now as from the caller's.
        offset = now_ms - self._local_ms() if self._bus_server_time() else 0
        args = [channel, group, str(offset), "0" if error is None else "1", error or ""]
        args += ["1" if undo else "0", consumer or "", " ".join(_known(ids))]

        def parse(raw: Any) -> int:
            if int(raw) < 0:
                raise unknown_group(channel, group)
            return int(raw)

        return _Call(scripts.NACK, args, "nack bus deliveries", now_ms, True, parse)

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
        call = self._nack_call(channel, group, ids, now_ms, error, undo, consumer)
        done: int = self._bus_run(call)
        if done:
            self._woke({channel})
        return done

    async def abus_nack(
        self,
        channel: str,
        group: str,
        ids: Sequence[str],
        now_ms: int,
        error: str | None,
        undo: bool,
        consumer: str | None = None,
    ) -> int:
        """Async twin of :meth:`bus_nack` (the async client, no thread)."""
        call = self._nack_call(channel, group, ids, now_ms, error, undo, consumer)
        done: int = await self._abus_run(call)
        if done:
            self._woke({channel})
        return done

    # -- looking ------------------------------------------------------------------------
    def bus_range(
        self, channel: str, after_seq: int, limit: int, now_ms: int
    ) -> list[StoredMessage]:
        if limit <= 0:
            return []
        args = [channel, str(min(max(after_seq, 0), _MAX_SEQ)), str(limit)]

        def parse(raw: bytes) -> list[StoredMessage]:
            return [_line(channel, line) for line in _lines(raw)]

        out: list[StoredMessage] = self._bus_run(
            _Call(scripts.RANGE, args, "read a channel", now_ms, False, parse)
        )
        return out

    def bus_last_seqs(self, channels: Sequence[str]) -> dict[str, int]:
        names = list(channels)
        if not names:
            return {}

        def parse(raw: Any) -> dict[str, int]:
            return {name: int(seq) for name, seq in zip(names, raw, strict=True)}

        out: dict[str, int] = self._bus_run(
            _Call(scripts.LAST_SEQS, names, "read channels' last seqs", None, False, parse)
        )
        return out

    def bus_groups(self, channel: str | None, now_ms: int) -> list[GroupInfo]:
        def parse(raw: Any) -> list[GroupInfo]:
            return [_group_info(row) for row in raw]

        args = ["" if channel is None else channel]
        out: list[GroupInfo] = self._bus_run(
            _Call(scripts.GROUPS, args, "list consumer groups", now_ms, False, parse)
        )
        return out

    def bus_channels(self, retention: Callable[[str], Retention]) -> list[ChannelInfo]:
        def parse(raw: Any) -> list[ChannelInfo]:
            out = []
            for row in raw:
                name, own_len, own_age = _text(row[0]), _text(row[4]), _text(row[5])
                keep = (
                    Retention(int(own_len), int(own_age) if own_age else None)
                    if own_len
                    else retention(name)
                )
                groups = [_text(g) for g in row[3]]
                out.append(channel_info(name, int(row[1]), int(row[2]), groups, keep))
            return out

        result: list[ChannelInfo] = self._bus_run(
            _Call(scripts.CHANNELS, [], "list channels", None, False, parse)
        )
        return result

    # -- waking -------------------------------------------------------------------------
    def bus_version(self) -> int:
        """The namespace's change counter: every script that changes the bus moves it."""
        with self._conn.translated("read the bus version"):
            self._bus_check_open()
            raw = self._conn.sync.get(self._conn.key("bus", "ver"))
        return 0 if raw is None else int(raw)

    def bus_watch(self, wake: Callable[[str], None]) -> Callable[[], None] | None:
        """Call ``wake(channel)`` when another process publishes on (or nacks on) ``channel``.

        For the channels some wait of this process listens to
        (:meth:`bus_listen`). One Pub/Sub listener thread per store serves
        every watcher; it is started by the first. Returns the stopper.
        """
        wakes = self._bus_wakes()
        return None if wakes is None else wakes.watch(wake)

    def bus_listen(self, channels: Sequence[str]) -> Callable[[], None] | None:
        """Subscribe to ``channels``' wake-ups while a wait sleeps there (see :mod:`.bus_wake`)."""
        wakes = self._bus_wakes()
        return None if wakes is None else wakes.listen(channels)

    def bus_hears(self, channels: Sequence[str]) -> bool:
        """True once the server confirmed the subscriptions: waiters need not poll."""
        wakes = self._bus_listener
        return wakes is not None and wakes.hears(channels)

    def _bus_wakes(self) -> ChannelWakes | None:
        """The listener (started by the first caller); None once the store is closed."""
        from klockwork.core.stores.redis.bus_wake import ChannelWakes

        with self._bus_listener_lock:
            wakes = self._bus_listener
            if wakes is None and not getattr(self, "_closed", False):
                prefix = self._conn.key("bus", "wake", "")
                wakes = self._bus_listener = ChannelWakes(self._conn, prefix, self._bus_token)
        return wakes

    def _woke(self, channels: set[str]) -> None:
        """Wake this process's watchers (every engine on this store) for a change made here.

        The listener skips this store's own Pub/Sub wake-ups: told here, they
        cost no round trip, and reach every engine sharing the store object.
        """
        wakes = self._bus_listener
        if wakes is not None:
            for channel in channels:
                wakes.tell(channel)

    def _close_bus(self) -> None:
        """Stop the wake-up listener (the store's ``close`` calls it). Idempotent."""
        with self._bus_listener_lock:
            listener, self._bus_listener = self._bus_listener, None
        if listener is not None:
            listener.close()


def _none(raw: Any) -> None:
    return None
