"""Hypothesis state machine: the engine against a tiny reference model.

The model is written from DESIGN.md alone (it shares no code with
``klockwork.core.leases.rules``): a list of leases, a clock, the KLIS matrix and
wait-die. Every verdict of the engine must match the model's (status,
blocking lease ids, wait time) and the invariants must hold after every
step. Runs on the memory store and (fewer examples) on SQLite and Redis, through the
sync API on a manual clock.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from klockwork import (
    Klockwork,
    LeaseExpiredError,
    LeaseNotFoundError,
    LeaseRevokedError,
    ManualClock,
)

from .conftest import StoreMaker, skip_without_redis

AGENTS = {"a0": 0, "a1": 1, "a2": 2, "a3": 2}  # a2 and a3 tie: a2 is older (lower id)
SESSIONS = ("s1", "s2")  # two sessions of one agent: s1 is older
RESOURCES = ("FILE:/", "FILE:/a", "FILE:/a/b", "FILE:/a/c", "FILE:/d", "TABLE:t")
PREDICATES = ("PROVIDES", "CONSUMES", "MUTATES", "DELETES", "DEPENDS_ON", "RENAMES")
COMPATIBLE = {
    frozenset(p)
    for p in [
        ("PROVIDES", "CONSUMES"),
        ("PROVIDES", "DEPENDS_ON"),
        ("CONSUMES", "CONSUMES"),
        ("CONSUMES", "DEPENDS_ON"),
        ("DEPENDS_ON", "DEPENDS_ON"),
    ]
}


def model_overlaps(a: str, b: str) -> bool:
    if a == b:
        return True
    if not (a.startswith("FILE:") and b.startswith("FILE:")):
        return False

    def below(x: str, y: str) -> bool:  # x is strictly inside directory y
        return x.startswith(y if y.endswith("/") else y + "/") and x != y

    return below(a, b) or below(b, a)


def model_conflicts(p: str, q: str) -> bool:
    return frozenset((p, q)) not in COMPATIBLE


def model_older(a: str, a_session: str, b: str, b_session: str) -> bool:
    """Lower priority, then lower agent id, then (one agent) lower session id."""
    return (AGENTS[a], a, a_session) < (AGENTS[b], b, b_session)


@dataclass
class ModelLease:
    lease_id: str
    agent: str
    session: str
    resource: str
    predicate: str
    ttl: int
    expires_at: int
    token: int
    state: str = "ACTIVE"  # ACTIVE RELEASED REVOKED EXPIRED


class LeaseMachine(RuleBasedStateMachine):
    """Subclassed per store (see :func:`_machine`)."""

    store_kind = "memory"
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="kw-stateful-")
        self.maker = StoreMaker(self.store_kind, Path(self.tmp))
        store = self.maker("s.db")
        self.clock = ManualClock()  # start_ms=0
        self.kw = Klockwork(store, clock=self.clock)
        for agent, priority in AGENTS.items():
            self.kw.register_agent(agent, priority)
        self.model: dict[str, ModelLease] = {}
        self.last_token = 0

    def teardown(self) -> None:
        self.kw.close()
        self.maker.cleanup()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- model helpers --------------------------------------------------------
    @property
    def now(self) -> int:
        return self.clock.now_ms()

    def live(self, m: ModelLease) -> bool:
        return m.state == "ACTIVE" and m.expires_at > self.now

    def settle(self, m: ModelLease) -> None:
        """Apply expiry the way any operation that touches a lease does."""
        if m.state == "ACTIVE" and m.expires_at <= self.now:
            m.state = "EXPIRED"

    # -- rules ------------------------------------------------------------------
    @rule(
        target=leases,
        agent=st.sampled_from(sorted(AGENTS)),
        session=st.sampled_from(SESSIONS),
        resource=st.sampled_from(RESOURCES),
        predicate=st.sampled_from(PREDICATES),
        ttl=st.sampled_from([10, 50, 100, 300]),
    )
    def acquire(self, agent: str, session: str, resource: str, predicate: str, ttl: int):  # type: ignore[no-untyped-def]
        for m in self.model.values():  # a request expires what it steps over
            if model_overlaps(m.resource, resource):
                self.settle(m)
        blockers = [
            m
            for m in self.model.values()
            if self.live(m)
            and model_overlaps(m.resource, resource)
            and model_conflicts(m.predicate, predicate)
            and not (m.agent == agent and m.session == session)
        ]
        verdict = self.kw.leases.try_acquire(agent, session, (resource, predicate), ttl)
        if not blockers:
            expected = "GRANTED"
        elif all(model_older(agent, session, m.agent, m.session) for m in blockers):
            expected = "WAIT"
        else:
            expected = "DIE"
        assert verdict.status.value == expected, (agent, session, resource, predicate)
        assert sorted(c.lease_id or "" for c in verdict.conflicts) == sorted(
            m.lease_id for m in blockers
        )
        if not verdict.granted:
            assert verdict.wait_time_ms == min(m.expires_at for m in blockers) - self.now
            return multiple()
        lease = verdict.lease
        assert lease.fencing_token > self.last_token
        self.last_token = lease.fencing_token
        assert (lease.resource, lease.predicate.value, lease.expires_at) == (
            resource,
            predicate,
            self.now + ttl,
        )
        self.model[lease.lease_id] = ModelLease(
            lease.lease_id,
            agent,
            session,
            resource,
            predicate,
            ttl,
            lease.expires_at,
            lease.fencing_token,
        )
        return lease.lease_id

    @rule(lease_id=leases)
    def release(self, lease_id: str) -> None:
        m = self.model[lease_id]
        self.settle(m)
        assert self.kw.leases.release(lease_id) is (m.state == "ACTIVE")
        if m.state == "ACTIVE":
            m.state = "RELEASED"

    @rule(lease_id=leases)
    def revoke(self, lease_id: str) -> None:
        m = self.model[lease_id]
        self.settle(m)
        assert self.kw.leases.revoke(lease_id, "test") is (m.state == "ACTIVE")
        if m.state == "ACTIVE":
            m.state = "REVOKED"

    @rule(lease_id=leases, ttl=st.sampled_from([None, 20, 200]))
    def heartbeat(self, lease_id: str, ttl: int | None) -> None:
        m = self.model[lease_id]
        self.settle(m)
        if m.state == "ACTIVE":
            lease = self.kw.leases.heartbeat(lease_id, ttl)
            m.expires_at = self.now + (ttl or m.ttl)
            assert lease.expires_at == m.expires_at
            return
        error = {
            "EXPIRED": LeaseExpiredError,
            "REVOKED": LeaseRevokedError,
            "RELEASED": LeaseNotFoundError,
        }[m.state]
        try:
            self.kw.leases.heartbeat(lease_id, ttl)
        except error:
            pass
        else:
            raise AssertionError(f"heartbeat of a {m.state} lease succeeded")

    @rule(ms=st.sampled_from([1, 9, 10, 50, 100, 250]))
    def advance(self, ms: int) -> None:
        self.clock.advance(ms)

    @rule()
    def sweep(self) -> None:
        due = [m for m in self.model.values() if m.state == "ACTIVE" and m.expires_at <= self.now]
        assert self.kw.leases.sweep() == len(due)
        for m in due:
            m.state = "EXPIRED"

    @rule(lease_id=leases)
    def get(self, lease_id: str) -> None:
        m = self.model[lease_id]
        self.settle(m)
        lease = self.kw.leases.get(lease_id)
        assert lease is not None
        assert (lease.state.value, lease.expires_at, lease.fencing_token) == (
            m.state,
            m.expires_at,
            m.token,
        )

    @rule(resource=st.sampled_from(RESOURCES), agent=st.sampled_from([None, *sorted(AGENTS)]))
    def list_filtered(self, resource: str, agent: str | None) -> None:
        listed = [x.lease_id for x in self.kw.leases.list(agent_id=agent, resource=resource)]
        expected = sorted(
            (
                m
                for m in self.model.values()
                if self.live(m)
                and model_overlaps(m.resource, resource)
                and (agent is None or m.agent == agent)
            ),
            key=lambda m: m.token,
        )
        assert listed == [m.lease_id for m in expected]

    # -- invariants ---------------------------------------------------------------
    @invariant()
    def no_two_conflicting_live_leases(self) -> None:
        active = self.kw.leases.list()
        for i, x in enumerate(active):
            for y in active[i + 1 :]:
                if (x.agent_id, x.session_id) == (y.agent_id, y.session_id):
                    continue
                assert not (
                    model_overlaps(x.resource, y.resource)
                    and model_conflicts(x.predicate.value, y.predicate.value)
                ), (x, y)

    @invariant()
    def live_leases_match_the_model(self) -> None:
        assert {x.lease_id for x in self.kw.leases.list()} == {
            m.lease_id for m in self.model.values() if self.live(m)
        }

    @invariant()
    def fencing_tokens_increase(self) -> None:
        tokens = [m.token for m in self.model.values()]
        assert tokens == sorted(set(tokens))


def _machine(store_kind: str) -> type[LeaseMachine]:
    return type(f"LeaseMachine_{store_kind}", (LeaseMachine,), {"store_kind": store_kind})


SETTINGS = {
    "memory": settings(
        max_examples=200,
        stateful_step_count=50,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    ),
    "sqlite": settings(
        max_examples=60,
        stateful_step_count=40,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    ),
    "redis": settings(
        max_examples=60,
        stateful_step_count=40,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    ),
}


@pytest.mark.parametrize("store_kind", ["memory", "sqlite", "redis"])
def test_engine_matches_the_reference_model(store_kind: str) -> None:
    if store_kind == "redis":
        skip_without_redis()
    run_state_machine_as_test(_machine(store_kind), settings=SETTINGS[store_kind])
