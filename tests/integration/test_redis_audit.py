"""The audit chain on Redis: a journal written with decisions, sealed by any process.

Needs ``KLOCKWORK_TEST_REDIS_URL`` (e.g. ``redis://127.0.0.1:6379/15``);
each test works in a namespace of its own, deleted afterwards.
"""

from __future__ import annotations

import json
import json.encoder
import os
import re
import threading
import uuid
from collections.abc import Iterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from klockwork import (
    AuditIntegrityError,
    Klockwork,
    LeaseExpiredError,
    ManualClock,
    MemoryStore,
    RedisStore,
)
from klockwork.core.audit.encode import data_text
from klockwork.core.audit.redis import RedisAuditBackend
from klockwork.core.audit.verify import verify_lines
from klockwork.core.leases.acquiring import Tries
from klockwork.core.leases.rules import parse_intents
from klockwork.core.stores.base import AcquireRequest
from klockwork.core.stores.redis.connection import RedisConnection
from klockwork.core.stores.redis.journal import ENTRY_LUA, journal_args

REDIS_URL = os.environ.get("KLOCKWORK_TEST_REDIS_URL", "")
T0 = 1_000_000
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


def test_a_sealer_never_seals_rows_that_changed_after_it_read_them(url: str) -> None:
    """A restart lost pending rows and their seqs were handed out again while a
    sealer held the old rows: it seals what is pending now, not what it read."""
    conn = RedisConnection(url)
    backend = RedisAuditBackend(conn)
    backend.journal(rows(3))
    real, replaced = conn.script, []

    def script(source: str) -> object:
        found = real(source)
        if "sha1hex" not in source or replaced:
            return found

        def run(**kwargs: object) -> object:
            (newer,) = journal_args(rows(1, agent="after-restart"))
            conn.sync.hset(backend._pending, 2, newer)  # seq 2 given to another entry
            replaced.append(True)
            return found(**kwargs)

        return run

    conn.script = script  # type: ignore[method-assign]
    try:
        assert backend.seal_pending() == 3
    finally:
        del conn.script
    assert replaced and verify_lines(backend.lines(0, 10)).valid
    assert [e.agent_id for e in backend.read(0, 10)] == ["a1", "after-restart", "a1"]
    conn.close()


# -- lease entries written by the Redis scripts: byte for byte the Python hooks' -------------
#: Resource paths every JSON escape rule meets: quotes, backslashes, control
#: characters (short escapes, \u00xx and DEL, which is not escaped), non-ASCII, emoji.
ODD_PATHS = (
    'FILE:/odd/"quoted"\\back\\slash',
    "FILE:/odd/ctl\x01\x08\x09\x0a\x0b\x0c\x0d\x1b\x1f\x7f end",
    "FILE:/odd/é ü ß 中文 😀 \u2028/leaf",
    "TABLE:t/ñ'/'é\"/\\",
)


def _scripted_leases(kw: Klockwork, clock: ManualClock) -> None:
    """One deterministic run of lease decisions (the same calls on any store)."""
    leases = kw.leases
    kw.register_agent("old", priority=1)
    kw.register_agent("mid", priority=5)
    kw.register_agent("young", priority=9)
    held = leases.try_acquire(
        "mid", "s/1", [(ODD_PATHS[0], "MUTATES"), (ODD_PATHS[1], "PROVIDES")], 5_000
    )
    assert held.granted
    emoji = leases.try_acquire("mid", "s/é😀", (ODD_PATHS[2], "MUTATES"), 20_000)
    assert emoji.granted
    clock.advance(100)
    assert leases.try_acquire("young", "s", (ODD_PATHS[0], "MUTATES")).status.value == "DIE"
    # Blockers in a deterministic order: one per intent (a store lists the
    # leases found on, above and below one key in an order of its own).
    manifest = [(ODD_PATHS[1], "CONSUMES"), (ODD_PATHS[2] + "/child", "MUTATES")]
    assert leases.try_acquire("old", "s", manifest).status.value == "WAIT"
    assert leases.try_acquire("mid", "deep", ("FILE:/solo/deep/x", "MUTATES")).granted
    assert leases.try_acquire("young", "s", ("FILE:/solo", "MUTATES")).status.value == "DIE"
    # An older waiter's reservation (what a blocking acquire leaves): a blocker
    # with no lease id for younger requests; its own refusal is a single try here.
    store, intents = kw.store, parse_intents([(ODD_PATHS[3], "MUTATES")])
    leases.try_acquire("mid", "hold-t", (ODD_PATHS[3], "MUTATES"), 60_000)
    request = AcquireRequest("old", "s\"'", intents, 5_000, clock.now_ms(), reserve_ms=60_000)
    assert store.try_acquire(request).status.value == "WAIT"
    assert leases.try_acquire("young", "s", (ODD_PATHS[3], "CONSUMES")).status.value == "DIE"
    # A grant after waiting records its tries and wait.
    tries = Tries(clock)
    clock.advance(250)
    tries.count = 2
    waited = AcquireRequest("young", "w", parse_intents([("FILE:/free/é", "MUTATES")]), 1_000,
                            clock.now_ms(), tries=tries)  # fmt: skip
    assert store.try_acquire(waited).status.value == "GRANTED"
    assert leases.release(held.leases[0].lease_id)
    assert leases.revoke(held.leases[1].lease_id, 'why: "quoted"\\\n\t😀 ñ')
    assert leases.revoke(emoji.lease.lease_id, "")
    # Expiries, found by every path that finds them.
    leases.try_acquire("a", "s", ("FILE:/exp/a", "MUTATES"), 1_000)
    b = leases.try_acquire("a", "s", ("FILE:/exp/b", "MUTATES"), 1_100).lease
    c = leases.try_acquire("a", "s", ("FILE:/exp/c", "MUTATES"), 1_200).lease
    d = leases.try_acquire("a", "s", ("FILE:/exp/d", "MUTATES"), 1_300).lease
    e = leases.try_acquire("a", "s", ("FILE:/exp/e", "MUTATES"), 1_400).lease
    leases.try_acquire("a", "s", ("FILE:/exp/f", "MUTATES"), 5_000)
    leases.try_acquire("a", "s", ("FILE:/exp/g", "MUTATES"), 5_100)
    clock.advance(2_000)
    assert leases.try_acquire("b", "s", ("FILE:/exp/a", "MUTATES")).granted  # found by acquire
    assert not leases.release(b.lease_id)  # found by release
    with pytest.raises(LeaseExpiredError):
        leases.heartbeat(c.lease_id)  # found by heartbeat
    assert not leases.revoke(d.lease_id, "late")  # found by revoke
    assert leases.get(e.lease_id) is not None  # found by a read
    clock.advance(10_000)
    assert leases.sweep() >= 2  # and by the sweep, in order of expiry


def _lines(kw: Klockwork) -> list[tuple[int, str, str | None, str | None, str]]:
    """(ts, kind, agent, session, data text) of every entry, data as its stored bytes.

    Lease ids (random per engine) are replaced by their order of first appearance.
    """
    kw.audit.flush()
    ids: dict[str, str] = {}
    out = []
    for line in kw.audit.iter_lines():
        text = line.decode()
        entry = json.loads(text)
        head = json.dumps(entry["agent_id"], ensure_ascii=False)
        start = len('{"agent_id":' + head + ',"data":')
        data = text[start : text.rindex(',"hash":"')]
        for lease_id in re.findall(r"[0-9a-f]{32}", data):
            data = data.replace(lease_id, ids.setdefault(lease_id, f"L{len(ids)}"))
        out.append((entry["ts"], entry["kind"], entry["agent_id"], entry["session_id"], data))
    return out


@pytest.fixture
def twin_engines(url: str) -> Iterator[tuple[Klockwork, ManualClock, Klockwork, ManualClock]]:
    mem_clock, red_clock = ManualClock(T0), ManualClock(T0)
    mem = Klockwork(MemoryStore(), clock=mem_clock)
    red = Klockwork(RedisStore(url, server_time=False), clock=red_clock)
    yield mem, mem_clock, red, red_clock
    mem.close()
    red.close()


def test_lease_entries_written_by_the_scripts_are_the_python_hooks_bytes(
    twin_engines: tuple[Klockwork, ManualClock, Klockwork, ManualClock],
) -> None:
    mem, mem_clock, red, red_clock = twin_engines
    _scripted_leases(mem, mem_clock)
    _scripted_leases(red, red_clock)
    expected, got = _lines(mem), _lines(red)
    kinds = {kind for _, kind, *_ in expected}
    assert kinds == {"lease.granted", "lease.denied", "lease.released", "lease.revoked",
                     "lease.expired"}  # fmt: skip
    assert any('"attempts":3' in data for *_, data in expected)
    assert any('"lease_id":null' in data for *_, data in expected)
    assert len(got) == len(expected)
    for i, (want, have) in enumerate(zip(expected, got, strict=True), start=1):
        assert have == want, f"entry {i}"
    assert red.audit.verify().valid


def test_with_lease_auditing_off_the_scripts_write_no_lease_entries(url: str) -> None:
    kw = Klockwork(RedisStore(url, server_time=False), clock=ManualClock(T0), audit_leases=False)
    try:
        lease = kw.leases.try_acquire("a", "s", ("FILE:/x", "MUTATES"), 1_000).lease
        assert not kw.leases.try_acquire("b", "s", ("FILE:/x", "MUTATES")).granted
        kw.leases.release(lease.lease_id)
        kw.leases.try_acquire("a", "s", ("FILE:/y", "MUTATES"), 1_000)
        kw.clock.advance(5_000)  # type: ignore[attr-defined]
        assert kw.leases.sweep() == 1
        kw.audit.record("action.executed", "a", "s", {"n": 1})
        assert [e.kind for e in kw.audit.query().entries] == ["action.executed"]
    finally:
        kw.close()


def test_every_engine_on_a_namespace_sees_one_chain(url: str) -> None:
    """Entries written by two engines (two machines) are one chain, read from either."""
    first, second = Klockwork.open(url), Klockwork.open(url)
    try:
        lease = first.leases.try_acquire("a", "s", ("FILE:/one", "MUTATES")).lease
        second.audit.record("action.executed", "b", "s", {"n": 1})
        first.leases.release(lease.lease_id)
        for kw in (first, second):
            kinds = [e.kind for e in kw.audit.query().entries]
            assert kinds == ["lease.granted", "action.executed", "lease.released"]
            result = kw.audit.verify()
            assert result.valid and result.checked == result.head_seq == 3
        one, two = first.audit.checkpoint(), second.audit.checkpoint()
        assert (one.seq, one.hash) == (two.seq, two.hash)
        assert second.audit.verify(against=one).valid
    finally:
        first.close()
        second.close()


_ESCAPE = (
    "local NOW, ENTRIES = 0, {}\n"
    + ENTRY_LUA
    + "\nlocal out = {}\nfor i = 1, #ARGV do out[i] = jstr(ARGV[i]) end\nreturn out\n"
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",))), min_size=1, max_size=8))
def test_the_lua_json_escaper_is_pythons_encode_basestring(texts: list[str]) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        got = client.register_script(_ESCAPE)(keys=[], args=texts)
    finally:
        client.close()
    assert [g.decode() for g in got] == [json.encoder.encode_basestring(t) for t in texts]


def test_the_lua_json_escaper_on_every_control_character_and_edge() -> None:
    texts = [chr(c) for c in range(1, 0x80)] + ["", "/", "\u2028", "😀", "é" * 3, "\x00"]
    client = redis.Redis.from_url(REDIS_URL)
    try:
        got = client.register_script(_ESCAPE)(keys=[], args=texts)
    finally:
        client.close()
    assert [g.decode() for g in got] == [json.encoder.encode_basestring(t) for t in texts]
