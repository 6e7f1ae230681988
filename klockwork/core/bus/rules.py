"""The bus's pure decisions: what a group's read hands out, when a wait is over.

A store gathers the facts inside its atomic section (the group's deliveries
whose visibility timeout ran out, the visible messages it has not handed
out yet) and applies what :func:`plan_read` returns; a Redis script makes
the same decisions over XAUTOCLAIM's and XREADGROUP's answers. Like
:mod:`klockwork.core.leases.rules`, this sits below the stores and imports
only the ground floor.

The life of one message in one group::

    published ──(visible_at passes)──▶ fresh ──read──▶ pending(attempt 1)
    pending ──ack──▶ done
    pending ──visibility timeout, read──▶ pending(attempt + 1)
    pending(attempt = max_deliveries) ──visibility timeout, read──▶ <channel>.dead

Every group sees every message; within a group each delivery goes to one
consumer. Redelivery is lazy, as with ``XAUTOCLAIM``: a timed-out delivery
is handed out again by the next read of its group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

__all__ = [
    "ReadPlan",
    "await_satisfied",
    "dead_letter_payload",
    "plan_read",
    "seconds_until",
]


class ReadPlan(NamedTuple):
    """What one read of a group does, by message seq (each list in seq order)."""

    #: Timed-out deliveries handed out again, with attempt + 1.
    redeliver: list[int]
    #: Timed-out deliveries that used their last attempt: off to ``<channel>.dead``.
    dead: list[int]
    #: Messages the group sees for the first time (attempt 1).
    fresh: list[int]


def plan_read(
    expired: Sequence[tuple[int, int]],
    fresh: Sequence[int],
    count: int,
    max_deliveries: int,
) -> ReadPlan:
    """Decide one read: redeliveries first (oldest first), then new messages.

    Args:
        expired: ``(seq, attempt)`` of the group's unacked deliveries whose
            visibility timeout has run out, in seq order.
        fresh: visible messages the group has never handed out, in seq order.
        count: the most deliveries the read may return (>= 1).
        max_deliveries: attempts a message gets before it is a dead letter.

    Dead letters do not count against ``count``: a read clears every
    delivery that used its last attempt, so one poisoned message cannot
    stall a consumer asking for one message at a time.
    """
    redeliver: list[int] = []
    dead: list[int] = []
    for seq, attempt in expired:
        if attempt >= max_deliveries:
            dead.append(seq)
        elif len(redeliver) < count:
            redeliver.append(seq)
    room = count - len(redeliver)
    return ReadPlan(redeliver, dead, list(fresh[:room]) if room > 0 else [])


def dead_letter_payload(
    message: Mapping[str, Any],
    group: str,
    attempts: int,
    consumer: str | None,
    last_error: str | None,
) -> dict[str, Any]:
    """The payload published on ``<channel>.dead`` for a message a group gave up on."""
    return {
        "message": dict(message),
        "group": group,
        "attempts": attempts,
        "last_consumer": consumer,
        "last_error": last_error,
    }


def await_satisfied(mode: str, n: int, counts: Mapping[str, int]) -> bool:
    """Whether ``counts`` (channel → messages seen) satisfy an await of ``mode``.

    ``any``: one message on any channel; ``all``: one on every channel;
    ``at_least``: ``n`` messages in all.
    """
    if mode == "all":
        return all(c > 0 for c in counts.values())
    if mode == "at_least":
        return sum(counts.values()) >= n
    return any(c > 0 for c in counts.values())


def seconds_until(now_ms: int, *deadlines_ms: int | None) -> float | None:
    """Seconds from ``now_ms`` to the earliest of ``deadlines_ms`` (None: no deadline).

    Never negative: a deadline already passed gives 0.
    """
    due = [d for d in deadlines_ms if d is not None]
    if not due:
        return None
    return max(0, min(due) - now_ms) / 1000
