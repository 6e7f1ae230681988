"""The command line: what it prints and the exit codes scripts rely on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from klockwork import Klockwork
from klockwork.cli import INVALID, OK, USAGE, main
from klockwork.core.audit.log import AuditLog


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
        (listed,) = json.loads(capsys.readouterr().out)
        assert listed["lease_id"] == lease.lease_id
        assert main(["leases", "--url", url, "--agent", "nobody", "--json"]) == OK
        assert json.loads(capsys.readouterr().out) == []

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
        log.flush()  # each entry sealed alone: verification names the exact entry
    path = tmp_path / "audit.jsonl"
    log.export(path)
    return path, log


def test_audit_verify_accepts_an_intact_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, log = _exported(tmp_path)
    log.close()
    assert main(["audit", "verify", str(path)]) == OK
    assert capsys.readouterr().out == "valid: 5 entries verify (head seq 5).\n"


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


def test_audit_verify_names_the_first_entry_of_an_edited_block(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = AuditLog()
    for i in range(3):
        log.record("tool.end", "a", "s", {"i": i})
    log.flush()  # entries 1..3: one block
    for i in range(3, 6):
        log.record("tool.end", "a", "s", {"i": i})
    path = tmp_path / "audit.jsonl"
    log.export(path)  # entries 4..6: a second block
    log.close()
    lines = path.read_bytes().splitlines(keepends=True)
    lines[4] = lines[4].replace(b'"i":4', b'"i":40')
    path.write_bytes(b"".join(lines))
    assert main(["audit", "verify", str(path)]) == INVALID
    out = capsys.readouterr().out
    assert out.startswith("INVALID at seq 4: entries 4..6 (line 4) do not match their block's seal")
    assert "(3 entries before it verify)" in out


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
    Klockwork.open(f"sqlite:///{tmp_path}/k.db").close()
    done = subprocess.run(
        [sys.executable, "-m", "klockwork.cli", "leases", "--url", f"sqlite:///{tmp_path}/k.db"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == OK, done.stderr
    assert "no active leases" in done.stdout


@pytest.mark.parametrize("url", ["memory://", "memory", None])
def test_leases_refuses_a_store_that_cannot_be_the_shared_one(
    url: str | None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty in-memory store would answer "no active leases": a lie, not a listing."""
    monkeypatch.delenv("KLOCKWORK_URL", raising=False)
    assert main(["leases"] if url is None else ["leases", "--url", url]) == USAGE
    err = capsys.readouterr().err
    assert ("new, empty in-memory store" in err) if url else ("no store given" in err)


def test_leases_does_not_create_a_store_for_a_typo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "typo.db"
    assert main(["leases", "--url", f"sqlite:///{typo}"]) == USAGE
    assert "no SQLite store at" in capsys.readouterr().err
    assert not typo.exists()
    assert main(["leases", "--url", "sqlite://kw.db"]) == USAGE  # two slashes: malformed
    assert "three slashes" in capsys.readouterr().err


def _signed_export(tmp_path: Path) -> tuple[list[str], Path]:
    log = AuditLog(key=b"s3cret")
    for i in range(3):
        log.record("action.executed", "a", "s", {"i": i})
    path = tmp_path / "audit.jsonl"
    log.export(path)
    checkpoint = tmp_path / "head.json"
    checkpoint.write_text(log.checkpoint().model_dump_json())
    log.close()
    return ["audit", "verify", str(path), "--checkpoint", str(checkpoint)], checkpoint


def test_a_signature_nobody_checked_never_reads_as_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args, checkpoint = _signed_export(tmp_path)
    forged = json.loads(checkpoint.read_text())
    forged["signature"] = "0" * 64
    checkpoint.write_text(json.dumps(forged))
    assert main(args) == USAGE  # no key: refused, not "valid"
    err = capsys.readouterr().err
    assert "--key-env" in err and "--ignore-signature" in err
    monkeypatch.setenv("KW_AUDIT_KEY", "s3cret")
    assert main([*args, "--key-env", "KW_AUDIT_KEY"]) == INVALID  # the forgery is caught
    assert "bad signature" in capsys.readouterr().out
    assert main([*args, "--ignore-signature"]) == OK  # explicitly unchecked, and said so
    assert "signature was NOT checked" in capsys.readouterr().out
    assert main([*args, "--ignore-signature", "--json"]) == OK
    assert json.loads(capsys.readouterr().out)["signature_checked"] is False


def test_two_swapped_lines_are_reported_as_reordered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, log = _exported(tmp_path)
    log.close()
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2], lines[3] = lines[3], lines[2]
    path.write_bytes(b"".join(lines))
    assert main(["audit", "verify", str(path)]) == INVALID
    out = capsys.readouterr().out
    assert out == (
        "INVALID at seq 3: entries 3 and 4 are out of order (entry 4 comes before entry 3: "
        "reordered) (2 entries before it verify).\n"
    )
    del lines[3]  # now entry 3 is really gone: 1, 2, 4, 5
    path.write_bytes(b"".join(lines))
    assert main(["audit", "verify", str(path)]) == INVALID
    assert "entry 3 is missing" in capsys.readouterr().out
