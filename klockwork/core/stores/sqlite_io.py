"""What every SQLite part of klockwork shares: connections, errors, the audit tables.

The lease store (:mod:`.sqlite`) and the audit trail's sealer
(:mod:`klockwork.core.audit.sqlite`) use one file: they open connections
the same way (:func:`connect`), translate sqlite3's errors the same way
(:func:`translated`, :data:`ERROR_MAP`) and share the audit tables
(:data:`AUDIT_SCHEMA`). A store transaction writes the audit entries of its
decisions through a :class:`Section`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from klockwork.core.errors import KlockworkError, StoreUnavailableError
from klockwork.core.leases.rules import ParsedIntent, ancestors, overlaps
from klockwork.core.model import Predicate, Reservation
from klockwork.core.stores.base import JournalRow, in_play

if TYPE_CHECKING:
    from klockwork.core.stores.base import AuditJournal

__all__ = [
    "AUDIT_SCHEMA",
    "BUS_SCHEMA",
    "ERROR_MAP",
    "ConnectionPool",
    "MIN_LOCK_WAIT_MS",
    "FileGuard",
    "Section",
    "WriterTurns",
    "begin_immediate",
    "read_reservations",
    "connect",
    "translated",
    "WAL_SIZE_LIMIT",
    "PRUNE_EVERY",
    "STORE_SCHEMA",
    "fence_floor",
    "prune_leases",
    "prune_records",
]

#: The audit trail's tables, in the store's file (the store writes unsealed
#: entries; :mod:`klockwork.core.audit.sqlite` seals and reads them).
AUDIT_SCHEMA = """
-- The audit trail: entries are written with their decisions (unsealed),
-- then sealed into kw_audit, in seq order, by whichever process comes next
-- (see klockwork.core.audit.sqlite).
CREATE TABLE IF NOT EXISTS kw_audit (
    seq        INTEGER PRIMARY KEY,  -- from 1, gapless
    ts         INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    agent_id   TEXT,
    session_id TEXT,
    line       BLOB NOT NULL         -- the entry's sealed line, verbatim
);
CREATE INDEX IF NOT EXISTS kw_audit_kind ON kw_audit(kind, seq);
CREATE INDEX IF NOT EXISTS kw_audit_agent ON kw_audit(agent_id, seq);
CREATE INDEX IF NOT EXISTS kw_audit_session ON kw_audit(session_id, seq);
CREATE TABLE IF NOT EXISTS kw_audit_pending (
    seq        INTEGER PRIMARY KEY,  -- continues kw_audit's seqs
    ts         INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    agent_id   TEXT,
    session_id TEXT,
    data       TEXT NOT NULL         -- canonical JSON of the entry's data
);
"""

#: sqlite3 error → klockwork error, most specific first. Every failure to
#: answer is a StoreUnavailableError: the caller gets no grant (fail closed).
ERROR_MAP: tuple[tuple[type[sqlite3.Error], type[KlockworkError]], ...] = (
    (sqlite3.OperationalError, StoreUnavailableError),  # locked, I/O, missing table
    (sqlite3.ProgrammingError, StoreUnavailableError),  # closed connection
    (sqlite3.DatabaseError, StoreUnavailableError),  # corrupt or not a database
    (sqlite3.Error, StoreUnavailableError),
)


#: The tables of the lease and record store (the audit chain has its own, below).
STORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS kw_agents (
    agent_id      TEXT PRIMARY KEY,
    priority      INTEGER NOT NULL,
    registered_at INTEGER NOT NULL,
    revoked_at    INTEGER            -- NULL while the agent stands
);
CREATE TABLE IF NOT EXISTS kw_leases (
    fencing_token INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: strictly increasing
    lease_id      TEXT NOT NULL UNIQUE,
    agent_id      TEXT NOT NULL,
    session_id    TEXT NOT NULL,
    resource      TEXT NOT NULL,
    predicate     TEXT NOT NULL,
    priority      INTEGER NOT NULL,
    acquired_at   INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    ttl_ms        INTEGER NOT NULL,
    state         TEXT NOT NULL,
    reason        TEXT
);
CREATE INDEX IF NOT EXISTS kw_leases_active ON kw_leases(resource) WHERE state = 'ACTIVE';
CREATE INDEX IF NOT EXISTS kw_leases_fence ON kw_leases(resource, fencing_token);
CREATE TABLE IF NOT EXISTS kw_records (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    status TEXT,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE INDEX IF NOT EXISTS kw_records_status ON kw_records(kind, status);
CREATE TABLE IF NOT EXISTS kw_meta (  -- named numbers (the fence floor)
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS kw_reservations (
    agent_id   TEXT NOT NULL,
    session_id TEXT NOT NULL,
    resource   TEXT NOT NULL,
    predicate  TEXT NOT NULL,
    priority   INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (agent_id, session_id, resource, predicate)
);
"""


#: The bus's tables, in the store's file.
BUS_SCHEMA = """
CREATE TABLE IF NOT EXISTS kw_bus_channels (
    channel    TEXT PRIMARY KEY,
    last_seq   INTEGER NOT NULL,  -- the newest seq given out (0: none yet)
    max_len    INTEGER,           -- its own retention (NULL: the default's)
    max_age_ms INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kw_bus_messages (
    channel      TEXT NOT NULL,
    seq          INTEGER NOT NULL,  -- contiguous from the oldest retained to last_seq
    id           TEXT NOT NULL,     -- '<seq in hex>-<128 random bits>'
    payload      BLOB NOT NULL,     -- JSON bytes
    published_at INTEGER NOT NULL,
    visible_at   INTEGER NOT NULL,
    key          TEXT,              -- its idempotency key, if any
    PRIMARY KEY (channel, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS kw_bus_keys
    ON kw_bus_messages(channel, key) WHERE key IS NOT NULL;
CREATE TABLE IF NOT EXISTS kw_bus_groups (
    channel        TEXT NOT NULL,
    grp            TEXT NOT NULL,
    visibility_ms  INTEGER NOT NULL,
    max_deliveries INTEGER NOT NULL,
    created_at     INTEGER NOT NULL,
    cursor         INTEGER NOT NULL,  -- every seq <= cursor was handed out (or trimmed)
    PRIMARY KEY (channel, grp)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kw_bus_deliveries (
    channel      TEXT NOT NULL,
    grp          TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    consumer     TEXT NOT NULL,           -- '': a delayed message scheduled, held by nobody yet
    attempt      INTEGER NOT NULL,
    delivered_at INTEGER NOT NULL,
    deadline     INTEGER NOT NULL,         -- redelivered by the first read after it
    acked        INTEGER NOT NULL DEFAULT 0,  -- 1: done (such rows only above the cursor)
    last_error   TEXT,
    PRIMARY KEY (channel, grp, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kw_bus_due
    ON kw_bus_deliveries(channel, grp, deadline) WHERE acked = 0;
"""


#: Retention prunes once per this many grants (leases) or new records (per process).
PRUNE_EVERY = 1024


def prune_leases(conn: sqlite3.Connection, retain: int) -> None:
    """Delete ended leases older than the newest ``retain``; raise the fence floor.

    Runs inside the caller's write transaction. Rows on, above or below a
    resource with an active lease stay (a live lease's token is judged by
    its whole history); the floor is the newest token deleted (see
    ``stores.base.fence_with_floor``).
    """
    row = conn.execute(
        "SELECT fencing_token FROM kw_leases ORDER BY fencing_token DESC LIMIT 1 OFFSET ?",
        (retain,),
    ).fetchone()
    if row is None:
        return
    live = {r for (r,) in conn.execute("SELECT resource FROM kw_leases WHERE state = 'ACTIVE'")}
    above_live = {a for r in live for a in ancestors(r)}
    doomed = [
        (token,)
        for token, resource in conn.execute(
            "SELECT fencing_token, resource FROM kw_leases "
            "WHERE state != 'ACTIVE' AND fencing_token <= ?",
            row,
        )
        if resource not in live
        and resource not in above_live
        and not any(a in live for a in ancestors(resource))
    ]
    if not doomed:
        return
    conn.executemany("DELETE FROM kw_leases WHERE fencing_token = ?", doomed)
    conn.execute(
        "INSERT INTO kw_meta VALUES ('fence_floor', ?) "
        "ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)",
        (max(doomed)[0],),
    )


def prune_records(conn: sqlite3.Connection, kind: str, model: type[BaseModel], retain: int) -> None:
    """Delete ``kind`` records older than the newest ``retain`` that are no longer in play.

    In the caller's transaction; what is in play is decided as in memory
    (``stores.base.in_play``), the linked record's status read from its row.
    """
    row = conn.execute(
        "SELECT rowid FROM kw_records WHERE kind = ? ORDER BY rowid DESC LIMIT 1 OFFSET ?",
        (kind, retain),
    ).fetchone()
    if row is None:
        return

    def status_of(linked_kind: str, key: str) -> str | None:
        found = conn.execute(
            "SELECT status FROM kw_records WHERE kind = ? AND key = ?", (linked_kind, key)
        ).fetchone()
        return None if found is None else found[0]

    old = conn.execute(
        "SELECT key, body FROM kw_records WHERE kind = ? AND rowid <= ?", (kind, row[0])
    ).fetchall()
    doomed = [
        (kind, key) for key, body in old if not in_play(model.model_validate_json(body), status_of)
    ]
    conn.executemany("DELETE FROM kw_records WHERE kind = ? AND key = ?", doomed)


def fence_floor(conn: sqlite3.Connection) -> int:
    """The newest fencing token retention deleted (0 if none)."""
    row = conn.execute("SELECT value FROM kw_meta WHERE name = 'fence_floor'").fetchone()
    return int(row[0]) if row else 0


#: The size (bytes) the WAL file is truncated back to after a checkpoint.
WAL_SIZE_LIMIT = 16 << 20


def connect(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    """A connection as every klockwork SQLite part uses one.

    WAL (readers never block the writer), ``synchronous=NORMAL``,
    transactions issued explicitly (``BEGIN IMMEDIATE``), and a busy timeout
    after which a write lock held by another process fails closed.
    """
    conn = sqlite3.connect(
        path,
        timeout=busy_timeout_ms / 1000,
        isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
        check_same_thread=False,  # used under our own locks, from any thread
    )
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        # After a checkpoint, truncate the WAL back to this size: without it
        # the file stays as large as the largest burst of writes ever was.
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    except BaseException:
        conn.close()
        raise
    return conn


#: The shortest wait for the write lock, whatever the caller's deadline.
MIN_LOCK_WAIT_MS = 1000


def begin_immediate(
    conn: sqlite3.Connection, busy_timeout_ms: int, deadline: float | None = None
) -> None:
    """``BEGIN IMMEDIATE``: take the write lock, waiting at most until ``deadline``.

    ``deadline`` (``time.monotonic()``) is the caller's own: a request that
    gives up after one second must not wait ten for another process's lock.
    It never shortens the wait below :data:`MIN_LOCK_WAIT_MS`, so that a
    lock held for a moment by another writer (or this engine's audit
    sealer) does not fail a call made with ``timeout_s=0``.
    """
    left_ms = (
        busy_timeout_ms
        if deadline is None
        else max(MIN_LOCK_WAIT_MS, int((deadline - time.monotonic()) * 1000))
    )
    if left_ms >= busy_timeout_ms:
        conn.execute("BEGIN IMMEDIATE")
        return
    conn.execute(f"PRAGMA busy_timeout={left_ms}")
    try:
        conn.execute("BEGIN IMMEDIATE")
    finally:
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")


def read_reservations(
    conn: sqlite3.Connection, now_ms: int, intents: Sequence[ParsedIntent] | None = None
) -> list[Reservation]:
    """Live reservations; only those overlapping one of ``intents`` when given."""
    rows = conn.execute(
        "SELECT agent_id, session_id, resource, predicate, priority, expires_at "
        "FROM kw_reservations WHERE expires_at > ?",
        (now_ms,),
    ).fetchall()
    return [
        Reservation(r[0], r[1], r[2], Predicate(r[3]), r[4], r[5])
        for r in rows
        if intents is None or any(overlaps(r[2], i.key) for i in intents)
    ]


class WriterTurns:
    """This process's writers of one store file take turns before ``BEGIN IMMEDIATE``.

    Each is woken the moment the one before it commits, instead of meeting
    at SQLite's lock, whose busy handler sleeps 1, 2, 5 ... 100 ms between
    tries: under load (a server's worker threads) a thread could lose the
    lock there for a second while others came and went. Other processes
    still meet at SQLite's lock; the wait is bounded as ``begin_immediate``'s.
    """

    def __init__(self, path: str, busy_timeout_ms: int) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._lock = threading.Lock()

    @contextmanager
    def turn(self, doing: str, deadline: float | None) -> Iterator[None]:
        """Hold this thread's turn; :class:`StoreUnavailableError` if it does not come in time."""
        if deadline is None:
            wait_s = self._busy_timeout_ms / 1000
        else:
            wait_s = max(MIN_LOCK_WAIT_MS / 1000, deadline - time.monotonic())
        if not self._lock.acquire(timeout=wait_s):
            raise StoreUnavailableError(
                f"sqlite store {self._path} could not {doing}: "
                f"this process's other writers kept it busy for {wait_s:.1f} s"
            )
        try:
            yield
        finally:
            self._lock.release()


@contextmanager
def translated(what: str, doing: str) -> Iterator[None]:
    """Turn a sqlite3 error into klockwork's (:data:`ERROR_MAP`), saying what failed."""
    try:
        yield
    except sqlite3.Error as exc:
        for source, target in ERROR_MAP:
            if isinstance(exc, source):
                raise target(f"{what} could not {doing}: {exc}") from exc
        raise  # pragma: no cover - ERROR_MAP ends with sqlite3.Error


class Section:
    """Audit entries joining one store transaction (see ``SqliteStore._tx``).

    Each entry gets the next seq after every entry stored or pending at once
    (the write lock the transaction holds makes seqs gapless across
    processes); :meth:`finish`, just before the commit, writes them all in
    the transaction (into ``kw_audit_pending``, for the sealer): they
    commit with the decision, or roll back with it.
    """

    __slots__ = ("_conn", "_journal", "_next", "_rows", "count", "deferred")

    def __init__(self, conn: sqlite3.Connection, journal: AuditJournal | None) -> None:
        self._conn = conn
        self._journal = journal
        self._next = 0
        self._rows: list[JournalRow] = []
        self.count = 0
        self.deferred = False  # some entries were left for the sealer

    def append(
        self,
        ts: int,
        kind: str,
        agent_id: str | None,
        session_id: str | None,
        data: Any,
        how: Any,
    ) -> int:
        journal = self._journal
        if journal is None:
            raise StoreUnavailableError("no audit trail is attached to this store")
        text = journal.text(data, how)
        if not self._next:
            self._next = (
                1
                + self._conn.execute(
                    "SELECT max(coalesce((SELECT max(seq) FROM kw_audit), 0), "
                    "coalesce((SELECT max(seq) FROM kw_audit_pending), 0))"
                ).fetchone()[0]
            )
        seq = self._next
        self._rows.append((seq, ts, kind, agent_id, session_id, text))
        self._next = seq + 1
        self.count += 1
        return seq

    def finish(self) -> None:
        """Write the entries in the transaction (call right before its commit)."""
        if self._rows and self._journal is not None:
            self.deferred = not self._journal.write(self._conn, self._rows)
            self._rows = []


class FileGuard:
    """Notices that the database file is no longer the one that was opened.

    SQLite keeps using an open file after it was deleted or replaced on
    disk (or truncated): the engine would go on granting from a file no
    other process sees, while a new process starts a fresh store on the
    same path — two stores, each believing it is the one. Every borrowed
    connection is checked first: the path must still name the same file
    (device and inode) and the file must not have been emptied. Otherwise
    the store fails closed with :class:`~klockwork.StoreUnavailableError`,
    and recovers by itself if the file comes back.
    """

    __slots__ = ("_identity", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self._identity: tuple[int, int] | None = None

    @staticmethod
    def refuse_empty(path: str) -> None:
        """Refuse to start a store in a file that exists but is empty (truncated?)."""
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return  # a new store: SQLite creates the file
        except OSError as exc:
            raise StoreUnavailableError(f"sqlite store {path} cannot be read: {exc}") from None
        if size == 0:
            raise StoreUnavailableError(
                f"sqlite store {path} exists but is empty (0 bytes): it may have been "
                "truncated; refusing to start a new store over it (remove the file to start one)"
            )

    def remember(self) -> None:
        """Record the file now open as *the* store file."""
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)

    def check(self) -> None:
        """Raise unless the path still names the file that was opened, not emptied."""
        if self._identity is None:
            return
        try:
            st = os.stat(self.path)
        except OSError:
            raise StoreUnavailableError(
                f"sqlite store {self.path} was deleted or moved while open: refusing to "
                "answer from a file no other process sees"
            ) from None
        if (st.st_dev, st.st_ino) != self._identity:
            raise StoreUnavailableError(
                f"sqlite store {self.path} was replaced by another file while open"
            )
        if st.st_size == 0:
            raise StoreUnavailableError(f"sqlite store {self.path} was truncated while open")


class ConnectionPool:
    """A bounded set of connections to one file, lent one at a time (thread-safe).

    A thread borrows a connection for one operation or transaction and gives
    it back; at most ``max_idle`` stay open between operations, so threads
    that come and go leave no connection (and file descriptor) behind.
    """

    def __init__(self, path: str, busy_timeout_ms: int, *, max_idle: int = 8) -> None:
        self.path = path
        self.guard = FileGuard(path)
        self._busy_timeout_ms = busy_timeout_ms
        self._max_idle = max_idle
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """Borrow a connection (checked against :class:`FileGuard`) for the ``with`` block."""
        self.guard.check()
        with self._lock:
            if self._closed:
                raise StoreUnavailableError(f"sqlite store {self.path} is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = connect(self.path, self._busy_timeout_ms)
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:  # never lend a connection in the middle of something
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        finally:
            with self._lock:
                keep = not self._closed and len(self._idle) < self._max_idle
                if keep:
                    self._idle.append(conn)
            if not keep:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    @property
    def idle(self) -> list[sqlite3.Connection]:
        """The connections open between operations (a copy)."""
        with self._lock:
            return list(self._idle)

    def close(self) -> None:
        """Close the idle connections; borrowed ones close when given back. Idempotent."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
