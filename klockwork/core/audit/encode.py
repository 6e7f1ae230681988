"""The audit log's sealing: queued entries in, one sealed block of rows out.

:func:`encode_batch` runs on whichever thread seals (see
:mod:`klockwork.core.audit.log`). It turns each queued entry into its
canonical body and line and seals them as one block, exactly as specified in
:mod:`klockwork.core.audit.chain`. Under the GIL its CPU time is taken from
the threads that record, so it has a fast path: the body is formatted from
precomputed pieces (the top-level keys are fixed and sorted) and the
``data`` text is formatted directly for a lease's record, comes from
``__audit_json__()`` for objects that define it, or from
:func:`~klockwork.core.audit.canonical.plain_json` for plain JSON dicts. Anything the
fast path does not take goes through :func:`encode_slow`, the documented
conversion; both give byte-identical lines (checked by the tests).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from klockwork.core.audit.backend import Row
from klockwork.core.audit.canonical import INT_LIMIT, json_str, plain_json
from klockwork.core.audit.chain import block_seal, canonical_json, to_json_value
from klockwork.core.audit.records import granted_data
from klockwork.core.errors import InvalidRequestError
from klockwork.core.model import Predicate

__all__ = ["ENDED", "PENDING_SLOTS", "TEXT", "data_text", "encode_batch", "encode_slow"]

#: How many slots of the log's flat queue one recorded entry takes: seq, ts,
#: kind, agent_id, session_id, data, how. ``how`` says what ``data`` is:
#: None for anything :meth:`~klockwork.core.audit.log.AuditLog.record` takes
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


class _Text:
    __slots__ = ()

    def __repr__(self) -> str:
        return "TEXT"


#: ``how`` of an entry whose data is its canonical JSON text already (an
#: entry a durable store wrote with its decision, sealed later).
TEXT: Any = _Text()

_encode = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode
_UNSET: Any = object()
_ODD = "not a type the direct format takes"


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
            raise TypeError(_ODD)
        data = build(data)
        if data.__class__ is not dict:
            raise TypeError(_ODD)
    return plain_json(data)


def _ident(value: Any) -> str | None:
    if value is None or value.__class__ is str:
        return value
    converted = to_json_value(value if isinstance(value, str) else str(value))
    return converted if isinstance(converted, str) else str(converted)


def _slow_fields(
    seq: int, ts: Any, kind: str, agent_id: Any, session_id: Any, data: Any, prev: str, how: Any
) -> dict[str, Any]:
    """One entry's hashed fields by the documented conversion (what the fast path does not take)."""
    return {
        "agent_id": to_json_value(_ident(agent_id)),
        "data": _converted(data, how),
        "kind": kind,
        "prev_hash": prev,
        "seq": seq,
        "session_id": to_json_value(_ident(session_id)),
        "ts": int(ts),
    }


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
    """One entry's row, sealed as a block of its own, by the documented conversion."""
    fields = _slow_fields(seq, ts, kind, agent_id, session_id, data, prev, how)
    hash_ = block_seal(prev, (canonical_json(fields),))
    return _slow_row(fields, hash_)


def _slow_row(fields: dict[str, Any], hash_: str) -> Row:
    line = canonical_json(fields | {"hash": hash_})
    return (
        fields["seq"],
        fields["ts"],
        fields["kind"],
        fields["agent_id"],
        fields["session_id"],
        _encode(fields["data"]),
        fields["prev_hash"],
        hash_,
        line,
    )


def _fast_text(data: Any, how: Any) -> str:
    """The canonical JSON text of an entry's data, or an exception: take the slow path.

    A lease's record is formatted directly (this is the writer's whole
    per-entry cost): exactly ``granted_json``/``ended_json`` of
    :mod:`~klockwork.core.audit.records`, whose contract
    (:mod:`~klockwork.core.audit.canonical`) the tests check on both.
    """
    if how is None:
        return _data_json(data)
    if how is TEXT:
        if data.__class__ is not str:
            raise TypeError(_ODD)
        text: str = data
        return text
    # a lease's record: granted (how = expires_at) or ended
    high, low = INT_LIMIT, -INT_LIMIT
    lease_id, resource, token = data.lease_id, data.resource, data.fencing_token
    predicate = data.predicate
    if not (
        lease_id.__class__ is str
        and resource.__class__ is str
        and predicate.__class__ is Predicate
        and token.__class__ is int
        and low < token < high
    ):
        raise TypeError(_ODD)
    enc_str = json_str
    if how is not ENDED:
        if how.__class__ is not int or not low < how < high:
            raise TypeError(_ODD)
        return (
            f'{{"expires_at":{how},"fencing_token":{token},'
            f'"lease_id":{enc_str(lease_id)},"predicate":"{predicate._value_}",'
            f'"resource":{enc_str(resource)}}}'
        )
    if data.reason:
        reason = data.reason
        if reason.__class__ is not str:
            raise TypeError(_ODD)
        return (
            f'{{"fencing_token":{token},"lease_id":{enc_str(lease_id)},'
            f'"predicate":"{predicate._value_}","reason":{enc_str(reason)},'
            f'"resource":{enc_str(resource)}}}'
        )
    return (
        f'{{"fencing_token":{token},"lease_id":{enc_str(lease_id)},'
        f'"predicate":"{predicate._value_}","resource":{enc_str(resource)}}}'
    )


def data_text(data: Any, how: Any = None) -> str:
    """An entry's data as the canonical JSON text its sealed line will hold.

    What a durable store writes with a decision (the entry is sealed into
    the chain later, from this text). Never fails on odd data: anything
    the direct format does not take goes through the documented conversion.

    Raises:
        InvalidRequestError: the text cannot be stored as UTF-8 (a lone
            surrogate in a string).
    """
    try:
        text = _fast_text(data, how)
    except Exception:
        try:
            text = _encode(_converted(data, how))
        except RecursionError:
            raise InvalidRequestError("data", "...", "is nested too deeply to record") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError("data", data, f"cannot be stored as UTF-8 text: {exc}") from None
    return text


def _converted(data: Any, how: Any) -> dict[str, Any]:
    """The documented conversion of an entry's data (see :func:`encode_slow`)."""
    if how is TEXT:
        data = json.loads(data)
    elif how is not None and how is not ENDED:
        try:
            data = granted_data(data, how)
        except Exception:  # an odd record: kept as its repr, as to_json_value does
            try:
                data = repr(data)
            except Exception:
                data = f"<unrepresentable {type(data).__qualname__}>"
    value = to_json_value({} if data is None else data)
    return value if isinstance(value, dict) else {"value": value}


def encode_batch(batch: Sequence[Any], prev: str) -> tuple[list[Row], str]:
    """Seal the entries queued flat in ``batch`` as one block after ``prev``: rows and seal.

    ``batch`` holds :data:`PENDING_SLOTS` slots per entry. Each entry's body
    is formatted by :func:`_fast_text` and the fixed key order, or by the
    documented conversion when it cannot be; consecutive entries usually
    share their agent and session, so their JSON text is reused while the
    object stays the same. One sha256 over the bodies seals the block.
    """
    # Per entry: (seq, ts, kind, agent_id, session_id, data text, body head, body tail)
    # for the fast path, or the fields dict of the documented conversion.
    parts: list[Any] = []
    bodies: list[bytes] = []
    add, add_body = parts.append, bodies.append
    fast_text, enc_str = _fast_text, json_str
    last_a = last_s = _UNSET
    a = s = "null"
    slots = iter(batch)
    for seq, ts, kind, agent_id, session_id, data, how in zip(
        slots, slots, slots, slots, slots, slots, slots, strict=True
    ):
        try:
            text = fast_text(data, how)
            if agent_id is not last_a:
                if agent_id is None:
                    a = "null"
                elif agent_id.__class__ is str:
                    a = enc_str(agent_id)
                else:
                    raise TypeError(_ODD)
                last_a = agent_id
            if session_id is not last_s:
                if session_id is None:
                    s = "null"
                elif session_id.__class__ is str:
                    s = enc_str(session_id)
                else:
                    raise TypeError(_ODD)
                last_s = session_id
            if ts.__class__ is not int:
                raise TypeError(_ODD)
            head = f'{{"agent_id":{a},"data":{text}'
            tail = f',"kind":"{kind}","prev_hash":"{prev}","seq":{seq},"session_id":{s},"ts":{ts}}}'
            body = f"{head}{tail}".encode()  # not UTF-8 (a lone surrogate): the slow path
            add((seq, ts, kind, agent_id, session_id, text, head, tail))
        except Exception:  # any doubt: the documented conversion decides
            fields = _slow_fields(seq, ts, kind, agent_id, session_id, data, prev, how)
            body = canonical_json(fields)
            add(fields)
        add_body(body)
    seal = block_seal(prev, bodies)
    rows: list[Row] = []
    keep = rows.append
    hash_key = f',"hash":"{seal}"'
    for p in parts:
        if p.__class__ is dict:
            keep(_slow_row(p, seal))
        else:
            seq, ts, kind, agent_id, session_id, text, head, tail = p
            line = f"{head}{hash_key}{tail}".encode()
            keep((seq, ts, kind, agent_id, session_id, text, prev, seal, line))
    return rows, seal
