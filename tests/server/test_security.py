"""The API refuses whoever may not ask, and the audit trail says so.

Every refusal here answers 401/403/404/429 with the error body, changes
nothing, and (but for the 429s and the 404s that hide what another agent
asked) leaves an ``access.denied`` entry naming the reason, the path and,
when a key was valid, its principal. Identity comes from the key only:
nothing a body, a query or a header other than the key says changes who acts.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_support import Keys, bearer
from fastapi import FastAPI
from fastapi.testclient import TestClient

from klockwork import Klockwork
from klockwork.server import ServerSettings, create_app
from klockwork.server import keys as keys_module
from klockwork.server.auth import FailureLimiter
from klockwork.server.errors import MAX_BODY_BYTES
from klockwork.server.keys import ApiKey

FAKE_KEY = "kw_0123456789abcdef_" + "A" * 43  # well formed, never created


def _pending(kw: Klockwork, agent: str = "builder") -> str:
    result = kw.gates.execute(agent, "deploy.prod", {"version": "1.2"})
    assert result.status == "requested" and result.approval_id is not None
    return result.approval_id


def _denials(kw: Klockwork) -> list[dict[str, Any]]:
    return [dict(e.data) for e in kw.audit.query(kind="access.denied", limit=1000).entries]


def _refused(answer: Any, status: int, kind: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["type"] == kind, answer.text
    assert set(answer.json()["error"]) == {"type", "message", "argument"}


def _has_routes(app: FastAPI, prefix: str) -> bool:
    return any(path.startswith(prefix) for path in app.openapi()["paths"])


# -- no key, a bad key, a revoked key --------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/whoami"),
        ("GET", "/v1/approvals"),
        ("POST", "/v1/approvals/apr_x/approve"),
        ("GET", "/v1/keys"),
        ("POST", "/v1/keys"),
        ("DELETE", "/v1/keys/0123456789abcdef"),
    ],
)
def test_a_request_without_a_key_is_refused_and_audited(
    kw: Klockwork, client: TestClient, keys: Keys, method: str, path: str
) -> None:
    answer = client.request(method, path, json={})
    _refused(answer, 401, "unauthenticated")
    entry = _denials(kw)[-1]
    assert entry["reason"] == "unauthenticated" and entry["path"] == path
    assert entry["method"] == method and "principal" not in entry


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer garbage"},
        {"Authorization": "Bearer kw_"},
        {"Authorization": "Bearer " + FAKE_KEY.upper()},  # key ids are lowercase hex
        {"Authorization": "Bearer " + FAKE_KEY + "x"},
        {"Authorization": "Bearer " + FAKE_KEY[:-1]},
        {"Authorization": "Bearer " + FAKE_KEY + "\t"},
        {"Authorization": b"Bearer kw_\xe9\xff"},  # not ASCII (latin-1 on the wire)
        {"Authorization": "Bearer " + "k" * 8000},  # a huge header
        {"X-API-Key": ""},
        {"X-API-Key": "garbage"},
        {"X-API-Key": FAKE_KEY},
        {"Authorization": "Bearer " + FAKE_KEY},
    ],
    ids=lambda h: repr(h)[:40],
)
def test_a_malformed_or_unknown_key_is_refused_and_audited(
    kw: Klockwork, client: TestClient, keys: Keys, headers: dict[str, Any]
) -> None:
    answer = client.get("/v1/whoami", headers=headers)
    _refused(answer, 401, "unauthenticated")
    entry = _denials(kw)[-1]
    assert entry["reason"] == "unauthenticated" and entry["path"] == "/v1/whoami"
    assert entry["rate_limited"] is False and "principal" not in entry


@pytest.mark.parametrize(
    "authorization",
    ["Bearer", "Bearer ", "Bearer    ", "Basic Ym9iOmJvYg==", "Token x", ""],
)
def test_an_empty_bearer_or_another_scheme_is_no_key(
    kw: Klockwork, client: TestClient, keys: Keys, authorization: str
) -> None:
    answer = client.get("/v1/whoami", headers={"Authorization": authorization})
    _refused(answer, 401, "unauthenticated")
    assert _denials(kw)[-1]["reason"] == "unauthenticated"


def test_the_right_key_id_with_a_wrong_secret_is_refused(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    key_id = keys.approver.split("_")[1]
    forged = f"kw_{key_id}_{'B' * 43}"
    _refused(client.get("/v1/whoami", headers=bearer(forged)), 401, "unauthenticated")
    assert _denials(kw)[-1]["reason"] == "unauthenticated"
    ok = client.get("/v1/whoami", headers=bearer(keys.approver))
    assert ok.status_code == 200 and ok.json()["principal"] == "bob"


def test_a_revoked_key_is_refused_from_the_next_request_on(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    assert client.get("/v1/whoami", headers=bearer(keys.other_agent)).status_code == 200
    key_id = keys.other_agent.split("_")[1]
    revoked = client.delete(f"/v1/keys/{key_id}", headers=bearer(keys.admin))
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    for method, path in (("GET", "/v1/whoami"), ("GET", "/v1/approvals")):
        _refused(
            client.request(method, path, headers=bearer(keys.other_agent)), 401, "unauthenticated"
        )
        assert _denials(kw)[-1]["path"] == path


# -- roles -----------------------------------------------------------------------------
@pytest.mark.parametrize("who", ["approver", "agent"])
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/keys", None),
        ("POST", "/v1/keys", {"principal": "mallory", "role": "admin"}),
        ("DELETE", "/v1/keys/{admin_id}", None),
    ],
)
def test_only_an_admin_key_manages_keys(
    kw: Klockwork,
    client: TestClient,
    keys: Keys,
    who: str,
    method: str,
    path: str,
    body: dict[str, str] | None,
) -> None:
    secret = getattr(keys, who)
    path = path.format(admin_id=keys.admin.split("_")[1])
    before = [k.model_dump() for k in kw.store.list_records("apikey", ApiKey)]
    _refused(client.request(method, path, headers=bearer(secret), json=body), 403, "forbidden")
    assert [k.model_dump() for k in kw.store.list_records("apikey", ApiKey)] == before
    entry = _denials(kw)[-1]
    assert entry["reason"] == "forbidden" and entry["path"] == path
    assert entry["principal"] == {"approver": "bob", "agent": "builder"}[who]
    assert entry["role"] == who


@pytest.mark.parametrize("verb", ["approve", "deny", "edit"])
def test_an_agent_key_decides_nothing(
    kw: Klockwork, client: TestClient, keys: Keys, verb: str
) -> None:
    approval_id = _pending(kw, "builder")
    body = {"arguments": {"version": "9"}} if verb == "edit" else {}
    for secret in (keys.agent, keys.other_agent):
        answer = client.post(
            f"/v1/approvals/{approval_id}/{verb}", headers=bearer(secret), json=body
        )
        _refused(answer, 403, "forbidden")
        entry = _denials(kw)[-1]
        assert entry["path"] == f"/v1/approvals/{approval_id}/{verb}"
        assert entry["role"] == "agent"
    assert kw.approvals.get(approval_id).status.value == "pending"
    assert kw.approvals.get(approval_id).decisions == []


def test_an_agent_key_does_not_see_another_agents_approval(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    theirs = _pending(kw, "reviewer")
    answer = client.get(f"/v1/approvals/{theirs}", headers=bearer(keys.agent))
    _refused(answer, 404, "approval_not_found")  # not even told it exists
    listed = client.get("/v1/approvals?status=all", headers=bearer(keys.agent)).json()
    assert theirs not in [a["approval_id"] for a in listed]


def test_reading_another_agents_approval_is_audited(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    theirs = _pending(kw, "reviewer")
    answer = client.get(f"/v1/approvals/{theirs}", headers=bearer(keys.agent))
    _refused(answer, 404, "approval_not_found")
    entry = _denials(kw)[-1]
    assert entry["principal"] == "builder" and entry["path"] == f"/v1/approvals/{theirs}"


# -- approving one's own agent's request -------------------------------------------------
@pytest.mark.parametrize("verb", ["approve", "deny", "edit"])
def test_the_owner_of_the_agent_decides_none_of_its_requests(
    kw: Klockwork, client: TestClient, keys: Keys, verb: str
) -> None:
    approval_id = _pending(kw, "builder")
    body = {"arguments": {"version": "9"}} if verb == "edit" else {"comment": "mine"}
    answer = client.post(
        f"/v1/approvals/{approval_id}/{verb}", headers=bearer(keys.alice), json=body
    )
    _refused(answer, 403, "own_agent")
    entry = _denials(kw)[-1]
    assert entry["reason"] == "own_agent" and entry["principal"] == "alice"
    assert entry["path"] == f"/v1/approvals/{approval_id}/{verb}"
    assert entry["approval_id"] == approval_id
    assert kw.approvals.get(approval_id).decisions == []


def test_the_owner_decides_none_of_its_agents_delegates_requests(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    approval_id = _pending(kw, "builder/worker-1")
    answer = client.post(
        f"/v1/approvals/{approval_id}/approve", headers=bearer(keys.alice), json={}
    )
    _refused(answer, 403, "own_agent")
    assert kw.approvals.get(approval_id).decisions == []


def test_revoking_the_agents_key_does_not_let_its_owner_approve(
    app: FastAPI, kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    approval_id = _pending(kw, "builder")
    client.delete(f"/v1/keys/{keys.agent.split('_')[1]}", headers=bearer(keys.admin))
    answer = client.post(
        f"/v1/approvals/{approval_id}/approve", headers=bearer(keys.alice), json={}
    )
    _refused(answer, 403, "own_agent")
    assert kw.approvals.get(approval_id).decisions == []


@pytest.mark.parametrize("principal", ["builder", "Builder", "BUILDER"])
def test_the_requester_with_an_approver_key_of_its_own_name_is_refused(
    app: FastAPI, kw: Klockwork, client: TestClient, keys: Keys, principal: str
) -> None:
    approval_id = _pending(kw, "builder")
    _, own = app.state.server.keys.create(principal, "approver")
    answer = client.post(f"/v1/approvals/{approval_id}/approve", headers=bearer(own), json={})
    _refused(answer, 403, "not_an_approver")
    entry = _denials(kw)[-1]
    assert entry["reason"] == "not_an_approver" and entry["principal"] == principal
    assert kw.approvals.get(approval_id).decisions == []


def test_the_owner_under_another_case_is_refused_too(
    app: FastAPI, kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    approval_id = _pending(kw, "builder")
    _, shouting = app.state.server.keys.create("ALICE", "approver")
    answer = client.post(f"/v1/approvals/{approval_id}/approve", headers=bearer(shouting), json={})
    assert answer.status_code == 403
    assert kw.approvals.get(approval_id).decisions == []


# -- identity never from the request ---------------------------------------------------
def test_a_body_or_query_naming_someone_else_is_ignored(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    approval_id = _pending(kw, "builder")
    impostor = {"approver": "carol", "principal": "carol", "agent_id": "carol", "key_id": "x"}
    answer = client.post(
        f"/v1/approvals/{approval_id}/approve",
        headers={**bearer(keys.approver), "X-Principal": "carol", "X-Forwarded-User": "carol"},
        params=impostor,
        json={"comment": "ok", **impostor},
    )
    assert answer.status_code == 200, answer.text
    assert [d.approver for d in kw.approvals.get(approval_id).decisions] == ["bob"]
    who = client.get("/v1/whoami", headers=bearer(keys.agent), params=impostor).json()
    assert (who["principal"], who["role"]) == ("builder", "agent")


def test_a_lease_is_taken_as_the_keys_agent_whatever_the_body_says(
    app: FastAPI, kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    if not _has_routes(app, "/v1/leases"):
        pytest.skip("the leases routes are not in this app yet")
    body = {
        "session_id": "s1",
        "intents": [{"resource": "FILE:/repo/main", "predicate": "MUTATES"}],
        "agent_id": "reviewer",
        "principal": "reviewer",
    }
    answer = client.post(
        "/v1/leases", headers=bearer(keys.agent), params={"agent_id": "reviewer"}, json=body
    )
    assert answer.status_code == 200, answer.text
    verdict = answer.json()
    assert verdict["status"] == "GRANTED"
    assert [lease["agent_id"] for lease in verdict["leases"]] == ["builder"]
    lease_id = verdict["leases"][0]["lease_id"]

    # Another agent's key may not release it: refused, audited, the lease still held.
    theirs = client.post(f"/v1/leases/{lease_id}/release", headers=bearer(keys.other_agent))
    _refused(theirs, 403, "not_your_lease")
    entry = _denials(kw)[-1]
    assert entry["reason"] == "not_your_lease" and entry["principal"] == "reviewer"
    assert entry["path"] == f"/v1/leases/{lease_id}/release"
    assert [lease.lease_id for lease in kw.leases.list(agent_id="builder")] == [lease_id]
    # Nor may a person's approver key.
    assert client.post(
        f"/v1/leases/{lease_id}/release", headers=bearer(keys.approver)
    ).status_code in (403, 404)
    mine = client.post(f"/v1/leases/{lease_id}/release", headers=bearer(keys.agent))
    assert mine.status_code == 200 and mine.json() == {"released": True}


def test_a_gate_runs_as_the_keys_agent_whatever_the_body_says(
    app: FastAPI, kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    if not _has_routes(app, "/v1/gates"):
        pytest.skip("the gates routes are not in this app yet")
    answer = client.post(
        "/v1/gates/execute",
        headers=bearer(keys.agent),
        params={"agent_id": "reviewer"},
        json={"action": "deploy.prod", "metadata": {}, "agent_id": "reviewer", "requester": "x"},
    )
    assert answer.status_code == 200, answer.text
    (approval,) = kw.approvals.list(status="pending")
    assert approval.requester == "builder"
    # An approver key holds no agent: it cannot run a gate as anyone.
    refused = client.post(
        "/v1/gates/execute", headers=bearer(keys.approver), json={"action": "read.x"}
    )
    _refused(refused, 403, "forbidden")
    assert _denials(kw)[-1]["principal"] == "bob"


# -- brute force -----------------------------------------------------------------------
@pytest.fixture
def strict(kw: Klockwork) -> FastAPI:
    return create_app(kw, ServerSettings(max_failures=3, failure_window_s=1.0))


def _strict_keys(app: FastAPI) -> tuple[str, str]:
    made = app.state.server.keys
    return made.create("root", "admin")[1], made.create("bob", "approver")[1]


def test_key_guessing_is_rate_limited_per_address_and_a_valid_key_still_signs_in(
    kw: Klockwork, strict: FastAPI
) -> None:
    admin, approver = _strict_keys(strict)
    attacker = TestClient(strict, client=("203.0.113.9", 4000))
    neighbour = TestClient(strict, client=("203.0.113.10", 4000))
    for n in range(3):
        guess = f"kw_{n:016x}_{'C' * 43}"
        _refused(attacker.get("/v1/whoami", headers=bearer(guess)), 401, "unauthenticated")
    limited = [d for d in _denials(kw) if d["client"] == "203.0.113.9"]
    assert [d["rate_limited"] for d in limited] == [False, False, True]

    started = time.monotonic()
    for headers in (
        bearer(FAKE_KEY),
        {**bearer(FAKE_KEY), "X-Forwarded-For": "198.51.100.1", "X-Real-IP": "198.51.100.1"},
        {},
    ):
        blocked = attacker.get("/v1/whoami", headers=headers)
        _refused(blocked, 429, "rate_limited")
        assert 1 <= int(blocked.headers["Retry-After"]) <= 2
    # The right key from the same address (an agent beside the guesser) still works.
    assert attacker.get("/v1/whoami", headers=bearer(approver)).json()["principal"] == "bob"
    assert attacker.post("/v1/keys", headers=bearer(admin), json={}).status_code == 422
    # The 429s add nothing to the trail (the third failure says the limit was hit).
    assert len([d for d in _denials(kw) if d["client"] == "203.0.113.9"]) == 3
    # Another address is not affected.
    assert neighbour.get("/v1/whoami", headers=bearer(approver)).status_code == 200

    time.sleep(max(0.0, 1.05 - (time.monotonic() - started)))
    while attacker.get("/v1/whoami", headers=bearer(FAKE_KEY)).status_code == 429:
        assert time.monotonic() - started < 3.0, "still blocked after the window"
        time.sleep(0.05)


def test_requests_without_a_key_are_not_guesses_and_their_audit_is_bounded(
    kw: Klockwork, strict: FastAPI
) -> None:
    _, approver = _strict_keys(strict)
    anonymous = TestClient(strict, client=("203.0.113.20", 4000))
    for _ in range(20):
        _refused(anonymous.get("/v1/whoami"), 401, "unauthenticated")
    # Not counted as guesses: the address still signs in ...
    assert anonymous.get("/v1/whoami", headers=bearer(approver)).status_code == 200
    # ... and the trail holds max_failures entries per window, the last one saying so.
    mine = [d for d in _denials(kw) if d["client"] == "203.0.113.20"]
    assert len(mine) == 3 and mine[-1].get("audit_paused") is True


def test_the_failure_limiter_forgets_the_oldest_address_past_its_bound() -> None:
    limiter = FailureLimiter(max_failures=3, window_s=60.0, max_clients=100)
    for n in range(1000):
        for _ in range(5):
            limiter.failed(f"10.0.{n // 256}.{n % 256}")
    assert len(limiter._failures) == 100
    assert all(len(times) <= 3 for times in limiter._failures.values())
    assert limiter.blocked_for("10.0.3.231") > 59  # the most recent: still blocked
    assert limiter.blocked_for("10.0.0.0") == 0.0  # forgotten


# -- the keys themselves ---------------------------------------------------------------
def test_keys_are_stored_hashed_and_never_shown_again(tmp_path: Path) -> None:
    path = tmp_path / "kw.db"
    with Klockwork.open(f"sqlite:///{path}") as kw:
        app = create_app(kw)
        admin = app.state.server.keys.create("root", "admin")[1]
        with TestClient(app) as client:
            created = client.post(
                "/v1/keys", headers=bearer(admin), json={"principal": "deployer", "role": "agent"}
            ).json()
            secret = created["api_key"]
            assert "digest" not in created["key"]
            listed = client.get("/v1/keys?include_revoked=true", headers=bearer(admin)).text
            whoami = client.get("/v1/whoami", headers=bearer(secret)).json()
            assert whoami["principal"] == "deployer"
        records = kw.store.list_records("apikey", ApiKey)
        assert {r.digest for r in records} >= {hashlib.sha256(secret.encode()).hexdigest()}
        stored = json.dumps([r.model_dump() for r in records])
        trail = json.dumps([e.data for e in kw.audit.query(limit=1000).entries])
        kw.audit.flush()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    for text in (admin, secret):
        tail = text[len("kw_") + 16 + 1 :]  # the secret part (it may hold "_"): nowhere
        assert tail not in stored and tail not in trail and tail not in listed
        assert tail.encode() not in raw
        digest = hashlib.sha256(text.encode()).hexdigest()
        assert digest not in listed and digest not in trail


def test_a_presented_key_is_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch, client: TestClient, keys: Keys
) -> None:
    compared: list[tuple[str, str]] = []
    real = keys_module.hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", spy)
    assert client.get("/v1/whoami", headers=bearer(keys.approver)).status_code == 200
    key_id = keys.approver.split("_")[1]
    assert client.get("/v1/whoami", headers=bearer(f"kw_{key_id}_{'D' * 43}")).status_code == 401
    assert len(compared) == 2
    assert all(len(a) == len(b) == 64 for a, b in compared)  # digests, not the keys


def test_an_ipv6_host_is_limited_by_its_64_not_per_address(kw: Klockwork, strict: FastAPI) -> None:
    _, approver = _strict_keys(strict)
    for n in range(3):  # three addresses of one /64: one budget
        guesser = TestClient(strict, client=(f"2001:db8:1:2::{n + 1:x}", 4000))
        _refused(guesser.get("/v1/whoami", headers=bearer(FAKE_KEY)), 401, "unauthenticated")
    same_64 = TestClient(strict, client=("2001:db8:1:2:ffff::9", 4000))
    _refused(same_64.get("/v1/whoami", headers=bearer(FAKE_KEY)), 429, "rate_limited")
    other_64 = TestClient(strict, client=("2001:db8:1:3::1", 4000))
    _refused(other_64.get("/v1/whoami", headers=bearer(FAKE_KEY)), 401, "unauthenticated")
    mapped = TestClient(strict, client=("::ffff:203.0.113.30", 4000))
    plain = TestClient(strict, client=("203.0.113.30", 4000))
    for _ in range(3):
        mapped.get("/v1/whoami", headers=bearer(FAKE_KEY))
    _refused(plain.get("/v1/whoami", headers=bearer(FAKE_KEY)), 429, "rate_limited")
    assert plain.get("/v1/whoami", headers=bearer(approver)).status_code == 200


def test_a_bug_answers_the_error_body_and_nothing_of_the_exception(app: FastAPI) -> None:
    def boom() -> None:
        raise RuntimeError("secret internals")

    app.add_api_route("/v1/boom", boom)
    answer = TestClient(app, raise_server_exceptions=False).get("/v1/boom")
    assert answer.status_code == 500
    assert answer.json() == {
        "error": {"type": "internal", "message": "internal error", "argument": None}
    }


def test_the_keys_say_who_runs_an_agent_ignoring_case_and_delegation(
    app: FastAPI, keys: Keys
) -> None:
    made = app.state.server.keys
    assert made.runs("alice", "builder") and made.runs("ALICE", "builder")
    assert made.runs("Alice", "Builder/worker-1") and made.runs("alice", "builder/a/b")
    assert not made.runs("bob", "builder") and not made.runs("alice", "reviewer")
    assert not made.runs("alice", "builders") and not made.runs("alic", "builder")


def test_a_body_over_the_limit_is_refused_before_it_is_read(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    huge = b'{"principal": "' + b"a" * (MAX_BODY_BYTES + 1) + b'", "role": "admin"}'
    for headers in ({}, bearer(keys.admin)):
        answer = client.post(
            "/v1/keys", content=huge, headers={**headers, "Content-Type": "application/json"}
        )
        _refused(answer, 413, "too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: cut off once past the limit
        yield b'{"principal": "'
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b"a" * 65536
        yield b'", "role": "admin"}'

    chunked = client.post(
        "/v1/keys",
        content=chunks(),
        headers={**bearer(keys.admin), "Content-Type": "application/json"},
    )
    _refused(chunked, 413, "too_large")
    assert [k.principal for k in kw.store.list_records("apikey", ApiKey)].count("a") == 0
    # A body under the limit is read as usual.
    ok = client.post(
        "/v1/keys", headers=bearer(keys.admin), json={"principal": "p", "role": "agent"}
    )
    assert ok.status_code == 201


def test_every_operation_but_health_needs_a_key(
    app: FastAPI, kw: Klockwork, client: TestClient
) -> None:
    """Over the whole schema (new routes too), the streams included: 401 and audited."""
    operations = [
        (method.upper(), path)
        for path, methods in app.openapi()["paths"].items()
        for method in methods
        if path != "/v1/health"
    ]
    assert len(operations) >= 30
    for method, path in operations:
        url = re.sub(r"\{[^}]+\}", "x", path)
        with client.stream(method, url, json={}) as answer:  # a stream answers 401 at once
            assert answer.status_code == 401, (method, path)
            answer.read()
            assert answer.json()["error"]["type"] == "unauthenticated", (method, path)
    # Audited, up to max_failures (10) per window per address, the last saying so.
    audited = _denials(kw)
    assert len(audited) == 10 and audited[-1]["audit_paused"] is True
    sent = [(method, re.sub(r"\{[^}]+\}", "x", path)) for method, path in operations]
    assert [(d["method"], d["path"]) for d in audited] == sent[:10]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/gates/execute", '{"action": "read.x", "metadata": {"\\udfff": 1}}'),
        ("/v1/gates/can_i", '{"action": "read.x", "metadata": {"a": {"\\udfff": 1}}}'),
        ("/v1/bus/jobs/publish", '{"payload": {"\\ud800": 1}}'),
    ],
)
def test_a_lone_surrogate_in_a_key_is_a_422_not_a_500(
    client: TestClient, keys: Keys, path: str, body: str
) -> None:
    headers = {**bearer(keys.agent), "content-type": "application/json"}
    answer = client.post(path, headers=headers, content=body)
    assert answer.status_code == 422, answer.text
    assert "\\ud" in answer.json()["error"]["message"]  # named, spelled out


def test_one_keys_refusals_cannot_grow_the_trail_without_bound(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    from klockwork.server.auth import AUDITED_REFUSALS

    long_path = "/v1/keys/" + "a" * 5000
    for _ in range(AUDITED_REFUSALS + 20):
        assert client.delete(long_path, headers=bearer(keys.agent)).status_code == 403
    mine = [d for d in _denials(kw) if d.get("principal") == "builder"]
    assert len(mine) == AUDITED_REFUSALS and mine[-1]["audit_paused"] is True
    assert all(len(d["path"]) <= 300 for d in mine)
    # Another key's refusals are still recorded.
    client.delete("/v1/keys/x", headers=bearer(keys.other_agent))
    assert _denials(kw)[-1]["principal"] == "reviewer"
