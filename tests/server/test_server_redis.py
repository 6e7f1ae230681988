"""``klockwork serve`` on a Redis store: the HTTP API, the inbox and a real server process.

The other server tests run on memory and SQLite; these prove the same API
works on Redis, where what one engine does another (another process) sees:
keys created and checked in Redis (hashed: the secrets are nowhere in it),
a blocking acquire woken by a release made by another engine, a gate's
long-poll answered once it is approved, waiters, the audit chain, the bus,
the inbox, and ``klockwork serve --url redis://...`` driven by the CLI.

Needs ``KLOCKWORK_TEST_REDIS_URL`` (e.g. ``redis://127.0.0.1:6379/15``):
without it every test skips; with it set, an unreachable Redis fails them.
Each test works in a namespace of its own, deleted afterwards with
SCAN + UNLINK (never FLUSHDB: the database is shared).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import CLI_VARIABLES, Here, Keys, bearer
from conformance.conftest import drop_redis_namespace
from fastapi import FastAPI
from fastapi.testclient import TestClient
from support import ROOT

from klockwork import ApprovalStatus, Klockwork
from klockwork.cli import OK
from klockwork.core.audit.log import verify_file
from klockwork.server.inbox import Inbox
from klockwork.server.inbox.events import changed_sections, fingerprint
from klockwork.server.keys import ApiKeys

REDIS_URL = os.environ.get("KLOCKWORK_TEST_REDIS_URL", "")
pytestmark = [
    pytest.mark.skipif(
        not REDIS_URL,
        reason="Redis tests need a server: KLOCKWORK_TEST_REDIS_URL=redis://127.0.0.1:6379/15 "
        "make test runs them",
    ),
    # The test Redis keeps nothing on disk: the engine says so, rightly; not news here.
    pytest.mark.filterwarnings("ignore:redis store .* runs without persistence"),
]

RESOURCE = "FILE:/src/app.py"
_ADDRESS = re.compile(r"at (http://127\.0\.0\.1:\d+)/v1")
_CSRF = re.compile(r'name="csrf" value="([^"]*)"')


def _with_policies(kw: Klockwork) -> Klockwork:
    """The policies of the server tests (an engine's own: each engine adds them)."""
    kw.policies.add({"name": "deploys", "action": "deploy.*", "effect": "require_approval"})
    kw.policies.add({"name": "reads", "action": "read.*", "effect": "allow"})
    kw.policies.add({"name": "no-drops", "action": "db.drop", "effect": "deny"})
    return kw


def _redis() -> Any:
    import redis

    return redis.Redis.from_url(REDIS_URL)


def _stored(namespace: str) -> bytes:
    """Every key of the namespace and every value in it, whatever its type, as bytes."""
    client = _redis()
    seen: list[bytes] = []
    try:
        for key in client.scan_iter(match=f"{{{namespace}}}:*", count=1000):
            kind = client.type(key).decode()
            if kind == "string":
                value: Any = client.get(key)
            elif kind == "hash":
                value = client.hgetall(key)
            elif kind == "list":
                value = client.lrange(key, 0, -1)
            elif kind == "set":
                value = client.smembers(key)
            elif kind == "zset":
                value = client.zrange(key, 0, -1, withscores=True)
            elif kind == "stream":
                value = client.xrange(key)
            else:
                value = kind
            seen.append(key + b" " + repr(value).encode())
    finally:
        client.close()
    return b"\n".join(seen)


@pytest.fixture
def namespace() -> Iterator[str]:
    """A namespace of this test's own; its keys are deleted afterwards (SCAN + UNLINK)."""
    name = f"t-{uuid.uuid4().hex[:16]}-server"
    yield name
    drop_redis_namespace(name)


@pytest.fixture
def url(namespace: str) -> str:
    return f"{REDIS_URL}{'&' if '?' in REDIS_URL else '?'}namespace={namespace}"


@pytest.fixture
def kw(url: str) -> Iterator[Klockwork]:
    """The server's engine, on Redis (overrides the memory engine of ``conftest``)."""
    engine = _with_policies(Klockwork.open(url))
    yield engine
    engine.close()


@pytest.fixture
def other(url: str) -> Iterator[Klockwork]:
    """Another engine on the same namespace: what another process sees and does."""
    engine = _with_policies(Klockwork.open(url))
    yield engine
    engine.close()


def _eventually(condition: Callable[[], Any], what: str, timeout_s: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return found


class InThread:
    """One blocking call on a thread of its own; ``result()`` joins and returns what it answered."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self._answer: list[Any] = []
        self._thread = threading.Thread(target=lambda: self._answer.append(call()), daemon=True)
        self._thread.start()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout_s: float = 10.0) -> Any:
        self._thread.join(timeout_s)
        assert self._answer, "the call did not answer in time"
        return self._answer[0]


def _ask(wait_s: float = 0.0) -> dict[str, Any]:
    return {
        "session_id": "s1",
        "intents": [{"resource": RESOURCE, "predicate": "MUTATES"}],
        "wait_s": wait_s,
    }


# -- keys ----------------------------------------------------------------------------------
def test_keys_are_kept_hashed_in_redis_and_any_engine_checks_and_revokes_them(
    kw: Klockwork, other: Klockwork, client: TestClient, keys: Keys, namespace: str
) -> None:
    for secret, who in [
        (keys.admin, ("root", "admin")),
        (keys.approver, ("bob", "approver")),
        (keys.agent, ("builder", "agent")),
    ]:
        me = client.get("/v1/whoami", headers=bearer(secret))
        assert me.status_code == 200, me.text
        assert (me.json()["principal"], me.json()["role"]) == who
    forged = keys.agent[:-1] + ("A" if keys.agent[-1] != "A" else "B")
    assert client.get("/v1/whoami", headers=bearer(forged)).status_code == 401
    assert client.get("/v1/whoami").status_code == 401

    # The store holds each key's SHA-256, never the key or its secret part.
    stored = _stored(namespace)
    assert b"apikey" in stored
    records = {k.principal: k for k in ApiKeys(other).list()}
    assert set(records) == {"root", "bob", "carol", "builder", "reviewer", "alice"}
    for secret in keys:
        assert secret.encode() not in stored
        assert secret.rsplit("_", 1)[1].encode() not in stored
    assert records["builder"].digest == hashlib.sha256(keys.agent.encode()).hexdigest()
    assert records["builder"].digest.encode() in stored
    assert records["builder"].owner == "alice"

    # Another process knows the key, and its revocation holds here at once.
    bob = ApiKeys(other).authenticate(keys.approver)
    assert bob is not None and bob.principal == "bob"
    ApiKeys(other).revoke(bob.key_id)
    assert client.get("/v1/whoami", headers=bearer(keys.approver)).status_code == 401
    # A key made over HTTP lives in Redis too: the other engine checks it.
    made = client.post(
        "/v1/keys", headers=bearer(keys.admin), json={"principal": "dave", "role": "approver"}
    )
    assert made.status_code == 201, made.text
    dave = ApiKeys(other).authenticate(made.json()["api_key"])
    assert dave is not None and dave.principal == "dave"
    assert made.json()["api_key"].encode() not in _stored(namespace)


# -- leases --------------------------------------------------------------------------------
def test_leases_as_the_keys_agent_and_a_wait_ended_by_another_engines_release(
    kw: Klockwork, other: Klockwork, client: TestClient, keys: Keys
) -> None:
    kw.register_agent("builder", priority=1)  # older than holder: it waits, never dies
    other.register_agent("holder", priority=2)

    granted = client.post("/v1/leases", headers=bearer(keys.agent), json=_ask())
    assert granted.status_code == 200, granted.text
    assert granted.json()["status"] == "GRANTED"
    (lease,) = granted.json()["leases"]
    assert lease["agent_id"] == "builder"
    assert [held.lease_id for held in other.leases.list()] == [lease["lease_id"]]
    board = client.get("/v1/leases", headers=bearer(keys.approver)).json()
    assert [(held["agent_id"], held["resource"]) for held in board] == [("builder", RESOURCE)]
    released = client.post(f"/v1/leases/{lease['lease_id']}/release", headers=bearer(keys.agent))
    assert released.json() == {"released": True}
    ended = other.leases.get(lease["lease_id"])
    assert ended is not None and ended.state.value == "RELEASED"

    # Another process holds the file; builder waits on the server for it.
    held = other.leases.acquire("holder", "h1", (RESOURCE, "MUTATES"), 60_000).leases[0]
    waiting = InThread(
        lambda: client.post("/v1/leases", headers=bearer(keys.agent), json=_ask(wait_s=10))
    )
    line = _eventually(
        lambda: client.get("/v1/waiters", headers=bearer(keys.approver)).json(), "a waiter"
    )
    assert [(w["agent_id"], w["resource"], w["predicate"]) for w in line] == [
        ("builder", RESOURCE, "MUTATES")
    ]
    assert [w.agent_id for w in other.leases.waiters()] == ["builder"]  # in Redis, for all
    assert not waiting.done
    released_at = time.monotonic()
    assert other.leases.release(held.lease_id)
    answer = waiting.result()
    assert time.monotonic() - released_at < 3  # woken by the release, not by wait_s
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "GRANTED"
    (second,) = answer.json()["leases"]
    assert [(x.agent_id, x.lease_id) for x in other.leases.list()] == [
        ("builder", second["lease_id"])
    ]
    assert second["fencing_token"] > held.fencing_token > lease["fencing_token"]
    assert client.get("/v1/waiters", headers=bearer(keys.approver)).json() == []
    # Nobody else releases builder's lease; builder does.
    refused = client.post(
        f"/v1/leases/{second['lease_id']}/release", headers=bearer(keys.other_agent)
    )
    assert refused.status_code == 403
    done = client.post(f"/v1/leases/{second['lease_id']}/release", headers=bearer(keys.agent))
    assert done.json() == {"released": True} and other.leases.list() == []


# -- gates and approvals -------------------------------------------------------------------
def test_a_gate_approved_over_http_answers_its_long_poll(
    kw: Klockwork, other: Klockwork, client: TestClient, keys: Keys
) -> None:
    asked = client.post(
        "/v1/gates/execute",
        headers=bearer(keys.agent),
        json={"action": "deploy.prod", "metadata": {"version": "1.2"}},
    )
    assert asked.status_code == 200, asked.text
    result = asked.json()["result"]
    assert result["status"] == "requested" and asked.json()["pending"] is True
    event, approval_id = result["audit_event_id"], result["approval_id"]
    listed = client.get("/v1/approvals", headers=bearer(keys.approver)).json()
    assert [a["approval_id"] for a in listed] == [approval_id]
    assert other.approvals.get(approval_id).status is ApprovalStatus.PENDING

    poll = InThread(
        lambda: client.get(f"/v1/gates/{event}", headers=bearer(keys.agent), params={"wait_s": 10})
    )
    time.sleep(0.3)
    assert not poll.done  # held open while the approval is pending
    # The requesting agent's owner may not approve it; bob may.
    owner = client.post(f"/v1/approvals/{approval_id}/approve", headers=bearer(keys.alice), json={})
    assert owner.status_code == 403
    approved = client.post(
        f"/v1/approvals/{approval_id}/approve",
        headers=bearer(keys.approver),
        json={"comment": "ship it"},
    )
    assert approved.status_code == 200, approved.text
    assert approved.json()["status"] == "approved"
    answer = poll.result()
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["result"]["status"] == "executed" and body["pending"] is False
    assert body["approval"]["status"] == "approved"
    assert [(d["approver"], d["comment"]) for d in body["approval"]["decisions"]] == [
        ("bob", "ship it")
    ]
    assert other.approvals.get(approval_id).status is ApprovalStatus.APPROVED

    # A deny made by another process ends a long-poll here too.
    asked = client.post(
        "/v1/gates/execute", headers=bearer(keys.agent), json={"action": "deploy.staging"}
    ).json()
    denier = threading.Timer(
        0.3, lambda: other.approvals.deny(asked["result"]["approval_id"], "carol", "not today")
    )
    denier.start()
    started = time.monotonic()
    event = asked["result"]["audit_event_id"]
    denied = client.get(f"/v1/gates/{event}", headers=bearer(keys.agent), params={"wait_s": 10})
    denier.join()
    assert time.monotonic() - started < 5
    assert denied.json()["result"]["status"] == "denied"
    assert "not today" in denied.json()["refusal"]


# -- the audit trail -----------------------------------------------------------------------
def test_the_audit_chain_both_engines_wrote_verifies_over_http(
    kw: Klockwork, other: Klockwork, client: TestClient, keys: Keys, tmp_path: Path
) -> None:
    client.post("/v1/gates/execute", headers=bearer(keys.agent), json={"action": "read.file"})
    other.gates.execute("reviewer", "db.drop", {})
    lease = other.leases.acquire("reviewer", "s1", (RESOURCE, "MUTATES"), 60_000).leases[0]
    other.leases.release(lease.lease_id)

    verified = client.get("/v1/audit/verify", headers=bearer(keys.approver))
    assert verified.status_code == 200, verified.text
    assert verified.json()["valid"] is True and verified.json()["first_broken_seq"] is None
    assert verified.json()["checked"] == verified.json()["head_seq"] > 0
    checkpoint = client.post("/v1/audit/checkpoint", headers=bearer(keys.approver)).json()
    other.gates.execute("reviewer", "read.more", {})  # the chain grows after the checkpoint
    against = client.post("/v1/audit/verify", headers=bearer(keys.admin), json=checkpoint)
    assert against.status_code == 200 and against.json()["valid"] is True
    forged = {**checkpoint, "hash": "f" * 64}
    broken = client.post("/v1/audit/verify", headers=bearer(keys.admin), json=forged).json()
    assert broken["valid"] is False

    kinds = {
        e["kind"]
        for e in client.get(
            "/v1/audit", headers=bearer(keys.approver), params={"limit": 1000}
        ).json()["entries"]
    }
    expected = {"key.created", "action.executed", "action.denied", "lease.granted"}
    assert expected <= kinds, kinds
    assert client.get("/v1/audit/verify", headers=bearer(keys.agent)).status_code == 403
    exported = tmp_path / "audit.jsonl"
    exported.write_bytes(client.get("/v1/audit/export", headers=bearer(keys.approver)).content)
    assert verify_file(exported).valid


# -- the bus -------------------------------------------------------------------------------
def test_bus_publish_subscribe_and_ack_with_another_engines_publish(
    kw: Klockwork, other: Klockwork, client: TestClient, keys: Keys
) -> None:
    sent = client.post(
        "/v1/bus/jobs/publish", headers=bearer(keys.agent), json={"payload": {"job": 1}}
    )
    assert sent.status_code == 200, sent.text
    message = sent.json()
    assert message["channel"] == "jobs" and message["payload"] == {"job": 1}

    def read(wait_s: float = 0.0) -> httpx.Response:
        return client.post(
            "/v1/bus/jobs/subscribe",
            headers=bearer(keys.agent),
            json={"group": "workers", "consumer": "w1", "wait_s": wait_s},
        )

    # The group starts at "new": the first read sees what is published from now on.
    assert read().json() == []
    again = client.post(
        "/v1/bus/jobs/publish", headers=bearer(keys.agent), json={"payload": {"job": 2}}
    ).json()
    (delivery,) = read().json()
    assert delivery["message"]["id"] == again["id"] and delivery["consumer"] == "builder:w1"
    acked = client.post(
        "/v1/bus/jobs/ack",
        headers=bearer(keys.agent),
        json={"group": "workers", "message_ids": [again["id"]]},
    )
    assert acked.json() == {"acked": 1}
    (group,) = other.bus.groups("jobs")
    assert group.group == "workers" and group.pending == 0

    # A long poll here is answered by another process's publish.
    polling = InThread(lambda: read(wait_s=10))
    time.sleep(0.3)
    assert not polling.done
    published_at = time.monotonic()
    late = other.bus.publish("jobs", {"job": "late"})
    taken = polling.result()
    assert time.monotonic() - published_at < 3
    assert [d["message"]["id"] for d in taken.json()] == [late.id]
    assert [g.pending for g in other.bus.groups("jobs")] == [1]  # taken, not acked yet
    peeked = client.get("/v1/bus/jobs/peek", headers=bearer(keys.approver)).json()
    assert [m["payload"] for m in peeked] == [{"job": 1}, {"job": 2}, {"job": "late"}]
    channels = client.get("/v1/bus/channels", headers=bearer(keys.approver)).json()
    assert [c["channel"] for c in channels] == ["jobs"]


# -- the inbox -----------------------------------------------------------------------------
def _token(page: httpx.Response) -> str:
    found = _CSRF.search(page.text)
    assert found is not None, page.text
    return found.group(1)


def test_the_inbox_signs_in_decides_and_shows_what_other_engines_did(
    kw: Klockwork, other: Klockwork, app: FastAPI, client: TestClient, keys: Keys
) -> None:
    inbox = Inbox(app.state.server)
    before = fingerprint(inbox)
    # An agent in another process asks for an approval and holds a lease.
    approval_id = other.gates.execute("reviewer", "deploy.prod", {"version": "2.0"}).approval_id
    assert approval_id is not None
    other.leases.acquire("reviewer", "s1", (RESOURCE, "MUTATES"), 60_000)
    assert changed_sections(before, fingerprint(inbox)) == ["pending", "history", "leases", "audit"]

    form = client.get("/")
    assert 'name="api_key"' in form.text
    signed = client.post("/signin", data={"csrf": _token(form), "api_key": keys.approver})
    assert signed.status_code == 200 and "Signed in as" in signed.text, signed.text
    token = _token(signed)
    assert keys.approver not in str(client.cookies)
    page = client.get("/")
    assert approval_id in page.text and "deploy.prod" in page.text
    voted = client.post(
        f"/approvals/{approval_id}/vote",
        data={"csrf": token, "verdict": "approve", "comment": "go"},
        follow_redirects=False,
    )
    assert voted.status_code == 303, voted.text
    assert "You approved deploy.prod" in client.get(voted.headers["location"]).text
    decided = other.approvals.get(approval_id)
    assert decided.status is ApprovalStatus.APPROVED
    assert [(d.approver, d.comment) for d in decided.decisions] == [("bob", "go")]

    board = client.get("/leases").text
    assert RESOURCE in board and "reviewer" in board and "Nobody is waiting." in board
    verified = client.post("/audit/verify", data={"csrf": token})
    assert "The audit trail verifies" in verified.text
    # A key revoked by another process signs its session out.
    bob = ApiKeys(other).authenticate(keys.approver)
    assert bob is not None
    ApiKeys(other).revoke(bob.key_id)
    assert "Signed in as" not in client.get("/").text


# -- a real server process -----------------------------------------------------------------
def _cli_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in CLI_VARIABLES:
        env.pop(name, None)
    return env


@pytest.mark.slow
def test_klockwork_serve_on_redis_answers_httpx_and_the_cli_then_stops_with_exit_0(
    url: str,
    tmp_path: Path,
    here: Here,
) -> None:
    with Klockwork.open(url) as agent:
        agent.policies.add({"name": "merges", "action": "pr.merge", "effect": "require_approval"})
        _, bob = ApiKeys(agent).create("bob", "approver")
        _, merger = ApiKeys(agent).create("merger", "agent", owner="alice")

        out, err = tmp_path / "serve.out", tmp_path / "serve.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "klockwork.cli", "serve", "--url", url, "--port", "0"],
                stdout=stdout, stderr=stderr, env=_cli_env(), cwd=tmp_path,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            base = None
            while base is None:
                assert process.poll() is None, f"serve exited: {err.read_text()}"
                assert time.monotonic() < deadline, f"serve did not start: {err.read_text()}"
                found = _ADDRESS.search(out.read_text())
                base = found.group(1) if found else None
                if base is None:
                    time.sleep(0.05)
            health = _eventually(
                lambda: httpx.get(f"{base}/v1/health", timeout=2).status_code == 200, "health"
            )
            assert health
            assert "kw_" not in err.read_text()  # the store had keys: no admin key is made

            me = httpx.get(f"{base}/v1/whoami", headers=bearer(merger), timeout=5)
            assert me.status_code == 200 and me.json()["principal"] == "merger"
            # An agent asks (this process); the server lists it from Redis.
            approval_id = agent.gates.execute("merger", "pr.merge", {"pr": 7}).approval_id
            assert approval_id is not None
            cli = ("--server", base)
            code, shown, said = here("approvals", "list", "--json", *cli, KLOCKWORK_API_KEY=bob)
            assert code == OK, said
            assert [a["approval_id"] for a in json.loads(shown)] == [approval_id]
            code, shown, said = here("approvals", "approve", approval_id, "--comment", "lgtm",
                *cli, KLOCKWORK_API_KEY=bob,
            )  # fmt: skip
            assert code == OK, said
            assert f"{approval_id} is approved (pr.merge)" in shown
            decided = agent.approvals.get(approval_id)
            assert decided.status is ApprovalStatus.APPROVED
            assert [(d.approver, d.comment) for d in decided.decisions] == [("bob", "lgtm")]

            # A lease taken over HTTP shows on the CLI's board and in this engine.
            taken = httpx.post(
                f"{base}/v1/leases", headers=bearer(merger), json=_ask(), timeout=5
            ).json()
            assert taken["status"] == "GRANTED", taken
            assert [held.agent_id for held in agent.leases.list()] == ["merger"]
            code, shown, said = here("leases", *cli, KLOCKWORK_API_KEY=bob)
            assert code == OK, said
            assert RESOURCE in shown and "merger" in shown
            code, shown, said = here("audit", "tail", "-n", "50", "--json", *cli,
                KLOCKWORK_API_KEY=bob,
            )  # fmt: skip
            assert code == OK, said
            kinds = {json.loads(line)["kind"] for line in shown.splitlines()}
            assert {"key.created", "approval.decided", "lease.granted"} <= kinds, kinds
            verified = httpx.get(f"{base}/v1/audit/verify", headers=bearer(bob), timeout=5)
            assert verified.json()["valid"] is True

            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == OK, err.read_text()
            assert "klockwork: stopped" in err.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        # What the server did stays in Redis: this engine still sees it.
        assert [held.agent_id for held in agent.leases.list()] == ["merger"]
        assert agent.audit.verify().valid
