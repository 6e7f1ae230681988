"""What the Redis lease scripts are sent and what they answer, in Python (no I/O).

The sync and async calls of :class:`~klockwork.core.stores.redis.store.RedisStore`
build their arguments and read the replies here, so only the I/O differs
between them (and the resolution of lost replies reads them the same way).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from klockwork.core.leases.rules import ParsedIntent
from klockwork.core.model import (
    AgentInfo,
    LeaseRecord,
    LeaseState,
    Predicate,
    Reservation,
    VerdictStatus,
)
from klockwork.core.stores.base import AcquireOutcome

__all__ = ["agent_info", "acquire_outcome", "intent_args", "lease_record", "rows"]

_PREDICATE = {p.value: p for p in Predicate}
_STATE = {s.value: s for s in LeaseState}
_STATUS = {s.value: s for s in VerdictStatus}


def lease_record(row: Sequence[Any]) -> LeaseRecord:
    """A lease row of a script (``row`` in :data:`.lua.LIB`) as a LeaseRecord."""
    return LeaseRecord(
        row[0],
        row[1],
        row[2],
        row[3],
        _PREDICATE[row[4]],
        int(row[5]),
        int(row[6]),
        int(row[7]),
        int(row[8]),
        int(row[9]),
        _STATE[row[10]],
        row[11],
    )


def blocker(row: Sequence[Any]) -> LeaseRecord | Reservation:
    if row[0] == "R":  # a waiter's reservation: R agent session key predicate priority until
        return Reservation(row[1], row[2], row[3], _PREDICATE[row[4]], int(row[5]), int(row[6]))
    return lease_record(row)


def reservations(stored: str | bytes) -> list[Reservation]:
    """A waiter's reservation as the acquire script stores it (one per intent it waits for).

    ``{"a": agent, "s": session, "pr": priority, "u": until, "i": [[key, predicate], ...]}``.
    """
    r = json.loads(stored)
    return [
        Reservation(r["a"], r["s"], key, _PREDICATE[predicate], int(r["pr"]), int(r["u"]))
        for key, predicate in rows(r["i"])
    ]


def rows(value: Any) -> list[Any]:
    # cjson encodes an empty Lua table as {}: an empty list here.
    return value if isinstance(value, list) else []


def intent_args(intent: ParsedIntent, *extra: str) -> list[str]:
    """An intent as the scripts read it (``read_intents``): key, predicate, ancestors, extra."""
    return [
        intent.key,
        intent.predicate.value,
        str(len(intent.ancestors)),
        *intent.ancestors,
        *extra,
    ]


def acquire_outcome(res: Any) -> tuple[AcquireOutcome, list[LeaseRecord], int]:
    """The acquire script's reply: the outcome, the leases it marked expired, its time."""
    outcome = AcquireOutcome(
        _STATUS[res["st"]],
        [lease_record(r) for r in rows(res["granted"])],
        [blocker(r) for r in rows(res["blockers"])],
        res["wait"],
    )
    return outcome, [lease_record(r) for r in rows(res["expired"])], int(res["now"])


def agent_info(agent_id: str, p: Any, r: Any, v: Any) -> AgentInfo:
    """An agent as the scripts store it (priority, registered at, revoked at)."""
    return AgentInfo(
        agent_id=agent_id,
        priority=int(p),
        registered_at=int(r),
        revoked_at=None if v is None else int(v),
    )
