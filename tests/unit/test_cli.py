"""The command line: what it prints and the exit codes scripts rely on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from klockwork import Klockwork
from klockwork.cli import INVALID, OK, USAGE, main
from klockwork.core.audit import AuditLog


def test_leases_lists_what_another_engine_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/kw.db"
    with Klockwork.open(url) as kw:
        lease = kw.leases.acquire("writer", "s1", ("FILE:/src/auth.ts", "MUTATES"), 60_000).lease
        assert main(["leases", "--url", url]) == OK
        out = capsys.readouterr().out
        assert "FILE:/src/auth.ts" in out and "writer" in out and "MUTATES" in out

        assert main(["leases", "--url", url, "--json"]) == OK
        (line,) = capsys.readouterr().out.splitlines()
        assert json.loads(line)["lease_id"] == lease.lease_id

        assert main(["leases", "--url", url, "--agent", "someone-else"]) == OK
        assert "no active leases" in capsys.readouterr().out
        assert main(["leases", "--url", url, "--resource", "FILE:/src"]) == OK
        assert "FILE:/src/auth.ts" in capsys.readouterr().out  # hierarchical filter


def test_leases_rejects_a_bad_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["leases", "--url", "nosuch://x"]) == USAGE
    assert "nosuch" in capsys.readouterr().err


def _exported(tmp_path: Path, n: int = 5) -> tuple[Path, AuditLog]:
    log = AuditLog()
    for i in range(n):
        log.record("lease.granted", f"agent-{i}", "s", {"resource": f"FILE:/f{i}"})
    path = tmp_path / "audit.jsonl"
    log.export(path)
    return path, log


def test_audit_verify_accepts_an_intact_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, log = _exported(tmp_path)
    log.close()
    assert main(["audit", "verify", str(path)]) == OK
    assert capsys.readouterr().out.startswith("valid: 5 entries checked")


def test_audit_verify_names_the_first_edited_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, log = _exported(tmp_path)
    log.close()
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"agent-2", b"agent-X")
    path.write_bytes(b"".join(lines))
    assert main(["audit", "verify", str(path), "--json"]) == INVALID
    result = json.loads(capsys.readouterr().out)
    assert result["valid"] is False and result["first_broken_seq"] == 3


def test_audit_verify_catches_truncation_with_a_signed_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(key=b"s3cret")
    for i in range(4):
        log.record("action.executed", "a", "s", {"i": i})
    path = tmp_path / "audit.jsonl"
    log.export(path)
    checkpoint = tmp_path / "head.json"
    checkpoint.write_text(log.checkpoint().model_dump_json())
    log.close()
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))  # drop the last entry
    monkeypatch.setenv("KW_AUDIT_KEY", "s3cret")
    args = ["audit", "verify", str(path), "--checkpoint", str(checkpoint), "--key-env"]
    assert main([*args, "KW_AUDIT_KEY"]) == INVALID
    assert "INVALID" in capsys.readouterr().out
    monkeypatch.setenv("KW_AUDIT_KEY", "wrong")
    path.write_bytes(b"".join(lines))  # intact file, but a key that did not sign it
    assert main([*args, "KW_AUDIT_KEY"]) == INVALID


def test_audit_verify_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(tmp_path / "missing.jsonl")]) == USAGE
    assert main(["audit", "verify", "sqlite:///kw.db"]) == USAGE
    assert main(["audit", "verify", str(tmp_path / "x"), "--key-env", "KW_UNSET_VAR"]) == USAGE
    with pytest.raises(SystemExit) as info:
        main(["nosuchcommand"])
    assert info.value.code == 2


def test_the_module_runs_as_a_command(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "klockwork.cli", "leases", "--url", f"sqlite:///{tmp_path}/k.db"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == OK, done.stderr
    assert "no active leases" in done.stdout
