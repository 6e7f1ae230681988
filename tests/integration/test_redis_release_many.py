"""``release_many`` on Redis: one script call, the end's wake-ups, a lost reply.

What every store shares is in ``tests/conformance/test_release_many.py``.
Needs ``KLOCKWORK_TEST_REDIS_URL`` (e.g. ``redis://127.0.0.1:6379/15``);
each test works in a namespace of its own, deleted afterwards (never
FLUSHDB: the database is shared).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from conformance.conftest import drop_redis_namespace
from lost_replies import LoseFirstReply

from klockwork import Klockwork, LeaseState, ManualClock, RedisStore
from klockwork.core.stores.redis import scripts

REDIS_URL = os.environ.get("KLOCKWORK_TEST_REDIS_URL", "")
pytestmark = pytest.mark.skipif(
    not REDIS_URL,
    reason="Redis tests need a server: KLOCKWORK_TEST_REDIS_URL=redis://127.0.0.1:6379/15 "
    "make test runs them",
)
T0 = 1_000_000
MANIFEST = [(f"FILE:/m/{i}", "MUTATES") for i in range(5)]


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:16]}-many"
    yield name
    drop_redis_namespace(name)


@pytest.fixture
def kw(namespace: str) -> Iterator[Klockwork]:
    engine = Klockwork(_store(namespace), clock=ManualClock(T0))
    yield engine
    engine.close()


@pytest.fixture
def quiet(namespace: str) -> Iterator[Klockwork]:
    """An engine that does not audit leases (the sealer's scripts carry lease ids too)."""
    engine = Klockwork(_store(namespace), clock=ManualClock(T0), audit_leases=False)
    yield engine
    engine.close()


def _store(namespace: str) -> RedisStore:
    sep = "&" if "?" in REDIS_URL else "?"
    return RedisStore(f"{REDIS_URL}{sep}namespace={namespace}", server_time=False)


def _ids(kw: Klockwork, agent: str = "a") -> list[str]:
    return [lease.lease_id for lease in kw.leases.try_acquire(agent, "s", MANIFEST).leases]


def _sent(ids: list[str], op: Any) -> list[str]:
    """The commands clients sent naming any of ``ids`` while ``op()`` ran (MONITOR).

    (The audit sealer's idle checks name the namespace too, never a lease id.)
    """
    seen: list[dict[str, Any]] = []
    started, stop = threading.Event(), threading.Event()
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)

    def watch() -> None:
        with client.monitor() as mon:  # type: ignore[no-untyped-call]
            started.set()
            for cmd in mon.listen():
                seen.append(cmd)
                if stop.is_set():
                    return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert started.wait(5)
    time.sleep(0.05)
    op()
    time.sleep(0.05)
    stop.set()
    redis.Redis.from_url(REDIS_URL).ping()  # one more line, so the watcher sees stop
    thread.join(5)
    client.close()
    return [
        c["command"].split()[0].upper()
        for c in seen
        if any(i in c.get("command", "") for i in ids) and c.get("client_type") != "lua"
    ]


def test_a_manifest_is_released_in_one_round_trip(quiet: Klockwork) -> None:
    kw = quiet
    ids = _ids(kw)
    kw.leases.release_many(ids[:1])  # the script is loaded before counting
    result: list[list[bool]] = []
    assert _sent(ids, lambda: result.append(kw.leases.release_many(ids))) == ["FCALL"]
    assert result == [[False, True, True, True, True]]
    assert kw.leases.list() == []


def test_hold_of_a_manifest_ends_in_one_round_trip(quiet: Klockwork) -> None:
    kw = quiet
    kw.leases.release_many(_ids(kw))  # scripts loaded
    holding = kw.leases.hold("a", "s", MANIFEST, auto_renew=False)
    held = holding.__enter__()
    assert _sent(held.lease_ids, lambda: holding.__exit__(None, None, None)) == ["FCALL"]
    assert all(kw.leases.get(i).state is LeaseState.RELEASED for i in held.lease_ids)  # type: ignore[union-attr]


def test_each_release_publishes_its_wake_up(kw: Klockwork, namespace: str) -> None:
    """The wake-ups other processes hear: one per released lease, as ``release`` sends."""
    ids = _ids(kw)
    client = redis.Redis.from_url(REDIS_URL)
    pubsub = client.pubsub()
    pubsub.subscribe(f"{{{namespace}}}:lease:wake")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    assert kw.leases.release_many([ids[3], "unknown", ids[0]]) == [True, False, True]
    heard = [pubsub.get_message(timeout=5) for _ in range(2)]
    token = kw.store._lease_token  # type: ignore[attr-defined]
    assert [m["data"] for m in heard] == [
        f"{token} FILE:/m/3".encode(),
        f"{token} FILE:/m/0".encode(),
    ]  # type: ignore[index]
    assert pubsub.get_message(timeout=0.2) is None
    pubsub.close()
    client.close()


def test_a_waiter_of_another_store_wakes_without_polling(kw: Klockwork, namespace: str) -> None:
    """Both clocks are manual and never move: only the published end can wake the waiter."""
    waiter = Klockwork(_store(namespace), clock=ManualClock(T0))
    try:
        waiter.register_agent("old", 1)
        kw.register_agent("young", 2)
        ids = _ids(kw, "young")
        deadline = time.monotonic() + 10
        while not waiter.store.lease_pushes_wakeups():  # starts the listener; wait until subscribed
            assert time.monotonic() < deadline, "the wake-up listener never subscribed"
            time.sleep(0.01)
        result: list[Any] = []
        thread = threading.Thread(
            target=lambda: result.append(
                waiter.leases.acquire("old", "s", ("FILE:/m/2", "MUTATES"), timeout_s=30)
            )
        )
        thread.start()
        while waiter.leases.waiting == 0:
            assert time.monotonic() < deadline and thread.is_alive(), "the waiter never slept"
            time.sleep(0.005)
        assert kw.leases.release_many(ids) == [True] * 5
        thread.join(10)
        assert result and result[0].granted
    finally:
        waiter.close()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_lost_reply_still_says_released(kw: Klockwork, flavour: str) -> None:
    ids = _ids(kw)
    lost = LoseFirstReply(kw.store, scripts.RELEASE_MANY, redis.TimeoutError)  # type: ignore[arg-type]
    if flavour == "sync":
        result = kw.leases.release_many(ids)
    else:
        result = asyncio.run(kw.leases.arelease_many(ids))
    assert lost.calls == 2  # asked again with the same request id: answered from its outcome
    assert result == [True] * 5  # not "was not active"
    assert kw.leases.list() == []
    kinds = [e.kind for e in kw.audit.query().entries]
    assert kinds == ["lease.granted"] * 5 + ["lease.released"] * 5  # written once
