"""The stores' record layer: one atomic, pure transition per call, on every store."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from klockwork import MemoryStore, SqliteStore, Store, StoreUnavailableError


class Counter(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    value: int = 0
    status: str = "open"


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "redis":
        yield from _redis_store()
        return
    s: Store = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "r.db")
    yield s
    s.close()


def _redis_store() -> Iterator[Store]:
    """A RedisStore in a namespace of its own (``KLOCKWORK_TEST_REDIS_URL``), deleted after."""
    base = os.environ.get("KLOCKWORK_TEST_REDIS_URL", "")
    if not base:
        pytest.skip(
            "Redis tests need a server: KLOCKWORK_TEST_REDIS_URL=redis://127.0.0.1:6379/15 "
            "make test runs them"
        )
    import redis

    from klockwork import RedisStore

    namespace = f"t-{uuid.uuid4().hex[:16]}-records"
    s = RedisStore(f"{base}{'&' if '?' in base else '?'}namespace={namespace}")
    try:
        yield s
    finally:
        s.close()
        client = redis.Redis.from_url(base)
        keys = list(client.scan_iter(match=f"{{{namespace}}}:*"))
        if keys:
            client.unlink(*keys)
        client.close()


def bump(current: Counter | None) -> tuple[Counter | None, int]:
    new = (current or Counter(name="c")).model_copy(
        update={"value": (current.value if current else 0) + 1}
    )
    return new, new.value


def test_create_update_get(store: Store) -> None:
    assert store.get_record("counter", "a", Counter) is None
    assert store.update_record("counter", "a", Counter, bump) == 1
    assert store.update_record("counter", "a", Counter, bump) == 2
    got = store.get_record("counter", "a", Counter)
    assert got is not None and got.value == 2


def test_same_object_writes_nothing_and_none_deletes(store: Store) -> None:
    store.update_record("counter", "a", Counter, bump)
    assert store.update_record("counter", "a", Counter, lambda c: (c, "kept")) == "kept"
    assert store.get_record("counter", "a", Counter) == Counter(name="c", value=1)
    store.update_record("counter", "a", Counter, lambda c: (None, None))
    assert store.get_record("counter", "a", Counter) is None


def test_a_raising_transition_changes_nothing(store: Store) -> None:
    store.update_record("counter", "a", Counter, bump)

    def boom(current: Counter | None) -> tuple[Counter | None, None]:
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        store.update_record("counter", "a", Counter, boom)
    assert store.get_record("counter", "a", Counter) == Counter(name="c", value=1)


def test_list_keeps_creation_order_and_filters_by_status(store: Store) -> None:
    for key in ("b", "a", "c"):
        store.update_record("counter", key, Counter, lambda c, k=key: (Counter(name=k), None))
    store.update_record(
        "counter", "a", Counter, lambda c: (Counter(name="a", status="closed"), None)
    )
    assert [c.name for c in store.list_records("counter", Counter)] == ["b", "a", "c"]
    assert [c.name for c in store.list_records("counter", Counter, "closed")] == ["a"]
    assert store.list_records("other", Counter) == []


def test_concurrent_updates_are_serialised(store: Store) -> None:
    def work() -> None:
        for _ in range(50):
            store.update_record("counter", "n", Counter, bump)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = store.get_record("counter", "n", Counter)
    assert got is not None and got.value == 400


def test_closed_store_fails_closed(store: Store) -> None:
    store.close()
    with pytest.raises(StoreUnavailableError):
        store.update_record("counter", "a", Counter, bump)


async def test_async_twins(store: Store) -> None:
    assert await store.aupdate_record("counter", "a", Counter, bump) == 1
    assert (await store.aget_record("counter", "a", Counter)) == Counter(name="c", value=1)
    assert len(await store.alist_records("counter", Counter)) == 1


def test_memory_keeps_a_bounded_number_of_settled_gate_records() -> None:
    store = MemoryStore(retain_inactive=3)
    store.update_record(
        "gate", "pending", Counter, lambda c: (Counter(name="p", status="requested"), None)
    )
    for i in range(5):
        store.update_record(
            "gate",
            f"g{i}",
            Counter,
            lambda c, i=i: (Counter(name=f"g{i}", status="executed"), None),
        )
    names = [c.name for c in store.list_records("gate", Counter)]
    assert names == ["p", "g3", "g4"]  # the requested one is never dropped
