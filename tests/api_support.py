"""What the HTTP API tests share: one key of each role, and how to present a key."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Keys", "bearer"]


class Keys(NamedTuple):
    """One key of each role (the secrets), and an agent with an owner."""

    admin: str
    approver: str
    other_approver: str
    agent: str  # principal "builder", owned by "alice"
    other_agent: str  # principal "reviewer"
    alice: str  # an approver who runs "builder"


def bearer(key: str) -> dict[str, str]:
    """The header that presents ``key``."""
    return {"Authorization": f"Bearer {key}"}
