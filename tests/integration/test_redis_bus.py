"""The bus on Redis: what the conformance suite (a manual clock, one process) cannot show.

* a subscriber waiting in another process is woken by a publish through
  Pub/Sub, in about a millisecond, without polling the store;
* time comes from the server: a caller whose clock is minutes off still
  sees its messages at once, its delayed messages on time, and its
  redeliveries when the visibility timeout runs out;
* a Redis that does not answer fails closed.

Needs ``KLOCKWORK_TEST_REDIS_URL`` (e.g. ``redis://127.0.0.1:6379/15``); each
test works in a namespace of its own and deletes its keys (never FLUSHDB:
the database is shared).
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from klockwork import Klockwork, ManualClock, MemoryStore, StoreUnavailableError
from klockwork.core.clock import SystemClock
from klockwork.core.stores.redis.store import RedisStore

REDIS_URL = os.environ.get("KLOCKWORK_TEST_REDIS_URL", "")

pytestmark = pytest.mark.skipif(
    not REDIS_URL, reason="Redis tests need a server: set KLOCKWORK_TEST_REDIS_URL"
)


def _url(namespace: str) -> str:
    return f"{REDIS_URL}{'&' if '?' in REDIS_URL else '?'}namespace={namespace}"


@pytest.fixture
def namespace() -> Iterator[str]:
    """A fresh namespace, its keys deleted afterwards (SCAN + UNLINK)."""
    import redis

    name = f"t-{uuid.uuid4().hex}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{{{name}}}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.unlink(*keys[i : i + 500])
    finally:
        client.close()


_SUBSCRIBER = textwrap.dedent(
    """
    import sys, time
    from klockwork import Klockwork
    from klockwork.core.stores.redis.store import RedisStore

    url, rounds = sys.argv[1], int(sys.argv[2])
    kw = Klockwork(RedisStore(url))
    kw.bus.create_group("inbox", "workers")
    for _ in range(rounds):
        print("waiting", flush=True)
        [d] = kw.bus.subscribe("inbox", "workers", "far-away", max_messages=1, wait_s=20)
        print(repr(time.time()), d.payload["n"], flush=True)
        kw.bus.ack("inbox", "workers", [d])
    kw.close()
    """
)

#: The same subscriber on asyncio (asubscribe: the async client, a loop alarm).
_ASUBSCRIBER = textwrap.dedent(
    """
    import asyncio, sys, time
    from klockwork import Klockwork
    from klockwork.core.stores.redis.store import RedisStore

    async def main(url, rounds):
        kw = Klockwork(RedisStore(url))
        await kw.bus.acreate_group("inbox", "workers")
        for _ in range(rounds):
            print("waiting", flush=True)
            [d] = await kw.bus.asubscribe("inbox", "workers", "far-away", 1, wait_s=20)
            print(repr(time.time()), d.payload["n"], flush=True)
            await kw.bus.aack("inbox", "workers", [d])
        kw.close()

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_subscriber_in_another_process_is_woken_by_a_publish(
    namespace: str, flavour: str
) -> None:
    rounds = 20
    url = _url(namespace)
    source = _SUBSCRIBER if flavour == "sync" else _ASUBSCRIBER
    child = subprocess.Popen(
        [sys.executable, "-c", source, url, str(rounds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    kw = Klockwork(RedisStore(url))
    latencies: list[float] = []
    try:
        for n in range(rounds):
            assert child.stdout.readline().strip() == "waiting"
            time.sleep(0.1)  # well into its wait (its listener is subscribed by now)
            sent = time.time()
            kw.bus.publish("inbox", {"n": n})
            woke, got = child.stdout.readline().split()
            assert int(got) == n
            latencies.append(float(woke) - sent)
        assert child.wait(30) == 0
    finally:
        kw.close()
        if child.poll() is None:
            child.kill()
    # Woken by the publish, not by its 20 s wait running out; nor by a poll
    # loop (there is none: the store pushes wake-ups).
    assert max(latencies) < 1.0
    median = statistics.median(latencies)
    worst = max(latencies)
    print(f"{flavour} cross-process wake-up: median {median * 1000:.2f}, max {worst * 1000:.2f} ms")
    assert median < 0.1


def test_waiters_on_a_pushing_store_do_not_poll(namespace: str) -> None:
    kw = Klockwork(RedisStore(_url(namespace)))
    try:
        assert kw.bus.subscribe("quiet", "g", "c", wait_s=0.3) == []  # subscribes "quiet"
        assert kw.store.bus_hears(["quiet"])  # and stays subscribed a while after
        calls = 0
        version = kw.store.bus_version

        def counted() -> int:
            nonlocal calls
            calls += 1
            return version()

        kw.store.bus_version = counted  # type: ignore[method-assign]
        assert kw.bus.subscribe("quiet", "g", "c", wait_s=0.3) == []
        assert calls == 0
    finally:
        kw.close()


def test_a_process_hears_only_the_channels_it_waits_on(namespace: str) -> None:
    """Nobody waiting: a publish wakes no process (no Pub/Sub subscriber at all)."""
    import threading

    import redis

    client = redis.Redis.from_url(REDIS_URL)
    wake = f"{{{namespace}}}:bus:wake:inbox"
    a, b = Klockwork(RedisStore(_url(namespace))), Klockwork(RedisStore(_url(namespace)))
    try:
        a.bus.publish("inbox", {"n": 0})
        assert client.pubsub_numsub(wake) == [(wake.encode(), 0)]
        reader = threading.Thread(target=b.bus.subscribe, args=("inbox", "g", "c", 10, 5))
        reader.start()
        deadline = time.monotonic() + 5
        while not b.store.bus_hears(["inbox"]):
            assert time.monotonic() < deadline, "never subscribed"
            time.sleep(0.01)
        assert client.pubsub_numsub(wake) == [(wake.encode(), 1)]  # b only
        a.bus.publish("inbox", {"n": 1})
        reader.join(5)
        assert not reader.is_alive()
    finally:
        a.close()
        b.close()
        client.close()


class _SkewedClock(SystemClock):
    """Real time, off by ``offset_ms`` (a machine whose clock is wrong)."""

    def __init__(self, offset_ms: int) -> None:
        self._offset_ms = offset_ms

    def now_ms(self) -> int:
        return super().now_ms() + self._offset_ms


@pytest.mark.parametrize("offset_ms", [-5 * 60_000, 5 * 60_000])
def test_a_caller_with_a_wrong_clock_still_agrees_with_the_server(
    namespace: str, offset_ms: int
) -> None:
    kw = Klockwork(RedisStore(_url(namespace)), clock=_SkewedClock(offset_ms))
    try:
        kw.bus.create_group("jobs", "g", visibility_timeout_s=0.3)
        kw.bus.publish("jobs", {"n": 1})
        [first] = kw.bus.subscribe("jobs", "g", "a")  # visible at once, whatever the clock
        started = time.monotonic()
        [again] = kw.bus.subscribe("jobs", "g", "b", wait_s=5)  # redelivered on time
        assert again.id == first.id and again.attempt == 2
        assert 0.2 < time.monotonic() - started < 2
        kw.bus.ack("jobs", "g", [again])

        later = kw.clock.now_ms() + 300  # "in 300 ms" by this caller's clock
        kw.bus.publish("jobs", {"n": 2}, deliver_at=later)
        assert kw.bus.peek("jobs", after_seq=1) == []
        started = time.monotonic()
        [delayed] = kw.bus.subscribe("jobs", "g", "a", wait_s=5)
        assert delayed.payload == {"n": 2}
        assert 0.2 < time.monotonic() - started < 2
    finally:
        kw.close()


def test_a_redis_that_does_not_answer_fails_closed() -> None:
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StoreUnavailableError):
        RedisStore(f"redis://127.0.0.1:{port}/0")


def test_a_call_sent_again_with_its_request_id_runs_once(namespace: str) -> None:
    """A reply lost to a timeout is asked for again under the same request id."""
    kw = Klockwork(RedisStore(_url(namespace)))
    store = kw.store
    try:
        kw.bus.create_group("jobs", "g", max_deliveries=1)
        store._bus_rids.next = lambda: "same-request"  # type: ignore[method-assign]
        first = kw.bus.publish_many("jobs", [{"n": 1}, {"n": 2}])
        again = kw.bus.publish_many("jobs", [{"n": 1}, {"n": 2}])
        assert again == first
        assert [m.seq for m in kw.bus.peek("jobs")] == [1, 2]  # published once

        store._bus_rids.next = lambda: "a-read"  # type: ignore[method-assign]
        taken = kw.bus.subscribe("jobs", "g", "c", max_messages=1)
        replayed = kw.bus.subscribe("jobs", "g", "c", max_messages=1)
        assert [d.message for d in replayed] == [d.message for d in taken]
        assert [d.attempt for d in replayed] == [1]
        assert kw.bus.groups("jobs")[0].pending == 1  # handed out once
    finally:
        kw.close()


def test_the_read_script_plans_as_rules_plan_read() -> None:
    """The Lua ``plan_read`` makes :func:`rules.plan_read`'s decisions (random cases)."""
    import random

    import redis

    from klockwork.core.bus.rules import plan_read
    from klockwork.core.stores.redis import bus_lib

    harness = bus_lib.LIB + (
        "local expired = {}\n"
        "for i = 4, #ARGV, 2 do\n"
        "  expired[#expired + 1] = {ARGV[i], 'c', 0, tonumber(ARGV[i + 1])}\n"
        "end\n"
        "local redeliver, dead = plan_read(expired, tonumber(ARGV[2]), tonumber(ARGV[3]))\n"
        "local r, d = {}, {}\n"
        "for _, p in ipairs(redeliver) do r[#r + 1] = p[1] end\n"
        "for _, p in ipairs(dead) do d[#d + 1] = p[1] end\n"
        "return {r, d, tonumber(ARGV[2]) - #redeliver}\n"
    )
    client = redis.Redis.from_url(REDIS_URL)
    script = client.register_script("local P = ''\n" + harness)  # LIB's functions, no keys
    rng = random.Random(13)
    try:
        for _ in range(300):
            seqs = sorted(rng.sample(range(1, 60), rng.randint(0, 12)))
            expired = [(seq, rng.randint(0, 6)) for seq in seqs]
            fresh = list(range(100, 100 + rng.randint(0, 8)))
            count, max_deliveries = rng.randint(1, 6), rng.randint(1, 5)
            args = ["", str(count), str(max_deliveries)]
            for seq, attempt in expired:
                args += [str(seq), str(attempt)]
            redeliver, dead, room = script(keys=["{t-plan}:x"], args=args)
            plan = plan_read(expired, fresh, count, max_deliveries)
            assert [int(x) for x in redeliver] == plan.redeliver
            assert [int(x) for x in dead] == plan.dead
            assert fresh[: max(room, 0)] == plan.fresh
    finally:
        client.close()


def _comparable(m: Any) -> tuple[Any, ...]:
    """A message without its id (ids are each store's own), dead letters included."""
    payload = m.payload
    if m.channel.endswith(".dead"):
        payload = {**payload, "message": {**payload["message"], "id": None}}
    return (m.channel, m.seq, payload, m.published_at, m.visible_at)


@pytest.mark.parametrize("seed", range(12))
def test_random_steps_answer_as_on_the_memory_store(seed: int) -> None:
    """Publishes (keyed, delayed), reads, acks, nacks, retention trims and time, on
    both stores: every answer, the groups' counts and the channels must agree
    (what the state machine leaves out: trimming under pending, delayed and
    keyed messages)."""
    import random

    import redis

    rng = random.Random(seed)
    namespace = f"t-{uuid.uuid4().hex}"
    clocks = {"memory": ManualClock(start_ms=1_000_000), "redis": ManualClock(start_ms=1_000_000)}
    engines = {
        "memory": Klockwork(MemoryStore(), clock=clocks["memory"]),
        "redis": Klockwork(RedisStore(_url(namespace), server_time=False), clock=clocks["redis"]),
    }
    held: dict[str, list[tuple[str, Any]]] = {"memory": [], "redis": []}
    try:
        for kw in engines.values():
            kw.bus.create_group(
                "c", "g1", visibility_timeout_s=1, max_deliveries=2, start="earliest"
            )
        for _ in range(60):
            op = rng.choice(["pub", "pub", "key", "delay", "sub", "sub", "ack", "nack", "time"])
            op = rng.choice([op, op, op, "retention", "group", "peek"])
            n, pick = rng.randint(0, 10**6), rng.random()
            group, consumer, count = rng.choice(["g1", "g2"]), rng.choice(["a", "b"]), pick
            answers = {}
            for name, kw in engines.items():
                bus, now = kw.bus, clocks[name].now_ms()
                answer: Any = None
                if op == "pub":
                    answer = _comparable(bus.publish("c", {"n": n}))
                elif op == "key":
                    answer = _comparable(bus.publish("c", {"n": n}, key=f"k{n % 3}"))
                elif op == "delay":
                    answer = _comparable(bus.publish("c", {"n": n}, deliver_at=now + n % 3000))
                elif op == "sub":
                    got = bus.subscribe("c", group, consumer, max_messages=1 + int(count * 4))
                    held[name] += [(group, d) for d in got]
                    answer = [(_comparable(d.message), d.attempt, d.consumer) for d in got]
                elif op in ("ack", "nack") and held[name]:
                    g, d = held[name].pop(int(pick * len(held[name])))
                    if op == "ack":
                        answer = bus.ack("c", g, [d])
                    else:
                        answer = bus.nack("c", g, [d], error=f"e{n}")
                elif op == "time":
                    clocks[name].advance(n % 2500)
                elif op == "retention":
                    bus.set_retention("c", max_len=1 + n % 6, max_age_s=[None, 1, 3][n % 3])
                elif op == "group":
                    info = bus.create_group("c", "g2", visibility_timeout_s=0.5, start="earliest")
                    answer = (info.pending, info.lag)
                else:
                    answer = [_comparable(m) for m in bus.peek("c") + bus.peek("c.dead")]
                answers[name] = (
                    answer,
                    [(g.group, g.pending, g.lag) for g in bus.groups()],
                    [(c.channel, c.last_seq, c.length, c.max_len) for c in bus.channels()],
                )
            assert answers["redis"] == answers["memory"], op
    finally:
        for kw in engines.values():
            kw.close()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{{{namespace}}}:*", count=1000))
        if keys:
            client.unlink(*keys)
        client.close()


def test_a_waiter_hears_a_publish_made_while_its_listener_reconnected(namespace: str) -> None:
    """Wake-ups published while the Pub/Sub connection was down are not lost:
    each channel's waiters are woken once its subscription is confirmed again."""
    import threading

    import redis

    waiter = Klockwork(RedisStore(_url(namespace)))
    publisher = Klockwork(RedisStore(_url(namespace)))
    client = redis.Redis.from_url(REDIS_URL)
    try:
        waiter.bus.create_group("inbox", "g")
        got: list[Any] = []
        reader = threading.Thread(
            target=lambda: got.extend(waiter.bus.subscribe("inbox", "g", "c", wait_s=10))
        )
        reader.start()
        deadline = time.monotonic() + 5
        while not waiter.store.bus_hears(["inbox"]):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.1)  # asleep, waiting for a wake-up
        listener = waiter.store._bus_listener
        assert listener is not None
        host, port = listener._pubsub.connection._sock.getsockname()[:2]
        killed = client.client_kill_filter(_type="pubsub", addr=f"{host}:{port}")
        assert killed == 1
        publisher.bus.publish("inbox", {"n": 1})  # most likely before it resubscribed
        started = time.monotonic()
        reader.join(10)
        assert [d.payload for d in got] == [{"n": 1}]
        assert time.monotonic() - started < 5  # woken (~0.2 s here), not timed out
    finally:
        waiter.close()
        publisher.close()
        client.close()
