"""KlockClient: a drop-in for Klock's Python SDK, backed by a Klockwork engine.

Same method names and dict shapes as ``klock.KlockClient``, with klockwork's
guarantees underneath: every conflicting holder decides WAIT/DIE, unknown
agents are registered (no double grant), unknown predicates are rejected
instead of silently becoming CONSUMES, ids are unguessable, and an expired
lease is never revived by a heartbeat.
"""

from __future__ import annotations

from typing import Any

from klockwork.core.engine import Klockwork
from klockwork.core.errors import LeaseError
from klockwork.core.model import Lease

__all__ = ["KlockClient"]


def _lease_dict(lease: Lease) -> dict[str, Any]:
    return {
        "lease_id": lease.lease_id,
        "agent_id": lease.agent_id,
        "session_id": lease.session_id,
        "resource": lease.resource,
        "predicate": lease.predicate.value,
        "fencing_token": lease.fencing_token,
        "acquired_at": lease.acquired_at,
        "expires_at": lease.expires_at,
        "state": lease.state.value,
    }


class KlockClient:
    """Klock's client API over a :class:`Klockwork` engine (a fresh one by default)."""

    def __init__(self, kw: Klockwork | None = None) -> None:
        self.kw = kw if kw is not None else Klockwork()

    def register_agent(self, agent_id: str, priority: int) -> dict[str, Any]:
        """Register an agent with a wait-die priority (lower = older = wins)."""
        info = self.kw.register_agent(agent_id, priority)
        return {"success": True, "agent_id": info.agent_id, "priority": info.priority}

    def acquire_lease(
        self,
        agent_id: str,
        session_id: str,
        resource_type: str,
        resource_path: str,
        predicate: str,
        ttl_ms: int = 60_000,
    ) -> dict[str, Any]:
        """Try once. ``{"success": True, "lease_id", ...}`` or ``{"success": False,
        "reason": "WAIT" | "DIE", "wait_time": ms | None, "conflicts": [...]}``.

        Raises:
            InvalidRequestError: bad type, path, predicate or ttl.
        """
        verdict = self.kw.leases.try_acquire(
            agent_id, session_id, (f"{resource_type}:{resource_path}", predicate), ttl_ms
        )
        if verdict.granted:
            return {"success": True, **_lease_dict(verdict.lease)}
        return {
            "success": False,
            "reason": verdict.status.value,
            "wait_time": verdict.wait_time_ms,
            "conflicts": [c.model_dump(mode="json") for c in verdict.conflicts],
        }

    def release_lease(self, lease_id: str) -> bool:
        """Release; False if the lease was not active."""
        return self.kw.leases.release(lease_id)

    def heartbeat_lease(self, lease_id: str, ttl_ms: int | None = None) -> bool:
        """Extend an active lease; False if it is expired, revoked, released or unknown."""
        try:
            self.kw.leases.heartbeat(lease_id, ttl_ms)
        except LeaseError:
            return False
        return True

    def list_leases(self) -> list[dict[str, Any]]:
        """Every active lease as a dict."""
        return [_lease_dict(lease) for lease in self.kw.leases.list()]
