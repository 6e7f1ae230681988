"""Action and agent globs: matching, and what a policy index keys them by.

Globs are ``fnmatch`` patterns (``*``, ``?``, ``[...]``), case-sensitive.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable

__all__ = ["action_rank", "is_glob", "literal_prefix", "matcher"]

_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACKETS = re.compile(r"\[[^\]]*\]|[*?]")


def is_glob(pattern: str) -> bool:
    """True if ``pattern`` has a wildcard (``*``, ``?`` or ``[``)."""
    return _GLOB_CHARS.search(pattern) is not None


def _always(_: str) -> bool:
    return True


@functools.lru_cache(maxsize=4096)
def matcher(pattern: str) -> Callable[[str], object]:
    """A compiled, case-sensitive fnmatch test for one glob."""
    if pattern == "*":
        return _always
    if not is_glob(pattern):
        return pattern.__eq__
    return re.compile(fnmatch.translate(pattern)).match


@functools.lru_cache(maxsize=4096)
def action_rank(action: str) -> tuple[int, int]:
    """How specific an action pattern is: exact first, then more literal characters."""
    if not is_glob(action):
        return (0, -len(action))
    return (1, -len(_BRACKETS.sub("", action)))


def literal_prefix(pattern: str) -> str:
    """The text before the first wildcard (all of it for an exact action)."""
    found = _GLOB_CHARS.search(pattern)
    return pattern if found is None else pattern[: found.start()]
