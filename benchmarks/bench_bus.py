"""Bus benchmarks: what a message costs next to ``queue.Queue``, on memory and SQLite.

Rows (PASS/MISS against the issue's targets; ratios are taken in one run,
batches interleaved with the anchor's so that drift hits both alike):

* memory, batches of 10: ``publish_many`` 10 → ``subscribe(max_messages=10)``
  → ``ack`` 10, per message / ``queue.Queue`` ``put`` + ``get`` per message:
  ≤ 10x, and ≥ 100 000 messages/s;
* memory, one at a time (info): ``publish`` → ``subscribe(max_messages=1)`` → ``ack``;
* SQLite, batches of 100: the same cycle in three transactions: ≥ 10 000 messages/s;
* cross-process wake-up on SQLite: a subscriber process blocked in
  ``subscribe(wait_s=...)`` gets a message another process publishes:
  median ≤ 20 ms, p99 ≤ 100 ms (time from ``publish`` returning in the
  publisher to ``subscribe`` returning in the subscriber, both on
  ``time.time_ns``);
* governance events with nobody following: the memory lease cycle
  (``try_acquire`` + ``release``) on a default engine / the same on an
  engine whose event pump is closed: ≤ 1.05x; an info row shows the cost
  while an ``on()`` listener follows the events.

The exit status is 0 whether targets are met or not: this is a measurement,
not a test.

    .venv/bin/python benchmarks/bench_bus.py            # full run (~1 min)
    .venv/bin/python benchmarks/bench_bus.py --quick    # smoke run (< 15 s)
"""

import multiprocessing
import queue
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from bench_leases import (  # noqa: E402
    BATCH_FULL,
    BATCH_QUICK,
    BatchPlan,
    Row,
    Stats,
    compare,
    parse_quick,
    print_header,
    print_table,
)

from klockwork import Klockwork, MemoryStore  # noqa: E402

QUEUE_RATIO = 10.0
MEMORY_RATE = 100_000
SQLITE_RATE = 10_000
WAKE_MEDIAN_MS = 20.0
WAKE_P99_MS = 100.0
EVENTS_RATIO = 1.05
PAYLOAD = {"task": "summarise", "doc": "reports/q3.md", "priority": 2}


def bus_cycle(kw: Klockwork, channel: str, batch: int) -> Callable[[], None]:
    """One round: publish ``batch`` messages, take them through a group, ack them."""
    bus = kw.bus
    payloads = [PAYLOAD] * batch
    bus.create_group(channel, "g", start="new")

    def op() -> None:
        bus.publish_many(channel, payloads)
        got = bus.subscribe(channel, "g", "c", max_messages=batch)
        bus.ack(channel, "g", got)

    return op


def queue_cycle(batch: int) -> Callable[[], None]:
    q: queue.Queue[dict[str, object]] = queue.Queue()

    def op() -> None:
        for _ in range(batch):
            q.put(PAYLOAD)
        for _ in range(batch):
            q.get()

    return op


def per_message(stats: Stats, batch: int) -> Stats:
    return Stats(stats.median_ns / batch, stats.p90_ns / batch, stats.samples)


def bench_memory(plan: BatchPlan) -> list[Row]:
    kw = Klockwork(MemoryStore())
    try:
        fns = {
            "bus10": bus_cycle(kw, "bench.ten", 10),
            "bus1": bus_cycle(kw, "bench.one", 1),
            "queue10": queue_cycle(10),
            "queue1": queue_cycle(1),
        }
        stats = compare(fns, plan.batches, plan.batch_ms)
    finally:
        kw.close()
    ours = per_message(stats["bus10"], 10)
    anchor = per_message(stats["queue10"], 10)
    rate = 1e9 / ours.median_ns
    return [
        Row(
            "memory publish→subscribe→ack, batches of 10 vs Queue",
            ours,
            anchor,
            "queue.Queue put+get per message (same batches)",
            f"≤ {QUEUE_RATIO:.0f}x",
            QUEUE_RATIO,
            note=f"{rate:,.0f} messages/s (target ≥ {MEMORY_RATE:,})"
            + ("" if rate >= MEMORY_RATE else " MISS"),
        ),
        Row(
            "memory publish→subscribe→ack, one at a time (info)",
            per_message(stats["bus1"], 1),
            per_message(stats["queue1"], 1),
            "queue.Queue put+get",
            section="info",
        ),
    ]


def bench_sqlite(plan: BatchPlan, tmp: Path) -> list[Row]:
    kw = Klockwork.open(f"sqlite:///{tmp / 'bus.db'}")
    batch = 100
    try:
        fns = {"sqlite100": bus_cycle(kw, "bench.sqlite", batch), "queue": queue_cycle(batch)}
        stats = compare(fns, max(5, plan.batches // 3), plan.batch_ms * 5)
    finally:
        kw.close()
    ours = per_message(stats["sqlite100"], batch)
    rate = 1e9 / ours.median_ns
    return [
        Row(
            "SQLite publish→subscribe→ack, batches of 100",
            ours,
            per_message(stats["queue"], batch),
            "queue.Queue put+get per message",
            f"≥ {SQLITE_RATE:,} msg/s",
            note=f"{rate:,.0f} messages/s" + (" PASS" if rate >= SQLITE_RATE else " MISS"),
        )
    ]


def _subscriber(
    url: str,
    rounds: int,
    ready: "multiprocessing.Queue[object]",
    out: "multiprocessing.Queue[object]",
) -> None:
    with Klockwork.open(url) as kw:
        kw.bus.create_group("bench.wake", "g", start="new")
        ready.put("ready")
        latencies = []
        for _ in range(rounds):
            got = kw.bus.subscribe("bench.wake", "g", "c", max_messages=1, wait_s=5)
            now = time.time_ns()
            if got:
                kw.bus.ack("bench.wake", "g", got)
                latencies.append((now - got[0].payload["sent_ns"]) / 1e6)
            ready.put("next")
        out.put(latencies)


def bench_wakeup(plan: BatchPlan, tmp: Path) -> list[Row]:
    url = f"sqlite:///{tmp / 'wake.db'}"
    rounds = 200 if plan is BATCH_FULL else 30
    ctx = multiprocessing.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_subscriber, args=(url, rounds, ready, out))
    proc.start()
    with Klockwork.open(url) as kw:
        ready.get(timeout=30)
        for i in range(rounds):
            time.sleep(0.005 + (i % 7) / 1000)  # the subscriber is asleep in its wait
            # The payload carries when the publish returns: fill it in just before.
            kw.bus.publish("bench.wake", {"sent_ns": time.time_ns()})
            ready.get(timeout=30)
    latencies = sorted(out.get(timeout=30))
    proc.join(timeout=10)
    median = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    stats = Stats(median * 1e6, p99 * 1e6, len(latencies))
    return [
        Row(
            "SQLite cross-process wake-up (median; p90 column shows p99)",
            stats,
            None,
            "",
            f"median ≤ {WAKE_MEDIAN_MS:.0f} ms, p99 ≤ {WAKE_P99_MS:.0f} ms",
            WAKE_MEDIAN_MS * 1e6,
            absolute_ns=True,
            note=f"p99 {p99:.2f} ms" + (" PASS" if p99 <= WAKE_P99_MS else " MISS"),
        )
    ]


def lease_cycle(kw: Klockwork) -> Callable[[], None]:
    try_acquire, release = kw.leases.try_acquire, kw.leases.release
    intents = ("FILE:/bench/file", "MUTATES")

    def op() -> None:
        verdict = try_acquire("bench", "s", intents)
        release(verdict.leases[0].lease_id)

    return op


def bench_events(plan: BatchPlan) -> list[Row]:
    default, off, followed = (Klockwork(MemoryStore()) for _ in range(3))
    assert off.bus.events is not None and followed.bus.events is not None
    off.bus.events.close()  # the pump gone: events never reach the bus
    followed.bus.on("lease.*", lambda message: None)
    pump = followed.bus.events
    try:
        # Two comparisons, so that the followed engine's pump thread, still
        # publishing after its batch, never runs during the other two's batches.
        quiet = compare(
            {"default": lease_cycle(default), "off": lease_cycle(off)},
            plan.batches,
            plan.batch_ms,
            {"default": default.audit.flush, "off": off.audit.flush},
        )
        busy = compare(
            {"followed": lease_cycle(followed), "off": lease_cycle(off)},
            plan.batches,
            plan.batch_ms,
            # The events of a batch are published within it (timed).
            {"followed": lambda: (followed.audit.flush(), pump.drain()), "off": off.audit.flush},
        )
    finally:
        for kw in (default, off, followed):
            kw.close()
    return [
        Row(
            "lease cycle, governance events on, nobody following",
            quiet["default"],
            quiet["off"],
            "the same engine with its event pump closed",
            f"≤ {EVENTS_RATIO:.2f}x",
            EVENTS_RATIO,
        ),
        Row(
            "lease cycle while an on('lease.*') listener follows (info)",
            busy["followed"],
            busy["off"],
            "the same engine with its event pump closed",
            section="info",
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_quick(__doc__ or "", argv)
    plan = BATCH_QUICK if args.quick else BATCH_FULL
    print_header(args.quick, "bus: memory and SQLite vs queue.Queue; wake-ups; events")
    rows = bench_memory(plan) + bench_events(plan)
    with tempfile.TemporaryDirectory() as tmp:
        rows += bench_sqlite(plan, Path(tmp))
        rows += bench_wakeup(plan, Path(tmp))
    print_table(rows)


if __name__ == "__main__":
    main()
