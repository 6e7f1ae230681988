"""``klockwork approvals`` and ``klockwork audit verify URL | tail``, against a SQLite store."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from klockwork import ApprovalStatus, Klockwork, Policy
from klockwork.cli import INVALID, OK, USAGE, main


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[str, Klockwork]]:
    """A SQLite store with two policies that need approval; yields (url, engine)."""
    url = f"sqlite:///{tmp_path}/kw.db"
    with Klockwork.open(url) as kw:
        kw.policies.add(
            Policy(name="big", action="pr.merge", effect="require_approval", approval_timeout_s=600)
        )
        kw.policies.add(Policy(name="pair", action="db.drop", effect="require_approval", quorum=2))
        yield url, kw


def _request(kw: Klockwork, action: str = "pr.merge", event_id: str = "merge-1") -> str:
    result = kw.gates.execute("bot", action, {"pr": 7}, event_id=event_id)
    assert result.status == "requested" and result.approval_id
    return result.approval_id


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "klockwork.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_an_approval_made_by_another_process_lets_the_gate_execute(
    store: tuple[str, Klockwork],
) -> None:
    url, kw = store
    approval_id = _request(kw)
    done = _cli("approvals", "approve", approval_id, "--approver", "alice", "--url", url)
    assert done.returncode == OK, done.stderr
    assert f"{approval_id} is approved" in done.stdout
    approval = kw.approvals.get(approval_id)
    assert approval.status is ApprovalStatus.APPROVED
    assert [(d.approver, d.verdict) for d in approval.decisions] == [("alice", "approve")]
    assert kw.gates.execute("bot", "pr.merge", {"pr": 7}, event_id="merge-1").status == "executed"

    refused = _cli(
        "approvals", "deny", approval_id, "--url", url, env={"KLOCKWORK_APPROVER": "bob"}
    )
    assert refused.returncode == INVALID
    assert "already approved" in refused.stderr


def test_approve_and_deny_in_process(
    store: tuple[str, Klockwork], capsys: pytest.CaptureFixture[str]
) -> None:
    url, kw = store
    approval_id = _request(kw)
    assert main(["approvals", "approve", approval_id, "--approver", "bot", "--url", url]) == INVALID
    assert "cannot decide" in capsys.readouterr().err
    assert kw.approvals.get(approval_id).status is ApprovalStatus.PENDING

    args = ["approvals", "deny", approval_id, "--approver", "carol", "--url", url]
    assert main([*args, "--reason", "not today", "--json"]) == OK
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "denied" and shown["decisions"][0]["comment"] == "not today"
    assert kw.approvals.get(approval_id).status is ApprovalStatus.DENIED
    assert main(args) == OK  # a retried vote that already counted
    capsys.readouterr()
    assert (
        main(["approvals", "approve", approval_id, "--approver", "dave", "--url", url]) == INVALID
    )
    assert "already denied" in capsys.readouterr().err


def test_a_quorum_vote_is_counted_and_the_approval_stays_pending(
    store: tuple[str, Klockwork], capsys: pytest.CaptureFixture[str]
) -> None:
    url, kw = store
    approval_id = _request(kw, "db.drop", "drop-1")
    assert main(["approvals", "approve", approval_id, "--approver", "alice", "--url", url]) == OK
    assert "1/2 approvals and is still pending" in capsys.readouterr().out
    assert main(["approvals", "deny", approval_id, "--approver", "alice", "--url", url]) == INVALID
    assert "already voted" in capsys.readouterr().err
    assert main(["approvals", "approve", approval_id, "--approver", "bob", "--url", url]) == OK
    assert kw.approvals.get(approval_id).status is ApprovalStatus.APPROVED


def test_approvals_usage_errors(
    store: tuple[str, Klockwork],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    url, kw = store
    approval_id = _request(kw)
    monkeypatch.delenv("KLOCKWORK_APPROVER", raising=False)
    monkeypatch.delenv("KLOCKWORK_URL", raising=False)
    assert main(["approvals", "approve", "apr_nosuch", "--approver", "a", "--url", url]) == USAGE
    assert "no approval 'apr_nosuch'" in capsys.readouterr().err
    assert main(["approvals", "approve", approval_id, "--url", url]) == USAGE  # no approver
    assert "--approver" in capsys.readouterr().err
    assert main(["approvals", "approve", approval_id, "--approver", " ", "--url", url]) == USAGE
    assert main(["approvals", "list"]) == USAGE  # no URL at all
    assert "KLOCKWORK_URL" in capsys.readouterr().err
    assert main(["approvals", "list", "--url", "memory://"]) == USAGE
    assert "in-memory" in capsys.readouterr().err
    monkeypatch.setenv("KLOCKWORK_URL", "memory://")
    assert main(["approvals", "list"]) == USAGE
    missing = f"sqlite:///{tmp_path}/missing.db"
    assert main(["approvals", "list", "--url", missing]) == USAGE
    assert not (tmp_path / "missing.db").exists()  # not created by looking
    assert main(["approvals", "list", "--url", "nosuch://x"]) == USAGE
    with pytest.raises(SystemExit) as info:
        main(["approvals", "list", "--url", url, "--status", "maybe"])
    assert info.value.code == USAGE
    # $KLOCKWORK_URL and $KLOCKWORK_APPROVER are the defaults
    monkeypatch.setenv("KLOCKWORK_URL", url)
    monkeypatch.setenv("KLOCKWORK_APPROVER", "erin")
    assert main(["approvals", "approve", approval_id]) == OK
    assert kw.approvals.get(approval_id).decisions[0].approver == "erin"


def test_approvals_list_as_a_table_and_as_json(
    store: tuple[str, Klockwork], capsys: pytest.CaptureFixture[str]
) -> None:
    url, kw = store
    assert main(["approvals", "list", "--url", url]) == OK
    assert "no pending approvals" in capsys.readouterr().out
    first = _request(kw)
    second = _request(kw, "db.drop", "drop-1")
    kw.approvals.approve(second, "alice")
    assert main(["approvals", "list", "--url", url]) == OK
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == [
        "ID", "ACTION", "REQUESTER", "POLICY", "STATUS", "AGE", "DEADLINE", "VOTES"
    ]  # fmt: skip
    assert len(rows) == 2
    assert rows[0].split()[:5] == [first, "pr.merge", "bot", "big", "pending"]
    assert "in 9m" in rows[0] or "in 10m" in rows[0]
    assert rows[0].endswith("0/1")
    assert rows[1].split()[:4] == [second, "db.drop", "bot", "pair"]
    assert "none" in rows[1] and rows[1].endswith("1/2")

    kw.approvals.deny(first, "carol", reason="no")
    assert main(["approvals", "list", "--url", url, "--status", "denied", "--json"]) == OK
    (denied,) = json.loads(capsys.readouterr().out)
    assert denied["approval_id"] == first
    assert main(["approvals", "list", "--url", url, "--status", "all", "--json"]) == OK
    listed = [a["approval_id"] for a in json.loads(capsys.readouterr().out)]
    assert sorted(listed) == sorted([first, second])
    assert main(["approvals", "list", "--url", url, "--status", "expired", "--json"]) == OK
    assert json.loads(capsys.readouterr().out) == []  # an empty list is still JSON


def _tamper(db: Path, seq: int) -> None:
    with sqlite3.connect(db) as conn:
        (line,) = conn.execute("SELECT line FROM kw_audit WHERE seq = ?", (seq,)).fetchone()
        edited = bytes(line).replace(b'"pr":7', b'"pr":8')
        assert edited != bytes(line)
        conn.execute("UPDATE kw_audit SET line = ? WHERE seq = ?", (edited, seq))
    conn.close()


def test_audit_verify_a_store_url(
    store: tuple[str, Klockwork], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, kw = store
    _request(kw)
    kw.audit.flush()  # entry 1 sealed alone: verify can name entry 2 exactly
    _request(kw, event_id="merge-2")
    checkpoint = tmp_path / "head.json"
    checkpoint.write_text(kw.audit.checkpoint().model_dump_json())
    assert main(["audit", "verify", url, "--checkpoint", str(checkpoint)]) == OK
    assert capsys.readouterr().out.startswith("valid: 2 entries verify (head seq 2)")

    _tamper(tmp_path / "kw.db", 2)
    done = _cli("audit", "verify", url)
    assert done.returncode == INVALID, done.stderr
    assert done.stdout.startswith("INVALID at seq 2: entry 2 ")
    assert main(["audit", "verify", url, "--json"]) == INVALID
    assert json.loads(capsys.readouterr().out)["first_broken_seq"] == 2
    assert main(["audit", "verify", "memory://"]) == USAGE


def test_audit_tail_prints_the_last_entries(
    store: tuple[str, Klockwork], capsys: pytest.CaptureFixture[str]
) -> None:
    url, kw = store
    ids = [_request(kw, event_id=f"merge-{i}") for i in range(4)]
    kw.approvals.approve(ids[0], "alice")
    kw.audit.flush()  # the writer batches: make the entries visible to the CLI
    assert main(["audit", "tail", "--url", url, "-n", "2"]) == OK
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["4", "5"]
    assert "approval.decided" in lines[1] and "alice" in lines[1]

    assert main(["audit", "tail", "--url", url, "--kind", "action.requested", "--json"]) == OK
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["seq"] for e in entries] == [1, 2, 3, 4]
    assert {e["kind"] for e in entries} == {"action.requested"}
    assert main(["audit", "tail", "--url", url, "--agent", "nobody"]) == OK
    assert capsys.readouterr().out == ""
    assert main(["audit", "tail", "--url", url, "--kind", "no.such"]) == USAGE
    with pytest.raises(SystemExit):
        main(["audit", "tail", "--url", url, "-n", "-1"])


def test_audit_tail_follow_prints_new_entries_until_ctrl_c(
    store: tuple[str, Klockwork],
) -> None:
    url, kw = store
    _request(kw, event_id="before")
    kw.audit.flush()
    args = ["audit", "tail", "--url", url, "-n", "1", "--follow", "--interval", "0.05"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "klockwork.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().split()[0] == "1"
        _request(kw, event_id="after")
        kw.audit.flush()
        line = proc.stdout.readline()
        assert line.split()[0] == "2" and "action.requested" in line
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == OK, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
