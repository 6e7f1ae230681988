"""Regression tests: the audit trail holds up as evidence.

Finding 11 of issue 9 (probes ``repro_audit_column_tamper.py``,
``repro_audit_bad_row.py``, ``p5_audit_tamper.py``): rewriting the indexed
columns of ``kw_audit`` (``agent_id``, ``kind``, ...) hid entries from
queries while ``verify`` still said valid; one malformed row made
``Klockwork.open`` fail (taking the lease store down with it) and a deeply
nested row or line crashed ``verify`` (RecursionError) instead of
reporting it; a line with a duplicate key read two ways.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from klockwork import (
    Checkpoint,
    Klockwork,
    MemoryStore,
    Policy,
    SqliteStore,
    VerifyResult,
)
from klockwork.core.audit.chain import canonical_json
from klockwork.core.audit.log import verify_file

KEY = "s3cret"
NESTED = b"[" * 100_000 + b"]" * 100_000


def _build(kw: Klockwork) -> None:
    """A small chain: a bystander's lease (seq 1), then five gates of a rogue agent (2..6)."""
    kw.policies.add(Policy(name="p", action="db.*", effect="allow"))
    kw.leases.try_acquire("bystander", "s0", ("FILE:/x", "MUTATES"))
    for i in range(5):
        kw.gates.execute("rogue-agent", "db.drop_table", {"table": f"t{i}"}, session_id="s1")


@pytest.fixture
def db(tmp_path: Path) -> tuple[Path, Checkpoint]:
    """A SQLite file holding the chain, and a signed checkpoint of its head."""
    path = tmp_path / "kw.db"
    with Klockwork(SqliteStore(path), audit_key=KEY) as kw:
        _build(kw)
        checkpoint = kw.audit.checkpoint()
    assert checkpoint.seq == 6
    return path, checkpoint


def _sql(path: Path, statement: str, args: tuple[Any, ...] = ()) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(statement, args)
    conn.close()


def _invalid(result: VerifyResult, broken: int | None = None) -> None:
    assert not result.valid, result.reason
    if broken is not None:
        assert result.first_broken_seq == broken, result


# ================================================================ columns outside the chain
@pytest.mark.parametrize(
    "change",
    [
        "agent_id = 'cron'",
        "kind = 'tool.end'",
        "agent_id = 'cron', kind = 'tool.end'",
        "session_id = 'other'",
        "session_id = NULL",
        "ts = ts + 1",
    ],
)
def test_rewriting_the_query_columns_is_caught_by_verify(
    db: tuple[Path, Checkpoint], change: str
) -> None:
    path, checkpoint = db
    _sql(path, f"UPDATE kw_audit SET {change} WHERE agent_id = 'rogue-agent'")
    with Klockwork(SqliteStore(path), audit_key=KEY) as kw:
        _invalid(kw.audit.verify(), broken=2)
        _invalid(kw.audit.verify(against=checkpoint), broken=2)


def test_an_untouched_file_still_verifies(db: tuple[Path, Checkpoint]) -> None:
    path, checkpoint = db
    with Klockwork(SqliteStore(path), audit_key=KEY) as kw:
        assert kw.audit.verify().valid
        assert kw.audit.verify(against=checkpoint).valid
        assert len(kw.audit.query(agent_id="rogue-agent").entries) == 5


# ================================================================ bad rows in the store
def _with_a_duplicate_key(line: bytes) -> bytes:
    return b'{"agent_id":"mallory",' + line[1:]


BAD_ROWS = pytest.mark.parametrize(
    ("where", "bad"),
    [
        ("head", lambda line: b"garbage"),
        ("head", lambda line: NESTED),
        ("head", lambda line: b"{}"),
        ("head", _with_a_duplicate_key),
        ("middle", lambda line: NESTED),
        ("middle", lambda line: b"garbage"),
        ("middle", _with_a_duplicate_key),
    ],
    ids=[
        "head-garbage",
        "head-nested",
        "head-empty-object",
        "head-duplicate-key",
        "middle-nested",
        "middle-garbage",
        "middle-duplicate-key",
    ],
)


def _damage(path: Path, where: str, bad: Callable[[bytes], bytes]) -> int:
    seq = 6 if where == "head" else 3
    with sqlite3.connect(path) as conn:
        line = conn.execute("SELECT line FROM kw_audit WHERE seq = ?", (seq,)).fetchone()[0]
    conn.close()
    _sql(path, "UPDATE kw_audit SET line = ? WHERE seq = ?", (bad(bytes(line)), seq))
    return seq


@BAD_ROWS
def test_a_bad_stored_row_is_reported_and_does_not_take_the_engine_down(
    db: tuple[Path, Checkpoint], where: str, bad: Callable[[bytes], bytes]
) -> None:
    path, checkpoint = db
    seq = _damage(path, where, bad)
    kw = Klockwork.open(f"sqlite:///{path}", audit_key=KEY)  # opens: the leases do not depend on it
    try:
        _invalid(kw.audit.verify(), broken=seq)
        _invalid(kw.audit.verify(against=checkpoint), broken=seq)
        assert kw.leases.try_acquire("agent-a", "s", ("FILE:/y", "MUTATES")).granted
        kw.policies.add(Policy(name="p", action="db.*", effect="allow"))
        assert kw.gates.execute("agent-a", "db.read").status == "executed"
    finally:
        kw.close()  # must not raise either

    cli = subprocess.run(
        [sys.executable, "-m", "klockwork.cli", "audit", "verify", f"sqlite:///{path}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 1, (cli.returncode, cli.stdout, cli.stderr)  # INVALID, not a crash


@pytest.mark.parametrize(
    ("where", "bad"),
    [
        pytest.param("head", lambda line: b"garbage", id="head-garbage"),
        pytest.param("head", lambda line: NESTED, id="head-nested"),
        pytest.param("head", lambda line: b"{}", id="head-empty-object"),
        pytest.param("head", _with_a_duplicate_key, id="head-duplicate-key"),
        pytest.param("middle", lambda line: NESTED, id="middle-nested"),
        pytest.param("middle", lambda line: b"garbage", id="middle-garbage"),
    ],
)
def test_verify_reports_a_bad_row_after_new_decisions_too(
    db: tuple[Path, Checkpoint], where: str, bad: Callable[[bytes], bytes]
) -> None:
    """The engine keeps deciding over a damaged chain; verify must still report, not raise."""
    path, checkpoint = db
    seq = _damage(path, where, bad)
    kw = Klockwork.open(f"sqlite:///{path}", audit_key=KEY)
    try:
        assert kw.leases.try_acquire("agent-a", "s", ("FILE:/y", "MUTATES")).granted
        _invalid(kw.audit.verify(), broken=seq)
        _invalid(kw.audit.verify(against=checkpoint), broken=seq)
    finally:
        kw.close()


# ================================================================ exported JSON Lines
@pytest.fixture(params=["memory", "sqlite"])
def exported(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Checkpoint]:
    store = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "kw.db")
    with Klockwork(store, audit_key=KEY) as kw:
        _build(kw)
        checkpoint = kw.audit.checkpoint()
        path = tmp_path / "audit.jsonl"
        assert kw.audit.export(path) == 6
    return path, checkpoint


def _tamper_line(path: Path, lineno: int, change: Callable[[bytes], bytes]) -> Path:
    lines = path.read_bytes().splitlines()
    lines[lineno - 1] = change(lines[lineno - 1])
    target = path.with_name(f"tampered-{lineno}.jsonl")
    target.write_bytes(b"\n".join(lines) + b"\n")
    return target


LINE_CHANGES = [
    pytest.param(lambda line: NESTED, id="deeply-nested"),
    pytest.param(_with_a_duplicate_key, id="duplicate-key"),
    pytest.param(
        lambda line: line.replace(b'"hash"', b'"agent_id":"mallory","hash"', 1),
        id="duplicate-key-inside",
    ),
    pytest.param(lambda line: b'{"seq":' + b"9" * 5000 + b"}", id="5000-digit-seq"),
    pytest.param(lambda line: b"garbage", id="not-json"),
    pytest.param(lambda line: b"\xff\xfe{}", id="not-utf8"),
    pytest.param(lambda line: line.replace(b'"table":"t', b'"table":"x', 1), id="edited-data"),
    pytest.param(lambda line: line.replace(b"rogue-agent", b"cron", 1), id="edited-agent"),
]


@pytest.mark.parametrize("change", LINE_CHANGES)
@pytest.mark.parametrize("lineno", [3, 6])
def test_a_tampered_or_pathological_line_makes_verify_file_report_invalid(
    exported: tuple[Path, Checkpoint], change: Callable[[bytes], bytes], lineno: int
) -> None:
    path, checkpoint = exported
    assert verify_file(path).valid
    target = _tamper_line(path, lineno, change)
    if target.read_bytes() == path.read_bytes():
        pytest.fail("the change did not change the file")
    # A malformed line is named exactly; a canonical edit names its sealed block's first entry.
    lines = path.read_bytes().splitlines()
    seal = json.loads(lines[lineno - 1])["hash"]
    block_first = next(i for i, line in enumerate(lines, 1) if json.loads(line)["hash"] == seal)
    canonical = _canonical(target.read_bytes().splitlines()[lineno - 1])
    _invalid(verify_file(target), broken=block_first if canonical else lineno)
    _invalid(verify_file(target, against=checkpoint, key=KEY.encode()))


def _canonical(line: bytes) -> bool:
    """True if ``line`` is one JSON object written canonically (no duplicate keys)."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({key for key, _ in pairs}) != len(pairs):
            raise ValueError("duplicate key")
        return dict(pairs)

    try:
        obj = json.loads(line, object_pairs_hook=unique)
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and canonical_json(obj) == line


def test_a_duplicate_key_line_is_invalid_even_when_the_chain_links(
    exported: tuple[Path, Checkpoint],
) -> None:
    """A first-wins JSON reader sees agent "mallory", Python's last-wins the real one."""
    path, _ = exported
    target = _tamper_line(path, 3, _with_a_duplicate_key)
    _invalid(verify_file(target), broken=3)


def test_the_cli_reports_a_pathological_file_as_invalid(
    exported: tuple[Path, Checkpoint],
) -> None:
    path, _ = exported
    target = _tamper_line(path, 3, lambda line: NESTED)
    cli = subprocess.run(
        [sys.executable, "-m", "klockwork.cli", "audit", "verify", str(target)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 1, (cli.returncode, cli.stdout, cli.stderr)


def test_a_copy_of_a_good_file_verifies(exported: tuple[Path, Checkpoint], tmp_path: Path) -> None:
    path, checkpoint = exported
    copy = tmp_path / "copy.jsonl"
    shutil.copy(path, copy)
    assert verify_file(copy, against=checkpoint, key=KEY.encode()).valid
