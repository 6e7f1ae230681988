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
    canonical_json,
    entry_body,
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
# Lines of a block kept to name a malformed one when its seal does not match.
_DIAGNOSE_LINES = 1024


class ChainVerifier:
    """Streaming verifier: feed entries in order, then read :meth:`result`.

    Memory is O(1) whatever the chain's length: a block's seal is computed
    incrementally as its entries arrive, and checked when the next block
    starts (or at :meth:`result`). After the first problem further input is
    ignored (the result names the first problem only).

    Args:
        against: a checkpoint the chain must reach, with exactly its hash.
        key: when given, ``against`` (and ``start``) must carry a signature
            that verifies with it (an unsigned or wrongly signed checkpoint
            is invalid).
        start: where the chain fed begins when it is a tail: the checkpoint
            of the last entry before it (an in-memory log's retention drops
            old blocks and keeps that checkpoint). The first entry fed must
            link to it. A checkpoint ``against`` older than ``start`` cannot
            be compared (its entry is gone); the result says so.
    """

    __slots__ = (
        "_against",
        "_block_first",
        "_block_line",
        "_block_lines",
        "_block_prev",
        "_broken",
        "_checked",
        "_gap",
        "_hasher",
        "_prev_b",
        "_reason",
        "_seal_b",
        "_seq",
        "_start",
        "_verified",
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
        # _seq: the last seq taken (maybe in the open block); _verified: the
        # last seq of the last block whose seal verified, _prev_b that seal.
        self._seq = self._verified = 0 if start is None else start.seq
        self._prev_b = (GENESIS_HASH if start is None else start.hash).encode("ascii")
        # The open block: its claimed seal (None: no block open), the seal
        # before it, its running hash, its first seq and that entry's line.
        self._seal_b: bytes | None = None
        self._block_prev = self._prev_b
        self._hasher: Any = None
        self._block_first = 0
        self._block_line: int | None = None
        # The open block's lines (when fed lines), kept to name a malformed
        # one if the seal does not match; None past _DIAGNOSE_LINES.
        self._block_lines: list[bytes] | None = None
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

    def _close_block(self, quiet: bool = False) -> bool:
        """Check the open block's seal; False (and the problem kept) if it does not match.

        ``quiet``: a seq problem right after the block will be reported instead
        (a removed or reordered entry breaks its block's seal too); the block is
        only counted if it holds.
        """
        seal_b = self._seal_b
        if seal_b is None:
            return True
        self._seal_b = None
        first, last = self._block_first, self._seq
        if self._hasher.hexdigest().encode() != seal_b:
            if quiet:
                return False
            self._seq = self._verified
            if self._block_lines is not None and self._block_line is not None:
                for offset, raw in enumerate(self._block_lines):
                    problem = _malformed(raw)
                    if problem is not None:
                        lineno = self._block_line + offset
                        self._fail(first + offset, f"line {lineno} {problem}")
                        return False
            where = "" if self._block_line is None else f" (line {self._block_line})"
            if first == last:
                self._fail(
                    first,
                    f"entry {first}{where} was modified (its hash does not match), or its "
                    "block lost or gained entries",
                )
            else:
                self._fail(
                    first,
                    f"entries {first}..{last}{where} do not match their block's seal: one of "
                    "them was modified, or the block lost or gained entries",
                )
            return False
        self._checked += last - first + 1
        self._verified = last
        self._prev_b = seal_b
        against = self._against
        if (
            against is not None
            and first <= against.seq <= last
            and seal_b != against.hash.encode("utf-8", "surrogatepass")
        ):
            self._fail(
                against.seq,
                f"entry {against.seq} does not match the checkpoint (the log was rewritten)",
            )
            return False
        return True

    def _take(
        self,
        seq: object,
        prev_b: bytes,
        seal_b: bytes,
        body: bytes,
        where: str,
        line: int | None = None,
        raw: bytes | None = None,
    ) -> None:
        """Take the next entry: its seq and links checked now, its block's seal when it closes."""
        expected = self._seq + 1
        if seal_b != self._seal_b and self._seal_b is not None:  # a new block: the open one ended
            if seq != expected:
                self._close_block(quiet=True)  # the seq problem below says what happened
            elif not self._close_block():
                return
        if seq != expected:
            if isinstance(seq, int) and seq > expected:
                self._fail(expected, f"entry {expected} is missing ({where} has seq {seq})")
                self._gap = (expected, seq)
            else:
                self._fail(
                    seq if isinstance(seq, int) else expected,
                    f"entry {seq} is out of order or repeated ({where})",
                )
            return
        if seal_b == self._seal_b:  # the open block goes on
            if prev_b != self._block_prev:
                self._fail(seq, f"entry {seq} does not link like its block (prev_hash differs)")
                return
            self._hasher.update(b"\n" + body)
            kept = self._block_lines
            if kept is not None and raw is not None:
                if len(kept) < _DIAGNOSE_LINES:
                    kept.append(raw)
                else:
                    self._block_lines = None
        else:
            if prev_b != self._prev_b:
                self._fail(seq, f"entry {seq} does not link to entry {seq - 1} (prev_hash differs)")
                return
            self._seal_b, self._block_prev = seal_b, prev_b
            self._hasher = _sha256(prev_b + body)
            self._block_first, self._block_line = seq, line
            self._block_lines = None if raw is None else [raw]
        self._seq = seq

    def feed_entry(self, entry: AuditEntry, where: str | None = None) -> None:
        """Check the next entry, from its fields (its block's seal is checked when it closes)."""
        if self._reason is not None:
            if self._gap is not None:
                self._after_gap(entry.seq)
            return
        where = where or f"entry at position {self._checked + self._seq - self._verified + 1}"
        try:
            body = entry_body(entry.hashed_fields())
        except (TypeError, ValueError) as exc:  # data that is not JSON cannot be hashed
            self._fail(entry.seq, f"entry {entry.seq} cannot be hashed ({exc})")
            return
        prev_b = entry.prev_hash.encode("utf-8", "surrogatepass")
        self._take(
            entry.seq, prev_b, entry.hash.encode("utf-8", "surrogatepass"), body, where, None
        )

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
            body = line[:cut] + line[cut + 74 :]
            self._take(int(seq_b), prev_b, hash_b, body, f"line {lineno}", lineno, line)
            return
        # Not canonical as written: parse it properly.
        self._feed_parsed(line, lineno)

    def feed_lines(self, lines: Iterable[bytes], first_lineno: int = 1) -> None:
        """Check consecutive lines (no newlines) starting at line ``first_lineno``.

        Same result as :meth:`feed_line` on each, in a tight loop for the
        common case: canonical lines that continue the open block. Any other
        line (a block's first, or anything odd) goes through :meth:`feed_line`.
        """
        hash_key, kind_key = _HASH_KEY, b'","kind":"'
        lineno = first_lineno - 1
        it = iter(lines)
        while self._reason is None:
            seq = start = self._seq
            seal_b = self._seal_b
            careful: bytes | None = None
            if seal_b is not None:
                # Canonical tail: ,"hash":"H","kind":"K","prev_hash":"P","seq":N,"session_id":...
                # Only the open block's H and P and the next N are taken here.
                expect = b'","prev_hash":"%b","seq":' % self._block_prev
                update = self._hasher.update
                kept = self._block_lines
                room = 0 if kept is None else _DIAGNOSE_LINES - len(kept)
                for line in it:
                    seq += 1
                    cut = line.rfind(hash_key)
                    tail = line.find(b'"', cut + 83)
                    if (
                        cut <= 0
                        or line[cut + 9 : cut + 73] != seal_b
                        or not line.startswith(kind_key, cut + 73)
                        or not line.startswith(expect, tail)
                        or not line.startswith(b'%d,"session_id":' % seq, tail + 87)
                        or line[-1] != 0x7D  # "}"
                    ):
                        careful = line
                        seq -= 1
                        break
                    update(b"\n" + line[:cut] + line[cut + 74 :])
                    if room > 0:
                        kept.append(line)  # type: ignore[union-attr]
                        room -= 1
                    elif kept is not None:
                        kept = self._block_lines = None
            else:
                careful = next(it, None)
            self._seq = seq
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
        try:
            body = entry_body(obj)
        except ValueError:  # NaN in a hand-edited line
            self._fail(obj["seq"], f"entry {obj['seq']} (line {lineno}) cannot be hashed")
            return
        self._take(
            obj["seq"],
            obj["prev_hash"].encode(),
            obj["hash"].encode(),
            body,
            f"line {lineno}",
            lineno,
            line,
        )

    def result(self) -> VerifyResult:
        """The verdict on everything fed so far (call after the last entry)."""
        if self._reason is None:
            self._close_block()
        against = self._against
        if self._reason is None and against is not None and self._verified < against.seq:
            self._fail(
                self._verified + 1,
                f"the log ends at seq {self._verified}, before the checkpoint's seq {against.seq} "
                "(truncated)",
            )
        valid = self._reason is None
        start = self._start
        if valid:
            reason = f"{self._checked} entries verify (head seq {self._verified})"
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
            head_seq=self._verified,
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


def _malformed(line: bytes) -> str | None:
    """What makes ``line`` not a canonical audit line (for naming it in a broken block), or None."""
    try:
        obj = _strict_loads(line)
    except (ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else exc.__class__.__name__
        return f"is not valid JSON ({why})"
    except _DuplicateKey as exc:
        return f"repeats the key {exc.key!r}: not a canonical entry"
    problem = _line_problem(obj)
    if problem is not None:
        return f"is not an audit entry ({problem})"
    try:
        canonical = canonical_json(obj)
    except ValueError:
        return "cannot be hashed"
    return None if canonical == line else "is not in canonical form: edited by hand"


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
