"""Opening engines: store URLs, the process default, lifecycle."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from klockwork import (
    InvalidRequestError,
    Klockwork,
    ManualClock,
    MemoryStore,
    SqliteStore,
    StoreUnavailableError,
    SystemClock,
)


def test_defaults() -> None:
    with Klockwork() as kw:
        assert isinstance(kw.store, MemoryStore)
        assert isinstance(kw.clock, SystemClock)
        assert kw.default_effect == "deny"
        assert "MemoryStore" in repr(kw) and "open" in repr(kw)
    assert kw.closed and "closed" in repr(kw)


@pytest.mark.parametrize("url", ["memory://", "MEMORY://"])
def test_open_memory(url: str) -> None:
    with Klockwork.open(url) as kw:
        assert isinstance(kw.store, MemoryStore)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("memory", "expected memory://"),
        ("memory://x", "nothing after memory://"),
        ("sqlite://kw.db", "sqlite:///kw.db (relative) or sqlite:////kw.db (absolute)"),
        ("sqlite:kw.db", "expected memory://"),
        ("sqlite:///", "needs a file path"),
        ("sqlite:///:memory:", "needs a file path"),
        ("postgres://x", "unknown store scheme"),
    ],
)
def test_malformed_urls_are_refused(url: str, says: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="url") as caught:
        Klockwork.open(url)
    assert says in str(caught.value)
    assert not (tmp_path / "kw.db").exists()


def test_open_sqlite_absolute_path(tmp_path: Path) -> None:
    path = tmp_path / "abs.db"
    with Klockwork.open(f"sqlite:///{path}") as kw:  # sqlite:////abs/path
        assert isinstance(kw.store, SqliteStore)
        assert kw.store.path == str(path)
    assert path.exists()


def test_open_sqlite_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with Klockwork.open("sqlite:///rel.db") as kw:
        assert kw.store.path == "rel.db"  # type: ignore[attr-defined]
    assert (tmp_path / "rel.db").exists()


def test_two_engines_on_one_file_share_state(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    clock = ManualClock()
    with Klockwork.open(url, clock=clock) as a, Klockwork.open(url, clock=clock) as b:
        lease = a.leases.try_acquire("x", "s", ("FILE:/f", "MUTATES")).lease
        assert [x.lease_id for x in b.leases.list()] == [lease.lease_id]
        assert not b.leases.try_acquire("y", "s", ("FILE:/f", "MUTATES")).granted
        assert b.leases.release(lease.lease_id)
        assert a.leases.list() == []


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///:memory:",
        "sqlite://",
        "redis://",
        "redis://localhost:6379/0?namespace=a{b}",
        "ftp://x",
        "nonsense",
        42,
    ],
)
def test_open_rejects(url: object) -> None:
    with pytest.raises(InvalidRequestError) as info:
        Klockwork.open(url)  # type: ignore[arg-type]
    assert info.value.argument == "url"


def test_open_reads_klockwork_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLOCKWORK_URL", f"sqlite:///{tmp_path / 'env.db'}")
    with Klockwork.open() as kw:
        assert isinstance(kw.store, SqliteStore)
    monkeypatch.delenv("KLOCKWORK_URL")
    with Klockwork.open() as kw:
        assert isinstance(kw.store, MemoryStore)


def test_process_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KLOCKWORK_URL", raising=False)
    previous = Klockwork._default
    try:
        Klockwork.set_default(None)
        first = Klockwork.default()
        assert Klockwork.default() is first
        first.close()
        second = Klockwork.default()  # a closed default is replaced
        assert second is not first and not second.closed
        mine = Klockwork()
        Klockwork.set_default(mine)
        assert Klockwork.default() is mine
        second.close()
        mine.close()
    finally:
        Klockwork.set_default(previous)


def test_bad_construction() -> None:
    with pytest.raises(InvalidRequestError):
        Klockwork(default_effect="maybe")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        Klockwork(store="memory://")  # type: ignore[arg-type]


def test_closed_engine() -> None:
    kw = Klockwork()
    kw.close()
    with pytest.raises(StoreUnavailableError):
        kw.leases  # noqa: B018
    with pytest.raises(StoreUnavailableError):
        kw.get_agent("a")


def test_audit_key_is_bytes() -> None:
    with Klockwork(audit_key="secret") as kw:
        assert kw.audit_key == b"secret"


def test_an_engine_left_open_at_exit_still_stores_its_audit_tail(tmp_path: Path) -> None:
    """The default engine is rarely closed: the exit hook must store what was recorded."""
    import subprocess
    import sys

    db = tmp_path / "kw.db"
    script = (
        "from klockwork import Klockwork\n"
        f"kw = Klockwork.open('sqlite:///{db}')\n"
        "for i in range(500):\n"
        "    kw.leases.try_acquire('a', 's', (f'FILE:/f{i}', 'MUTATES'))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    with Klockwork.open(f"sqlite:///{db}") as kw:
        result = kw.audit.verify()
        assert result.valid and result.checked == 500


_DEFAULT_WARNING_PROBE = """
import warnings
from langchain_core.tools import tool
from klockwork import Klockwork, KlockworkWarning
from klockwork.integrations.langchain import klock_protected

@tool
@klock_protected("FILE:{path}")
def touch(path: str) -> str:
    \"\"\"Touch a file.\"\"\"
    return "ok"

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    touch.invoke({"path": "/a"})
    touch.invoke({"path": "/b"})
    Klockwork.default().close()
    Klockwork.default()  # a fresh default after close: still one warning per process
print(sum(issubclass(w.category, KlockworkWarning) for w in caught))
"""


@pytest.mark.parametrize("url", [None, "memory://"])
def test_the_private_default_engine_warns_once_per_process(url: str | None, tmp_path: Path) -> None:
    """Without kw= and KLOCKWORK_URL, two processes would silently not coordinate."""
    env = {k: v for k, v in os.environ.items() if k != "KLOCKWORK_URL"}
    if url is not None:
        env["KLOCKWORK_URL"] = url
    out = subprocess.run(
        [sys.executable, "-c", _DEFAULT_WARNING_PROBE],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=True,
    )  # fmt: skip
    if url is None:
        assert out.stdout.split() == ["1"]
        assert out.stderr.count("private in-memory engine") == 1  # the log line
        assert "KLOCKWORK_URL=sqlite:///kw.db" in out.stderr
    else:  # memory chosen on purpose: nothing to warn about
        assert out.stdout.split() == ["0"]
        assert "private in-memory engine" not in out.stderr
