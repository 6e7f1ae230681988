"""``klockwork serve`` as a real uvicorn process on loopback, used with httpx and the CLI.

Keys are made with ``klockwork keys``; the server runs in its own process on
a port the kernel picks (``--port 0``; it prints the address); the CLI's
``--server`` mode talks to it over HTTP. A non-loopback bind is only ever
*refused* here: no test listens anywhere but 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from api_support import CLI_VARIABLES, Here
from support import ROOT

from klockwork import ApprovalStatus, Klockwork, Policy
from klockwork.cli import INVALID, OK, UNAVAILABLE, USAGE, main
from klockwork.cli import serve as serve_command
from klockwork.cli.remote import Remote
from klockwork.cli.support import is_loopback
from klockwork.server.keys import ApiKeys

pytestmark = pytest.mark.slow

_ADDRESS = re.compile(r"at (http://127\.0\.0\.1:\d+)/v1")
_KEY = re.compile(r"^\s+(kw_[0-9a-f]{16}_[A-Za-z0-9_-]{43})$", re.MULTILINE)


@dataclass
class Running:
    """One ``klockwork serve`` process and where it answers."""

    process: subprocess.Popen[bytes]
    address: str
    out: Path
    err: Path

    def stderr(self) -> str:
        return self.err.read_text()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Stop the server the way an init system (or Ctrl-C) does; its exit code."""
        self.process.send_signal(sig)
        return self.process.wait(timeout=30)


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    for name in CLI_VARIABLES:
        if name not in extra:
            env.pop(name, None)
    return env


def _start(tmp_path: Path, *args: str) -> Running:
    """Start ``klockwork serve ARGS --port 0`` and wait until /v1/health answers."""
    n = len(list(tmp_path.glob("serve-*.out")))
    out, err = tmp_path / f"serve-{n}.out", tmp_path / f"serve-{n}.err"
    # Files, not pipes: nobody reads a pipe while the server logs, and a full
    # pipe would block the server.
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "klockwork.cli", "serve", *args, "--port", "0"],
            stdout=stdout, stderr=stderr, env=_env(), cwd=tmp_path,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    address = None
    while time.monotonic() < deadline and process.poll() is None:
        found = address or _ADDRESS.search(out.read_text())
        address = found if isinstance(found, str) else found.group(1) if found else None
        if address is not None:
            try:
                if httpx.get(f"{address}/v1/health", timeout=2).status_code == 200:
                    return Running(process, address, out, err)
            except httpx.TransportError:
                pass
        time.sleep(0.05)
    process.kill()
    process.wait(timeout=10)
    raise AssertionError(f"klockwork serve did not start:\n{out.read_text()}{err.read_text()}")


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "klockwork.cli", *args],
        capture_output=True, text=True, timeout=60, check=False, env=_env(**env),
    )  # fmt: skip


def _create_key(url: str, principal: str, role: str, *more: str) -> str:
    done = _cli("keys", "create", principal, "--role", role, *more, "--url", url)
    assert done.returncode == OK, done.stderr
    return done.stdout.strip()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[str, Klockwork]]:
    """A SQLite store where an agent waits for an approval; yields (url, the agent's engine)."""
    url = f"sqlite:///{tmp_path}/kw.db"
    with Klockwork.open(url) as kw:
        kw.policies.add(Policy(name="merges", action="pr.merge", effect="require_approval"))
        yield url, kw


@pytest.fixture
def server(tmp_path: Path, store: tuple[str, Klockwork]) -> Iterator[Running]:
    url, _ = store
    running = _start(tmp_path, "--url", url)
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait(timeout=10)


def test_the_server_answers_httpx_and_the_cli_then_stops_cleanly_on_sigterm(
    tmp_path: Path, store: tuple[str, Klockwork], here: Here
) -> None:
    url, kw = store
    bob = _create_key(url, "bob", "approver")
    agent = _create_key(url, "merger", "agent", "--owner", "alice")
    running = _start(tmp_path, "--url", url)
    try:
        assert _KEY.search(running.stderr()) is None  # the store had keys: none is made
        base, auth = running.address, {"Authorization": f"Bearer {bob}"}
        assert httpx.get(f"{base}/v1/whoami", headers=auth).json()["principal"] == "bob"
        assert httpx.get(f"{base}/v1/whoami").status_code == 401

        # An agent (another process, here the test's engine) asks; bob sees it.
        approval_id = kw.gates.execute("merger", "pr.merge", {"pr": 7}, event_id="m-1").approval_id
        assert approval_id is not None
        listed = httpx.get(f"{base}/v1/approvals", headers=auth).json()
        assert [a["approval_id"] for a in listed] == [approval_id]

        # The CLI, through the server: the same table and JSON as from the store.
        shown = _cli("approvals", "list", "--server", base, KLOCKWORK_API_KEY=bob)
        assert shown.returncode == OK, shown.stderr
        assert approval_id in shown.stdout and "merger" in shown.stdout
        assert "pr.merge" in shown.stdout and "0/1" in shown.stdout
        as_json = here("approvals", "list", "--json", KLOCKWORK_SERVER=base, KLOCKWORK_API_KEY=bob)
        (one,) = json.loads(as_json.stdout)
        assert one["approval_id"] == approval_id and "now_ms" not in one  # an Approval, as ever

        # An agent key may not decide: refused (1), and the approval is untouched.
        refused = _cli("approvals", "approve", approval_id, "--server", base, "--api-key", agent)
        assert refused.returncode == INVALID, refused.stderr
        assert "refused (403" in refused.stderr
        # The key says who votes: a name on the command line is refused, not ignored.
        named = here(
            "approvals", "approve", approval_id, "--server", base, "--approver", "bob",
            KLOCKWORK_API_KEY=bob,
        )  # fmt: skip
        assert named.returncode == USAGE and "--approver" in named.stderr
        both = here("approvals", "list", "--server", base, "--url", url, KLOCKWORK_API_KEY=bob)
        assert both.returncode == USAGE
        keyless = here("approvals", "list", "--server", base)
        assert keyless.returncode == USAGE and "KLOCKWORK_API_KEY" in keyless.stderr
        wrong = here("approvals", "list", "--server", base, KLOCKWORK_API_KEY="kw_nope")
        assert wrong.returncode == INVALID and "401" in wrong.stderr
        unknown = here("approvals", "deny", "apr_nope", "--server", base, KLOCKWORK_API_KEY=bob)
        assert unknown.returncode == USAGE, unknown.stderr
        assert kw.approvals.get(approval_id).status is ApprovalStatus.PENDING

        # bob approves through the server: the vote is recorded under his key's principal,
        # even with $KLOCKWORK_APPROVER naming someone else (ambient, ignored).
        approve = ["approvals", "approve", approval_id, "--comment", "ship it"]
        done = _cli(*approve, "--server", base, KLOCKWORK_API_KEY=bob, KLOCKWORK_APPROVER="eve")
        assert done.returncode == OK, done.stderr
        assert f"{approval_id} is approved (pr.merge)" in done.stdout
        approval = kw.approvals.get(approval_id)
        assert approval.status is ApprovalStatus.APPROVED
        assert [(d.approver, d.verdict, d.comment) for d in approval.decisions] == [
            ("bob", "approve", "ship it")
        ]
        again = here(*approve, "--server", base, "--json", KLOCKWORK_API_KEY=bob)
        assert again.returncode == OK and json.loads(again.stdout)["status"] == "approved"
        late = here("approvals", "deny", approval_id, "--server", base, KLOCKWORK_API_KEY=bob)
        assert late.returncode == INVALID and "409" in late.stderr
        assert kw.gates.execute("merger", "pr.merge", {"pr": 7}, event_id="m-1").status == (
            "executed"
        )

        # Leases and the audit tail, through the server too.
        kw.leases.acquire("merger", "s1", ("FILE:/src/app.py", "MUTATES"), 60_000)
        held = _cli("leases", "--server", base, KLOCKWORK_API_KEY=bob)
        assert held.returncode == OK, held.stderr
        assert "FILE:/src/app.py" in held.stdout and "merger" in held.stdout
        tail = here("audit", "tail", "-n", "50", "--json", "--server", base, KLOCKWORK_API_KEY=bob)
        assert tail.returncode == OK, tail.stderr
        kinds = [json.loads(line)["kind"] for line in tail.stdout.splitlines()]
        assert {"key.created", "action.requested", "approval.decided"} <= set(kinds), kinds
        denied_tail = here("audit", "tail", "--server", base, KLOCKWORK_API_KEY=agent)
        assert denied_tail.returncode == INVALID  # the audit trail is for approvers

        # SIGTERM: a graceful stop, the engine closed, exit 0.
        assert running.stop(signal.SIGTERM) == OK, running.stderr()
        assert "Finished server process" in running.stderr()
        assert "klockwork: stopped" in running.stderr()
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait(timeout=10)

    # Nobody answers any more: the server is unavailable (3).
    gone = here("approvals", "list", "--server", base, KLOCKWORK_API_KEY=bob)
    assert gone.returncode == UNAVAILABLE and "did not answer" in gone.stderr


def test_ctrl_c_stops_the_server_with_exit_0(server: Running) -> None:
    assert server.stop(signal.SIGINT) == OK, server.stderr()
    assert "klockwork: stopped" in server.stderr()


def test_loopback_without_any_key_prints_one_admin_key_that_works(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/first.db"
    first = _start(tmp_path, "--url", url)
    try:
        text = first.stderr()
        (secret,) = _KEY.findall(text)
        assert "shown only this once" in text and "klockwork keys create" in text
        assert secret not in first.out.read_text()  # stderr only: not in a piped stdout
        assert f"{first.address}/" in first.out.read_text()  # the inbox's address
        me = httpx.get(f"{first.address}/v1/whoami", headers={"Authorization": f"Bearer {secret}"})
        assert me.status_code == 200
        assert (me.json()["principal"], me.json()["role"]) == ("admin", "admin")
        assert first.stop() == OK
    finally:
        if first.process.poll() is None:
            first.process.kill()

    # The key is in the store: the next start makes none, and the key still works.
    listed = _cli("keys", "list", "--json", "--url", url)
    assert [k["principal"] for k in json.loads(listed.stdout)] == ["admin"]
    second = _start(tmp_path, "--url", url)
    try:
        assert _KEY.search(second.stderr()) is None
        me = httpx.get(f"{second.address}/v1/whoami", headers={"Authorization": f"Bearer {secret}"})
        assert me.status_code == 200
    finally:
        assert second.stop() == OK


def test_a_memory_store_is_served_with_its_own_admin_key(tmp_path: Path, here: Here) -> None:
    running = _start(tmp_path, "--url", "memory://")
    try:
        (secret,) = _KEY.findall(running.stderr())
        base = running.address
        listed = here("approvals", "list", "--server", base, KLOCKWORK_API_KEY=secret)
        assert listed.returncode == OK and "no pending approvals" in listed.stdout
    finally:
        assert running.stop() == OK


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "example.com"])
def test_a_public_bind_without_keys_is_refused_before_binding(
    tmp_path: Path, host: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def never(*args: object) -> None:
        raise AssertionError("bound a socket for a refused server")

    monkeypatch.setattr(serve_command, "_bind", never)
    url = f"sqlite:///{tmp_path}/kw.db"
    assert main(["serve", "--url", url, "--host", host]) == USAGE
    assert "klockwork keys create" in capsys.readouterr().err
    assert not (tmp_path / "kw.db").exists()  # refused without making a store
    assert main(["serve", "--url", "memory://", "--host", host]) == USAGE

    # A store whose only key is revoked has no key either.
    assert main(["keys", "create", "bob", "--role", "approver", "--url", url, "--json"]) == OK
    key_id = json.loads(capsys.readouterr().out)["key"]["key_id"]
    assert main(["keys", "revoke", key_id, "--url", url]) == OK
    capsys.readouterr()
    assert main(["serve", "--url", url, "--host", host]) == USAGE
    assert "no active API key" in capsys.readouterr().err


def test_a_public_bind_is_refused_by_a_real_process_too(tmp_path: Path) -> None:
    # The refusal happens before any socket exists; nothing listens on 0.0.0.0.
    done = _cli("serve", "--url", f"sqlite:///{tmp_path}/kw.db", "--host", "0.0.0.0")
    assert done.returncode == USAGE
    assert "refusing to listen on 0.0.0.0" in done.stderr
    assert "klockwork keys create" in done.stderr


def test_an_address_in_use_is_unavailable_and_makes_no_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/kw.db"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        assert main(["serve", "--url", url, "--port", port]) == UNAVAILABLE
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    with Klockwork.open(url) as kw:
        assert ApiKeys(kw).list(include_revoked=True) == []


def test_bad_serve_input_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KLOCKWORK_URL", raising=False)
    assert main(["serve"]) == USAGE
    assert "--url" in capsys.readouterr().err
    assert main(["serve", "--url", "nosuch://x"]) == USAGE
    bad = tmp_path / "bad.yaml"
    bad.write_text("policies:\n  - name: x\n    action: a.b\n    effect: sometimes\n")
    assert main(["serve", "--url", "memory://", "--policies", str(bad)]) == USAGE
    assert "bad.yaml" in capsys.readouterr().err
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    assert main(["serve", "--url", "memory://", "--audit-key-env", "NO_SUCH_KEY_VAR"]) == USAGE
    assert "NO_SUCH_KEY_VAR" in capsys.readouterr().err


def test_serve_loads_policies_that_the_api_then_applies(tmp_path: Path) -> None:
    policies = tmp_path / "policies.yaml"
    policies.write_text(
        "policies:\n"
        "  - {name: merges, action: pr.merge, effect: require_approval}\n"
        "  - {name: drops, action: db.drop, effect: deny}\n"
    )
    url = f"sqlite:///{tmp_path}/kw.db"
    agent = _create_key(url, "merger", "agent")
    running = _start(tmp_path, "--url", url, "--policies", str(policies))
    try:
        auth = {"Authorization": f"Bearer {agent}"}
        answer = httpx.post(
            f"{running.address}/v1/gates/execute",
            json={"action": "db.drop", "metadata": {}},
            headers=auth,
        )
        if answer.status_code == 404:
            pytest.skip("the gates routes are not in this app")
        assert answer.status_code == 200, answer.text
        assert answer.json()["result"]["status"] == "denied"
    finally:
        assert running.stop() == OK


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("localhost.example.com", False),
        ("", False),
    ],
)
def test_what_counts_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


Answer = tuple[int, dict[str, str], bytes]


# -- the CLI's HTTP client against a stand-in server (what a real one rarely answers) ----
class _Canned(BaseHTTPRequestHandler):
    """Answers each path with the (status, headers, body) the test put in ``answers``."""

    answers: ClassVar[dict[str, Answer]] = {}
    seen: ClassVar[list[tuple[str, str, str | None]]] = []

    def _answer(self) -> None:
        path = self.path.split("?", 1)[0]
        self.seen.append((self.command, self.path, self.headers.get("Authorization")))
        status, headers, body = self.answers.get(path, (404, {}, b'{"error": {"type": "x"}}'))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def canned() -> Iterator[tuple[str, type[_Canned]]]:
    class Handler(_Canned):
        answers: ClassVar[dict[str, Answer]] = {}
        seen: ClassVar[list[tuple[str, str, str | None]]] = []

    stand_in = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=stand_in.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{stand_in.server_address[1]}", Handler
    stand_in.shutdown()
    stand_in.server_close()


def _error(status: int, kind: str, argument: str | None = None) -> Answer:
    body = {"error": {"type": kind, "message": f"said {kind}", "argument": argument}}
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


@pytest.mark.parametrize(
    ("answer", "code", "said"),
    [
        (_error(401, "unauthenticated"), INVALID, "refused (401 unauthenticated): said"),
        (_error(403, "forbidden"), INVALID, "refused (403 forbidden)"),
        (_error(409, "approval_closed"), INVALID, "refused (409"),
        (_error(429, "rate_limited"), INVALID, "refused (429"),
        (_error(422, "invalid_request", "verdict"), INVALID, "said invalid_request"),
        (_error(422, "invalid_request", "status"), USAGE, "said invalid_request"),
        (_error(404, "approval_not_found"), USAGE, "said approval_not_found"),
        (_error(404, "not_found"), USAGE, "is --server a klockwork server"),
        (_error(503, "store_unavailable"), UNAVAILABLE, "could not answer (503"),
        ((500, {}, b"Internal Server Error"), UNAVAILABLE, "Internal Server Error"),
        ((200, {}, b"<html>a login page</html>"), UNAVAILABLE, "not JSON"),
        ((200, {}, b'{"not": "a list"}'), UNAVAILABLE, "not a list of approvals"),
        ((302, {"Location": "http://127.0.0.2:9/v1/approvals"}, b""), USAGE, "redirects to"),
    ],
)
def test_the_server_answers_map_to_exit_codes(
    canned: tuple[str, type[_Canned]],
    here: Here,
    answer: Answer,
    code: int,
    said: str,
) -> None:
    base, handler = canned
    handler.answers["/v1/approvals"] = answer
    done = here("approvals", "list", "--server", base + "/", "--api-key", "kw_secret")
    assert done.returncode == code, done.stderr
    assert said in done.stderr
    # Asked once, with the key as a bearer token; a redirect is not followed.
    assert handler.seen == [("GET", "/v1/approvals?status=pending", "Bearer kw_secret")]


def test_which_of_server_and_store_a_command_uses(
    canned: tuple[str, type[_Canned]], here: Here, tmp_path: Path
) -> None:
    base, handler = canned
    handler.answers["/v1/leases"] = (200, {}, b"[]")
    url = f"sqlite:///{tmp_path}/kw.db"
    Klockwork.open(url).close()
    # Both in the environment: the server (it only ever means the command line).
    done = here("leases", KLOCKWORK_SERVER=base, KLOCKWORK_URL=url, KLOCKWORK_API_KEY="kw_k")
    assert done.returncode == OK and "no active leases" in done.stdout
    assert handler.seen == [("GET", "/v1/leases", "Bearer kw_k")]
    # An explicit --url wins over $KLOCKWORK_SERVER: the store, and no request.
    done = here("leases", "--url", url, KLOCKWORK_SERVER=base)
    assert done.returncode == OK and len(handler.seen) == 1
    # Filters travel as the API's query parameters.
    done = here("leases", "--agent", "a1", "--resource", "FILE:/x", "--server", base,
                KLOCKWORK_API_KEY="kw_k")  # fmt: skip
    assert done.returncode == OK
    assert handler.seen[-1][1] == "/v1/leases?agent_id=a1&resource=FILE%3A%2Fx"


def test_a_server_that_is_not_there_or_not_http_is_refused(here: Here) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = here("leases", "--server", f"http://127.0.0.1:{port}", KLOCKWORK_API_KEY="kw_k")
    assert done.returncode == UNAVAILABLE and "did not answer" in done.stderr
    for bad in ("127.0.0.1:8765", "ftp://127.0.0.1/", "http://"):
        done = here("leases", "--server", bad, KLOCKWORK_API_KEY="kw_k")
        assert done.returncode == USAGE and "--server takes" in done.stderr


def test_a_key_sent_in_clear_text_off_this_machine_is_warned_about(
    capsys: pytest.CaptureFixture[str],
) -> None:
    Remote("http://approvals.example.com:8765", "kw_k")  # no request is made
    assert "clear text" in capsys.readouterr().err
    Remote("https://approvals.example.com", "kw_k")
    Remote("http://127.0.0.1:8765", "kw_k")
    assert capsys.readouterr().err == ""


def test_the_store_url_is_printed_without_its_password() -> None:
    from klockwork.cli.serve import masked

    assert masked("redis://ops:s3cret@127.0.0.1:6379/0?namespace=kw") == (
        "redis://ops:***@127.0.0.1:6379/0?namespace=kw"
    )
    assert masked("redis://:s3cret@127.0.0.1/0") == "redis://:***@127.0.0.1/0"
    assert masked("sqlite:///kw.db") == "sqlite:///kw.db"
    assert masked("redis://[::1") == "redis://[::1"  # malformed: left as given


def test_a_stop_ends_the_live_streams_at_once_not_at_the_deadline(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'kw.db'}"
    bob = _create_key(url, "bob", "approver")
    running = _start(tmp_path, "--url", url)
    try:
        got: list[str] = []

        def follow(path: str) -> None:
            with httpx.stream(
                "GET",
                running.address + path,
                headers={"Authorization": f"Bearer {bob}"},
                timeout=30,
            ) as answer:
                got.extend(answer.iter_lines())

        streams = [
            threading.Thread(target=follow, args=(p,))
            for p in ("/v1/events/stream", "/v1/audit/stream") * 3
        ]
        for t in streams:
            t.start()
        deadline = time.monotonic() + 10
        while got.count("retry: 3000") < len(streams):  # all six are open
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert running.stop(signal.SIGTERM) == OK, running.stderr()
        for t in streams:
            t.join(10)
        # Each ended by itself, saying so (not cut when the grace period ran out).
        assert got.count("event: closing") == len(streams)
        assert "Traceback" not in running.stderr() and "klockwork: stopped" in running.stderr()
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait(timeout=10)
