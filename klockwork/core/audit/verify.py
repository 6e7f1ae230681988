"""Verifying an audit chain: streaming, O(1) memory, over entries or stored lines.

The chain's format is specified in :mod:`klockwork.core.audit.chain`; this
module checks a sequence against it and names the first entry that breaks it
(an edited, removed, reordered or inserted entry, or — given a checkpoint — a
truncated chain or a checkpoint whose signature does not verify).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable
from os import PathLike
from typing import Any, TypeGuard

from klockwork.core.audit.chain import (
    GENESIS_HASH,
    HASHED_FIELDS,
    AuditEntry,
    Checkpoint,
    VerifyResult,
    entry_hash,
    sign_checkpoint,
)

__all__ = ["ChainVerifier", "verify_entries", "verify_file", "verify_lines"]

_sha256 = hashlib.sha256

# The tail of a canonical line after ``data``: everything there is fixed keys,
# hex, digits, a validated kind and a JSON string whose quotes are escaped, so
# the last ``,"hash":"`` of a canonical line is always the top-level one.
_HASH_KEY = b',"hash":"'
_TAIL = re.compile(
    rb',"hash":"([0-9a-f]{64})","kind":"[a-z._]+","prev_hash":"([0-9a-f]{64})",'
    rb'"seq":([1-9][0-9]{0,18}),"session_id":(?:null|"(?:[^"\\]|\\.)*"),"ts":-?[0-9]{1,19}\}'
)
_tail_match = _TAIL.fullmatch
_HEX = re.compile(r"[0-9a-f]{64}")
_LINE_KEYS = frozenset((*HASHED_FIELDS, "hash"))


class ChainVerifier:
    """Streaming verifier: feed entries in order, then read :meth:`result`.

    Memory is O(1) whatever the chain's length. After the first problem
    further input is ignored (the result names the first problem only).

    Args:
        against: a checkpoint the chain must reach, with exactly its hash.
        key: when given, ``against`` (and ``start``) must carry a signature
            that verifies with it (an unsigned or wrongly signed checkpoint
            is invalid).
        start: where the chain fed begins when it is a tail: the checkpoint
            of the last entry before it (an in-memory log's retention drops
            old entries and keeps that checkpoint). The first entry fed must
            link to it. A checkpoint ``against`` older than ``start`` cannot
            be compared (its entry is gone); the result says so.
    """

    __slots__ = (
        "_against",
        "_broken",
        "_checked",
        "_gap",
        "_prev_b",
        "_reason",
        "_seq",
        "_start",
    )

    def __init__(
        self,
        *,
        against: Checkpoint | None = None,
        key: bytes | None = None,
        start: Checkpoint | None = None,
    ) -> None:
        self._against = against
        self._start = start
        self._seq = 0 if start is None else start.seq
        self._prev_b = (GENESIS_HASH if start is None else start.hash).encode("ascii")
        self._checked = 0
        self._broken: int | None = None
        self._reason: str | None = None
        # A seq that jumped ahead: (expected, found). Missing, unless the next
        # entry is the expected one (then the two were swapped).
        self._gap: tuple[int, int] | None = None
        if against is not None and key is not None:
            if against.signature is None:
                self._fail(None, "the checkpoint is not signed, but a key was given")
            elif not _signed_by(against, key):
                self._fail(None, f"the checkpoint at seq {against.seq} has a bad signature")
        if start is not None and key is not None and not _signed_by(start, key):
            self._fail(None, f"the start checkpoint at seq {start.seq} is not signed with the key")
        if _disagree(against, start):
            self._fail(against.seq, f"entry {against.seq} does not match the checkpoint")

    @property
    def failed(self) -> bool:
        """True once a problem was found (further input is ignored)."""
        return self._reason is not None

    @property
    def wants_more(self) -> bool:
        """True when one more entry would tell a missing entry from a reordered one."""
        return self._gap is not None

    def _after_gap(self, seq: object) -> None:
        """The entry after a seq jump: is it the one that seemed missing?"""
        gap, self._gap = self._gap, None
        if gap is not None and seq == gap[0]:
            self._reason = (
                f"entries {gap[0]} and {gap[1]} are out of order "
                f"(entry {gap[1]} comes before entry {gap[0]}: reordered)"
            )

    def _fail(self, seq: int | None, reason: str) -> None:
        if self._reason is None:
            self._broken = seq
            self._reason = reason

    def _advance(self, seq: int, hash_b: bytes) -> None:
        self._seq = seq
        self._prev_b = hash_b
        self._checked += 1
        against = self._against
        if against is not None and seq == against.seq and hash_b != against.hash.encode():
            self._fail(seq, f"entry {seq} does not match the checkpoint (the log was rewritten)")

    def _link(self, seq: int, prev_hash: str, where: str) -> bool:
        expected = self._seq + 1
        if seq != expected:
            if seq > expected:
                self._fail(expected, f"entry {expected} is missing ({where} has seq {seq})")
                self._gap = (expected, seq)
            else:
                self._fail(seq, f"entry {seq} is out of order or repeated ({where})")
            return False
        if prev_hash.encode("utf-8", "surrogatepass") != self._prev_b:
            self._fail(seq, f"entry {seq} does not link to entry {seq - 1} (prev_hash differs)")
            return False
        return True

    def feed_entry(self, entry: AuditEntry, where: str | None = None) -> None:
        """Check the next entry, recomputing its hash from its fields."""
        if self._reason is not None:
            if self._gap is not None:
                self._after_gap(entry.seq)
            return
        where = where or f"entry at position {self._checked + 1}"
        if not self._link(entry.seq, entry.prev_hash, where):
            return
        try:
            ok = entry.compute_hash() == entry.hash
        except (TypeError, ValueError) as exc:  # data that is not JSON cannot be hashed
            self._fail(entry.seq, f"entry {entry.seq} cannot be hashed ({exc})")
            return
        if not ok:
            self._fail(entry.seq, f"entry {entry.seq} was modified (its hash does not match)")
            return
        self._advance(entry.seq, entry.hash.encode())

    def feed_line(self, line: bytes, lineno: int) -> None:
        """Check the next stored/exported line (``lineno`` is used in messages)."""
        if self._reason is not None:
            if self._gap is not None:
                self._after_gap(_seq_of(line))
            return
        cut = line.rfind(_HASH_KEY)
        m = _tail_match(line, cut) if cut > 0 else None
        if m is not None:
            hash_b, prev_b, seq_b = m.groups()
            seq = int(seq_b)
            if seq == self._seq + 1 and prev_b == self._prev_b:
                digest = _sha256(prev_b + line[:cut] + line[cut + 74 :]).hexdigest()
                if digest.encode() == hash_b:
                    self._advance(seq, hash_b)
                    return
        # Not canonical as written, or something is wrong: parse it properly.
        self._feed_parsed(line, lineno)

    def feed_lines(self, lines: Iterable[bytes], first_lineno: int = 1) -> None:
        """Check consecutive lines (no newlines) starting at line ``first_lineno``.

        Same result as :meth:`feed_line` on each, in a tight loop for the
        common case: canonical lines that verify. Any other line (and the
        checkpoint's own) goes through :meth:`feed_line`.
        """
        against = self._against
        check_at = -1 if against is None else against.seq
        sha, hash_key, kind_key = _sha256, _HASH_KEY, b'","kind":"'
        lineno = first_lineno - 1
        it = iter(lines)
        while self._reason is None:
            seq = start = self._seq
            prev_b = self._prev_b
            careful: bytes | None = None
            for line in it:
                seq += 1
                # Canonical tail: ,"hash":"H","kind":"K","prev_hash":"P","seq":N,"session_id":...
                # Only its expected shape, with the expected P and N, is taken here.
                cut = line.rfind(hash_key)
                hash_b = line[cut + 9 : cut + 73]
                if (
                    cut <= 0
                    or seq == check_at
                    or not line.startswith(kind_key, cut + 73)
                    or not line.startswith(
                        b'","prev_hash":"%b","seq":%d,"session_id":' % (prev_b, seq),
                        line.find(b'"', cut + 83),
                    )
                    or line[-1] != 0x7D  # "}"
                    or sha(prev_b + line[:cut] + line[cut + 74 :]).hexdigest().encode() != hash_b
                ):
                    careful = line
                    seq -= 1
                    break
                prev_b = hash_b
            self._seq, self._prev_b = seq, prev_b
            self._checked += seq - start
            lineno += seq - start
            if careful is None:
                return
            lineno += 1
            self.feed_line(careful, lineno)
        if self._gap is not None:  # one more line tells missing from reordered
            after = next(it, None)
            if after is not None:  # else the next page (or the end: missing it is)
                self._after_gap(_seq_of(after))

    def _feed_parsed(self, line: bytes, lineno: int) -> None:
        expected = self._seq + 1
        try:
            obj = _strict_loads(line)
        except (ValueError, RecursionError) as exc:
            why = "nested too deeply" if isinstance(exc, RecursionError) else exc.__class__.__name__
            self._fail(expected, f"line {lineno} is not valid JSON ({why})")
            return
        except _DuplicateKey as exc:
            self._fail(
                expected, f"line {lineno} repeats the key {exc.key!r}: not a canonical entry"
            )
            return
        problem = _line_problem(obj)
        if problem is not None:
            self._fail(expected, f"line {lineno} is not an audit entry ({problem})")
            return
        seq: int = obj["seq"]
        if not self._link(seq, obj["prev_hash"], f"line {lineno}"):
            return
        try:
            ok = entry_hash(obj["prev_hash"], obj) == obj["hash"]
        except ValueError:  # NaN in a hand-edited line
            ok = False
        if not ok:
            self._fail(seq, f"entry {seq} (line {lineno}) was modified (its hash does not match)")
            return
        self._advance(seq, obj["hash"].encode())

    def result(self) -> VerifyResult:
        """The verdict on everything fed so far (call after the last entry)."""
        against = self._against
        if self._reason is None and against is not None and self._seq < against.seq:
            self._fail(
                self._seq + 1,
                f"the log ends at seq {self._seq}, before the checkpoint's seq {against.seq} "
                "(truncated)",
            )
        valid = self._reason is None
        start = self._start
        if valid:
            reason = f"{self._checked} entries verify (head seq {self._seq})"
            if start is not None:
                reason += f", from the retained tail after seq {start.seq}"
            if against is not None:
                if start is not None and against.seq < start.seq:
                    reason += (
                        f"; the checkpoint at seq {against.seq} falls in the entries dropped "
                        "by retention and could not be compared"
                    )
                else:
                    reason += f", consistent with the checkpoint at seq {against.seq}"
        else:
            reason = str(self._reason)
        return VerifyResult(
            valid=valid,
            checked=self._checked,
            head_seq=self._seq,
            head_hash=self._prev_b.decode(),
            first_broken_seq=self._broken,
            reason=reason,
        )


def _seq_of(line: bytes) -> object:
    """The ``seq`` a line claims, or None (for telling a reorder from a gap)."""
    try:
        obj = _strict_loads(line)
    except (ValueError, RecursionError, _DuplicateKey):
        return None
    return obj.get("seq") if isinstance(obj, dict) else None


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # json.loads would keep the last silently: two readings of one line
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _strict_loads(line: bytes) -> Any:
    """``json.loads`` that refuses duplicate keys (a canonical line has none)."""
    return json.loads(line, object_pairs_hook=_unique_pairs)


def _line_problem(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return "not an object"
    if obj.keys() != _LINE_KEYS:
        missing = sorted(_LINE_KEYS - obj.keys())
        extra = sorted(obj.keys() - _LINE_KEYS)
        return f"missing {missing}" if missing else f"unexpected {extra}"
    for name in ("seq", "ts"):
        if type(obj[name]) is not int:
            return f"{name} is not an integer"
    for name in ("prev_hash", "hash"):
        if not isinstance(obj[name], str) or not _HEX.fullmatch(obj[name]):
            return f"{name} is not 64 hex digits"
    if not isinstance(obj["kind"], str):
        return "kind is not a string"
    for name in ("agent_id", "session_id"):
        if obj[name] is not None and not isinstance(obj[name], str):
            return f"{name} is not a string"
    if not isinstance(obj["data"], dict):
        return "data is not an object"
    return None


def verify_entries(
    entries: Iterable[AuditEntry], *, against: Checkpoint | None = None, key: bytes | None = None
) -> VerifyResult:
    """Verify a chain given as entries (in seq order, from seq 1), streaming.

    Each hash is recomputed from the entry's fields. Catches an edited entry
    (hash mismatch), a removed one (seq gap), reordered or inserted ones (seq
    not increasing by one, or ``prev_hash`` not linking) and, with
    ``against``, truncation and a checkpoint that is not the chain's.

    Args:
        entries: the chain, oldest first.
        against: a checkpoint taken earlier.
        key: the HMAC key; when given, ``against``'s signature must verify.
    """
    verifier = ChainVerifier(against=against, key=key)
    for entry in entries:
        verifier.feed_entry(entry)
        if verifier.failed and not verifier.wants_more:
            break
    return verifier.result()


def _disagree(against: Checkpoint | None, start: Checkpoint | None) -> TypeGuard[Checkpoint]:
    """True if both checkpoints name the same entry with different hashes."""
    return (
        start is not None
        and against is not None
        and against.seq == start.seq
        and against.hash != start.hash
    )


def _signed_by(checkpoint: Checkpoint, key: bytes) -> bool:
    """True if ``checkpoint`` carries the signature ``key`` gives its seq and hash."""
    signature = checkpoint.signature
    expected = sign_checkpoint(key, checkpoint.seq, checkpoint.hash)
    return signature is not None and hmac.compare_digest(signature, expected)


def verify_lines(
    lines: Iterable[bytes],
    *,
    against: Checkpoint | None = None,
    key: bytes | None = None,
    start: Checkpoint | None = None,
) -> VerifyResult:
    """Like :func:`verify_entries`, over stored lines (one entry each, newline optional).

    Lines written canonically are checked without building objects; a line
    that is not canonical JSON is parsed and checked by its content. A line
    that is not an audit entry makes the result invalid, naming its number.
    ``start`` is where a tail begins (see :class:`ChainVerifier`).
    """
    verifier = ChainVerifier(against=against, key=key, start=start)
    verifier.feed_lines(line.rstrip(b"\r\n") for line in lines)
    return verifier.result()


def verify_file(
    path: str | PathLike[str],
    *,
    against: Checkpoint | None = None,
    key: bytes | None = None,
    start: Checkpoint | None = None,
) -> VerifyResult:
    """Verify an exported JSON Lines file offline (streaming, O(1) memory).

    A line that is not an audit entry makes the result invalid, with a reason
    naming its line number. Without ``against``, a file cut short after some
    entry still verifies: pass a checkpoint to catch truncation. ``start`` is
    where an export of a retained tail begins (``kw.audit.retained_from()``).

    Raises:
        OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        return verify_lines(f, against=against, key=key, start=start)
