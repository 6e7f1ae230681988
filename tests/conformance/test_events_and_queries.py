"""Listener events, ``list()`` filters and the Klock-compatible ``KlockClient``."""

from __future__ import annotations

import pytest

from klockwork import GovernanceEvent, InvalidRequestError, KlockClient, Klockwork

from .conftest import T0, Api

# -- events ----------------------------------------------------------------------------


def _of(api: Api, kind: str) -> list[GovernanceEvent]:
    return [e for e in api.events if e.kind == kind]


async def test_lease_events(api: Api) -> None:
    await api.register_agent("old", 1)
    granted = (await api.try_acquire("old", "s1", ("file://x/", "MUTATES"), 100)).lease
    [event] = _of(api, "lease.granted")
    assert (event.agent_id, event.session_id, event.ts) == ("old", "s1", T0)
    assert event.data == {
        "lease_id": granted.lease_id,
        "resource": "FILE:/x",
        "predicate": "MUTATES",
        "fencing_token": granted.fencing_token,
        "expires_at": T0 + 100,
    }

    await api.try_acquire("young", "s2", ("FILE:/x", "CONSUMES"))
    [denied] = _of(api, "lease.denied")
    assert (denied.agent_id, denied.session_id) == ("young", "s2")
    assert denied.data["verdict"] == "DIE"
    assert denied.data["intents"] == [["FILE:/x", "CONSUMES"]]
    assert denied.data["wait_time_ms"] == 100
    assert [c["lease_id"] for c in denied.data["conflicts"]] == [granted.lease_id]

    assert await api.release(granted.lease_id)
    [released] = _of(api, "lease.released")
    assert released.agent_id == "old"
    assert released.data["lease_id"] == granted.lease_id

    revoked_lease = (await api.try_acquire("a", "s", ("FILE:/r", "MUTATES"))).lease
    assert await api.revoke(revoked_lease.lease_id, "too slow")
    [revoked] = _of(api, "lease.revoked")
    assert revoked.data["lease_id"] == revoked_lease.lease_id
    assert revoked.data["reason"] == "too slow"

    expiring = (await api.try_acquire("a", "s", ("FILE:/e", "MUTATES"), 50)).lease
    api.clock.advance(50)
    assert _of(api, "lease.expired") == []  # nobody looked yet
    assert api.sweep() == 1
    [expired] = _of(api, "lease.expired")
    assert expired.data["lease_id"] == expiring.lease_id
    assert expired.ts == T0 + 50
    # Failed operations emit nothing.
    count = len(api.events)
    assert not await api.release(granted.lease_id)
    assert not await api.revoke(granted.lease_id)
    assert len(api.events) == count


async def test_expiry_found_by_a_request_is_reported(api: Api) -> None:
    lease = (await api.try_acquire("a", "s", ("FILE:/x", "MUTATES"), 50)).lease
    api.clock.advance(60)
    assert (await api.try_acquire("b", "s", ("FILE:/x", "MUTATES"))).granted
    assert [e.data["lease_id"] for e in _of(api, "lease.expired")] == [lease.lease_id]


async def test_manifest_grant_emits_one_event_per_lease(api: Api) -> None:
    verdict = await api.try_acquire("a", "s", [("FILE:/a", "MUTATES"), ("FILE:/b", "MUTATES")])
    assert [e.data["lease_id"] for e in _of(api, "lease.granted")] == [
        lease.lease_id for lease in verdict.leases
    ]


async def test_listener_removal_and_failing_listener(api: Api) -> None:
    seen: list[str] = []
    remove = api.kw.add_listener(lambda e: seen.append(e.kind))

    def broken(event: GovernanceEvent) -> None:
        raise RuntimeError("listener bug")

    api.kw.add_listener(broken)
    lease = (await api.try_acquire("a", "s", ("FILE:/x", "MUTATES"))).lease  # not broken by it
    remove()
    assert await api.release(lease.lease_id)
    assert seen == ["lease.granted"]


# -- list ----------------------------------------------------------------------------------


async def test_list_filters(api: Api) -> None:
    a_src = (await api.try_acquire("a", "s", ("FILE:/src", "CONSUMES"))).lease
    b_file = (await api.try_acquire("b", "s", ("FILE:/src/a.ts", "CONSUMES"))).lease
    b_tab = (await api.try_acquire("b", "s", ("TABLE:users", "MUTATES"))).lease
    short = (await api.try_acquire("c", "s", ("FILE:/other", "MUTATES"), 10)).lease

    def ids(leases: list) -> list[str]:  # type: ignore[type-arg]
        return [lease.lease_id for lease in leases]

    assert ids(api.list()) == [a_src.lease_id, b_file.lease_id, b_tab.lease_id, short.lease_id]
    assert ids(api.list(agent_id="b")) == [b_file.lease_id, b_tab.lease_id]
    assert ids(api.list(resource="FILE:/src")) == [a_src.lease_id, b_file.lease_id]
    assert ids(api.list(resource="FILE:/src/a.ts")) == [a_src.lease_id, b_file.lease_id]
    assert ids(api.list(resource="file://src/b.ts")) == [a_src.lease_id]
    assert ids(api.list(resource="FILE:/")) == [a_src.lease_id, b_file.lease_id, short.lease_id]
    assert ids(api.list(agent_id="a", resource="FILE:/src/a.ts")) == [a_src.lease_id]
    assert ids(api.list(resource="TABLE:users")) == [b_tab.lease_id]
    assert api.list(agent_id="nobody") == []
    api.clock.advance(10)
    assert short.lease_id not in ids(api.list())
    assert await api.release(b_tab.lease_id)
    assert ids(api.list(agent_id="b")) == [b_file.lease_id]
    with pytest.raises(InvalidRequestError):
        api.list(resource="FILE:/..")


async def test_list_by_the_root_lists_each_lease_once(api: Api) -> None:
    root = (await api.try_acquire("a", "s", ("FILE:/", "CONSUMES"))).lease
    below = (await api.try_acquire("b", "s", ("FILE:/x", "CONSUMES"))).lease
    assert [x.lease_id for x in api.list(resource="FILE:/")] == [root.lease_id, below.lease_id]
    assert [x.lease_id for x in api.list(resource="FILE:/x")] == [root.lease_id, below.lease_id]


# -- KlockClient --------------------------------------------------------------------------

LEASE_KEYS = {
    "lease_id",
    "agent_id",
    "session_id",
    "resource",
    "predicate",
    "fencing_token",
    "acquired_at",
    "expires_at",
    "state",
}


async def test_klock_client_dict_shapes(api: Api) -> None:
    client = KlockClient(api.kw)
    assert client.kw is api.kw
    assert client.register_agent("old", 1) == {"success": True, "agent_id": "old", "priority": 1}
    assert client.register_agent("young", 9)["priority"] == 9

    ok = client.acquire_lease("old", "s1", "FILE", "/src//a.ts", "MUTATES", 5000)
    assert ok["success"] is True
    assert set(ok) == {"success"} | LEASE_KEYS
    assert ok["resource"] == "FILE:/src/a.ts"
    assert ok["agent_id"] == "old" and ok["session_id"] == "s1"
    assert ok["predicate"] == "MUTATES" and ok["state"] == "ACTIVE"
    assert ok["expires_at"] == T0 + 5000
    assert isinstance(ok["fencing_token"], int)

    die = client.acquire_lease("young", "s", "FILE", "/src", "CONSUMES", 1000)
    assert die["success"] is False
    assert die["reason"] == "DIE"
    assert die["wait_time"] == 5000
    assert [c["lease_id"] for c in die["conflicts"]] == [ok["lease_id"]]
    assert die["conflicts"][0] == {
        "agent_id": "old",
        "session_id": "s1",
        "resource": "FILE:/src/a.ts",
        "predicate": "MUTATES",
        "lease_id": ok["lease_id"],
    }

    young = client.acquire_lease("young", "s", "TABLE", "users", "MUTATES")
    assert young["expires_at"] == T0 + 60_000  # Klock's default TTL
    wait = client.acquire_lease("old", "s1", "TABLE", "users", "MUTATES")
    assert (wait["success"], wait["reason"], wait["wait_time"]) == (False, "WAIT", 60_000)

    listed = client.list_leases()
    assert [x["lease_id"] for x in listed] == [ok["lease_id"], young["lease_id"]]
    assert all(set(x) == LEASE_KEYS for x in listed)

    assert client.heartbeat_lease(ok["lease_id"]) is True
    assert client.release_lease(ok["lease_id"]) is True
    assert client.release_lease(ok["lease_id"]) is False
    assert client.heartbeat_lease(ok["lease_id"]) is False
    assert client.heartbeat_lease("lease_old_1000000") is False
    api.clock.advance(60_000)
    assert client.heartbeat_lease(young["lease_id"]) is False  # expired: not revived
    assert client.list_leases() == []


async def test_klock_client_rejects_bad_input(api: Api) -> None:
    client = KlockClient(api.kw)
    with pytest.raises(InvalidRequestError):
        client.acquire_lease("a", "s", "FILE", "/x", "READS", 1000)
    with pytest.raises(ValueError):
        client.acquire_lease("a", "s", "FILE", "", "MUTATES", 1000)
    with pytest.raises(ValueError):
        client.acquire_lease("a", "s", "FILE", "/x", "MUTATES", 0)
    assert client.list_leases() == []


def test_klock_client_builds_its_own_engine() -> None:
    client = KlockClient()
    try:
        assert isinstance(client.kw, Klockwork)
        assert client.acquire_lease("a", "s", "FILE", "/x", "MUTATES", 1000)["success"]
    finally:
        client.kw.close()
