"""Formatting an audit entry's ``data`` as canonical JSON text directly.

The audit writer thread turns each recorded object into the canonical JSON
of its data (:mod:`klockwork.core.audit.chain`). The generic way,
``canonical_json(to_json_value(obj.__audit_data__()))``, builds a dict and
runs the JSON encoder; for klockwork's own records (a granted ``Lease``, an
ended ``LeaseRecord``, a refused verdict) that is most of the writer's cost
per entry, paid under the GIL by the threads that take leases.

So the writer formats the same text directly for them: inline for a
lease's record (:func:`~klockwork.core.audit.encode.encode_batch`), and
through ``__audit_json__()`` for any object whose class defines it (such as
:class:`~klockwork.core.audit.records.Denied`). The contract of both,
checked by the tests with generated odd values:

* The text is exactly ``canonical_json(to_json_value(obj.__audit_data__()))``
  decoded, whenever that text is valid UTF-8.
* Formatting raises (any exception, typically ``TypeError``) when a value is not of
  the exact type it formats: only exact ``str``, exact ``int`` within
  :data:`INT_LIMIT`, ``None`` and the class's own enum members are
  formatted. The writer then takes the generic way, so an odd value changes
  the cost, never the bytes.
* Strings holding lone surrogates come out as raw surrogates, which fail to
  encode as UTF-8; the writer catches that and takes the generic way too
  (which writes them as ``\\udXXX`` text).

Plain dicts (recorded data, a gate's metadata) go through
:func:`plain_json`: orjson when the data has no floats (byte-identical for
those types, proven by a property test against the specification), the
standard C encoder otherwise.

This module only holds the shared helpers; it imports nothing from
klockwork, so any record class can use it.
"""

from __future__ import annotations

import json.encoder
from collections.abc import Callable
from json.encoder import c_make_encoder  # type: ignore[attr-defined]
from typing import Any

__all__ = [
    "INT_LIMIT",
    "checked_plain_json",
    "exact_str_json",
    "exact_str_or_null_json",
    "json_str",
    "plain_json",
]

#: The canonical JSON of an exact ``str`` (``json.dumps(s, ensure_ascii=False)``).
#: Check the type first: it also takes ``str`` subclasses, whose conversion
#: may differ (``to_json_value`` uses ``str(value)``).
json_str: Callable[[str], str] = json.encoder.encode_basestring


def exact_str_json(value: object) -> str:
    """The canonical JSON of an exact ``str``; ``TypeError`` for anything else."""
    if value.__class__ is not str:
        raise TypeError("not an exact str: the generic way")
    return json_str(value)


def exact_str_or_null_json(value: object) -> str:
    """:func:`exact_str_json`, or ``null`` for None."""
    return "null" if value is None else exact_str_json(value)


#: ``__audit_json__`` formats an ``int`` only when ``-INT_LIMIT < value < INT_LIMIT``
#: (far below the size at which ``to_json_value`` writes an int as hex).
INT_LIMIT = 1 << 63

_ODD = "not a type the direct format takes"


def _refuse(value: Any) -> Any:
    raise TypeError(_ODD)


_orjson_dumps: Callable[..., bytes] | None
_ORJSON_SORTED: int
try:  # the fastest canonical encoder for float-free data, where installed
    from orjson import OPT_SORT_KEYS as _ORJSON_SORTED
    from orjson import dumps as _orjson_dumps
except ImportError:  # pragma: no cover - orjson is a dependency on CPython
    _orjson_dumps = None
    _ORJSON_SORTED = 0

if c_make_encoder is not None:
    # One C encoder for every entry (JSONEncoder.encode builds a new one per
    # call). No cycle check: _plain only passes data nested at most 50 deep.
    _c_encode = c_make_encoder(None, _refuse, json_str, None, ":", ",", True, False, False)

    def _encode_plain(data: dict[str, Any]) -> str:
        return "".join(_c_encode(data, 0))

else:  # pragma: no cover - CPython always has the C encoder
    _encode = json.JSONEncoder(
        sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode

    def _encode_plain(data: dict[str, Any]) -> str:
        return _encode(data)


# _plain's verdicts: not JSON data as is, JSON data without floats, JSON data with
# floats. Bits: combining two plain verdicts with | gives the verdict of both.
_ODD_DATA, _NO_FLOATS, _FLOATS = 0, 1, 3


def _plain(value: dict[Any, Any], depth: int = 0, limit: int = 50) -> int:
    """Whether dict ``value`` is JSON data that :func:`to_json_value` leaves as is.

    Returns ``_ODD_DATA`` (take the slow path), ``_NO_FLOATS`` or ``_FLOATS``
    (floats format differently in orjson, and NaN and infinities make the
    standard encoder raise, which sends the entry to the slow path). Scalars
    are checked inline (the common flat dict costs no call per value). A
    container nested deeper than ``limit`` levels is odd data.
    """
    high, low = INT_LIMIT, -INT_LIMIT
    verdict = _NO_FLOATS
    for k, v in value.items():
        if k.__class__ is not str:
            return _ODD_DATA
        t = v.__class__
        if t is str or v is None or t is bool:
            continue
        if t is int:
            if low < v < high:
                continue
            return _ODD_DATA
        if t is float:
            verdict = _FLOATS
            continue
        inner = _plain_value(v, depth, limit)
        if inner == _ODD_DATA:
            return _ODD_DATA
        verdict |= inner
    return verdict


def _plain_value(v: Any, depth: int, limit: int) -> int:
    t = v.__class__
    if t is str or v is None or t is bool:
        return _NO_FLOATS
    if t is float:
        return _FLOATS
    if t is int:
        return (
            _NO_FLOATS if -INT_LIMIT < v < INT_LIMIT else _ODD_DATA
        )  # larger: hex past 13 000 bits
    if depth >= limit:
        return _ODD_DATA
    if t is dict:
        return _plain(v, depth + 1, limit)
    if t is list or t is tuple:
        verdict = _NO_FLOATS
        for x in v:
            inner = _plain_value(x, depth + 1, limit)
            if inner == _ODD_DATA:
                return _ODD_DATA
            verdict |= inner
        return verdict
    return _ODD_DATA


def plain_json(data: dict[Any, Any]) -> str:
    """The canonical JSON text of a dict that is JSON data as is; ``TypeError`` otherwise.

    "As is": :func:`~klockwork.core.audit.chain.to_json_value` would leave it
    unchanged (exact ``str`` keys; exact ``str``, ``bool``, ``None``, ``int``
    within :data:`INT_LIMIT`, finite ``float``, ``dict``, ``list`` and
    ``tuple`` values, at most 50 deep). Float-free data is written by
    orjson, byte-identical to the standard encoder for these types (checked
    by the tests against the specification); data with floats by the
    standard C encoder, which refuses NaN and infinities (``ValueError``).
    """
    if not data and data.__class__ is dict:
        return "{}"
    verdict = _plain(data)
    if verdict == _NO_FLOATS and _orjson_dumps is not None:
        text: str = _orjson_dumps(data, option=_ORJSON_SORTED).decode()
        return text
    if verdict == _ODD_DATA:
        raise TypeError(_ODD)
    return _encode_plain(data)


def checked_plain_json(data: object, max_depth: int) -> str | None:
    """The canonical JSON text of ``data`` when it is certainly plain JSON data; else None.

    One pass for what a caller would otherwise check and then encode:
    ``data`` is an exact ``dict`` of exact ``str`` keys and exact ``str``
    (valid UTF-8), ``bool``, ``None``, ``int`` (within :data:`INT_LIMIT`),
    ``dict``, ``list`` and ``tuple`` values, none more than ``max_depth``
    levels below ``data``. None means "not certainly": floats, other types,
    deeper data or text that is not UTF-8 are for the caller's checked way.
    """
    if data.__class__ is not dict or _orjson_dumps is None:
        return None
    if not data:
        return "{}"
    # A container at level L holds values at level L + 1: containers may
    # reach max_depth - 1 (_plain counts the levels of containers).
    if _plain(data, 0, max_depth - 1) != _NO_FLOATS:
        return None
    try:
        return _orjson_dumps(data, option=_ORJSON_SORTED).decode()
    except TypeError:  # orjson.JSONEncodeError: a lone surrogate
        return None
