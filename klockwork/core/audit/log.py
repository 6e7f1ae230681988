"""The hash-chained audit log: record on the hot path, hash and store in batches.

:class:`AuditLog` is what the engine exposes as ``kw.audit``. Its
:meth:`~AuditLog.record` only fixes the entry's place in the chain (its
``seq``) and queues it: no hashing, no JSON, no pydantic. Queued entries are
sealed in batches — converted to JSON, chained and appended to an
:class:`AuditBackend` — by whichever thread gets there first:

* a busy recording thread, through :meth:`~AuditLog.settle` (the lease
  manager calls it after each decision), once a few hundred have gathered;
* any reader (:meth:`~AuditLog.flush`, :meth:`~AuditLog.verify`,
  :meth:`~AuditLog.query`, :meth:`~AuditLog.export`,
  :meth:`~AuditLog.checkpoint`, :meth:`~AuditLog.close`), before it reads,
  so a reader always sees its own writes;
* a background writer thread, at most one linger (50 ms) after an entry was
  queued, so a quiet log does not keep entries unsealed.

Sealing on the thread that recorded costs less than handing the batch to
another thread: under the GIL the work is the same, but every hand-off
trades the interpreter and the CPU between threads. One sha256 seals each
batch as a block (see "Sealed blocks" in :mod:`klockwork.core.audit.chain`).

The chain format (which fields are hashed, how, and how odd data is made
JSON) is specified in :mod:`klockwork.core.audit.chain`; :func:`export_jsonl`
and :func:`verify_file` write and check it as JSON Lines.

Timeline of the ordering guarantee, with two recording threads::

    1. A: record() takes the lock, gets seq 7, queues (7, ...), releases.
    2. B: record() takes the lock, gets seq 8, queues (8, ...), releases.
    3. A: settle() takes the seal lock, takes [7, 8] under the lock, hashes
       7 then 8 outside it, stores them, releases the seal lock.
    4. B: query() takes the seal lock (after A), seals what is left, reads.

The queue is appended in the same critical section that assigns ``seq``, and
one seal lock orders the sealers, so the chain is gapless and in seq order
whatever the interleaving.

Recording allocates nothing the garbage collector tracks: the queue is one
flat list (:data:`~klockwork.core.audit.encode.PENDING_SLOTS` slots per
entry), not a tuple per entry, and the
lease manager hands over the store's own records
(:meth:`~AuditLog.record_grant`, :meth:`~AuditLog.record_end`). Tracked
objects alive in the queue while the garbage collector runs would be
promoted to its old generations and make full collections frequent.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from os import PathLike
from types import TracebackType
from typing import Any, NoReturn

from klockwork.core.audit.backend import AuditBackend, EntryBatch, MemoryAuditBackend
from klockwork.core.audit.canonical import INT_LIMIT
from klockwork.core.audit.chain import (
    AUDIT_KINDS,
    GENESIS_HASH,
    AuditEntry,
    Checkpoint,
    VerifyResult,
    sign_checkpoint,
)
from klockwork.core.audit.encode import ENDED, PENDING_SLOTS, TEXT, data_text, encode_batch
from klockwork.core.audit.paging import MAX_QUERY_LIMIT, AuditPage, decode_cursor, encode_cursor
from klockwork.core.audit.verify import ChainVerifier, verify_file
from klockwork.core.clock import Clock, SystemClock
from klockwork.core.errors import (
    AuditIntegrityError,
    InvalidRequestError,
    KlockworkError,
    StoreUnavailableError,
)
from klockwork.core.model import GovernanceEvent, LeaseRecord
from klockwork.core.validation import (
    INT64_MAX,
    check_identity,
    check_int,
    check_key,
    check_path,
)

__all__ = [
    "AuditBackend",
    "AuditLog",
    "AuditPage",
    "EntryBatch",
    "MemoryAuditBackend",
    "export_jsonl",
    "verify_file",
]

StrPath = str | PathLike[str]
_PAGE = 8192  # lines per backend read when verifying or exporting
# At most 1024 entries sealed as one block and appended per backend call (in
# queue slots). A backend may ask for smaller blocks (``block_limit``).
_CHUNK_SLOTS = 1024 * PENDING_SLOTS
# How long a woken writer waits for more entries before it seals the queue.
_LINGER_S = 0.05
# settle() seals on the caller's thread from this many queued entries.
_SEAL_AT_SLOTS = 256 * PENDING_SLOTS
_IDLE_EXIT_S = 30.0  # an idle writer thread ends; the next record starts a new one


#: How many times verify starts again when retention drops entries under it.
_VERIFY_ATTEMPTS = 5


class AuditLog:
    """The hash-chained audit log (``kw.audit``).

    Args:
        backend: where entries are stored (default: a new :class:`MemoryAuditBackend`).
            An existing chain in it is continued.
        clock: source of entry timestamps and checkpoint times.
        key: HMAC key; when set, :meth:`checkpoint` signs and :meth:`verify`
            requires a valid signature on the checkpoint it is given.

    Recording is cheap and never blocks on hashing or I/O. If the writer
    fails (the backend raises), the log fails closed: the error is kept and
    every later :meth:`record`, :meth:`flush` and reader raises
    :class:`StoreUnavailableError` (backend failure) or
    :class:`AuditIntegrityError` (the chain could not be built).
    """

    def __init__(
        self,
        backend: AuditBackend | None = None,
        *,
        clock: Clock | None = None,
        key: bytes | None = None,
    ) -> None:
        self._backend: AuditBackend = MemoryAuditBackend() if backend is None else backend
        self._clock: Clock = SystemClock() if clock is None else clock
        self._now_ms = self._clock.now_ms
        self._key = key
        limit = getattr(self._backend, "block_limit", None)
        self._chunk_slots = _CHUNK_SLOTS if limit is None else min(limit, 1024) * PENDING_SLOTS
        head_seq, self._head_hash = self._open_head()
        self._next_seq = head_seq + 1
        self._written_seq = self._next_seq - 1
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the writer waits here
        #: Held by whoever seals (a recording thread, a reader, the writer):
        #: batches reach the backend in seq order.
        self._seal_lock = threading.Lock()
        #: Entries recorded but not taken by the writer, flat: :data:`PENDING_SLOTS` each.
        self._pending: list[Any] = []
        #: True when record() must wake or start the writer (read on every record).
        self._wake_needed = True
        self._writer: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._error: tuple[type[KlockworkError], str, BaseException] | None = None
        #: True once closed or failed (one attribute read on every record).
        self._refusing = False

    def _open_head(self) -> tuple[int, str]:
        """The stored chain's head (seq, hash) this log continues."""
        head = self._backend.head()
        return (0, GENESIS_HASH) if head is None else (head.seq, head.hash)

    # ----------------------------------------------------------------- hot path
    def record(
        self,
        kind: str,
        agent_id: str | None,
        session_id: str | None,
        data: Any = None,
        *,
        ts: int | None = None,
    ) -> int:
        """Append one entry to the chain and return its seq (hashed and stored later).

        ``data`` is encoded now (later changes to it do not reach the trail).
        Any data is accepted; values that are not JSON are converted as
        documented in :mod:`klockwork.core.audit.chain`.

        Args:
            kind: one of :data:`~klockwork.core.audit.chain.AUDIT_KINDS`.
            agent_id: who acted, if known.
            session_id: the agent's session, if known.
            data: details of the decision.
            ts: epoch milliseconds (default: the log's clock, now).

        Raises:
            InvalidRequestError: ``kind`` is not an audit kind, ``ts`` not
                epoch milliseconds, an id not a valid identity, or ``data``
                that cannot be stored as text (too deeply nested, a lone
                surrogate); nothing was recorded.
            StoreUnavailableError: the log is closed, or its store cannot answer.
        """
        if not isinstance(kind, str) or kind not in AUDIT_KINDS:
            raise InvalidRequestError(
                "kind", kind, f"not an audit kind (one of {', '.join(sorted(AUDIT_KINDS))})"
            )
        if ts is None:
            ts = self._now_ms()
        elif ts.__class__ is not int or not 0 <= ts < INT_LIMIT:
            raise InvalidRequestError("ts", ts, "must be epoch milliseconds (an int from 0)")
        if agent_id is not None:
            check_identity(agent_id, "agent_id")
        if session_id is not None:
            check_identity(session_id, "session_id")
        return self._append(ts, kind, agent_id, session_id, data_text(data), TEXT)

    def record_grant(self, rec: LeaseRecord, ts: int) -> int:
        """Record that lease ``rec`` was granted at ``ts``; return the entry's seq.

        For klockwork's lease manager: the entry is ``lease.granted`` by
        ``rec``'s agent and session, its data what the granted
        :class:`~klockwork.core.model.Lease` snapshot's ``__audit_data__()``
        returns (:func:`~klockwork.core.audit.records.granted_data`). ``rec``
        is read when the entry is written except for ``expires_at``, which is
        read now; the other fields it records never change. ``ts`` is not
        checked (the caller's clock gives an int).

        Raises:
            StoreUnavailableError: the log is closed, or its writer failed.
        """
        return self._append(ts, "lease.granted", rec.agent_id, rec.session_id, rec, rec.expires_at)

    def record_end(self, kind: str, rec: LeaseRecord, ts: int) -> int:
        """Record that lease ``rec`` ended (``kind``) at ``ts``; return the entry's seq.

        For klockwork's lease manager: ``kind`` is ``lease.released``,
        ``lease.expired`` or ``lease.revoked`` (not checked) and ``rec`` the
        lease's final record, whose ``__audit_data__()`` is read when the
        entry is written. ``ts`` is not checked (the caller's clock gives an int).

        Raises:
            StoreUnavailableError: the log is closed, or its writer failed.
        """
        return self._append(ts, kind, rec.agent_id, rec.session_id, rec, ENDED)

    def _append(
        self, ts: int, kind: str, agent_id: str | None, session_id: str | None, data: Any, how: Any
    ) -> int:
        """Queue one entry in order and fix its seq (the hot path's whole share of the work).

        ``how`` says what ``data`` is (see :data:`~.encode.PENDING_SLOTS`).
        """
        lock = self._lock
        lock.acquire()  # acquire/try/finally costs less than `with` (zero-cost try)
        try:
            if self._refusing:
                self._raise_unusable()
            seq = self._next_seq
            self._next_seq = seq + 1
            self._pending += (seq, ts, kind, agent_id, session_id, data, how)
            if self._wake_needed:
                self._wake()
        finally:
            lock.release()
        return seq

    def listener(self, event: GovernanceEvent) -> None:
        """Record a :class:`~klockwork.core.model.GovernanceEvent` (an EventHub listener).

        Events whose kind is not an audit kind (e.g. ``approval.requested``)
        are not audited and are ignored.
        """
        if event.kind in AUDIT_KINDS:
            self.record(event.kind, event.agent_id, event.session_id, event.data, ts=event.ts)

    def _wake(self) -> None:  # under the lock
        if self._writer is None:
            writer = threading.Thread(target=self._run, name="klockwork-audit-writer", daemon=True)
            writer.start()  # if this raises, nothing changed: the next record tries again
            self._writer = writer
        else:
            self._work.notify()
        self._wake_needed = False

    def _raise_unusable(self) -> NoReturn:  # under the lock
        if self._error is not None:
            cls, message, cause = self._error
            raise cls(message) from cause
        raise StoreUnavailableError("the audit log is closed")

    # ----------------------------------------------------------------- sealing
    def settle(self) -> None:
        """Seal the queued entries now, on this thread, if enough have gathered.

        For callers on a hot path, outside any lock (the lease manager calls
        it after each decision): sealing a few hundred entries at a time on
        the recording thread costs less than handing them to the writer
        thread, whose every wake-up trades the GIL and the CPU. Does nothing
        (one length check) below the threshold. Never raises: a failure is
        kept, and the next :meth:`record` or reader raises it.
        """
        if len(self._pending) >= _SEAL_AT_SLOTS:
            with contextlib.suppress(KlockworkError):
                self._seal_pending(None)

    def _seal_pending(self, timeout_s: float | None) -> bool:
        """Hash and store every queued entry, in seq order, on this thread.

        Whoever seals holds ``_seal_lock`` from taking the queue until its entries
        are stored (so in seq order). False if ``timeout_s`` ran out first.

        Raises:
            StoreUnavailableError | AuditIntegrityError: the log failed (now or before).
        """
        sealing = self._seal_lock
        if not (sealing.acquire() if timeout_s is None else sealing.acquire(True, timeout_s)):
            return False
        try:
            lock = self._lock
            with lock:
                if self._error is not None:
                    self._raise_unusable()
                batch = self._pending
                self._pending = []
            prev = self._head_hash
            size = self._chunk_slots
            for start in range(0, len(batch), size):
                chunk = batch[start : start + size]
                try:
                    rows, head = encode_batch(chunk, prev)
                except Exception as exc:  # a bug: never lose it silently
                    self._fail(AuditIntegrityError, f"could not chain seq {chunk[0]}", exc)
                try:
                    self._backend.append(EntryBatch(rows))
                except Exception as exc:
                    integrity = isinstance(exc, AuditIntegrityError)
                    self._fail(
                        AuditIntegrityError if integrity else StoreUnavailableError,
                        f"the audit backend failed to store entries "
                        f"{rows[0][0]}..{rows[-1][0]}: {exc}",
                        exc,
                    )
                written = rows[-1][0]
                del rows, chunk
                prev = head
                with lock:
                    self._head_hash = head
                    self._written_seq = written
            del batch  # the recorded objects: free them now
            return True
        finally:
            sealing.release()

    # ----------------------------------------------------------------- writer thread
    def _run(self) -> None:
        """The writer: seals what recording threads left queued, at most one linger late."""
        lock = self._lock
        while True:
            with lock:
                while not self._pending:
                    if self._stopping:
                        self._writer = None
                        return
                    self._wake_needed = True
                    if not self._work.wait(_IDLE_EXIT_S) and not self._pending:
                        self._writer = None  # idle for long: the next record restarts one
                        return
                if not self._stopping:
                    # Linger to gather a batch: waking per entry would make the
                    # recording threads and this one trade the GIL on every
                    # record. Busy threads seal for themselves (settle), and
                    # readers seal before they read, so nobody waits for this.
                    self._work.wait(_LINGER_S)
                self._wake_needed = False
            try:
                self._seal_pending(None)
            except KlockworkError:
                with lock:
                    self._writer = None
                return

    def _fail(self, cls: type[KlockworkError], message: str, exc: BaseException) -> NoReturn:
        """Fail closed: keep the error (every later call raises it), and raise it."""
        with self._lock:
            self._error = (cls, message, exc)
            self._refusing = True
            self._writer = None
            self._raise_unusable()

    # ----------------------------------------------------------------- readers
    def flush(self, timeout_s: float | None = None) -> bool:
        """Store every entry recorded before this call (sealing them on this thread).

        Args:
            timeout_s: real seconds to wait at most for another thread that
                is sealing (None: no limit).

        Returns:
            True when written; False if ``timeout_s`` ran out first.

        Raises:
            StoreUnavailableError | AuditIntegrityError: the log failed.
        """
        with self._lock:
            target = self._next_seq - 1
            if self._error is not None:
                self._raise_unusable()
            if self._written_seq >= target:
                return True
        return self._seal_pending(timeout_s)

    def _ready(self) -> None:
        self.flush()
        if self._closed:
            raise StoreUnavailableError("the audit log is closed")

    def verify(self, against: Checkpoint | None = None) -> VerifyResult:
        """Verify the whole stored chain (after a flush).

        Args:
            against: a checkpoint taken earlier: also catches truncation and
                rewriting. With a ``key`` configured, its signature must verify.
        """
        if against is not None and not isinstance(against, Checkpoint):
            raise InvalidRequestError("against", against, "must be a Checkpoint or None")
        self._ready()
        for _ in range(_VERIFY_ATTEMPTS):
            result = self._verify_once(against)
            if result is not None:
                return result
        raise StoreUnavailableError("the audit log kept dropping entries while it was verified")

    def _verify_once(self, against: Checkpoint | None) -> VerifyResult | None:
        """One pass over the kept chain; None if retention dropped what it was about to read."""
        start = self.retained_from()
        verifier = ChainVerifier(against=against, key=self._key, start=start)
        after = 0 if start is None else start.seq
        while not verifier.failed or verifier.wants_more:
            lines = self._backend.lines(after, _PAGE)
            dropped = self._backend.dropped()
            if dropped is not None and dropped[0] > after:
                return None  # those lines began later than asked: start again
            verifier.feed_lines(lines, after + 1)
            if len(lines) < _PAGE:
                break
            after += len(lines)
        return verifier.result()

    def query(
        self,
        kind: str | None = None,
        agent_id: str | None = None,
        session_id: str | None = None,
        since: int | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> AuditPage:
        """Entries matching every given filter, oldest first, one page at a time.

        Args:
            kind: only this kind.
            agent_id: only this agent.
            session_id: only this session.
            since: only entries with ``ts >= since`` (epoch ms).
            cursor: ``next_cursor`` of the previous page.
            limit: page size, 1..1000.

        Raises:
            InvalidRequestError: a bad ``limit``, ``kind`` or ``cursor``.
        """
        if limit.__class__ is not int or not 1 <= limit <= MAX_QUERY_LIMIT:
            raise InvalidRequestError("limit", limit, f"must be an int from 1 to {MAX_QUERY_LIMIT}")
        if kind is not None and (not isinstance(kind, str) or kind not in AUDIT_KINDS):
            raise InvalidRequestError("kind", kind, "not an audit kind")
        for argument, value in (("agent_id", agent_id), ("session_id", session_id)):
            if value is not None:
                check_key(value, argument)
        if since is not None:
            check_int(since, "since", low=-INT64_MAX)
        after = 0 if cursor is None else decode_cursor(cursor)
        self._ready()
        rows = self._backend.read(
            after, limit + 1, kind=kind, agent_id=agent_id, session_id=session_id, since=since
        )
        more = len(rows) > limit
        rows = rows[:limit]
        return AuditPage(
            entries=rows, next_cursor=encode_cursor(rows[-1].seq) if more and rows else None
        )

    def iter_lines(self) -> Iterator[bytes]:
        """The stored lines of the whole chain, oldest first (after a flush).

        On a log that drops old entries (see :meth:`retained_from`), the
        lines of the retained tail.
        """
        self._ready()
        start = self.retained_from()
        after = 0 if start is None else start.seq
        while True:
            lines = self._backend.lines(after, _PAGE)
            yield from lines
            if len(lines) < _PAGE:
                return
            after += len(lines)

    def export(self, path: StrPath) -> int:
        """Write the chain as JSON Lines to ``path`` (see :func:`verify_file`).

        Returns:
            The number of entries written.

        Raises:
            InvalidRequestError: ``path`` is not a path, or cannot be opened
                for writing (no such directory, no permission...).
        """
        target = check_path(path)
        try:
            f = open(target, "wb")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            raise InvalidRequestError("path", path, f"cannot be written: {exc.strerror}") from exc
        count = 0
        with f:
            for line in self.iter_lines():
                f.write(line)
                f.write(b"\n")
                count += 1
        return count

    def retained_from(self) -> Checkpoint | None:
        """Where the kept chain starts, if retention dropped older entries; else None.

        An in-memory log keeps its newest entries only (``MemoryStore(
        audit_retain=...)``): this is the checkpoint of the last entry it
        dropped, signed when the log has a key. The kept entries link to it,
        so :meth:`verify` still proves them; pass it as ``start`` to
        :func:`verify_file` to verify an export of the tail.
        """
        self._ready()
        dropped = self._backend.dropped()
        if dropped is None:
            return None
        return self._signed(*dropped)

    def checkpoint(self) -> Checkpoint:
        """The current head (after a flush), signed when a key is configured."""
        self._ready()
        head = self._backend.head()
        return self._signed(0, GENESIS_HASH) if head is None else self._signed(head.seq, head.hash)

    def _signed(self, seq: int, hash_: str) -> Checkpoint:
        """A checkpoint of entry ``seq`` (hash ``hash_``), signed when there is a key."""
        signature = None if self._key is None else sign_checkpoint(self._key, seq, hash_)
        return Checkpoint(seq=seq, hash=hash_, ts=self._now_ms(), signature=signature)

    def close(self) -> None:
        """Flush, stop the writer and close the backend. Idempotent.

        Raises:
            StoreUnavailableError | AuditIntegrityError: the writer had failed
                (the backend is closed all the same).
        """
        try:
            if not self._closed:
                self.flush()
        finally:
            with self._lock:
                already, self._closed = self._closed, True
                self._refusing = True
                self._stopping = True
                self._work.notify()
                writer = self._writer
            if writer is not None and writer is not threading.current_thread():
                writer.join()
            if not already:
                self._backend.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- JSON Lines
def export_jsonl(entries: Iterable[AuditEntry], path: StrPath) -> int:
    """Write ``entries`` as JSON Lines: one canonical object (with ``hash``) per line.

    Returns:
        The number of lines written.
    """
    count = 0
    with open(path, "wb") as f:
        for entry in entries:
            f.write(entry.canonical_line())
            f.write(b"\n")
            count += 1
    return count
