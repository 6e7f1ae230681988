"""Run inputs and outputs as small JSON data for the audit trail: redacted, then cut.

Used by :mod:`klockwork.integrations.langchain.callbacks`; pure (no I/O, no
state between calls). :class:`Shaper` converts on the recording thread, so it
is written for speed: plain scalars are handled inline, and walking stops as
soon as the field's character budget is spent, so a large state costs no
more than a small one.

Conversion: messages become ``{"type", "content", ...}`` dicts (no LangChain
objects reach the trail); mappings, lists, tuples and sets become objects and
arrays; pydantic models and dataclasses their fields (shallow, then converted);
bytes ``"<N bytes>"``; anything else ``str()``. Budget: each string costs its
length, every other item one; a string longer than what remains ends with
``…[truncated N chars]``, a list cut short gets a last item ``…[truncated N
items]`` and a dict a last key ``"…"``; nesting deeper than 20 becomes ``"[…]"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from langchain_core.messages import BaseMessage
from pydantic import BaseModel

from klockwork.core.errors import InvalidRequestError

__all__ = ["REDACTED", "Redactor", "Shaper", "redaction"]

#: What a redacted value is replaced with.
REDACTED = "[redacted]"
#: A redaction callable: ``(field path, value) -> value to record``.
Redactor = Callable[[str, Any], Any]

_MAX_DEPTH = 20
_MORE = "…"  # the key of the marker item of a dict cut short


def _cut(text: str, keep: int) -> str:
    return f"{text[:keep]}…[truncated {len(text) - keep} chars]"


def _message(m: BaseMessage) -> dict[str, Any]:
    """A message as a small dict (no LangChain objects in the audit trail)."""
    out: dict[str, Any] = {"type": m.type, "content": m.content}
    if m.name:
        out["name"] = m.name
    calls = getattr(m, "tool_calls", None)
    if calls:
        out["tool_calls"] = [
            {"name": c.get("name"), "args": c.get("args"), "id": c.get("id")} for c in calls
        ]
    call_id = getattr(m, "tool_call_id", None)
    if call_id is not None:
        out["tool_call_id"] = call_id
        out["status"] = getattr(m, "status", None)
    return out


class Shaper:
    """Redacts, then converts a value to JSON data within a character budget."""

    __slots__ = ("fn", "keys", "max_chars")

    def __init__(self, max_chars: int, keys: frozenset[str] | None, fn: Redactor | None) -> None:
        self.max_chars = max_chars
        self.keys = keys
        self.fn = fn

    def shape(self, value: Any, path: str) -> Any:
        if self.fn is not None:
            value = self.fn(path, value)
        cls = value.__class__
        if cls is str:
            return value if len(value) <= self.max_chars else _cut(value, self.max_chars)
        if value is None or cls is int or cls is bool or cls is float:
            return value
        if cls is dict:
            return self._dict(value, self.max_chars, path, 0)[0]
        return self._conv(value, self.max_chars, path, 0)[0]

    def _conv(self, v: Any, left: int, path: str, depth: int) -> tuple[Any, int]:
        cls = v.__class__
        if cls is str:
            n = len(v)
            return (v, left - n) if n <= left else (_cut(v, max(left, 0)), 0)
        if v is None or cls is int or cls is bool or cls is float:
            return v, left - 1
        if depth >= _MAX_DEPTH:
            return "[…]", left - 1
        if cls is dict:
            return self._dict(v, left, path, depth)
        if cls is list or cls is tuple:
            return self._seq(v, left, path, depth)
        if isinstance(v, BaseMessage):
            return self._dict(_message(v), left, path, depth)
        if isinstance(v, str):  # str subclasses, StrEnum
            return self._conv(str.__str__(v), left, path, depth)
        if isinstance(v, int):  # IntEnum and other int subclasses
            return int(v), left - 1
        if isinstance(v, float):
            return float(v), left - 1
        if isinstance(v, Mapping):
            return self._dict(v, left, path, depth)
        if isinstance(v, (list, tuple, set, frozenset)):
            return self._seq(v, left, path, depth)
        if isinstance(v, (bytes, bytearray, memoryview)):
            return f"<{len(v)} bytes>", left - 1
        if isinstance(v, BaseModel):  # its fields, shallow (no model_dump deep copy)
            return self._dict(dict(v), left, path, depth)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            fields = {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
            return self._dict(fields, left, path, depth)
        return self._conv(str(v), left, path, depth)

    # _dict and _seq handle plain scalars inline: a call per item would cost
    # more than everything else they do.
    def _dict(self, m: Mapping[Any, Any], left: int, path: str, depth: int) -> tuple[Any, int]:
        out: dict[str, Any] = {}
        keys, fn, conv = self.keys, self.fn, self._conv
        sub = path
        depth += 1
        i = 0
        for k, v in m.items():
            if left <= 0:
                out[_MORE] = f"[truncated {len(m) - i} keys]"
                break
            i += 1
            key = k if k.__class__ is str else str(k)
            left -= len(key)
            if keys is not None and key.lower() in keys:
                out[key] = REDACTED
                left -= len(REDACTED)
                continue
            if fn is not None:
                sub = f"{path}.{key}"
                v = fn(sub, v)
            cls = v.__class__
            if cls is str:
                if len(v) <= left:
                    out[key] = v
                    left -= len(v)
                else:
                    out[key] = _cut(v, max(left, 0))
                    left = 0
            elif v is None or cls is int or cls is bool or cls is float:
                out[key] = v
                left -= 1
            elif cls is list and depth < _MAX_DEPTH:
                out[key], left = self._seq(v, left, sub, depth)
            elif cls is dict and depth < _MAX_DEPTH:
                out[key], left = self._dict(v, left, sub, depth)
            else:
                out[key], left = conv(v, left, sub, depth)
        return out, left

    def _seq(self, items: Collection[Any], left: int, path: str, depth: int) -> tuple[Any, int]:
        out: list[Any] = []
        add, fn, conv = out.append, self.fn, self._conv
        sub = path
        depth += 1
        for i, item in enumerate(items):
            if left <= 0:
                add(f"…[truncated {len(items) - i} items]")
                break
            if fn is not None:
                sub = f"{path}.{i}"
                item = fn(sub, item)
            cls = item.__class__
            if cls is str:
                if len(item) <= left:
                    add(item)
                    left -= len(item)
                else:
                    add(_cut(item, max(left, 0)))
                    left = 0
            elif item is None or cls is int or cls is bool or cls is float:
                add(item)
                left -= 1
            elif cls is dict and depth < _MAX_DEPTH:
                x, left = self._dict(item, left, sub, depth)
                add(x)
            else:
                x, left = conv(item, left, sub, depth)
                add(x)
        return out, left


def redaction(
    redact: Redactor | Iterable[str] | None,
) -> tuple[frozenset[str] | None, Redactor | None]:
    if redact is None:
        return None, None
    if callable(redact):
        return None, redact
    names = [redact] if isinstance(redact, str) else list(redact)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise InvalidRequestError(
            "redact", redact, "expected a callable (path, value) -> value or key names"
        )
    return frozenset(n.lower() for n in names), None
