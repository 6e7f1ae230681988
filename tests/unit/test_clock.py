"""Clocks: ManualClock wakes sleepers when advanced time passes their deadline."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from klockwork import Clock, ManualClock, SystemClock
from klockwork.core.clock import LoopAlarm, ThreadAlarm

REAL_TIMEOUT_S = 15.0


def _until(condition: object) -> None:
    deadline = time.monotonic() + REAL_TIMEOUT_S
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


async def _auntil(condition: object) -> None:
    deadline = time.monotonic() + REAL_TIMEOUT_S
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.001)


def test_clocks_satisfy_the_protocol() -> None:
    assert isinstance(ManualClock(), Clock)
    assert isinstance(SystemClock(), Clock)


def test_manual_clock_reads() -> None:
    clock = ManualClock(start_ms=1500)
    assert clock.now_ms() == 1500
    assert clock.monotonic() == 1.5
    clock.advance(250)
    assert clock.now_ms() == 1750
    assert ManualClock().now_ms() == 0
    with pytest.raises(ValueError):
        clock.advance(-1)
    assert clock.now_ms() == 1750


def _sleeper(clock: ManualClock, seconds: float) -> tuple[threading.Thread, threading.Event]:
    woke = threading.Event()
    before = clock.pending_timers

    def run() -> None:
        clock.sleep(seconds)
        woke.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    _until(lambda: clock.pending_timers == before + 1)
    return thread, woke


def test_thread_sleep_wakes_when_advanced_past_its_deadline() -> None:
    clock = ManualClock(start_ms=1000)
    thread, woke = _sleeper(clock, 0.5)
    clock.advance(499)
    assert not woke.wait(0.05)  # not yet: 1 ms of clock time is left
    assert clock.pending_timers == 1
    clock.advance(1)
    assert woke.wait(REAL_TIMEOUT_S)
    thread.join(REAL_TIMEOUT_S)
    assert clock.pending_timers == 0


def test_one_advance_wakes_every_due_sleeper_and_only_those() -> None:
    clock = ManualClock()
    sleepers = [_sleeper(clock, s) for s in (0.1, 0.2, 0.3)]
    _until(lambda: clock.pending_timers == 3)
    clock.advance(250)
    assert sleepers[0][1].wait(REAL_TIMEOUT_S)
    assert sleepers[1][1].wait(REAL_TIMEOUT_S)
    assert not sleepers[2][1].is_set()
    assert clock.pending_timers == 1
    clock.advance(50)
    assert sleepers[2][1].wait(REAL_TIMEOUT_S)


def test_zero_sleep_returns_at_once() -> None:
    clock = ManualClock()
    clock.sleep(0)
    clock.sleep(-1)
    assert clock.pending_timers == 0


def test_thread_wait_returns_when_the_alarm_fires_first() -> None:
    clock = ManualClock()
    alarm = ThreadAlarm()
    done = threading.Event()

    def run() -> None:
        clock.wait(alarm, 60)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    _until(lambda: clock.pending_timers == 1)
    alarm.fire()
    alarm.fire()  # idempotent
    assert done.wait(REAL_TIMEOUT_S)
    assert alarm.fired
    assert clock.pending_timers == 0  # a fired alarm no longer counts
    clock.advance(60_000)  # its stale timer fires harmlessly


def test_wait_without_timeout_ignores_the_clock() -> None:
    clock = ManualClock()
    alarm = ThreadAlarm()
    done = threading.Event()
    threading.Thread(target=lambda: (clock.wait(alarm, None), done.set()), daemon=True).start()
    clock.advance(10**9)
    assert not done.wait(0.05)
    assert clock.pending_timers == 0
    alarm.fire()
    assert done.wait(REAL_TIMEOUT_S)


def test_sleep_wakes_at_exactly_its_deadline_whatever_the_float_rounding() -> None:
    clock = ManualClock()
    _, woke = _sleeper(clock, 2.007)
    clock.advance(2007)
    try:
        assert woke.wait(1.0), "a 2.007 s sleep was not woken by advance(2007)"
    finally:
        clock.advance(1)


async def test_asyncio_sleep_wakes_on_advance() -> None:
    clock = ManualClock(start_ms=10)
    task = asyncio.create_task(clock.asleep(1.0))
    await _auntil(lambda: clock.pending_timers == 1)
    clock.advance(999)
    await asyncio.sleep(0.01)
    assert not task.done()
    clock.advance(1)
    await asyncio.wait_for(task, REAL_TIMEOUT_S)


async def test_asyncio_wait_and_fire_from_another_thread() -> None:
    clock = ManualClock()
    alarm = LoopAlarm()
    task = asyncio.create_task(clock.await_alarm(alarm, 30))
    await _auntil(lambda: clock.pending_timers == 1)
    threading.Thread(target=alarm.fire).start()
    await asyncio.wait_for(task, REAL_TIMEOUT_S)
    assert alarm.fired


async def test_advance_from_a_thread_wakes_an_async_sleeper() -> None:
    clock = ManualClock()
    task = asyncio.create_task(clock.asleep(0.2))
    await _auntil(lambda: clock.pending_timers == 1)
    await asyncio.to_thread(clock.advance, 200)
    await asyncio.wait_for(task, REAL_TIMEOUT_S)


async def test_manual_asleep_does_not_block_the_loop() -> None:
    clock = ManualClock()
    sleeper = asyncio.create_task(clock.asleep(5))
    ticks = 0
    for _ in range(5):
        await asyncio.sleep(0)
        ticks += 1
    assert ticks == 5 and not sleeper.done()
    clock.advance(5000)
    await asyncio.wait_for(sleeper, REAL_TIMEOUT_S)


async def test_loop_alarm_on_a_closed_loop_is_harmless() -> None:
    holder: dict[str, LoopAlarm] = {}

    def other_loop() -> None:
        async def make() -> None:
            holder["alarm"] = LoopAlarm()

        asyncio.run(make())

    await asyncio.to_thread(other_loop)
    holder["alarm"].fire()  # its loop is closed: nothing to wake, no error


def test_system_clock_basics() -> None:
    clock = SystemClock()
    before = time.time() * 1000
    now = clock.now_ms()
    after = time.time() * 1000
    assert isinstance(now, int)
    assert before - 1 <= now <= after + 1
    m1 = clock.monotonic()
    clock.sleep(0.002)
    assert clock.monotonic() >= m1 + 0.001
    clock.sleep(-5)  # no error
    alarm = ThreadAlarm()
    clock.wait(alarm, 0.001)  # times out
    assert not alarm.fired
    alarm.fire()
    clock.wait(alarm, 60)  # already fired: returns at once


async def test_system_clock_async() -> None:
    clock = SystemClock()
    await clock.asleep(0.001)
    await clock.asleep(-1)
    alarm = LoopAlarm()
    await clock.await_alarm(alarm, 0.001)
    assert not alarm.fired
    alarm.fire()
    await clock.await_alarm(alarm, 60)
    assert alarm.fired
