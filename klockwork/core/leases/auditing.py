"""Lease decisions in the audit trail, recorded inside the store's atomic section."""

from __future__ import annotations

from klockwork.core.audit.log import AuditLog
from klockwork.core.audit.records import Denied, granted_data
from klockwork.core.clock import Clock
from klockwork.core.model import GovernanceEvent, LeaseRecord, Verdict, VerdictStatus
from klockwork.core.stores.base import AcquireOutcome, AcquireRequest

__all__ = ["LeaseAudit", "verdict_events"]

_GRANTED = VerdictStatus.GRANTED


class LeaseAudit:
    """Records lease decisions *inside* the store's atomic section (:class:`LeaseHooks`).

    A grant, a refusal and the end of a lease are stored with the decision:
    a durable store commits both or neither, and the in-memory store takes
    back a grant whose entry could not be recorded. A blocking acquire's
    refused tries are not outcomes (only its grant, or its one refusal when
    it gives up, is recorded); a grant after retries records how many tries
    it took and how long it waited.
    """

    __slots__ = ("_audit", "_clock")

    def __init__(self, audit: AuditLog, clock: Clock) -> None:
        self._audit = audit
        self._clock = clock

    def decided(self, request: AcquireRequest, outcome: AcquireOutcome) -> None:
        audit = self._audit
        tries = request.tries
        if outcome.status is _GRANTED:
            if tries is None or tries.count == 0:  # granted at once: the fast path
                for rec in outcome.granted:
                    audit.record_grant(rec, request.now_ms)
                return
            waited = tries.waited_ms(self._clock)
            for rec in outcome.granted:
                data = granted_data(rec, rec.expires_at)
                data["attempts"] = tries.count + 1
                data["waited_ms"] = waited
                audit.record("lease.granted", rec.agent_id, rec.session_id, data, ts=request.now_ms)
        elif tries is None:
            denied = Denied(outcome.status, outcome.blockers, outcome.wait_time_ms, request.intents)
            audit.record(
                "lease.denied", request.agent_id, request.session_id, denied, ts=request.now_ms
            )

    def ended(self, kind: str, rec: LeaseRecord, now_ms: int) -> None:
        self._audit.record_end(kind, rec, now_ms)


def verdict_events(request: AcquireRequest, verdict: Verdict) -> list[GovernanceEvent]:
    """What listeners hear of a verdict: ``lease.granted`` per lease, or one ``lease.denied``."""
    if verdict.granted:
        return [
            GovernanceEvent(
                "lease.granted",
                request.now_ms,
                request.agent_id,
                request.session_id,
                lease.__audit_data__(),
            )
            for lease in verdict.leases
        ]
    denied = Denied(verdict.status, verdict.conflicts, verdict.wait_time_ms, request.intents)
    return [
        GovernanceEvent(
            "lease.denied",
            request.now_ms,
            request.agent_id,
            request.session_id,
            denied.__audit_data__(),
        )
    ]
