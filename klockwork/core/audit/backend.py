"""Where an audit chain is stored: the backend protocol and the in-memory backend.

A backend only stores what :class:`~klockwork.core.audit.log.AuditLog` decided
and hashed; it never computes hashes. The unit of storage is an entry's
canonical line (:meth:`~klockwork.core.audit.chain.AuditEntry.stored_line`),
which verification and export read back verbatim, so every backend is
verified by the same code.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Protocol, overload, runtime_checkable

from klockwork.core.audit.chain import AuditEntry
from klockwork.core.errors import AuditIntegrityError, InvalidRequestError, StoreUnavailableError
from klockwork.core.model import _build, _set_private
from klockwork.core.stores.base import DEFAULT_AUDIT_RETAIN

__all__ = ["AuditBackend", "EntryBatch", "MemoryAuditBackend", "Row", "entry_from_line"]

#: One chained entry as the writer hands it over: seq, ts, kind, agent_id,
#: session_id, data_json (the canonical JSON text of ``data``), prev_hash, hash, line.
Row = tuple[int, int, str, str | None, str | None, str, str, str, bytes]


_ROW_FIELDS = ("seq", "ts", "kind", "agent_id", "session_id", "data", "prev_hash", "hash")


class EntryBatch(Sequence[AuditEntry]):
    """The entries of one writer batch, as :meth:`AuditBackend.append` receives them.

    A ``Sequence[AuditEntry]`` whose items are built on access. Backends that
    only need columns can read :attr:`rows` instead (no object per entry):
    ``(seq, ts, kind, agent_id, session_id, data_json, prev_hash, hash, line)``
    tuples, ``data_json`` being the canonical JSON text of the entry's
    ``data`` (``json.loads`` gives the dict) and ``line`` its stored line.
    """

    __slots__ = ("rows",)

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> AuditEntry: ...
    @overload
    def __getitem__(self, index: slice) -> list[AuditEntry]: ...
    def __getitem__(self, index: int | slice) -> AuditEntry | list[AuditEntry]:
        if isinstance(index, slice):
            return [_row_entry(row) for row in self.rows[index]]
        return _row_entry(self.rows[index])


def _row_entry(row: Row) -> AuditEntry:
    values = dict(zip(_ROW_FIELDS, row[:8], strict=True))
    values["data"] = json.loads(row[5])
    entry = _build(AuditEntry, values)
    _set_private(entry, {"_line": row[8]})
    return entry


# --------------------------------------------------------------------------- backends
@runtime_checkable
class AuditBackend(Protocol):
    """Where a chain is stored. The log decides and hashes; a backend only stores.

    A backend holds one chain from seq 1 without gaps. Each entry's
    :meth:`~klockwork.core.audit.chain.AuditEntry.stored_line` is its unit of
    storage: ``lines`` must return exactly those bytes (verification and export
    read them), while ``read`` may parse them back into entries.
    """

    def append(self, entries: Sequence[AuditEntry]) -> None:
        """Store ``entries`` (consecutive seqs continuing the chain) atomically."""
        ...

    def read(
        self,
        after_seq: int,
        limit: int,
        *,
        kind: str | None = None,
        agent_id: str | None = None,
        session_id: str | None = None,
        since: int | None = None,
    ) -> list[AuditEntry]:
        """Up to ``limit`` entries with seq > ``after_seq`` matching the filters, by seq.

        ``since`` keeps entries whose ``ts`` is at least ``since``; each other
        filter keeps entries whose field equals it.
        """
        ...

    def lines(self, after_seq: int, limit: int) -> list[bytes]:
        """The stored lines of up to ``limit`` entries after ``after_seq``, by seq."""
        ...

    def head(self) -> AuditEntry | None:
        """The last stored entry, or None when empty."""
        ...

    def dropped(self) -> tuple[int, str] | None:
        """``(seq, hash)`` of the last entry dropped by retention, or None if none was.

        A backend that keeps a bounded tail stores entries after that seq only.
        """
        ...

    def close(self) -> None:
        """Release resources; later calls raise :class:`StoreUnavailableError`."""
        ...


class MemoryAuditBackend:
    """In-process :class:`AuditBackend`: stored lines plus a small filter index.

    Entries are kept as their canonical lines (immutable bytes), so nothing a
    caller does to a returned entry changes the stored chain. Thread-safe.

    Args:
        retain: how many of the newest entries to keep (None: all). Older ones
            are dropped in batches of whole sealed blocks; :meth:`dropped`
            names the last one dropped, which the kept tail links to, so the
            tail still verifies.
    """

    def __init__(self, retain: int | None = DEFAULT_AUDIT_RETAIN) -> None:
        if retain is not None and (retain.__class__ is not int or retain < 1):
            raise InvalidRequestError("audit_retain", retain, "must be an int >= 1 or None")
        self._retain = retain
        #: The most entries the log may seal in one block: retention drops
        #: whole blocks, so a block is at most an eighth of what is kept.
        self.block_limit: int | None = None if retain is None else max(1, retain // 8)
        # Entries 1.._offset were dropped; the lists hold seq _offset+1 onwards.
        self._offset = 0
        self._dropped: tuple[int, str] | None = None
        self._lock = threading.Lock()
        # One column per filtered field, same position as the line. Columns of
        # strings and ints, not a tuple per entry: the log's objects never
        # become garbage-collector work (only containers are tracked).
        self._lines: list[bytes] = []
        self._ts: list[int] = []
        self._kinds: list[str] = []
        self._agents: list[str | None] = []
        self._sessions: list[str | None] = []
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailableError("the memory audit backend is closed")

    def append(self, entries: Sequence[AuditEntry]) -> None:
        """Store ``entries``; they must continue the chain (else :class:`AuditIntegrityError`)."""
        if not entries:
            return
        ts: Sequence[int]
        kinds: Sequence[str]
        agents: Sequence[str | None]
        sessions: Sequence[str | None]
        lines: Sequence[bytes]
        if isinstance(entries, EntryBatch):
            rows = entries.rows
            first, last = rows[0][0], rows[-1][0]
            lines = [r[8] for r in rows]
            ts = [r[1] for r in rows]
            kinds = [r[2] for r in rows]
            agents = [r[3] for r in rows]
            sessions = [r[4] for r in rows]
        else:
            first, last = entries[0].seq, entries[-1].seq
            lines = [e.stored_line() for e in entries]
            ts = [e.ts for e in entries]
            kinds = [e.kind for e in entries]
            agents = [e.agent_id for e in entries]
            sessions = [e.session_id for e in entries]
        with self._lock:
            self._check_open()
            n = self._offset + len(self._lines)
            if first != n + 1 or last != n + len(lines):
                raise AuditIntegrityError(
                    f"entries {first}..{last} do not continue a chain that ends at seq {n}"
                )
            self._lines += lines
            self._ts += ts
            self._kinds += kinds
            self._agents += agents
            self._sessions += sessions
            retain = self._retain
            # Drop in batches of retain/8: amortised O(1) per entry.
            if retain is not None and len(self._lines) > retain + retain // 8:
                self._drop(len(self._lines) - retain)

    def _drop(self, count: int) -> None:
        # Whole blocks only: the kept tail must start a block, linking to the
        # seal of the last one dropped.
        lines = self._lines
        seal = _seal_of(lines[count - 1])
        while count < len(lines) and _seal_of(lines[count]) == seal:
            count += 1
        if count == len(lines):  # one block holds everything kept: keep it all
            return
        last = AuditEntry.from_line(lines[count - 1])
        self._dropped = (last.seq, last.hash)
        self._offset = last.seq
        for column in (self._lines, self._ts, self._kinds, self._agents, self._sessions):
            del column[:count]

    def dropped(self) -> tuple[int, str] | None:
        """See :meth:`AuditBackend.dropped`."""
        with self._lock:
            return self._dropped

    def read(
        self,
        after_seq: int,
        limit: int,
        *,
        kind: str | None = None,
        agent_id: str | None = None,
        session_id: str | None = None,
        since: int | None = None,
    ) -> list[AuditEntry]:
        """See :meth:`AuditBackend.read`."""
        found: list[bytes] = []
        with self._lock:
            self._check_open()
            lines, tss, kinds = self._lines, self._ts, self._kinds
            agents, sessions = self._agents, self._sessions
            for pos in range(max(0, after_seq - self._offset), len(lines)):
                if (
                    (kind is None or kinds[pos] == kind)
                    and (agent_id is None or agents[pos] == agent_id)
                    and (session_id is None or sessions[pos] == session_id)
                    and (since is None or tss[pos] >= since)
                ):
                    found.append(lines[pos])
                    if len(found) >= limit:
                        break
        return [entry_from_line(line) for line in found]

    def lines(self, after_seq: int, limit: int) -> list[bytes]:
        """See :meth:`AuditBackend.lines`."""
        with self._lock:
            self._check_open()
            start = max(0, after_seq - self._offset)
            return self._lines[start : start + limit]

    def head(self) -> AuditEntry | None:
        """See :meth:`AuditBackend.head`."""
        with self._lock:
            self._check_open()
            last = self._lines[-1] if self._lines else None
        return None if last is None else AuditEntry.from_line(last)

    def close(self) -> None:
        """Mark closed (the entries are dropped with the object)."""
        with self._lock:
            self._closed = True


def _seal_of(line: bytes) -> bytes:
    """The ``hash`` of a stored canonical line (the last top-level key before ``kind``)."""
    cut = line.rfind(b',"hash":"')
    return line[cut + 9 : cut + 73]


def entry_from_line(line: bytes) -> AuditEntry:
    """A stored line as an entry; a line that is not one is an integrity problem, typed."""
    try:
        return AuditEntry.from_line(line)
    except (ValueError, RecursionError) as exc:
        raise AuditIntegrityError(
            f"a stored audit line is not an entry (verify the chain): {exc}"
        ) from None
