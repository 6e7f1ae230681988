"""``klockwork.__all__`` is the public API: pinned, so changes are deliberate."""

from __future__ import annotations

import subprocess
import sys

import klockwork

EXPECTED = [
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
    "VerifyResult",
    "Waiter",
    "__version__",
]


def test_all_is_pinned() -> None:
    assert sorted(klockwork.__all__) == EXPECTED
    assert len(set(klockwork.__all__)) == len(klockwork.__all__)


def test_every_name_resolves() -> None:
    for name in klockwork.__all__:
        assert hasattr(klockwork, name), name


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from klockwork import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == EXPECTED


def test_version() -> None:
    assert isinstance(klockwork.__version__, str)
    assert klockwork.__version__.count(".") >= 2


def test_importing_klockwork_loads_no_langchain() -> None:
    """``klockwork`` and its core import nothing from LangChain/LangGraph or integrations."""
    code = (
        "import sys, klockwork, klockwork.core.engine, klockwork.core.stores.sqlite\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('langchain', 'langchain_core', 'langgraph') or m.startswith('klockwork.integrations'))\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_importing_klockwork_needs_no_redis() -> None:
    """The redis package (the [redis] extra) is imported only when a RedisStore is opened."""
    code = (
        "import sys, klockwork, klockwork.core.engine\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'redis'))\n"
        "print(klockwork.RedisStore.__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == ["[]", "RedisStore"]
