"""The in-memory store's bus: channels and consumer groups under one lock.

A channel keeps its retained messages by seq (seqs are contiguous: trimming
only removes the oldest). A group keeps a cursor (every seq up to it was
handed out), the seqs handed out above it (a delayed message lets later
ones pass it), and its pending deliveries. Every primitive is O(what it
returns) apart from the scan past delayed messages, bounded by retention.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable, Sequence

from klockwork.core.bus.model import DEAD_SUFFIX, ChannelInfo, GroupInfo
from klockwork.core.bus.rules import plan_read
from klockwork.core.stores.bus_base import (
    BusPrimitives,
    GroupSpec,
    PublishItem,
    ReadOutcome,
    Retention,
    StoredMessage,
)
from klockwork.core.stores.bus_io import channel_info, dead_letter_bytes, unknown_group

__all__ = ["MemoryBus"]


class _Pending:
    __slots__ = ("attempt", "consumer", "deadline", "delivered_at", "last_error")

    def __init__(self, consumer: str, attempt: int, delivered_at: int, deadline: int) -> None:
        self.consumer = consumer
        self.attempt = attempt
        self.delivered_at = delivered_at
        self.deadline = deadline
        self.last_error: str | None = None


class _Group:
    __slots__ = ("created_at", "cursor", "due", "pending", "spec", "taken")

    def __init__(self, spec: GroupSpec, created_at: int, cursor: int) -> None:
        self.spec = spec
        self.created_at = created_at
        self.cursor = cursor  # every seq <= cursor was handed out (or trimmed)
        self.taken: set[int] = set()  # seqs > cursor handed out
        self.pending: dict[int, _Pending] = {}
        # (deadline, seq) of pending deliveries, a heap; an entry whose delivery
        # was acked, trimmed or given a new deadline is stale and skipped.
        self.due: list[tuple[int, int]] = []

    def schedule(self, seq: int, deadline: int) -> None:
        """(Re)arm the visibility timeout of pending delivery ``seq``."""
        heapq.heappush(self.due, (deadline, seq))
        if len(self.due) > 2 * len(self.pending) + 64:  # mostly stale: rebuild
            self.due = [(p.deadline, s) for s, p in self.pending.items()]
            heapq.heapify(self.due)

    def _live(self, entry: tuple[int, int]) -> bool:
        p = self.pending.get(entry[1])
        return p is not None and p.deadline == entry[0]

    def expired(self, now_ms: int) -> list[tuple[int, int]]:
        """Take the deliveries whose timeout ran out: ``(seq, attempt)`` in seq order.

        They leave the heap: the caller reschedules each one it hands out
        again, and re-arms the rest with :meth:`schedule`.
        """
        out: dict[int, int] = {}
        due = self.due
        while due and due[0][0] <= now_ms:
            entry = heapq.heappop(due)
            if self._live(entry):
                out[entry[1]] = self.pending[entry[1]].attempt
        return sorted(out.items())

    def next_deadline(self) -> int | None:
        """The earliest visibility timeout still running, if any."""
        due = self.due
        while due and not self._live(due[0]):
            heapq.heappop(due)
        return due[0][0] if due else None


class _Channel:
    __slots__ = (
        "by_id",
        "first_seq",
        "groups",
        "key_of",
        "keys",
        "last_seq",
        "messages",
        "retention",
    )

    def __init__(self) -> None:
        self.messages: dict[int, StoredMessage] = {}
        self.by_id: dict[str, int] = {}
        self.keys: dict[str, int] = {}  # idempotency key -> seq
        self.key_of: dict[int, str] = {}  # seq -> its key (to forget it when trimmed)
        self.first_seq = 1
        self.last_seq = 0
        self.groups: dict[str, _Group] = {}
        self.retention: Retention | None = None


class MemoryBus(BusPrimitives):
    """Mixed into :class:`~klockwork.core.stores.memory.MemoryStore`."""

    def __init__(self) -> None:
        super().__init__()
        self._bus_lock = threading.Lock()
        self._channels: dict[str, _Channel] = {}
        self._bus_ids = 0

    def _check_open(self) -> None:  # MemoryStore's wins
        pass

    # -- publishing ---------------------------------------------------------------------
    def bus_publish(
        self, items: Sequence[PublishItem], now_ms: int, retention: Callable[[str], Retention]
    ) -> list[StoredMessage]:
        # Every retention is known before anything is appended: all or none.
        limits = {item.channel: retention(item.channel) for item in items}
        with self._bus_lock:
            self._check_open()
            out = [self._append(item, now_ms) for item in items]
            for name, limit in limits.items():
                self._trim(self._channels[name], now_ms, limit)
            return out

    def _append(self, item: PublishItem, now_ms: int) -> StoredMessage:
        ch = self._channels.get(item.channel)
        if ch is None:
            ch = self._channels[item.channel] = _Channel()
        if item.key is not None:
            seq = ch.keys.get(item.key)
            if seq is not None:
                return ch.messages[seq]
        ch.last_seq = seq = ch.last_seq + 1
        self._bus_ids += 1
        msg = StoredMessage(
            f"{self._bus_ids:016x}",
            item.channel,
            seq,
            item.payload,
            now_ms,
            max(item.visible_at, now_ms),
        )
        ch.messages[seq] = msg
        ch.by_id[msg.id] = seq
        if item.key is not None:
            ch.keys[item.key] = seq
            ch.key_of[seq] = item.key
        return msg

    def _trim(self, ch: _Channel, now_ms: int, default: Retention) -> None:
        max_len, max_age_ms = ch.retention or default
        msgs = ch.messages
        drop = len(msgs) - max_len
        if max_age_ms is not None:
            cutoff = now_ms - max_age_ms
            drop = max(drop, 0)
            while drop < len(msgs) and msgs[ch.first_seq + drop].published_at < cutoff:
                drop += 1
        if drop <= 0:
            return
        groups = tuple(ch.groups.values())
        key_of = ch.key_of
        first = ch.first_seq
        for seq in range(first, first + drop):
            msg = msgs.pop(seq)
            del ch.by_id[msg.id]
            if key_of:
                key = key_of.pop(seq, None)
                if key is not None:
                    del ch.keys[key]
            for g in groups:
                if g.pending:
                    g.pending.pop(seq, None)
                g.taken.discard(seq)
        ch.first_seq = first + drop
        for g in groups:
            g.cursor = max(g.cursor, ch.first_seq - 1)

    def bus_set_retention(self, channel: str, retention: Retention, now_ms: int) -> None:
        with self._bus_lock:
            self._check_open()
            ch = self._channels.setdefault(channel, _Channel())
            ch.retention = retention
            self._trim(ch, now_ms, retention)

    # -- groups -----------------------------------------------------------------------
    def bus_create_group(
        self, channel: str, group: str, spec: GroupSpec, now_ms: int
    ) -> tuple[GroupInfo, bool]:
        with self._bus_lock:
            self._check_open()
            ch = self._channels.setdefault(channel, _Channel())
            created = group not in ch.groups
            g = self._group(ch, group, spec, now_ms)
            return self._info(channel, group, ch, g, now_ms), created

    @staticmethod
    def _group(ch: _Channel, group: str, spec: GroupSpec, now_ms: int) -> _Group:
        g = ch.groups.get(group)
        if g is None:
            cursor = ch.last_seq if spec.start == "new" else ch.first_seq - 1
            g = ch.groups[group] = _Group(spec, now_ms, cursor)
        return g

    def _existing(self, channel: str, group: str) -> _Group:
        ch = self._channels.get(channel)
        g = None if ch is None else ch.groups.get(group)
        if g is None:
            raise unknown_group(channel, group)
        return g

    # -- reading ----------------------------------------------------------------------
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
        with self._bus_lock:
            self._check_open()
            ch = self._channels.setdefault(channel, _Channel())
            g = self._group(ch, group, spec, now_ms)
            spec = g.spec
            timed_out = g.expired(now_ms)
            # Delayed messages scheduled earlier and visible now are new to the
            # group: they join the fresh ones in seq order (not redeliveries).
            ready = [seq for seq, _ in timed_out if not g.pending[seq].consumer]
            expired = [(seq, a) for seq, a in timed_out if g.pending[seq].consumer]
            due = g.next_deadline()
            fresh, visible_due = self._fresh(ch, g, count, now_ms)
            if visible_due is not None and (due is None or visible_due < due):
                due = visible_due
            if ready:
                fresh = sorted(fresh + ready)
            plan = plan_read(expired, fresh, count, spec.max_deliveries)
            deadline = now_ms + spec.visibility_timeout_ms
            out: list[tuple[StoredMessage, int]] = []
            for seq in plan.redeliver:
                p = g.pending[seq]
                p.attempt += 1
                p.consumer, p.delivered_at, p.deadline = consumer, now_ms, deadline
                g.schedule(seq, deadline)
                out.append((ch.messages[seq], p.attempt))
            for seq in plan.fresh:
                g.pending[seq] = _Pending(consumer, 1, now_ms, deadline)
                g.schedule(seq, deadline)
                g.taken.add(seq)
                out.append((ch.messages[seq], 1))
            self._advance(ch, g)
            left = set(plan.redeliver).union(plan.dead, plan.fresh)
            for seq, _ in timed_out:  # due, not handed out this time: still due now
                if seq not in left:
                    g.schedule(seq, g.pending[seq].deadline)
                    due = now_ms
            dead = self._bury(ch, g, group, plan.dead, now_ms, retention) if plan.dead else []
            if out and (due is None or deadline < due):
                due = deadline
            return ReadOutcome(out, due, dead)

    @staticmethod
    def _fresh(ch: _Channel, g: _Group, count: int, now_ms: int) -> tuple[list[int], int | None]:
        """Visible messages the group was never handed, up to ``count``, in seq order.

        A delayed message passed on the way is scheduled as a delivery nobody
        holds yet (consumer "", attempt 0, due at its ``visible_at``): the
        cursor moves past it, so no later read steps over what lies behind it.
        Returns the fresh seqs and the earliest ``visible_at`` scheduled.
        """
        fresh: list[int] = []
        due: int | None = None
        seq = max(g.cursor + 1, ch.first_seq)
        msgs, taken = ch.messages, g.taken
        while seq <= ch.last_seq and len(fresh) < count:
            if seq not in taken:
                visible_at = msgs[seq].visible_at
                if visible_at <= now_ms:
                    fresh.append(seq)
                else:
                    g.pending[seq] = _Pending("", 0, 0, visible_at)
                    g.schedule(seq, visible_at)
                    taken.add(seq)
                    if due is None or visible_at < due:
                        due = visible_at
            seq += 1
        return fresh, due

    @staticmethod
    def _advance(ch: _Channel, g: _Group) -> None:
        cursor, taken = max(g.cursor, ch.first_seq - 1), g.taken
        while cursor + 1 in taken:
            cursor += 1
            taken.discard(cursor)
        g.cursor = cursor

    def _bury(
        self,
        ch: _Channel,
        g: _Group,
        group: str,
        seqs: list[int],
        now_ms: int,
        retention: Callable[[str], Retention],
    ) -> list[StoredMessage]:
        dead_channel = ""
        letters: list[StoredMessage] = []
        for seq in seqs:
            p = g.pending.pop(seq)
            msg = ch.messages[seq]
            dead_channel = msg.channel + DEAD_SUFFIX
            item = PublishItem(
                dead_channel,
                dead_letter_bytes(msg, group, p.attempt, p.consumer, p.last_error),
                f"{group}:{msg.id}",
                now_ms,
            )
            letters.append(self._append(item, now_ms))
        self._trim(self._channels[dead_channel], now_ms, retention(dead_channel))
        return letters

    # -- acks ---------------------------------------------------------------------------
    def _pending(self, channel: str, group: str, ids: Sequence[str]) -> tuple[_Group, list[int]]:
        """The group, and the seqs of ``ids`` it has pending (unknown ids skipped)."""
        g = self._existing(channel, group)
        by_id = self._channels[channel].by_id
        pending = g.pending
        # A delayed message scheduled but not yet handed out is nobody's to ack.
        seqs = [
            seq
            for mid in ids
            if (seq := by_id.get(mid)) is not None and seq in pending and pending[seq].consumer
        ]
        return g, list(dict.fromkeys(seqs))  # an id named twice counts once

    def bus_ack(self, channel: str, group: str, ids: Sequence[str]) -> int:
        with self._bus_lock:
            self._check_open()
            g, seqs = self._pending(channel, group, ids)
            return sum(g.pending.pop(seq, None) is not None for seq in seqs)

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
        with self._bus_lock:
            self._check_open()
            g, seqs = self._pending(channel, group, ids)
            if consumer is not None:
                seqs = [seq for seq in seqs if g.pending[seq].consumer == consumer]
            for seq in seqs:
                p = g.pending[seq]
                p.deadline = now_ms
                g.schedule(seq, now_ms)
                if error is not None:
                    p.last_error = error
                if undo:  # never below 0: a second undo of one delivery takes nothing
                    p.attempt = max(p.attempt - 1, 0)
            return len(seqs)

    # -- looking ------------------------------------------------------------------------
    def bus_range(
        self, channel: str, after_seq: int, limit: int, now_ms: int
    ) -> list[StoredMessage]:
        with self._bus_lock:
            self._check_open()
            ch = self._channels.get(channel)
            if ch is None:
                return []
            out: list[StoredMessage] = []
            seq = max(after_seq + 1, ch.first_seq)
            while seq <= ch.last_seq and len(out) < limit:
                msg = ch.messages[seq]
                if msg.visible_at <= now_ms:
                    out.append(msg)
                seq += 1
            return out

    def bus_last_seqs(self, channels: Sequence[str]) -> dict[str, int]:
        with self._bus_lock:
            self._check_open()
            return {
                name: (ch.last_seq if (ch := self._channels.get(name)) else 0) for name in channels
            }

    def bus_groups(self, channel: str | None, now_ms: int) -> list[GroupInfo]:
        with self._bus_lock:
            self._check_open()
            names = sorted(self._channels) if channel is None else [channel]
            return [
                self._info(name, group, ch, g, now_ms)
                for name in names
                if (ch := self._channels.get(name)) is not None
                for group, g in sorted(ch.groups.items())
            ]

    @staticmethod
    def _info(channel: str, group: str, ch: _Channel, g: _Group, now_ms: int) -> GroupInfo:
        lag = sum(
            1
            for seq in range(max(g.cursor + 1, ch.first_seq), ch.last_seq + 1)
            if seq not in g.taken and ch.messages[seq].visible_at <= now_ms
        )
        scheduled = [p for p in g.pending.values() if not p.consumer]
        lag += sum(1 for p in scheduled if p.deadline <= now_ms)
        return GroupInfo(
            channel,
            group,
            g.spec.visibility_timeout_ms / 1000,
            g.spec.max_deliveries,
            g.created_at,
            len(g.pending) - len(scheduled),
            lag,
        )

    def bus_channels(self, retention: Callable[[str], Retention]) -> list[ChannelInfo]:
        with self._bus_lock:
            self._check_open()
            return [
                channel_info(
                    name,
                    ch.last_seq,
                    len(ch.messages),
                    sorted(ch.groups),
                    ch.retention or retention(name),
                )
                for name, ch in sorted(self._channels.items())
            ]
