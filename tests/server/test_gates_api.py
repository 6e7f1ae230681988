"""Gates over HTTP: decisions as the key's agent, idempotency, long-polls, own events only."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest
from api_support import Keys, bearer
from fastapi import FastAPI
from fastapi.testclient import TestClient

from klockwork import Klockwork


def _execute(client: TestClient, key: str, action: str, **extra: Any) -> dict[str, Any]:
    answer = client.post("/v1/gates/execute", headers=bearer(key), json={"action": action, **extra})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def test_execute_allows_denies_and_requests_as_the_key_agent(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    allowed = _execute(
        client, keys.agent, "read.file", metadata={"path": "a.py"}, agent_id="reviewer"
    )
    assert allowed["result"]["status"] == "executed" and allowed["result"]["policy_name"] == "reads"
    assert allowed["pending"] is False and allowed["refusal"] == "" and allowed["approval"] is None
    entry = kw.audit.query(kind="action.executed").entries[-1]
    assert entry.agent_id == "builder"  # the key's agent, not the body's

    denied = _execute(client, keys.agent, "db.drop")
    assert denied["result"]["status"] == "denied"
    assert denied["result"]["denial_reason"] == "POLICY_DENIED"
    assert "db.drop" in denied["refusal"] and "no-drops" in denied["refusal"]

    requested = _execute(
        client, keys.agent, "deploy.prod", metadata={"version": "1.2"}, session_id="t1"
    )
    assert requested["result"]["status"] == "requested" and requested["pending"] is True
    approval = requested["approval"]
    assert approval["requester"] == "builder" and approval["metadata"] == {"version": "1.2"}
    assert approval["approval_id"] == requested["result"]["approval_id"]
    record = kw.gates.get(requested["result"]["audit_event_id"])
    assert record is not None and record.agent_id == "builder" and record.session_id == "t1"


def test_an_event_id_makes_execute_idempotent(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    first = _execute(client, keys.agent, "deploy.prod", metadata={"v": 1}, event_id="run-7")
    again = _execute(client, keys.agent, "deploy.prod", metadata={"v": 1}, event_id="run-7")
    assert again["result"] == first["result"]
    assert len(kw.approvals.list()) == 1
    assert len(kw.audit.query(kind="action.requested").entries) == 1
    other = client.post(
        "/v1/gates/execute",
        headers=bearer(keys.agent),
        json={"action": "deploy.prod", "metadata": {"v": 2}, "event_id": "run-7"},
    )
    assert other.status_code == 422 and other.json()["error"]["argument"] == "event_id"
    # Event ids are each agent's own: another agent's "run-7" is another gate,
    # which neither takes over this one's outcome nor is blocked or told by it.
    theirs = client.post(
        "/v1/gates/execute",
        headers=bearer(keys.other_agent),
        json={"action": "read.file", "event_id": "run-7"},
    )
    assert theirs.status_code == 200 and theirs.json()["result"]["status"] == "executed"
    assert theirs.json()["result"]["audit_event_id"] != first["result"]["audit_event_id"]
    assert len(kw.approvals.list()) == 1
    mine = _execute(client, keys.agent, "deploy.prod", metadata={"v": 1}, event_id="run-7")
    assert mine["result"] == first["result"]


def test_can_i_answers_the_decision_and_records_nothing(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    before = len(kw.audit.query().entries)
    for action, status in (
        ("deploy.prod", "requested"),
        ("db.drop", "denied"),
        ("read.a", "executed"),
    ):
        answer = client.post("/v1/gates/can_i", headers=bearer(keys.agent), json={"action": action})
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == status and answer.json()["audit_event_id"] is None
    assert len(kw.audit.query().entries) == before
    assert kw.approvals.list(status=None) == []


def test_an_approver_key_is_not_gated(kw: Klockwork, client: TestClient, keys: Keys) -> None:
    for path in ("/v1/gates/execute", "/v1/gates/can_i"):
        refused = client.post(path, headers=bearer(keys.approver), json={"action": "read.a"})
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "forbidden"
    assert kw.audit.query(kind="action.executed").entries == []
    assert client.post("/v1/gates/can_i", json={"action": "read.a"}).status_code == 401


async def test_a_long_poll_answers_once_an_approver_approves(app: FastAPI, keys: Keys) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://kw") as client:
        asked = await client.post(
            "/v1/gates/execute", headers=bearer(keys.agent), json={"action": "deploy.prod"}
        )
        event = asked.json()["result"]["audit_event_id"]
        approval_id = asked.json()["result"]["approval_id"]
        started = time.monotonic()
        poll = asyncio.ensure_future(
            client.get(f"/v1/gates/{event}", headers=bearer(keys.agent), params={"wait_s": 10})
        )
        await asyncio.sleep(0.2)
        assert not poll.done()  # held open while the approval is pending
        approved = await client.post(
            f"/v1/approvals/{approval_id}/approve", headers=bearer(keys.approver), json={}
        )
        assert approved.status_code == 200, approved.text
        answer = await asyncio.wait_for(poll, 5)
    assert time.monotonic() - started < 5
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["result"]["status"] == "executed" and body["pending"] is False
    assert body["approval"]["status"] == "approved"
    assert body["approval"]["decisions"][0]["approver"] == "bob"


def test_a_long_poll_sees_a_deny_made_on_another_thread(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    asked = _execute(client, keys.agent, "deploy.prod", event_id="deny-me")
    approval_id = asked["result"]["approval_id"]
    denier = threading.Timer(0.2, lambda: kw.approvals.deny(approval_id, "carol", "not today"))
    denier.start()
    event = asked["result"]["audit_event_id"]
    answer = client.get(f"/v1/gates/{event}", headers=bearer(keys.agent), params={"wait_s": 10})
    denier.join()
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["result"]["status"] == "denied"
    assert body["result"]["denial_reason"] == "DENIED_BY_REVIEWER"
    assert "not today" in body["refusal"]
    # The settled outcome is audited once, however often it is read.
    client.get(f"/v1/gates/{event}", headers=bearer(keys.agent))
    settled = kw.audit.query(kind="action.denied").entries
    assert [e.agent_id for e in settled] == ["builder"]


def test_a_long_poll_that_runs_out_answers_the_pending_gate(client: TestClient, keys: Keys) -> None:
    event = _execute(client, keys.agent, "deploy.prod")["result"]["audit_event_id"]
    started = time.monotonic()
    answer = client.get(f"/v1/gates/{event}", headers=bearer(keys.agent), params={"wait_s": 0.3})
    assert 0.25 <= time.monotonic() - started < 5
    assert answer.status_code == 200 and answer.json()["pending"] is True
    now = client.get(f"/v1/gates/{event}", headers=bearer(keys.agent))  # no wait: at once
    assert now.json()["result"]["status"] == "requested"
    for wait in ("-1", "31", "nan"):
        bad = client.get(f"/v1/gates/{event}", headers=bearer(keys.agent), params={"wait_s": wait})
        assert bad.status_code == 422 and bad.json()["error"]["argument"] == "wait_s"


def test_a_long_poll_ends_when_the_approval_expires(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    kw.policies.add(
        {
            "name": "hotfix",
            "action": "hotfix.*",
            "effect": "require_approval",
            "approval_timeout_s": 0.3,
        }
    )
    event = _execute(client, keys.agent, "hotfix.prod")["result"]["audit_event_id"]
    started = time.monotonic()
    answer = client.get(f"/v1/gates/{event}", headers=bearer(keys.agent), params={"wait_s": 10})
    assert time.monotonic() - started < 5  # the deadline, not wait_s, ended it
    body = answer.json()
    assert body["result"]["status"] == "denied" and body["pending"] is False
    assert body["result"]["denial_reason"] == "APPROVAL_EXPIRED"
    assert body["approval"]["status"] == "expired"


def test_an_edit_shows_on_the_gate_it_replaced(client: TestClient, keys: Keys) -> None:
    asked = _execute(client, keys.agent, "deploy.prod", metadata={"version": "1.2"})
    edited = client.post(
        f"/v1/approvals/{asked['result']['approval_id']}/edit",
        headers=bearer(keys.approver),
        json={"arguments": {"version": "1.3"}},
    )
    assert edited.status_code == 200, edited.text
    event = asked["result"]["audit_event_id"]
    answer = client.get(f"/v1/gates/{event}", headers=bearer(keys.agent)).json()
    assert answer["result"]["status"] == "denied"
    assert answer["replaced_by"] == edited.json()["replaced_by"]


def test_a_key_reads_and_reports_only_its_own_gate_events(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    event = _execute(client, keys.agent, "read.file")["result"]["audit_event_id"]
    # Another agent's event answers exactly as an unknown one.
    theirs = client.get(f"/v1/gates/{event}", headers=bearer(keys.other_agent))
    unknown = client.get("/v1/gates/act_nope", headers=bearer(keys.other_agent))
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["error"]["type"] == unknown.json()["error"]["type"] == "gate_not_found"
    assert theirs.json()["error"]["argument"] == unknown.json()["error"]["argument"]
    # ... but asking for another agent's is audited (an unknown one is not).
    asked = [e.data["path"] for e in kw.audit.query(kind="access.denied").entries]
    assert asked == [f"/v1/gates/{event}"]
    path = f"/v1/gates/{event}/report"
    refused = client.post(path, headers=bearer(keys.other_agent), json={"status": "failure"})
    assert refused.status_code == 404
    entry = kw.audit.query(kind="access.denied").entries[-1]
    assert entry.data["path"] == path and entry.data["principal"] == "reviewer"
    record = kw.gates.get(event)
    assert record is not None and record.reported is None

    reported = client.post(path, headers=bearer(keys.agent), json={"status": "success"})
    assert reported.status_code == 200 and reported.json() == {"recorded": True}
    twice = client.post(path, headers=bearer(keys.agent), json={"status": "failure"})
    assert twice.json() == {"recorded": False}
    record = kw.gates.get(event)
    assert record is not None and record.reported == "success"

    denied = _execute(client, keys.agent, "db.drop")["result"]["audit_event_id"]
    not_run = client.post(
        f"/v1/gates/{denied}/report", headers=bearer(keys.agent), json={"status": "success"}
    )
    assert not_run.status_code == 422 and not_run.json()["error"]["argument"] == "audit_event_id"


def test_failure_reports_open_the_agents_breaker(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    kw.gates.breaker = kw.gates.breaker.model_copy(update={"threshold": 2})
    for _ in range(2):
        event = _execute(client, keys.agent, "read.file")["result"]["audit_event_id"]
        client.post(
            f"/v1/gates/{event}/report", headers=bearer(keys.agent), json={"status": "failure"}
        )
    blocked = _execute(client, keys.agent, "read.file")
    assert blocked["result"]["denial_reason"] == "CIRCUIT_OPEN"
    assert _execute(client, keys.other_agent, "read.file")["result"]["status"] == "executed"


@pytest.mark.parametrize(
    ("path", "body", "argument"),
    [
        ("/v1/gates/execute", {"action": ""}, "action"),
        ("/v1/gates/execute", {"action": "a" * 513}, "action"),
        ("/v1/gates/execute", {}, "action"),
        ("/v1/gates/execute", {"action": "read.a", "metadata": [1]}, "metadata"),
        ("/v1/gates/execute", {"action": "read.a", "event_id": ""}, "event_id"),
        ("/v1/gates/execute", {"action": "read.a", "session_id": "t1\n"}, "session_id"),
        ("/v1/gates/can_i", {"action": "read.a", "metadata": "x"}, "metadata"),
        ("/v1/gates/act_x/report", {"status": "fine"}, "status"),
        ("/v1/gates/act_x/report", {"status": "success", "message": 3}, "message"),
    ],
)
def test_bad_bodies_are_422_naming_the_argument_and_record_nothing(
    kw: Klockwork,
    client: TestClient,
    keys: Keys,
    path: str,
    body: dict[str, Any],
    argument: str,
) -> None:
    answer = client.post(path, headers=bearer(keys.agent), json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["argument"] == argument
    assert [e.kind for e in kw.audit.query().entries if e.kind.startswith("action.")] == []
