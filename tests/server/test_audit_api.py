"""The audit trail over HTTP: who may read it, paging, verify, checkpoints, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from api_support import Keys, bearer
from fastapi.testclient import TestClient

from klockwork import Klockwork
from klockwork.cli.main import main as cli
from klockwork.core.audit.log import verify_file
from klockwork.server import create_app


def _decide(kw: Klockwork, n: int = 3) -> None:
    for i in range(n):
        kw.gates.execute("builder", "read.file", {"path": f"/f{i}"})
    kw.gates.execute("reviewer", "db.drop", {})


def test_approvers_and_admins_page_through_the_trail_with_filters(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    _decide(kw, 5)
    first = client.get(
        "/v1/audit",
        params={"kind": "action.executed", "limit": 2},
        headers=bearer(keys.approver),
    )
    assert first.status_code == 200, first.text
    page = first.json()
    assert [e["data"]["metadata"]["path"] for e in page["entries"]] == ["/f0", "/f1"]
    assert page["next_cursor"]
    seen = [e["seq"] for e in page["entries"]]
    cursor = page["next_cursor"]
    while cursor:
        more = client.get(
            "/v1/audit",
            params={"kind": "action.executed", "limit": 2, "cursor": cursor},
            headers=bearer(keys.admin),
        ).json()
        seen += [e["seq"] for e in more["entries"]]
        cursor = more["next_cursor"]
    assert len(seen) == 5 and seen == sorted(seen)
    denied = client.get(
        "/v1/audit", params={"agent_id": "reviewer"}, headers=bearer(keys.approver)
    ).json()
    assert [e["kind"] for e in denied["entries"]] == ["action.denied"]
    assert denied["entries"][0]["hash"] and denied["next_cursor"] is None


@pytest.mark.parametrize(
    "path", ["/v1/audit", "/v1/audit/verify", "/v1/audit/export", "/v1/audit/checkpoint"]
)
def test_an_agent_key_may_not_read_the_trail_and_the_refusal_is_audited(
    kw: Klockwork, client: TestClient, keys: Keys, path: str
) -> None:
    method = "POST" if path.endswith("checkpoint") else "GET"
    refused = client.request(method, path, headers=bearer(keys.agent))
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "forbidden"
    entry = kw.audit.query(kind="access.denied").entries[-1]
    assert entry.data["path"] == path and entry.data["principal"] == "builder"
    assert client.request(method, path).status_code == 401


@pytest.mark.parametrize(
    ("params", "argument"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"kind": "lease.stolen"}, "kind"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"since": "yesterday"}, "since"),
        ({"agent_id": ""}, "agent_id"),
    ],
)
def test_bad_query_arguments_are_422_naming_them(
    client: TestClient, keys: Keys, params: dict[str, object], argument: str
) -> None:
    answer = client.get("/v1/audit", params=params, headers=bearer(keys.approver))
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["argument"] == argument


def test_verify_and_a_checkpoint_taken_over_http(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    _decide(kw)
    verified = client.get("/v1/audit/verify", headers=bearer(keys.approver)).json()
    assert verified["valid"] is True and verified["first_broken_seq"] is None
    assert verified["head_seq"] == verified["checked"] > 0

    checkpoint = client.post("/v1/audit/checkpoint", headers=bearer(keys.approver)).json()
    assert checkpoint["seq"] == verified["head_seq"]
    assert checkpoint["hash"] == verified["head_hash"]
    _decide(kw, 1)
    against = client.post("/v1/audit/verify", headers=bearer(keys.admin), json=checkpoint)
    assert against.status_code == 200 and against.json()["valid"] is True

    forged = {**checkpoint, "hash": "f" * 64}
    broken = client.post("/v1/audit/verify", headers=bearer(keys.admin), json=forged).json()
    assert broken["valid"] is False and broken["first_broken_seq"] == checkpoint["seq"]

    bad = client.post(
        "/v1/audit/verify", headers=bearer(keys.admin), json={**checkpoint, "seq": -1}
    )
    assert bad.status_code == 422 and bad.json()["error"]["argument"] == "seq"


def test_the_export_is_the_chain_the_cli_verifies_offline(
    kw: Klockwork,
    client: TestClient,
    keys: Keys,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _decide(kw, 1200)  # more than one chunk of the stream
    with client.stream("GET", "/v1/audit/export", headers=bearer(keys.approver)) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/x-ndjson"
        body = b"".join(answer.iter_bytes())
    exported = tmp_path / "over-http.jsonl"
    exported.write_bytes(body)
    local = tmp_path / "local.jsonl"
    count = kw.audit.export(local)
    # The export answered before the refusals recorded after it; both start the same.
    assert local.read_bytes().startswith(body) and body.count(b"\n") <= count
    assert body.endswith(b"\n") and body.count(b"\n") > 1200

    assert verify_file(exported).valid
    assert cli(["audit", "verify", str(exported), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["valid"] is True

    lines = body.splitlines()
    entry = json.loads(lines[5])
    entry["data"]["metadata"] = {"path": "/etc/shadow"}
    lines[5] = json.dumps(entry, separators=(",", ":")).encode()
    exported.write_bytes(b"\n".join(lines) + b"\n")
    assert cli(["audit", "verify", str(exported)]) != 0
    assert f"seq {entry['seq']}" in capsys.readouterr().out


def test_a_new_trail_exports_its_one_entry() -> None:
    with Klockwork() as fresh:
        app = create_app(fresh)
        _, secret = app.state.server.keys.create("root", "admin")  # the one entry
        with TestClient(app) as client:
            answer = client.get("/v1/audit/export", headers=bearer(secret))
            assert answer.status_code == 200
            assert [json.loads(line)["kind"] for line in answer.content.splitlines()] == [
                "key.created"
            ]
