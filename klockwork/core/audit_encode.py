"""The audit writer's encoding: queued entries in, chained rows out.

:func:`encode_batch` runs on the audit writer thread. It turns each queued
entry into its canonical line and chains the hashes, exactly as specified
in :mod:`klockwork.core.audit_chain`. Under the GIL its CPU time is taken
from the threads that record, so it has a fast path: the line is formatted
from precomputed pieces (the eight top-level keys are fixed and sorted) and
the ``data`` text comes either from the JSON encoder (plain JSON dicts) or,
for klockwork's own records, from their ``__audit_json__()`` (see
:mod:`klockwork.core.audit_json`). Anything the fast path does not take goes
through :func:`encode_slow`, the documented conversion; both give
byte-identical lines (checked by the tests).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from klockwork.core.audit_backend import Row
from klockwork.core.audit_chain import canonical_json, to_json_value
from klockwork.core.audit_json import json_str
from klockwork.core.audit_records import ended_json, granted_data, granted_json

__all__ = ["ENDED", "PENDING_SLOTS", "encode_batch", "encode_slow"]

#: How many slots of the log's flat queue one recorded entry takes: seq, ts,
#: kind, agent_id, session_id, data, how. ``how`` says what ``data`` is:
#: None for anything :meth:`~klockwork.core.audit.AuditLog.record` takes
#: (converted as documented), :data:`ENDED` for an ended lease's
#: ``LeaseRecord``, and an int for a granted lease's ``LeaseRecord``: its
#: ``expires_at`` when granted.
PENDING_SLOTS = 7


class _Ended:
    __slots__ = ()

    def __repr__(self) -> str:
        return "ENDED"


#: ``how`` of an entry whose data is an ended lease's record.
ENDED: Any = _Ended()

_encode = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode
_sha256 = hashlib.sha256
_UNSET: Any = object()


def _plain(value: dict[Any, Any], depth: int = 0) -> bool:
    """True if dict ``value`` is JSON data that :func:`to_json_value` leaves as is.

    Floats are let through: NaN and infinities make the encoder raise, which
    sends the entry to the slow path.
    """
    for k, v in value.items():  # noqa: SIM110 - a plain loop is faster than all(<genexpr>)
        if k.__class__ is not str or not _plain_value(v, depth):
            return False
    return True


def _plain_value(v: Any, depth: int) -> bool:
    t = v.__class__
    if t is str or t is int or v is None or t is bool or t is float:
        return True
    if depth >= 50:
        return False
    if t is dict:
        return _plain(v, depth + 1)
    if t is list or t is tuple:
        return all(_plain_value(x, depth + 1) for x in v)
    return False


def _data_json(data: Any) -> str:
    """The canonical JSON text of ``data``, or an exception: take the slow path."""
    cls = data.__class__
    if cls is not dict:
        if data is None:
            return "{}"
        direct = getattr(cls, "__audit_json__", None)
        if direct is not None:
            text: str = direct(data)
            return text
        build = getattr(cls, "__audit_data__", None)
        if build is None:
            raise TypeError("not a dict")
        data = build(data)
        if data.__class__ is not dict:
            raise TypeError("not a dict")
    if not _plain(data):
        raise TypeError("not plain JSON data")
    text = _encode(data)
    return text


def _ident(value: Any) -> str | None:
    if value is None or value.__class__ is str:
        return value
    converted = to_json_value(value if isinstance(value, str) else str(value))
    return converted if isinstance(converted, str) else str(converted)


def encode_slow(
    seq: int,
    ts: Any,
    kind: str,
    agent_id: Any,
    session_id: Any,
    data: Any,
    prev: str,
    how: Any = None,
) -> Row:
    """One entry's row by the documented conversion (anything the fast path does not take)."""
    if how is not None and how is not ENDED:
        data = granted_data(data, how)
    value = to_json_value({} if data is None else data)
    if not isinstance(value, dict):
        value = {"value": value}
    fields: dict[str, Any] = {
        "agent_id": to_json_value(_ident(agent_id)),
        "data": value,
        "kind": kind,
        "prev_hash": prev,
        "seq": seq,
        "session_id": to_json_value(_ident(session_id)),
        "ts": int(ts),
    }
    hash_ = _sha256(prev.encode("ascii") + canonical_json(fields)).hexdigest()
    fields["hash"] = hash_
    line = canonical_json(fields)
    return (
        seq,
        fields["ts"],
        kind,
        fields["agent_id"],
        fields["session_id"],
        _encode(value),
        prev,
        hash_,
        line,
    )


def encode_batch(batch: Sequence[Any], prev: str) -> tuple[list[Row], str]:
    """Chain the entries queued flat in ``batch`` after ``prev``: their rows, and the new head hash.

    ``batch`` holds :data:`PENDING_SLOTS` slots per entry. Consecutive
    entries usually share their agent and session, so their JSON text is
    reused while the object stays the same.
    """
    out: list[Row] = []
    add = out.append
    sha, data_json, enc_str = _sha256, _data_json, json_str
    last_a = last_s = _UNSET
    a = s = "null"
    slots = iter(batch)
    for seq, ts, kind, agent_id, session_id, data, how in zip(
        slots, slots, slots, slots, slots, slots, slots, strict=True
    ):
        try:
            if how is None:
                text = data_json(data)
            elif how is ENDED:
                text = ended_json(data)
            else:
                text = granted_json(data, how)
            if agent_id is not last_a:
                if agent_id is None:
                    a = "null"
                elif agent_id.__class__ is str:
                    a = enc_str(agent_id)
                else:
                    raise TypeError("not a str")
                last_a = agent_id
            if session_id is not last_s:
                if session_id is None:
                    s = "null"
                elif session_id.__class__ is str:
                    s = enc_str(session_id)
                else:
                    raise TypeError("not a str")
                last_s = session_id
            if ts.__class__ is not int:
                raise TypeError("not an int")
            head = f'{{"agent_id":{a},"data":{text}'.encode()
            tail = (
                f',"kind":"{kind}","prev_hash":"{prev}","seq":{seq},"session_id":{s},"ts":{ts}}}'
            ).encode()
            hash_ = sha(prev.encode() + head + tail).hexdigest()
            add(
                (
                    seq,
                    ts,
                    kind,
                    agent_id,
                    session_id,
                    text,
                    prev,
                    hash_,
                    b'%b,"hash":"%s"%b' % (head, hash_.encode(), tail),
                )
            )
        except Exception:  # any doubt: the documented conversion decides
            row = encode_slow(seq, ts, kind, agent_id, session_id, data, prev, how)
            add(row)
            hash_ = row[7]
        prev = hash_
    return out, prev
