"""Pure lease decisions: no I/O, no clock, no locks.

Every store gathers the facts inside its own atomic section (the active
leases on overlapping resources, the older waiters' reservations) and asks
:func:`judge` for the verdict, so memory, SQLite and (through the shared
JSON vectors) Redis decide identically.

* **The KLIS matrix.** Compatible pairs (symmetric) are exactly
  PROVIDES-CONSUMES, PROVIDES-DEPENDS_ON, CONSUMES-CONSUMES,
  CONSUMES-DEPENDS_ON and DEPENDS_ON-DEPENDS_ON; every other pair conflicts.
* **Resources** are ``TYPE:path`` keys. ``FILE`` paths are normalised and
  hierarchical: ``FILE:/src`` overlaps ``FILE:/src/auth.ts``. Other types
  are opaque, exact-match keys.
* **Reentrancy.** The same agent in the same session never conflicts with
  itself; a sub-session (``t1/call-7``) is inside its parent (``t1``).
* **Wait-die.** Lower priority = older = wins; ties go to the lower agent
  id (then, for two sessions of one agent, the lower session id). A
  requester older than *every* conflicting holder waits; younger
  than *any* conflicting holder (or older waiter) dies.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from klockwork.core.errors import InvalidRequestError
from klockwork.core.model import LeaseRecord, LeaseState, Predicate, Reservation, VerdictStatus
from klockwork.core.validation import check_ttl, text_problem

#: The longest resource key (a file path may be up to 4096 bytes on Linux).
MAX_RESOURCE_CHARS = 4096

__all__ = [
    "COMPATIBLE_PAIRS",
    "HIERARCHICAL_TYPES",
    "MAX_RESOURCE_CHARS",
    "Judgement",
    "ParsedIntent",
    "ancestors",
    "compatible",
    "descendant_range",
    "is_older",
    "judge",
    "normalize_resource",
    "overlaps",
    "parse_intents",
    "parse_predicate",
    "validate_ttl",
    "within_session",
]

P = Predicate
COMPATIBLE_PAIRS: frozenset[frozenset[Predicate]] = frozenset(
    frozenset(pair)
    for pair in [
        (P.PROVIDES, P.CONSUMES),
        (P.PROVIDES, P.DEPENDS_ON),
        (P.CONSUMES, P.CONSUMES),
        (P.CONSUMES, P.DEPENDS_ON),
        (P.DEPENDS_ON, P.DEPENDS_ON),
    ]
)
# For each predicate, the set of predicates it conflicts with (fast lookup).
_CONFLICTS_WITH: dict[Predicate, frozenset[Predicate]] = {
    a: frozenset(b for b in Predicate if frozenset((a, b)) not in COMPATIBLE_PAIRS)
    for a in Predicate
}
_PREDICATES: dict[str, Predicate] = {p.value: p for p in Predicate}
_PREDICATES.update({p: p for p in Predicate})

HIERARCHICAL_TYPES = frozenset({"FILE"})
_TYPE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


def compatible(a: Predicate, b: Predicate) -> bool:
    """True when two predicates may be held at once on overlapping resources."""
    return b not in _CONFLICTS_WITH[a]


def parse_predicate(value: object, argument: str = "predicate") -> Predicate:
    """Map ``"MUTATES"`` / ``Predicate.MUTATES`` (any case) to a Predicate.

    Raises:
        InvalidRequestError: unknown predicate (never silently a CONSUMES).
    """
    found = _PREDICATES.get(value) if isinstance(value, str) else None
    if found is not None:
        return found
    if isinstance(value, str) and value.upper() in _PREDICATES:
        return _PREDICATES[value.upper()]
    raise InvalidRequestError(
        argument, value, f"unknown predicate; expected one of {', '.join(_PREDICATES)}"
    )


def normalize_resource(resource: object) -> str:
    """Canonical form of a ``TYPE:path`` key.

    The type is upper-cased. ``FILE`` paths collapse ``//``, drop a trailing
    ``/`` and resolve ``.``; a ``..`` that would escape the root (or the
    start of a relative path) is rejected. Other types keep their path as
    given (stripped of surrounding white space).

    Raises:
        InvalidRequestError: not ``TYPE:path``, empty path, escaping path,
            longer than 4096 characters, or holding NUL or a lone surrogate.
    """
    if not isinstance(resource, str):
        raise InvalidRequestError("resource", resource, "expected a 'TYPE:path' string")
    return _normalize(resource)


@functools.lru_cache(maxsize=65536)
def _normalize(resource: str) -> str:
    rtype, sep, path = resource.partition(":")
    rtype = rtype.strip()
    if not sep or not _TYPE_RE.match(rtype):
        raise InvalidRequestError(
            "resource", resource, "expected 'TYPE:path', e.g. 'FILE:/src/a.py'"
        )
    rtype = rtype.upper()
    path = path.strip()
    if not path:
        raise InvalidRequestError("resource", resource, "empty path")
    problem = text_problem(resource, MAX_RESOURCE_CHARS)
    if problem is not None:  # every store must be able to keep it as text
        raise InvalidRequestError("resource", resource, problem)
    if rtype in HIERARCHICAL_TYPES:
        path = _normalize_path(resource, path)
    return f"{rtype}:{path}"


def _normalize_path(resource: str, path: str) -> str:
    absolute = path.startswith("/")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise InvalidRequestError("resource", resource, "path escapes its root with '..'")
            parts.pop()
            continue
        parts.append(part)
    joined = "/".join(parts)
    if absolute:
        return "/" + joined
    if not joined:
        raise InvalidRequestError("resource", resource, "empty path")
    return joined


@functools.lru_cache(maxsize=65536)
def ancestors(key: str) -> tuple[str, ...]:
    """Strict ancestors of a normalised key, nearest first (empty when flat).

    ``ancestors("FILE:/a/b") == ("FILE:/a", "FILE:/")``.
    """
    rtype, _, path = key.partition(":")
    if rtype not in HIERARCHICAL_TYPES or path == "/":
        return ()
    out: list[str] = []
    cut = path.rfind("/")
    while cut > 0:
        path = path[:cut]
        out.append(f"{rtype}:{path}")
        cut = path.rfind("/")
    if cut == 0:
        out.append(f"{rtype}:/")
    return tuple(out)


def descendant_range(key: str) -> tuple[str, str] | None:
    """Half-open string range ``[lo, hi)`` holding exactly the key's descendants.

    ``None`` for flat keys. Used by stores that index keys in sorted order.
    """
    rtype, _, path = key.partition(":")
    if rtype not in HIERARCHICAL_TYPES:
        return None
    if path.endswith("/"):  # the root: descendants are longer than the key itself
        return key + "\x00", key[:-1] + "0"
    return key + "/", key + "0"  # '0' is the character after '/'


def overlaps(a: str, b: str) -> bool:
    """True when two normalised keys are equal or one contains the other."""
    return a == b or a in ancestors(b) or b in ancestors(a)


def validate_ttl(ttl_ms: object, argument: str = "ttl_ms") -> int:
    """Check a TTL is whole milliseconds, 1 ms to 7 days (see ``validation.check_ttl``)."""
    return check_ttl(ttl_ms, argument)


class ParsedIntent(NamedTuple):
    """A validated intent: normalised key, predicate and the key's ancestors."""

    key: str
    predicate: Predicate
    ancestors: tuple[str, ...]


@functools.lru_cache(maxsize=65536)
def _parse_pair(resource: str, predicate: str) -> ParsedIntent:
    key = _normalize(resource)
    return ParsedIntent(key, parse_predicate(predicate), ancestors(key))


def _parse_one(item: object) -> ParsedIntent:
    resource: object
    predicate: object
    if isinstance(item, tuple) and len(item) == 2:
        resource, predicate = item
    elif hasattr(item, "resource") and hasattr(item, "predicate"):
        resource, predicate = item.resource, item.predicate
    else:
        raise InvalidRequestError(
            "intents", item, "expected Intent(resource, predicate) or a (resource, predicate) tuple"
        )
    if isinstance(resource, str) and isinstance(predicate, str):
        return _parse_pair(resource, predicate)  # Predicate is a str: cached too
    key = normalize_resource(resource)
    return ParsedIntent(key, parse_predicate(predicate), ancestors(key))


@functools.lru_cache(maxsize=65536)
def _parse_single(resource: str, predicate: str) -> tuple[ParsedIntent, ...]:
    return (_parse_pair(resource, predicate),)


def parse_intents(intents: object) -> tuple[ParsedIntent, ...]:
    """Validate an intent, a ``(resource, predicate)`` tuple, or a list of either.

    Raises:
        InvalidRequestError: empty manifest, bad resource or unknown predicate.
    """
    single = intents
    if type(single) is list and len(single) == 1:
        single = single[0]  # a one-intent manifest is the same request
    if type(single) is tuple and len(single) == 2:
        resource, predicate = single
        if isinstance(resource, str) and isinstance(predicate, str):
            return _parse_single(resource, predicate)  # the common case, cached
    if isinstance(intents, list | tuple) and not (
        isinstance(intents, tuple) and len(intents) == 2 and isinstance(intents[0], str)
    ):
        if not intents:
            raise InvalidRequestError("intents", intents, "empty manifest")
        parsed = tuple(_parse_one(i) for i in intents)
    else:
        parsed = (_parse_one(intents),)
    return parsed


def within_session(session_id: str, holder_session: str) -> bool:
    """True when ``session_id`` is ``holder_session`` or a sub-session of it.

    Sessions nest with ``/``: ``t1/call-7`` runs inside ``t1``, so it is
    reentrant with leases ``t1`` holds — but not with its sibling
    ``t1/call-8``, nor is ``t1`` reentrant with ``t1/call-7``'s leases. This
    is how parallel tool calls of one agent in one thread exclude each other
    while still sharing what the thread itself holds.
    """
    return session_id == holder_session or session_id.startswith(holder_session + "/")


def is_older(
    a_priority: int,
    a_agent: str,
    b_priority: int,
    b_agent: str,
    a_session: str = "",
    b_session: str = "",
) -> bool:
    """Wait-die order: lower priority is older; equal priority, lower agent id.

    Two sessions of one agent (same priority, same id) are ordered by session
    id: wait-die needs a strict total order, or two sessions backing off
    against each other's reservations would both die until they time out.
    """
    if a_priority != b_priority:
        return a_priority < b_priority
    if a_agent != b_agent:
        return a_agent < b_agent
    return a_session < b_session


class Judgement(NamedTuple):
    """What :func:`judge` decided, plus the expired leases it stepped over."""

    status: VerdictStatus
    blockers: Sequence[LeaseRecord | Reservation]
    wait_time_ms: int | None
    expired: Sequence[LeaseRecord]


_GRANT_NOTHING_EXPIRED = Judgement(VerdictStatus.GRANTED, (), None, ())


def judge(
    agent_id: str,
    session_id: str,
    priority: int,
    intents: Sequence[ParsedIntent],
    candidates: Sequence[Iterable[LeaseRecord]],
    reservations: Iterable[Reservation],
    now_ms: int,
) -> Judgement:
    """Decide a lease request from the facts a store gathered atomically.

    Args:
        agent_id, session_id, priority: the requester.
        intents: the request (a manifest: all granted or none).
        candidates: for each intent, the ACTIVE leases on overlapping keys.
            Leases past their expiry are ignored (and reported in
            ``expired`` so the store can mark them).
        reservations: older waiters' claims on overlapping keys (any intent).
        now_ms: the store's current time.

    Returns:
        ``GRANTED`` if nothing blocks; ``WAIT`` if the requester is older
        than every conflicting holder (and no older waiter is in the way);
        ``DIE`` if it is younger than any conflicting holder or waiter.
    """
    # Allocation-free fast path: nothing overlaps and nobody waits.
    if not reservations and not any(candidates):
        return _GRANT_NOTHING_EXPIRED
    blockers: list[LeaseRecord | Reservation] = []
    expired: list[LeaseRecord] = []
    seen: set[str] = set()
    dies = False
    wait_time: int | None = None
    for intent, holders in zip(intents, candidates, strict=True):
        conflicting = _CONFLICTS_WITH[intent.predicate]
        for h in holders:
            if h.state is not LeaseState.ACTIVE:
                continue
            if h.expires_at <= now_ms:
                if h.lease_id not in seen:
                    seen.add(h.lease_id)
                    expired.append(h)
                continue
            if h.predicate not in conflicting:
                continue
            if h.agent_id == agent_id and within_session(session_id, h.session_id):
                continue  # reentrant: same agent, same session (or a sub-session of it)
            if h.lease_id in seen:
                continue
            seen.add(h.lease_id)
            blockers.append(h)
            if not is_older(priority, agent_id, h.priority, h.agent_id, session_id, h.session_id):
                dies = True
            remaining = h.expires_at - now_ms
            if wait_time is None or remaining < wait_time:
                wait_time = remaining
    for r in reservations:
        if r.expires_at <= now_ms or (r.agent_id == agent_id and r.session_id == session_id):
            continue
        if is_older(priority, agent_id, r.priority, r.agent_id, session_id, r.session_id):
            continue  # an older newcomer may go before a younger waiter
        if any(
            r.predicate in _CONFLICTS_WITH[i.predicate]
            and (r.resource == i.key or r.resource in i.ancestors or i.key in ancestors(r.resource))
            for i in intents
        ):
            blockers.append(r)
            dies = True
    if not blockers:
        return Judgement(VerdictStatus.GRANTED, blockers, None, expired)
    return Judgement(
        VerdictStatus.DIE if dies else VerdictStatus.WAIT, blockers, wait_time, expired
    )
