"""The pure half of the audit trail: canonical form, hash chain, verification.

Nothing here does I/O or keeps state between calls; :mod:`klockwork.core.audit.log`
(the log, its backends and JSONL files) is built on it. This docstring is the
complete specification of the chain, so that anyone can verify an exported
log without klockwork.

Canonical JSON
    ``canonical_json(obj)`` is ``json.dumps(obj, sort_keys=True,
    separators=(",", ":"), ensure_ascii=False, allow_nan=False)`` encoded as
    UTF-8. Keys are sorted by code point, there is no whitespace, non-ASCII
    text is written as raw UTF-8, integers in decimal, floats as Python's
    shortest ``repr`` (``1.5``, ``1e+16``).

The hashed fields
    Each entry has exactly seven hashed fields, in canonical (sorted) order:
    ``agent_id`` (string or null), ``data`` (object), ``kind`` (string),
    ``prev_hash`` (64 lowercase hex digits), ``seq`` (integer), ``session_id``
    (string or null), ``ts`` (integer, epoch milliseconds). An entry's *body*
    is ``canonical_json`` of those seven fields.

Sealed blocks
    The chain is a sequence of *blocks*: runs of one or more entries with
    consecutive seqs, sealed by one hash. Every entry of a block carries the
    same ``prev_hash`` — the previous block's seal (64 ``"0"`` characters,
    :data:`GENESIS_HASH`, for the first block) — and the same ``hash``, its
    block's seal::

        hash = sha256(prev_hash_ascii + b"\n".join(body of each entry, in seq order)).hexdigest()

    i.e. the 64 ASCII hex digits of the previous seal, immediately followed by
    the bodies of the block's entries separated by one ``\n`` byte (no
    separator before the first or after the last). A block of one entry is
    therefore ``sha256(prev_hash + body)``: a chain whose every block holds one
    entry (as written before blocks existed) is a valid chain. Where a block
    ends is read from the entries: a block is a maximal run of consecutive
    entries with the same ``hash``. ``seq`` starts at 1 and has no gaps.
    klockwork seals up to 1 024 entries per block (one hash per writer batch
    instead of one per entry: the hashing is then a small part of the cost).

The stored / exported line
    ``canonical_json(fields | {"hash": hash})``: the body with the eighth key
    ``hash`` (which sorts between ``data`` and ``kind``). JSONL exports hold
    one such line per entry, in ``seq`` order, each ended by ``\n``. To verify
    a file: parse each line, remove ``hash`` and re-serialise the rest
    canonically (the body); group consecutive lines with the same ``hash``
    into blocks; recompute each block's seal as above and compare; check that
    the seqs run 1, 2, 3, ... and that each block's ``prev_hash`` is the seal
    of the block before. An edited, removed, reordered or inserted entry
    breaks its block's seal, the seq run or a link; verification names the
    first seq at which the chain breaks (for an edit inside a block: the
    block's first seq, since the seal covers the block as a whole).

Checkpoints
    A :class:`Checkpoint` pins the head (``seq``, ``hash``) at a moment. With a
    key, ``signature = HMAC-SHA256(key, f"{seq}:{hash}".encode()).hexdigest()``.
    Verifying against a checkpoint also catches truncation: the chain must
    reach ``seq`` and its entry there must have exactly ``hash``. (A head is
    always the last entry of a block; an entry cut from the end of a block
    breaks that block's seal, so truncation inside a block is caught even
    without a checkpoint.)

How ``data`` is made JSON (:func:`to_json_value`, applied when the entry is
written; recording never fails on odd data):

* ``str``, ``int``, ``bool``, ``None`` and finite ``float`` stay as they are
  (subclasses such as ``IntEnum`` are reduced to the plain value). NaN and
  infinities become the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``;
  an integer of more than 4000 decimal digits becomes its ``hex()`` string.
* ``enum.Enum`` members become their converted ``.value``.
* ``datetime``, ``date`` and ``time`` become ``.isoformat()``; ``timedelta``
  becomes its total seconds (float); ``UUID``, ``Decimal`` and paths ``str()``.
* ``bytes``, ``bytearray`` and ``memoryview`` become standard base64 text.
* Mappings become objects whose keys are strings: a ``str`` key is kept;
  ``None``/``True``/``False`` become ``"null"``/``"true"``/``"false"``; any
  other key is converted by these rules and, unless already a string, written
  as its canonical JSON text (``1`` → ``"1"``). If two keys collide, the last
  one in iteration order wins.
* Lists and tuples become arrays; sets and frozensets become arrays sorted by
  the canonical JSON of their converted items.
* An object whose class defines ``__audit_data__()`` becomes what that
  method returns, converted by these rules (klockwork's own records use it so
  the hot path can hand over an immutable object and the writer builds the
  data).
* Pydantic models become ``model_dump(mode="json")``; dataclass instances an
  object of their fields; both then converted by these rules.
* Strings that are not valid Unicode (lone surrogates) are stored with each
  offending code point written as ``\\udXXX`` text (``backslashreplace``).
* Anything else becomes ``repr(value)``; nesting deeper than 100 levels (or
  a cycle) is cut with ``repr`` of the remainder. So does an object whose
  ``__audit_data__()`` or ``model_dump`` raises. If ``repr`` raises too, the
  text is ``<unrepresentable QualifiedClassName>``.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import enum
import hashlib
import hmac
import json
import uuid
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr

from klockwork.core.errors import AuditIntegrityError
from klockwork.core.model import _set_private

__all__ = [
    "AUDIT_KINDS",
    "GENESIS_HASH",
    "HASHED_FIELDS",
    "AuditEntry",
    "Checkpoint",
    "VerifyResult",
    "canonical_json",
    "block_seal",
    "entry_body",
    "entry_hash",
    "sign_checkpoint",
    "to_json_value",
]

#: Every kind an audit entry may have (DESIGN "Audit trail").
AUDIT_KINDS: frozenset[str] = frozenset(
    [
        "lease.granted",
        "lease.denied",
        "lease.released",
        "lease.expired",
        "lease.revoked",
        "action.executed",
        "action.requested",
        "action.denied",
        "approval.decided",
        "approval.expired",
        "delegation.created",
        "delegation.revoked",
        "breaker.opened",
        "tool.start",
        "tool.end",
        "tool.error",
        "chain.start",
        "chain.end",
        "llm.end",
        # klockwork serve: API keys made and revoked, requests refused.
        "key.created",
        "key.revoked",
        "access.denied",
    ]
)
#: ``prev_hash`` of the first entry.
GENESIS_HASH = "0" * 64
#: The fields covered by an entry's hash, in canonical order.
HASHED_FIELDS = ("agent_id", "data", "kind", "prev_hash", "seq", "session_id", "ts")

_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
_encode = _ENCODER.encode
_sha256 = hashlib.sha256
_MAX_DEPTH = 100
_MAX_INT_BITS = 13_000  # about 3 900 decimal digits: below Python's 4 300-digit str limit


def canonical_json(obj: Any) -> bytes:
    """The canonical UTF-8 JSON of ``obj`` (sorted keys, no spaces, raw UTF-8).

    ``obj`` must already be JSON data with string keys (see
    :func:`to_json_value`); NaN, infinities and unknown types raise
    ``ValueError``/``TypeError``.
    """
    return _encode(obj).encode("utf-8")


def entry_body(fields: Mapping[str, Any]) -> bytes:
    """An entry's body: ``canonical_json`` of its seven hashed fields.

    Args:
        fields: a mapping holding at least :data:`HASHED_FIELDS`; other keys
            (such as ``hash``) are ignored.
    """
    return canonical_json({name: fields[name] for name in HASHED_FIELDS})


def block_seal(prev_hash: str, bodies: Iterable[bytes]) -> str:
    """The seal of a block: ``sha256(prev_hash + b"\\n".join(bodies))`` as hex.

    Args:
        prev_hash: the previous block's seal (64 hex digits, or :data:`GENESIS_HASH`).
        bodies: the block's entry bodies (:func:`entry_body`), in seq order.
    """
    return _sha256(prev_hash.encode("ascii") + b"\n".join(bodies)).hexdigest()


def entry_hash(prev_hash: str, fields: Mapping[str, Any]) -> str:
    """The seal of a block holding this one entry: ``sha256(prev_hash + body)`` as hex.

    Args:
        prev_hash: the previous block's seal (64 hex digits, or :data:`GENESIS_HASH`).
        fields: a mapping holding at least :data:`HASHED_FIELDS`; other keys
            (such as ``hash``) are ignored.
    """
    return block_seal(prev_hash, (entry_body(fields),))


def sign_checkpoint(key: bytes, seq: int, hash: str) -> str:
    """``HMAC-SHA256(key, f"{seq}:{hash}")`` as hex: a checkpoint's signature."""
    return hmac.new(key, f"{seq}:{hash}".encode(), hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------- data conversion
def _key(key: Any, depth: int) -> str:
    if isinstance(key, str):
        return _text(key)
    if key is None or isinstance(key, bool):
        return "null" if key is None else ("true" if key else "false")
    value = to_json_value(key, _depth=depth)
    return value if isinstance(value, str) else _encode(value)


def _text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return str(value)


def _sort_key(item: Any) -> str:
    return str(_encode(item))


def to_json_value(value: Any, *, _depth: int = 0) -> Any:
    """Convert ``value`` to JSON data deterministically; never raises.

    The rules are listed in this module's docstring. The result is new
    containers (``value`` is not changed) and :func:`canonical_json` accepts it.
    """
    if _depth > _MAX_DEPTH:
        return _repr(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, enum.Enum):
        return to_json_value(value.value, _depth=_depth + 1)
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, int):
        return int(value) if value.bit_length() <= _MAX_INT_BITS else hex(value)
    if isinstance(value, float):
        if value != value:
            return "NaN"
        if value in (float("inf"), float("-inf")):
            return "Infinity" if value > 0 else "-Infinity"
        return float(value)
    depth = _depth + 1
    audit_data = getattr(type(value), "__audit_data__", None)
    if audit_data is not None:
        try:
            built = audit_data(value)
        except Exception:  # recording never fails on odd data
            return _repr(value)
        return to_json_value(built, _depth=depth)
    if isinstance(value, Mapping):
        return {_key(k, depth): to_json_value(v, _depth=depth) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v, _depth=depth) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((to_json_value(v, _depth=depth) for v in value), key=_sort_key)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (uuid.UUID, decimal.Decimal, PurePath)):
        return str(value)
    if isinstance(value, BaseModel):
        try:
            dumped = value.model_dump(mode="json")
        except Exception:  # a model that cannot dump itself is still recorded
            return _repr(value)
        return to_json_value(dumped, _depth=depth)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            _text(f.name): to_json_value(getattr(value, f.name, None), _depth=depth)
            for f in dataclasses.fields(value)
        }
    return _repr(value)


def _repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<unrepresentable {type(value).__qualname__}>"
    return _text(text)


# --------------------------------------------------------------------------- models
_FROZEN = ConfigDict(frozen=True)


class AuditEntry(BaseModel):
    """One recorded decision, as stored in the chain.

    Attributes:
        seq: position in the chain, from 1, gapless.
        ts: when it happened, epoch milliseconds.
        kind: one of :data:`AUDIT_KINDS`.
        agent_id: who acted (None when not known).
        session_id: the agent's session (None when not known).
        data: the event's details, already converted to JSON data.
        prev_hash: the seal of the block before this entry's block
            (:data:`GENESIS_HASH` for the first block).
        hash: the seal of this entry's block (see "Sealed blocks" above; for
            a block of this entry alone, ``sha256(prev_hash + body)`` hex).
    """

    model_config = _FROZEN
    seq: int
    ts: int
    kind: str
    agent_id: str | None
    session_id: str | None
    data: dict[str, Any]
    prev_hash: str
    hash: str
    # The exact stored line, when this entry was made by the log or read from
    # a backend; never used to verify (see canonical_line).
    _line: bytes | None = PrivateAttr(default=None)

    def hashed_fields(self) -> dict[str, Any]:
        """The seven fields the hash covers (:data:`HASHED_FIELDS`)."""
        return {
            "agent_id": self.agent_id,
            "data": self.data,
            "kind": self.kind,
            "prev_hash": self.prev_hash,
            "seq": self.seq,
            "session_id": self.session_id,
            "ts": self.ts,
        }

    def compute_hash(self) -> str:
        """The hash this entry *should* have if it is a block of its own, from its fields."""
        return entry_hash(self.prev_hash, self.hashed_fields())

    def canonical_line(self) -> bytes:
        """The canonical JSON of all eight fields (no newline), recomputed."""
        fields = self.hashed_fields()
        fields["hash"] = self.hash
        return canonical_json(fields)

    def stored_line(self) -> bytes:
        """The line as stored, when known; otherwise :meth:`canonical_line`.

        Backends call this in ``append``: for entries the log built it costs
        nothing. Do not use it to verify (it may be a cached copy).
        """
        private = self.__pydantic_private__
        line = private.get("_line") if private else None
        return line if line is not None else self.canonical_line()

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Any:
        """A copy (see pydantic); the copy never reuses the cached stored line."""
        copied = super().model_copy(update=update, deep=deep)
        _set_private(copied, {"_line": None})
        return copied

    @classmethod
    def from_line(cls, line: bytes | str) -> AuditEntry:
        """Parse one stored/exported line (validated); raises ``ValueError`` if malformed."""
        entry = cls.model_validate_json(line)
        _set_private(entry, {"_line": line.encode("utf-8") if isinstance(line, str) else line})
        return entry


class Checkpoint(BaseModel):
    """The chain's head at a moment: verifying against it catches truncation.

    Attributes:
        seq: the head's seq (0 for an empty log).
        hash: the head's hash (:data:`GENESIS_HASH` for an empty log).
        ts: when the checkpoint was taken, epoch milliseconds.
        signature: ``HMAC-SHA256(key, f"{seq}:{hash}")`` hex, or None if unsigned.
    """

    model_config = _FROZEN
    seq: int
    hash: str
    ts: int
    signature: str | None = None


class VerifyResult(BaseModel):
    """Outcome of verifying a chain.

    Attributes:
        valid: True if every entry verifies (and the checkpoint, if any, holds).
        checked: how many entries verified before the first problem.
        head_seq: seq of the last entry that verified (0 if none).
        head_hash: its hash (:data:`GENESIS_HASH` if none).
        first_broken_seq: seq of the first entry that is bad or missing
            (None when valid, or when only the checkpoint's signature is wrong).
        reason: one sentence: what is wrong, or what was verified.
    """

    model_config = _FROZEN
    valid: bool
    checked: int
    head_seq: int
    head_hash: str
    first_broken_seq: int | None
    reason: str

    def raise_if_invalid(self) -> None:
        """Raise :class:`~klockwork.AuditIntegrityError` with :attr:`reason` unless valid."""
        if not self.valid:
            raise AuditIntegrityError(self.reason)
