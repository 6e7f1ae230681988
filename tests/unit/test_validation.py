"""Boundary checks: identities, timeouts and TTLs are refused with a typed error, never hang."""

from __future__ import annotations

import math
import threading
import time
import unicodedata
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klockwork import InvalidRequestError, Klockwork, ManualClock, NotAnApproverError, Policy
from klockwork.core.validation import (
    MAX_IDENTITY_CHARS,
    MAX_TTL_MS,
    check_identity,
    check_timeout,
    check_ttl,
)

SPELLINGS = [" merger", "merger ", "merger\n", "merger\u200b", "mer\u200dger", "\u202emerger"]


@pytest.mark.parametrize("value", ["merger", "team-a", "ops/deploy-bot", "Zoë", "엘리스", "a b"])
def test_ordinary_names_are_identities(value: str) -> None:
    assert check_identity(value, "agent_id") == value


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("", "must not be empty"),
        (" merger", "white space"),
        ("merger\t", "white space"),
        ("mer\nger", "control characters"),
        ("merger\u200b", "U+200B"),
        ("mer\u00adger", "U+00AD"),  # soft hyphen: invisible
        ("e\u0301", "NFC"),  # e + combining acute: the NFC spelling is "é"
        ("x" * (MAX_IDENTITY_CHARS + 1), "at most 256"),
        ("\ud800", "U+D800"),  # a lone surrogate
        (42, "must be a string"),
        (None, "must be a string"),
        (b"merger", "must be a string"),
    ],
)
def test_spellings_that_could_pass_for_another_name_are_refused(value: Any, says: str) -> None:
    with pytest.raises(InvalidRequestError, match="approver") as info:
        check_identity(value, "approver")
    assert says in str(info.value)
    assert info.value.argument == "approver"


@given(st.text(min_size=1, max_size=40))
def test_every_accepted_identity_has_one_spelling(value: str) -> None:
    try:
        accepted = check_identity(value, "agent_id")
    except InvalidRequestError:
        return
    assert accepted == value == value.strip() == unicodedata.normalize("NFC", value)
    assert not any(unicodedata.category(c) in {"Cc", "Cf", "Cs", "Zl", "Zp"} for c in value)


@pytest.mark.parametrize("value", [0, 0.5, 3, 86_400.0])
def test_finite_timeouts_are_seconds(value: float) -> None:
    assert check_timeout(value) == float(value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1, 10**400, 1e300, True, "1"])
def test_timeouts_that_would_hang_or_overflow_are_refused(value: Any) -> None:
    with pytest.raises(InvalidRequestError, match="timeout_s"):
        check_timeout(value)


def test_ttls_are_bounded_to_a_week() -> None:
    assert check_ttl(MAX_TTL_MS) == MAX_TTL_MS
    for bad in (0, MAX_TTL_MS + 1, 10**14, 2**62, 1.5, True):
        with pytest.raises(InvalidRequestError, match="ttl_ms"):
            check_ttl(bad)


# -- at the engine's entry points ----------------------------------------------------
@pytest.fixture
def kw() -> Any:
    engine = Klockwork()
    engine.policies.add(Policy(name="ask", action="pr.merge", effect="require_approval", quorum=2))
    yield engine
    engine.close()


@pytest.mark.parametrize("approver", SPELLINGS)
def test_no_self_approval_under_another_spelling(kw: Klockwork, approver: str) -> None:
    approval_id = kw.gates.execute("merger", "pr.merge").approval_id or ""
    with pytest.raises(InvalidRequestError, match="approver"):
        kw.approvals.approve(approval_id, approver)
    with pytest.raises(NotAnApproverError):
        kw.approvals.approve(approval_id, "merger")
    assert kw.approvals.get(approval_id).decisions == []


def test_one_person_cannot_make_a_quorum_of_two(kw: Klockwork) -> None:
    approval_id = kw.gates.execute("merger", "pr.merge").approval_id or ""
    kw.approvals.approve(approval_id, "team-a")
    with pytest.raises(InvalidRequestError, match="approver"):
        kw.approvals.approve(approval_id, "team-a ")
    assert kw.approvals.get(approval_id).status.value == "pending"


@pytest.mark.parametrize("approver", ["Merger", "MERGER", "merGer"])
def test_no_self_approval_in_another_case(kw: Klockwork, approver: str) -> None:
    approval_id = kw.gates.execute("merger", "pr.merge").approval_id or ""
    with pytest.raises(NotAnApproverError):
        kw.approvals.approve(approval_id, approver)
    assert kw.approvals.get(approval_id).decisions == []


def test_one_person_in_two_cases_is_one_vote(kw: Klockwork) -> None:
    approval_id = kw.gates.execute("merger", "pr.merge").approval_id or ""
    kw.approvals.approve(approval_id, "team-a")
    assert kw.approvals.approve(approval_id, "Team-A").status.value == "pending"
    assert len(kw.approvals.get(approval_id).decisions) == 1


def test_a_delegate_cannot_approve_its_parent_in_another_case(kw: Klockwork) -> None:
    with kw.delegate("lead", "reviewer", ["*"], ttl_s=60) as child:
        approval_id = kw.gates.execute("lead", "pr.merge").approval_id or ""
        with pytest.raises(NotAnApproverError):
            kw.approvals.approve(approval_id, child.agent_id.upper())


@pytest.mark.parametrize("agent", SPELLINGS)
def test_agents_and_sessions_are_checked_where_they_enter(kw: Klockwork, agent: str) -> None:
    calls = [
        lambda: kw.leases.try_acquire(agent, "s", ("FILE:/a", "MUTATES")),
        lambda: kw.leases.try_acquire("a", agent, ("FILE:/a", "MUTATES")),
        lambda: kw.register_agent(agent),
        lambda: kw.gates.execute(agent, "pr.merge"),
        lambda: kw.revoke_agent(agent),
    ]
    for call in calls:
        with pytest.raises(InvalidRequestError):
            call()
    assert kw.leases.list() == [] and kw.approvals.list() == []


@pytest.mark.parametrize("timeout", [math.nan, math.inf, 10**400])
def test_bad_timeouts_are_refused_before_anything_waits_or_changes(
    kw: Klockwork, timeout: float
) -> None:
    kw.leases.try_acquire("young", "s", ("FILE:/x", "MUTATES"), 60_000)
    kw.register_agent("old", 0)
    approval_id = kw.gates.execute("bot", "pr.merge").approval_id or ""
    started = time.monotonic()
    for call in (
        lambda: kw.leases.acquire("old", "s", ("FILE:/x", "MUTATES"), timeout_s=timeout),
        lambda: kw.approvals.wait(approval_id, timeout_s=timeout),
        lambda: kw.gates.gate("bot", "pr.merge", timeout_s=timeout),
    ):
        with pytest.raises(InvalidRequestError, match="timeout_s"):
            call()
    assert time.monotonic() - started < 1
    assert len(kw.approvals.list()) == 1  # the refused gate opened nothing


def test_a_huge_ttl_is_refused_and_renewals_survive_one_bad_holder() -> None:
    clock = ManualClock()
    kw = Klockwork(clock=clock)
    with pytest.raises(InvalidRequestError, match="ttl_ms"):
        kw.leases.acquire("a", "s", ("FILE:/x", "MUTATES"), 10**14)
    renewer = kw.leases._renewer

    class Broken:
        lease_ids = property(lambda self: (_ for _ in ()).throw(OverflowError("boom")))
        lost: str | None = None

        def mark_lost(self, reason: str) -> None:
            self.lost = reason

    broken = Broken()
    renewer.add(broken, 0.1)
    with kw.lease("a", "s", "FILE:/y", ttl_ms=300) as held:
        for _ in range(10):  # 10 x 100 ms past a 300 ms TTL: only renewals keep it
            clock.advance(100)
            deadline = time.monotonic() + 2
            while held.lost is False and time.monotonic() < deadline:
                lease = kw.leases.get(held.lease.lease_id)
                if lease is not None and lease.expires_at > clock.now_ms() + 150:
                    break
                time.sleep(0.001)
        assert not held.lost
        assert kw.leases.try_acquire("b", "s", ("FILE:/y", "MUTATES")).status.value != "GRANTED"
    assert broken.lost is not None and "boom" in broken.lost
    assert threading.active_count() >= 1
    kw.close()
