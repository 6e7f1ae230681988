"""The audit chain on Redis: one chain for every machine, sealed by whoever comes next.

Entries are written with their decisions, unsealed (the *journal*): a seq
from one counter and the entry's canonical data text, in the same script
or transaction as the decision, so a decision a caller has seen always has
its entry. Sealing — hashing as :mod:`klockwork.core.audit.chain` specifies
— happens after, off the caller's thread, by any process: it reads the
head, hashes the pending entries after it, and appends them with a
compare-and-set on the head (a sealer that lost the race re-reads and
carries on from the new head). Every machine sees, verifies and exports
the same chain.

Keys (in the store's namespace, so in one Cluster slot):

==========================  ===============================================
``audit:seq``               the last seq handed out (``INCR``)
``audit:pending``           hash: seq → ``[ts, kind, agent_id, session_id, data text]``
``audit:lines``             list: the sealed lines, in seq order (index = seq - 1)
``audit:head``              ``"<seq>:<hash>"`` of the last sealed entry
``audit:by:<field>:<v>``    sorted sets of seqs, for queries by kind, agent, session
==========================  ===============================================

Sealed lines are never rewritten or pruned here: the chain is the
evidence (export it to archive it). What survives a Redis restart is what
the server's persistence keeps (see docs/stores.md).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from typing import Any

from klockwork.core.audit.backend import entry_from_line
from klockwork.core.audit.chain import GENESIS_HASH, AuditEntry
from klockwork.core.audit.encode import TEXT, encode_batch
from klockwork.core.errors import AuditIntegrityError, StoreUnavailableError
from klockwork.core.stores.base import JournalRow
from klockwork.core.stores.redis.connection import RedisConnection
from klockwork.core.stores.redis.journal import JOURNAL_LUA, journal_args

__all__ = ["RedisAuditBackend"]

_APPEND = (
    JOURNAL_LUA
    + """
return journal(KEYS[1], KEYS[2], ARGV)
"""
)

# KEYS: head, lines, pending, then the index keys of the batch's entries.
# ARGV: expected head, new head, count n, first seq, the SHA-1 of the pending
# rows hashed (joined by newlines), then the n lines, then for each index
# key: how many of the batch's seqs it takes, and those seqs. One call per
# key, not per entry: a batch's entries share most of them.
# Returns n, 0 if the head moved, -1 if the pending rows are not the ones
# hashed (a restart lost them and seqs were handed out again): read again.
_SEAL = """
if (redis.call('GET', KEYS[1]) or '0:') ~= ARGV[1] then return 0 end
local n, first = tonumber(ARGV[3]), tonumber(ARGV[4])
local seqs = {}
for i = 1, n do seqs[i] = first + i - 1 end
local rows = redis.call('HMGET', KEYS[3], unpack(seqs))
for i = 1, n do if not rows[i] then return -1 end end
if redis.sha1hex(table.concat(rows, '\\n')) ~= ARGV[5] then return -1 end
redis.call('RPUSH', KEYS[2], unpack(ARGV, 6, 5 + n))
redis.call('HDEL', KEYS[3], unpack(seqs))
local a = 6 + n
for k = 4, #KEYS do
  local count = tonumber(ARGV[a])
  local members = {}
  for i = 1, count do
    members[2 * i - 1] = ARGV[a + i]
    members[2 * i] = ARGV[a + i]
  end
  redis.call('ZADD', KEYS[k], unpack(members))
  a = a + count + 1
end
redis.call('SET', KEYS[1], ARGV[2])
return n
"""

_EMPTY_HEAD = "0:"
#: The most entries one seal takes (its script unpacks an index's seqs as
#: score-member pairs, and Lua's stack holds some 8 000 values).
_MAX_BATCH = 2048
_READ_BATCH = 512


def _head(raw: bytes | None) -> tuple[int, str]:
    if not raw or raw == b"0:":
        return 0, GENESIS_HASH
    seq, _, digest = raw.decode().partition(":")
    if not seq.isdigit() or len(digest) != 64:
        raise AuditIntegrityError(f"the stored audit head is damaged: {raw[:80]!r}")
    return int(seq), digest


class RedisAuditBackend:
    """An :class:`~klockwork.core.audit.backend.AuditBackend` on Redis, sealing a journal.

    Thread-safe, shared by every process of a namespace. Appending a sealed
    batch (:meth:`append`) is refused: on Redis every entry comes through
    the journal (:meth:`journal` or a store script) and :meth:`seal_pending`.
    """

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn
        key = conn.key
        self._seq, self._pending = key("audit", "seq"), key("audit", "pending")
        self._lines, self._head_key = key("audit", "lines"), key("audit", "head")
        self._seal_lock = threading.Lock()  # one sealer per process at a time
        self._closed = False

    @property
    def _client(self) -> Any:
        # redis-py types replies as bytes | str; with decode_responses off they are bytes.
        return self._conn.sync

    def index_key(self, field: str, value: str) -> str:
        """The sorted set of the seqs whose ``field`` is ``value``."""
        return self._conn.key("audit", "by", field, value)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailableError(f"redis audit backend {self._conn.url} is closed")

    # -- writing ------------------------------------------------------------------
    def journal(self, rows: Sequence[JournalRow]) -> list[int]:
        """Write entries unsealed, in one script of their own; return their seqs."""
        self._check_open()
        with self._conn.translated("record audit entries"):
            seqs = self._conn.script(_APPEND)(
                keys=[self._seq, self._pending], args=journal_args(rows)
            )
        return [int(s) for s in seqs]

    def append(self, entries: Sequence[AuditEntry]) -> None:
        """Refused: entries reach a Redis chain through the journal only."""
        raise AuditIntegrityError(
            "a Redis audit chain is written through its journal (seal_pending), not appended to"
        )

    def seal_pending(self, limit: int = 1024) -> int:
        """Seal up to ``limit`` pending entries onto the chain, in seq order; return how many.

        Any process may seal, any number of times: the result is the same
        chain. Sealing loses a race to another sealer by re-reading the head.
        On a read-only replica nothing is sealed (0): the primary's
        processes seal, and the replica serves the chain as replicated.

        Raises:
            AuditIntegrityError: the stored head is damaged (nothing sealed).
            StoreUnavailableError: Redis cannot answer.
        """
        import redis

        self._check_open()
        with self._seal_lock, self._conn.translated("seal audit entries"):
            client = self._client
            while True:
                # The head and the last seq handed out in one round trip: only
                # the seqs between are asked for (an idle check costs one call).
                raw_head, raw_last = client.mget(self._head_key, self._seq)
                head_seq, head_hash = _head(raw_head)
                last = min(int(raw_last or 0), head_seq + max(1, min(limit, _MAX_BATCH)))
                if last <= head_seq:
                    return 0
                wanted = list(range(head_seq + 1, last + 1))
                found = client.hmget(self._pending, wanted)
                rows: list[tuple[int, list[Any]]] = []
                raws: list[bytes] = []
                for seq, raw in zip(wanted, found, strict=True):
                    if raw is None:
                        break  # pending seqs are contiguous from the head
                    rows.append((seq, json.loads(raw)))
                    raws.append(raw)
                if not rows:
                    return 0
                flat: list[Any] = []
                for seq, (ts, kind, agent_id, session_id, data) in rows:
                    flat += (seq, ts, kind, agent_id, session_id, data, TEXT)
                sealed, seal = encode_batch(flat, head_hash)
                indexes: dict[tuple[str, str], list[int]] = {}
                for seq, (_, kind, agent_id, session_id, _) in rows:
                    for field in (("kind", kind), ("agent", agent_id), ("session", session_id)):
                        if field[1] is not None:
                            indexes.setdefault(field, []).append(seq)
                keys = [self._head_key, self._lines, self._pending]
                keys += [self.index_key(*field) for field in indexes]
                expected = raw_head.decode() if raw_head else _EMPTY_HEAD
                # The rows' digest: the script seals only the rows hashed here.
                digest = hashlib.sha1(b"\n".join(raws), usedforsecurity=False).hexdigest()
                args: list[Any] = [expected, f"{rows[-1][0]}:{seal}", len(rows), rows[0][0]]
                args.append(digest)
                args += [r[8] for r in sealed]
                for seqs in indexes.values():
                    args.append(len(seqs))
                    args += seqs
                try:
                    done = self._conn.script(_SEAL)(keys=keys, args=args)
                except redis.ReadOnlyError:
                    # A replica seals nothing: its primary's processes do, and
                    # readers here see the chain as far as they sealed it.
                    return 0
                if done > 0:
                    return len(rows)
                # Another process sealed meanwhile (carry on from its head), or
                # the rows changed under us (a restart): read them again.

    # -- reading ------------------------------------------------------------------
    def lines(self, after_seq: int, limit: int) -> list[bytes]:
        """See :meth:`~klockwork.core.audit.backend.AuditBackend.lines`."""
        self._check_open()
        if limit <= 0:
            return []
        with self._conn.translated("read audit lines"):
            got: list[bytes] = self._client.lrange(
                self._lines, max(0, after_seq), max(0, after_seq) + limit - 1
            )
        return got

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
        self._check_open()
        wanted = [("kind", kind), ("agent", agent_id), ("session", session_id)]
        filters = [(f, v) for f, v in wanted if v is not None]
        out: list[AuditEntry] = []
        cursor = max(0, after_seq)
        while len(out) < limit:
            if filters:
                seqs, lines = self._indexed(filters[0], cursor)
            else:
                lines = self.lines(cursor, _READ_BATCH)
                seqs = list(range(cursor + 1, cursor + 1 + len(lines)))
            if not lines:
                break
            for seq, line in zip(seqs, lines, strict=True):
                cursor = seq
                if line is None:
                    continue
                entry = entry_from_line(line)
                if entry.seq != seq:
                    raise AuditIntegrityError(f"the audit line at seq {seq} says seq {entry.seq}")
                if (
                    (kind is None or entry.kind == kind)
                    and (agent_id is None or entry.agent_id == agent_id)
                    and (session_id is None or entry.session_id == session_id)
                    and (since is None or entry.ts >= since)
                ):
                    out.append(entry)
                    if len(out) >= limit:
                        break
        return out

    def _indexed(self, field: tuple[str, str], after: int) -> tuple[list[int], list[Any]]:
        """The next seqs of one index after ``after``, with their lines."""
        with self._conn.translated("query the audit trail"):
            client = self._client
            raw = client.zrangebyscore(
                self.index_key(*field), f"({after}", "+inf", start=0, num=_READ_BATCH
            )
            seqs = [int(s) for s in raw]
            if not seqs:
                return [], []
            pipe = client.pipeline(transaction=False)
            for seq in seqs:
                pipe.lindex(self._lines, seq - 1)
            return seqs, pipe.execute()

    def dropped(self) -> tuple[int, str] | None:
        """None: a Redis chain keeps every entry (see ``AuditBackend.dropped``)."""
        return None

    def head(self) -> AuditEntry | None:
        """The last sealed entry, or None."""
        seq, _ = self.head_point()
        if seq == 0:
            return None
        with self._conn.translated("read the audit head"):
            line = self._client.lindex(self._lines, seq - 1)
        if line is None:
            raise AuditIntegrityError(f"the stored audit head names seq {seq}, which is missing")
        try:
            return entry_from_line(line)
        except (ValueError, RecursionError) as exc:
            raise AuditIntegrityError(f"the stored head is not an audit entry: {exc}") from None

    def head_point(self) -> tuple[int, str]:
        """The sealed head's (seq, hash); (0, genesis) when nothing is sealed."""
        self._check_open()
        with self._conn.translated("read the audit head"):
            return _head(self._client.get(self._head_key))

    def pending(self) -> int:
        """How many entries wait to be sealed."""
        self._check_open()
        with self._conn.translated("count pending audit entries"):
            count: int = self._client.hlen(self._pending)
        return count

    def first_column_mismatch(self) -> int | None:
        """The first sealed seq missing from the query index its line names, or None.

        Queries read the indexes; only the lines are covered by the chain, so
        verification checks that no index hides an entry.
        """
        self._check_open()
        after = 0
        while True:
            lines = self.lines(after, _READ_BATCH)
            if not lines:
                return None
            with self._conn.translated("check the audit indexes"):
                pipe = self._client.pipeline(transaction=False)
                for line in lines:
                    entry = entry_from_line(line)
                    for field, value in (
                        ("kind", entry.kind),
                        ("agent", entry.agent_id),
                        ("session", entry.session_id),
                    ):
                        if value is not None:
                            pipe.zscore(self.index_key(field, value), entry.seq)
                scores = iter(pipe.execute())
            for line in lines:
                entry = entry_from_line(line)
                fields = (entry.kind, entry.agent_id, entry.session_id)
                if any(next(scores) is None for v in fields if v is not None):
                    return entry.seq
            after += len(lines)

    def close(self) -> None:
        """Stop answering (the connection belongs to the store). Idempotent."""
        self._closed = True
