"""klockwork: the coordination kernel for multi-agent LangChain / LangGraph systems.

Leases on resources (six intent predicates, wait-die, TTLs, fencing), with
gates, an event bus and a verifiable audit trail built on the same engine.
"""

from typing import TYPE_CHECKING, Any

from klockwork.core.audit.chain import AuditEntry, Checkpoint, VerifyResult
from klockwork.core.audit.log import AuditPage
from klockwork.core.bus.channels import Bus
from klockwork.core.bus.listeners import Subscription
from klockwork.core.bus.model import (
    AwaitResult,
    ChannelInfo,
    Delivery,
    GroupInfo,
    Message,
)
from klockwork.core.clock import Clock, ManualClock, SystemClock
from klockwork.core.compat import KlockClient
from klockwork.core.engine import Klockwork
from klockwork.core.errors import (
    ApprovalNotFoundError,
    ApprovalTimeoutError,
    AuditIntegrityError,
    CapabilityError,
    EventLoopBlockedError,
    GateDeniedError,
    GateError,
    InvalidRequestError,
    KlockworkError,
    KlockworkWarning,
    LeaseConflictError,
    LeaseError,
    LeaseExpiredError,
    LeaseLostError,
    LeaseNotFoundError,
    LeaseRevokedError,
    LeaseTimeoutError,
    NotAnApproverError,
    StaleLeaseError,
    StoreUnavailableError,
)
from klockwork.core.governance.approvals import (
    Approval,
    ApprovalClosedError,
    ApprovalStatus,
    BreakerConfig,
)
from klockwork.core.governance.delegation import Delegation
from klockwork.core.governance.gates import ActionResult
from klockwork.core.governance.policy import Condition, ConditionResult, Effect, Policy
from klockwork.core.leases.holding import HeldLeases
from klockwork.core.model import (
    AgentInfo,
    Conflict,
    GovernanceEvent,
    Intent,
    Lease,
    LeaseState,
    Predicate,
    Verdict,
    VerdictStatus,
    Waiter,
)
from klockwork.core.stores import MemoryStore, SqliteStore, Store

if TYPE_CHECKING:
    from klockwork.core.stores.redis.store import RedisStore

__version__ = "0.1.0"

__all__ = [
    "ActionResult",
    "AgentInfo",
    "Approval",
    "ApprovalClosedError",
    "ApprovalNotFoundError",
    "ApprovalStatus",
    "ApprovalTimeoutError",
    "AuditEntry",
    "AuditIntegrityError",
    "AuditPage",
    "AwaitResult",
    "BreakerConfig",
    "Bus",
    "CapabilityError",
    "ChannelInfo",
    "Checkpoint",
    "Clock",
    "Condition",
    "ConditionResult",
    "Conflict",
    "Delegation",
    "Delivery",
    "Effect",
    "EventLoopBlockedError",
    "GateDeniedError",
    "GateError",
    "GovernanceEvent",
    "GroupInfo",
    "HeldLeases",
    "Intent",
    "InvalidRequestError",
    "KlockClient",
    "Klockwork",
    "KlockworkError",
    "KlockworkWarning",
    "Lease",
    "LeaseConflictError",
    "LeaseError",
    "LeaseExpiredError",
    "LeaseLostError",
    "LeaseNotFoundError",
    "LeaseRevokedError",
    "LeaseState",
    "LeaseTimeoutError",
    "ManualClock",
    "MemoryStore",
    "Message",
    "NotAnApproverError",
    "Policy",
    "Predicate",
    "RedisStore",
    "SqliteStore",
    "StaleLeaseError",
    "Store",
    "StoreUnavailableError",
    "Subscription",
    "SystemClock",
    "Verdict",
    "VerdictStatus",
    "Waiter",
    "VerifyResult",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # RedisStore is imported on first use: importing klockwork must not need
    # the redis package (the [redis] extra).
    if name == "RedisStore":
        from klockwork.core.stores.redis.store import RedisStore

        return RedisStore
    raise AttributeError(f"module 'klockwork' has no attribute {name!r}")
