"""The approvals inbox: sign-in, CSRF, deciding as the signed-in person, escaping."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest
import uvicorn
from api_support import Keys
from fastapi import FastAPI
from fastapi.testclient import TestClient

from klockwork import Klockwork, LeaseTimeoutError
from klockwork.server import create_app
from klockwork.server.context import ServerSettings
from klockwork.server.errors import ApiError
from klockwork.server.inbox import Inbox
from klockwork.server.inbox.events import Fingerprint, changed_sections, fingerprint
from klockwork.server.inbox.forms import edited_arguments


class LiveServer:
    """uvicorn serving ``app`` on a free loopback port, in a thread (used as a context)."""

    def __init__(self, app: FastAPI) -> None:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=2
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        # Live streams end when their clients leave: nothing keeps the server up.
        assert not self.thread.is_alive(), "uvicorn did not stop"


_CSRF = re.compile(r'name="csrf" value="([^"]*)"')


def _pending(kw: Klockwork, metadata: dict[str, object] | None = None) -> str:
    result = kw.gates.execute("builder", "deploy.prod", metadata or {"version": "1.2"})
    assert result.status == "requested" and result.approval_id is not None
    return result.approval_id


def _token(page: httpx.Response) -> str:
    found = _CSRF.search(page.text)
    assert found is not None, page.text
    return found.group(1)


def _sign_in(client: TestClient, key: str) -> httpx.Response:
    form = client.get("/")
    return client.post("/signin", data={"csrf": _token(form), "api_key": key})


def _signed_in(client: TestClient, key: str) -> str:
    """Sign in with ``key``; returns the session's CSRF token."""
    answer = _sign_in(client, key)
    assert answer.status_code == 200 and "Signed in as" in answer.text, answer.text
    return _token(answer)


def _denied(kw: Klockwork) -> list[dict[str, object]]:
    return [e.data for e in kw.audit.query(kind="access.denied").entries]


# -- sign-in -------------------------------------------------------------------------------
def test_an_approver_signs_in_with_a_key_and_gets_a_strict_http_only_session(
    client: TestClient, keys: Keys
) -> None:
    first = client.get("/")
    assert first.status_code == 200 and 'name="api_key"' in first.text
    assert "Content-Security-Policy" in first.headers
    answer = client.post(
        "/signin", data={"csrf": _token(first), "api_key": keys.approver}, follow_redirects=False
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("kw_session="))
    flags = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "secure" not in flags
    assert "max-age=28800" in flags
    assert keys.approver not in cookie  # the cookie stands for the key; it is not the key
    page = client.get("/")
    assert "Signed in as <strong>bob</strong>" in page.text
    assert "Nothing is waiting" in page.text


def test_the_cookie_is_secure_when_the_server_says_so(kw: Klockwork) -> None:
    app = create_app(kw, ServerSettings(secure_cookies=True))
    _, secret = app.state.server.keys.create("bob", "approver")
    with TestClient(app, base_url="https://testserver") as client:
        form = client.get("/")
        answer = client.post(
            "/signin", data={"csrf": _token(form), "api_key": secret}, follow_redirects=False
        )
    cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("kw_session="))
    assert "secure" in [part.strip().lower() for part in cookie.split(";")]


def test_a_wrong_key_is_refused_audited_and_rate_limited(kw: Klockwork) -> None:
    app = create_app(kw, ServerSettings(max_failures=3))
    with TestClient(app) as client:
        for _ in range(3):
            wrong = _sign_in(client, "kw_0123456789abcdef_" + "x" * 43)
            assert wrong.status_code == 401 and "unknown or revoked" in wrong.text
            assert "kw_session" not in wrong.cookies
        limited = _sign_in(client, "kw_nope")
        assert limited.status_code == 429 and "Too many failed sign-ins" in limited.text
        assert int(limited.headers["retry-after"]) >= 1
    refusals = _denied(kw)
    assert [d["reason"] for d in refusals] == ["unauthenticated"] * 3
    assert refusals[-1]["rate_limited"] is True and refusals[0]["path"] == "/signin"


def test_forged_sign_ins_lock_nobody_out_and_a_right_key_signs_in_while_limited(
    kw: Klockwork,
) -> None:
    app = create_app(kw, ServerSettings(max_failures=3))
    _, secret = app.state.server.keys.create("bob", "approver")
    with TestClient(app) as client:
        for _ in range(10):  # what any web page can post: no sign-in token
            forged = client.post("/signin", data={"api_key": "x"}, follow_redirects=False)
            assert forged.status_code == 403
        assert _sign_in(client, "kw_nope").status_code == 401  # not limited by them
        for _ in range(3):
            _sign_in(client, "kw_nope")
        assert _sign_in(client, "kw_nope").status_code == 429
        _signed_in(client, secret)  # the right key is not locked out by a neighbour


def test_an_agent_key_cannot_sign_in(kw: Klockwork, client: TestClient, keys: Keys) -> None:
    answer = _sign_in(client, keys.agent)
    assert answer.status_code == 403 and "agent" in answer.text
    assert "kw_session" not in client.cookies
    assert 'name="api_key"' in client.get("/").text
    refusal = _denied(kw)[-1]
    assert refusal["reason"] == "forbidden" and refusal["principal"] == "builder"


def test_a_sign_in_without_its_form_token_is_refused(kw: Klockwork, client: TestClient) -> None:
    client.get("/")
    answer = client.post("/signin", data={"csrf": "forged", "api_key": "kw_x"})
    assert answer.status_code == 403
    assert _denied(kw)[-1]["reason"] == "csrf"


# -- CSRF ----------------------------------------------------------------------------------
@pytest.mark.parametrize("token", [None, "", "0" * 64])
def test_a_form_without_the_session_token_is_refused_and_audited(
    kw: Klockwork, client: TestClient, keys: Keys, token: str | None
) -> None:
    approval_id = _pending(kw)
    _signed_in(client, keys.approver)
    data = {"verdict": "approve"} | ({} if token is None else {"csrf": token})
    answer = client.post(f"/approvals/{approval_id}/vote", data=data)
    assert answer.status_code == 403 and "did not come from the inbox" in answer.text
    assert kw.approvals.get(approval_id).decisions == []
    refusal = _denied(kw)[-1]
    assert refusal["reason"] == "csrf" and refusal["principal"] == "bob"
    assert refusal["path"] == f"/approvals/{approval_id}/vote"


def test_another_sessions_token_does_not_pass(kw: Klockwork, app: FastAPI, keys: Keys) -> None:
    approval_id = _pending(kw)
    with TestClient(app) as carol, TestClient(app) as bob:
        carols = _signed_in(carol, keys.other_approver)
        _signed_in(bob, keys.approver)
        answer = bob.post(
            f"/approvals/{approval_id}/vote", data={"csrf": carols, "verdict": "approve"}
        )
    assert answer.status_code == 403
    assert kw.approvals.get(approval_id).status.value == "pending"


# -- deciding ------------------------------------------------------------------------------
def test_approving_from_the_form_decides_as_the_signed_in_person(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    approval_id = _pending(kw)
    token = _signed_in(client, keys.approver)
    page = client.get("/")
    assert approval_id in page.text and "deploy.prod" in page.text
    answer = client.post(
        f"/approvals/{approval_id}/vote",
        data={"csrf": token, "verdict": "approve", "comment": "ship it", "approver": "carol"},
        follow_redirects=False,
    )
    assert answer.status_code == 303
    after = client.get(answer.headers["location"])
    assert "You approved deploy.prod" in after.text and "it is now approved" in after.text
    decided = kw.approvals.get(approval_id)
    assert decided.status.value == "approved"
    assert [(d.approver, d.comment) for d in decided.decisions] == [("bob", "ship it")]
    history = client.get("/history")
    assert approval_id in history.text and "ship it" in history.text


def test_rejecting_keeps_the_comment_as_the_reason(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    approval_id = _pending(kw)
    token = _signed_in(client, keys.other_approver)
    answer = client.post(
        f"/approvals/{approval_id}/vote",
        data={"csrf": token, "verdict": "deny", "comment": "not on a Friday"},
    )
    assert answer.status_code == 200 and "You rejected deploy.prod" in answer.text
    decided = kw.approvals.get(approval_id)
    assert decided.status.value == "denied"
    assert [(d.approver, d.comment) for d in decided.decisions] == [("carol", "not on a Friday")]
    again = client.post(
        f"/approvals/{approval_id}/vote", data={"csrf": token, "verdict": "approve"}
    )
    assert again.status_code == 409 and "already denied" in again.text


def test_an_edit_from_the_form_is_judged_again_as_the_signed_in_person(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    approval_id = _pending(kw, {"version": "1.2", "replicas": 3, "canary": True, "env": {"a": 1}})
    token = _signed_in(client, keys.approver)
    page = client.get("/")
    assert 'name="arg.version"' in page.text and 'name="nested"' in page.text
    answer = client.post(
        f"/approvals/{approval_id}/edit",
        data={
            "csrf": token,
            "arg.version": "1.3",
            "arg.replicas": "5",
            "arg.canary": "false",
            "nested": '{"env": {"a": 2}}',
            "comment": "use 1.3",
            "approver": "carol",
        },
    )
    assert answer.status_code == 200, answer.text
    assert "still needs approval" in answer.text
    replaced = kw.approvals.get(approval_id)
    assert replaced.status.value == "denied" and replaced.decisions[0].approver == "bob"
    (again,) = kw.approvals.list(status="pending")
    assert again.metadata == {"version": "1.3", "replicas": 5, "canary": False, "env": {"a": 2}}
    assert again.approval_id in answer.text  # the new request is waiting on the page
    # bob wrote these arguments: he does not decide them alone.
    own = client.post(
        f"/approvals/{again.approval_id}/vote", data={"csrf": token, "verdict": "approve"}
    )
    assert own.status_code == 403 and "edited these arguments" in own.text
    carol = TestClient(client.app)  # another approver, in her own browser
    token = _signed_in(carol, keys.other_approver)
    unchanged = carol.post(
        f"/approvals/{again.approval_id}/edit",
        data={"csrf": token, "nested": '{"env": {"a": 2}}'},
    )
    assert unchanged.status_code == 422 and "nothing was changed" in unchanged.text
    for nested in ("[" * 100_000, r'{"\udfff": 1}'):  # too deep; a lone surrogate (JSON)
        bad = carol.post(
            f"/approvals/{again.approval_id}/edit", data={"csrf": token, "nested": nested}
        )
        assert bad.status_code == 422, bad.text
    assert kw.approvals.get(again.approval_id).status.value == "pending"


def test_edit_forms_keep_each_arguments_type() -> None:
    metadata = {"s": "x", "i": 1, "f": 1.5, "b": True, "n": None, "deep": [1]}
    form = {"arg.s": "y", "arg.i": "2", "arg.f": "2.5", "arg.b": "false", "arg.n": ""}
    assert edited_arguments(metadata, form) == {
        "s": "y",
        "i": 2,
        "f": 2.5,
        "b": False,
        "n": None,
        "deep": [1],
    }
    assert edited_arguments(metadata, {"nested": ""}) == {k: metadata[k] for k in "sifbn"}
    for bad in ({"arg.i": "two"}, {"arg.f": "nan"}, {"arg.b": "yes"}, {"nested": "[1]"}):
        with pytest.raises(ApiError) as refused:
            edited_arguments(metadata, bad)
        assert refused.value.status == 422


def test_the_owner_of_the_agent_cannot_decide_from_the_inbox(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    approval_id = _pending(kw)
    token = _signed_in(client, keys.alice)
    page = client.get("/")
    assert "you run builder" in page.text and "/vote" not in page.text
    answer = client.post(
        f"/approvals/{approval_id}/vote", data={"csrf": token, "verdict": "approve"}
    )
    assert answer.status_code == 403 and "someone else must decide" in answer.text
    edit = client.post(f"/approvals/{approval_id}/edit", data={"csrf": token, "arg.version": "9"})
    assert edit.status_code == 403
    assert kw.approvals.get(approval_id).decisions == []
    assert [d["reason"] for d in _denied(kw)[-2:]] == ["own_agent", "own_agent"]


def test_a_revoked_key_signs_its_session_out(
    kw: Klockwork, app: FastAPI, client: TestClient, keys: Keys
) -> None:
    approval_id = _pending(kw)
    token = _signed_in(client, keys.approver)
    key_id = keys.approver.split("_")[1]
    app.state.server.keys.revoke(key_id)
    page = client.get("/")
    assert 'name="api_key"' in page.text and "Signed in as" not in page.text
    answer = client.post(
        f"/approvals/{approval_id}/vote", data={"csrf": token, "verdict": "approve"}
    )
    assert answer.status_code == 401
    assert kw.approvals.get(approval_id).decisions == []
    assert client.get("/leases", follow_redirects=False).status_code == 303


def test_signing_out_ends_the_session_even_for_a_copy_of_the_cookie(
    app: FastAPI, client: TestClient, keys: Keys
) -> None:
    token = _signed_in(client, keys.approver)
    copy = client.cookies["kw_session"]
    out = client.post("/signout", data={"csrf": token})
    assert out.status_code == 200 and "Signed out bob" in out.text
    with TestClient(app, cookies={"kw_session": copy}) as thief:
        assert 'name="api_key"' in thief.get("/").text


def test_the_session_reads_the_api_but_never_changes_anything_through_it(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    approval_id = _pending(kw)
    _signed_in(client, keys.approver)
    listed = client.get("/v1/approvals")
    assert listed.status_code == 200 and listed.json()[0]["approval_id"] == approval_id
    assert client.get("/inbox/partials/pending").status_code == 200
    write = client.post(f"/v1/approvals/{approval_id}/approve", json={})
    assert write.status_code == 401
    assert kw.approvals.get(approval_id).decisions == []


# -- pages ---------------------------------------------------------------------------------
def test_arguments_are_shown_escaped_never_run(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    evil = '<script>alert("x")</script>'
    _pending(kw, {"note": evil, "nested": {"html": "<img src=x onerror=alert(1)>"}})
    _signed_in(client, keys.approver)
    for path in ("/", "/inbox/partials/pending", "/audit"):
        page = client.get(path)
        assert "<script>alert" not in page.text and "<img src=x" not in page.text, path
    page = client.get("/").text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_the_pending_card_says_why_and_until_when(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    kw.policies.add(
        {
            "name": "prod-deploys",
            "action": "deploy.prod",
            "effect": "require_approval",
            "conditions": [{"field": "env", "operator": "eq", "value": "prod"}],
            "approval_timeout_s": 600,
            "quorum": 2,
        }
    )
    approval_id = _pending(kw, {"version": "1.2", "env": "prod"})
    _signed_in(client, keys.approver)
    page = client.get("/").text
    assert "prod-deploys" in page and "2 approvals" in page and "Conditions evaluated" in page
    deadline = kw.approvals.get(approval_id).deadline_ms
    assert f'data-deadline-ms="{deadline}"' in page and "data-now-ms=" in page
    assert "then it is denied" in page


def test_the_lease_board_the_audit_tail_and_verify(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    kw.leases.acquire("merger", "s1", ("FILE:/src/app.py", "MUTATES"), 60_000)
    token = _signed_in(client, keys.approver)
    board = client.get("/leases").text
    assert "FILE:/src/app.py" in board and "merger" in board and "MUTATES" in board
    assert "Nobody is waiting." in board
    # An older agent blocked behind merger holds its place in line: the board says so.
    kw.register_agent("elder", priority=0)

    def wait_in_line() -> None:
        with pytest.raises(LeaseTimeoutError):  # merger keeps it: elder gives up
            kw.leases.acquire("elder", "s9", ("FILE:/src/app.py", "CONSUMES"), 60_000, 0.5)

    waiter = threading.Thread(target=wait_in_line)
    waiter.start()
    deadline = time.monotonic() + 5
    while not kw.leases.waiters():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    board = client.get("/leases").text
    assert "Nobody is waiting." not in board and "elder" in board and "CONSUMES" in board
    waiter.join(10)
    audit = client.get("/audit").text
    assert "lease.granted" in audit and "Verify the audit chain" in audit
    verified = client.post("/audit/verify", data={"csrf": token})
    assert "The audit trail verifies" in verified.text
    assert client.get("/inbox/partials/nope").status_code == 404
    css = client.get("/inbox/static/inbox.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert client.get("/inbox/static/..%2Fsession.py").status_code == 404


def test_pages_and_the_stream_need_a_session(client: TestClient) -> None:
    assert client.get("/history", follow_redirects=False).headers["location"] == "/"
    assert client.get("/inbox/partials/pending").status_code == 401
    assert client.get("/inbox/events").status_code == 401


def test_the_stream_names_the_sections_that_changed(kw: Klockwork, app: FastAPI) -> None:
    inbox = Inbox(app.state.server)
    before = fingerprint(inbox)
    assert changed_sections(None, before) == []
    assert changed_sections(before, fingerprint(inbox)) == []
    _pending(kw)
    after = fingerprint(inbox)
    assert changed_sections(before, after) == ["pending", "history", "audit"]
    kw.leases.acquire("merger", "s1", ("FILE:/a", "MUTATES"), 60_000)
    assert "leases" in changed_sections(after, fingerprint(inbox))
    assert changed_sections(after, after) == [] and isinstance(after, Fingerprint)


def test_open_streams_share_one_reading_of_the_store(
    kw: Klockwork, app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    from klockwork.server.inbox import events

    reads: list[int] = []
    real = events.fingerprint

    def counted(inbox: Inbox) -> Fingerprint:
        reads.append(1)
        time.sleep(0.05)  # a slow store: the others arrive meanwhile
        return real(inbox)

    monkeypatch.setattr(events, "fingerprint", counted)
    shared = events.SharedFingerprint(Inbox(app.state.server))
    asked_at = time.monotonic()
    got: list[Fingerprint] = []
    streams = [
        threading.Thread(target=lambda: got.append(shared.newer_than(asked_at))) for _ in range(20)
    ]
    for t in streams:
        t.start()
    for t in streams:
        t.join(10)
    assert len(got) == 20 and len(set(got)) == 1 and len(reads) == 1
    _pending(kw)  # a decision: a stream woken by it reads again
    assert shared.newer_than(time.monotonic()) != got[0] and len(reads) == 2


def test_the_live_stream_wakes_the_page_when_something_changes(
    kw: Klockwork, app: FastAPI, keys: Keys
) -> None:
    with LiveServer(app) as base, httpx.Client(base_url=base, timeout=10) as browser:
        form = browser.get("/")
        browser.post("/signin", data={"csrf": _token(form), "api_key": keys.approver})
        with browser.stream("GET", "/inbox/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = (line for line in stream.iter_lines() if line.startswith("data: "))
            assert json.loads(next(events)[6:]) == {"sections": []}  # ready
            _pending(kw)
            changed = json.loads(next(events)[6:])["sections"]
            assert "pending" in changed and "audit" in changed


def test_forged_odd_or_expired_cookies_sign_nobody_in(kw: Klockwork, keys: Keys) -> None:
    app = create_app(kw, ServerSettings(session_ttl_s=1.0))
    _, secret = app.state.server.keys.create("bob", "approver")
    with TestClient(app) as client:
        _signed_in(client, secret)
        good = client.cookies["kw_session"]
        key_id, expires, nonce, mac = good.split(".")
        forged = f"{key_id}.{int(expires) + 10**9}.{nonce}.{mac}"  # a longer session
        time.sleep(1.05)  # the genuine cookie has expired by now
        for cookie in (forged, "é.1.2.3", "1.2.3.é", "x", "." * 600, good):
            # Raw bytes: a browser may send what httpx would refuse to encode.
            headers = [(b"cookie", f"kw_session={cookie}".encode("latin-1"))]
            with TestClient(app) as other:
                page = other.get("/", headers=headers)
                assert page.status_code == 200 and 'name="api_key"' in page.text, cookie
                assert other.get("/v1/approvals", headers=headers).status_code == 401
