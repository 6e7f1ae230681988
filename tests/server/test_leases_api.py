"""Leases over HTTP: verdicts, identity from the key, own leases only, blocking acquires."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
from api_support import HangingUpClient, Keys, bearer
from fastapi import FastAPI
from fastapi.testclient import TestClient

from klockwork import Klockwork
from klockwork.server import ServerSettings, create_app


def _ask(resource: str = "FILE:/src/app.py", **extra: Any) -> dict[str, Any]:
    return {
        "session_id": "s1",
        "intents": [{"resource": resource, "predicate": "MUTATES"}],
        **extra,
    }


def _acquire(client: TestClient, key: str, **extra: Any) -> dict[str, Any]:
    answer = client.post("/v1/leases", headers=bearer(key), json=_ask(**extra))
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def _wait_for_waiters(kw: Klockwork, count: int = 1) -> None:
    deadline = time.monotonic() + 5
    while kw.leases.waiting < count:
        assert time.monotonic() < deadline, "the blocking acquire never started waiting"
        time.sleep(0.005)


@pytest.fixture
def ages(kw: Klockwork) -> None:
    """Wait-die ages: reviewer is older than builder, builder older than root."""
    kw.register_agent("reviewer", priority=1)
    kw.register_agent("builder", priority=2)
    kw.register_agent("root", priority=3)


def test_a_grant_and_the_conflicts_answer_the_engines_verdicts_as_the_key_agent(
    kw: Klockwork, client: TestClient, keys: Keys, ages: None
) -> None:
    # The body cannot name the agent: the lease is the key's principal's.
    granted = _acquire(client, keys.agent, agent_id="reviewer", ttl_ms=5000)
    assert granted["status"] == "GRANTED" and granted["conflicts"] == []
    (lease,) = granted["leases"]
    assert lease["agent_id"] == "builder" and lease["session_id"] == "s1"
    assert lease["expires_at"] - lease["acquired_at"] == 5000
    assert [held.agent_id for held in kw.leases.list()] == ["builder"]

    older = _acquire(client, keys.other_agent)  # reviewer is older: it may wait
    assert older["status"] == "WAIT" and older["leases"] == []
    assert older["conflicts"][0]["agent_id"] == "builder"
    assert older["conflicts"][0]["lease_id"] == lease["lease_id"]
    assert 0 < older["wait_time_ms"] <= 5000
    younger = _acquire(client, keys.admin)  # root is younger: it dies
    assert younger["status"] == "DIE"
    assert [held.lease_id for held in kw.leases.list()] == [lease["lease_id"]]
    refused = kw.audit.query(kind="lease.denied").entries
    assert [e.agent_id for e in refused] == ["reviewer", "root"]


def test_an_agent_releases_and_renews_only_its_own_leases(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    lease_id = _acquire(client, keys.agent)["leases"][0]["lease_id"]
    for verb, body in (("release", None), ("heartbeat", {"ttl_ms": 60_000})):
        path = f"/v1/leases/{lease_id}/{verb}"
        refused = client.post(path, headers=bearer(keys.other_agent), json=body)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["type"] == "not_your_lease"
        entry = kw.audit.query(kind="access.denied").entries[-1]
        assert entry.data["path"] == path and entry.data["reason"] == "not_your_lease"
        assert entry.data["principal"] == "reviewer" and entry.data["lease_id"] == lease_id
        assert entry.agent_id == "reviewer"
    held = kw.leases.get(lease_id)
    assert held is not None and held.state.value == "ACTIVE"
    assert held.expires_at - held.acquired_at == 30_000  # the refused renewal changed nothing

    renewed = client.post(
        f"/v1/leases/{lease_id}/heartbeat", headers=bearer(keys.agent), json={"ttl_ms": 60_000}
    )
    assert renewed.status_code == 200 and renewed.json()["expires_at"] > held.expires_at
    again = client.post(f"/v1/leases/{lease_id}/heartbeat", headers=bearer(keys.agent))
    assert again.status_code == 200  # no body: the lease's own TTL
    released = client.post(f"/v1/leases/{lease_id}/release", headers=bearer(keys.agent))
    assert released.json() == {"released": True}
    twice = client.post(f"/v1/leases/{lease_id}/release", headers=bearer(keys.agent))
    assert twice.json() == {"released": False}
    assert kw.leases.list() == []
    gone = client.post(f"/v1/leases/{lease_id}/heartbeat", headers=bearer(keys.agent))
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "lease_not_found"
    unknown = client.post("/v1/leases/no-such-lease/release", headers=bearer(keys.agent))
    assert unknown.status_code == 404 and unknown.json()["error"]["argument"] == "lease_id"


def test_an_admin_revokes_any_lease_and_nobody_else_may(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    lease_id = _acquire(client, keys.agent)["leases"][0]["lease_id"]
    path = f"/v1/leases/{lease_id}/revoke"
    for key in (keys.agent, keys.approver):
        refused = client.post(path, headers=bearer(key), json={"reason": "mine"})
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "forbidden"
    assert client.post(path, headers=bearer(keys.admin), json={"reason": "stuck"}).json() == {
        "revoked": True
    }
    assert client.post(path, headers=bearer(keys.admin), json={}).json() == {"revoked": False}
    entry = kw.audit.query(kind="lease.revoked").entries[-1]
    assert entry.agent_id == "builder" and entry.data["lease_id"] == lease_id
    # The holder learns at its next renewal: a revoked lease is never revived.
    late = client.post(f"/v1/leases/{lease_id}/heartbeat", headers=bearer(keys.agent))
    assert late.status_code == 410 and late.json()["error"]["type"] == "lease_revoked"
    missing = client.post("/v1/leases/nope/revoke", headers=bearer(keys.admin), json={})
    assert missing.status_code == 404


def test_an_approver_key_reads_the_board_but_acquires_nothing(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    refused = client.post("/v1/leases", headers=bearer(keys.approver), json=_ask())
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "forbidden"
    assert kw.audit.query(kind="access.denied").entries[-1].data["path"] == "/v1/leases"
    mine = _acquire(client, keys.agent, resource="FILE:/src")["leases"][0]
    theirs = _acquire(client, keys.other_agent, resource="FILE:/docs")["leases"][0]

    def board(**query: str) -> list[str]:
        answer = client.get("/v1/leases", headers=bearer(keys.approver), params=query)
        assert answer.status_code == 200, answer.text
        return [lease["lease_id"] for lease in answer.json()]

    assert board() == [mine["lease_id"], theirs["lease_id"]]
    assert board(agent_id="reviewer") == [theirs["lease_id"]]
    assert board(resource="FILE:/src/deep/file.py") == [mine["lease_id"]]  # overlaps /src
    one = client.get(f"/v1/leases/{mine['lease_id']}", headers=bearer(keys.approver))
    assert one.json() == mine
    assert client.get("/v1/leases/nope", headers=bearer(keys.approver)).status_code == 404
    bad = client.get("/v1/leases", headers=bearer(keys.approver), params={"resource": "nope"})
    assert bad.status_code == 422 and bad.json()["error"]["argument"] == "resource"


def test_a_blocking_acquire_is_granted_when_another_client_releases(
    kw: Klockwork, client: TestClient, keys: Keys, ages: None
) -> None:
    lease_id = _acquire(client, keys.agent)["leases"][0]["lease_id"]
    answers: list[Any] = []
    waiter = threading.Thread(
        target=lambda: answers.append(
            client.post("/v1/leases", headers=bearer(keys.other_agent), json=_ask(wait_s=10))
        )
    )
    started = time.monotonic()
    waiter.start()
    _wait_for_waiters(kw)
    assert answers == []  # it waits, on the server, while the lease is held
    # Anyone signed in sees who waits for what (the place is kept once it retried).
    deadline = time.monotonic() + 5
    while not (line := client.get("/v1/waiters", headers=bearer(keys.approver)).json()):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert [(w["agent_id"], w["resource"], w["predicate"]) for w in line] == [
        ("reviewer", "FILE:/src/app.py", "MUTATES")
    ]
    inside = client.get("/v1/waiters", headers=bearer(keys.agent), params={"resource": "FILE:/src"})
    assert inside.json() == line
    released = client.post(f"/v1/leases/{lease_id}/release", headers=bearer(keys.agent))
    assert released.json() == {"released": True}
    waiter.join(10)
    assert time.monotonic() - started < 5
    (answer,) = answers
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "GRANTED"
    assert [lease.agent_id for lease in kw.leases.list()] == ["reviewer"]  # no double grant
    grant = kw.audit.query(kind="lease.granted").entries[-1]
    assert grant.agent_id == "reviewer" and grant.data["attempts"] >= 2
    assert client.get("/v1/waiters", headers=bearer(keys.approver)).json() == []


def test_a_key_revoked_while_it_waits_is_granted_nothing(
    app: FastAPI, kw: Klockwork, client: TestClient, keys: Keys, ages: None
) -> None:
    lease_id = _acquire(client, keys.agent)["leases"][0]["lease_id"]
    record, secret = app.state.server.keys.create("temp-agent", "agent")
    answers: list[Any] = []
    waiter = threading.Thread(
        target=lambda: answers.append(
            client.post("/v1/leases", headers=bearer(secret), json=_ask(wait_s=10))
        )
    )
    waiter.start()
    _wait_for_waiters(kw)
    app.state.server.keys.revoke(record.key_id)
    client.post(f"/v1/leases/{lease_id}/release", headers=bearer(keys.agent))
    waiter.join(10)
    (answer,) = answers
    assert answer.status_code == 401, answer.text
    assert kw.leases.list() == []  # what it was granted went back at once


def test_a_blocking_acquire_that_runs_out_is_409_and_leaves_nothing_behind(
    kw: Klockwork, client: TestClient, keys: Keys, ages: None
) -> None:
    _acquire(client, keys.agent)
    started = time.monotonic()
    answer = client.post("/v1/leases", headers=bearer(keys.other_agent), json=_ask(wait_s=0.3))
    assert 0.25 <= time.monotonic() - started < 5
    assert answer.status_code == 409 and answer.json()["error"]["type"] == "lease_timeout"
    assert "builder" in answer.json()["error"]["message"]
    assert kw.leases.waiting == 0
    assert [lease.agent_id for lease in kw.leases.list()] == ["builder"]
    assert kw.audit.query(kind="lease.denied").entries[-1].agent_id == "reviewer"


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        ({"intents": []}, "intents"),
        ({"intents": [{"resource": "FILE:/a", "predicate": "OWNS"}]}, "intents.0.predicate"),
        ({"intents": [{"resource": "no-type", "predicate": "MUTATES"}]}, "resource"),
        ({"intents": [{"resource": "FILE:/../up", "predicate": "MUTATES"}]}, "resource"),
        ({"intents": "FILE:/a"}, "intents"),
        ({"ttl_ms": 0}, "ttl_ms"),
        ({"ttl_ms": 8 * 24 * 3600 * 1000}, "ttl_ms"),
        ({"ttl_ms": 1.5}, "ttl_ms"),
        ({"wait_s": -1}, "wait_s"),
        ({"wait_s": 31}, "wait_s"),  # above the server's max_wait_s (30 s)
        ({"session_id": " s1"}, "session_id"),
        ({"session_id": ""}, "session_id"),
        ({"session_id": None}, "session_id"),
    ],
)
def test_bad_requests_are_422_naming_the_argument_and_change_nothing(
    kw: Klockwork, client: TestClient, keys: Keys, change: dict[str, Any], argument: str
) -> None:
    answer = client.post("/v1/leases", headers=bearer(keys.agent), json={**_ask(), **change})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["argument"] == argument
    assert kw.leases.list() == []
    assert kw.audit.query(kind="lease.denied").entries == []


def test_the_longest_wait_is_the_servers_setting(kw: Klockwork, keys: Keys) -> None:
    app = create_app(kw, ServerSettings(max_wait_s=1.0))
    secret = app.state.server.keys.create("builder-2", "agent")[1]
    with TestClient(app) as client:
        long = client.post("/v1/leases", headers=bearer(secret), json=_ask(wait_s=1.5))
        assert long.status_code == 422 and "1.0 s" in long.json()["error"]["message"]
        ok = client.post("/v1/leases", headers=bearer(secret), json=_ask(wait_s=1.0))
        assert ok.json()["status"] == "GRANTED"
        bad = client.post(
            "/v1/leases",
            headers={**bearer(secret), "content-type": "application/json"},
            content=json.dumps(_ask(wait_s=float("nan"))),  # Python's json sends NaN
        )
        assert bad.status_code == 422 and bad.json()["error"]["argument"] == "wait_s"


async def test_a_client_that_leaves_withdraws_its_blocking_acquire(
    kw: Klockwork, app: FastAPI, keys: Keys, ages: None
) -> None:
    holder = kw.leases.try_acquire("builder", "s1", ("FILE:/src/app.py", "MUTATES"))
    client = HangingUpClient(app, "/v1/leases", _ask(wait_s=20), keys.other_agent)
    request = client.start()
    deadline = time.monotonic() + 5
    while kw.leases.waiting == 0:
        assert time.monotonic() < deadline and not request.done()
        await asyncio.sleep(0.005)
    client.hang_up()
    await asyncio.wait_for(request, 5)
    assert kw.leases.waiting == 0  # withdrawn, with its reservation
    assert client.sent[0]["status"] == 499
    # Released now, nobody is granted the lease the gone client asked for.
    assert kw.leases.release(holder.leases[0].lease_id)
    assert kw.leases.list() == []
    assert kw.leases.try_acquire("root", "s9", ("FILE:/src/app.py", "MUTATES")).granted


def test_the_fencing_check_refuses_a_superseded_token(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    first = _acquire(client, keys.agent)["leases"][0]
    query = {"resource": "FILE:/src/app.py", "token": first["fencing_token"]}
    check = client.get("/v1/fencing/check", headers=bearer(keys.approver), params=query)
    assert check.status_code == 200 and check.json() == {"valid": True}
    client.post(f"/v1/leases/{first['lease_id']}/release", headers=bearer(keys.agent))
    second = _acquire(client, keys.other_agent)["leases"][0]
    assert second["fencing_token"] > first["fencing_token"]
    stale = client.get("/v1/fencing/check", headers=bearer(keys.agent), params=query)
    assert stale.status_code == 409 and stale.json()["error"]["type"] == "stale_fencing_token"
    negative = client.get(
        "/v1/fencing/check", headers=bearer(keys.agent), params={**query, "token": -1}
    )
    assert negative.status_code == 422 and negative.json()["error"]["argument"] == "token"
