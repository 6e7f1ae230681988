"""An audit chain stored in SQLite, in the same file the SQLite lease store may use.

:class:`SqliteAuditBackend` implements
:class:`~klockwork.core.audit.backend.AuditBackend` with the same semantics as
:class:`~klockwork.core.audit.backend.MemoryAuditBackend`. Each entry is one
row of ``kw_audit``: its ``seq`` (the primary key), the columns the query
filters use, and its stored line, byte for byte as the log made it::

    kw_audit(seq INTEGER PRIMARY KEY, ts, kind, agent_id, session_id, line BLOB NOT NULL)

Every :meth:`~SqliteAuditBackend.append` is one ``BEGIN IMMEDIATE``
transaction: the write lock is taken *before* the stored head is read, so
the check that a batch continues the chain and the insert of that batch are
atomic, even against other processes. The database runs in WAL mode with
``synchronous=NORMAL`` (an OS crash may lose the last commits, never corrupt
the file). sqlite3 errors are translated through the lease store's
:data:`~klockwork.core.stores.sqlite_io.ERROR_MAP` into
:class:`~klockwork.StoreUnavailableError`.

Why a batch can fail to continue the chain, with two processes on one file::

    1. A and B open the file; both see the stored head at seq 10.
    2. A's writer appends seq 11..20 chained on head 10 (commits).
    3. B's writer appends *its* seq 11..20, also chained on head 10.
    4. Inside B's transaction the stored head is 20, not 10: B's batch does
       not continue the chain. By default append raises AuditIntegrityError
       and writes nothing (B's log fails closed). With ``rebase=True`` the
       backend re-chains B's batch onto head 20 instead (seq 21..30, new
       ``prev_hash`` and ``hash``), so the file keeps one gapless chain.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from klockwork.core.audit.backend import EntryBatch, entry_from_line
from klockwork.core.audit.chain import (
    GENESIS_HASH,
    AuditEntry,
    block_seal,
    canonical_json,
    entry_body,
)
from klockwork.core.audit.encode import TEXT, encode_batch
from klockwork.core.errors import AuditIntegrityError, StoreUnavailableError
from klockwork.core.stores.base import JournalRow
from klockwork.core.stores.sqlite_io import AUDIT_SCHEMA, FileGuard, connect, translated

__all__ = ["SqliteAuditBackend"]

_INSERT = "INSERT INTO kw_audit (seq, ts, kind, agent_id, session_id, line) VALUES (?,?,?,?,?,?)"
_HEAD = "SELECT line FROM kw_audit ORDER BY seq DESC LIMIT 1"

#: One entry as it is re-chained: ts, kind, agent_id, session_id, data.
_Content = tuple[int, str, str | None, str | None, dict[str, Any]]
#: One row's insert parameters: seq, ts, kind, agent_id, session_id, line.
_Params = tuple[int, int, str, str | None, str | None, bytes]


class SqliteAuditBackend:
    """An :class:`~klockwork.core.audit.backend.AuditBackend` in one SQLite file.

    Thread-safe; one file may be shared by many processes. Appends use their
    own connection (so reads in this process never wait on another
    process's write lock); reads share a second one.

    Args:
        path: the database file (created with the ``kw_audit`` table if
            missing; other tables in it, such as the lease store's, are left alone).
        busy_timeout_ms: how long an append waits for another process's
            write lock before failing closed with StoreUnavailableError.
        rebase: what :meth:`append` does with a batch that does not continue
            the stored chain. False (default): raise AuditIntegrityError and
            write nothing. True: store it after the stored head, re-chained
            (new ``seq``, ``prev_hash``, ``hash`` and line; same ``ts``,
            ``kind``, ``agent_id``, ``session_id`` and ``data``, in the same
            order). A batch that does continue the chain is stored as given
            either way, so a single writer sees no difference. With rebase the
            seqs a log's ``record`` returns are only its own order, not the
            stored seqs (see the module docstring).

    Raises:
        StoreUnavailableError: the file cannot be opened as a database.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, busy_timeout_ms: int = 10_000, rebase: bool = False
    ) -> None:
        self.path = os.fspath(path)
        self.rebase = rebase
        self._busy_timeout_ms = busy_timeout_ms
        self._closed = False
        self._wlock = threading.Lock()  # guards _wconn (appends)
        self._rlock = threading.Lock()  # guards _rconn (reads)
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._guard = FileGuard(self.path)
        FileGuard.refuse_empty(self.path)
        try:
            with self._translated("create the audit table"):
                self._wconn = self._connect()
                self._wconn.executescript(AUDIT_SCHEMA)
                self._rconn = self._connect()
            self._guard.remember()
        except BaseException:
            self.close()
            raise

    # -- plumbing -------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        return connect(self.path, self._busy_timeout_ms)

    def _translated(self, doing: str) -> AbstractContextManager[None]:
        return translated(f"sqlite audit {self.path}", doing)

    def _closed_error(self) -> StoreUnavailableError:
        return StoreUnavailableError(f"sqlite audit backend {self.path} is closed")

    @contextmanager
    def _reader(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._rlock, self._translated(doing):
            if self._closed or self._rconn is None:
                raise self._closed_error()
            self._guard.check()
            yield self._rconn

    # -- writing ----------------------------------------------------------------
    def append(self, entries: Sequence[AuditEntry]) -> None:
        """Store ``entries`` in one transaction; they must continue the stored chain.

        The batch continues the chain when its seqs are consecutive, the
        first is the stored head's seq + 1 and its ``prev_hash`` is the
        stored head's hash (GENESIS_HASH on an empty table). This is checked
        inside the transaction, after the write lock is taken.

        Raises:
            AuditIntegrityError: the batch does not continue the chain (and
                ``rebase`` is off, or its own seqs are not consecutive);
                nothing was written.
            StoreUnavailableError: SQLite failed, or the backend is closed.
        """
        if not entries:
            return
        if isinstance(entries, EntryBatch):
            rows = entries.rows
            first, last, prev = rows[0][0], rows[-1][0], rows[0][6]
            params: list[_Params] = [(r[0], r[1], r[2], r[3], r[4], r[8]) for r in rows]
        else:
            first, last, prev = entries[0].seq, entries[-1].seq, entries[0].prev_hash
            params = [
                (e.seq, e.ts, e.kind, e.agent_id, e.session_id, e.stored_line()) for e in entries
            ]
        with self._wlock, self._translated("append audit entries"):
            conn = self._wconn
            if self._closed or conn is None:
                raise self._closed_error()
            self._guard.check()
            if last != first + len(params) - 1:
                raise AuditIntegrityError(f"entries {first}..{last} are not consecutive seqs")
            conn.execute("BEGIN IMMEDIATE")
            try:
                head_seq, head_hash = _head_point(conn)
                if first != head_seq + 1 or prev != head_hash:
                    if not self.rebase:
                        raise AuditIntegrityError(
                            f"entries {first}..{last} (prev_hash {prev[:12]}...) do not continue "
                            f"a chain that ends at seq {head_seq} (hash {head_hash[:12]}...)"
                        )
                    params = _rechain(_contents(entries), head_seq, head_hash)
                conn.executemany(_INSERT, params)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- reading ----------------------------------------------------------------
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
        """See :meth:`~klockwork.core.audit.backend.AuditBackend.read`."""
        where = ["seq > ?"]
        args: list[Any] = [after_seq]
        for column, value in (("kind", kind), ("agent_id", agent_id), ("session_id", session_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        args.append(max(0, limit))
        sql = f"SELECT line FROM kw_audit WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?"
        with self._reader("read audit entries") as conn:
            found = [r[0] for r in conn.execute(sql, args).fetchall()]
        return [entry_from_line(line) for line in found]

    def lines(self, after_seq: int, limit: int) -> list[bytes]:
        """See :meth:`~klockwork.core.audit.backend.AuditBackend.lines`."""
        with self._reader("read audit lines") as conn:
            rows = conn.execute(
                "SELECT line FROM kw_audit WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, max(0, limit)),
            ).fetchall()
        return [r[0] for r in rows]

    def dropped(self) -> tuple[int, str] | None:
        """None: a SQLite chain keeps every entry (see ``AuditBackend.dropped``)."""
        return None

    def head(self) -> AuditEntry | None:
        """See :meth:`~klockwork.core.audit.backend.AuditBackend.head`.

        Raises:
            AuditIntegrityError: the stored head is not an audit entry.
        """
        with self._reader("read the audit head") as conn:
            row = conn.execute(_HEAD).fetchone()
        if row is None:
            return None
        try:
            return AuditEntry.from_line(row[0])
        except (ValueError, RecursionError) as exc:
            raise AuditIntegrityError(f"the stored head is not an audit entry: {exc}") from None

    def head_point(self) -> tuple[int, str]:
        """The stored head's seq and hash ((0, genesis) when empty), read without parsing data.

        Raises:
            AuditIntegrityError: the stored head is not an audit entry.
        """
        with self._reader("read the audit head") as conn:
            return _head_point(conn)

    # -- sealing (entries a durable store wrote with their decisions) --------------
    def seal_pending(self, limit: int = 1024) -> int:
        """Seal up to ``limit`` pending entries onto the chain, in seq order; return how many.

        A SQLite store writes each audit entry with its decision, unsealed,
        in ``kw_audit_pending`` (its data as canonical JSON text and its final
        seq). Sealing chains them: in one ``BEGIN IMMEDIATE`` transaction the
        stored head is read, the pending entries after it are hashed exactly
        as :mod:`klockwork.core.audit.chain` specifies and moved into
        ``kw_audit``. Any process may seal, any number of times: the result is
        the same chain (entries left by a crashed process are sealed by the
        next one that seals).

        Raises:
            AuditIntegrityError: the stored head is not an audit entry (nothing sealed).
            StoreUnavailableError: SQLite failed, or the backend is closed.
        """
        with self._wlock, self._translated("seal audit entries"):
            conn = self._wconn
            if self._closed or conn is None:
                raise self._closed_error()
            self._guard.check()
            # A read first (WAL readers never wait): no write lock when nothing waits.
            if conn.execute("SELECT 1 FROM kw_audit_pending LIMIT 1").fetchone() is None:
                return 0
            conn.execute("BEGIN IMMEDIATE")
            try:
                rows = conn.execute(
                    "SELECT seq, ts, kind, agent_id, session_id, data FROM kw_audit_pending "
                    "ORDER BY seq LIMIT ?",
                    (max(1, limit),),
                ).fetchall()
                if not rows:
                    conn.execute("ROLLBACK")
                    return 0
                _, head_hash = _head_point(conn)
                flat: list[Any] = []
                for seq, ts, kind, agent_id, session_id, data in rows:
                    flat += (seq, ts, kind, agent_id, session_id, data, TEXT)
                sealed, _ = encode_batch(flat, head_hash)
                conn.executemany(_INSERT, [(r[0], r[1], r[2], r[3], r[4], r[8]) for r in sealed])
                conn.execute("DELETE FROM kw_audit_pending WHERE seq <= ?", (rows[-1][0],))
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        return len(rows)

    def write_in(self, conn: sqlite3.Connection, rows: Sequence[JournalRow]) -> bool:
        """Write entries, unsealed, inside the caller's write transaction (returns False).

        They go to ``kw_audit_pending`` and commit with the decision;
        :meth:`seal_pending` chains them later, in seq order, many per
        transaction. (Sealing each decision's entries in its own transaction
        was measured slower: about +45 µs per entry on SQLite, as every
        commit then rewrites the chain's pages and indexes.)
        """
        conn.executemany(
            "INSERT INTO kw_audit_pending (seq, ts, kind, agent_id, session_id, data) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        return False

    def pending(self) -> int:
        """How many entries wait to be sealed."""
        with self._reader("count pending audit entries") as conn:
            count: int = conn.execute("SELECT count(*) FROM kw_audit_pending").fetchone()[0]
        return count

    def first_column_mismatch(self) -> int | None:
        """The first seq whose query columns disagree with its (hashed) line, or None.

        ``query`` filters on the ``ts``, ``kind``, ``agent_id`` and
        ``session_id`` columns; only the line is covered by the chain, so
        verification checks that the columns say what the line says (an
        edited column would hide an entry from queries).
        """
        with self._reader("check audit columns") as conn:
            row = conn.execute(
                "SELECT seq FROM kw_audit WHERE json_valid(line) AND ("
                "json_extract(line, '$.ts') IS NOT ts OR "
                "json_extract(line, '$.kind') IS NOT kind OR "
                "json_extract(line, '$.agent_id') IS NOT agent_id OR "
                "json_extract(line, '$.session_id') IS NOT session_id) "
                "ORDER BY seq LIMIT 1"
            ).fetchone()
        return None if row is None else int(row[0])

    def close(self) -> None:
        """Close both connections (after any append in progress). Idempotent."""
        with self._wlock, self._rlock:
            self._closed = True
            conns = [c for c in (self._wconn, self._rconn) if c is not None]
            self._wconn = self._rconn = None
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):  # closing is best effort
                conn.close()


# --------------------------------------------------------------------------- re-chaining
def _contents(entries: Sequence[AuditEntry]) -> list[_Content]:
    """What re-chaining keeps of each entry (everything but seq and the hashes)."""
    if isinstance(entries, EntryBatch):
        return [(r[1], r[2], r[3], r[4], json.loads(r[5])) for r in entries.rows]
    return [(e.ts, e.kind, e.agent_id, e.session_id, e.data) for e in entries]


def _rechain(contents: list[_Content], head_seq: int, head_hash: str) -> list[_Params]:
    """Insert parameters sealing ``contents`` as one block after the head (seq, hash).

    Pure: the bodies, seal and lines are made by
    :func:`~klockwork.core.audit.chain.entry_body`,
    :func:`~klockwork.core.audit.chain.block_seal` and
    :func:`~klockwork.core.audit.chain.canonical_json`, exactly as the
    chain's specification says, so the result verifies like any other block.
    """
    objects: list[dict[str, Any]] = [
        {
            "agent_id": agent_id,
            "data": data,
            "kind": kind,
            "prev_hash": head_hash,
            "seq": head_seq + offset,
            "session_id": session_id,
            "ts": ts,
        }
        for offset, (ts, kind, agent_id, session_id, data) in enumerate(contents, 1)
    ]
    seal = block_seal(head_hash, [entry_body(fields) for fields in objects])
    return [
        (
            o["seq"],
            o["ts"],
            o["kind"],
            o["agent_id"],
            o["session_id"],
            canonical_json(o | {"hash": seal}),
        )
        for o in objects
    ]


_HEAD_HASH = re.compile(rb'"hash":"([0-9a-f]{64})"')


def _head_point(conn: sqlite3.Connection) -> tuple[int, str]:
    """The stored head's (seq, hash) without parsing its data; (0, genesis) when empty."""
    row = conn.execute("SELECT seq, line FROM kw_audit ORDER BY seq DESC LIMIT 1").fetchone()
    if row is None:
        return 0, GENESIS_HASH
    seq, line = row
    line = bytes(line) if isinstance(line, (bytes, memoryview)) else str(line).encode()
    # The top-level "hash" is the last one in a canonical line (data comes
    # before it; strings after it cannot hold an unescaped quote).
    cut = line.rfind(b'"hash":"')
    found = _HEAD_HASH.match(line, cut) if cut >= 0 else None
    if found is None:
        raise AuditIntegrityError(f"the stored head (seq {seq}) is not an audit entry")
    return int(seq), found.group(1).decode()
