"""``@klock_protected(klock_client, ...)`` with a client of Klock itself, driven as Klock does.

Users switch from ``klock-langchain`` by changing an import: Klock's own
client (or any object with its methods) keeps working, with Klock's
semantics — and without blocking an event loop or leaking a lease.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.tools import tool
from lc_helpers import OLD, YOUNG, FakeKlock

from klockwork import InvalidRequestError
from klockwork.integrations.langchain import KlockConflictError, klock_protected


class ScriptedKlock(FakeKlock):
    """Answers ``acquire_lease`` from a script first, then as :class:`FakeKlock`."""

    def __init__(self, *answers: dict[str, Any]) -> None:
        super().__init__()
        self.answers = list(answers)
        self.acquire_times: list[float] = []

    def acquire_lease(self, *args: Any) -> dict[str, Any]:
        self.acquire_times.append(time.monotonic())
        if self.answers:
            self.calls.append(("acquire", *map(str, args[:2])))
            return self.answers.pop(0)
        return super().acquire_lease(*args)


@pytest.fixture
def klock() -> Iterator[FakeKlock]:
    client = FakeKlock()
    client.register_agent(OLD, 0)
    client.register_agent(YOUNG, 100)
    yield client


def protected(client: Any, agent: str = YOUNG, **options: Any) -> Any:
    @klock_protected(client, agent, "s1", "FILE", lambda kwargs: kwargs["path"], **options)
    def write(path: str) -> str:
        """Write a file."""
        return f"wrote {path}"

    return write


def test_calls_the_client_with_klocks_arguments_and_releases(klock: FakeKlock) -> None:
    assert protected(klock, max_retries=0)("/a") == "wrote /a"
    assert klock.calls == [("acquire", YOUNG, "FILE:/a", "MUTATES"), ("release", "lease-1")]
    assert klock.holders == {}


def test_wait_sleeps_wait_time_and_retries_up_to_max_retries() -> None:
    wait = {"success": False, "reason": "WAIT", "wait_time": 30}
    client = ScriptedKlock(wait, wait)
    assert protected(client, max_retries=2)("/a") == "wrote /a"
    gaps = [b - a for a, b in zip(client.acquire_times, client.acquire_times[1:], strict=False)]
    assert len(gaps) == 2 and all(g >= 0.03 for g in gaps)


def test_a_wait_without_a_time_sleeps_klocks_second() -> None:
    client = ScriptedKlock({"success": False, "reason": "WAIT", "wait_time": None})
    started = time.monotonic()
    protected(client, max_retries=1)("/a")
    assert time.monotonic() - started >= 1.0


def test_exhausted_waits_raise_wait_timeout() -> None:
    wait = {"success": False, "reason": "WAIT", "wait_time": 5}
    client = ScriptedKlock(wait, wait, wait)
    with pytest.raises(KlockConflictError) as info:
        protected(client, max_retries=2)("/a")
    assert (info.value.reason, info.value.agent_id, info.value.resource_path) == (
        "WAIT_TIMEOUT",
        YOUNG,
        "/a",
    )
    assert len(client.acquire_times) == 3  # one try, then max_retries retries


def test_die_is_retried_keeping_the_request_and_succeeds_once_freed(klock: FakeKlock) -> None:
    """Klock's own decorator gave up on DIE at once; wait-die says restart."""
    klock.acquire_lease(OLD, "s", "FILE", "/a", "MUTATES", 60_000)
    threading.Timer(0.15, klock.release_lease, ["lease-1"]).start()
    assert protected(klock, max_retries=20)("/a") == "wrote /a"
    tries = [c for c in klock.calls if c[:2] == ("acquire", YOUNG)]
    assert len(tries) >= 2


def test_exhausted_dies_raise_die(klock: FakeKlock) -> None:
    klock.acquire_lease(OLD, "s", "FILE", "/a", "MUTATES", 60_000)
    with pytest.raises(KlockConflictError) as info:
        protected(klock, max_retries=1)("/a")
    assert info.value.reason == "DIE"
    assert "did not run" in str(info.value)


def test_any_other_reason_is_refused_at_once() -> None:
    client = ScriptedKlock({"success": False, "reason": "STORAGE_UNAVAILABLE"})
    with pytest.raises(KlockConflictError) as info:
        protected(client, max_retries=5)("/a")
    assert info.value.reason == "STORAGE_UNAVAILABLE"
    assert len(client.acquire_times) == 1


def test_extractor_errors_are_value_errors(klock: FakeKlock) -> None:
    @klock_protected(klock, YOUNG, "s1", "FILE", lambda kwargs: kwargs["nope"])
    def write(path: str) -> str:
        """Write a file."""
        return "ran"

    with pytest.raises(ValueError, match="raised KeyError"):
        write("/a")
    with pytest.raises(ValueError, match="'path' is empty"):
        protected(klock)("")
    assert klock.calls == []


def test_released_when_the_tool_raises(klock: FakeKlock) -> None:
    @klock_protected(klock, YOUNG, "s1", "FILE", lambda kwargs: kwargs["path"])
    def boom(path: str) -> str:
        """Fail."""
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        boom("/a")
    assert klock.holders == {} and klock.calls[-1] == ("release", "lease-1")


def test_heartbeats_renew_while_a_long_tool_runs(klock: FakeKlock) -> None:
    @klock_protected(klock, YOUNG, "s1", "FILE", lambda kwargs: kwargs["path"], ttl_ms=60)
    def slow(path: str) -> str:
        """Take a while."""
        time.sleep(0.2)
        return "done"

    assert slow("/a") == "done"
    beats = [c for c in klock.calls if c[0] == "heartbeat"]
    assert len(beats) >= 3  # every ttl/3 = 20 ms for 200 ms
    time.sleep(0.05)
    assert len([c for c in klock.calls if c[0] == "heartbeat"]) == len(beats)  # stopped


def test_a_manifest_never_holds_part_while_waiting(klock: FakeKlock) -> None:
    klock.acquire_lease(OLD, "s", "FILE", "/b", "MUTATES", 60_000)

    @klock_protected(klock, YOUNG, "s1", "FILE", lambda kwargs: [kwargs["dst"], kwargs["src"]])
    def move(src: str, dst: str) -> str:
        """Move a file."""
        return "moved"

    with pytest.raises(KlockConflictError):
        move("/a", dst="/b")
    assert [agent for agent, _ in klock.holders.values()] == [OLD]  # /a given back
    acquired = [c[2] for c in klock.calls if c[:2] == ("acquire", YOUNG)]
    assert acquired[:2] == ["FILE:/a", "FILE:/b"]  # sorted order


def test_a_tool_object_and_the_klock_form_identity_from_config(klock: FakeKlock) -> None:
    @tool
    @klock_protected(klock, None, None, "FILE", lambda kwargs: kwargs["path"])
    def write(path: str) -> str:
        """Write a file."""
        return "ok"

    assert write.invoke({"path": "/a"}, {"configurable": {"agent_id": OLD, "thread_id": "t"}})
    assert klock.calls[0] == ("acquire", OLD, "FILE:/a", "MUTATES")


@pytest.mark.parametrize("client", [object(), "not a client", 42])
def test_an_object_without_klocks_methods_is_refused(client: Any) -> None:
    with pytest.raises(InvalidRequestError, match="klock_client") as info:
        klock_protected(client, YOUNG, "s1", "FILE", lambda kwargs: kwargs["path"])
    assert "acquire_lease" in str(info.value)


async def test_async_waits_never_block_the_loop() -> None:
    wait = {"success": False, "reason": "WAIT", "wait_time": 50}
    client = ScriptedKlock(wait, wait, wait)

    @klock_protected(client, YOUNG, "s1", "FILE", lambda kwargs: kwargs["path"], max_retries=3)
    async def write(path: str) -> str:
        """Write a file."""
        return "ok"

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    beat = asyncio.create_task(ticker())
    assert await write("/a") == "ok"
    beat.cancel()
    assert ticks >= 15  # ~150 ms of waiting, the loop kept ticking
    assert client.holders == {}


async def test_cancelling_while_the_client_answers_gives_the_lease_back(
    klock: FakeKlock,
) -> None:
    slow = threading.Event()
    original = klock.acquire_lease

    def slow_acquire(*args: Any) -> dict[str, Any]:
        slow.wait(1)  # the client call outlives the caller's patience
        return original(*args)

    klock.acquire_lease = slow_acquire  # type: ignore[method-assign]

    @klock_protected(klock, YOUNG, "s1", "FILE", lambda kwargs: kwargs["path"])
    async def write(path: str) -> str:
        """Write a file."""
        return "ok"

    task = asyncio.create_task(write("/a"))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    slow.set()
    for _ in range(100):  # the late grant is given back by the client's thread
        if klock.calls and klock.calls[-1][0] == "release":
            break
        await asyncio.sleep(0.01)
    assert klock.holders == {}
