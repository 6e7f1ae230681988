"""The hot path's scripts as Redis 7 functions: loaded when missing, EVALSHA where refused.

Needs ``KLOCKWORK_TEST_REDIS_URL`` (e.g. ``redis://127.0.0.1:6379/15``).
A function library belongs to the whole server, not to a database: these
tests delete only the library of this version of klockwork, which any
store loads again on its next call.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from conformance.conftest import drop_redis_namespace

from klockwork import Klockwork, ManualClock, RedisStore
from klockwork.core.stores.redis import scripts

REDIS_URL = os.environ.get("KLOCKWORK_TEST_REDIS_URL", "")
pytestmark = pytest.mark.skipif(
    not REDIS_URL,
    reason="Redis tests need a server: KLOCKWORK_TEST_REDIS_URL=redis://127.0.0.1:6379/15 "
    "make test runs them",
)
LIBRARY = scripts.LEASE_LIBRARY.split("\n", 1)[0].removeprefix("#!lua name=")


@pytest.fixture
def kw() -> Iterator[Klockwork]:
    namespace = f"t-{uuid.uuid4().hex[:16]}-fn"
    sep = "&" if "?" in REDIS_URL else "?"
    store = RedisStore(f"{REDIS_URL}{sep}namespace={namespace}", server_time=False)
    engine = Klockwork(store, clock=ManualClock(1_000_000))
    yield engine
    engine.close()
    drop_redis_namespace(namespace)


def _drop_library() -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.function_delete(LIBRARY)
    except redis.ResponseError as exc:  # not loaded
        assert "not found" in str(exc).lower()
    finally:
        client.close()


def _cycle(kw: Klockwork) -> None:
    verdict = kw.leases.try_acquire("a", "s", [("FILE:/x", "MUTATES"), ("FILE:/y", "MUTATES")])
    assert verdict.granted
    renewed = kw.leases.heartbeat(verdict.leases[0].lease_id)
    assert renewed.lease_id == verdict.leases[0].lease_id
    assert kw.leases.release(verdict.leases[0].lease_id)
    assert kw.leases.release_many([verdict.leases[1].lease_id]) == [True]


def test_the_library_names_carry_its_version() -> None:
    assert LIBRARY.startswith("klockwork_leases_")
    assert set(scripts.FUNCTIONS) == {
        scripts.ACQUIRE,
        scripts.END,
        scripts.RELEASE_MANY,
        scripts.HEARTBEAT,
    }
    assert all(name.startswith(LIBRARY + "_") for name in scripts.FUNCTIONS.values())


def test_a_server_without_the_library_gets_it_on_the_first_call(kw: Klockwork) -> None:
    _drop_library()  # a new server, or one restarted without persistence
    _cycle(kw)
    client = redis.Redis.from_url(REDIS_URL)
    loaded = client.function_list(LIBRARY)  # [[b"library_name", name, ...]]
    client.close()
    assert len(loaded) == 1 and LIBRARY.encode() in loaded[0]
    _drop_library()  # and again, under a store that already called it
    _cycle(kw)
    assert [e.kind for e in kw.audit.query().entries].count("lease.released") == 4


def test_the_async_client_loads_it_too(kw: Klockwork) -> None:
    async def go() -> None:
        _drop_library()
        verdict = await kw.leases.atry_acquire("a", "s", ("FILE:/x", "MUTATES"))
        _drop_library()
        await kw.leases.aheartbeat(verdict.lease.lease_id)
        _drop_library()
        assert await kw.leases.arelease_many([verdict.lease.lease_id]) == [True]

    asyncio.run(go())


def test_a_server_that_refuses_functions_gets_the_scripts_through_evalsha(
    kw: Klockwork,
) -> None:
    """As behind a proxy or an ACL without FUNCTION: the same scripts, by EVALSHA.

    (The refusal is injected on the client: the shared test server allows FUNCTION.)
    """
    _drop_library()
    client = kw.store._conn.sync  # type: ignore[attr-defined]
    refused: list[Any] = []

    def function_load(code: str, replace: bool = False) -> Any:
        refused.append(code)
        raise redis.ResponseError("unknown command 'FUNCTION', with args beginning with: 'LOAD'")

    client.function_load = function_load
    _cycle(kw)
    _cycle(kw)
    assert len(refused) == len(scripts.FUNCTIONS)  # once per script, then EVALSHA only
    assert [e.kind for e in kw.audit.query().entries].count("lease.released") == 4
