"""SQLite store: several processes on one machine share one database file.

Every decision runs inside one ``BEGIN IMMEDIATE`` transaction: the write
lock is taken *before* the facts are read, so two processes can never both
see a resource free and both be granted it. Single-row transitions
(release, revoke, heartbeat) are one ``UPDATE ... RETURNING`` statement,
atomic on its own. The database runs in WAL mode with
``synchronous=NORMAL``: a crash of the OS may lose the last commits, never
corrupt the file. sqlite3 errors are translated at this boundary into
:class:`~klockwork.StoreUnavailableError` (fail closed).

Waiters in other processes learn of releases by polling (an adaptive 1-50 ms
interval, see :mod:`klockwork.core.leases.manager`); waiters in this process are
also woken at once by the in-process notification.
"""

from __future__ import annotations

import itertools
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

from pydantic import BaseModel

from klockwork.core.errors import (
    InvalidRequestError,
    LeaseNotFoundError,
)
from klockwork.core.leases.rules import ParsedIntent, descendant_range, judge
from klockwork.core.model import (
    AgentInfo,
    LeaseRecord,
    LeaseState,
    Predicate,
    Reservation,
    VerdictStatus,
)
from klockwork.core.stores.base import (
    DEFAULT_RETAIN,
    RETAINED_KINDS,
    AcquireOutcome,
    AcquireRequest,
    FenceState,
    JournalSection,
    Store,
    Transition,
    check_retain,
    fence_with_floor,
    raise_unless_active,
    record_status,
    refuse_revoked,
)
from klockwork.core.stores.sqlite_bus import SqliteBus
from klockwork.core.stores.sqlite_io import (
    AUDIT_SCHEMA,
    BUS_SCHEMA,
    PRUNE_EVERY,
    STORE_SCHEMA,
    ConnectionPool,
    FileGuard,
    Section,
    WriterTurns,
    begin_immediate,
    fence_floor,
    prune_leases,
    prune_records,
    read_reservations,
    translated,
)
from klockwork.core.validation import check_int, check_path

__all__ = ["SqliteStore"]


_COLS = (
    "lease_id, agent_id, session_id, resource, predicate, priority, fencing_token, "
    "acquired_at, expires_at, ttl_ms, state, reason"
)
_PREDICATE = {p.value: p for p in Predicate}
_STATE = {s.value: s for s in LeaseState}

_M = TypeVar("_M", bound=BaseModel)
_T = TypeVar("_T")


def _record(row: Sequence[Any]) -> LeaseRecord:
    return LeaseRecord(
        row[0],
        row[1],
        row[2],
        row[3],
        _PREDICATE[row[4]],
        row[5],
        row[6],
        row[7],
        row[8],
        row[9],
        _STATE[row[10]],
        row[11],
    )


class SqliteStore(SqliteBus, Store):
    """A store in one SQLite file, safe for many threads and processes.

    Args:
        path: the database file (created with its schema if missing).
        busy_timeout_ms: how long a transaction waits for another process's
            write lock before failing closed with StoreUnavailableError.
        retain_inactive: how many of the newest leases (ended ones are
            pruned beyond it; active ones never), settled gate outcomes and
            decided approvals the file keeps. Pruning runs in batches, every
            ``PRUNE_EVERY`` (1024) grants or new records. The audit chain is never
            pruned: it is the evidence (export it to archive it).
    """

    cross_process = True
    blocking_io = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout_ms: int = 10_000,
        retain_inactive: int = DEFAULT_RETAIN,
    ) -> None:
        super().__init__()
        self.path = check_path(path)
        self._retain = check_retain(retain_inactive)
        self._new_records = {kind: itertools.count(1) for kind in RETAINED_KINDS}
        #: How long a transaction waits for another process's write lock (ms).
        self.busy_timeout_ms = check_int(busy_timeout_ms, "busy_timeout_ms", high=3_600_000)
        self._local = threading.local()  # the transaction this thread runs, if any
        self._writers = WriterTurns(self.path, busy_timeout_ms)
        FileGuard.refuse_empty(self.path)
        self._pool = ConnectionPool(self.path, busy_timeout_ms)
        with self._translated("create its schema"), self._pool.connection() as conn:
            conn.executescript(STORE_SCHEMA + AUDIT_SCHEMA + BUS_SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(kw_agents)")}
            if "revoked_at" not in columns:  # a file made by klockwork 0.1
                conn.execute("ALTER TABLE kw_agents ADD COLUMN revoked_at INTEGER")
        self._pool.guard.remember()

    # -- plumbing -------------------------------------------------------------
    def _translated(self, doing: str) -> AbstractContextManager[None]:
        return translated(f"sqlite store {self.path}", doing)

    @contextmanager
    def _tx(self, doing: str, deadline: float | None = None) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; rolled back on any error.

        Audit entries recorded on this thread meanwhile (see
        :meth:`journal_section`) are written in it: committed with the
        decision, or rolled back with it.
        """
        local = self._local
        if getattr(local, "section", None) is not None:
            raise RuntimeError("klockwork: nested store transactions")  # a bug, not input
        if deadline is None:
            deadline = getattr(local, "deadline", None)
        turn = self._writers.turn(doing, deadline)  # this process's writers queue here
        with self._translated(doing), turn, self._pool.connection() as conn:
            begin_immediate(conn, self.busy_timeout_ms, deadline)
            section = local.section = Section(conn, self.journal)
            try:
                yield conn
            except BaseException:
                local.section = None
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            local.section = None
            try:
                section.finish()
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        if section.deferred and self.journal is not None:
            self.journal.committed()

    durable_journal = True

    @contextmanager
    def waiting_until(self, deadline: float | None) -> Iterator[None]:
        """See :meth:`Store.waiting_until`."""
        local = self._local
        before, local.deadline = getattr(local, "deadline", None), deadline
        try:
            yield
        finally:
            local.deadline = before

    def journal_section(self) -> JournalSection | None:
        """The transaction this thread runs, if any (audit entries then join it)."""
        section: Section | None = getattr(self._local, "section", None)
        return section

    def append_journal(
        self, entries: Sequence[tuple[int, str, str | None, str | None, Any, Any]]
    ) -> list[int]:
        """Store audit entries in one transaction of their own; returns their seqs."""
        with self._tx("record audit entries"):
            section = self._local.section
            return [section.append(*entry) for entry in entries]

    def _one(self, doing: str, sql: str, args: Sequence[Any]) -> list[Any]:
        """Run one auto-committed statement and fetch its rows."""
        with self._translated(doing), self._pool.connection() as conn:
            return conn.execute(sql, args).fetchall()

    # -- agents -------------------------------------------------------------------
    def register_agent(self, agent_id: str, priority: int | None, now_ms: int) -> AgentInfo:
        with self._tx("register an agent") as conn:
            row = conn.execute(
                "SELECT priority, registered_at FROM kw_agents WHERE agent_id = ?", (agent_id,)
            ).fetchone()
            if row is None:
                prio = now_ms if priority is None else priority
                conn.execute(
                    "INSERT INTO kw_agents (agent_id, priority, registered_at) VALUES (?, ?, ?)",
                    (agent_id, prio, now_ms),
                )
                return AgentInfo(agent_id=agent_id, priority=prio, registered_at=now_ms)
            if priority is None or priority == row[0]:
                return AgentInfo(agent_id=agent_id, priority=row[0], registered_at=row[1])
            busy = conn.execute(
                "SELECT 1 FROM kw_leases INDEXED BY kw_leases_active "
                "WHERE state = 'ACTIVE' AND agent_id = ? AND expires_at > ? "
                "UNION ALL SELECT 1 FROM kw_reservations WHERE agent_id = ? AND expires_at > ? "
                "LIMIT 1",
                (agent_id, now_ms, agent_id, now_ms),
            ).fetchone()
            if busy:
                raise InvalidRequestError(
                    "priority",
                    priority,
                    f"agent {agent_id!r} holds or waits for a lease; its priority "
                    f"({row[0]}) cannot change until it releases",
                )
            conn.execute(
                "UPDATE kw_agents SET priority = ? WHERE agent_id = ?", (priority, agent_id)
            )
            return AgentInfo(agent_id=agent_id, priority=priority, registered_at=row[1])

    def revoke_agent(self, agent_id: str, now_ms: int) -> None:
        with self._tx("revoke an agent") as conn:
            conn.execute(
                "INSERT INTO kw_agents (agent_id, priority, registered_at, revoked_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (agent_id) DO UPDATE SET "
                "revoked_at = coalesce(kw_agents.revoked_at, excluded.revoked_at)",
                (agent_id, now_ms, now_ms, now_ms),
            )

    def get_agent(self, agent_id: str) -> AgentInfo | None:
        rows = self._one(
            "read an agent",
            "SELECT priority, registered_at, revoked_at FROM kw_agents WHERE agent_id = ?",
            (agent_id,),
        )
        if not rows:
            return None
        priority, registered_at, revoked_at = rows[0]
        return AgentInfo(
            agent_id=agent_id,
            priority=priority,
            registered_at=registered_at,
            revoked_at=revoked_at,
        )

    # -- acquire ----------------------------------------------------------------
    def try_acquire(self, request: AcquireRequest) -> AcquireOutcome:
        agent_id, session_id = request.agent_id, request.session_id
        with self._tx("decide a lease request", request.deadline) as conn:
            # The time is read once the write lock is ours: a request that
            # waited for the lock is judged, and its lease dated, by now.
            if self.clock is not None:
                request = request._replace(now_ms=self.clock.now_ms())
            now = request.now_ms
            row = conn.execute(
                "SELECT priority, revoked_at FROM kw_agents WHERE agent_id = ?", (agent_id,)
            ).fetchone()
            if row is None:
                priority = now
                conn.execute(
                    "INSERT INTO kw_agents (agent_id, priority, registered_at) VALUES (?, ?, ?)",
                    (agent_id, now, now),
                )
            else:
                priority = row[0]
                if row[1] is not None:
                    refuse_revoked(
                        AgentInfo(agent_id=agent_id, priority=priority, registered_at=0,
                                  revoked_at=row[1])
                    )  # fmt: skip
            candidates = [self._overlapping(conn, i) for i in request.intents]
            reservations = read_reservations(conn, now, request.intents)
            j = judge(
                agent_id, session_id, priority, request.intents, candidates, reservations, now
            )
            if j.expired:
                conn.executemany(
                    "UPDATE kw_leases SET state = 'EXPIRED' "
                    "WHERE lease_id = ? AND state = 'ACTIVE'",
                    [(r.lease_id,) for r in j.expired],
                )
                for r in j.expired:
                    r.state = LeaseState.EXPIRED
            granted: list[LeaseRecord] = []
            if j.status is VerdictStatus.GRANTED:
                expires = now + request.ttl_ms
                for i in request.intents:
                    lease_id = secrets.token_hex(16)
                    cur = conn.execute(
                        "INSERT INTO kw_leases (lease_id, agent_id, session_id, resource, "
                        "predicate, priority, acquired_at, expires_at, ttl_ms, state) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'ACTIVE')",
                        (
                            lease_id,
                            agent_id,
                            session_id,
                            i.key,
                            i.predicate.value,
                            priority,
                            now,
                            expires,
                            request.ttl_ms,
                        ),
                    )
                    token = cur.lastrowid
                    assert token is not None
                    granted.append(
                        LeaseRecord(
                            lease_id,
                            agent_id,
                            session_id,
                            i.key,
                            i.predicate,
                            priority,
                            token,
                            now,
                            expires,
                            request.ttl_ms,
                        )
                    )
                if request.clear_reservation:
                    self._unreserve(conn, agent_id, session_id)
                if granted[-1].fencing_token % PRUNE_EVERY == 0:
                    prune_leases(conn, self._retain)
            elif request.reserve_ms:  # a blocked acquire (WAIT or backing off after DIE)
                self._unreserve(conn, agent_id, session_id)
                until = now + request.reserve_ms
                conn.executemany(
                    "INSERT OR REPLACE INTO kw_reservations VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (agent_id, session_id, i.key, i.predicate.value, priority, until)
                        for i in request.intents
                    ],
                )
            outcome = AcquireOutcome(j.status, granted, j.blockers, j.wait_time_ms)
            hooks = self.lease_hooks
            if hooks is not None:  # its audit entries commit with it, or neither does
                self._hook_expired(j.expired, now)
                hooks.decided(request, outcome)
        self._report_expired(j.expired)
        return outcome

    @staticmethod
    def _overlapping(conn: sqlite3.Connection, intent: ParsedIntent) -> list[LeaseRecord]:
        keys = (intent.key, *intent.ancestors)
        marks = ", ".join("?" * len(keys))
        # INDEXED BY: the planner would otherwise pick kw_leases_fence and scan
        # every lease ever granted on the resource (released ones included).
        sql = (
            f"SELECT {_COLS} FROM kw_leases INDEXED BY kw_leases_active "
            f"WHERE state = 'ACTIVE' AND resource IN ({marks})"
        )
        args: tuple[Any, ...] = keys
        span = descendant_range(intent.key)
        if span is not None:
            sql += (
                f" UNION ALL SELECT {_COLS} FROM kw_leases INDEXED BY kw_leases_active "
                "WHERE state = 'ACTIVE' AND resource >= ? AND resource < ?"
            )
            args = (*keys, *span)
        return [_record(r) for r in conn.execute(sql, args)]

    @staticmethod
    def _unreserve(conn: sqlite3.Connection, agent_id: str, session_id: str) -> None:
        conn.execute(
            "DELETE FROM kw_reservations WHERE agent_id = ? AND session_id = ?",
            (agent_id, session_id),
        )

    # -- lease transitions -------------------------------------------------------
    def _end(
        self, lease_ids: Sequence[str], state: str, reason: str | None, now_ms: int
    ) -> list[LeaseRecord | None]:
        """End each active lease of ``lease_ids`` (one ``UPDATE`` each) in one transaction."""
        out: list[LeaseRecord | None] = []
        expired: list[LeaseRecord] = []
        what = "a lease" if len(lease_ids) == 1 else "leases"
        with self._tx(f"mark {what} {state.lower()}") as conn:
            for lease_id in lease_ids:
                rows = conn.execute(
                    "UPDATE kw_leases SET "
                    "state = CASE WHEN expires_at <= ? THEN 'EXPIRED' ELSE ? END, "
                    "reason = CASE WHEN expires_at <= ? THEN reason ELSE ? END "
                    f"WHERE lease_id = ? AND state = 'ACTIVE' RETURNING {_COLS}",
                    (now_ms, state, now_ms, reason, lease_id),
                ).fetchall()
                rec = _record(rows[0]) if rows else None
                if rec is not None and rec.state is LeaseState.EXPIRED:
                    self._hook_expired([rec], now_ms)
                    expired.append(rec)
                    rec = None
                elif rec is not None and self.lease_hooks is not None:
                    self.lease_hooks.ended(f"lease.{state.lower()}", rec, now_ms)
                out.append(rec)
        self._report_expired(expired)
        return out

    def release(self, lease_id: str, now_ms: int) -> LeaseRecord | None:
        return self._end((lease_id,), "RELEASED", None, now_ms)[0]

    def release_many(self, lease_ids: Sequence[str], now_ms: int) -> list[LeaseRecord | None]:
        """:meth:`release` of each id, in one transaction."""
        return self._end(lease_ids, "RELEASED", None, now_ms) if lease_ids else []

    def revoke(self, lease_id: str, reason: str, now_ms: int) -> LeaseRecord | None:
        return self._end((lease_id,), "REVOKED", reason, now_ms)[0]

    def heartbeat(self, lease_id: str, ttl_ms: int | None, now_ms: int) -> LeaseRecord:
        rows = self._one(
            "renew a lease",
            "UPDATE kw_leases SET expires_at = ? + COALESCE(?, ttl_ms) "
            f"WHERE lease_id = ? AND state = 'ACTIVE' AND expires_at > ? RETURNING {_COLS}",
            (now_ms, ttl_ms, lease_id, now_ms),
        )
        if rows:
            return _record(rows[0])
        rec = self.get_lease(lease_id, now_ms)  # why not: marks it expired if due
        if rec is None:
            raise LeaseNotFoundError(lease_id, f"no lease {lease_id!r}")
        raise_unless_active(rec)
        raise LeaseNotFoundError(lease_id, f"lease {lease_id!r} changed during renewal")

    def get_lease(self, lease_id: str, now_ms: int) -> LeaseRecord | None:
        with self._tx("expire a lease") as conn:
            rows = conn.execute(
                "UPDATE kw_leases SET state = 'EXPIRED' "
                f"WHERE lease_id = ? AND state = 'ACTIVE' AND expires_at <= ? RETURNING {_COLS}",
                (lease_id, now_ms),
            ).fetchall()
            expired = [_record(r) for r in rows]
            self._hook_expired(expired, now_ms)
        if expired:
            self._report_expired(expired)
            return expired[0]
        rows = self._one(
            "read a lease", f"SELECT {_COLS} FROM kw_leases WHERE lease_id = ?", (lease_id,)
        )
        return _record(rows[0]) if rows else None

    # -- queries ---------------------------------------------------------------------
    def list_leases(
        self, agent_id: str | None, resource: ParsedIntent | None, now_ms: int
    ) -> list[LeaseRecord]:
        with self._translated("list leases"), self._pool.connection() as conn:
            if resource is not None:
                pool = self._overlapping(conn, resource)
            else:
                pool = [
                    _record(r)
                    for r in conn.execute(f"SELECT {_COLS} FROM kw_leases WHERE state = 'ACTIVE'")
                ]
        return sorted(
            (
                r
                for r in pool
                if r.expires_at > now_ms and (agent_id is None or r.agent_id == agent_id)
            ),
            key=lambda r: r.fencing_token,
        )

    def list_reservations(self, now_ms: int) -> list[Reservation]:
        with self._translated("list the waiters"), self._pool.connection() as conn:
            return read_reservations(conn, now_ms)

    def fence_state(self, intent: ParsedIntent, token: int, now_ms: int) -> FenceState:
        keys = (intent.key, *intent.ancestors)
        marks = ", ".join("?" * len(keys))
        with self._translated("read fencing tokens"), self._pool.connection() as conn:
            newest = conn.execute(
                f"SELECT max(fencing_token) FROM kw_leases WHERE resource IN ({marks})", keys
            ).fetchone()[0]
            span = descendant_range(intent.key)
            if span is not None:  # a newer grant inside a directory supersedes it too
                below = conn.execute(
                    "SELECT max(fencing_token) FROM kw_leases WHERE resource >= ? AND resource < ?",
                    span,
                ).fetchone()[0]
                if below is not None and (newest is None or below > newest):
                    newest = below
            row = conn.execute(
                "SELECT resource FROM kw_leases WHERE fencing_token = ? "
                "AND state = 'ACTIVE' AND expires_at > ?",
                (token, now_ms),
            ).fetchone()
            floor = fence_floor(conn)
        active = row is not None and row[0] == intent.key
        live = row is not None and row[0] in keys  # on the resource or a directory above it
        return FenceState(fence_with_floor(newest, floor, live), active)

    def unreserve(self, agent_id: str, session_id: str) -> None:
        # A withdrawal waits for the write lock only briefly (MIN_LOCK_WAIT_MS):
        # a reservation left behind expires by itself.
        with self._tx("drop a reservation", time.monotonic()) as conn:
            self._unreserve(conn, agent_id, session_id)

    def sweep(self, now_ms: int) -> list[LeaseRecord]:
        with self._tx("sweep expired leases") as conn:
            rows = conn.execute(
                "UPDATE kw_leases SET state = 'EXPIRED' "
                f"WHERE state = 'ACTIVE' AND expires_at <= ? RETURNING {_COLS}",
                (now_ms,),
            ).fetchall()
            conn.execute("DELETE FROM kw_reservations WHERE expires_at <= ?", (now_ms,))
            expired = [_record(r) for r in rows]
            self._hook_expired(expired, now_ms)
        self._report_expired(expired)
        return expired

    # -- records ---------------------------------------------------------------
    def update_record(
        self, kind: str, key: str, model: type[_M], transition: Transition[_M, _T]
    ) -> _T:
        with self._tx(f"update a {kind} record") as conn:
            row = conn.execute(
                "SELECT body FROM kw_records WHERE kind = ? AND key = ?", (kind, key)
            ).fetchone()
            current = None if row is None else model.model_validate_json(row[0])
            new, result = transition(current)
            if new is None:
                if current is not None:
                    conn.execute("DELETE FROM kw_records WHERE kind = ? AND key = ?", (kind, key))
            elif new is not current:
                conn.execute(
                    "INSERT INTO kw_records (kind, key, status, body) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (kind, key) DO UPDATE SET "
                    "status = excluded.status, body = excluded.body",
                    (kind, key, record_status(new), new.model_dump_json()),
                )
                counter = self._new_records.get(kind) if current is None else None
                if counter is not None and next(counter) % PRUNE_EVERY == 0:
                    prune_records(conn, kind, model, self._retain)
            return result

    def get_record(self, kind: str, key: str, model: type[_M]) -> _M | None:
        rows = self._one(
            f"read a {kind} record",
            "SELECT body FROM kw_records WHERE kind = ? AND key = ?",
            (kind, key),
        )
        return model.model_validate_json(rows[0][0]) if rows else None

    def list_records(self, kind: str, model: type[_M], status: str | None = None) -> list[_M]:
        if status is None:
            rows = self._one(
                f"list {kind} records",
                "SELECT body FROM kw_records WHERE kind = ? ORDER BY rowid",
                (kind,),
            )
        else:
            rows = self._one(
                f"list {kind} records",
                "SELECT body FROM kw_records WHERE kind = ? AND status = ? ORDER BY rowid",
                (kind, status),
            )
        return [model.model_validate_json(r[0]) for r in rows]

    @property
    def _conns(self) -> list[sqlite3.Connection]:
        """The connections kept open between operations (at most the pool's ``max_idle``)."""
        return self._pool.idle

    def close(self) -> None:
        self._pool.close()
        self._close_bus()
