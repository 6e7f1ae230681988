"""Fixtures of the lease conformance suite.

Every conformance test takes the ``api`` fixture and so runs four times:
on the memory and the SQLite store, through the sync and the async API.
:class:`Api` exposes each operation once, as a coroutine; the ``sync``
flavour calls the sync method (blocking ones on a worker thread, the way a
sync agent would call them) and the ``async`` flavour awaits the ``a``-twin.

On Redis (``KLOCKWORK_TEST_REDIS_URL``, e.g. ``redis://127.0.0.1:6379/15``)
each test uses namespaces of its own, deleted at teardown (never FLUSHDB:
the database is shared); without the variable the Redis runs skip.

Time is a :class:`~klockwork.ManualClock`: nothing here waits on real time
except :func:`eventually`, which polls a condition with a generous deadline
and is only used to observe another thread or task reaching a known state.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from klockwork import (
    AgentInfo,
    GovernanceEvent,
    HeldLeases,
    Klockwork,
    Lease,
    ManualClock,
    MemoryStore,
    SqliteStore,
    Store,
    Verdict,
)
from klockwork.core.clock import Clock

VECTORS = Path(__file__).parent / "vectors"
STORES = ("memory", "sqlite", "redis")
#: The Redis the ``redis`` runs use (a database they share with others: each
#: test works in namespaces of its own and deletes them).
REDIS_URL = os.environ.get("KLOCKWORK_TEST_REDIS_URL", "")
REDIS_SKIP = (
    "Redis tests need a server: KLOCKWORK_TEST_REDIS_URL=redis://127.0.0.1:6379/15 make test "
    "runs them"
)
FLAVOURS = ("sync", "async")
T0 = 1_000_000  # ManualClock start (epoch ms)
REAL_TIMEOUT_S = 15.0  # how long eventually() waits for another thread/task


def load_vectors(name: str) -> Any:
    """One JSON vector file of ``tests/conformance/vectors``."""
    return json.loads((VECTORS / name).read_text())


def skip_without_redis() -> str:
    """The test Redis URL; skips the test when none is configured."""
    if not REDIS_URL:
        pytest.skip(REDIS_SKIP)
    return REDIS_URL


def redis_url(namespace: str) -> str:
    """The test Redis URL with ``?namespace=`` (skips without a configured Redis)."""
    base = skip_without_redis()
    return f"{base}{'&' if '?' in base else '?'}namespace={namespace}"


def drop_redis_namespace(namespace: str) -> None:
    """Delete every key of a test namespace (SCAN + UNLINK; never FLUSHDB: the db is shared)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        batch = []
        for key in client.scan_iter(match=f"{{{namespace}}}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)
    finally:
        client.close()


class StoreMaker:
    """Opens stores of one kind for one test; the same ``name`` names the same store
    (one SQLite file, one Redis namespace), as another process would open it."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.namespaces: set[str] = set()
        self._test = uuid.uuid4().hex[:16]

    def __call__(self, name: str = "kw.db", **kwargs: Any) -> Store:
        if self.kind == "memory":
            return MemoryStore(**kwargs)
        if self.kind == "sqlite":
            return SqliteStore(self.tmp_path / name, **kwargs)
        from klockwork import RedisStore

        namespace = f"t-{self._test}-{name.replace('/', '_')}"
        url = redis_url(namespace)
        self.namespaces.add(namespace)
        kwargs.setdefault("server_time", False)  # the suite drives a ManualClock
        return RedisStore(url, **kwargs)

    def cleanup(self) -> None:
        for namespace in self.namespaces:
            drop_redis_namespace(namespace)


async def eventually(condition: Callable[[], bool], what: str = "condition") -> None:
    """Wait (yielding to the loop) until ``condition()`` is true; fail after a while."""
    deadline = time.monotonic() + REAL_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


async def in_threads(fn: Callable[..., Any], args: list[tuple[Any, ...]]) -> list[Any]:
    """Run ``fn(*a)`` for every ``a`` at once, each on its own thread; gather the results.

    The threads start together behind a barrier, so they really race.
    """
    barrier = threading.Barrier(len(args))

    def start(*a: Any) -> Any:
        barrier.wait(timeout=REAL_TIMEOUT_S)
        return fn(*a)

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=len(args)) as pool:
        return list(await asyncio.gather(*(loop.run_in_executor(pool, start, *a) for a in args)))


class Api:
    """The lease API, once per flavour, as coroutines."""

    def __init__(self, kw: Klockwork, flavour: str, clock: ManualClock, store_kind: str) -> None:
        self.kw = kw
        self.flavour = flavour
        self.clock = clock
        self.store_kind = store_kind
        self.is_async = flavour == "async"
        self.events: list[GovernanceEvent] = []
        kw.add_listener(self.events.append)
        # Every try a request makes, as the store answered it. A blocking
        # acquire's refused tries are not decisions (no event, no audit
        # entry: one outcome per call), so tests watch its tries here.
        self.tried: list[tuple[str, str]] = []
        store, decide = kw.store, kw.store.try_acquire

        def try_acquire(request: Any) -> Any:
            outcome = decide(request)
            self.tried.append((request.agent_id, outcome.status.value))
            return outcome

        store.try_acquire = try_acquire  # type: ignore[method-assign]
        if type(store).atry_acquire is not Store.atry_acquire:
            # The store's async twin does its own I/O (Redis): watch it too.
            adecide = store.atry_acquire

            async def atry_acquire(request: Any) -> Any:
                outcome = await adecide(request)
                self.tried.append((request.agent_id, outcome.status.value))
                return outcome

            store.atry_acquire = atry_acquire  # type: ignore[method-assign]

    def __repr__(self) -> str:
        return f"Api({self.store_kind}, {self.flavour})"

    # -- operations with an async twin ------------------------------------
    async def register_agent(self, agent_id: str, priority: int | None = None) -> AgentInfo:
        if self.is_async:
            return await self.kw.aregister_agent(agent_id, priority)
        return self.kw.register_agent(agent_id, priority)

    async def try_acquire(
        self, agent_id: str, session_id: str, intents: Any, ttl_ms: int = 10_000
    ) -> Verdict:
        if self.is_async:
            return await self.kw.leases.atry_acquire(agent_id, session_id, intents, ttl_ms)
        return self.kw.leases.try_acquire(agent_id, session_id, intents, ttl_ms)

    async def acquire(
        self,
        agent_id: str,
        session_id: str,
        intents: Any,
        ttl_ms: int = 10_000,
        timeout_s: float | None = None,
    ) -> Verdict:
        if self.is_async:
            return await self.kw.leases.aacquire(agent_id, session_id, intents, ttl_ms, timeout_s)
        return await asyncio.to_thread(
            self.kw.leases.acquire, agent_id, session_id, intents, ttl_ms, timeout_s
        )

    async def release(self, lease_id: str) -> bool:
        if self.is_async:
            return await self.kw.leases.arelease(lease_id)
        return self.kw.leases.release(lease_id)

    async def release_many(self, lease_ids: Any) -> list[bool]:
        if self.is_async:
            return await self.kw.leases.arelease_many(lease_ids)
        return self.kw.leases.release_many(lease_ids)

    async def heartbeat(self, lease_id: str, ttl_ms: int | None = None) -> Lease:
        if self.is_async:
            return await self.kw.leases.aheartbeat(lease_id, ttl_ms)
        return self.kw.leases.heartbeat(lease_id, ttl_ms)

    async def revoke(self, lease_id: str, reason: str = "revoked") -> bool:
        if self.is_async:
            return await self.kw.leases.arevoke(lease_id, reason)
        return self.kw.leases.revoke(lease_id, reason)

    @asynccontextmanager
    async def hold(
        self,
        agent_id: str,
        session_id: str,
        resource: str,
        predicate: str = "MUTATES",
        ttl_ms: int = 10_000,
        **kwargs: Any,
    ) -> AsyncIterator[HeldLeases]:
        """``kw.alease`` (async) or ``kw.lease`` entered on a worker thread (sync)."""
        if self.is_async:
            async with self.kw.alease(
                agent_id, session_id, resource, predicate, ttl_ms, **kwargs
            ) as held:
                yield held
            return
        cm = self.kw.lease(agent_id, session_id, resource, predicate, ttl_ms, **kwargs)
        held = await asyncio.to_thread(cm.__enter__)
        try:
            yield held
        except BaseException as exc:
            if not cm.__exit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            cm.__exit__(None, None, None)

    # -- sync-only operations ---------------------------------------------
    def get(self, lease_id: str) -> Lease | None:
        return self.kw.leases.get(lease_id)

    def list(self, agent_id: str | None = None, resource: str | None = None) -> list[Lease]:
        return self.kw.leases.list(agent_id=agent_id, resource=resource)

    def validate(self, lease_id: str) -> Lease:
        return self.kw.leases.validate(lease_id)

    def check_fencing(self, resource: str, token: int) -> None:
        self.kw.leases.check_fencing(resource, token)

    def sweep(self) -> int:
        return self.kw.leases.sweep()

    # -- helpers ------------------------------------------------------------
    def tries(self, agent_id: str) -> list[str]:
        """The store's answers (``GRANTED``, ``WAIT``, ``DIE``) to each try of one agent."""
        return [status for agent, status in self.tried if agent == agent_id]

    def kinds(self, agent_id: str | None = None) -> list[str]:
        """Kinds of the events seen so far (optionally of one agent)."""
        return [e.kind for e in self.events if agent_id is None or e.agent_id == agent_id]

    async def until_sleeping(self, n: int = 1) -> None:
        """Wait until ``n`` waits/sleeps are armed on the manual clock.

        After this, ``clock.advance`` is sure to reach them.
        """
        await eventually(lambda: self.clock.pending_timers >= n, f"{n} sleeper(s)")


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        skip_without_redis()
    return str(request.param)


@pytest.fixture
def make_store(store_kind: str, tmp_path: Path) -> Iterator[StoreMaker]:
    """Factory of stores of the parametrised kind (Redis namespaces deleted at teardown)."""
    maker = StoreMaker(store_kind, tmp_path)
    yield maker
    maker.cleanup()


@pytest.fixture(params=FLAVOURS)
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_kw(make_store: StoreMaker) -> Iterator[Callable[..., Klockwork]]:
    """Factory of engines on the parametrised store (closed at teardown)."""
    made: list[Klockwork] = []

    def make(clock: Clock | None = None, *, db: str = "kw.db") -> Klockwork:
        kw = Klockwork(make_store(db), clock=clock)
        made.append(kw)
        return kw

    yield make
    for kw in made:
        kw.close()


@pytest.fixture
def engine(make_store: StoreMaker, clock: ManualClock) -> Iterator[Callable[..., Klockwork]]:
    """Factory of engines on the parametrised store and the manual clock, with
    engine keyword arguments (``default_effect=...``); closed at teardown.
    Every call on SQLite or Redis opens the same store, like another process would."""
    made: list[Klockwork] = []

    def make(**kwargs: Any) -> Klockwork:
        kw = Klockwork(make_store("gates.db"), clock=kwargs.pop("clock", clock), **kwargs)
        made.append(kw)
        return kw

    yield make
    for kw in made:
        kw.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start_ms=T0)


@pytest.fixture
async def api(
    make_kw: Callable[..., Klockwork], clock: ManualClock, flavour: str, store_kind: str
) -> AsyncIterator[Api]:
    """The engine under test, through one API flavour, on a manual clock."""
    api = Api(make_kw(clock), flavour, clock, store_kind)
    yield api
    await release_everyone(api.kw, clock)


async def release_everyone(kw: Klockwork, clock: ManualClock) -> None:
    """Wake whatever a failed test left waiting, so no worker thread outlives the loop.

    Each advance expires every lease; a woken waiter may be granted and so
    block the next one, hence the loop.
    """
    if kw.closed:
        return  # closing woke every waiter already
    for _ in range(100):
        if clock.pending_timers == 0 and kw.leases.waiting == 0:
            await asyncio.sleep(0.01)
            if clock.pending_timers == 0 and kw.leases.waiting == 0:
                return
        clock.advance(10**9)
        await asyncio.sleep(0.005)
