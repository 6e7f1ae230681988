"""Capabilities and delegation at the engine level, on both stores.

Every escalation is refused with :class:`CapabilityError` and creates
nothing; a child is bounded by its capabilities, keeps its parent's
priority, and is revoked (with its leases) when its block is left or an
ancestor is revoked; ``parallel`` never leaks a delegation; nobody in a
lineage approves a request of that lineage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from klockwork import (
    CapabilityError,
    GateDeniedError,
    InvalidRequestError,
    Klockwork,
    ManualClock,
    NotAnApproverError,
    Policy,
)

from .test_gates import entries

Engine = Callable[..., Klockwork]


def allow_all(kw: Klockwork) -> Klockwork:
    kw.policies.add(Policy(name="all", action="*", effect="allow"))
    return kw


def refused(kw: Klockwork, parent: str, name: str, caps: list[str], ttl_s: float) -> None:
    with pytest.raises(CapabilityError), kw.delegate(parent, name, caps, ttl_s):
        pytest.fail("an escalation must not be delegated")


def nothing_created(kw: Klockwork, *agent_ids: str) -> None:
    for agent_id in agent_ids:
        assert kw.get_agent(agent_id) is None
    assert entries(kw, "delegation.created") == []


# -- escalations ----------------------------------------------------------------------


def test_capabilities_beyond_the_parent_are_refused(engine: Engine) -> None:
    kw = engine()
    kw.register_agent("lead", capabilities=["pr.*", "issue.read"])
    for caps in (["pr.*", "deploy"], ["*"], ["issue.*"], ["pr*"]):
        with pytest.raises(CapabilityError), kw.delegate("lead", "sub", caps, ttl_s=60):
            pass
    nothing_created(kw, "lead/sub")


def test_ttl_beyond_the_parents_expiry_is_refused(engine: Engine) -> None:
    kw = engine()
    kw.register_agent("lead", capabilities=["pr.*"])
    with kw.delegate("lead", "child", ["pr.*"], ttl_s=60) as child:
        refused(kw, child.agent_id, "grandchild", ["pr.*"], 999_999)
        assert kw.get_agent("lead/child/grandchild") is None
        with kw.delegate(child.agent_id, "grandchild", ["pr.read"], ttl_s=60) as gc:
            assert gc.expires_at_ms == child.expires_at_ms
    assert len(entries(kw, "delegation.created")) == 2


def test_a_revoked_parent_cannot_delegate(engine: Engine) -> None:
    kw = engine()
    kw.register_agent("lead")
    assert kw.revoke_agent("lead") == ["lead"]
    with pytest.raises(CapabilityError), kw.delegate("lead", "sub", ["x"], ttl_s=60):
        pass
    nothing_created(kw, "lead/sub")
    assert kw.gates.can_i("lead", "x").denial_reason == "CAPABILITY_DENIED"


def test_an_expired_delegate_cannot_act_or_delegate(engine: Engine, clock: ManualClock) -> None:
    kw = allow_all(engine())
    with kw.delegate("lead", "sub", ["x.*"], ttl_s=10) as child:
        assert kw.gates.execute(child.agent_id, "x.y").status == "executed"
        clock.advance(10_000)
        assert kw.gates.execute(child.agent_id, "x.y").denial_reason == "CAPABILITY_DENIED"
        refused(kw, child.agent_id, "gc", ["x.*"], 1)


def test_re_registering_a_delegate_with_wider_capabilities_is_refused(engine: Engine) -> None:
    kw = allow_all(engine())
    kw.register_agent("lead", capabilities=["pr.*"])
    with kw.delegate("lead", "sub", ["pr.read"], ttl_s=60) as child:
        with pytest.raises(CapabilityError):
            kw.register_agent(child.agent_id, capabilities=["*"])
        info = kw.get_agent(child.agent_id)
        assert info is not None and info.capabilities == ["pr.read"]
        assert kw.gates.execute(child.agent_id, "pr.merge").denial_reason == "CAPABILITY_DENIED"


def test_grandchild_wider_than_child_is_refused(engine: Engine) -> None:
    kw = engine()
    kw.register_agent("lead", capabilities=["pr.*"])
    with kw.delegate("lead", "child", ["pr.read"], ttl_s=60) as child:
        refused(kw, child.agent_id, "gc", ["pr.*"], 30)
        assert kw.get_agent("lead/child/gc") is None
    assert len(entries(kw, "delegation.created")) == 1


def test_taken_name_and_bad_arguments(engine: Engine) -> None:
    kw = engine()
    with kw.delegate("lead", "sub", ["x"], ttl_s=60):
        refused(kw, "lead", "sub", ["x"], 60)
    for args, argument in [
        (("lead", "sub", "x", 60), "capabilities"),
        (("lead", "sub", ["x"], 0), "ttl_s"),
        (("lead", "sub", ["x"], float("inf")), "ttl_s"),
        (("lead", "a/b", ["x"], 60), "name"),
        (("", "sub", ["x"], 60), "parent_id"),
    ]:
        with pytest.raises(InvalidRequestError) as err, kw.delegate(*args):
            pass
        assert err.value.argument == argument
    with pytest.raises(InvalidRequestError) as err:
        kw.register_agent("x", capabilities="pr.*")  # type: ignore[arg-type]
    assert err.value.argument == "capabilities"
    assert len(entries(kw, "delegation.created")) == 1


# -- what a child may do --------------------------------------------------------------


def test_child_gates_outside_its_capabilities_are_denied(engine: Engine) -> None:
    kw = allow_all(engine())
    with kw.delegate("lead", "reviewer", ["pr.review", "pr.read"], ttl_s=60) as child:
        assert kw.gates.gate(child.agent_id, "pr.review").status == "executed"
        with pytest.raises(GateDeniedError) as err:
            kw.gates.gate(child.agent_id, "pr.merge")
        assert err.value.reason == "CAPABILITY_DENIED"
        assert kw.gates.can_i(child.agent_id, "pr.merge").denial_reason == "CAPABILITY_DENIED"
    # after the block the child is revoked: nothing passes
    assert kw.gates.execute(child.agent_id, "pr.review").denial_reason == "CAPABILITY_DENIED"
    assert kw.gates.execute("lead", "pr.merge").status == "executed"


def test_child_keeps_the_parents_priority(engine: Engine, clock: ManualClock) -> None:
    kw = engine()
    kw.register_agent("lead", priority=7)
    clock.advance(5_000)
    with kw.delegate("lead", "sub", ["x"], ttl_s=60) as child:
        info = kw.get_agent(child.agent_id)
        assert info is not None
        assert info.priority == 7
        assert info.parent_id == "lead"
    kw2 = engine()
    with kw2.delegate("fresh", "sub", ["x"], ttl_s=60) as child:  # parent never registered
        parent, sub = kw2.get_agent("fresh"), kw2.get_agent(child.agent_id)
        assert parent is not None and sub is not None and sub.priority == parent.priority


def test_leaving_the_block_revokes_the_child_and_releases_its_leases(engine: Engine) -> None:
    kw = engine()
    with kw.delegate("lead", "worker", ["*"], ttl_s=60) as child:
        verdict = kw.leases.try_acquire(child.agent_id, "s", ("FILE:/x", "MUTATES"), 30_000)
        assert verdict.granted
        assert [lease.agent_id for lease in kw.leases.list()] == [child.agent_id]
    assert kw.leases.list(agent_id=child.agent_id) == []
    (revoked,) = entries(kw, "lease.revoked")
    assert revoked.agent_id == child.agent_id
    (delegation,) = entries(kw, "delegation.revoked")
    # Marked revoked first (no new lease from then on), then its lease revoked.
    assert delegation.agent_id == child.agent_id and delegation.seq < revoked.seq
    assert kw.leases.try_acquire("other", "s", ("FILE:/x", "MUTATES"), 1_000).granted


async def test_async_block_revokes_the_child(engine: Engine) -> None:
    kw = allow_all(engine())
    async with kw.adelegate("lead", "sub", ["x"], ttl_s=60) as child:
        assert (await kw.gates.agate(child.agent_id, "x")).status == "executed"
    assert kw.gates.can_i(child.agent_id, "x").denial_reason == "CAPABILITY_DENIED"
    assert len(entries(kw, "delegation.revoked")) == 1


def test_revoking_cascades_to_grandchildren(engine: Engine) -> None:
    kw = allow_all(engine())
    kw.register_agent("lead", capabilities=["x.*"])
    with (
        kw.delegate("lead", "child", ["x.*"], ttl_s=60) as child,
        kw.delegate(child.agent_id, "gc", ["x.y"], ttl_s=60) as gc,
    ):
        assert kw.leases.try_acquire(gc.agent_id, "s", ("FILE:/g", "MUTATES")).granted
        revoked = kw.revoke_agent(child.agent_id)
        assert set(revoked) == {child.agent_id, gc.agent_id}
        assert kw.gates.execute(gc.agent_id, "x.y").denial_reason == "CAPABILITY_DENIED"
        assert kw.leases.list(agent_id=gc.agent_id) == []
    assert kw.revoke_agent(child.agent_id) == []  # leaving the blocks adds nothing
    assert len(entries(kw, "delegation.revoked")) == 2
    assert kw.gates.execute("lead", "x.y").status == "executed"


def test_parallel_revokes_what_it_created_when_one_fails(engine: Engine) -> None:
    kw = engine()
    kw.register_agent("lead", capabilities=["pr.*"])
    specs: list[Any] = [("a", ["pr.read"], 60), ("b", ["deploy"], 60), ("c", ["pr.read"], 60)]
    with pytest.raises(CapabilityError), kw.parallel("lead", specs):
        pytest.fail("the block must not run")
    assert [e.data["child_id"] for e in entries(kw, "delegation.created")] == ["lead/a"]
    assert [e.agent_id for e in entries(kw, "delegation.revoked")] == ["lead/a"]
    assert kw.gates.can_i("lead/a", "pr.read").denial_reason == "CAPABILITY_DENIED"
    assert kw.get_agent("lead/c") is None
    with kw.parallel("lead", [("x", ["pr.read"], 60), ("y", ["pr.review"], 60)]) as kids:
        assert [k.agent_id for k in kids] == ["lead/x", "lead/y"]
    assert len(entries(kw, "delegation.revoked")) == 3


# -- approvals across a lineage -------------------------------------------------------


def test_a_lineage_never_approves_its_own_requests(engine: Engine) -> None:
    kw = engine()
    kw.policies.add(Policy(name="ask", action="deploy", effect="require_approval"))
    with kw.delegate("lead", "helper", ["deploy"], ttl_s=60) as child:
        parent_request = kw.gates.execute("lead", "deploy").approval_id or ""
        with pytest.raises(NotAnApproverError):
            kw.approvals.approve(parent_request, child.agent_id)
        child_request = kw.gates.execute(child.agent_id, "deploy").approval_id or ""
        with pytest.raises(NotAnApproverError):
            kw.approvals.approve(child_request, "lead")
        with (
            kw.delegate(child.agent_id, "gc", ["deploy"], ttl_s=30) as gc,
            pytest.raises(NotAnApproverError),
        ):
            kw.approvals.deny(parent_request, gc.agent_id)
    assert entries(kw, "approval.decided") == []
    kw.approvals.approve(parent_request, "alice")
    assert kw.approvals.get(parent_request).status.value == "approved"


async def test_delegate_is_also_an_async_context_manager() -> None:
    from klockwork import Klockwork

    kw = Klockwork()
    kw.register_agent("lead", capabilities=["pr.*"])
    async with kw.delegate("lead", "async-sub", ["pr.review"], ttl_s=60) as child:
        assert kw.gates.can_i(child.agent_id, "pr.merge").denial_reason == "CAPABILITY_DENIED"
        profile = kw.get_agent(child.agent_id)
        assert profile is not None and profile.parent_id == "lead"
    refused = kw.gates.can_i(child.agent_id, "pr.review")
    assert refused.denial_reason == "CAPABILITY_DENIED" and "revoked" in refused.message
    kw.close()
