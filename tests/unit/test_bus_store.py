"""The bus primitives of both stores, called directly (no engine): same semantics.

The SQLite store is also run from several processes sharing one file: each
message goes to exactly one consumer of a group, and a consumer that dies
holding deliveries has them redelivered to another after the visibility
timeout.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import run_spawned

from klockwork.core.bus.model import decode_payload
from klockwork.core.errors import InvalidRequestError, StoreUnavailableError
from klockwork.core.stores.base import Store
from klockwork.core.stores.bus_base import GroupSpec, PublishItem, Retention, StoredMessage
from klockwork.core.stores.memory import MemoryStore
from klockwork.core.stores.sqlite import SqliteStore

T0 = 1_700_000_000_000
BIG = Retention(1000, None)
SPEC = GroupSpec(30_000, 3, "earliest")


def big(_: str) -> Retention:
    return BIG


def item(channel: str, n: int, key: str | None = None, visible_at: int = 0) -> PublishItem:
    return PublishItem(channel, json.dumps({"n": n}).encode(), key, visible_at)


def publish(store: Store, channel: str, n: int, now: int = T0) -> list[StoredMessage]:
    return store.bus_publish([item(channel, i) for i in range(n)], now, big)


def read(
    store: Store,
    consumer: str = "c1",
    *,
    now: int = T0,
    count: int = 10,
    spec: GroupSpec = SPEC,
    channel: str = "a",
    group: str = "g",
) -> list[tuple[StoredMessage, int]]:
    return store.bus_read(channel, group, consumer, count, now, spec, big).deliveries


def payloads(msgs: list[StoredMessage]) -> list[Any]:
    return [decode_payload(m.payload)["n"] for m in msgs]


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "kw.db")
    yield s
    s.close()


# -- publishing -----------------------------------------------------------------------------
def test_publish_numbers_each_channel_from_one_in_order(store: Store) -> None:
    out = store.bus_publish([item("a", 0), item("b", 0), item("a", 1), item("a", 2)], T0, big)
    assert [(m.channel, m.seq) for m in out] == [("a", 1), ("b", 1), ("a", 2), ("a", 3)]
    assert len({m.id for m in out}) == 4
    assert all(m.published_at == T0 == m.visible_at for m in out)
    assert store.bus_range("a", 0, 10, T0) == [out[0], out[2], out[3]]
    assert store.bus_range("a", 1, 1, T0) == [out[2]]
    assert store.bus_last_seqs(["a", "b", "nowhere"]) == {"a": 3, "b": 1, "nowhere": 0}
    assert store.bus_range("nowhere", 0, 10, T0) == []


def test_a_key_already_held_returns_the_original_message(store: Store) -> None:
    (first,) = store.bus_publish([item("a", 1, key="k")], T0, big)
    again = store.bus_publish([item("a", 2, key="k"), item("a", 3, key="j")], T0 + 5, big)
    assert again[0] == first  # same id, seq, payload and time
    assert again[1].seq == 2
    twice = store.bus_publish([item("a", 4, key="x"), item("a", 5, key="x")], T0, big)
    assert twice[0] == twice[1] and twice[0].seq == 3
    (other,) = store.bus_publish([item("b", 6, key="k")], T0, big)  # keys are per channel
    assert other.seq == 1 and other.id != first.id
    assert store.bus_last_seqs(["a"]) == {"a": 3}
    assert payloads(store.bus_range("a", 0, 10, T0 + 5)) == [1, 3, 4]


def test_a_publish_that_fails_stores_nothing(store: Store) -> None:

    def failing(name: str) -> Retention:
        if name == "b":
            raise RuntimeError("no retention for b")
        return BIG

    with pytest.raises(RuntimeError):
        store.bus_publish([item("a", 1), item("b", 2), item("a", 3)], T0, failing)
    assert store.bus_last_seqs(["a", "b"]) == {"a": 0, "b": 0}
    assert store.bus_range("a", 0, 10, T0) == []


def test_sqlite_a_publish_failing_in_the_database_stores_nothing(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "kw.db")
    unstorable = PublishItem("b", object(), None, 0)  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailableError):
        store.bus_publish([item("a", 1), unstorable, item("a", 3)], T0, big)
    assert store.bus_last_seqs(["a", "b"]) == {"a": 0, "b": 0}
    assert store.bus_range("a", 0, 10, T0) == []
    assert publish(store, "a", 1)[0].seq == 1
    store.close()


# -- groups ---------------------------------------------------------------------------
def test_a_group_starts_at_new_or_earliest(store: Store) -> None:
    publish(store, "a", 2)
    info, created = store.bus_create_group("a", "n", GroupSpec(5000, 2, "new"), T0)
    assert created and (info.channel, info.group, info.visibility_timeout_s) == ("a", "n", 5.0)
    assert (info.max_deliveries, info.created_at, info.pending, info.lag) == (2, T0, 0, 0)
    info, created = store.bus_create_group("a", "e", GroupSpec(5000, 2, "earliest"), T0)
    assert created and info.lag == 2
    again, created = store.bus_create_group("a", "n", GroupSpec(9000, 7, "earliest"), T0 + 1)
    assert not created and again.visibility_timeout_s == 5.0 and again.created_at == T0
    publish(store, "a", 1)
    assert [(m.seq, a) for m, a in read(store, group="n")] == [(3, 1)]
    assert [m.seq for m, _ in read(store, group="e")] == [1, 2, 3]
    # A read creates its group with the spec it is given.
    assert [m.seq for m, _ in read(store, group="late", spec=GroupSpec(1, 1, "new"))] == []
    assert [g.group for g in store.bus_groups("a", T0)] == ["e", "late", "n"]


def test_each_delivery_goes_to_one_consumer_and_every_group_sees_every_message(
    store: Store,
) -> None:
    sent = publish(store, "a", 10)
    seen: dict[str, list[int]] = {"c1": [], "c2": []}
    while True:
        got = [(c, m.seq) for c in ("c1", "c2") for m, _ in read(store, c, count=3)]
        if not got:
            break
        for c, seq in got:
            seen[c].append(seq)
    assert sorted(seen["c1"] + seen["c2"]) == [m.seq for m in sent]
    assert seen["c1"] and seen["c2"]
    assert [m for m, _ in read(store, group="other", count=100)] == sent


# -- redelivery, dead letters, nack -----------------------------------------------------
def test_a_delivery_not_acked_in_time_is_redelivered(store: Store) -> None:
    spec = GroupSpec(1000, 5, "earliest")
    (msg,) = publish(store, "a", 1)
    assert read(store, "c1", spec=spec) == [(msg, 1)]
    late = store.bus_read("a", "g", "c2", 10, T0 + 999, spec, big)
    assert late.deliveries == [] and late.next_due_ms == T0 + 1000
    assert read(store, "c2", now=T0 + 1000, spec=spec) == [(msg, 2)]
    assert store.bus_ack("a", "g", [msg.id, "unknown-id"]) == 1
    assert store.bus_ack("a", "g", [msg.id]) == 0
    assert read(store, "c3", now=T0 + 10_000, spec=spec) == []
    (info,) = store.bus_groups("a", T0 + 10_000)
    assert (info.pending, info.lag) == (0, 0)


def test_an_ack_needs_the_exact_id(store: Store) -> None:
    (msg,) = publish(store, "a", 1)
    (other,) = publish(store, "b", 1)  # same seq on another channel
    read(store)
    forged = [f"{msg.seq:x}-{'0' * 32}", f"0x{msg.id}", f" {msg.id}", msg.id + "0", other.id]
    forged += ["", "-", "1-", "zz-1", "f" * 40 + "-1", msg.id.partition("-")[2]]
    assert store.bus_ack("a", "g", forged) == 0
    assert store.bus_nack("a", "g", forged, T0, "x", undo=True) == 0
    assert store.bus_ack("a", "g", [msg.id, msg.id]) == 1


def test_a_message_out_of_attempts_becomes_a_dead_letter(store: Store) -> None:
    spec = GroupSpec(1000, 2, "earliest")
    (msg,) = publish(store, "a", 1)
    store.bus_publish([item("a.dead", 99)], T0, big)  # the dead channel is an ordinary one
    assert read(store, "c1", spec=spec) == [(msg, 1)]
    assert read(store, "c2", now=T0 + 1000, spec=spec) == [(msg, 2)]
    assert read(store, "c3", now=T0 + 2000, spec=spec) == []
    dead = store.bus_range("a.dead", 1, 10, T0 + 2000)
    assert len(dead) == 1 and dead[0].seq == 2 and dead[0].published_at == T0 + 2000
    assert decode_payload(dead[0].payload) == {
        "message": {
            "id": msg.id,
            "channel": "a",
            "seq": 1,
            "payload": {"n": 0},
            "published_at": T0,
            "visible_at": T0,
        },
        "group": "g",
        "attempts": 2,
        "last_consumer": "c2",
        "last_error": None,
    }
    (info,) = store.bus_groups("a", T0 + 2000)
    assert (info.pending, info.lag) == (0, 0)
    assert read(store, "c3", now=T0 + 9000, spec=spec) == []
    assert store.bus_last_seqs(["a.dead"]) == {"a.dead": 2}
    # Another group gives up on it too: its own dead letter.
    for t in (0, 1000, 2000):
        read(store, now=T0 + t, spec=spec, group="h")
    assert [
        decode_payload(m.payload)["group"] for m in store.bus_range("a.dead", 1, 9, T0 + 2000)
    ] == [
        "g",
        "h",
    ]


def test_a_nack_hands_back_at_once_and_its_error_reaches_the_dead_letter(store: Store) -> None:
    spec = GroupSpec(30_000, 2, "earliest")
    (msg,) = publish(store, "a", 1)
    read(store, "c1", spec=spec)
    assert store.bus_nack("a", "g", [msg.id, "unknown-id"], T0 + 1, "boom", undo=False) == 1
    assert read(store, "c2", now=T0 + 1, spec=spec) == [(msg, 2)]
    assert store.bus_nack("a", "g", [msg.id], T0 + 2, None, undo=False) == 1  # keeps "boom"
    assert read(store, "c3", now=T0 + 2, spec=spec) == []
    (dead,) = store.bus_range("a.dead", 0, 10, T0 + 2)
    letter = decode_payload(dead.payload)
    assert (letter["attempts"], letter["last_consumer"], letter["last_error"]) == (2, "c2", "boom")
    assert store.bus_nack("a", "g", [msg.id], T0 + 3, "x", undo=False) == 0


def test_a_nack_with_undo_takes_the_attempt_back(store: Store) -> None:
    spec = GroupSpec(30_000, 1, "earliest")
    (msg,) = publish(store, "a", 1)
    assert read(store, spec=spec) == [(msg, 1)]
    assert store.bus_nack("a", "g", [msg.id], T0, None, undo=True) == 1
    assert read(store, "c2", spec=spec) == [(msg, 1)]  # not dead: it was never seen
    assert store.bus_range("a.dead", 0, 10, T0) == []


def test_ack_and_nack_name_an_unknown_group(store: Store) -> None:
    (msg,) = publish(store, "a", 1)
    for call in (
        lambda: store.bus_ack("a", "nope", [msg.id]),
        lambda: store.bus_nack("a", "nope", [msg.id], T0, None, undo=False),
        lambda: store.bus_ack("nowhere", "g", [msg.id]),
    ):
        with pytest.raises(InvalidRequestError) as err:
            call()
        assert err.value.argument == "group"


# -- delayed messages ------------------------------------------------------------------
def test_a_delayed_message_waits_without_holding_back_later_ones(store: Store) -> None:
    later, now = store.bus_publish([item("a", 0, visible_at=T0 + 500), item("a", 1)], T0, big)
    assert later.visible_at == T0 + 500 and now.visible_at == T0
    assert store.bus_range("a", 0, 10, T0) == [now]
    assert [g.lag for g in store.bus_groups("a", T0)] == []
    store.bus_create_group("a", "g", SPEC, T0)
    assert [g.lag for g in store.bus_groups("a", T0)] == [1]
    out = store.bus_read("a", "g", "c1", 10, T0, SPEC, big)
    assert out.deliveries == [(now, 1)] and out.next_due_ms == T0 + 500
    out = store.bus_read("a", "g", "c1", 10, T0 + 1, SPEC, big)
    assert out.deliveries == [] and out.next_due_ms == T0 + 500
    store.bus_ack("a", "g", [now.id])
    assert [g.lag for g in store.bus_groups("a", T0 + 500)] == [1]
    out = store.bus_read("a", "g", "c1", 10, T0 + 500, SPEC, big)
    assert (
        out.deliveries == [(later, 1)] and out.next_due_ms == T0 + 500 + SPEC.visibility_timeout_ms
    )
    assert read(store, now=T0 + 501) == []  # the acked later one is not handed out again
    assert store.bus_range("a", 0, 10, T0 + 500) == [later, now]


def test_nothing_due_gives_no_next_due(store: Store) -> None:
    out = store.bus_read("a", "g", "c1", 10, T0, SPEC, big)
    assert (out.deliveries, out.next_due_ms, list(out.dead)) == ([], None, [])


def test_a_read_asks_for_count_and_keeps_the_rest(store: Store) -> None:
    sent = publish(store, "a", 5)
    assert [m for m, _ in read(store, count=2)] == sent[:2]
    (info,) = store.bus_groups("a", T0)
    assert (info.pending, info.lag) == (2, 3)
    store.bus_ack("a", "g", [sent[0].id])
    (info,) = store.bus_groups("a", T0)
    assert (info.pending, info.lag) == (1, 3)
    assert [m for m, _ in read(store, count=10)] == sent[2:]


# -- retention ----------------------------------------------------------------------------
def test_retention_by_length_trims_the_oldest_and_forgets_their_keys(store: Store) -> None:
    three = Retention(3, None)
    store.bus_create_group("a", "g", SPEC, T0)
    (keyed,) = store.bus_publish([item("a", 0, key="k")], T0, lambda _: three)
    read(store, count=1)  # keyed is pending in g
    store.bus_publish([item("a", i) for i in (1, 2, 3)], T0, lambda _: three)
    assert payloads(store.bus_range("a", 0, 10, T0)) == [1, 2, 3]
    (info,) = store.bus_groups("a", T0)
    assert (info.pending, info.lag) == (0, 3)  # its delivery went with it
    assert store.bus_ack("a", "g", [keyed.id]) == 0
    (again,) = store.bus_publish([item("a", 4, key="k")], T0, lambda _: three)
    assert again.seq == 5 and again.id != keyed.id
    (ch,) = store.bus_channels(lambda _: three)
    assert (ch.channel, ch.last_seq, ch.length, ch.groups, ch.max_len) == ("a", 5, 3, ("g",), 3)
    assert [m.seq for m, _ in read(store)] == [3, 4, 5]


def test_retention_by_age_and_a_channels_own_retention(store: Store) -> None:
    aged = Retention(100, 1000)
    store.bus_publish([item("a", 0), item("a", 1)], T0, lambda _: aged)
    store.bus_publish([item("a", 2)], T0 + 500, lambda _: aged)
    store.bus_publish([item("a", 3)], T0 + 1200, lambda _: aged)
    assert payloads(store.bus_range("a", 0, 10, T0 + 1200)) == [2, 3]
    store.bus_set_retention("a", Retention(1, None), T0 + 1200)
    assert payloads(store.bus_range("a", 0, 10, T0 + 1200)) == [3]
    store.bus_publish([item("a", 4)], T0 + 1300, big)  # its own retention wins
    assert payloads(store.bus_range("a", 0, 10, T0 + 1300)) == [4]
    store.bus_publish([item("b", 5)], T0, big)
    store.bus_set_retention("b", Retention(7, 60_000), T0 + 60_001)  # trims at once, to empty
    chans = store.bus_channels(big)
    assert [(c.channel, c.last_seq, c.length, c.max_len, c.max_age_s) for c in chans] == [
        ("a", 5, 1, 1, None),
        ("b", 1, 0, 7, 60.0),
    ]


def test_an_empty_channel_can_get_an_age_retention(store: Store) -> None:
    store.bus_set_retention("fresh", Retention(7, 60_000), T0)
    (chan,) = store.bus_channels(big)
    assert (chan.channel, chan.last_seq, chan.length, chan.max_len) == ("fresh", 0, 0, 7)
    assert publish(store, "fresh", 1)[0].seq == 1


def test_group_stats_across_channels(store: Store) -> None:
    publish(store, "b", 2)
    publish(store, "a", 3)
    read(store, channel="b", group="y", count=1)
    read(store, channel="a", group="x", count=1)
    read(store, channel="a", group="w", count=3)
    stats = [(g.channel, g.group, g.pending, g.lag) for g in store.bus_groups(None, T0)]
    assert stats == [("a", "w", 3, 0), ("a", "x", 1, 2), ("b", "y", 1, 1)]
    assert store.bus_groups("nowhere", T0) == []


# -- failing closed, polling ----------------------------------------------------------------
def test_a_closed_store_answers_nothing(store: Store) -> None:
    (msg,) = publish(store, "a", 1)
    store.close()
    calls = [
        lambda: publish(store, "a", 1),
        lambda: store.bus_set_retention("a", BIG, T0),
        lambda: store.bus_create_group("a", "g", SPEC, T0),
        lambda: read(store),
        lambda: store.bus_ack("a", "g", [msg.id]),
        lambda: store.bus_nack("a", "g", [msg.id], T0, None, undo=False),
        lambda: store.bus_range("a", 0, 10, T0),
        lambda: store.bus_last_seqs(["a"]),
        lambda: store.bus_groups(None, T0),
        lambda: store.bus_channels(big),
    ]
    if isinstance(store, SqliteStore):
        calls.append(store.bus_version)
    for call in calls:
        with pytest.raises(StoreUnavailableError):
            call()


def test_sqlite_bus_version_moves_when_another_store_commits(tmp_path: Path) -> None:
    watcher, other = SqliteStore(tmp_path / "kw.db"), SqliteStore(tmp_path / "kw.db")
    try:
        before = watcher.bus_version()
        assert watcher.bus_version() == before
        other.bus_publish([item("a", 1)], T0, big)
        moved = watcher.bus_version()
        assert moved != before
        assert watcher.bus_version() == moved
        watcher.bus_publish([item("a", 2)], T0, big)  # its own writes count too
        assert watcher.bus_version() != moved
    finally:
        watcher.close()
        other.close()


# -- several processes on one file --------------------------------------------------------
MESSAGES = 1000
SHARED = GroupSpec(30_000, 3, "earliest")


def _consume(path: str, out: str, start: Any) -> None:
    """Child: two threads consume (and ack) ``jobs`` through group ``workers`` until it is empty."""
    store = SqliteStore(path)
    got: list[tuple[str, int, int]] = []
    lock = threading.Lock()

    def loop(name: str) -> None:
        while True:
            now = int(time.time() * 1000)
            batch = store.bus_read("jobs", "workers", name, 10, now, SHARED, big).deliveries
            if batch:
                acked = store.bus_ack("jobs", "workers", [m.id for m, _ in batch])
                with lock:
                    got.extend((m.id, attempt, acked) for m, attempt in batch)
                continue
            (info,) = store.bus_groups("jobs", now)
            if info.pending == 0 and info.lag == 0:
                return
            time.sleep(0.002)

    start.wait(60)
    Path(out + ".ready").touch()  # start together: both processes are up, store open
    deadline = time.monotonic() + 60
    while len(list(Path(out).parent.glob("*.ready"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    threads = [threading.Thread(target=loop, args=(f"{out}-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    Path(out).write_text(json.dumps(got))


def _grab_and_hang(path: str, out: str, ready: Any) -> None:
    """Child: take deliveries without acking them, say so, then hang until killed."""
    store = SqliteStore(path)
    spec = GroupSpec(60_000, 3, "earliest")
    now = int(time.time() * 1000)
    batch = store.bus_read("jobs2", "w2", "doomed", 5, now, spec, big).deliveries
    Path(out).write_text(json.dumps([[m.id for m, _ in batch], now]))
    ready.set()
    time.sleep(120)


@pytest.mark.slow
def test_processes_share_a_group_and_a_dead_consumers_work_comes_back(tmp_path: Path) -> None:
    path = str(tmp_path / "kw.db")
    store = SqliteStore(path)
    store.bus_create_group("jobs", "workers", SHARED, T0)
    sent = [
        m.id
        for i in range(0, MESSAGES, 100)
        for m in store.bus_publish([item("jobs", i + j) for j in range(100)], T0, big)
    ]
    # The consumer that will die starts now, so that its start-up overlaps the others'.
    doomed = store.bus_publish([item("jobs2", i) for i in range(8)], T0, big)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    out = str(tmp_path / "doomed.json")
    child = ctx.Process(target=_grab_and_hang, args=(path, out, ready))
    child.start()
    try:
        outs = [str(tmp_path / f"p{i}.json") for i in range(2)]
        run_spawned(_consume, [(path, out) for out in outs], timeout_s=60)
        got = [tuple(r) for out in outs for r in json.loads(Path(out).read_text())]
        ids = [r[0] for r in got]
        assert sorted(ids) == sorted(sent)  # every message once: none lost, none twice
        assert {r[1] for r in got} == {1}  # never redelivered
        assert sum(r[2] for r in got) >= MESSAGES  # (summed per batch: each batch fully acked)
        (info,) = store.bus_groups("jobs", int(time.time() * 1000))
        assert (info.pending, info.lag) == (0, 0)
        assert ready.wait(60)
    finally:
        child.kill()  # dies holding its deliveries, never acked
        child.join()

    # Another consumer gets them once their visibility timeout has run out.
    taken, then = json.loads(Path(out).read_text())
    assert taken == [m.id for m in doomed[:5]]
    spec = GroupSpec(1, 9, "new")  # the group's own spec (from its creation) applies
    first = store.bus_read("jobs2", "w2", "rescuer", 10, then + 1, spec, big)
    assert [(m.id, a) for m, a in first.deliveries] == [(m.id, 1) for m in doomed[5:]]
    assert first.next_due_ms == then + 60_000
    assert store.bus_ack("jobs2", "w2", [m.id for m, _ in first.deliveries]) == 3
    assert store.bus_read("jobs2", "w2", "rescuer", 10, then + 59_999, spec, big).deliveries == []
    later = store.bus_read("jobs2", "w2", "rescuer", 10, then + 60_000, spec, big)
    assert [(m.id, a) for m, a in later.deliveries] == [(i, 2) for i in taken]
    assert store.bus_ack("jobs2", "w2", taken) == 5
    store.close()
