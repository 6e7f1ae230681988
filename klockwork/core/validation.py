"""Checks every public entry point applies to what callers pass in (the ground floor).

Each check returns the value it accepted, or raises
:class:`~klockwork.InvalidRequestError` naming the argument and saying what
is wrong, before anything is changed:

* :func:`check_identity` — agent ids, session ids, approvers: text a
  person would read as one name. NFC-normalised, no leading or trailing
  white space, no control, invisible format or unpaired surrogate
  characters, at most :data:`MAX_IDENTITY_CHARS`. Two spellings of one
  identity (``"merger"``, ``" merger"``, ``"merger\\u200b"``) can then never
  act as two principals (self-approval, a second vote in a quorum).
* :func:`check_timeout` — seconds to wait: a finite number >= 0 (NaN,
  infinity and absurd values would hang or overflow the waiting code), or
  None where waiting without a limit is allowed.
* :func:`check_ttl` — a lease lifetime: whole milliseconds, 1 ms to
  :data:`MAX_TTL_MS` (7 days; renewals keep a longer-lived holder alive).
* :func:`check_key` — an id klockwork handed out or a name (lease ids,
  approval ids, policy names, audit kinds): non-empty text, at most
  :data:`MAX_KEY_CHARS`, storable (valid UTF-8, no NUL).
* :func:`check_text` — free text a person reads (reasons, comments):
  storable, at most :data:`MAX_TEXT_CHARS`.
* :func:`check_int`, :func:`check_flag`, :func:`check_path` — a bounded
  int (64-bit, as every store keeps it), a real ``bool``, a file path.

Identities are checked on every lease request, so the common case — ASCII
text already seen — costs a set lookup.
"""

from __future__ import annotations

import math
import os
import unicodedata
from typing import Any

from klockwork.core.errors import InvalidRequestError

__all__ = [
    "INT64_MAX",
    "MAX_IDENTITY_CHARS",
    "MAX_JSON_DEPTH",
    "MAX_KEY_CHARS",
    "MAX_TEXT_CHARS",
    "MAX_TIMEOUT_S",
    "MAX_TTL_MS",
    "check_flag",
    "check_identity",
    "check_int",
    "check_json_object",
    "check_key",
    "check_path",
    "check_text",
    "check_timeout",
    "check_ttl",
    "json_problem",
    "same_identity",
    "text_problem",
]

#: The longest identity accepted, in characters.
MAX_IDENTITY_CHARS = 256
#: The longest lease TTL: 7 days (a holder that needs longer renews).
MAX_TTL_MS = 7 * 24 * 3600 * 1000
#: How deeply JSON data (gate metadata, payloads) may nest.
MAX_JSON_DEPTH = 32
#: The longest wait a timeout may ask for: one year (use None for "no limit").
MAX_TIMEOUT_S = 365 * 24 * 3600.0
#: The longest id or name (lease and approval ids, event ids, policy names).
MAX_KEY_CHARS = 1024
#: The longest free text (a reason, a comment, a report message).
MAX_TEXT_CHARS = 10_000
#: The largest int a store keeps (SQLite INTEGER, Redis, JSON readers).
INT64_MAX = 2**63 - 1

# Categories that make two strings look alike while differing: controls,
# invisible format characters (zero-width space, joiners, bidi marks), line
# and paragraph separators, unpaired surrogates and unassigned code points.
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Cn", "Zl", "Zp"})
_SEEN: set[str] = set()
_SEEN_MAX = 65_536


def check_identity(value: object, argument: str) -> str:
    """``value`` if it is a usable identity (see the module docstring); else raise.

    Raises:
        InvalidRequestError: not a string, empty, too long, not NFC, padded
            with white space, or holding a control or invisible character.
    """
    if isinstance(value, str) and value in _SEEN:
        return value
    if not isinstance(value, str):
        raise InvalidRequestError(argument, value, "must be a string")
    problem = _identity_problem(value)
    if problem is not None:
        raise InvalidRequestError(argument, value, problem)
    if len(_SEEN) >= _SEEN_MAX:
        _SEEN.clear()
    _SEEN.add(value)
    return value


def same_identity(a: str, b: str) -> bool:
    """True if ``a`` and ``b`` name one principal: equal ignoring case.

    Ids are stored as given (case-sensitive keys), but wherever one
    principal must not act as two — approving its own request, voting twice
    towards a quorum — ``"Merger"`` counts as ``"merger"``.
    """
    return a == b or a.casefold() == b.casefold()


def _identity_problem(value: str) -> str | None:
    if not value:
        return "must not be empty"
    if len(value) > MAX_IDENTITY_CHARS:
        return f"is {len(value)} characters long; at most {MAX_IDENTITY_CHARS}"
    if value != value.strip():
        return "must not start or end with white space"
    if value.isascii():
        return None if value.isprintable() else "must not contain control characters"
    for ch in value:
        if unicodedata.category(ch) in _INVISIBLE:
            return f"must not contain control or invisible characters (U+{ord(ch):04X})"
    if unicodedata.normalize("NFC", value) != value:
        return "must be NFC-normalised (one spelling per name)"
    return None


def check_timeout(
    value: object, argument: str = "timeout_s", *, allow_none: bool = True
) -> float | None:
    """``value`` as seconds to wait (or None where allowed); else raise.

    Raises:
        InvalidRequestError: not a number, NaN, negative, infinite or over
            :data:`MAX_TIMEOUT_S`, or None where a number is needed.
    """
    if value is None:
        if allow_none:
            return None
        raise InvalidRequestError(argument, value, "must be a number of seconds")
    if value.__class__ is bool or not isinstance(value, (int, float)):
        raise InvalidRequestError(argument, value, "must be a number of seconds or None")
    if isinstance(value, float) and math.isnan(value):
        raise InvalidRequestError(argument, value, "must be a number, not NaN")
    if value < 0:
        raise InvalidRequestError(argument, value, "must be >= 0 seconds")
    if value > MAX_TIMEOUT_S:
        hint = "; use None to wait without a limit" if allow_none else ""
        raise InvalidRequestError(
            argument, value, f"must be finite and at most {MAX_TIMEOUT_S:.0f} seconds{hint}"
        )
    return float(value)


def check_ttl(value: object, argument: str = "ttl_ms") -> int:
    """``value`` if it is a lease lifetime in whole milliseconds (1 to :data:`MAX_TTL_MS`).

    Raises:
        InvalidRequestError: not an int, <= 0, or over 7 days.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidRequestError(argument, value, "must be a positive int of milliseconds")
    if value > MAX_TTL_MS:
        raise InvalidRequestError(
            argument, value, f"must be at most {MAX_TTL_MS} ms (7 days); renew to hold longer"
        )
    return value


def check_json_object(value: object, argument: str) -> dict[str, Any]:
    """``value`` if it is a JSON object (str keys; JSON values; text that is valid UTF-8).

    What is stored and audited must be storable as text exactly as given:
    no non-string keys, bytes, sets, objects, NaN or infinities, lone
    surrogates, or nesting deeper than :data:`MAX_JSON_DEPTH`.

    Raises:
        InvalidRequestError: naming ``argument`` and where in it the problem is.
    """
    if not isinstance(value, dict):
        raise InvalidRequestError(argument, value, "must be a JSON object (a dict with str keys)")
    problem = _json_problem(value, 0)
    if problem is not None:
        raise InvalidRequestError(argument, value, problem)
    return value


def json_problem(value: object) -> str | None:
    """What makes ``value`` not storable JSON data (see :func:`check_json_object`), or None."""
    return _json_problem(value, 0)


def _json_problem(value: object, depth: int, where: str = "") -> str | None:
    if depth > MAX_JSON_DEPTH:
        return f"nests deeper than {MAX_JSON_DEPTH} levels{_at(where)}"
    if value is None or value.__class__ in (bool, int):
        return None
    if isinstance(value, str):
        return _text_problem(value, where)
    if isinstance(value, float):
        return (
            None
            if math.isfinite(value)
            else f"holds {value!r}, which JSON has no spelling for{_at(where)}"
        )
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"has a key that is not a string ({key!r}){_at(where)}"
            path = f"{where}.{key}" if where else key
            problem = _text_problem(key, path) or _json_problem(item, depth + 1, path)
            if problem is not None:
                return problem
        return None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            problem = _json_problem(item, depth + 1, f"{where}[{index}]")
            if problem is not None:
                return problem
        return None
    return f"holds a {type(value).__name__}, which is not JSON data{_at(where)}"


def _text_problem(text: str, where: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return f"holds text that is not valid UTF-8 (a lone surrogate){_at(where)}"
    return None


def _at(where: str) -> str:
    return f" at {where}" if where else ""


def check_key(value: object, argument: str, *, max_chars: int = MAX_KEY_CHARS) -> str:
    """``value`` if it is usable as an id or a name; else raise.

    Raises:
        InvalidRequestError: not a string, empty, over ``max_chars``
            (:data:`MAX_KEY_CHARS` by default), holding NUL or text that is not valid UTF-8.
    """
    if not isinstance(value, str):
        raise InvalidRequestError(argument, value, "must be a string")
    if not value:
        raise InvalidRequestError(argument, value, "must not be empty")
    return check_text(value, argument, max_chars=max_chars)


def check_text(value: object, argument: str, *, max_chars: int = MAX_TEXT_CHARS) -> str:
    """``value`` if it is storable text of at most ``max_chars`` characters; else raise.

    Raises:
        InvalidRequestError: not a string, too long, holding NUL or a lone surrogate.
    """
    if not isinstance(value, str):
        raise InvalidRequestError(argument, value, "must be a string")
    problem = text_problem(value, max_chars)
    if problem is not None:
        raise InvalidRequestError(argument, value, problem)
    return value


def text_problem(text: str, max_chars: int) -> str | None:
    """What makes ``text`` unstorable (too long, NUL, a lone surrogate), or None."""
    if len(text) > max_chars:
        return f"is {len(text)} characters long; at most {max_chars}"
    if "\x00" in text:
        return "must not contain NUL characters"
    if text.isascii():  # the common case: no surrogate possible
        return None
    return _text_problem(text, "")


def check_int(value: object, argument: str, *, low: int = 0, high: int = INT64_MAX) -> int:
    """``value`` if it is an int (not a bool) from ``low`` to ``high``; else raise.

    Raises:
        InvalidRequestError: not an int, or out of range.
    """
    if value.__class__ is bool or not isinstance(value, int):
        raise InvalidRequestError(argument, value, "must be an int")
    if not low <= value <= high:
        raise InvalidRequestError(argument, value, f"must be from {low} to {high}")
    return value


def check_flag(value: object, argument: str) -> bool:
    """``value`` if it is True or False (not 0, 1 or another truthy value); else raise."""
    if value.__class__ is not bool:
        raise InvalidRequestError(argument, value, "must be True or False")
    return bool(value)


def check_path(value: object, argument: str = "path") -> str:
    """``value`` as a file path string (a ``str`` or an ``os.PathLike``); else raise.

    An int is refused although ``open()`` takes one: it would write into an
    open file descriptor (``export(True)`` writing over stdout).

    Raises:
        InvalidRequestError: another type, an empty path, NUL or a lone surrogate.
    """
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise InvalidRequestError(argument, value, "must be a path (str or os.PathLike)")
    if not value:
        raise InvalidRequestError(argument, value, "must not be empty")
    return check_text(value, argument, max_chars=4096)
