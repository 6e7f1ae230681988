"""Hypothesis state machine: one bus channel against a small reference model.

The model is written from DESIGN "Event bus" and the store contract
(:mod:`klockwork.core.stores.bus_base`) and shares no code with
:mod:`klockwork.core.bus.rules`: a list of messages, and per consumer group
its pending deliveries (attempt, consumer, deadline, last error), what it
acked and what it gave up on. One channel, two groups with different
visibility timeouts and delivery limits, three consumers; the rules publish
(with an idempotency key, with a delay), subscribe, ack, nack and move the
manual clock past visibility timeouts. Every answer of the engine must match
the model's, and after every step the channel, the groups' counts and the
dead letters must be what the model says. Runs on the memory store and
(fewer examples, a fresh file or Redis namespace each) on SQLite and Redis
(``KLOCKWORK_TEST_REDIS_URL``), through the sync API.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from klockwork import Delivery, Klockwork, ManualClock, MemoryStore, SqliteStore, Store
from klockwork.core.stores.bus_base import BusPrimitives

CHANNEL = "jobs"
DEAD = CHANNEL + ".dead"
T0 = 1_000_000
#: group -> (visibility timeout ms, max deliveries)
GROUPS = {"g1": (1000, 3), "g2": (2500, 2)}
CONSUMERS = ("c0", "c1", "c2")
KEYS = (None, None, "k0", "k1", "k2")
DELAYS = (None, None, 0, 700, 3000)


REDIS_URL = os.environ.get("KLOCKWORK_TEST_REDIS_URL", "")


def store_has_bus(store_kind: str) -> bool:
    if store_kind == "redis":
        from klockwork.core.stores.redis.bus import RedisBus

        return RedisBus.bus_publish is not BusPrimitives.bus_publish
    cls = MemoryStore if store_kind == "memory" else SqliteStore
    return cls.bus_publish is not BusPrimitives.bus_publish


def _redis_store(namespace: str) -> Store:
    from klockwork import RedisStore

    sep = "&" if "?" in REDIS_URL else "?"
    return RedisStore(f"{REDIS_URL}{sep}namespace={namespace}", server_time=False)


def _drop_namespace(namespace: str) -> None:
    """SCAN + UNLINK the namespace's keys (never FLUSHDB: the database is shared)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{{{namespace}}}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.unlink(*keys[i : i + 500])
    finally:
        client.close()


@dataclass
class ModelMessage:
    seq: int
    id: str
    payload: dict[str, Any]
    published_at: int
    visible_at: int


@dataclass
class ModelPending:
    attempt: int
    consumer: str
    deadline: int
    last_error: str | None = None


@dataclass
class ModelGroup:
    visibility_ms: int
    max_deliveries: int
    handed_out: set[int] = field(default_factory=set)  # seqs ever delivered
    pending: dict[int, ModelPending] = field(default_factory=dict)
    acked: set[int] = field(default_factory=set)
    dead: set[int] = field(default_factory=set)


class BusMachine(RuleBasedStateMachine):
    """Subclassed per store (see :func:`_machine`)."""

    store_kind = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="kw-bus-stateful-")
        self.namespace = f"t-{uuid.uuid4().hex}"
        store: Store
        if self.store_kind == "redis":
            store = _redis_store(self.namespace)
        elif self.store_kind == "sqlite":
            store = SqliteStore(Path(self.tmp) / "b.db")
        else:
            store = MemoryStore()
        self.clock = ManualClock(start_ms=T0)
        self.kw = Klockwork(store, clock=self.clock)
        self.bus = self.kw.bus
        self.messages: list[ModelMessage] = []
        self.keys: dict[str, int] = {}
        self.groups: dict[str, ModelGroup] = {}
        for name, (visibility_ms, max_deliveries) in GROUPS.items():
            self.bus.create_group(
                CHANNEL, name, visibility_ms / 1000, max_deliveries, start="earliest"
            )
            self.groups[name] = ModelGroup(visibility_ms, max_deliveries)
        #: (group, seq, attempts, last consumer, last error) of each dead letter, in order.
        self.dead_letters: list[tuple[str, int, int, str, str | None]] = []
        self.counter = 0

    def teardown(self) -> None:
        self.kw.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.store_kind == "redis":
            _drop_namespace(self.namespace)

    @property
    def now(self) -> int:
        return self.clock.now_ms()

    def by_seq(self, seq: int) -> ModelMessage:
        return self.messages[seq - 1]

    def visible(self) -> list[ModelMessage]:
        return [m for m in self.messages if m.visible_at <= self.now]

    # -- rules ----------------------------------------------------------------------------
    @rule(key=st.sampled_from(KEYS), delay=st.sampled_from(DELAYS))
    def publish(self, key: str | None, delay: int | None) -> None:
        self.counter += 1
        payload = {"n": self.counter}
        deliver_at = None if delay is None else self.now + delay
        msg = self.bus.publish(CHANNEL, payload, deliver_at=deliver_at, key=key)
        if key is not None and key in self.keys:
            original = self.by_seq(self.keys[key])
            assert (msg.id, msg.seq, msg.payload) == (original.id, original.seq, original.payload)
            return
        seq = len(self.messages) + 1
        visible_at = self.now if deliver_at is None else max(deliver_at, self.now)
        assert (msg.seq, msg.payload, msg.published_at) == (seq, payload, self.now)
        assert msg.visible_at == visible_at
        assert msg.id not in {m.id for m in self.messages}
        self.messages.append(ModelMessage(seq, msg.id, payload, self.now, visible_at))
        if key is not None:
            self.keys[key] = seq

    @rule(
        group=st.sampled_from(sorted(GROUPS)),
        consumer=st.sampled_from(CONSUMERS),
        count=st.integers(min_value=1, max_value=4),
    )
    def subscribe(self, group: str, consumer: str, count: int) -> None:
        g = self.groups[group]
        expected: list[tuple[int, int]] = []
        for seq in sorted(g.pending):  # timed-out deliveries first, oldest first
            p = g.pending[seq]
            if p.deadline > self.now:
                continue
            if p.attempt >= g.max_deliveries:  # used its last attempt: a dead letter
                del g.pending[seq]
                g.dead.add(seq)
                self.dead_letters.append((group, seq, p.attempt, p.consumer, p.last_error))
            elif len(expected) < count:
                expected.append((seq, p.attempt + 1))
        fresh = [
            m.seq for m in self.messages if m.seq not in g.handed_out and m.visible_at <= self.now
        ][: count - len(expected)]
        expected += [(seq, 1) for seq in fresh]

        got = self.bus.subscribe(CHANNEL, group, consumer, count)
        assert [(d.message.seq, d.attempt) for d in got] == expected
        for d in got:
            self.check_delivery(d, group, consumer)
            seq = d.message.seq
            assert seq not in g.acked and seq not in g.dead  # never after ack or burial
            p = g.pending.get(seq)
            deadline = self.now + g.visibility_ms
            if p is None:
                g.pending[seq] = ModelPending(1, consumer, deadline)
                g.handed_out.add(seq)
            else:  # the one pending delivery moves to this consumer
                p.attempt, p.consumer, p.deadline = d.attempt, consumer, deadline

    def check_delivery(self, d: Delivery, group: str, consumer: str) -> None:
        m = self.by_seq(d.message.seq)  # every delivered message exists, as published
        assert (d.message.id, d.message.channel, d.message.payload) == (m.id, CHANNEL, m.payload)
        assert (d.message.published_at, d.message.visible_at) == (m.published_at, m.visible_at)
        assert m.visible_at <= self.now
        assert (d.consumer, d.group, d.delivered_at) == (consumer, group, self.now)

    def _choose(self, data: st.DataObject, group: str) -> list[int]:
        g = self.groups[group]
        if not g.handed_out:
            return []
        return data.draw(st.lists(st.sampled_from(sorted(g.handed_out)), max_size=3, unique=True))

    @rule(group=st.sampled_from(sorted(GROUPS)), data=st.data())
    def ack(self, group: str, data: st.DataObject) -> None:
        g = self.groups[group]
        seqs = self._choose(data, group)
        done = [s for s in seqs if s in g.pending]
        ids = [self.by_seq(s).id for s in seqs]
        assert self.bus.ack(CHANNEL, group, ids) == len(done)
        for seq in done:
            del g.pending[seq]
            g.acked.add(seq)

    @rule(
        group=st.sampled_from(sorted(GROUPS)),
        data=st.data(),
        error=st.sampled_from([None, "boom", "bad input"]),
    )
    def nack(self, group: str, data: st.DataObject, error: str | None) -> None:
        g = self.groups[group]
        seqs = self._choose(data, group)
        done = [s for s in seqs if s in g.pending]
        ids = [self.by_seq(s).id for s in seqs]
        assert self.bus.nack(CHANNEL, group, ids, error) == len(done)
        for seq in done:
            p = g.pending[seq]
            p.deadline = self.now
            if error is not None:
                p.last_error = error

    @rule(ms=st.sampled_from([1, 300, 999, 1000, 1500, 2500, 4000]))
    def advance(self, ms: int) -> None:
        self.clock.advance(ms)

    # -- invariants -------------------------------------------------------------------------
    @invariant()
    def channel_is_in_seq_order(self) -> None:
        peeked = self.bus.peek(CHANNEL, limit=1000)
        assert [m.seq for m in peeked] == [m.seq for m in self.visible()]
        assert [m.id for m in peeked] == [m.id for m in self.visible()]
        assert all(a.seq < b.seq for a, b in itertools.pairwise(peeked))

    @invariant()
    def group_counts_match(self) -> None:
        infos = {g.group: g for g in self.bus.groups(CHANNEL)}
        assert sorted(infos) == sorted(GROUPS)
        for name, g in self.groups.items():
            lag = sum(1 for m in self.visible() if m.seq not in g.handed_out)
            assert (infos[name].pending, infos[name].lag) == (len(g.pending), lag), name

    @invariant()
    def one_fate_per_message_and_group(self) -> None:
        for g in self.groups.values():
            # pending (for exactly one consumer), acked or dead: never two of these
            assert not (g.acked & g.dead)
            assert not (set(g.pending) & (g.acked | g.dead))
            assert set(g.pending) | g.acked | g.dead == g.handed_out
            assert all(1 <= p.attempt <= g.max_deliveries for p in g.pending.values())

    @invariant()
    def dead_letters_match(self) -> None:
        dead = self.bus.peek(DEAD, limit=1000)
        assert [m.seq for m in dead] == list(range(1, len(dead) + 1))
        got = [
            (
                m.payload["group"],
                m.payload["message"]["seq"],
                m.payload["attempts"],
                m.payload["last_consumer"],
                m.payload["last_error"],
            )
            for m in dead
        ]
        assert got == self.dead_letters
        for m in dead:
            original = self.by_seq(m.payload["message"]["seq"])
            assert m.payload["message"] == {
                "id": original.id,
                "channel": CHANNEL,
                "seq": original.seq,
                "payload": original.payload,
                "published_at": original.published_at,
                "visible_at": original.visible_at,
            }


def _machine(store_kind: str) -> type[BusMachine]:
    return type(f"BusMachine_{store_kind}", (BusMachine,), {"store_kind": store_kind})


_COMMON: dict[str, Any] = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow],
}
SETTINGS = {
    "memory": settings(max_examples=150, stateful_step_count=50, **_COMMON),
    "sqlite": settings(max_examples=25, stateful_step_count=40, **_COMMON),
    "redis": settings(max_examples=25, stateful_step_count=40, **_COMMON),
}


@pytest.mark.parametrize("store_kind", ["memory", "sqlite", "redis"])
def test_bus_matches_the_reference_model(store_kind: str) -> None:
    if store_kind == "redis" and not REDIS_URL:
        pytest.skip("Redis tests need a server: set KLOCKWORK_TEST_REDIS_URL")
    if not store_has_bus(store_kind):
        pytest.skip(f"the {store_kind} store has no bus yet")
    run_state_machine_as_test(_machine(store_kind), settings=SETTINGS[store_kind])
