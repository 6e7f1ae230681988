"""Rows of the SQLite bus: reading messages by seq, and the scan for a group's fresh messages.

Split from :mod:`.sqlite_bus` (which applies them in its transactions).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any

from klockwork.core.stores.bus_base import StoredMessage

__all__ = ["CHUNK", "MSG_COLS", "chunks", "message_row", "messages_by_seq", "scan", "seq_of"]

MSG_COLS = "id, channel, seq, payload, published_at, visible_at"
#: The most seqs bound in one ``IN (...)`` list.
CHUNK = 500


def seq_of(msg: StoredMessage) -> int:
    return msg.seq


def message_row(row: Sequence[Any]) -> StoredMessage:
    return StoredMessage(row[0], row[1], row[2], bytes(row[3]), row[4], row[5])


def chunks(seqs: Sequence[int]) -> Iterator[Sequence[int]]:
    for i in range(0, len(seqs), CHUNK):
        yield seqs[i : i + CHUNK]


def messages_by_seq(
    conn: sqlite3.Connection, channel: str, seqs: Sequence[int]
) -> dict[int, StoredMessage]:
    out: dict[int, StoredMessage] = {}
    for part in chunks(seqs):
        marks = ", ".join("?" * len(part))
        for row in conn.execute(
            f"SELECT {MSG_COLS} FROM kw_bus_messages WHERE channel = ? AND seq IN ({marks})",
            (channel, *part),
        ):
            out[row[2]] = message_row(row)
    return out


def scan(
    conn: sqlite3.Connection, channel: str, group: str, cursor: int, count: int, now_ms: int
) -> tuple[list[StoredMessage], list[tuple[int, bool]], list[tuple[int, int]]]:
    """Visible messages above the cursor the group was never handed (up to ``count``).

    Also returns the run of seqs right above the cursor that were handed out,
    are visible, or are delayed (``(seq, passed)``: how far the cursor may
    move), and the delayed messages passed, ``(seq, visible_at)``: the read
    schedules each one as a delivery nobody holds yet (attempt 0, due at its
    ``visible_at``), so the cursor moves past it and later reads never scan
    the messages behind it again.
    """
    fresh: list[StoredMessage] = []
    run: list[tuple[int, bool]] = []
    deferred: list[tuple[int, int]] = []
    rows = conn.execute(
        "SELECT m.id, m.channel, m.seq, m.payload, m.published_at, m.visible_at, "
        "d.seq IS NOT NULL FROM kw_bus_messages m LEFT JOIN kw_bus_deliveries d "
        "ON d.channel = m.channel AND d.grp = ? AND d.seq = m.seq "
        "WHERE m.channel = ? AND m.seq > ? ORDER BY m.seq",
        (group, channel, cursor),
    )
    try:
        for row in rows:
            if len(fresh) >= count:
                break
            taken, visible_at = row[6], row[5]
            if not taken:
                if visible_at > now_ms:
                    deferred.append((row[2], visible_at))
                    run.append((row[2], True))
                    continue
                fresh.append(message_row(row))
            run.append((row[2], bool(taken)))
    finally:
        rows.close()
    return fresh, run, deferred
