"""What the lease manager hands to the audit trail, and its direct JSON format.

The lease manager records each decision with as little work as possible on
its own thread; the audit writer builds the entry's data later. So what it
hands over must not change in between:

* A grant is recorded from the store's :class:`~klockwork.core.model.LeaseRecord`
  plus its ``expires_at`` at that moment (:meth:`AuditLog.record_grant
  <klockwork.core.audit.log.AuditLog.record_grant>`): every other field it
  records (id, resource, predicate, fencing token) never changes. Its data
  is the :class:`~klockwork.core.model.Lease` snapshot's ``__audit_data__()``
  (:func:`granted_data`).
* An ended lease (released, expired, revoked) is recorded from its final
  record (:meth:`AuditLog.record_end <klockwork.core.audit.log.AuditLog.record_end>`);
  its data is the record's ``__audit_data__()``.
* A refusal is recorded as a :class:`Denied`, the verdict with the intents.

Handing over the store's record, not a new snapshot, also means recording
creates no object the garbage collector tracks: with a writer batch of
pending entries alive at any moment, such objects would be promoted to the
old generations and make full collections frequent (measured: several
microseconds per lease cycle).

:func:`~klockwork.core.audit.encode.encode_batch` formats the data of the
first two as canonical JSON text directly, and :meth:`Denied.__audit_json__`
that of the third, for the writer's fast path (the contract is in
:mod:`klockwork.core.audit.canonical`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from klockwork.core.audit.canonical import INT_LIMIT, json_str
from klockwork.core.leases.rules import ParsedIntent
from klockwork.core.model import LeaseRecord, Predicate, VerdictStatus

__all__ = ["Denied", "granted_data"]

_ODD = "not a field type the direct format takes"


def granted_data(rec: LeaseRecord, expires_at: int) -> dict[str, Any]:
    """A ``lease.granted`` entry's data: the snapshot's, with ``expires_at`` as granted."""
    data = rec.snapshot().__audit_data__()
    data["expires_at"] = expires_at
    return data


class Denied(NamedTuple):
    r"""A refused request as the audit writer turns it into ``lease.denied`` data.

    ``blockers`` are the store's records of what blocked it (leases and
    reservations), or the verdict's :class:`~klockwork.core.model.Conflict`\ s:
    both have ``agent_id``, ``session_id``, ``resource`` and ``predicate``,
    and a lease has a ``lease_id``. ``attempts`` and ``waited_ms`` are set
    for a blocking acquire that gave up (its one entry); a single try
    (``try_acquire``) leaves them out.
    """

    status: VerdictStatus
    blockers: Sequence[Any]
    wait_time_ms: int | None
    intents: tuple[ParsedIntent, ...]
    attempts: int | None = None
    waited_ms: int | None = None

    def __audit_data__(self) -> dict[str, Any]:
        data = {
            "verdict": self.status.value,
            "intents": [[i.key, i.predicate.value] for i in self.intents],
            "conflicts": [
                {
                    "agent_id": b.agent_id,
                    "lease_id": getattr(b, "lease_id", None),
                    "predicate": b.predicate.value,
                    "resource": b.resource,
                    "session_id": b.session_id,
                }
                for b in self.blockers
            ],
            "wait_time_ms": self.wait_time_ms,
        }
        if self.attempts is not None:
            data["attempts"] = self.attempts
            data["waited_ms"] = self.waited_ms
            data["timed_out"] = True
        return data

    def __audit_json__(self) -> str:
        """:meth:`__audit_data__` as canonical JSON text (see :mod:`.canonical`)."""
        status, wait = self.status, self.wait_time_ms
        if (
            self.attempts is not None
            or status.__class__ is not VerdictStatus
            or not (wait is None or (wait.__class__ is int and -INT_LIMIT < wait < INT_LIMIT))
        ):
            raise TypeError(_ODD)  # rare (a timed-out acquire): the generic path
        conflicts = []
        for b in self.blockers:
            agent, session, resource = b.agent_id, b.session_id, b.resource
            predicate, lease_id = b.predicate, getattr(b, "lease_id", None)
            if not (
                agent.__class__ is str
                and session.__class__ is str
                and resource.__class__ is str
                and predicate.__class__ is Predicate
                and (lease_id is None or lease_id.__class__ is str)
            ):
                raise TypeError(_ODD)
            conflicts.append(
                f'{{"agent_id":{json_str(agent)},'
                f'"lease_id":{"null" if lease_id is None else json_str(lease_id)},'
                f'"predicate":"{predicate._value_}","resource":{json_str(resource)},'
                f'"session_id":{json_str(session)}}}'
            )
        intents = []
        for intent in self.intents:
            key, predicate = intent.key, intent.predicate
            if key.__class__ is not str or predicate.__class__ is not Predicate:
                raise TypeError(_ODD)
            intents.append(f'[{json_str(key)},"{predicate._value_}"]')
        return (
            f'{{"conflicts":[{",".join(conflicts)}],"intents":[{",".join(intents)}],'
            f'"verdict":"{status._value_}","wait_time_ms":{"null" if wait is None else wait}}}'
        )
