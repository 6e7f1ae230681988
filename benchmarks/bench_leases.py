"""Lease benchmarks: klockwork against its anchors, measured in one run.

Every row compares klockwork with an anchor timed in the same process, the
same way (a function call per operation, many repetitions, batches
interleaved so that drift hits both sides alike) and prints the ratio. No
absolute time is asserted: PASS/MISS compares the ratio with the target of
the hot-path issue. The one exception is the hand-off row, whose target is
an absolute median latency. The exit status is 0 whether targets are met or
not: this is a measurement, not a test.

Targets (klockwork / anchor, medians of the same run):

* memory ``try_acquire`` + ``release``, audit on (the default) / ``threading.Lock``: ≤ 65x
* the same with ``Klockwork(audit_leases=False)`` / ``threading.Lock``: ≤ 45x
* the same (audit on) with 100 000 unrelated active leases / with none: ≤ 1.2x (flat)
* ``@klock_protected`` ``tool.invoke`` / bare ``@tool`` ``.invoke``: ≤ 1.20x
* SQLite ``try_acquire`` + ``release`` (durable audit) / ``filelock.FileLock``: ≤ 2.0x
* in-process hand-off, audit on: median ≤ 100 µs from the start of the holder's
  ``release()`` to the moment the blocked waiter holds the lease (Klock's
  poll-and-sleep loop measured beside it as the anchor)

    .venv/bin/python benchmarks/bench_leases.py            # full run (< 2 min)
    .venv/bin/python benchmarks/bench_leases.py --quick    # smoke run (< 20 s)
    .venv/bin/python benchmarks/bench_leases.py --json out.json
"""

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import queue
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from klockwork import Klockwork, __version__  # noqa: E402

perf_ns = time.perf_counter_ns
RESOURCE = ("FILE:/bench/r", "MUTATES")
LONG_TTL_MS = 3_600_000


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class Plan:
    """How much work each measurement does (full run or ``--quick``)."""

    batches: int  # interleaved batches per measured function
    batch_ms: float  # wall time of one batch; every side of a comparison gets the same
    slow_batch: int  # SQLite operations per batch (bounds the resource's history)
    scale_sizes: tuple[int, ...]
    handoff_rounds: int
    poll_rounds: int
    poll_ttl_ms: int
    sqlite_handoff_rounds: int
    sqlite_warmup: int  # untimed operations on each fresh SQLite database
    sqlite_history: int  # released leases before the history row is measured


FULL = Plan(
    batches=61,
    batch_ms=10.0,
    slow_batch=100,
    scale_sizes=(0, 1_000, 100_000),
    handoff_rounds=200,
    poll_rounds=20,
    poll_ttl_ms=200,
    sqlite_handoff_rounds=100,
    sqlite_warmup=20,
    sqlite_history=5_000,
)
QUICK = Plan(
    batches=9,
    batch_ms=4.0,
    slow_batch=40,
    scale_sizes=(0, 1_000, 100_000),
    handoff_rounds=40,
    poll_rounds=4,
    poll_ttl_ms=200,
    sqlite_handoff_rounds=20,
    sqlite_warmup=10,
    sqlite_history=500,
)


# --------------------------------------------------------------------------- results
@dataclass
class Stats:
    """Median and p90 of per-batch (or per-round) nanoseconds per operation."""

    median_ns: float
    p90_ns: float
    samples: int

    @classmethod
    def of(cls, values: list[float]) -> "Stats":
        ordered = sorted(values)
        p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
        return cls(statistics.median(ordered), p90, len(ordered))


@dataclass
class Row:
    """One line of the result table."""

    name: str
    ours: Stats | None
    anchor: Stats | None = None
    anchor_name: str = ""
    target: str = ""
    #: ratio target (ours/anchor <= limit) or, with ``absolute_ns``, a latency limit.
    limit: float | None = None
    absolute_ns: bool = False
    note: str = ""
    section: str = "target"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.anchor is None or self.anchor.median_ns <= 0:
            return None
        return self.ours.median_ns / self.anchor.median_ns

    @property
    def verdict(self) -> str:
        if self.ours is None:
            return "SKIP"
        if self.limit is None:
            return "info"
        value = self.ours.median_ns if self.absolute_ns else self.ratio
        if value is None:
            return "SKIP"
        return "PASS" if value <= self.limit else "MISS"


def fmt_ns(ns: float | None) -> str:
    if ns is None:
        return "-"
    if ns < 1_000:
        return f"{ns:.0f} ns"
    if ns < 1_000_000:
        return f"{ns / 1_000:.2f} µs"
    if ns < 1_000_000_000:
        return f"{ns / 1_000_000:.2f} ms"
    return f"{ns / 1_000_000_000:.2f} s"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    if ratio < 0.1:
        return f"1/{1 / ratio:,.0f}"
    return f"{ratio:.2f}x"


def fmt_stats(s: Stats | None) -> str:
    if s is None:
        return "-"
    return f"{fmt_ns(s.median_ns)} (p90 {fmt_ns(s.p90_ns)})"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- timing
@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _batch_ns(
    fn: Callable[[], object], n: int, settle: Callable[[], object] | None = None
) -> float:
    """Mean ns per call of ``n`` calls; ``settle`` (if any) runs inside the timing, once."""
    rng = range(n)
    t0 = perf_ns()
    for _ in rng:
        fn()
    if settle is not None:
        settle()
    return (perf_ns() - t0) / n


def _calibrate(fn: Callable[[], object], batch_ms: float) -> int:
    """Warm ``fn`` up; return how many calls fill ``batch_ms`` of wall time."""
    n, spent = 0, 0
    budget = max(20_000_000, int(batch_ms * 5_000_000))  # warm up for 5 batches or 20 ms
    while spent < budget or n < 100:
        t0 = perf_ns()
        for _ in range(50):
            fn()
        spent += perf_ns() - t0
        n += 50
    return max(10, int(batch_ms * 1_000_000 * n / spent))


def compare(
    fns: dict[str, Callable[[], object]],
    batches: int,
    batch_ms: float,
    settle: dict[str, Callable[[], object]] | None = None,
) -> dict[str, Stats]:
    """Time every function in interleaved batches; median/p90 of batch means (ns/op).

    Each function is warmed up, then called in batches that each last about
    ``batch_ms`` (so a 100 ns and a 10 µs operation are equally exposed to
    preemption). The order of the functions rotates from one round to the
    next; the garbage collector is off while a batch runs (young
    generations are collected between rounds). ``settle[name]`` runs at the
    end of each of that function's batches, inside the timing: an engine's
    ``kw.audit.flush``, so that the audit writer's work for the batch is
    charged to it and does not spill into the next batch (another side's).
    """
    names = list(fns)
    settle = settle or {}
    sizes = {name: _calibrate(fns[name], batch_ms) for name in names}
    for done in settle.values():
        done()
    means: dict[str, list[float]] = {name: [] for name in names}
    for i in range(batches):
        gc.collect(1)
        order = names[i % len(names) :] + names[: i % len(names)]
        with no_gc():
            for name in order:
                means[name].append(_batch_ns(fns[name], sizes[name], settle.get(name)))
    return {name: Stats.of(values) for name, values in means.items()}


async def _abatch_ns(fn: Callable[[], Awaitable[object]], n: int) -> float:
    rng = range(n)
    t0 = perf_ns()
    for _ in rng:
        await fn()
    return (perf_ns() - t0) / n


async def acompare(
    fns: dict[str, Callable[[], Awaitable[object]]], batches: int, batch_ms: float
) -> dict[str, Stats]:
    """:func:`compare` for coroutine functions, awaited one per operation."""
    names = list(fns)
    sizes: dict[str, int] = {}
    for name in names:
        n, spent = 0, 0
        while spent < max(20_000_000, batch_ms * 5_000_000) or n < 100:
            spent_batch = await _abatch_ns(fns[name], 50)
            spent += int(spent_batch * 50)
            n += 50
        sizes[name] = max(10, int(batch_ms * 1_000_000 * n / spent))
    means: dict[str, list[float]] = {name: [] for name in names}
    for i in range(batches):
        gc.collect(1)
        order = names[i % len(names) :] + names[: i % len(names)]
        with no_gc():
            for name in order:
                means[name].append(await _abatch_ns(fns[name], sizes[name]))
    return {name: Stats.of(values) for name, values in means.items()}


def lease_op(kw: Klockwork, agent: str = "bench") -> Callable[[], None]:
    """``try_acquire`` + ``release`` of one MUTATES lease, as a user writes it."""
    leases = kw.leases
    try_acquire, release = leases.try_acquire, leases.release

    def op() -> None:
        verdict = try_acquire(agent, "s", RESOURCE, 30_000)
        release(verdict.lease.lease_id)

    return op


# --------------------------------------------------------------------------- sections
def bench_memory_vs_lock(plan: Plan) -> list[Row]:
    kw = Klockwork()  # lease decisions audited (the default)
    kw_off = Klockwork(audit_leases=False)
    lock = threading.Lock()

    def lock_op() -> None:
        lock.acquire()
        lock.release()

    res = compare(
        {"ours": lease_op(kw), "lock": lock_op, "off": lease_op(kw_off)},
        plan.batches,
        plan.batch_ms,
        settle={"ours": kw.audit.flush, "off": kw_off.audit.flush},
    )
    entries = kw.audit.checkpoint().seq
    kw.close()
    kw_off.close()
    return [
        Row(
            "memory try_acquire+release, audit on vs threading.Lock",
            res["ours"],
            res["lock"],
            "threading.Lock acquire+release",
            "≤ 65x",
            65.0,
            note="audited (the default); each batch ends with kw.audit.flush(), timed",
        ),
        Row(
            "memory try_acquire+release, audit off vs threading.Lock",
            res["off"],
            res["lock"],
            "threading.Lock acquire+release (the same batches as the row above)",
            "≤ 45x",
            45.0,
            note="Klockwork(audit_leases=False), interleaved with the audited side and the "
            "Lock; its batches end with kw.audit.flush() too (nothing to write)",
        ),
        Row(
            "memory try_acquire+release, audit on vs off",
            res["ours"],
            res["off"],
            "same, Klockwork(audit_leases=False)",
            note=f"2 entries per cycle, sealed (hashed, stored) inside the timing, by the "
            f"recording thread or the batch's flush ({entries:,} entries in all); "
            "same batches as the rows above",
            section="info",
        ),
    ]


def _fill(kw: Klockwork, n: int) -> None:
    """``n`` ACTIVE leases on unrelated resources (FILE and TABLE mix, long TTL)."""
    try_acquire = kw.leases.try_acquire
    for i in range(n):
        resource = f"FILE:/other/{i}" if i % 2 == 0 else f"TABLE:t{i}"
        verdict = try_acquire(f"filler-{i % 64}", "s", (resource, "MUTATES"), LONG_TTL_MS)
        if not verdict.granted:  # pragma: no cover - would be a bug in the engine
            raise RuntimeError(f"filler lease {resource} not granted: {verdict.status}")
    active = len(kw.leases.list())
    if active != n:  # pragma: no cover - would be a bug in the engine
        raise RuntimeError(f"expected {n} active filler leases, found {active}")


def bench_scale(plan: Plan) -> list[Row]:
    engines: dict[int, Klockwork] = {}
    for n in plan.scale_sizes:
        kw = Klockwork()
        t0 = perf_ns()
        _fill(kw, n)
        if n:
            log(f"  filled {n} unrelated leases in {fmt_ns(perf_ns() - t0)}")
        engines[n] = kw
    gc.collect()
    gc.freeze()  # the fillers live for the whole section: keep them out of collections
    try:
        fns = {str(n): lease_op(kw) for n, kw in engines.items()}
        settle = {str(n): kw.audit.flush for n, kw in engines.items()}
        res = compare(fns, plan.batches, plan.batch_ms, settle)
    finally:
        gc.unfreeze()
    base = res[str(plan.scale_sizes[0])]
    rows = []
    for n in plan.scale_sizes[1:]:
        big = n == max(plan.scale_sizes)
        rows.append(
            Row(
                f"memory acquire+release, {n:,} unrelated active leases vs 0",
                res[str(n)],
                base,
                "same, 0 other leases",
                "≤ 1.2x (flat)" if big else "",
                1.2 if big else None,
                section="target" if big else "info",
            )
        )
    for kw in engines.values():
        kw.close()
    return rows


def _sqlite_engine(
    path: Path, warmup: int, audit_leases: bool = True
) -> tuple[Klockwork, Callable[[], None]]:
    # an absolute path gives sqlite:////...
    kw = Klockwork.open(f"sqlite:///{path}", audit_leases=audit_leases)
    op = lease_op(kw)
    for _ in range(warmup):
        op()
    kw.audit.flush()
    return kw, op


def _fresh_sqlite_vs(
    anchor_op: Callable[[], object], plan: Plan, tmp: Path, tag: str
) -> tuple[Stats, Stats]:
    """SQLite acquire+release against ``anchor_op``, a fresh database per batch."""
    kw, op = _sqlite_engine(tmp / f"{tag}-warm.db", plan.sqlite_warmup)
    ours_ns = _batch_ns(op, plan.slow_batch, kw.audit.flush)
    kw.close()
    anchor_ns = _batch_ns(anchor_op, plan.slow_batch)
    # Same wall time per batch on both sides: the anchor does as many calls as fit.
    anchor_n = max(10, round(plan.slow_batch * ours_ns / anchor_ns))
    ours: list[float] = []
    anchor: list[float] = []
    for i in range(plan.batches):
        kw, op = _sqlite_engine(tmp / f"{tag}-{i}.db", plan.sqlite_warmup)
        gc.collect(1)
        with no_gc():
            if i % 2:
                anchor.append(_batch_ns(anchor_op, anchor_n))
                ours.append(_batch_ns(op, plan.slow_batch, kw.audit.flush))
            else:
                ours.append(_batch_ns(op, plan.slow_batch, kw.audit.flush))
                anchor.append(_batch_ns(anchor_op, anchor_n))
        kw.close()
    return Stats.of(ours), Stats.of(anchor)


def bench_sqlite_vs_filelock(plan: Plan, tmp: Path) -> list[Row]:
    """SQLite store vs ``filelock`` in the same directory.

    Released leases stay in the table (their fencing tokens matter), so the
    resource's history grows by one row per operation. Each batch therefore
    runs on a fresh database (history below ``sqlite_warmup + slow_batch``
    rows); a second, informational row measures a resource with a long
    history against a fresh one.
    """
    try:
        from filelock import FileLock
    except ImportError:
        return [
            Row(
                "sqlite acquire+release vs filelock",
                None,
                target="≤ 2.0x",
                note="skipped: filelock not installed (pip install -e '.[dev]')",
            )
        ]
    flock = FileLock(str(tmp / "bench.lock"))

    def flock_op() -> None:
        flock.acquire()
        flock.release()

    ours, anchor = _fresh_sqlite_vs(flock_op, plan, tmp, "flock")
    rows = [
        Row(
            "sqlite try_acquire+release vs filelock.FileLock",
            ours,
            anchor,
            "FileLock acquire+release (same dir)",
            "≤ 2.0x",
            2.0,
            note=f"audited; fresh database per batch: < {plan.sqlite_warmup + plan.slow_batch} "
            "released leases in the resource's history; each batch ends with "
            "kw.audit.flush(), timed",
        )
    ]
    rows.append(_sqlite_audit_on_vs_off(plan, tmp))

    # The same operation once the resource has a long history of released leases.
    history = plan.sqlite_history
    t0 = perf_ns()
    old_kw, old_op = _sqlite_engine(tmp / "history.db", history)
    log(f"  built a history of {history:,} released leases in {fmt_ns(perf_ns() - t0)}")
    long_hist: list[float] = []
    fresh: list[float] = []
    rounds = max(3, plan.batches // 8)
    batch = max(10, plan.slow_batch // 4)
    for i in range(rounds):
        kw, op = _sqlite_engine(tmp / f"fresh-h{i}.db", plan.sqlite_warmup)
        gc.collect(1)
        with no_gc():
            long_hist.append(_batch_ns(old_op, batch, old_kw.audit.flush))
            fresh.append(_batch_ns(op, batch, kw.audit.flush))
        kw.close()
    old_kw.close()
    rows.append(
        Row(
            f"sqlite acquire+release, {history:,} released leases on the resource vs fresh",
            Stats.of(long_hist),
            Stats.of(fresh),
            "same, fresh database",
            note="informational; a store whose cost does not grow with history gives ~1x",
            section="info",
        )
    )
    return rows


def _sqlite_audit_on_vs_off(plan: Plan, tmp: Path) -> Row:
    """Row 4's operation with lease decisions audited (kw_audit in the same file) or not.

    Both sides run on a fresh database per batch, in alternating order; each
    batch ends with ``kw.audit.flush()`` inside the timing, so the writer's
    commits of the batch's entries are charged to it.
    """
    on: list[float] = []
    off: list[float] = []
    for i in range(plan.batches):
        kw_on, op_on = _sqlite_engine(tmp / f"audit-on-{i}.db", plan.sqlite_warmup)
        kw_off, op_off = _sqlite_engine(tmp / f"audit-off-{i}.db", plan.sqlite_warmup, False)
        gc.collect(1)
        with no_gc():
            sides = [(on, op_on, kw_on), (off, op_off, kw_off)]
            for samples, op, kw in sides if i % 2 else sides[::-1]:
                samples.append(_batch_ns(op, plan.slow_batch, kw.audit.flush))
        kw_on.close()
        kw_off.close()
    return Row(
        "sqlite try_acquire+release, audit on vs off",
        Stats.of(on),
        Stats.of(off),
        "same, Klockwork.open(..., audit_leases=False)",
        note="fresh database per batch for each side; the audited side's writer "
        "commits its entries to kw_audit in the same file, inside the timing",
        section="info",
    )


def bench_redis(plan: Plan, tmp: Path) -> list[Row]:
    """Informational: SQLite store vs redis-py ``Lock`` (what a user picks for
    cross-process locking), when a Redis server answers at
    ``$KLOCKWORK_BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``)."""
    name = "sqlite try_acquire+release vs redis-py Lock"
    url = os.environ.get("KLOCKWORK_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=0.2, socket_timeout=2)
        client.ping()
    except Exception as exc:
        return [Row(name, None, note=f"skipped: no Redis at {url} ({exc})", section="info")]
    rlock = client.lock("klockwork-bench:lock", timeout=30)

    def redis_op() -> None:
        rlock.acquire()
        rlock.release()

    ours, anchor = _fresh_sqlite_vs(redis_op, plan, tmp, "redis")
    client.close()
    return [
        Row(
            name,
            ours,
            anchor,
            f"redis-py Lock acquire+release ({url}, same host)",
            note="informational: klockwork has no Redis store yet; both serve several processes",
            section="info",
        )
    ]


def bench_tool(plan: Plan) -> list[Row]:
    name = "@klock_protected tool.invoke vs bare @tool.invoke"
    try:
        from klockwork.integrations.langchain import agent_config, klock_protected
    except ImportError as exc:
        return [
            Row(
                name,
                None,
                target="≤ 1.20x",
                note=f"skipped: klockwork.integrations.langchain not available ({exc})",
            )
        ]
    from langchain_core.tools import tool

    kw = Klockwork()

    @tool
    def bare_write(path: str) -> str:
        """Pretend to write a file."""
        return path

    @tool
    @klock_protected("FILE:{path}", predicate="MUTATES", kw=kw)
    def protected_write(path: str) -> str:
        """Pretend to write a file."""
        return path

    config = agent_config("bench")
    args = {"path": "/bench/r"}
    bare_invoke, protected_invoke = bare_write.invoke, protected_write.invoke
    if protected_invoke(args, config=config) != "/bench/r":  # pragma: no cover
        raise RuntimeError("protected tool returned something unexpected")
    granted: list[str] = []
    remove = kw.add_listener(lambda event: granted.append(event.kind))
    protected_invoke(args, config=config)
    remove()
    if "lease.granted" not in granted or "lease.released" not in granted:  # pragma: no cover
        raise RuntimeError(f"protected tool did not lease and release: {granted}")
    if kw.leases.list():  # pragma: no cover - the decorator must release in finally
        raise RuntimeError("protected tool left a lease behind")

    res = compare(
        {
            "ours": lambda: protected_invoke(args, config=config),
            "bare": lambda: bare_invoke(args, config=config),
        },
        plan.batches,
        plan.batch_ms,
        settle={"ours": kw.audit.flush},
    )
    kw.close()
    return [
        Row(
            name,
            res["ours"],
            res["bare"],
            "bare @tool .invoke (same config)",
            "≤ 1.20x",
            1.20,
            note="one audited lease per call; each batch ends with kw.audit.flush(), timed",
        )
    ]


def _handoff_notified(kw: Klockwork, rounds: int) -> Stats:
    """Release by a younger holder → an older waiter blocked in ``acquire`` returns.

    The holder's TTL is long, so only the release notification can wake the
    waiter in time. Latency runs from ``perf_counter_ns()`` taken on the
    holder's thread immediately before it calls ``kw.leases.release(...)``
    to ``perf_counter_ns()`` taken on the waiter's thread immediately after
    its blocking ``kw.leases.acquire(...)`` returned (it holds the lease).
    The waiter's own release and the hand-back through the queue come after
    that stamp, outside the span.
    """
    leases = kw.leases
    kw.register_agent("old", 1)
    kw.register_agent("young", 2)
    cmds: queue.Queue[bool] = queue.Queue()
    done: queue.Queue[int | BaseException] = queue.Queue()

    def waiter() -> None:
        while cmds.get():
            try:
                verdict = leases.acquire("old", "s-old", RESOURCE, 30_000, timeout_s=10)
                t1 = perf_ns()
                leases.release(verdict.lease.lease_id)
                done.put(t1)
            except BaseException as exc:  # pragma: no cover - reported below
                done.put(exc)

    thread = threading.Thread(target=waiter, name="bench-waiter", daemon=True)
    thread.start()
    latencies: list[float] = []
    try:
        for i in range(rounds + 5):  # the first 5 rounds warm up
            held = leases.try_acquire("young", "s-young", RESOURCE, 30_000)
            if not held.granted:  # pragma: no cover
                raise RuntimeError(f"holder not granted: {held.status}")
            cmds.put(True)
            deadline = time.monotonic() + 10
            while leases.waiting == 0:  # the waiter got WAIT and armed its alarm
                if time.monotonic() > deadline:  # pragma: no cover
                    raise RuntimeError("waiter never started waiting")
                time.sleep(20e-6)
            t0 = perf_ns()
            leases.release(held.lease.lease_id)
            t1 = done.get(timeout=15)
            if isinstance(t1, BaseException):  # pragma: no cover
                raise t1
            if i >= 5:
                latencies.append(t1 - t0)
    finally:
        cmds.put(False)
        thread.join(timeout=15)
    return Stats.of(latencies)


def _handoff_polled(kw: Klockwork, rounds: int, ttl_ms: int, seed: int = 7) -> Stats:
    """The same hand-off with Klock's client loop: ``try_acquire``, on failure
    ``sleep(wait_time / 1000 or 1.0)`` and retry (Klock's ``klock_protected``).

    The holder takes a ``ttl_ms`` lease and releases it at a random moment of
    its life, as real work would; the engine's ``wait_time_ms`` hint (the
    holder's remaining TTL) is what the loop sleeps, so one round lasts at
    most ``ttl_ms``.
    """
    leases = kw.leases
    kw.register_agent("old", 1)
    kw.register_agent("young", 2)
    rng = random.Random(seed)
    cmds: queue.Queue[bool] = queue.Queue()
    first_wait: queue.Queue[bool] = queue.Queue()
    done: queue.Queue[int | BaseException] = queue.Queue()

    def waiter() -> None:
        while cmds.get():
            try:
                told = False
                while True:
                    verdict = leases.try_acquire("old", "s-old", RESOURCE, 30_000)
                    if verdict.granted:
                        break
                    if not told:
                        first_wait.put(True)
                        told = True
                    wait_time = verdict.wait_time_ms
                    time.sleep(wait_time / 1000 if wait_time else 1.0)
                t1 = perf_ns()
                leases.release(verdict.lease.lease_id)
                done.put(t1)
            except BaseException as exc:  # pragma: no cover
                done.put(exc)

    thread = threading.Thread(target=waiter, name="bench-poller", daemon=True)
    thread.start()
    latencies: list[float] = []
    try:
        for _ in range(rounds):
            held = leases.try_acquire("young", "s-young", RESOURCE, ttl_ms)
            if not held.granted:  # pragma: no cover
                raise RuntimeError(f"holder not granted: {held.status}")
            cmds.put(True)
            first_wait.get(timeout=10)
            time.sleep(rng.uniform(0, 0.9) * ttl_ms / 1000)  # the holder works a while
            t0 = perf_ns()
            leases.release(held.lease.lease_id)
            t1 = done.get(timeout=15)
            if isinstance(t1, BaseException):  # pragma: no cover
                raise t1
            latencies.append(t1 - t0)
    finally:
        cmds.put(False)
        thread.join(timeout=15)
    return Stats.of(latencies)


def bench_handoff(plan: Plan) -> list[Row]:
    kw_ours, kw_poll = Klockwork(), Klockwork()
    ours = _handoff_notified(kw_ours, plan.handoff_rounds)
    polled = _handoff_polled(kw_poll, plan.poll_rounds, plan.poll_ttl_ms)
    kw_ours.close()
    kw_poll.close()
    return [
        Row(
            "memory hand-off: release() start → waiter holds the lease",
            ours,
            polled,
            f"Klock-style poll loop (sleep wait_time, TTL {plan.poll_ttl_ms} ms)",
            "median ≤ 100 µs",
            100_000.0,
            absolute_ns=True,
            note="audited (the default); span from perf_counter_ns() just before the holder "
            "calls kw.leases.release() to perf_counter_ns() right after the waiter's blocking "
            f"kw.leases.acquire() returned; median of {plan.handoff_rounds} rounds "
            "(the poll loop: the same span)",
        )
    ]


def bench_sqlite_handoff(plan: Plan, tmp: Path) -> list[Row]:
    kw = Klockwork.open(f"sqlite:///{tmp / 'handoff.db'}")
    ours = _handoff_notified(kw, plan.sqlite_handoff_rounds)
    kw.close()
    return [
        Row(
            "sqlite hand-off across threads (one engine)",
            ours,
            note="informational; waiters in other processes poll every 1-50 ms",
            section="info",
        )
    ]


def bench_async(plan: Plan) -> list[Row]:
    kw = Klockwork()
    leases = kw.leases

    async def run() -> dict[str, Stats]:
        lock = asyncio.Lock()
        aacquire, arelease = leases.aacquire, leases.arelease

        async def ours() -> None:
            verdict = await aacquire("bench", "s", RESOURCE, 30_000)
            await arelease(verdict.lease.lease_id)

        async def anchor() -> None:
            await lock.acquire()
            lock.release()

        return await acompare({"ours": ours, "lock": anchor}, plan.batches, plan.batch_ms)

    res = asyncio.run(run())
    kw.close()
    return [
        Row(
            "memory aacquire+arelease vs asyncio.Lock",
            res["ours"],
            res["lock"],
            "asyncio.Lock acquire+release",
            section="info",
        )
    ]


# --------------------------------------------------------------------------- report
def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "klockwork"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if commit and dirty:
            commit += "+dirty"  # klockwork/ has uncommitted changes
    except OSError:
        commit = ""
    versions: dict[str, str] = {}
    for dist in ("langchain-core", "langgraph", "pydantic", "filelock", "redis"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:
            versions[dist] = "not installed"
    return {
        "load_average_1m": _load(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "klockwork": __version__,
        "commit": commit,
        **versions,
    }


@dataclass(frozen=True)
class BatchPlan:
    """How much work a small benchmark does: interleaved batches of equal wall time."""

    batches: int
    batch_ms: float


BATCH_FULL = BatchPlan(batches=41, batch_ms=10.0)
BATCH_QUICK = BatchPlan(batches=9, batch_ms=4.0)


def parse_quick(
    description: str, argv: list[str] | None, profile: str | None = None
) -> argparse.Namespace:
    """The ``--quick`` command line every small benchmark takes (``--profile``: its help)."""
    parser = argparse.ArgumentParser(description=description.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run")
    if profile is not None:
        parser.add_argument("--profile", action="store_true", help=profile)
    return parser.parse_args(argv)


def print_header(quick: bool, what: str) -> None:
    """One line saying what ran where: version, commit, Python, CPUs, run size."""
    env = environment()
    print(
        f"klockwork {env['klockwork']} ({env['commit'] or 'no git'}) · {env['python']} · "
        f"{env['cpus']} CPUs ({env['cpu']}) · {'quick' if quick else 'full'} run · {what}"
    )


def print_table(rows: list[Row]) -> None:
    header = ("benchmark", "klockwork median (p90)", "anchor median (p90)", "ratio", "target", "")
    table = [header]
    for row in rows:
        ratio = row.ratio
        table.append(
            (
                row.name,
                fmt_stats(row.ours),
                fmt_stats(row.anchor),
                fmt_ratio(ratio),
                row.target or "-",
                row.verdict,
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, line in enumerate(table):
        print("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(line)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for row in rows:
        if row.anchor_name:
            print(f"* {row.name}: anchor = {row.anchor_name}")
        if row.note:
            print(f"* {row.name}: {row.note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run (< 20 s)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    opts = parser.parse_args(argv)
    plan = QUICK if opts.quick else FULL
    started = time.monotonic()
    env = environment()
    print(
        f"klockwork {env['klockwork']} ({env['commit'] or 'no git'}) · {env['python']} · "
        f"{env['cpus']} CPUs ({env['cpu']}) · {env['platform']} · "
        f"{'quick' if opts.quick else 'full'} run"
    )
    tmp = Path(tempfile.mkdtemp(prefix="klockwork-bench-"))
    rows: list[Row] = []
    sections: list[tuple[str, Callable[[], list[Row]]]] = [
        ("1 memory vs threading.Lock", lambda: bench_memory_vs_lock(plan)),
        ("2 scale with unrelated leases", lambda: bench_scale(plan)),
        ("3 sqlite vs filelock", lambda: bench_sqlite_vs_filelock(plan, tmp)),
        ("4 @klock_protected vs bare tool", lambda: bench_tool(plan)),
        ("5 hand-off latency", lambda: bench_handoff(plan)),
        ("i sqlite hand-off", lambda: bench_sqlite_handoff(plan, tmp)),
        ("i redis-py Lock", lambda: bench_redis(plan, tmp)),
        ("i asyncio", lambda: bench_async(plan)),
    ]
    try:
        for title, run in sections:
            t0 = time.monotonic()
            log(f"[{title}] ...")
            rows.extend(run())
            log(f"[{title}] done in {time.monotonic() - t0:.1f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    print()
    print_table(rows)
    load_end = _load()
    print(f"\ntotal {elapsed:.1f} s · 1-min load average {env['load_average_1m']} → {load_end}")
    if load_end is not None and env["cpus"] and load_end > 0.5 * env["cpus"] + 1:
        print("note: other processes were busy during the run; expect noisier numbers")
    if opts.json:
        payload = {
            "environment": env,
            "mode": "quick" if opts.quick else "full",
            "plan": asdict(plan),
            "elapsed_s": round(elapsed, 2),
            "load_average_1m_end": load_end,
            "rows": [
                {
                    "name": r.name,
                    "section": r.section,
                    "ours": None if r.ours is None else asdict(r.ours),
                    "anchor": None if r.anchor is None else asdict(r.anchor),
                    "anchor_name": r.anchor_name,
                    "ratio": r.ratio,
                    "target": r.target,
                    "verdict": r.verdict,
                    "note": r.note,
                }
                for r in rows
            ],
        }
        Path(opts.json).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
        print(f"results written to {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
