"""The typed error tree (DESIGN "Errors")."""

from __future__ import annotations

import pytest

import klockwork
from klockwork import (
    Conflict,
    EventLoopBlockedError,
    GateDeniedError,
    GateError,
    InvalidRequestError,
    KlockworkError,
    LeaseConflictError,
    LeaseError,
    LeaseTimeoutError,
    Predicate,
    StaleLeaseError,
)
from klockwork.core import errors

LEASE_ERRORS = [
    "LeaseConflictError",
    "LeaseTimeoutError",
    "LeaseNotFoundError",
    "LeaseExpiredError",
    "LeaseRevokedError",
    "LeaseLostError",
    "StaleLeaseError",
]
GATE_ERRORS = [
    "GateDeniedError",
    "ApprovalTimeoutError",
    "ApprovalNotFoundError",
    "NotAnApproverError",
    "CapabilityError",
]


@pytest.mark.parametrize("name", errors.__all__)
def test_every_error_is_exported_and_rooted(name: str) -> None:
    cls = getattr(errors, name)
    assert getattr(klockwork, name) is cls
    assert name in klockwork.__all__
    if issubclass(cls, Warning):  # KlockworkWarning: raised with warnings.warn, not raise
        assert issubclass(cls, UserWarning) and not issubclass(cls, KlockworkError)
        return
    assert issubclass(cls, KlockworkError)
    assert issubclass(cls, Exception)


def test_the_root_is_not_a_runtime_or_value_error() -> None:
    assert not issubclass(KlockworkError, RuntimeError)
    assert not issubclass(KlockworkError, ValueError)
    assert not issubclass(KlockworkError, OSError)
    for name in errors.__all__:
        cls = getattr(errors, name)
        if cls not in (InvalidRequestError, EventLoopBlockedError, klockwork.KlockworkWarning):
            assert not issubclass(cls, (RuntimeError, ValueError, OSError)), name


@pytest.mark.parametrize("name", LEASE_ERRORS)
def test_lease_errors(name: str) -> None:
    assert issubclass(getattr(errors, name), LeaseError)


@pytest.mark.parametrize("name", GATE_ERRORS)
def test_gate_errors(name: str) -> None:
    assert issubclass(getattr(errors, name), GateError)


def test_direct_children_of_the_root() -> None:
    for name in ("AuditIntegrityError", "StoreUnavailableError", "LeaseError", "GateError"):
        assert getattr(errors, name).__mro__[1] is KlockworkError, name


def test_invalid_request_error_names_argument_and_value() -> None:
    exc = InvalidRequestError("ttl_ms", -5, "must be positive")
    assert isinstance(exc, ValueError)
    assert (exc.argument, exc.value, exc.problem) == ("ttl_ms", -5, "must be positive")
    assert "ttl_ms" in str(exc) and "-5" in str(exc) and "must be positive" in str(exc)
    with pytest.raises(ValueError):
        raise exc


def test_event_loop_blocked_error_is_a_runtime_error() -> None:
    assert issubclass(EventLoopBlockedError, RuntimeError)


def test_langgraph_default_retry_policy() -> None:
    """LangGraph retries klockwork's errors, except bad input (retrying it never helps)."""
    from langgraph.types import default_retry_on

    assert default_retry_on(LeaseTimeoutError("WAIT"))
    assert default_retry_on(errors.StoreUnavailableError("down"))
    assert not default_retry_on(InvalidRequestError("ttl_ms", 0, "must be positive"))


def test_conflict_errors_carry_the_facts() -> None:
    conflict = Conflict(
        agent_id="holder",
        session_id="s1",
        resource="FILE:/x",
        predicate=Predicate.MUTATES,
        lease_id="abc",
    )
    waiter = conflict.model_copy(update={"agent_id": "waiter", "lease_id": None})
    exc = LeaseConflictError("DIE", [conflict, waiter], 1500)
    assert exc.reason == "DIE"
    assert exc.conflicts == [conflict, waiter]
    assert exc.wait_time_ms == 1500
    text = str(exc)
    assert "DIE" in text and "holder" in text and "holds" in text
    assert "waiter" in text and "waits for" in text
    assert "1500" in text
    assert str(LeaseConflictError("WAIT")) == "lease refused (WAIT)"
    many = LeaseConflictError("DIE", [conflict] * 7)
    assert "and 2 more" in str(many)
    assert isinstance(LeaseTimeoutError("WAIT", [conflict]).conflicts[0], Conflict)


def test_lease_ref_and_stale_errors_carry_the_facts() -> None:
    exc = errors.LeaseExpiredError("lid", "expired")
    assert exc.lease_id == "lid" and str(exc) == "expired"
    stale = StaleLeaseError("FILE:/x", 3, 7, "stale")
    assert (stale.resource, stale.fencing_token, stale.current_token) == ("FILE:/x", 3, 7)


def test_gate_denied_error_carries_the_facts() -> None:
    exc = GateDeniedError("POLICY_DENIED", policy="no-prod", conditions=[1], approval_id="a1")
    assert (exc.reason, exc.policy, exc.conditions, exc.approval_id) == (
        "POLICY_DENIED",
        "no-prod",
        [1],
        "a1",
    )
    assert "POLICY_DENIED" in str(exc)
