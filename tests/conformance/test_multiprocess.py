"""Several processes, one SQLite file (or one Redis namespace): leases really exclude.

Klock's SQLite store runs without transactions and is unsafe here
(ANCHORS.md). Four spawned processes each increment a counter file 200
times, read-modify-write, under a MUTATES lease taken through their own
``Klockwork.open("sqlite:////abs/path")``: the file must end at exactly 800.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from support import run_spawned

from klockwork import Klockwork

PROCESSES = 4
INCREMENTS = 200


def _increment(url: str, agent_id: str, counter: str, n: int, start: object) -> None:
    """Child process: ``n`` leased read-modify-write increments of the counter file."""
    kw = Klockwork.open(url)
    try:
        start.wait(60)  # type: ignore[attr-defined]
        for _ in range(n):
            with kw.lease(agent_id, "s", "FILE:/counter", "MUTATES", ttl_ms=5000):
                path = Path(counter)
                value = int(path.read_text())
                path.write_text(str(value + 1))
    finally:
        kw.close()


@pytest.mark.slow
def test_processes_sharing_a_sqlite_file_exclude_each_other(tmp_path: Path) -> None:
    db = (tmp_path / "shared.db").resolve()
    counter = tmp_path / "counter.txt"
    counter.write_text("0")
    url = f"sqlite:///{db}"  # an absolute path gives four slashes
    assert url.startswith("sqlite:////")
    Klockwork.open(url).close()  # create the schema once, before the race

    run_spawned(
        _increment, [(url, f"proc-{i}", str(counter), INCREMENTS) for i in range(PROCESSES)]
    )
    assert int(counter.read_text()) == PROCESSES * INCREMENTS
    with Klockwork.open(url) as kw:
        assert kw.leases.list() == []  # every lease was released


@pytest.mark.slow
def test_processes_sharing_a_redis_namespace_exclude_each_other(tmp_path: Path) -> None:
    """The same race on Redis, each process on the server's clock (``Klockwork.open``)."""
    from .conftest import drop_redis_namespace, redis_url

    namespace = f"t-{uuid.uuid4().hex[:16]}-mp"
    url = redis_url(namespace)
    counter = tmp_path / "counter.txt"
    counter.write_text("0")
    try:
        run_spawned(
            _increment, [(url, f"proc-{i}", str(counter), INCREMENTS) for i in range(PROCESSES)]
        )
        assert int(counter.read_text()) == PROCESSES * INCREMENTS
        with Klockwork.open(url) as kw:
            assert kw.leases.list() == []
    finally:
        if os.environ.get("KLOCKWORK_TEST_REDIS_URL"):
            drop_redis_namespace(namespace)
