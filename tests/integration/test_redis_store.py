"""What only the Redis store has to prove: lost replies, skewed clocks, retention, failures.

The shared behaviour is the conformance suite's (``tests/conformance``, the
``redis`` store). Needs ``KLOCKWORK_TEST_REDIS_URL`` (e.g.
``redis://127.0.0.1:6379/15``); each test works in a namespace of its own,
deleted afterwards (never FLUSHDB: the database is shared).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from lost_replies import LoseFirstReply

from klockwork import (
    CapabilityError,
    InvalidRequestError,
    Klockwork,
    LeaseExpiredError,
    ManualClock,
    Policy,
    RedisStore,
    StaleLeaseError,
    StoreUnavailableError,
    VerdictStatus,
)
from klockwork.core.governance.outcomes import GateRecord
from klockwork.core.stores.redis import scripts, unknown
from klockwork.core.stores.redis.clock import ServerClock

REDIS_URL = os.environ.get("KLOCKWORK_TEST_REDIS_URL", "")
pytestmark = pytest.mark.skipif(
    not REDIS_URL,
    reason="Redis tests need a server: KLOCKWORK_TEST_REDIS_URL=redis://127.0.0.1:6379/15 "
    "make test runs them",
)
T0 = 1_000_000
MINUTES_10 = 600_000


@pytest.fixture
def url() -> Iterator[str]:
    namespace = f"t-{uuid.uuid4().hex[:16]}-store"
    yield f"{REDIS_URL}{'&' if '?' in REDIS_URL else '?'}namespace={namespace}"
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{{{namespace}}}:*", count=1000))
    if keys:
        client.unlink(*keys)
    client.close()


@pytest.fixture
def opened(url: str) -> Iterator[Callable[..., RedisStore]]:
    made: list[RedisStore] = []

    def make(**kwargs: Any) -> RedisStore:
        store = RedisStore(url, **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def _keys(store: RedisStore, pattern: str) -> list[bytes]:
    return list(store._conn.sync.scan_iter(match=store._conn.key(pattern), count=1000))


@pytest.mark.parametrize("error", [redis.TimeoutError, redis.ConnectionError])
def test_a_lost_acquire_reply_is_resolved_not_guessed(
    opened: Callable[..., RedisStore], error: type[Exception]
) -> None:
    store = opened(server_time=False)
    kw = Klockwork(store, clock=ManualClock(T0))
    lost = LoseFirstReply(store, scripts.ACQUIRE, error)
    verdict = kw.leases.try_acquire("a", "s", ("FILE:/x", "MUTATES"))
    assert lost.calls == 2  # asked again, with the same request id
    assert verdict.granted
    # The retry answered with what the first call did: one grant, one token.
    assert [x.lease_id for x in kw.leases.list()] == [verdict.lease.lease_id]
    assert int(store._conn.sync.get(store._conn.key("token"))) == 1
    assert [e.kind for e in kw.audit.query().entries] == ["lease.granted"]


def test_a_lost_release_reply_still_says_released(opened: Callable[..., RedisStore]) -> None:
    store = opened(server_time=False)
    kw = Klockwork(store, clock=ManualClock(T0))
    lease = kw.leases.try_acquire("a", "s", ("FILE:/x", "MUTATES")).lease
    LoseFirstReply(store, scripts.END, redis.TimeoutError)
    assert kw.leases.release(lease.lease_id) is True  # not "was not active"
    assert kw.leases.list() == []


def test_a_lost_reply_is_resolved_on_the_async_client_too(
    opened: Callable[..., RedisStore],
) -> None:
    store = opened(server_time=False)
    kw = Klockwork(store, clock=ManualClock(T0))

    async def go() -> None:
        lost = LoseFirstReply(store, scripts.ACQUIRE, redis.TimeoutError)
        verdict = await kw.leases.atry_acquire("a", "s", ("FILE:/x", "MUTATES"))
        assert lost.calls == 2 and verdict.granted
        LoseFirstReply(store, scripts.HEARTBEAT, redis.ConnectionError)
        renewed = await kw.leases.aheartbeat(verdict.lease.lease_id, 50_000)
        assert renewed.expires_at == T0 + 50_000
        LoseFirstReply(store, scripts.END, redis.TimeoutError)
        assert await kw.leases.arelease(verdict.lease.lease_id)

    asyncio.run(go())
    assert int(store._conn.sync.get(store._conn.key("token"))) == 1


def test_a_server_that_stays_unreachable_fails_closed(opened: Callable[..., RedisStore]) -> None:
    store = opened(server_time=False)
    kw = Klockwork(store, clock=ManualClock(T0))

    def never(**kw: Any) -> Any:
        raise redis.ConnectionError("down")

    store._conn.script = lambda src: never  # type: ignore[method-assign,assignment]
    with pytest.raises(StoreUnavailableError):
        kw.leases.try_acquire("a", "s", ("FILE:/x", "MUTATES"))


def test_no_server_no_store() -> None:
    with pytest.raises(StoreUnavailableError, match="incarnation"):
        RedisStore("redis://127.0.0.1:1/0")


def test_a_closed_store_fails_closed(opened: Callable[..., RedisStore]) -> None:
    store = opened(server_time=False)
    store.close()
    store.close()  # idempotent
    kw = Klockwork(opened(server_time=False), clock=ManualClock(T0))
    kw.store.close()
    with pytest.raises(StoreUnavailableError):
        kw.leases.try_acquire("a", "s", ("FILE:/x", "MUTATES"))


# -- time ----------------------------------------------------------------------------
def test_skewed_clients_get_leases_that_expire_by_server_time(
    opened: Callable[..., RedisStore],
) -> None:
    """Two machines, one ten minutes slow and one ten minutes fast, agree on expiry."""
    real_now = time.time_ns() // 1_000_000
    slow = Klockwork(opened(), clock=ManualClock(real_now - MINUTES_10))
    fast = Klockwork(opened(), clock=ManualClock(real_now + MINUTES_10))
    lease = slow.leases.try_acquire("a", "s", ("FILE:/x", "MUTATES"), ttl_ms=400).lease
    server_now = slow.store.server_now_ms()  # type: ignore[attr-defined]
    assert abs(lease.acquired_at - server_now) < 2_000  # dated by the server, not the client
    assert lease.expires_at == lease.acquired_at + 400
    # The fast machine's clock says the lease ran out ten minutes ago: it still holds.
    assert fast.leases.try_acquire("b", "s", ("FILE:/x", "MUTATES")).status is not (
        VerdictStatus.GRANTED
    )
    time.sleep(0.6)  # real time: the server's clock passes the expiry
    # Neither manual clock moved, yet the lease expired for both.
    assert fast.leases.try_acquire("b", "s", ("FILE:/x", "MUTATES")).granted
    with pytest.raises(LeaseExpiredError):
        slow.leases.heartbeat(lease.lease_id)


def test_open_gives_the_engine_the_servers_clock(url: str) -> None:
    with Klockwork.open(url) as kw:
        assert isinstance(kw.clock, ServerClock)
        assert abs(kw.clock.now_ms() - kw.store.server_now_ms()) < 1_000  # type: ignore[attr-defined]
    with Klockwork.open(url, clock=ManualClock(T0)) as kw:
        assert kw.clock.now_ms() == T0  # an explicit clock wins


def test_server_clock_follows_an_offset_and_never_goes_back() -> None:
    offset = [MINUTES_10]
    clock = ServerClock(lambda: time.time_ns() // 1_000_000 + offset[0], resync_s=0.0)
    first = clock.now_ms()
    assert abs(first - (time.time_ns() // 1_000_000 + MINUTES_10)) < 1_000
    assert abs(clock.offset_ms - MINUTES_10) < 1_000
    offset[0] = 0  # the server "goes back" ten minutes: now_ms holds still instead
    assert clock.now_ms() >= first


# -- records -------------------------------------------------------------------------
def test_two_stores_voting_at_once_decide_once(url: str) -> None:
    """Approvals decided from two stores (two connection pools, like two machines)."""
    clock = ManualClock(T0)
    engines = [Klockwork(RedisStore(url, server_time=False), clock=clock) for _ in range(2)]
    try:
        first = engines[0]
        first.policies.add(
            Policy(name="ask", action="deploy", effect="require_approval", approvers=["x", "y"])
        )
        engines[1].policies.add(
            Policy(name="ask", action="deploy", effect="require_approval", approvers=["x", "y"])
        )
        approval_id = first.gates.execute("dev", "deploy", {}).approval_id
        assert approval_id is not None
        barrier = threading.Barrier(8)
        outcomes: list[str] = []

        def vote(i: int) -> None:
            kw = engines[i % 2]
            barrier.wait(10)
            try:
                if i % 2:
                    kw.approvals.deny(approval_id, "y", reason="no")
                else:
                    kw.approvals.approve(approval_id, "x")
                outcomes.append("decided")
            except Exception as exc:  # later voters find it decided
                outcomes.append(type(exc).__name__)

        threads = [threading.Thread(target=vote, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        final = first.approvals.get(approval_id)
        assert final.status.value in ("approved", "denied")
        for kw in engines:  # one chain, which both stores see
            decided = kw.audit.query(kind="approval.decided").entries
            assert len(decided) == 1  # one decision, recorded once across both stores
    finally:
        for kw in engines:
            kw.close()


def test_settled_records_are_pruned_pending_ones_kept(opened: Callable[..., RedisStore]) -> None:
    kw = Klockwork(opened(server_time=False, retain_inactive=3), clock=ManualClock(T0))
    kw.policies.add(Policy(name="ok", action="read", effect="allow"))
    kw.policies.add(Policy(name="ask", action="deploy", effect="require_approval"))
    pending = [kw.gates.execute("a", "deploy", {}, event_id=f"p{i}") for i in range(4)]
    for i in range(20):
        kw.gates.execute("a", "read", {}, event_id=f"e{i}")
    gates = kw.store.list_records("gate", GateRecord)
    assert len(gates) <= 3 + 3 + len(pending)  # the limit, one batch, the ones in play
    kept = {r.result.audit_event_id for r in gates}
    assert {p.audit_event_id for p in pending} <= kept
    assert len(kw.approvals.list()) == 4  # pending approvals are never pruned


def test_ended_leases_and_fence_history_are_bounded(opened: Callable[..., RedisStore]) -> None:
    store = opened(server_time=False, retain_inactive=3)
    kw = Klockwork(store, clock=ManualClock(T0))
    first = kw.leases.try_acquire("a", "s", ("FILE:/k/0", "MUTATES")).lease
    assert kw.leases.release(first.lease_id)
    for i in range(1, 1100):  # more keys than the fencing history keeps (1024)
        lease = kw.leases.try_acquire("a", "s", (f"FILE:/k/{i}", "MUTATES")).lease
        assert kw.leases.release(lease.lease_id)
    assert len(_keys(store, "l:*")) == 3
    assert kw.leases.get(first.lease_id) is None
    assert store._conn.sync.zcard(store._conn.key("fence")) <= 1024
    # The pruned key's old token is refused (fail closed), a live one is not.
    with pytest.raises(StaleLeaseError):
        kw.leases.check_fencing("FILE:/k/0", first.fencing_token)
    live = kw.leases.try_acquire("a", "s", ("FILE:/k/0", "MUTATES")).lease
    kw.leases.check_fencing("FILE:/k/0", live.fencing_token)


# -- agents --------------------------------------------------------------------------
def test_agents_on_redis(opened: Callable[..., RedisStore]) -> None:
    kw = Klockwork(opened(server_time=False), clock=ManualClock(T0))
    big = 2**62 + 1  # beyond a double's exact range: compared as an integer
    kw.register_agent("old", big)
    kw.register_agent("young", big + 1)
    held = kw.leases.try_acquire("young", "s", ("TABLE:t", "MUTATES")).lease
    assert kw.leases.try_acquire("old", "s", ("TABLE:t", "MUTATES")).status is VerdictStatus.WAIT
    with pytest.raises(InvalidRequestError):
        kw.register_agent("young", 1)  # no self-promotion while holding
    kw.leases.release(held.lease_id)
    assert kw.register_agent("young", 1).priority == 1
    kw.revoke_agent("young")
    with pytest.raises(CapabilityError):
        kw.leases.try_acquire("young", "s", ("TABLE:t", "MUTATES"))
    assert kw.get_agent("young").revoked_at == T0  # type: ignore[union-attr]


# -- wake-ups across processes ---------------------------------------------------------
def test_a_release_by_another_store_wakes_a_waiter_without_polling(url: str) -> None:
    """Two stores on one namespace (two machines): the waiter is woken by Pub/Sub.

    Both clocks are manual and never move, so a waiter that polled would
    never wake: only the release published by the other store can wake it.
    """
    holder = Klockwork(RedisStore(url, server_time=False), clock=ManualClock(T0))
    waiter = Klockwork(RedisStore(url, server_time=False), clock=ManualClock(T0))
    try:
        waiter.register_agent("old", 1)
        holder.register_agent("young", 2)
        held = holder.leases.try_acquire("young", "s", ("FILE:/x", "MUTATES")).lease
        store = waiter.store
        deadline = time.monotonic() + 10
        while not store.lease_pushes_wakeups():  # starts the listener; wait until subscribed
            assert time.monotonic() < deadline, "the wake-up listener never subscribed"
            time.sleep(0.01)
        tries: list[str] = []
        decide = store.try_acquire

        def counted(request: Any) -> Any:
            outcome = decide(request)
            tries.append(outcome.status.value)
            return outcome

        store.try_acquire = counted  # type: ignore[method-assign]
        result: list[Any] = []
        thread = threading.Thread(
            target=lambda: result.append(
                waiter.leases.acquire("old", "s", ("FILE:/x", "MUTATES"), timeout_s=30)
            )
        )
        thread.start()
        while waiter.leases.waiting == 0:
            assert time.monotonic() < deadline and thread.is_alive(), "the waiter never slept"
            time.sleep(0.005)
        assert holder.leases.release(held.lease_id)
        thread.join(10)
        assert result and result[0].granted
        assert tries.count("WAIT") <= 2  # asked again when woken, not on a poll
    finally:
        holder.close()
        waiter.close()


def test_fencing_under_a_directory_with_thousands_of_keys(
    opened: Callable[..., RedisStore],
) -> None:
    store = opened(server_time=False)
    kw = Klockwork(store, clock=ManualClock(T0))
    top = kw.leases.try_acquire("a", "s", ("FILE:/big", "MUTATES")).lease
    kw.leases.release(top.lease_id)
    for i in range(2500):  # more than one ZMSCORE chunk (and than unpack() takes at once)
        lease = kw.leases.try_acquire("a", "s", (f"FILE:/big/{i}", "MUTATES")).lease
        kw.leases.release(lease.lease_id)
    with pytest.raises(StaleLeaseError):  # a newer grant below supersedes it
        kw.leases.check_fencing("FILE:/big", top.fencing_token)


def test_a_held_lease_renews_on_server_time(url: str) -> None:
    """``Klockwork.open`` defaults: server time, the server-synced clock, real renewals."""

    async def go() -> None:
        with Klockwork.open(url) as kw:
            async with kw.alease("a", "s", "FILE:/held", "MUTATES", ttl_ms=300) as held:
                await asyncio.sleep(0.8)  # well past the TTL: renewed every 100 ms
                assert not held.lost
                other = await kw.leases.atry_acquire("b", "s", ("FILE:/held", "MUTATES"))
                assert other.status is not VerdictStatus.GRANTED
            assert kw.leases.list() == []

    asyncio.run(go())


class HoldBack:
    """Wraps the acquire script: its calls are kept (not sent) and fail as timeouts.

    ``deliver()`` then sends what was kept, as a frozen server runs what it
    had received once it resumes.
    """

    def __init__(self, store: RedisStore) -> None:
        self.kept: list[dict[str, Any]] = []
        self.real = store._conn.script(scripts.ACQUIRE)
        conn, real_script = store._conn, store._conn.script
        self._restore = lambda: setattr(conn, "script", real_script)

        def script(src: str) -> Any:
            if src != scripts.ACQUIRE:
                return real_script(src)

            def call(**kw: Any) -> Any:
                self.kept.append(kw)
                raise redis.TimeoutError("no reply")

            return call

        conn.script = script  # type: ignore[method-assign]

    def deliver(self) -> None:
        self._restore()
        for kw in self.kept:
            self.real(**kw)


def test_a_grant_made_after_its_caller_gave_up_is_audited_and_given_back(
    opened: Callable[..., RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unknown, "RETRY_S", 5.0)  # the next call resolves, not the thread
    store = opened(server_time=False)
    kw = Klockwork(store, clock=ManualClock(T0))
    held = HoldBack(store)
    with pytest.raises(StoreUnavailableError):
        kw.leases.try_acquire("a", "s", ("FILE:/x", "MUTATES"))
    assert len(held.kept) == 2  # sent, and sent again under the same request id
    held.deliver()  # the server runs them now: one grant (the second finds the first's outcome)
    assert kw.leases.list(agent_id="a") == []  # the next call found it and gave it back
    kinds = [e.kind for e in kw.audit.query().entries]
    assert kinds == ["lease.granted", "lease.released"]  # no grant without its entry
    assert kw.leases.try_acquire("b", "s", ("FILE:/x", "MUTATES")).granted


def test_a_request_that_never_ran_is_marked_done_before_it_arrives(
    opened: Callable[..., RedisStore],
) -> None:
    store = opened(server_time=False)
    kw = Klockwork(store, clock=ManualClock(T0))
    held = HoldBack(store)
    with pytest.raises(StoreUnavailableError):
        kw.leases.try_acquire("a", "s", ("FILE:/x", "MUTATES"))
    held._restore()
    assert kw.leases.list() == []  # this call asked first: the request is marked done
    held.deliver()  # it arrives late, and changes nothing
    assert kw.leases.list() == []
    assert [e.kind for e in kw.audit.query().entries] == []
    assert not store._unknown


def test_a_store_nobody_calls_resolves_a_lost_request_by_itself(
    opened: Callable[..., RedisStore],
) -> None:
    store = opened(server_time=False)
    kw = Klockwork(store, clock=ManualClock(T0))
    held = HoldBack(store)
    with pytest.raises(StoreUnavailableError):
        kw.leases.try_acquire("a", "s", ("FILE:/x", "MUTATES"))
    held.deliver()
    deadline = time.monotonic() + 10
    while store._unknown or store.resolving:  # the resolver thread, every RETRY_S
        assert time.monotonic() < deadline, "never resolved"
        time.sleep(0.01)
    kinds = [e.kind for e in kw.audit.query().entries]
    assert kinds in ([], ["lease.granted", "lease.released"])  # whichever came first
    assert kw.leases.list() == []


def test_lost_requests_are_resolved_together(
    opened: Callable[..., RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unknown, "RETRY_S", 5.0)  # the next call resolves, not the thread
    store = opened(server_time=False)
    kw = Klockwork(store, clock=ManualClock(T0))
    held = HoldBack(store)
    real_resolve = store._raw_list

    def down(source: str, argv: list[str]) -> list[Any]:
        raise StoreUnavailableError("down")  # while Redis is away, resolving fails too

    store._raw_list = down  # type: ignore[method-assign]
    for agent in ("a", "b", "c"):
        with pytest.raises(StoreUnavailableError):
            kw.leases.try_acquire(agent, "s", (f"FILE:/{agent}", "MUTATES"))
    assert len(store._unknown) == 3
    store._raw_list = real_resolve  # type: ignore[method-assign]
    held.kept = held.kept[:2]  # only a's two sends reached the server
    held.deliver()
    assert kw.leases.list() == []  # one round trip resolved all three
    assert not store._unknown
    granted = [e.data["lease_id"] for e in kw.audit.query(kind="lease.granted").entries]
    released = [e.data["lease_id"] for e in kw.audit.query(kind="lease.released").entries]
    assert len(granted) == 1 and granted == released


def test_a_store_refuses_to_grant_once_its_namespace_lost_its_data(
    opened: Callable[..., RedisStore],
) -> None:
    """Keys deleted (or a restart without persistence) under an open store: no double grant."""
    store = opened(server_time=False)
    kw = Klockwork(store, clock=ManualClock(T0))
    held = kw.leases.try_acquire("a", "s", ("FILE:/x", "MUTATES")).lease
    keys = _keys(store, "*")
    store._conn.sync.unlink(*keys)  # the data is gone; the holder still believes it holds
    with pytest.raises(StoreUnavailableError, match="lost its data"):
        kw.leases.try_acquire("b", "s", ("FILE:/x", "MUTATES"))
    # A store opened now starts the namespace afresh; the old one keeps refusing.
    fresh = Klockwork(opened(server_time=False), clock=ManualClock(T0))
    assert fresh.leases.try_acquire("b", "s", ("FILE:/x", "MUTATES")).granted
    with pytest.raises(StoreUnavailableError):
        kw.leases.try_acquire("c", "s", ("FILE:/y", "MUTATES"))
    assert held.fencing_token == 1
