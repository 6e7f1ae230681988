"""The audit chain on Redis: a journal written with decisions, sealed by any process.

Needs ``KLOCKWORK_TEST_REDIS_URL`` (e.g. ``redis://127.0.0.1:6379/15``);
each test works in a namespace of its own, deleted afterwards.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator

import pytest
import redis

from klockwork import AuditIntegrityError
from klockwork.core.audit.encode import data_text
from klockwork.core.audit.redis import RedisAuditBackend
from klockwork.core.audit.verify import verify_lines
from klockwork.core.stores.redis.connection import RedisConnection

REDIS_URL = os.environ.get("KLOCKWORK_TEST_REDIS_URL", "")
pytestmark = pytest.mark.skipif(
    not REDIS_URL,
    reason="Redis tests need a server: KLOCKWORK_TEST_REDIS_URL=redis://127.0.0.1:6379/15 "
    "make test runs them",
)


@pytest.fixture
def url() -> Iterator[str]:
    namespace = f"t-{uuid.uuid4().hex[:16]}-audit"
    yield f"{REDIS_URL}{'&' if '?' in REDIS_URL else '?'}namespace={namespace}"
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{{{namespace}}}:*", count=1000))
    if keys:
        client.unlink(*keys)
    client.close()


def rows(n: int, agent: str = "a1", kind: str = "action.executed") -> list[tuple]:  # type: ignore[type-arg]
    return [
        (0, 1_000 + i, kind, agent, "s1", data_text({"i": i, "who": agent}, None)) for i in range(n)
    ]


def test_journaled_entries_seal_into_one_verifiable_chain(url: str) -> None:
    conn = RedisConnection(url)
    backend = RedisAuditBackend(conn)
    assert backend.journal(rows(3)) == [1, 2, 3]
    assert backend.pending() == 3 and backend.head() is None
    assert backend.seal_pending() == 3
    assert backend.pending() == 0 and backend.seal_pending() == 0
    assert backend.journal(rows(2, agent="a2", kind="lease.granted")) == [4, 5]
    assert backend.seal_pending(limit=1) == 1 and backend.seal_pending() == 1
    lines = backend.lines(0, 100)
    result = verify_lines(lines)
    assert result.valid and result.checked == 5 and result.head_seq == 5
    assert backend.head_point() == (5, result.head_hash)
    head = backend.head()
    assert head is not None and head.seq == 5 and head.agent_id == "a2"
    assert [e.seq for e in backend.read(0, 10, agent_id="a2")] == [4, 5]
    assert [e.seq for e in backend.read(0, 10, kind="action.executed")] == [1, 2, 3]
    assert [e.seq for e in backend.read(1, 1, session_id="s1")] == [2]
    assert [e.seq for e in backend.read(0, 10, since=1_002)] == [3]
    assert backend.read(0, 10, agent_id="nobody") == []
    assert backend.first_column_mismatch() is None
    conn.close()


def test_sealers_in_many_processes_make_one_chain(url: str) -> None:
    """Concurrent journal writers and sealers (separate connections): gapless, verifiable."""
    backends = [RedisAuditBackend(RedisConnection(url)) for _ in range(4)]
    errors: list[BaseException] = []

    def work(backend: RedisAuditBackend, agent: str) -> None:
        try:
            for _ in range(25):
                backend.journal(rows(4, agent=agent))
                backend.seal_pending(limit=3)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(b, f"agent-{i}")) for i, b in enumerate(backends)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    while backends[0].seal_pending():
        pass
    lines = backends[0].lines(0, 1000)
    result = verify_lines(lines)
    assert result.valid and result.checked == 400
    for i in range(4):
        assert len(backends[1].read(0, 1000, agent_id=f"agent-{i}")) == 100
    for b in backends:
        b._conn.close()


def test_an_index_edited_to_hide_an_entry_is_reported(url: str) -> None:
    conn = RedisConnection(url)
    backend = RedisAuditBackend(conn)
    backend.journal(rows(3))
    backend.seal_pending()
    conn.sync.zrem(backend.index_key("agent", "a1"), 2)
    assert backend.first_column_mismatch() == 2
    conn.close()


def test_a_damaged_head_seals_nothing(url: str) -> None:
    conn = RedisConnection(url)
    backend = RedisAuditBackend(conn)
    backend.journal(rows(1))
    conn.sync.set(conn.key("audit", "head"), b"garbage")
    with pytest.raises(AuditIntegrityError):
        backend.seal_pending()
    assert backend.pending() == 1
    conn.close()
