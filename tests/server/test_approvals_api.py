"""Approvals over HTTP: who may see and decide what, as their key says."""

from __future__ import annotations

from api_support import Keys, bearer
from fastapi.testclient import TestClient

from klockwork import Klockwork


def _pending(kw: Klockwork, agent: str = "builder") -> str:
    result = kw.gates.execute(agent, "deploy.prod", {"version": "1.2"})
    assert result.status == "requested" and result.approval_id is not None
    return result.approval_id


def test_an_approver_lists_and_approves_as_the_principal_of_its_key(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    approval_id = _pending(kw)
    listed = client.get("/v1/approvals", headers=bearer(keys.approver)).json()
    assert [a["approval_id"] for a in listed] == [approval_id]
    assert listed[0]["metadata"] == {"version": "1.2"} and listed[0]["policy_name"] == "deploys"

    answer = client.post(
        f"/v1/approvals/{approval_id}/approve",
        headers=bearer(keys.approver),
        json={"comment": "ok", "approver": "someone-else"},  # the body cannot name who decides
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "approved"
    assert [d.approver for d in kw.approvals.get(approval_id).decisions] == ["bob"]
    # A retried vote that already counted answers the same; another vote is refused.
    again = client.post(f"/v1/approvals/{approval_id}/approve", headers=bearer(keys.approver))
    assert again.status_code == 422  # no body: the vote needs its (possibly empty) comment
    again = client.post(
        f"/v1/approvals/{approval_id}/approve", headers=bearer(keys.approver), json={}
    )
    assert again.status_code == 200 and again.json()["status"] == "approved"
    late = client.post(
        f"/v1/approvals/{approval_id}/deny", headers=bearer(keys.other_approver), json={}
    )
    assert late.status_code == 409 and late.json()["error"]["type"] == "approval_closed"


def test_an_agent_key_sees_only_its_own_approvals_and_decides_none(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    mine, theirs = _pending(kw, "builder"), _pending(kw, "reviewer")
    listed = client.get("/v1/approvals", headers=bearer(keys.agent)).json()
    assert [a["approval_id"] for a in listed] == [mine]
    assert client.get(f"/v1/approvals/{theirs}", headers=bearer(keys.agent)).status_code == 404
    refused = client.post(f"/v1/approvals/{mine}/approve", headers=bearer(keys.agent), json={})
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "forbidden"
    assert kw.approvals.get(mine).status.value == "pending"
    denied = kw.audit.query(kind="access.denied").entries
    assert denied[-1].data["path"] == f"/v1/approvals/{mine}/approve"
    assert denied[-1].data["principal"] == "builder"


def test_the_owner_of_the_agent_cannot_approve_its_request(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    approval_id = _pending(kw)
    refused = client.post(
        f"/v1/approvals/{approval_id}/approve", headers=bearer(keys.alice), json={}
    )
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "own_agent"
    assert kw.approvals.get(approval_id).decisions == []
    entry = kw.audit.query(kind="access.denied").entries[-1]
    assert entry.data["reason"] == "own_agent" and entry.data["principal"] == "alice"


def test_an_edit_is_judged_again_and_replaces_the_request(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    approval_id = _pending(kw)
    edited = client.post(
        f"/v1/approvals/{approval_id}/edit",
        headers=bearer(keys.approver),
        json={"arguments": {"version": "1.3"}, "comment": "use 1.3"},
    )
    assert edited.status_code == 200, edited.text
    body = edited.json()
    assert body["replaced"]["status"] == "denied"
    assert body["result"]["status"] == "requested"  # deploy.* still needs a human
    assert body["approval"]["metadata"] == {"version": "1.3"}
    again = client.post(
        f"/v1/approvals/{approval_id}/edit",
        headers=bearer(keys.other_approver),
        json={"arguments": {"version": "9"}},
    )
    assert again.status_code == 409
    # Who wrote the new arguments does not approve them alone: someone else must.
    new_id = body["approval"]["approval_id"]
    own = client.post(f"/v1/approvals/{new_id}/approve", headers=bearer(keys.approver), json={})
    assert own.status_code == 403 and own.json()["error"]["type"] == "own_edit"
    assert kw.audit.query(kind="access.denied").entries[-1].data["reason"] == "own_edit"
    # An edit of the edit (by carol) is carol's to leave to others, not bob's alone.
    twice = client.post(
        f"/v1/approvals/{new_id}/edit",
        headers=bearer(keys.other_approver),
        json={"arguments": {"version": "1.4"}},
    ).json()
    last_id = twice["approval"]["approval_id"]
    mine = client.post(
        f"/v1/approvals/{last_id}/approve", headers=bearer(keys.other_approver), json={}
    )
    assert mine.status_code == 403
    ok = client.post(f"/v1/approvals/{last_id}/approve", headers=bearer(keys.approver), json={})
    assert ok.status_code == 200 and ok.json()["status"] == "approved"


def test_unknown_approvals_and_bad_bodies_are_clear_4xx(client: TestClient, keys: Keys) -> None:
    missing = client.get("/v1/approvals/apr_nope", headers=bearer(keys.approver))
    assert missing.status_code == 404 and missing.json()["error"]["argument"] == "approval_id"
    bad = client.post(
        "/v1/approvals/apr_nope/edit", headers=bearer(keys.approver), json={"arguments": 3}
    )
    assert bad.status_code == 422 and bad.json()["error"]["argument"] == "arguments"
