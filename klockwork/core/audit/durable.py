"""The audit trail of a durable store: entries committed with their decisions, sealed after.

On a store that keeps state across crashes (SQLite, Redis), "the decision
committed" must mean "its audit entry committed too". So the entry is not
queued in memory: it is written by the decision's own transaction —
canonical data text and final ``seq``, no hash yet — into the store's
``kw_audit_pending`` table (:meth:`~klockwork.core.stores.base.Store.journal_section`);
on Redis, by the decision's own script into ``audit:pending``
(:mod:`klockwork.core.stores.redis.journal`). Hashing stays off the
caller's thread: a *sealer* chains pending entries into ``kw_audit`` (on
Redis ``audit:lines``) in seq order, many at a time, exactly as
:mod:`klockwork.core.audit.chain` specifies.

Timeline of the guarantees, with two processes A and B on one file::

    1. A grants a lease: one transaction stores the lease *and* entry 41
       (pending). A crash after the commit loses neither.
    2. B denies a gate: its transaction stores the record and entry 42.
       Seqs come from the write lock's holder, so they are gapless.
    3. A's sealer (woken by its commit) seals 41 and 42 — B's too: sealing
       is the same deterministic chain whoever does it.
    4. Had A crashed before 3, B's sealer (or any reader: ``verify``,
       ``query``, ``export``, ``checkpoint``, or a new engine) seals them.

Nothing here makes a failure sticky: an entry is durable once its decision
commits, so a sealer that cannot reach the store (locked, disk full) just
tries again; a caller is told about a failure only for its own call.
Readers first seal what is pending, so they see every committed decision.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

from klockwork.core.audit.backend import AuditBackend
from klockwork.core.audit.chain import GENESIS_HASH, Checkpoint, VerifyResult
from klockwork.core.audit.encode import data_text
from klockwork.core.audit.log import AuditLog
from klockwork.core.clock import Clock
from klockwork.core.errors import AuditIntegrityError, InvalidRequestError, StoreUnavailableError
from klockwork.core.stores.base import JournalRow, Store

__all__ = ["DurableAuditLog", "SealedChain", "sealed_chain_for"]

_log = logging.getLogger("klockwork")
_IDLE_EXIT_S = 30.0
#: How long the sealer lets commits gather before sealing them in one transaction.
_SEAL_DELAY_S = 0.05
_RETRY_S = 0.2
#: How many entries the sealer thread seals per call.
_SEAL_BATCH = 1024


class SealedChain(AuditBackend, Protocol):
    """The chain of a durable journal: sealed by anyone, read by everyone.

    :class:`~klockwork.core.audit.sqlite.SqliteAuditBackend` (the store's
    file) and ``RedisAuditBackend`` (the store's namespace).
    """

    def seal_pending(self, limit: int = 1024) -> int:
        """Seal up to ``limit`` pending entries, in seq order; how many were sealed."""

    def head_point(self) -> tuple[int, str]:
        """The sealed head's (seq, hash)."""

    def pending(self) -> int:
        """How many entries wait to be sealed."""

    def first_column_mismatch(self) -> int | None:
        """The first sealed seq that queries would misreport, or None."""


def sealed_chain_for(store: Store) -> SealedChain:
    """The sealed chain kept next to a durable store's state."""
    from klockwork.core.stores.sqlite import SqliteStore

    if isinstance(store, SqliteStore):
        from klockwork.core.audit.sqlite import SqliteAuditBackend

        return SqliteAuditBackend(store.path, busy_timeout_ms=store.busy_timeout_ms)
    connection = getattr(store, "redis_connection", None)
    if connection is not None:  # a RedisStore (imported only where redis is installed)
        from klockwork.core.audit.redis import RedisAuditBackend

        return RedisAuditBackend(connection)
    raise InvalidRequestError("store", store, "keeps no durable audit journal")


class DurableAuditLog(AuditLog):
    """``kw.audit`` over a store whose transactions write the audit entries themselves.

    Args:
        backend: the sealed chain next to the store's state (``store.sealed_audit()``).
        store: the store whose decisions write entries (it must keep a durable journal).
        clock, key: as for :class:`AuditLog`.
    """

    def __init__(
        self,
        backend: SealedChain,
        *,
        store: Store,
        clock: Clock | None = None,
        key: bytes | None = None,
    ) -> None:
        if not store.durable_journal:
            raise InvalidRequestError("store", store, "keeps no durable audit journal")
        self._journal_store = store
        self._sealer_lock = threading.Lock()
        self._seal_wanted = threading.Event()
        self._sealer: threading.Thread | None = None
        self._sealer_stop = False
        super().__init__(backend, clock=clock, key=key)
        self._sealed: SealedChain = backend
        store.journal = self
        self.committed()  # seal what earlier processes left pending

    def _open_head(self) -> tuple[int, str]:
        # The stored head is not read at open: seqs come from the store, and
        # a damaged head must not keep the engine (and its leases) from opening.
        return 0, GENESIS_HASH

    # -- recording: in the decision's transaction --------------------------------------
    def _append(
        self, ts: int, kind: str, agent_id: str | None, session_id: str | None, data: Any, how: Any
    ) -> int:
        if self._closed:
            raise StoreUnavailableError("the audit log is closed")
        store = self._journal_store
        section = store.journal_section()
        if section is not None:  # with the decision: both commit, or neither
            return section.append(ts, kind, agent_id, session_id, data, how)
        return store.append_journal([(ts, kind, agent_id, session_id, data, how)])[0]

    def text(self, data: Any, how: Any) -> str:
        """An entry's data as canonical JSON text (the store writes it with the decision)."""
        return data_text(data, how)

    def write(self, conn: Any, rows: Sequence[JournalRow]) -> bool:
        """Write a transaction's entries in it, pending (the sealer chains them).

        For a SQL store, whose transaction ``conn`` is; other stores write
        the rows in their own scripts.
        """
        write_in = getattr(self._sealed, "write_in", None)
        if write_in is None:
            raise TypeError(f"{type(self._sealed).__name__} takes no rows from a transaction")
        written: bool = write_in(conn, rows)
        return written

    def committed(self) -> None:
        """Entries were committed: have the sealer chain them (off the caller's thread)."""
        self._seal_wanted.set()
        with self._sealer_lock:
            if self._sealer is None and not self._sealer_stop:
                self._sealer = threading.Thread(
                    target=self._run_sealer, name="klockwork-audit-sealer", daemon=True
                )
                self._sealer.start()

    def _run_sealer(self) -> None:
        reported: str | None = None
        while True:
            if not self._seal_wanted.wait(_IDLE_EXIT_S):
                with self._sealer_lock:
                    if not self._seal_wanted.is_set():
                        self._sealer = None  # idle: the next commit starts one
                        return
            # Let commits gather: one seal transaction for many decisions, and
            # no write-lock window right behind each decision (a process
            # frozen just after a decision must not be holding the lock).
            time.sleep(_SEAL_DELAY_S)
            if self._sealer_stop:
                return
            self._seal_wanted.clear()
            try:
                # Full batches at once; a partial one means it caught up: what
                # was committed meanwhile gathers for the next round (sealing
                # each trickle at once would cost a few round trips per entry).
                while self._sealed.seal_pending(_SEAL_BATCH) >= _SEAL_BATCH:
                    pass
                reported = None
            except Exception as exc:  # the entries are durable: try again later
                if str(exc) != reported:
                    reported = str(exc)
                    _log.warning("klockwork: audit entries not sealed yet (will retry): %s", exc)
                self._seal_wanted.set()
                threading.Event().wait(_RETRY_S)

    # -- readers: seal first ---------------------------------------------------------------
    def flush(self, timeout_s: float | None = None) -> bool:
        """Seal every committed entry now, on this thread.

        Raises:
            StoreUnavailableError: the store cannot answer now (nothing is lost:
                the entries stay committed, pending).
            AuditIntegrityError: the stored chain's head is damaged.
        """
        if self._closed:
            raise StoreUnavailableError("the audit log is closed")
        while self._sealed.seal_pending():
            pass
        return True

    def verify(self, against: Checkpoint | None = None) -> VerifyResult:
        """Verify the stored chain, and that its query columns match their lines.

        Entries that cannot be sealed (a damaged head) are left pending and
        the damage is reported by the verification itself.
        """
        result = super().verify(against)
        bad = self._sealed.first_column_mismatch()
        if bad is not None and (result.valid or bad < (result.first_broken_seq or bad + 1)):
            return VerifyResult(
                valid=False,
                checked=max(0, min(result.checked, bad - 1)),
                head_seq=result.head_seq,
                head_hash=result.head_hash,
                first_broken_seq=bad,
                reason=(
                    f"entry {bad}'s stored columns (ts, kind, agent_id, session_id) do not "
                    "match its hashed line: edited outside the chain, so queries miss or "
                    "misreport it"
                ),
            )
        return result

    def _ready(self) -> None:
        # Readers seal what is committed first. A damaged head blocks sealing:
        # the entries stay pending, readers see the stored chain, and verify
        # reports the damage (a checkpoint, which vouches for the head, raises).
        with contextlib.suppress(AuditIntegrityError):
            self.flush()

    def checkpoint(self) -> Checkpoint:
        """The sealed head after sealing everything committed, signed when a key is set."""
        self.flush()
        return self._signed(*self._sealed.head_point())

    def close(self) -> None:
        """Seal what is committed (best effort), stop the sealer, close the backend."""
        if self._closed:
            return
        try:
            self.flush()
        except Exception:  # committed entries stay pending: the next opener seals them
            _log.warning("klockwork: audit entries left pending at close", exc_info=True)
        finally:
            with self._sealer_lock:
                self._sealer_stop = True
                sealer = self._sealer
            self._seal_wanted.set()
            if sealer is not None and sealer is not threading.current_thread():
                sealer.join(timeout=5)
            self._closed = True
            self._refusing = True
            if self._journal_store.journal is self:
                self._journal_store.journal = None
            self._backend.close()
