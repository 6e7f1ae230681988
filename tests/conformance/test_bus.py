"""The event bus (DESIGN "Event bus") on every store, through the sync and the async API.

Each test takes :class:`BusApi` (the ``bus_api`` fixture) and so runs on the
memory and the SQLite store, sync and async, on a :class:`ManualClock`
unless it needs real time (long polls, real consumer threads). A store
without the bus primitives yet is skipped, not failed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from klockwork import (
    AwaitResult,
    Bus,
    Delivery,
    InvalidRequestError,
    Klockwork,
    ManualClock,
    MemoryStore,
    Message,
    SqliteStore,
    StoreUnavailableError,
)
from klockwork.core.stores.bus_base import BusPrimitives

from .conftest import REAL_TIMEOUT_S, T0, eventually

EVENTS = "klockwork.events"


def store_has_bus(store_kind: str) -> bool:
    """Whether the store class implements the bus primitives (a new one may still lack them)."""
    if store_kind == "redis":
        from klockwork.core.stores.redis.bus import RedisBus

        return RedisBus.bus_publish is not BusPrimitives.bus_publish
    cls = MemoryStore if store_kind == "memory" else SqliteStore
    return cls.bus_publish is not BusPrimitives.bus_publish


@pytest.fixture(autouse=True)
def _store_has_bus(store_kind: str) -> None:
    if not store_has_bus(store_kind):
        pytest.skip(f"the {store_kind} store has no bus yet")


class BusApi:
    """``kw.bus`` once per flavour, as coroutines.

    ``sync`` calls the sync method (a blocking one, ``wait_s > 0``, on a
    worker thread, the way a sync agent would); ``async`` awaits its twin.
    """

    def __init__(self, kw: Klockwork, flavour: str, clock: ManualClock | None) -> None:
        self.kw = kw
        self.bus: Bus = kw.bus
        self.flavour = flavour
        self.is_async = flavour == "async"
        self._clock = clock

    def __repr__(self) -> str:
        return f"BusApi({self.flavour})"

    @property
    def clock(self) -> ManualClock:
        assert self._clock is not None, "this engine runs on real time"
        return self._clock

    async def publish(
        self, channel: Any, payload: Any, deliver_at: Any = None, key: Any = None
    ) -> Message:
        if self.is_async:
            return await self.bus.apublish(channel, payload, deliver_at, key)
        return self.bus.publish(channel, payload, deliver_at, key)

    async def broadcast(self, channels: Any, payload: Any) -> list[Message]:
        if self.is_async:
            return await self.bus.abroadcast(channels, payload)
        return self.bus.broadcast(channels, payload)

    async def create_group(self, channel: str, group: str, **kwargs: Any) -> Any:
        if self.is_async:
            return await self.bus.acreate_group(channel, group, **kwargs)
        return self.bus.create_group(channel, group, **kwargs)

    async def subscribe(
        self,
        channel: Any,
        group: Any,
        consumer: Any,
        max_messages: Any = 10,
        wait_s: Any = 0,
    ) -> list[Delivery]:
        if self.is_async:
            return await self.bus.asubscribe(channel, group, consumer, max_messages, wait_s)
        call = self.bus.subscribe
        if isinstance(wait_s, (int, float)) and wait_s > 0:
            return await asyncio.to_thread(call, channel, group, consumer, max_messages, wait_s)
        return call(channel, group, consumer, max_messages, wait_s)

    async def ack(self, channel: Any, group: Any, ids: Any) -> int:
        if self.is_async:
            return await self.bus.aack(channel, group, ids)
        return self.bus.ack(channel, group, ids)

    async def nack(self, channel: Any, group: Any, ids: Any, error: Any = None) -> int:
        if self.is_async:
            return await self.bus.anack(channel, group, ids, error)
        return self.bus.nack(channel, group, ids, error)

    async def peek(self, channel: Any, after_seq: Any = 0, limit: Any = 100) -> list[Message]:
        if self.is_async:
            return await self.bus.apeek(channel, after_seq, limit)
        return self.bus.peek(channel, after_seq, limit)

    async def await_channels(
        self,
        channels: Any,
        mode: Any = "any",
        n: Any = 1,
        group: Any = None,
        wait_s: Any = 0,
        **kwargs: Any,
    ) -> AwaitResult:
        if self.is_async:
            return await self.bus.aawait_channels(channels, mode, n, group, wait_s, **kwargs)
        call = self.bus.await_channels
        if isinstance(wait_s, (int, float)) and wait_s > 0:
            return await asyncio.to_thread(call, channels, mode, n, group, wait_s, **kwargs)
        return call(channels, mode, n, group, wait_s, **kwargs)

    async def until_sleeping(self, n: int = 1) -> None:
        """Wait until ``n`` waits are armed on the manual clock (``advance`` then reaches them)."""
        await eventually(lambda: self.clock.pending_timers >= n, f"{n} sleeper(s)")

    def pending(self, channel: str, group: str) -> int:
        [info] = [g for g in self.bus.groups(channel) if g.group == group]
        return info.pending


@pytest.fixture
async def bus_api(
    make_kw: Callable[..., Klockwork], clock: ManualClock, flavour: str
) -> AsyncIterator[BusApi]:
    """The bus of an engine on the parametrised store and a manual clock."""
    api = BusApi(make_kw(clock), flavour, clock)
    yield api
    api.kw.close()  # wakes whatever a failed test left waiting


@pytest.fixture
async def real_api(make_kw: Callable[..., Klockwork], flavour: str) -> AsyncIterator[BusApi]:
    """The bus of an engine on the parametrised store and real time."""
    api = BusApi(make_kw(None, db="real.db"), flavour, None)
    yield api
    api.kw.close()


def seqs(items: list[Message] | list[Delivery]) -> list[int]:
    return [m.message.seq if isinstance(m, Delivery) else m.seq for m in items]


def attempts(deliveries: list[Delivery]) -> list[tuple[int, int]]:
    return [(d.message.seq, d.attempt) for d in deliveries]


# -- publishing and ordering ---------------------------------------------------------------


async def test_publish_returns_the_message(bus_api: BusApi) -> None:
    msg = await bus_api.publish("orders", {"n": 1, "tags": ["a"], "x": None})
    assert (msg.channel, msg.seq, msg.payload) == ("orders", 1, {"n": 1, "tags": ["a"], "x": None})
    assert (msg.published_at, msg.visible_at) == (T0, T0)
    assert isinstance(msg.id, str) and msg.id
    [seen] = await bus_api.peek("orders")
    assert seen == msg


async def test_seq_increases_strictly_per_channel(bus_api: BusApi) -> None:
    published = []
    for i in range(12):
        published.append(await bus_api.publish("a", {"i": i}))
        if i % 3 == 0:
            await bus_api.publish("b", {"i": i})
    assert seqs(published) == list(range(1, 13))
    assert len({m.id for m in published}) == 12
    assert seqs(await bus_api.peek("b")) == [1, 2, 3, 4]  # each channel counts on its own
    assert [m.payload["i"] for m in await bus_api.peek("a")] == list(range(12))


async def test_subscribe_returns_messages_in_seq_order(bus_api: BusApi) -> None:
    await bus_api.create_group("a", "g", start="earliest")
    for i in range(10):
        await bus_api.publish("a", {"i": i})
    got = []
    for _ in range(3):
        got.append(seqs(await bus_api.subscribe("a", "g", "c", max_messages=4)))
    assert got == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert await bus_api.subscribe("a", "g", "c") == []


async def test_concurrent_publishers_get_distinct_increasing_seqs(real_api: BusApi) -> None:
    def publish_many(worker: int) -> list[tuple[int, str]]:
        return [
            (m.seq, m.id) for m in (real_api.bus.publish("c", {"w": worker}) for _ in range(50))
        ]

    loop = asyncio.get_running_loop()
    results = await asyncio.gather(*(loop.run_in_executor(None, publish_many, w) for w in range(4)))
    for per_thread in results:  # each publisher sees its own seqs increase
        assert [s for s, _ in per_thread] == sorted(s for s, _ in per_thread)
    every = [pair for per_thread in results for pair in per_thread]
    assert len({s for s, _ in every}) == len({i for _, i in every}) == 200
    peeked = await real_api.peek("c", limit=1000)
    assert seqs(peeked) == sorted(s for s, _ in every)
    assert seqs(peeked)[0] == 1


async def test_payload_is_a_fresh_copy_for_each_reader(bus_api: BusApi) -> None:
    await bus_api.create_group("a", "g", start="earliest")
    msg = await bus_api.publish("a", {"list": [1]})
    msg.payload["list"].append(2)
    [d] = await bus_api.subscribe("a", "g", "c")
    assert d.payload == {"list": [1]}
    d.payload["list"].append(3)
    assert (await bus_api.peek("a"))[0].payload == {"list": [1]}


# -- consumer groups ------------------------------------------------------------------------


async def test_a_new_group_starts_at_new_messages_unless_told_earliest(bus_api: BusApi) -> None:
    await bus_api.publish("a", {"i": 0})
    assert await bus_api.subscribe("a", "late", "c") == []  # created on first subscribe: "new"
    await bus_api.create_group("a", "all", start="earliest")
    assert seqs(await bus_api.subscribe("a", "all", "c")) == [1]
    await bus_api.publish("a", {"i": 1})
    assert seqs(await bus_api.subscribe("a", "late", "c")) == [2]


async def test_each_delivery_goes_to_one_consumer_of_a_group(bus_api: BusApi) -> None:
    await bus_api.create_group("a", "g", start="earliest")
    for i in range(6):
        await bus_api.publish("a", {"i": i})
    first = await bus_api.subscribe("a", "g", "c1", max_messages=4)
    second = await bus_api.subscribe("a", "g", "c2", max_messages=4)
    assert (seqs(first), seqs(second)) == ([1, 2, 3, 4], [5, 6])
    assert {d.consumer for d in first} == {"c1"} and {d.consumer for d in second} == {"c2"}
    assert {d.group for d in first + second} == {"g"}
    assert await bus_api.subscribe("a", "g", "c3") == []
    assert bus_api.pending("a", "g") == 6


async def test_every_group_sees_every_message(bus_api: BusApi) -> None:
    for group in ("g1", "g2", "g3"):
        await bus_api.create_group("a", group, start="earliest")
    published = [await bus_api.publish("a", {"i": i}) for i in range(30)]
    for group in ("g1", "g2", "g3"):
        got: list[Delivery] = []
        for consumer in ("x", "y", "z", "w"):
            got += await bus_api.subscribe("a", group, consumer, max_messages=8)
        assert [d.id for d in got] == [m.id for m in published]
        assert {d.attempt for d in got} == {1}
        assert await bus_api.ack("a", group, got) == 30
    assert [g.pending for g in bus_api.bus.groups("a")] == [0, 0, 0]


@pytest.mark.parametrize("group_count", [1, 2])
async def test_real_threads_each_message_to_exactly_one_consumer(
    real_api: BusApi, group_count: int
) -> None:
    """4 consumer threads per group, 500 messages published while they poll."""
    total = 500
    groups = [f"g{i}" for i in range(group_count)]
    for group in groups:
        await real_api.create_group("work", group, visibility_timeout_s=300, start="earliest")
    lock = threading.Lock()
    delivered: dict[str, list[tuple[str, int, str]]] = {g: [] for g in groups}
    acked: dict[str, int] = dict.fromkeys(groups, 0)
    ack_mismatch: list[tuple[int, int]] = []
    done = {g: threading.Event() for g in groups}
    deadline = time.monotonic() + 60

    def record(group: str, consumer: str, got: list[Delivery], n_acked: int) -> None:
        with lock:
            delivered[group] += [(d.id, d.attempt, consumer) for d in got]
            acked[group] += n_acked
            if n_acked != len(got):
                ack_mismatch.append((n_acked, len(got)))
            if acked[group] >= total:
                done[group].set()

    def consume_sync(group: str, consumer: str) -> None:
        bus = real_api.bus
        while not done[group].is_set() and time.monotonic() < deadline:
            got = bus.subscribe("work", group, consumer, max_messages=7, wait_s=0.05)
            record(group, consumer, got, bus.ack("work", group, got) if got else 0)

    def consume_async(group: str, consumer: str) -> None:
        bus = real_api.bus

        async def run() -> None:
            while not done[group].is_set() and time.monotonic() < deadline:
                got = await bus.asubscribe("work", group, consumer, max_messages=7, wait_s=0.05)
                record(group, consumer, got, await bus.aack("work", group, got) if got else 0)

        asyncio.run(run())

    consume = consume_async if real_api.is_async else consume_sync
    threads = [
        threading.Thread(target=consume, args=(g, f"c{i}"), daemon=True)
        for g in groups
        for i in range(4)
    ]
    for t in threads:
        t.start()

    def publish_all() -> list[str]:
        return [real_api.bus.publish("work", {"i": i}).id for i in range(total)]

    ids = await asyncio.to_thread(publish_all)
    for t in threads:
        await asyncio.to_thread(t.join, 70)
        assert not t.is_alive()
    for group in groups:
        got = delivered[group]
        assert sorted(i for i, _, _ in got) == sorted(ids), group  # each exactly once
        assert {a for _, a, _ in got} == {1}
        assert acked[group] == total
    assert ack_mismatch == []
    assert [(g.pending, g.lag) for g in real_api.bus.groups("work")] == [(0, 0)] * group_count


# -- redelivery and dead letters --------------------------------------------------------------


async def test_redelivery_after_the_visibility_timeout(bus_api: BusApi) -> None:
    await bus_api.create_group("a", "g", visibility_timeout_s=2, start="earliest")
    msg = await bus_api.publish("a", {"i": 0})
    [first] = await bus_api.subscribe("a", "g", "c1")
    assert (first.attempt, first.consumer, first.delivered_at) == (1, "c1", T0)
    assert await bus_api.subscribe("a", "g", "c2") == []
    bus_api.clock.advance(1999)
    assert await bus_api.subscribe("a", "g", "c2") == []
    bus_api.clock.advance(1)
    [second] = await bus_api.subscribe("a", "g", "c2")
    assert (second.id, second.attempt, second.consumer) == (msg.id, 2, "c2")
    assert second.delivered_at == T0 + 2000
    bus_api.clock.advance(2000)
    [third] = await bus_api.subscribe("a", "g", "c1")
    assert third.attempt == 3
    assert await bus_api.ack("a", "g", [third.id]) == 1
    bus_api.clock.advance(10_000)
    assert await bus_api.subscribe("a", "g", "c1") == []  # acked: never again
    assert await bus_api.ack("a", "g", [third.id]) == 0  # acking twice is harmless


async def test_redeliveries_come_first_then_new_messages(bus_api: BusApi) -> None:
    await bus_api.create_group("a", "g", visibility_timeout_s=1, start="earliest")
    for i in range(3):
        await bus_api.publish("a", {"i": i})
    assert seqs(await bus_api.subscribe("a", "g", "c", max_messages=2)) == [1, 2]
    bus_api.clock.advance(1000)
    got = await bus_api.subscribe("a", "g", "c", max_messages=2)
    assert attempts(got) == [(1, 2), (2, 2)]
    got = await bus_api.subscribe("a", "g", "c", max_messages=2)
    assert attempts(got) == [(3, 1)]


async def test_ack_accepts_ids_messages_and_deliveries(bus_api: BusApi) -> None:
    await bus_api.create_group("a", "g", start="earliest")
    for i in range(3):
        await bus_api.publish("a", {"i": i})
    d1, d2, d3 = await bus_api.subscribe("a", "g", "c")
    assert await bus_api.ack("a", "g", d1) == 1
    assert await bus_api.ack("a", "g", [d2.message, d3.id, "no-such-id"]) == 2
    assert bus_api.pending("a", "g") == 0


async def test_nack_redelivers_at_once(bus_api: BusApi) -> None:
    await bus_api.create_group("a", "g", visibility_timeout_s=30, start="earliest")
    msg = await bus_api.publish("a", {"i": 0})
    [first] = await bus_api.subscribe("a", "g", "c1")
    assert await bus_api.nack("a", "g", [first], error="boom") == 1
    [again] = await bus_api.subscribe("a", "g", "c2")  # no time passed
    assert (again.id, again.attempt, again.consumer) == (msg.id, 2, "c2")
    assert await bus_api.nack("a", "g", ["unknown"]) == 0
    assert await bus_api.ack("a", "g", [again]) == 1
    assert await bus_api.nack("a", "g", [again]) == 0  # not pending any more
    assert await bus_api.subscribe("a", "g", "c1") == []


async def test_dead_letter_after_max_deliveries(bus_api: BusApi) -> None:
    await bus_api.create_group(
        "jobs", "g", visibility_timeout_s=1, max_deliveries=3, start="earliest"
    )
    await bus_api.create_group("jobs", "other", start="earliest")
    msg = await bus_api.publish("jobs", {"task": "x"})
    after = await bus_api.publish("jobs", {"task": "y"})
    [d] = await bus_api.subscribe("jobs", "g", "c1", max_messages=1)
    assert await bus_api.nack("jobs", "g", [d], error="first") == 1
    [d] = await bus_api.subscribe("jobs", "g", "c2", max_messages=1)
    assert d.attempt == 2
    bus_api.clock.advance(1000)  # times out
    [d] = await bus_api.subscribe("jobs", "g", "c3", max_messages=1)
    assert (d.id, d.attempt) == (msg.id, 3)
    assert await bus_api.nack("jobs", "g", [d], error="last") == 1
    assert await bus_api.peek("jobs.dead") == []  # buried by the group's next read
    # The dead letter does not count against max_messages: the next message comes.
    [d] = await bus_api.subscribe("jobs", "g", "c1", max_messages=1)
    assert (d.id, d.attempt) == (after.id, 1)
    [dead] = await bus_api.peek("jobs.dead")
    assert dead.channel == "jobs.dead"
    assert dead.published_at == T0 + 1000
    assert dead.payload == {
        "message": {
            "id": msg.id,
            "channel": "jobs",
            "seq": 1,
            "payload": {"task": "x"},
            "published_at": T0,
            "visible_at": T0,
        },
        "group": "g",
        "attempts": 3,
        "last_consumer": "c3",
        "last_error": "last",
    }
    assert bus_api.pending("jobs", "g") == 1  # only "y"
    bus_api.clock.advance(10_000)
    assert attempts(await bus_api.subscribe("jobs", "g", "c1")) == [(2, 2)]  # never "x" again
    assert len(await bus_api.peek("jobs.dead")) == 1
    # Another group is not affected by g giving up.
    assert seqs(await bus_api.subscribe("jobs", "other", "c")) == [1, 2]


async def test_dead_letter_after_timeouts_only(bus_api: BusApi) -> None:
    await bus_api.create_group("a", "g", visibility_timeout_s=1, max_deliveries=2, start="earliest")
    await bus_api.create_group("a.dead", "ops", start="earliest")
    msg = await bus_api.publish("a", {"i": 0})
    await bus_api.subscribe("a", "g", "c1")
    bus_api.clock.advance(1000)
    await bus_api.subscribe("a", "g", "c2")
    bus_api.clock.advance(1000)
    assert await bus_api.subscribe("a", "g", "c3") == []
    [dead] = await bus_api.subscribe("a.dead", "ops", "op")  # a dead channel is a channel
    assert dead.payload["message"]["id"] == msg.id
    assert (dead.payload["attempts"], dead.payload["last_consumer"]) == (2, "c2")
    assert dead.payload["last_error"] is None
    assert bus_api.pending("a", "g") == 0


# -- delayed delivery, idempotent publish, peek ------------------------------------------------


async def test_deliver_at_epoch_ms_hides_the_message_until_then(bus_api: BusApi) -> None:
    await bus_api.create_group("a", "g", start="earliest")
    delayed = await bus_api.publish("a", {"i": "later"}, deliver_at=T0 + 5000)
    assert (delayed.published_at, delayed.visible_at) == (T0, T0 + 5000)
    now = await bus_api.publish("a", {"i": "now"})
    assert seqs(await bus_api.peek("a")) == [2]
    assert [d.id for d in await bus_api.subscribe("a", "g", "c")] == [now.id]  # passes it
    bus_api.clock.advance(4999)
    assert await bus_api.subscribe("a", "g", "c") == []
    assert seqs(await bus_api.peek("a")) == [2]
    bus_api.clock.advance(1)
    [d] = await bus_api.subscribe("a", "g", "c")
    assert (d.id, d.attempt) == (delayed.id, 1)
    assert seqs(await bus_api.peek("a")) == [1, 2]


@pytest.mark.parametrize("tz", [timezone.utc, timezone(timedelta(hours=5, minutes=30))])
async def test_deliver_at_aware_datetime(bus_api: BusApi, tz: timezone) -> None:
    when = datetime.fromtimestamp((T0 + 2000) / 1000, tz=tz)
    msg = await bus_api.publish("a", {"i": 0}, deliver_at=when)
    assert msg.visible_at == T0 + 2000
    assert await bus_api.peek("a") == []
    bus_api.clock.advance(2000)
    assert [m.id for m in await bus_api.peek("a")] == [msg.id]


async def test_deliver_at_naive_datetime_is_refused(bus_api: BusApi) -> None:
    naive = datetime(2030, 1, 1, 12, 0)
    with pytest.raises(InvalidRequestError) as info:
        await bus_api.publish("a", {"i": 0}, deliver_at=naive)
    assert info.value.argument == "deliver_at"
    assert bus_api.bus.channels() == []


async def test_deliver_at_in_the_past_is_visible_now(bus_api: BusApi) -> None:
    msg = await bus_api.publish("a", {"i": 0}, deliver_at=T0 - 5000)
    assert [m.id for m in await bus_api.peek("a")] == [msg.id]


async def test_a_waiting_subscriber_gets_a_delayed_message_when_it_is_due(
    bus_api: BusApi,
) -> None:
    await bus_api.create_group("a", "g", start="earliest")
    await bus_api.publish("a", {"i": 0}, deliver_at=T0 + 3000)
    waiter = asyncio.create_task(bus_api.subscribe("a", "g", "c", wait_s=60))
    await bus_api.until_sleeping()
    bus_api.clock.advance(3000)  # nothing published: the due time alone wakes it
    [d] = await asyncio.wait_for(waiter, REAL_TIMEOUT_S)
    assert d.message.seq == 1


async def test_idempotent_publish_with_a_key(bus_api: BusApi) -> None:
    await bus_api.create_group("a", "g", start="earliest")
    first = await bus_api.publish("a", {"v": 1}, key="order-7")
    bus_api.clock.advance(10)
    again = await bus_api.publish("a", {"v": 2}, key="order-7")
    assert again == first  # the original, payload and all
    other = await bus_api.publish("a", {"v": 3}, key="order-8")
    elsewhere = await bus_api.publish("b", {"v": 1}, key="order-7")  # keys are per channel
    assert (other.seq, elsewhere.seq) == (2, 1)
    assert seqs(await bus_api.peek("a")) == [1, 2]
    assert seqs(await bus_api.subscribe("a", "g", "c")) == [1, 2]
    assert await bus_api.publish("a", {"v": 4}, key="order-7") == first
    assert await bus_api.subscribe("a", "g", "c") == []


async def test_peek_replays_without_consuming(bus_api: BusApi) -> None:
    await bus_api.create_group("a", "g", start="earliest")
    for i in range(10):
        await bus_api.publish("a", {"i": i})
    assert seqs(await bus_api.peek("a")) == list(range(1, 11))
    assert seqs(await bus_api.peek("a", after_seq=7)) == [8, 9, 10]
    assert seqs(await bus_api.peek("a", after_seq=2, limit=3)) == [3, 4, 5]
    assert await bus_api.peek("a", after_seq=10) == []
    assert await bus_api.peek("never-published") == []
    assert bus_api.bus.groups("a")[0].lag == 10
    assert seqs(await bus_api.subscribe("a", "g", "c", max_messages=100)) == list(range(1, 11))


# -- await_channels --------------------------------------------------------------------------------


async def test_await_without_group_any(bus_api: BusApi) -> None:
    await bus_api.publish("a", {"old": True})  # before the call: not awaited
    waiter = asyncio.create_task(bus_api.await_channels(["a", "b"], "any", wait_s=30))
    await bus_api.until_sleeping()
    msg = await bus_api.publish("b", {"i": 1})
    result = await asyncio.wait_for(waiter, REAL_TIMEOUT_S)
    assert (result.satisfied, result.timed_out) == (True, False)
    assert result.messages == {"a": [], "b": [msg]}
    assert result.count == 1


async def test_await_without_group_all(bus_api: BusApi) -> None:
    waiter = asyncio.create_task(bus_api.await_channels(["a", "b"], "all", wait_s=30))
    await bus_api.until_sleeping()
    ma = await bus_api.publish("a", {"i": 1})
    await bus_api.until_sleeping()  # woke, saw only "a", sleeps again
    await asyncio.sleep(0.01)
    assert not waiter.done()
    mb = await bus_api.publish("b", {"i": 2})
    result = await asyncio.wait_for(waiter, REAL_TIMEOUT_S)
    assert result.satisfied and not result.timed_out
    assert result.messages == {"a": [ma], "b": [mb]}


async def test_await_without_group_at_least(bus_api: BusApi) -> None:
    waiter = asyncio.create_task(bus_api.await_channels(["a", "b"], "at_least", n=3, wait_s=30))
    await bus_api.until_sleeping()
    await bus_api.publish("a", {"i": 1})
    await bus_api.publish("a", {"i": 2})
    await bus_api.until_sleeping()
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await bus_api.publish("b", {"i": 3})
    result = await asyncio.wait_for(waiter, REAL_TIMEOUT_S)
    assert result.satisfied and result.count >= 3
    assert len(result.messages["b"]) == 1


async def test_await_without_group_times_out_and_consumes_nothing(bus_api: BusApi) -> None:
    await bus_api.create_group("a", "g", start="earliest")
    await bus_api.publish("a", {"i": 0})
    result = await bus_api.await_channels(["a"], "any", wait_s=0)
    assert (result.satisfied, result.timed_out, result.messages) == (False, True, {"a": []})
    waiter = asyncio.create_task(bus_api.await_channels(["a", "b"], "all", wait_s=2))
    await bus_api.until_sleeping()
    await bus_api.publish("a", {"i": 1})
    await bus_api.until_sleeping()
    bus_api.clock.advance(2000)
    result = await asyncio.wait_for(waiter, REAL_TIMEOUT_S)
    assert (result.satisfied, result.timed_out) == (False, True)
    assert seqs(await bus_api.subscribe("a", "g", "c")) == [1, 2]  # nothing consumed


async def test_await_without_group_after_counts_what_was_there(bus_api: BusApi) -> None:
    await bus_api.create_group("a", "g", start="earliest")
    for i in range(3):
        await bus_api.publish("a", {"i": i})
    result = await bus_api.await_channels(["a"], "at_least", n=2, after={"a": 1})
    assert result.satisfied and seqs(result.messages["a"]) == [2, 3]
    assert seqs(await bus_api.subscribe("a", "g", "c")) == [1, 2, 3]  # nothing consumed


async def test_await_with_group_consumes_once_satisfied(bus_api: BusApi) -> None:
    for ch in ("a", "b"):
        await bus_api.create_group(ch, "g", visibility_timeout_s=1, start="earliest")
    ma = await bus_api.publish("a", {"i": 1})
    waiter = asyncio.create_task(bus_api.await_channels(["a", "b"], "all", group="g", wait_s=30))
    await bus_api.until_sleeping()
    mb = await bus_api.publish("b", {"i": 2})
    result = await asyncio.wait_for(waiter, REAL_TIMEOUT_S)
    assert result.satisfied and not result.timed_out
    assert result.messages == {"a": [ma], "b": [mb]}
    assert [g.pending for g in bus_api.bus.groups()] == [0, 0]
    bus_api.clock.advance(5000)  # consumed: never redelivered
    assert await bus_api.subscribe("a", "g", "c") == []
    assert await bus_api.subscribe("b", "g", "c") == []


@pytest.mark.parametrize("mode", ["any", "at_least"])
async def test_await_with_group_takes_what_is_there(bus_api: BusApi, mode: str) -> None:
    await bus_api.create_group("a", "g", start="earliest")
    published = [await bus_api.publish("a", {"i": i}) for i in range(3)]
    result = await bus_api.await_channels(["a"], mode, n=2, group="g", wait_s=0)
    assert result.satisfied
    took = [m.id for m in result.messages["a"]]
    assert len(took) >= 2 and took == [m.id for m in published][: len(took)]
    rest = await bus_api.subscribe("a", "g", "c")
    assert [d.id for d in rest] == [m.id for m in published][len(took) :]
    assert {d.attempt for d in rest} <= {1}


async def test_timed_out_await_with_group_consumes_nothing_nor_counts_the_attempt(
    bus_api: BusApi,
) -> None:
    for ch in ("a", "b"):
        await bus_api.create_group(
            ch, "g", visibility_timeout_s=1, max_deliveries=1, start="earliest"
        )
    ma = await bus_api.publish("a", {"i": 1})
    for _ in range(3):  # three failed awaits with max_deliveries=1: still not a dead letter
        result = await bus_api.await_channels(["a", "b"], "all", group="g", wait_s=0)
        assert (result.satisfied, result.timed_out) == (False, True)
    waiter = asyncio.create_task(bus_api.await_channels(["a", "b"], "all", group="g", wait_s=5))
    await bus_api.until_sleeping()
    bus_api.clock.advance(5000)
    result = await asyncio.wait_for(waiter, REAL_TIMEOUT_S)
    assert (result.satisfied, result.timed_out) == (False, True)
    result = await bus_api.await_channels(["a"], "at_least", n=2, group="g")
    assert result.timed_out
    assert await bus_api.peek("a.dead") == []
    [d] = await bus_api.subscribe("a", "g", "c")
    assert (d.id, d.attempt) == (ma.id, 1)


async def test_idempotent_await_with_a_key(bus_api: BusApi) -> None:
    await bus_api.create_group("a", "g", start="earliest")
    m1 = await bus_api.publish("a", {"i": 1})
    first = await bus_api.await_channels(["a"], "any", group="g", key="step-1")
    assert first.satisfied and first.messages == {"a": [m1]}
    m2 = await bus_api.publish("a", {"i": 2})
    again = await bus_api.await_channels(["a"], "any", group="g", key="step-1")
    assert again == first  # the stored result; m2 not consumed
    [d] = await bus_api.subscribe("a", "g", "c")
    assert (d.id, d.attempt) == (m2.id, 1)
    with pytest.raises(InvalidRequestError) as info:
        await bus_api.await_channels(["a"], key="no-group")
    assert info.value.argument == "key"


async def test_a_cancelled_await_with_group_consumes_nothing(make_kw: Any, clock: Any) -> None:
    api = BusApi(make_kw(clock), "async", clock)
    for ch in ("a", "b"):
        await api.create_group(ch, "g", start="earliest")
    ma = await api.publish("a", {"i": 1})
    waiter = asyncio.create_task(api.await_channels(["a", "b"], "all", group="g", wait_s=30))
    await api.until_sleeping()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    [d] = await api.subscribe("a", "g", "c")
    assert (d.id, d.attempt) == (ma.id, 1)


# -- broadcast -------------------------------------------------------------------------------------


async def test_broadcast_publishes_on_every_channel(bus_api: BusApi) -> None:
    await bus_api.publish("b", {"before": True})
    await bus_api.create_group("c", "g", start="earliest")
    out = await bus_api.broadcast(["a", "b", "c"], {"stop": True})
    assert [(m.channel, m.seq, m.payload) for m in out] == [
        ("a", 1, {"stop": True}),
        ("b", 2, {"stop": True}),
        ("c", 1, {"stop": True}),
    ]
    assert len({m.id for m in out}) == 3
    for m in out:
        assert (await bus_api.peek(m.channel))[-1] == m
    assert [d.id for d in await bus_api.subscribe("c", "g", "x")] == [out[2].id]


@pytest.mark.parametrize(
    "channels",
    [["a", "bad name"], ["a", ""], ["a", "a"], [], "a", ["a", "x" * 201], ["a", 7]],
    ids=["space", "empty", "twice", "none", "str", "long", "int"],
)
async def test_broadcast_with_a_bad_channel_publishes_nothing(
    bus_api: BusApi, channels: Any
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await bus_api.broadcast(channels, {"stop": True})
    assert info.value.argument == "channels"
    assert bus_api.bus.channels() == []


# -- listeners and governance events -------------------------------------------------------------


async def test_on_calls_matching_listeners_until_cancelled(bus_api: BusApi) -> None:
    orders: list[Message] = []
    everything: list[Message] = []
    sub = bus_api.bus.on("orders.*", orders.append)
    bus_api.bus.on("*", everything.append)
    m1 = await bus_api.publish("orders.new", {"i": 1})
    await bus_api.publish("billing", {"i": 2})
    [m3, _] = await bus_api.broadcast(["orders.paid", "other"], {"i": 3})
    assert orders == [m1, m3]
    assert [m.channel for m in everything] == ["orders.new", "billing", "orders.paid", "other"]
    sub.cancel()
    sub.cancel()  # idempotent
    await bus_api.publish("orders.new", {"i": 4})
    assert orders == [m1, m3]
    assert len(everything) == 5


async def test_a_failing_listener_never_reaches_the_publisher(bus_api: BusApi) -> None:
    seen: list[Message] = []

    def broken(_: Message) -> None:
        raise RuntimeError("listener bug")

    bus_api.bus.on("a", broken)
    bus_api.bus.on("a", seen.append)
    msg = await bus_api.publish("a", {"i": 1})
    assert seen == [msg]


async def _lease(api: BusApi, agent: str, resource: str) -> str:
    leases = api.kw.leases
    if api.is_async:
        verdict = await leases.atry_acquire(agent, "s", (resource, "MUTATES"), 10_000)
    else:
        verdict = leases.try_acquire(agent, "s", (resource, "MUTATES"), 10_000)
    assert verdict.granted
    return verdict.lease.lease_id


async def test_on_event_kind_gets_governance_events(bus_api: BusApi) -> None:
    leases: list[Message] = []
    approvals: list[Message] = []
    bus_api.bus.on("lease.*", leases.append)
    bus_api.bus.on("approval.*", approvals.append)
    lease_id = await _lease(bus_api, "agent-1", "FILE:/x")
    await eventually(lambda: len(leases) >= 1, "lease.granted on klockwork.events")
    granted = leases[0]
    assert granted.channel == EVENTS
    assert granted.payload["kind"] == "lease.granted"
    assert (granted.payload["agent_id"], granted.payload["session_id"]) == ("agent-1", "s")
    assert granted.payload["data"]["lease_id"] == lease_id
    assert bus_api.kw.leases.release(lease_id)
    await eventually(lambda: len(leases) >= 2, "lease.released")
    assert [m.payload["kind"] for m in leases] == ["lease.granted", "lease.released"]
    await asyncio.sleep(0.05)
    assert approvals == []  # another kind: not called
    kinds = [m.payload["kind"] for m in await bus_api.peek(EVENTS)]
    assert kinds == ["lease.granted", "lease.released"]


async def test_governance_events_are_not_published_when_nobody_follows(bus_api: BusApi) -> None:
    bus_api.bus.on("orders.*", lambda m: None)  # follows channels, not events
    for i in range(3):
        assert bus_api.kw.leases.release(await _lease(bus_api, f"agent-{i}", f"FILE:/{i}"))
    await asyncio.sleep(0.1)
    assert await bus_api.peek(EVENTS) == []
    assert bus_api.kw.bus.events is not None and not bus_api.kw.bus.events.following


async def test_governance_events_follow_a_listener_then_stop(bus_api: BusApi) -> None:
    seen: list[Message] = []
    sub = bus_api.bus.on(EVENTS, seen.append)
    await _lease(bus_api, "a1", "FILE:/1")
    await eventually(lambda: len(seen) >= 1, "lease.granted")
    sub.cancel()
    await asyncio.sleep(0.05)
    count = len(await bus_api.peek(EVENTS))
    await _lease(bus_api, "a2", "FILE:/2")
    await asyncio.sleep(0.1)
    assert len(await bus_api.peek(EVENTS)) == count


async def test_a_group_on_the_events_channel_follows_events(bus_api: BusApi) -> None:
    await bus_api.create_group(EVENTS, "ops", start="new")
    lease_id = await _lease(bus_api, "agent-1", "FILE:/x")
    got: list[Delivery] = []

    async def more() -> None:
        got.extend(await bus_api.subscribe(EVENTS, "ops", "c"))

    deadline = time.monotonic() + REAL_TIMEOUT_S
    while not got and time.monotonic() < deadline:
        await more()
        await asyncio.sleep(0.005)
    assert [d.payload["kind"] for d in got] == ["lease.granted"]
    assert got[0].payload["data"]["lease_id"] == lease_id


# -- retention -------------------------------------------------------------------------------------


async def test_retention_max_len(bus_api: BusApi) -> None:
    await bus_api.publish("a", {"i": 0})
    bus_api.bus.set_retention("a", max_len=3)
    for i in range(1, 5):
        await bus_api.publish("a", {"i": i})
    assert seqs(await bus_api.peek("a")) == [3, 4, 5]
    [info] = bus_api.bus.channels()
    assert (info.channel, info.last_seq, info.length, info.max_len) == ("a", 5, 3, 3)
    assert (await bus_api.publish("a", {"i": 5})).seq == 6  # seqs go on


async def test_retention_max_age(bus_api: BusApi) -> None:
    await bus_api.publish("a", {"i": 0})
    bus_api.bus.set_retention("a", max_age_s=10)
    bus_api.clock.advance(5000)
    await bus_api.publish("a", {"i": 1})
    bus_api.clock.advance(6000)  # the first is 11 s old now
    await bus_api.publish("a", {"i": 2})
    assert seqs(await bus_api.peek("a")) == [2, 3]
    [info] = bus_api.bus.channels()
    assert info.max_age_s == 10


@pytest.mark.parametrize("retention", [{"max_len": 3}, {"max_age_s": 10}], ids=["len", "age"])
async def test_set_retention_on_a_new_channel(bus_api: BusApi, retention: dict[str, Any]) -> None:
    bus_api.bus.set_retention("a", **retention)  # before anything was published there
    [info] = bus_api.bus.channels()
    assert (info.channel, info.length, info.last_seq) == ("a", 0, 0)
    for i in range(12):
        await bus_api.publish("a", {"i": i})
        bus_api.clock.advance(1000)
    await bus_api.publish("a", {"i": 12})
    expected = [11, 12, 13] if "max_len" in retention else list(range(3, 14))
    assert seqs(await bus_api.peek("a")) == expected


async def test_set_retention_trims_at_once(bus_api: BusApi) -> None:
    await bus_api.create_group("a", "g", start="earliest")
    for i in range(6):
        await bus_api.publish("a", {"i": i})
    await bus_api.subscribe("a", "g", "c", max_messages=2)
    bus_api.bus.set_retention("a", max_len=2)
    assert seqs(await bus_api.peek("a")) == [5, 6]
    bus_api.clock.advance(60_000)  # seqs 1 and 2 were pending: trimmed, never redelivered
    assert seqs(await bus_api.subscribe("a", "g", "c")) == [5, 6]
    assert await bus_api.subscribe("a", "g", "c") == []


async def test_retention_defaults_of_the_bus(bus_api: BusApi) -> None:
    await bus_api.publish("a", {"i": 0})
    [info] = bus_api.bus.channels()
    assert (info.max_len, info.max_age_s) == (10_000, 7 * 24 * 3600)
    bus = Bus(bus_api.kw.store, bus_api.clock, max_len=2, max_age_s=30)
    for i in range(4):
        bus.publish("b", {"i": i})
    assert seqs(bus.peek("b")) == [3, 4]
    bus_api.clock.advance(31_000)
    bus.publish("b", {"i": 4})
    assert seqs(bus.peek("b")) == [5]
    info_b = next(c for c in bus.channels() if c.channel == "b")
    assert (info_b.max_len, info_b.max_age_s) == (2, 30)
    bus.set_retention("b", max_len=5)  # the other value keeps the bus default
    info_b = next(c for c in bus.channels() if c.channel == "b")
    assert (info_b.max_len, info_b.max_age_s) == (5, 30)


# -- waiting ---------------------------------------------------------------------------------------


async def test_long_poll_wakes_on_a_publish_from_another_thread(real_api: BusApi) -> None:
    await real_api.create_group("a", "g", start="earliest")

    def publish_later() -> None:
        time.sleep(0.2)
        real_api.bus.publish("a", {"i": 1})

    publisher = threading.Thread(target=publish_later)
    started = time.monotonic()
    publisher.start()
    got = await real_api.subscribe("a", "g", "c", wait_s=20)
    elapsed = time.monotonic() - started
    publisher.join()
    assert seqs(got) == [1]
    assert elapsed < 3, f"woke after {elapsed:.2f}s of a 20s wait"


async def test_long_poll_returns_empty_after_wait_s(real_api: BusApi) -> None:
    started = time.monotonic()
    got = await real_api.subscribe("a", "g", "c", wait_s=0.3)
    elapsed = time.monotonic() - started
    assert got == []
    assert 0.29 <= elapsed < 5


async def test_long_poll_returns_empty_after_wait_s_on_the_manual_clock(bus_api: BusApi) -> None:
    waiter = asyncio.create_task(bus_api.subscribe("a", "g", "c", wait_s=10))
    await bus_api.until_sleeping()
    bus_api.clock.advance(9999)
    await asyncio.sleep(0.02)
    assert not waiter.done()
    bus_api.clock.advance(1)
    assert await asyncio.wait_for(waiter, REAL_TIMEOUT_S) == []


async def test_a_waiting_subscriber_on_the_manual_clock_wakes_on_publish(bus_api: BusApi) -> None:
    await bus_api.create_group("a", "g", start="earliest")
    waiter = asyncio.create_task(bus_api.subscribe("a", "g", "c", wait_s=60))
    await bus_api.until_sleeping()
    msg = await bus_api.publish("a", {"i": 1})  # no clock advance: the publish wakes it
    [d] = await asyncio.wait_for(waiter, REAL_TIMEOUT_S)
    assert (d.id, d.attempt) == (msg.id, 1)


async def test_close_wakes_a_blocked_subscriber(bus_api: BusApi) -> None:
    waiter = asyncio.create_task(bus_api.subscribe("a", "g", "c", wait_s=60))
    await bus_api.until_sleeping()
    started = time.monotonic()
    bus_api.kw.close()  # no advance, no publish: closing alone wakes it
    done, _ = await asyncio.wait([waiter], timeout=REAL_TIMEOUT_S)
    assert done, "kw.close() did not wake the subscriber"
    assert time.monotonic() - started < 5
    assert isinstance(waiter.exception(), StoreUnavailableError), waiter.exception()


async def test_a_cancelled_asubscribe_loses_nothing(
    make_kw: Callable[..., Klockwork], clock: ManualClock
) -> None:
    api = BusApi(make_kw(clock), "async", clock)
    await api.create_group("a", "g", start="earliest")
    waiter = asyncio.create_task(api.subscribe("a", "g", "c1", wait_s=60))
    await api.until_sleeping()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    msg = await api.publish("a", {"i": 1})
    [d] = await api.subscribe("a", "g", "c2")
    assert (d.id, d.attempt, d.consumer) == (msg.id, 1, "c2")


async def test_an_asubscribe_cancelled_while_reading_loses_nothing(
    make_kw: Callable[..., Klockwork], clock: ManualClock
) -> None:
    """Cancel at various points of a read that finds a message: taken or handed back."""
    api = BusApi(make_kw(clock), "async", clock)
    await api.create_group("a", "g", start="earliest")
    for i in range(20):
        msg = await api.publish("a", {"i": i})
        task = asyncio.create_task(api.subscribe("a", "g", "reader", max_messages=1))
        for _ in range(i % 4):
            await asyncio.sleep(0)
        task.cancel()
        try:
            got = await task
        except asyncio.CancelledError:
            got = None
        if got:
            assert [(d.id, d.attempt) for d in got] == [(msg.id, 1)]
            assert await api.ack("a", "g", got) == 1
            continue
        deadline = time.monotonic() + REAL_TIMEOUT_S
        again = await api.subscribe("a", "g", "other")
        while not again and time.monotonic() < deadline:  # a give-back runs off the loop
            await asyncio.sleep(0.002)
            again = await api.subscribe("a", "g", "other")
        assert [(d.id, d.attempt) for d in again] == [(msg.id, 1)], i
        assert await api.ack("a", "g", again) == 1
    assert api.pending("a", "g") == 0


# -- bad input -------------------------------------------------------------------------------------

_BIG = {"blob": "x" * (1 << 20)}


def _bad_cases() -> list[tuple[str, Callable[[BusApi], Any], str]]:
    def cb(_: Message) -> None:
        return None

    return [
        ("payload-list", lambda a: a.publish("c", [1]), "payload"),
        ("payload-str", lambda a: a.publish("c", "{}"), "payload"),
        ("payload-not-json", lambda a: a.publish("c", {"x": object()}), "payload"),
        ("payload-set", lambda a: a.publish("c", {"x": {1, 2}}), "payload"),
        ("payload-int-key", lambda a: a.publish("c", {1: "x"}), "payload"),
        ("payload-nan", lambda a: a.publish("c", {"x": float("nan")}), "payload"),
        ("payload-inf", lambda a: a.publish("c", {"x": float("inf")}), "payload"),
        ("payload-too-big", lambda a: a.publish("c", _BIG), "payload"),
        ("channel-empty", lambda a: a.publish("", {}), "channel"),
        ("channel-space", lambda a: a.publish("a b", {}), "channel"),
        ("channel-slash", lambda a: a.publish("a/b", {}), "channel"),
        ("channel-long", lambda a: a.publish("x" * 201, {}), "channel"),
        ("channel-none", lambda a: a.publish(None, {}), "channel"),
        ("deliver-at-str", lambda a: a.publish("c", {}, deliver_at="soon"), "deliver_at"),
        ("deliver-at-float", lambda a: a.publish("c", {}, deliver_at=1.5), "deliver_at"),
        ("deliver-at-neg", lambda a: a.publish("c", {}, deliver_at=-1), "deliver_at"),
        ("key-empty", lambda a: a.publish("c", {}, key=""), "key"),
        ("key-int", lambda a: a.publish("c", {}, key=5), "key"),
        ("wait-negative", lambda a: a.subscribe("c", "g", "x", wait_s=-1), "wait_s"),
        ("wait-nan", lambda a: a.subscribe("c", "g", "x", wait_s=float("nan")), "wait_s"),
        ("max-messages-0", lambda a: a.subscribe("c", "g", "x", max_messages=0), "max_messages"),
        ("max-messages-bool", lambda a: a.subscribe("c", "g", "x", True), "max_messages"),
        ("sub-channel", lambda a: a.subscribe("c c", "g", "x"), "channel"),
        ("sub-group", lambda a: a.subscribe("c", "", "x"), "group"),
        ("sub-consumer", lambda a: a.subscribe("c", "g", "x y"), "consumer"),
        ("ack-unknown-group", lambda a: a.ack("c", "nope", ["id"]), "group"),
        ("nack-unknown-group", lambda a: a.nack("c", "nope", ["id"]), "group"),
        ("ack-bad-ids", lambda a: a.ack("c", "g", [5]), "message_ids"),
        ("peek-limit-0", lambda a: a.peek("c", limit=0), "limit"),
        ("peek-after-negative", lambda a: a.peek("c", after_seq=-1), "after_seq"),
        ("await-no-channels", lambda a: a.await_channels([]), "channels"),
        ("await-bad-channel", lambda a: a.await_channels(["ok", "n o"]), "channels"),
        ("await-mode", lambda a: a.await_channels(["c"], "some"), "mode"),
        ("await-n-0", lambda a: a.await_channels(["c"], "at_least", n=0), "n"),
        ("await-wait-negative", lambda a: a.await_channels(["c"], wait_s=-1), "wait_s"),
        ("await-key-no-group", lambda a: a.await_channels(["c"], key="k"), "key"),
        (
            "group-timeout-0",
            lambda a: a.create_group("c", "g", visibility_timeout_s=0),
            "visibility_timeout_s",
        ),
        ("group-max-0", lambda a: a.create_group("c", "g", max_deliveries=0), "max_deliveries"),
        ("group-start", lambda a: a.create_group("c", "g", start="latest"), "start"),
        ("on-pattern", lambda a: _sync(a.bus.on, "", cb), "pattern"),
        ("on-callback", lambda a: _sync(a.bus.on, "c", 5), "callback"),
        ("retention-len-0", lambda a: _sync(a.bus.set_retention, "c", max_len=0), "max_len"),
        ("retention-age-0", lambda a: _sync(a.bus.set_retention, "c", max_age_s=0), "max_age_s"),
    ]


async def _sync(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


_CASES = _bad_cases()


@pytest.mark.parametrize(("call", "argument"), [c[1:] for c in _CASES], ids=[c[0] for c in _CASES])
async def test_bad_input_names_the_argument_and_changes_nothing(
    bus_api: BusApi, call: Callable[[BusApi], Any], argument: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await call(bus_api)
    assert info.value.argument == argument
    assert isinstance(info.value, ValueError)
    assert bus_api.bus.channels() == []
    assert bus_api.bus.groups() == []
    assert await bus_api.peek("c") == []


async def test_ack_with_an_unknown_group_changes_nothing(bus_api: BusApi) -> None:
    await bus_api.create_group("c", "g", start="earliest")
    msg = await bus_api.publish("c", {"i": 1})
    await bus_api.subscribe("c", "g", "x")
    for call in (bus_api.ack, bus_api.nack):
        with pytest.raises(InvalidRequestError) as info:
            await call("c", "other", [msg.id])
        assert info.value.argument == "group"
    assert bus_api.pending("c", "g") == 1
    assert await bus_api.subscribe("c", "g", "y") == []  # not handed back by the nack


# -- the twins agree -------------------------------------------------------------------------------


async def _scenario(api: BusApi) -> list[Any]:
    """A run through most of the API; returns what it saw, ids replaced by their order."""
    names: dict[str, int] = {}

    def msg(m: Message) -> tuple[Any, ...]:
        return (
            names.setdefault(m.id, len(names)),
            m.channel,
            m.seq,
            m.payload,
            m.published_at - T0,
            m.visible_at - T0,
        )

    def dels(ds: list[Delivery]) -> list[Any]:
        return [(msg(d.message), d.attempt, d.consumer, d.group, d.delivered_at - T0) for d in ds]

    def dead(ms: list[Message]) -> list[Any]:
        return [
            (m.channel, m.seq, names.get(m.payload["message"]["id"]), m.payload["attempts"])
            for m in ms
        ]

    trace: list[Any] = []
    clock = api.clock
    await api.create_group("s", "g", visibility_timeout_s=1, max_deliveries=2, start="earliest")
    await api.create_group("s", "h", start="earliest")
    await api.create_group("t", "h", start="earliest")
    trace.append(msg(await api.publish("s", {"i": 1})))
    trace.append(msg(await api.publish("s", {"i": 2}, key="k")))
    trace.append(msg(await api.publish("s", {"i": 3}, key="k")))
    trace.append(msg(await api.publish("s", {"i": 4}, deliver_at=T0 + 500)))
    trace.append(dels(await api.subscribe("s", "g", "c1", max_messages=1)))
    trace.append(dels(await api.subscribe("s", "g", "c2")))
    trace.append(await api.nack("s", "g", [names_id(names, 0)], error="e"))
    clock.advance(500)
    trace.append(dels(await api.subscribe("s", "g", "c3")))
    clock.advance(1000)
    trace.append(dels(await api.subscribe("s", "g", "c1")))
    trace.append(dead(await api.peek("s.dead")))
    trace.append([msg(m) for m in await api.broadcast(["s", "t"], {"b": True})])
    trace.append([msg(m) for m in await api.peek("s", after_seq=1, limit=2)])
    result = await api.await_channels(["s", "t"], "all", group="h")
    trace.append((result.satisfied, {c: [msg(m) for m in ms] for c, ms in result.messages.items()}))
    result = await api.await_channels(["t"], "any", group="h")
    trace.append((result.satisfied, result.timed_out, result.count))
    trace.append([(g.channel, g.group, g.pending, g.lag) for g in api.bus.groups()])
    trace.append([(c.channel, c.last_seq, c.length, c.groups) for c in api.bus.channels()])
    return trace


def names_id(names: dict[str, int], index: int) -> str:
    return next(i for i, n in names.items() if n == index)


async def test_sync_and_async_twins_agree(make_kw: Callable[..., Klockwork]) -> None:
    traces = []
    for flavour in ("sync", "async"):
        clock = ManualClock(start_ms=T0)
        api = BusApi(make_kw(clock, db=f"{flavour}.db"), flavour, clock)
        traces.append(await _scenario(api))
    assert traces[0] == traces[1]
    assert traces[0][4][0][1] == 1  # (and the scenario did deliver something)
