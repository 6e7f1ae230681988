"""``klockwork keys create | list | revoke`` on a SQLite store, and without FastAPI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

from klockwork import Klockwork
from klockwork.cli import OK, USAGE, main
from klockwork.server.keys import ApiKeys


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/kw.db"
    Klockwork.open(url).close()
    return url


def _keys(url: str) -> tuple[Klockwork, ApiKeys]:
    kw = Klockwork.open(url)
    return kw, ApiKeys(kw)


def test_create_prints_the_key_once_and_the_store_accepts_it(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "create", "bob", "--role", "approver", "--url", url]) == OK
    out, err = capsys.readouterr()
    secret = out.strip()
    assert secret.startswith("kw_") and "\n" not in secret  # the key alone: KEY=$(...)
    assert "shown only this once" in err and "'bob'" in err and secret not in err

    kw, keys = _keys(url)
    with kw:
        record = keys.authenticate(secret)
        assert record is not None and (record.principal, record.role) == ("bob", "approver")
        assert keys.authenticate(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None

    # Listed, never shown again: neither the key nor its hash.
    assert main(["keys", "list", "--url", url]) == OK
    listing = capsys.readouterr().out
    assert record.key_id in listing and "bob" in listing and "approver" in listing
    assert secret not in listing and record.digest not in listing


def test_create_json_and_an_agent_key_with_its_owner(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["keys", "create", "builder", "--role", "agent", "--owner", "alice"]
    assert main([*args, "--label", "ci runner", "--url", url, "--json"]) == OK
    made = json.loads(capsys.readouterr().out)
    assert set(made) == {"api_key", "key"}
    assert made["key"]["principal"] == "builder" and made["key"]["owner"] == "alice"
    assert made["key"]["label"] == "ci runner" and "digest" not in made["key"]

    kw, keys = _keys(url)
    with kw:
        found = keys.authenticate(made["api_key"])
        assert found is not None and found.key_id == made["key"]["key_id"]
        assert keys.runs("alice", "builder") and not keys.runs("bob", "builder")

    assert main(["keys", "list", "--url", url, "--json"]) == OK
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed == made["key"]


def test_revoke_refuses_the_key_from_then_on(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "create", "bob", "--role", "approver", "--url", url, "--json"]) == OK
    made = json.loads(capsys.readouterr().out)
    key_id = made["key"]["key_id"]

    assert main(["keys", "revoke", key_id, "--url", url]) == OK
    assert f"key {key_id}" in capsys.readouterr().out
    kw, keys = _keys(url)
    with kw:
        assert keys.authenticate(made["api_key"]) is None
    assert main(["keys", "revoke", key_id, "--url", url]) == OK  # idempotent
    assert "already revoked" in capsys.readouterr().out

    assert main(["keys", "list", "--url", url]) == OK
    assert "no active keys" in capsys.readouterr().out
    assert main(["keys", "list", "--all", "--url", url, "--json"]) == OK
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["status"] == "revoked" and listed["revoked_at_ms"] is not None

    assert main(["keys", "revoke", "0123456789abcdef", "--url", url]) == USAGE
    assert "no key" in capsys.readouterr().err
    assert main(["keys", "revoke", "not-an-id", "--url", url]) == USAGE


def test_bad_input_is_a_usage_error(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as bad_role:
        main(["keys", "create", "bob", "--role", "boss", "--url", url])
    assert bad_role.value.code == USAGE
    with pytest.raises(SystemExit) as no_role:
        main(["keys", "create", "bob", "--url", url])
    assert no_role.value.code == USAGE
    capsys.readouterr()
    # Only an agent key has an owner; a principal must be an identity.
    args = ["keys", "create", "bob", "--role", "approver", "--owner", "alice", "--url", url]
    assert main(args) == USAGE
    assert "owner" in capsys.readouterr().err
    assert main(["keys", "create", "", "--role", "approver", "--url", url]) == USAGE
    assert main(["keys", "create", "a b\n", "--role", "approver", "--url", url]) == USAGE
    # memory:// would be a store no server reads.
    assert main(["keys", "list", "--url", "memory://"]) == USAGE
    assert main(["keys", "create", "bob", "--role", "admin", "--url", "memory://"]) == USAGE
    kw, keys = _keys(url)
    with kw:
        assert keys.list(include_revoked=True) == []  # nothing was half-made


def test_create_makes_a_new_sqlite_store_and_list_does_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Keys are made before a server's first (public) start: create may make the
    # file; list and revoke read a store that must exist (a typo is not a store).
    url = f"sqlite:///{tmp_path}/new.db"
    assert main(["keys", "list", "--url", url]) == USAGE
    assert not (tmp_path / "new.db").exists()
    assert main(["keys", "create", "ops", "--role", "admin", "--url", url]) == OK
    assert (tmp_path / "new.db").exists()
    capsys.readouterr()


def test_keys_work_without_fastapi(url: str) -> None:
    # What a machine without the server extra runs: importing FastAPI fails.
    script = (
        "import sys, json\n"
        "sys.modules['fastapi'] = None\n"
        "sys.modules['uvicorn'] = None\n"
        "from klockwork.cli.main import main\n"
        "codes = [main(['keys', 'create', 'bob', '--role', 'approver', '--url', sys.argv[1]]),\n"
        "         main(['keys', 'list', '--json', '--url', sys.argv[1]]),\n"
        "         main(['serve', '--url', 'memory://'])]\n"
        "web = [m for m, mod in sys.modules.items() if mod is not None\n"
        "       and m.split('.')[0] in ('fastapi', 'starlette', 'uvicorn')]\n"
        "assert web == [] and 'klockwork.server.app' not in sys.modules, web\n"
        "print(json.dumps(codes))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, url],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("kw_")
    assert [k["principal"] for k in json.loads(lines[1])] == ["bob"]
    assert json.loads(lines[-1]) == [OK, OK, USAGE]
    assert "pip install 'klockwork[server]'" in done.stderr
