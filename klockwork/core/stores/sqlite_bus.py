"""The SQLite store's bus: channels, messages, groups and deliveries in four tables.

Semantics are :mod:`.memory_bus`'s, kept across processes: every primitive
that changes more than one row runs in one ``BEGIN IMMEDIATE`` transaction
of the store (``SqliteStore._tx``), so a publish of several messages, or a
read with its redeliveries and dead letters, commits whole or not at all.

The tables are :data:`~.sqlite_io.BUS_SCHEMA`. A channel's seqs are
contiguous from its oldest retained message to ``last_seq`` (trimming only
removes the oldest), so trimming is a range delete and a channel's length
is ``last_seq - min(seq) + 1``. A group keeps a cursor (every seq up to it
was handed out, or trimmed) and one delivery row per message handed out:
unacked rows are its pending deliveries; acked rows are kept only above
the cursor, where a delayed message let later ones pass it, so that they
are not handed out twice. A message id is its seq in hex, ``-``, and 128
random bits: unique and unguessable, and an ack finds its row by the seq
(the table keeps no index on ids: each would cost a publish a random
b-tree insert).

:meth:`SqliteBus.bus_version` is ``PRAGMA data_version`` on a connection of
its own: it moves when another connection (of this process or another)
commits, and costs a few microseconds to ask.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

from klockwork.core.bus.model import DEAD_SUFFIX, ChannelInfo, GroupInfo
from klockwork.core.bus.rules import plan_read
from klockwork.core.errors import StoreUnavailableError
from klockwork.core.stores.base import IdPool
from klockwork.core.stores.bus_base import (
    BusPrimitives,
    GroupSpec,
    PublishItem,
    ReadOutcome,
    Retention,
    StoredMessage,
)
from klockwork.core.stores.bus_io import channel_info, dead_letter_bytes, unknown_group
from klockwork.core.stores.sqlite_bus_rows import (
    CHUNK,
    MSG_COLS,
    chunks,
    message_row,
    messages_by_seq,
    scan,
    seq_of,
)
from klockwork.core.stores.sqlite_io import connect

if TYPE_CHECKING:
    from klockwork.core.stores.sqlite_io import ConnectionPool

__all__ = ["SqliteBus"]

_GROUP_INFO = (
    "SELECT g.channel, g.grp, g.visibility_ms, g.max_deliveries, g.created_at, "
    "(SELECT count(*) FROM kw_bus_deliveries d "
    " WHERE d.channel = g.channel AND d.grp = g.grp AND d.acked = 0 AND d.consumer != ''), "
    "(SELECT count(*) FROM kw_bus_messages m "
    " WHERE m.channel = g.channel AND m.seq > g.cursor AND m.visible_at <= ? "
    " AND NOT EXISTS (SELECT 1 FROM kw_bus_deliveries d "
    "  WHERE d.channel = g.channel AND d.grp = g.grp AND d.seq = m.seq)) + "
    "(SELECT count(*) FROM kw_bus_deliveries d "  # delayed ones passed, visible by now
    " WHERE d.channel = g.channel AND d.grp = g.grp AND d.consumer = '' AND d.deadline <= ?) "
    "FROM kw_bus_groups g"
)


#: An ack or nack names a message by id: its seq (the id's head) finds the
#: row, the whole id must match (no index on ids: publishing stays cheap).
_ID_HEAD = re.compile(r"[0-9a-f]{1,15}(?=-)")  # a seq below 2**60
_SAME_ID = (
    " AND EXISTS (SELECT 1 FROM kw_bus_messages m WHERE m.channel = ? AND m.seq = ? AND m.id = ?)"
)


def _by_id(channel: str, group: str, ids: Sequence[str]) -> list[tuple[Any, ...]]:
    """``(channel, group, seq, channel, seq, id)`` of each id that can be one of ours."""
    heads = ((mid, _ID_HEAD.match(mid)) for mid in ids if isinstance(mid, str))
    return [(channel, group, s, channel, s, mid) for mid, m in heads if m for s in (int(m[0], 16),)]


def _group_info(row: Sequence[Any]) -> GroupInfo:
    return GroupInfo(row[0], row[1], row[2] / 1000, row[3], row[4], row[5], row[6])


class _Channel:
    """A channel's row as one transaction sees (and changes) it."""

    __slots__ = ("last_seq", "own", "touched")

    def __init__(self, last_seq: int, own: Retention | None) -> None:
        self.last_seq = last_seq
        self.own = own
        self.touched = False  # last_seq moved: write it back


def _channel(conn: sqlite3.Connection, name: str) -> _Channel:
    """The channel's row (created if new), in the caller's write transaction."""
    last_seq, max_len, max_age_ms = conn.execute(
        "INSERT INTO kw_bus_channels (channel, last_seq) VALUES (?, 0) "
        "ON CONFLICT (channel) DO UPDATE SET last_seq = last_seq "
        "RETURNING last_seq, max_len, max_age_ms",
        (name,),
    ).fetchone()
    return _Channel(last_seq, None if max_len is None else Retention(max_len, max_age_ms))


def _append(
    conn: sqlite3.Connection, ids: IdPool, items: Sequence[PublishItem], now_ms: int
) -> tuple[list[StoredMessage], dict[str, _Channel]]:
    """Store ``items`` (a key already held returns its message); the channels touched."""
    channels: dict[str, _Channel] = {}
    keyed: dict[tuple[str, str], StoredMessage] = {}
    rows: list[tuple[Any, ...]] = []
    out: list[StoredMessage] = []
    for item in items:
        name, key = item.channel, item.key
        ch = channels.get(name)
        if ch is None:
            ch = channels[name] = _channel(conn, name)
        if key is not None:
            held = keyed.get((name, key))
            if held is None:
                row = conn.execute(
                    f"SELECT {MSG_COLS} FROM kw_bus_messages WHERE channel = ? AND key = ?",
                    (name, key),
                ).fetchone()
                held = None if row is None else message_row(row)
            if held is not None:
                keyed[name, key] = held
                out.append(held)
                continue
        seq = ch.last_seq = ch.last_seq + 1
        ch.touched = True
        visible_at = max(item.visible_at, now_ms)
        msg = StoredMessage(f"{seq:x}-{ids.next()}", name, seq, item.payload, now_ms, visible_at)
        rows.append((*msg, key))
        if key is not None:
            keyed[name, key] = msg
        out.append(msg)
    conn.executemany(
        f"INSERT INTO kw_bus_messages ({MSG_COLS}, key) VALUES (?, ?, ?, ?, ?, ?, ?)", rows
    )
    conn.executemany(
        "UPDATE kw_bus_channels SET last_seq = ? WHERE channel = ?",
        [(ch.last_seq, name) for name, ch in channels.items() if ch.touched],
    )
    return out, channels


def _trim(
    conn: sqlite3.Connection, channel: str, last_seq: int, keep: Retention, now_ms: int
) -> None:
    """Drop the channel's oldest messages beyond ``keep``, with their keys and deliveries."""
    upto = last_seq - keep.max_len
    if keep.max_age_ms is not None:
        young = conn.execute(
            "SELECT seq FROM kw_bus_messages WHERE channel = ? AND seq > ? AND published_at >= ? "
            "ORDER BY seq LIMIT 1",
            (channel, upto, now_ms - keep.max_age_ms),
        ).fetchone()
        upto = max(upto, (last_seq + 1 if young is None else young[0]) - 1)
    if upto <= 0:
        return
    if conn.execute(
        "DELETE FROM kw_bus_messages WHERE channel = ? AND seq <= ?", (channel, upto)
    ).rowcount:
        conn.execute(
            "DELETE FROM kw_bus_deliveries WHERE channel = ? "
            "AND grp IN (SELECT grp FROM kw_bus_groups WHERE channel = ?) AND seq <= ?",
            (channel, channel, upto),
        )
        conn.execute(
            "UPDATE kw_bus_groups SET cursor = ? WHERE channel = ? AND cursor < ?",
            (upto, channel, upto),
        )


def _trim_all(
    conn: sqlite3.Connection,
    channels: dict[str, _Channel],
    now_ms: int,
    retention: Callable[[str], Retention],
) -> None:
    for name, ch in channels.items():
        _trim(conn, name, ch.last_seq, ch.own or retention(name), now_ms)


def _create_group(
    conn: sqlite3.Connection, channel: str, group: str, spec: GroupSpec, now_ms: int
) -> bool:
    """Create the group (and its channel) unless it exists; True if it was created."""
    last_seq = _channel(conn, channel).last_seq
    cursor = last_seq
    if spec.start != "new":
        first = conn.execute(
            "SELECT min(seq) FROM kw_bus_messages WHERE channel = ?", (channel,)
        ).fetchone()[0]
        cursor = last_seq if first is None else first - 1
    return bool(
        conn.execute(
            "INSERT INTO kw_bus_groups (channel, grp, visibility_ms, max_deliveries, "
            "created_at, cursor) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (channel, group, spec.visibility_timeout_ms, spec.max_deliveries, now_ms, cursor),
        ).rowcount
    )


class SqliteBus(BusPrimitives):
    """The bus primitives of :class:`~klockwork.core.stores.sqlite.SqliteStore` (a mixin)."""

    if TYPE_CHECKING:  # what the store provides
        path: str
        busy_timeout_ms: int
        _pool: ConnectionPool

        def _tx(
            self, doing: str, deadline: float | None = None
        ) -> AbstractContextManager[sqlite3.Connection]: ...

        def _one(self, doing: str, sql: str, args: Sequence[Any]) -> list[Any]: ...

        def _translated(self, doing: str) -> AbstractContextManager[None]: ...

    def __init__(self) -> None:
        super().__init__()
        self._bus_ids = IdPool()  # drawn only inside a write transaction: one thread at a time
        self._version_lock = threading.Lock()
        self._version_conn: sqlite3.Connection | None = None
        self._version_closed = False

    # -- publishing ---------------------------------------------------------------------
    def bus_publish(
        self, items: Sequence[PublishItem], now_ms: int, retention: Callable[[str], Retention]
    ) -> list[StoredMessage]:
        with self._tx("publish on the bus") as conn:
            out, channels = _append(conn, self._bus_ids, items, now_ms)
            _trim_all(conn, channels, now_ms, retention)
            return out

    def bus_set_retention(self, channel: str, retention: Retention, now_ms: int) -> None:
        with self._tx("set a channel's retention") as conn:
            (last_seq,) = conn.execute(
                "INSERT INTO kw_bus_channels (channel, last_seq, max_len, max_age_ms) "
                "VALUES (?, 0, ?, ?) ON CONFLICT (channel) DO UPDATE SET "
                "max_len = excluded.max_len, max_age_ms = excluded.max_age_ms RETURNING last_seq",
                (channel, retention.max_len, retention.max_age_ms),
            ).fetchone()
            _trim(conn, channel, last_seq, retention, now_ms)

    # -- groups -----------------------------------------------------------------------
    def bus_create_group(
        self, channel: str, group: str, spec: GroupSpec, now_ms: int
    ) -> tuple[GroupInfo, bool]:
        with self._tx("create a consumer group") as conn:
            created = _create_group(conn, channel, group, spec, now_ms)
            row = conn.execute(
                _GROUP_INFO + " WHERE g.channel = ? AND g.grp = ?", (now_ms, now_ms, channel, group)
            ).fetchone()
            return _group_info(row), created

    @staticmethod
    def _cursor(conn: sqlite3.Connection, channel: str, group: str) -> int:
        row = conn.execute(
            "SELECT cursor FROM kw_bus_groups WHERE channel = ? AND grp = ?", (channel, group)
        ).fetchone()
        if row is None:
            raise unknown_group(channel, group)
        return int(row[0])

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
        with self._tx("read from the bus") as conn:
            key = (channel, group)
            sql = "SELECT visibility_ms, max_deliveries, cursor FROM kw_bus_groups "
            sql += "WHERE channel = ? AND grp = ?"
            row = conn.execute(sql, key).fetchone()
            if row is None:
                _create_group(conn, channel, group, spec, now_ms)
                row = conn.execute(sql, key).fetchone()
            visibility_ms, max_deliveries, cursor = row
            expired: list[tuple[int, int]] = []
            ready: list[int] = []  # delayed messages scheduled earlier, visible now: fresh
            for seq, attempt, scheduled in conn.execute(
                # INDEXED BY: ORDER BY seq would lure the planner into the primary key,
                # a scan of every delivery of the group.
                "SELECT seq, attempt, consumer = '' FROM kw_bus_deliveries INDEXED BY kw_bus_due "
                "WHERE channel = ? AND grp = ? AND acked = 0 AND deadline <= ? ORDER BY seq",
                (*key, now_ms),
            ):
                if scheduled:
                    ready.append(seq)
                else:
                    expired.append((seq, attempt))
            due: int | None = conn.execute(
                "SELECT min(deadline) FROM kw_bus_deliveries "
                "WHERE channel = ? AND grp = ? AND acked = 0 AND deadline > ?",
                (*key, now_ms),
            ).fetchone()[0]
            fresh, run, deferred = scan(conn, channel, group, cursor, count, now_ms)
            if deferred:
                conn.executemany(
                    "INSERT INTO kw_bus_deliveries (channel, grp, seq, consumer, attempt, "
                    "delivered_at, deadline) VALUES (?, ?, ?, '', 0, 0, ?)",
                    [(channel, group, seq, visible_at) for seq, visible_at in deferred],
                )
                first = min(visible_at for _, visible_at in deferred)
                due = first if due is None else min(due, first)
            if ready:
                fresh = sorted(
                    [*fresh, *messages_by_seq(conn, channel, ready).values()], key=seq_of
                )
            plan = plan_read(expired, [m.seq for m in fresh], count, max_deliveries)
            deadline = now_ms + visibility_ms
            out: list[tuple[StoredMessage, int]] = []
            if plan.redeliver:
                out = self._redeliver(conn, key, plan.redeliver, consumer, now_ms, deadline)
            handed = fresh[: len(plan.fresh)]
            if handed:
                conn.executemany(
                    "INSERT INTO kw_bus_deliveries (channel, grp, seq, consumer, attempt, "
                    "delivered_at, deadline) VALUES (?, ?, ?, ?, 1, ?, ?) "
                    "ON CONFLICT (channel, grp, seq) DO UPDATE SET "  # a scheduled delayed one
                    "consumer = excluded.consumer, attempt = 1, "
                    "delivered_at = excluded.delivered_at, deadline = excluded.deadline",
                    [(channel, group, m.seq, consumer, now_ms, deadline) for m in handed],
                )
                out.extend((m, 1) for m in handed)
            handed_seqs = set(plan.fresh)
            new_cursor, passed_taken = cursor, False
            for seq, taken in run:  # over what was handed out, up to the first that was not
                if not taken and seq not in handed_seqs:
                    break
                new_cursor, passed_taken = seq, passed_taken or taken
            if new_cursor != cursor:
                conn.execute(
                    "UPDATE kw_bus_groups SET cursor = ? WHERE channel = ? AND grp = ?",
                    (new_cursor, *key),
                )
            if passed_taken:  # acked rows now at or below the cursor: forget them
                conn.execute(
                    "DELETE FROM kw_bus_deliveries WHERE channel = ? AND grp = ? "
                    "AND seq > ? AND seq <= ? AND acked = 1",
                    (*key, cursor, new_cursor),
                )
            dead = (
                self._bury(conn, key, plan.dead, new_cursor, now_ms, retention) if plan.dead else []
            )
            if out and (due is None or deadline < due):
                due = deadline
            return ReadOutcome(out, due, dead)

    @staticmethod
    def _redeliver(
        conn: sqlite3.Connection,
        key: tuple[str, str],
        seqs: list[int],
        consumer: str,
        now_ms: int,
        deadline: int,
    ) -> list[tuple[StoredMessage, int]]:
        attempts: dict[int, int] = {}
        for part in chunks(seqs):
            marks = ", ".join("?" * len(part))
            attempts.update(
                conn.execute(
                    "UPDATE kw_bus_deliveries SET attempt = attempt + 1, consumer = ?, "
                    "delivered_at = ?, deadline = ? "
                    f"WHERE channel = ? AND grp = ? AND seq IN ({marks}) RETURNING seq, attempt",
                    (consumer, now_ms, deadline, *key, *part),
                ).fetchall()
            )
        msgs = messages_by_seq(conn, key[0], seqs)
        return [(msgs[seq], attempts[seq]) for seq in seqs]

    def _bury(
        self,
        conn: sqlite3.Connection,
        key: tuple[str, str],
        seqs: list[int],
        cursor: int,
        now_ms: int,
        retention: Callable[[str], Retention],
    ) -> list[StoredMessage]:
        """Publish the dead letters of ``seqs`` on ``<channel>.dead``; their deliveries are done."""
        channel, group = key
        items: list[PublishItem] = []
        msgs = messages_by_seq(conn, channel, seqs)
        for seq in seqs:
            attempt, consumer, last_error = conn.execute(
                "SELECT attempt, consumer, last_error FROM kw_bus_deliveries "
                "WHERE channel = ? AND grp = ? AND seq = ?",
                (*key, seq),
            ).fetchone()
            msg = msgs[seq]
            payload = dead_letter_bytes(msg, group, attempt, consumer, last_error)
            items.append(PublishItem(channel + DEAD_SUFFIX, payload, f"{group}:{msg.id}", now_ms))
        # Done: forgotten at or below the cursor; above it kept (acked), so never fresh again.
        conn.executemany(
            "DELETE FROM kw_bus_deliveries WHERE channel = ? AND grp = ? AND seq = ?",
            [(*key, seq) for seq in seqs if seq <= cursor],
        )
        conn.executemany(
            "UPDATE kw_bus_deliveries SET acked = 1 WHERE channel = ? AND grp = ? AND seq = ?",
            [(*key, seq) for seq in seqs if seq > cursor],
        )
        letters, channels = _append(conn, self._bus_ids, items, now_ms)
        _trim_all(conn, channels, now_ms, retention)
        return letters

    # -- acks ---------------------------------------------------------------------------
    def bus_ack(self, channel: str, group: str, ids: Sequence[str]) -> int:
        with self._tx("ack bus deliveries") as conn:
            cursor = self._cursor(conn, channel, group)
            done = conn.executemany(
                "UPDATE kw_bus_deliveries SET acked = 1 "
                "WHERE channel = ? AND grp = ? AND seq = ? AND acked = 0 AND consumer != ''"
                + _SAME_ID,
                _by_id(channel, group, ids),
            ).rowcount
            if done > 0:
                conn.execute(
                    "DELETE FROM kw_bus_deliveries "
                    "WHERE channel = ? AND grp = ? AND seq <= ? AND acked = 1",
                    (channel, group, cursor),
                )
            return max(done, 0)

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
        with self._tx("nack bus deliveries") as conn:
            self._cursor(conn, channel, group)
            done = conn.executemany(
                "UPDATE kw_bus_deliveries SET deadline = ?, "
                "last_error = coalesce(?, last_error), attempt = max(attempt - ?, 0) "
                "WHERE channel = ? AND grp = ? AND seq = ? AND acked = 0 AND consumer != '' "
                "AND (? IS NULL OR consumer = ?)" + _SAME_ID,
                [
                    (now_ms, error, int(undo), *a[:3], consumer, consumer, *a[3:])
                    for a in dict.fromkeys(_by_id(channel, group, ids))
                ],
            ).rowcount
            return max(done, 0)

    # -- looking ------------------------------------------------------------------------
    @contextmanager
    def _snapshot(self, doing: str) -> Iterator[sqlite3.Connection]:
        """A read transaction: several statements see one state of the file."""
        with self._translated(doing), self._pool.connection() as conn:
            conn.execute("BEGIN")
            yield conn
            conn.execute("COMMIT")

    def bus_range(
        self, channel: str, after_seq: int, limit: int, now_ms: int
    ) -> list[StoredMessage]:
        rows = self._one(
            "read a channel",
            f"SELECT {MSG_COLS} FROM kw_bus_messages "
            "WHERE channel = ? AND seq > ? AND visible_at <= ? ORDER BY seq LIMIT ?",
            (channel, after_seq, now_ms, max(limit, 0)),
        )
        return [message_row(r) for r in rows]

    def bus_last_seqs(self, channels: Sequence[str]) -> dict[str, int]:
        names = list(dict.fromkeys(channels))
        found: dict[str, int] = {}
        with self._snapshot("read channels' last seqs") as conn:
            for i in range(0, len(names), CHUNK):
                part = names[i : i + CHUNK]
                marks = ", ".join("?" * len(part))
                found.update(
                    conn.execute(
                        f"SELECT channel, last_seq FROM kw_bus_channels WHERE channel IN ({marks})",
                        part,
                    ).fetchall()
                )
        return {name: found.get(name, 0) for name in channels}

    def bus_groups(self, channel: str | None, now_ms: int) -> list[GroupInfo]:
        if channel is None:
            rows = self._one(
                "list consumer groups",
                _GROUP_INFO + " ORDER BY g.channel, g.grp",
                (now_ms, now_ms),
            )
        else:
            rows = self._one(
                "list consumer groups",
                _GROUP_INFO + " WHERE g.channel = ? ORDER BY g.grp",
                (now_ms, now_ms, channel),
            )
        return [_group_info(r) for r in rows]

    def bus_channels(self, retention: Callable[[str], Retention]) -> list[ChannelInfo]:
        with self._snapshot("list channels") as conn:
            rows = conn.execute(
                "SELECT c.channel, c.last_seq, c.max_len, c.max_age_ms, c.last_seq + 1 - "
                "coalesce((SELECT min(seq) FROM kw_bus_messages m WHERE m.channel = c.channel), "
                "c.last_seq + 1) FROM kw_bus_channels c ORDER BY c.channel"
            ).fetchall()
            groups: dict[str, list[str]] = {}
            for name, group in conn.execute(
                "SELECT channel, grp FROM kw_bus_groups ORDER BY channel, grp"
            ):
                groups.setdefault(name, []).append(group)
        return [
            channel_info(
                name,
                last_seq,
                length,
                groups.get(name, []),
                retention(name) if max_len is None else Retention(max_len, max_age_ms),
            )
            for name, last_seq, max_len, max_age_ms, length in rows
        ]

    # -- polling ------------------------------------------------------------------------
    def bus_version(self) -> int:
        """``PRAGMA data_version`` of a connection that never writes: moves on any commit."""
        self._pool.guard.check()
        with self._version_lock, self._translated("read its data version"):
            if self._version_closed:
                raise StoreUnavailableError(f"sqlite store {self.path} is closed")
            conn = self._version_conn
            if conn is None:
                conn = self._version_conn = connect(self.path, self.busy_timeout_ms)
            return int(conn.execute("PRAGMA data_version").fetchone()[0])

    def _close_bus(self) -> None:
        """Close the version connection (the store's ``close`` calls it). Idempotent."""
        with self._version_lock:
            self._version_closed = True
            conn, self._version_conn = self._version_conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
