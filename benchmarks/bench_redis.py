"""Redis store benchmarks: klockwork on Redis against redis-py on the same server, in one run.

Rows (PASS/MISS against issue 13's targets; every ratio is taken in one run,
batches interleaved with the anchor's so that drift hits both alike, on the
same server):

* ``try_acquire`` + ``release`` of one intent on a ``RedisStore`` engine
  (audited, the default) / redis-py ``Lock`` ``acquire(blocking=False)`` +
  ``release()``: ≤ 1.5x; the same with ``audit_leases=False`` (info);
* a manifest of 5 intents (5 resources in one ``try_acquire``, then one
  ``release_many`` of the 5 leases: what a user writes for a manifest) /
  one intent: ≤ 2x; ``try_acquire`` alone (info);
* cross-process hand-off: a holder process calls ``release()``, a waiter
  process blocked in ``kw.leases.acquire`` on the same resource holds the
  lease: median ≤ 2 ms (p99 shown);
* bus ``publish_many`` 100 → ``subscribe(max_messages=100)`` → ``ack``:
  ≥ 10 000 messages/s, and / raw redis-py (pipelined ``XADD`` +
  ``XREADGROUP COUNT 100`` + ``XACK``) on a raw stream: ≤ 1.5x;
* loopback: ``PING`` round trips, pinned and not (info: latency on a VM is
  bimodal, and the comparison rows depend on it).

The comparison rows run with this process and the server's main thread
pinned to one CPU (``os.sched_setaffinity``, i.e. ``taskset -p -c``), when
the server is local and the affinity may be changed; the server's affinity
is read first and restored at the end. The hand-off row is not pinned (two
client processes and the server). Keys live in a fresh namespace
(``?namespace=bench-<hex>``) and are removed at the end with SCAN + UNLINK;
the script never flushes a database.

The server is ``$KLOCKWORK_BENCH_REDIS_URL`` (default
``redis://127.0.0.1:6379/15``). With no server answering, the script says
what to start and exits 0 without rows. The exit status is 0 whether
targets are met or not: this is a measurement, not a test.

    .venv/bin/python benchmarks/bench_redis.py            # full run (~1 min)
    .venv/bin/python benchmarks/bench_redis.py --quick    # smoke run (< 20 s)
"""

import contextlib
import gc
import json
import multiprocessing
import os
import signal
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
    log,
    no_gc,
    parse_quick,
    print_header,
    print_table,
)

from klockwork import Klockwork  # noqa: E402

DEFAULT_URL = "redis://127.0.0.1:6379/15"
LOCK_RATIO = 1.5
MANIFEST_RATIO = 2.0
HANDOFF_MEDIAN_MS = 2.0
BUS_RATE = 10_000
BUS_RATIO = 1.5
BUS_BATCH = 100
RESOURCE = ("FILE:/bench/r", "MUTATES")
MANIFEST = [(f"FILE:/bench/m{i}", "MUTATES") for i in range(5)]
TTL_MS = 30_000
#: The commands klockwork's scripts arrive as (``INFO commandstats`` names):
#: the lease hot path's are functions (FCALL), the rest EVALSHA.
SCRIPTS = ("evalsha", "fcall")
PAYLOAD = {"task": "summarise", "doc": "reports/q3.md", "priority": 2}
perf_ns = time.perf_counter_ns


@dataclass(frozen=True)
class RedisPlan:
    """How much work each part does (full run or ``--quick``)."""

    batch: BatchPlan  # interleaved batches of the comparison rows
    batch_scale: float  # Redis operations are slow: batches this many times longer
    handoff_rounds: int
    pings: int
    counted_ops: int  # operations watched with MONITOR to count round trips


FULL = RedisPlan(BATCH_FULL, 2.0, handoff_rounds=200, pings=2_000, counted_ops=50)
QUICK = RedisPlan(BATCH_QUICK, 1.0, handoff_rounds=30, pings=300, counted_ops=10)


# --------------------------------------------------------------------------- server
def bench_url() -> str:
    """The server URL without a namespace (``$KLOCKWORK_BENCH_REDIS_URL``)."""
    return os.environ.get("KLOCKWORK_BENCH_REDIS_URL", DEFAULT_URL)


def with_namespace(url: str, namespace: str) -> str:
    """``url`` with ``?namespace=...`` added (klockwork's spelling)."""
    return f"{url}{'&' if '?' in url else '?'}namespace={namespace}"


def connect(url: str) -> Any:
    """A redis-py client of ``url``, or None (printed why) when no server answers."""
    try:
        import redis
    except ImportError:
        print("skipped: redis-py is not installed (uv sync --extra redis --extra dev)")
        return None
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
        client.ping()
    except Exception as exc:
        print(
            f"skipped: no Redis answers at {url} ({type(exc).__name__}: {exc}).\n"
            "Start one with `redis-server --bind 127.0.0.1 --port 6379` (the benchmark uses "
            "db 15 and a namespace of its own), or point KLOCKWORK_BENCH_REDIS_URL at a server."
        )
        return None
    return client


def delete_namespace(client: Any, namespace: str) -> int:
    """UNLINK every key of ``namespace`` (``{namespace}:*``); returns how many."""
    removed = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{{{namespace}}}:*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            removed += client.unlink(*batch)
            batch = []
    if batch:
        removed += client.unlink(*batch)
    return removed


class Pinning:
    """This process and the server's main thread on one CPU, and back.

    The server's pid comes from ``INFO server``; it is pinned only when the
    server runs on this machine (loopback URL, a ``redis-server`` process of
    that pid here). Its affinity is read first and restored by
    :meth:`restore` (also on SIGTERM and at exit).
    """

    def __init__(self, client: Any, url: str) -> None:
        self.cpu: int | None = None
        self.client_before = os.sched_getaffinity(0)
        self.server_pid: int | None = None
        self.server_before: set[int] | None = None
        self.why_not = ""
        host = urlsplit(url).hostname or ""
        if host not in ("127.0.0.1", "localhost", "::1"):
            self.why_not = f"the server is not on this machine ({host})"
            return
        try:
            pid = int(client.info("server")["process_id"])
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except Exception as exc:
            self.why_not = f"the server's process is not visible here ({exc})"
            return
        if not comm.startswith("redis"):
            self.why_not = f"pid {pid} here is {comm!r}, not the server (another namespace?)"
            return
        self.server_pid = pid
        try:
            self.server_before = set(os.sched_getaffinity(pid))
        except OSError as exc:
            self.why_not = f"cannot read the server's affinity ({exc})"
            self.server_pid = None

    @property
    def describe(self) -> str:
        """What is pinned, for the notes."""
        if self.cpu is None:
            return f"not pinned: {self.why_not}"
        return f"client and server pid {self.server_pid} pinned to CPU {self.cpu}"

    def pin(self) -> bool:
        """Pin both to one CPU; False (and :attr:`why_not` says why) when not allowed."""
        if self.server_pid is None or self.server_before is None:
            return False
        shared = sorted(self.server_before & self.client_before)
        if not shared:
            self.why_not = "the client and the server share no CPU"
            return False
        cpu = shared[-1]
        try:
            os.sched_setaffinity(self.server_pid, {cpu})
        except OSError as exc:
            self.why_not = f"not allowed to set the server's affinity ({exc})"
            return False
        os.sched_setaffinity(0, {cpu})
        self.cpu = cpu
        return True

    def restore(self) -> None:
        """Give both their affinity back (idempotent)."""
        if self.cpu is None:
            return
        self.cpu = None
        os.sched_setaffinity(0, self.client_before)
        if self.server_pid is not None and self.server_before is not None:
            with contextlib.suppress(OSError):  # the server may have gone
                os.sched_setaffinity(self.server_pid, self.server_before)


# --------------------------------------------------------------------------- helpers
def _per(stats: Stats, n: int) -> Stats:
    return Stats(stats.median_ns / n, stats.p90_ns / n, stats.samples)


def _pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def lease_op(kw: Klockwork, intents: Any) -> Callable[[], None]:
    """``try_acquire`` of ``intents`` then ``release`` of every lease granted."""
    try_acquire, release = kw.leases.try_acquire, kw.leases.release

    def op() -> None:
        verdict = try_acquire("bench", "s", intents, TTL_MS)
        for lease in verdict.leases:
            release(lease.lease_id)

    return op


def manifest_op(kw: Klockwork, intents: Any) -> Callable[[], None]:
    """A manifest as a user writes it: ``try_acquire``, then ``release_many`` of the ids."""
    try_acquire, release_many = kw.leases.try_acquire, kw.leases.release_many

    def op() -> None:
        verdict = try_acquire("bench", "s", intents, TTL_MS)
        release_many([lease.lease_id for lease in verdict.leases])

    return op


def acquire_only(kw: Klockwork, intents: Any) -> Callable[[], int]:
    """``try_acquire`` then ``release_many``, returning the ns of the ``try_acquire`` call alone."""
    try_acquire, release_many = kw.leases.try_acquire, kw.leases.release_many

    def op() -> int:
        t0 = perf_ns()
        verdict = try_acquire("bench", "s", intents, TTL_MS)
        spent = perf_ns() - t0
        release_many([lease.lease_id for lease in verdict.leases])
        return spent

    return op


def compare_parts(fns: dict[str, Callable[[], int]], batches: int, ops: int) -> dict[str, Stats]:
    """Interleaved batches of ``ops`` calls; a sample is the mean of the ns the calls return."""
    names = list(fns)
    for fn in fns.values():  # warm up
        for _ in range(max(5, ops // 2)):
            fn()
    means: dict[str, list[float]] = {name: [] for name in names}
    for i in range(batches):
        gc.collect(1)
        order = names[i % len(names) :] + names[: i % len(names)]
        with no_gc():
            for name in order:
                fn = fns[name]
                means[name].append(sum(fn() for _ in range(ops)) / ops)
    return {name: Stats.of(values) for name, values in means.items()}


def redis_lock_op(client: Any, name: str) -> Callable[[], None]:
    """redis-py's ``Lock``: ``acquire(blocking=False)`` + ``release()`` (SET NX PX + EVALSHA)."""
    lock = client.lock(name, timeout=TTL_MS / 1000)

    def op() -> None:
        if not lock.acquire(blocking=False):  # pragma: no cover - nobody else holds it
            raise RuntimeError(f"redis-py lock {name} not acquired")
        lock.release()

    return op


def _monitor(seen: list[dict[str, Any]], started: threading.Event, stop: threading.Event) -> None:
    """Collect MONITOR lines into ``seen`` until ``stop`` (a connection of its own)."""
    import redis

    client = redis.Redis.from_url(bench_url(), socket_timeout=5)
    try:
        with client.monitor() as mon:  # type: ignore[no-untyped-call]
            started.set()
            for cmd in mon.listen():
                seen.append(cmd)
                if stop.is_set():
                    return
    except Exception as exc:  # MONITOR refused (ACL, managed server)
        seen.append({"error": exc})
        started.set()
    finally:
        client.close()


def count_commands(
    client: Any, namespace: str, ops: Mapping[str, Callable[[], object]], n: int
) -> dict[str, str]:
    """What each operation sends, per call, watched with MONITOR (a connection of its own).

    Counts the commands clients send that name the namespace (every
    klockwork command does: keys and script arguments; a pipeline counts
    each command, in one round trip) and, in brackets, the ``redis.call``s
    scripts make on the namespace's keys (``TIME`` and ``PUBLISH`` channel
    names are not keys: not counted).
    """
    out: dict[str, str] = {}
    for name, op in ops.items():
        for _ in range(5):
            op()  # connections and scripts loaded before counting
        seen: list[dict[str, Any]] = []
        started, stop = threading.Event(), threading.Event()
        thread = threading.Thread(target=_monitor, args=(seen, started, stop), daemon=True)
        thread.start()
        started.wait(5)
        time.sleep(0.05)
        for _ in range(n):
            op()
        time.sleep(0.05)
        stop.set()
        client.ping()  # one more line so the watcher sees stop
        thread.join(5)
        errors = [c["error"] for c in seen if "error" in c]
        if errors:
            out[name] = f"n/a (MONITOR: {errors[0]})"
            continue
        ours = [c for c in seen if namespace in c.get("command", "")]
        sent = sum(1 for c in ours if c.get("client_type") != "lua")
        scripted = len(ours) - sent
        out[name] = f"{sent / n:.3g}" + (f" [{scripted / n:.3g} in scripts]" if scripted else "")
    return out


#: An operation to profile: the function, the commands it sends (``INFO
#: commandstats`` names) and how many of them per call.
Profiled = tuple[Callable[[], object], tuple[str, ...], int]


def layers(client: Any, ops: dict[str, Profiled], n: int) -> list[str]:
    """Where an operation's time goes: wall, this thread's CPU, the server's command time.

    The server's time is the growth of ``usec`` in ``INFO commandstats`` of
    the commands the operation sends (a script's ``EVALSHA`` includes the
    ``redis.call``s it makes) over ``n`` calls. Other clients sending the
    same commands add to it, so the line says how many the server counted
    against how many the operation sent (equal: a clean measurement).
    """
    lines = []
    for name, (op, commands, per_call) in ops.items():
        for _ in range(20):
            op()
        before = client.info("commandstats")
        w0, c0 = perf_ns(), time.thread_time_ns()
        for _ in range(n):
            op()
        c1, w1 = time.thread_time_ns(), perf_ns()
        after = client.info("commandstats")
        calls = usec = 0
        for cmd in commands:
            new = after.get(f"cmdstat_{cmd}", {"calls": 0, "usec": 0})
            old = before.get(f"cmdstat_{cmd}", {"calls": 0, "usec": 0})
            calls += new["calls"] - old["calls"]
            usec += new["usec"] - old["usec"]
        clean = "clean" if calls == per_call * n else f"{calls - per_call * n} from other clients"
        lines.append(
            f"  {name:32s} wall {(w1 - w0) / n / 1e3:7.1f} µs · client CPU "
            f"{(c1 - c0) / n / 1e3:7.1f} µs · server {usec / n:6.1f} µs in "
            f"{'+'.join(commands).upper()} ({per_call} per call; {clean})"
        )
    return lines


# --------------------------------------------------------------------------- sections
def bench_loopback(client: Any, plan: RedisPlan, pinned: str) -> Row:
    """PING round trips (a fresh connection of this process), median and p99."""
    lat: list[float] = []
    for _ in range(50):
        client.ping()
    with no_gc():
        for _ in range(plan.pings):
            t0 = perf_ns()
            client.ping()
            lat.append(perf_ns() - t0)
    ordered = sorted(lat)
    median = statistics.median(ordered)
    slow = sum(1 for x in ordered if x > 2 * median) / len(ordered)
    return Row(
        f"loopback PING round trip, {pinned} (median; p90 column shows p99)",
        Stats(median, _pct(ordered, 0.99), len(ordered)),
        section="info",
        note=f"p10 {_pct(ordered, 0.1) / 1e3:.0f} µs, p90 {_pct(ordered, 0.9) / 1e3:.0f} µs, "
        f"p99 {_pct(ordered, 0.99) / 1e3:.0f} µs; {slow:.0%} of {len(ordered)} round trips "
        "took more than twice the median",
    )


def bench_leases(
    client: Any, url: str, namespace: str, plan: RedisPlan, pinned: str, profile: bool
) -> tuple[list[Row], list[str]]:
    """Rows 1 and 2: one intent vs redis-py Lock; 5 intents vs one; commands counted."""
    profiled: list[str] = []
    kw = Klockwork.open(url)  # lease decisions audited (the default)
    kw_off = Klockwork.open(url, audit_leases=False)
    batches, batch_ms = plan.batch.batches, plan.batch.batch_ms * plan.batch_scale
    try:
        one, five = lease_op(kw, RESOURCE), manifest_op(kw, MANIFEST)
        lock = redis_lock_op(client, f"{{{namespace}}}:raw:lock")
        res = compare(
            {"ours": one, "lock": lock, "off": lease_op(kw_off, ("FILE:/bench/o", "MUTATES"))},
            batches,
            batch_ms,
            settle={"ours": kw.audit.flush, "off": kw_off.audit.flush},
        )
        manifest = compare(
            {"five": five, "one": one},
            batches,
            batch_ms,
            settle={"five": kw.audit.flush, "one": kw.audit.flush},
        )
        parts = compare_parts(
            {"five": acquire_only(kw, MANIFEST), "one": acquire_only(kw, RESOURCE)},
            batches,
            max(5, int(batch_ms * 1e6 / max(res["ours"].median_ns, 1))),
        )
        kw.audit.flush()
        watched = {"one": one, "five": five, "lock": lock, "off": lease_op(kw_off, RESOURCE)}
        rt = count_commands(client, namespace, watched, plan.counted_ops)
        if profile:
            profiled = layers(
                client,
                {
                    "try_acquire+release, audited": (one, SCRIPTS, 2),
                    "try_acquire+release, audit off": (watched["off"], SCRIPTS, 2),
                    "manifest of 5 + release_many": (five, SCRIPTS, 2),
                    "redis-py Lock acquire+release": (lock, ("set", "evalsha"), 2),
                    "PING": (client.ping, ("ping",), 1),
                },
                plan.counted_ops * 10,
            )
    finally:
        kw.close()
        kw_off.close()
    rows = [
        Row(
            "Redis try_acquire+release, audited, vs redis-py Lock",
            res["ours"],
            res["lock"],
            "redis-py Lock(timeout=30).acquire(blocking=False) + release(), same server",
            f"≤ {LOCK_RATIO}x",
            LOCK_RATIO,
            note=f"{pinned}; audited = two entries (granted, released) written by the lease "
            "scripts with each decision, sealed into the namespace's chain by the engine's "
            "sealer thread and at the end of each batch by kw.audit.flush() (timed); "
            f"commands per cycle: klockwork {rt['one']}, redis-py Lock {rt['lock']}",
        ),
        Row(
            "Redis try_acquire+release, audit_leases=False, vs redis-py Lock (info)",
            res["off"],
            res["lock"],
            "redis-py Lock, the same batches as the row above",
            section="info",
            note=f"commands per cycle {rt['off']}",
        ),
        Row(
            "Redis try_acquire+release, audited vs audit off (info)",
            res["ours"],
            res["off"],
            "the same on Klockwork.open(url, audit_leases=False)",
            section="info",
        ),
        Row(
            "Redis manifest of 5 intents vs 1: try_acquire + release_many",
            manifest["five"],
            manifest["one"],
            "one intent, try_acquire + release (same engine, interleaved)",
            f"≤ {MANIFEST_RATIO:.0f}x",
            MANIFEST_RATIO,
            note=f"{pinned}; 5 FILE resources in one try_acquire, then one release_many() "
            f"of the 5 lease ids (what a user writes for a manifest); commands per cycle: "
            f"5 intents {rt['five']}, 1 intent {rt['one']}",
        ),
        Row(
            "Redis manifest of 5 intents vs 1: try_acquire alone (info)",
            parts["five"],
            parts["one"],
            "one intent, try_acquire alone",
            section="info",
            note="each call timed on its own; the releases run untimed",
        ),
    ]
    return rows, profiled


def bus_cycle(kw: Klockwork, channel: str, batch: int) -> Callable[[], None]:
    """``publish_many`` ``batch`` messages, take them through a group, ack them."""
    bus = kw.bus
    payloads = [PAYLOAD] * batch
    bus.create_group(channel, "g", start="new")

    def op() -> None:
        bus.publish_many(channel, payloads)
        got = bus.subscribe(channel, "g", "c", max_messages=batch)
        if len(got) != batch:  # pragma: no cover - a broken bus must not look fast
            raise RuntimeError(f"expected {batch} deliveries, got {len(got)}")
        bus.ack(channel, "g", got)

    return op


def raw_cycle(client: Any, stream: str, batch: int) -> Callable[[], None]:
    """redis-py alone: pipelined XADD (JSON payload), XREADGROUP COUNT ``batch``, XACK."""
    client.xgroup_create(stream, "g", id="$", mkstream=True)
    payload = PAYLOAD
    dumps, loads = json.dumps, json.loads

    def op() -> None:
        pipe = client.pipeline(transaction=False)
        for _ in range(batch):
            pipe.xadd(stream, {"p": dumps(payload)})
        pipe.execute()
        reply = client.xreadgroup("g", "c", {stream: ">"}, count=batch)
        entries = reply[0][1]
        if len(entries) != batch:  # pragma: no cover
            raise RuntimeError(f"expected {batch} entries, got {len(entries)}")
        ids = [entry_id for entry_id, fields in entries if loads(fields[b"p"]) is not None]
        client.xack(stream, "g", *ids)

    return op


def bench_bus(
    client: Any, url: str, namespace: str, plan: RedisPlan, pinned: str, profile: bool
) -> tuple[list[Row], list[str]]:
    """Row 4: batched bus cycle, rate and ratio vs raw streams (100; 10 as info)."""
    profiled: list[str] = []
    kw = Klockwork.open(url)
    batches = max(5, plan.batch.batches // 2)
    batch_ms = plan.batch.batch_ms * plan.batch_scale * 3
    try:
        ours100 = bus_cycle(kw, "bench.bus100", BUS_BATCH)
        raw100 = raw_cycle(client, f"{{{namespace}}}:raw:s100", BUS_BATCH)
        fns: dict[str, Callable[[], object]] = {
            "ours100": ours100,
            "raw100": raw100,
            "ours10": bus_cycle(kw, "bench.bus10", 10),
            "raw10": raw_cycle(client, f"{{{namespace}}}:raw:s10", 10),
        }
        stats = compare(fns, batches, batch_ms)
        watched = {"bus100": ours100, "raw100": raw100}
        rt = count_commands(client, namespace, watched, max(3, plan.counted_ops // 5))
        if profile:
            profiled = layers(
                client,
                {
                    "bus cycle of 100 messages": (ours100, ("evalsha",), 3),
                    "redis-py streams, 100 messages": (
                        raw100,
                        ("xadd", "xreadgroup", "xack"),
                        BUS_BATCH + 2,
                    ),
                },
                plan.counted_ops,
            )
    finally:
        kw.close()
    ours, raw = _per(stats["ours100"], BUS_BATCH), _per(stats["raw100"], BUS_BATCH)
    rate, raw_rate = 1e9 / ours.median_ns, 1e9 / raw.median_ns
    return [
        Row(
            f"Redis bus publish_many→subscribe→ack, batches of {BUS_BATCH}, per message",
            ours,
            None,
            "",
            f"≥ {BUS_RATE:,} msg/s",
            1e9 / BUS_RATE,
            absolute_ns=True,
            note=f"{pinned}; {rate:,.0f} messages/s (redis-py alone: {raw_rate:,.0f}/s); "
            f"commands per batch: klockwork {rt['bus100']}, redis-py {rt['raw100']}",
        ),
        Row(
            f"Redis bus, batches of {BUS_BATCH}, vs redis-py streams",
            ours,
            raw,
            f"pipelined XADD x{BUS_BATCH} (json.dumps) + XREADGROUP COUNT {BUS_BATCH} "
            "(json.loads) + XACK, per message",
            f"≤ {BUS_RATIO}x",
            BUS_RATIO,
        ),
        Row(
            "Redis bus, batches of 10, vs redis-py streams (info)",
            _per(stats["ours10"], 10),
            _per(stats["raw10"], 10),
            "the same raw cycle with 10 messages, per message",
            section="info",
            note=f"{1e9 / (stats['ours10'].median_ns / 10):,.0f} messages/s",
        ),
    ], profiled


def _waiter(url: str, cmds: Connection, parked: Connection, results: Connection) -> None:
    """The waiting process: on each command, block in ``acquire`` and report when it holds."""
    with Klockwork.open(url) as kw:
        leases = kw.leases
        go = threading.Event()
        done = threading.Event()

        def watch() -> None:  # tells the holder once acquire has got WAIT and sleeps
            while True:
                go.wait()
                go.clear()
                if done.is_set():
                    return
                deadline = time.monotonic() + 10
                while leases.waiting == 0 and time.monotonic() < deadline:
                    time.sleep(50e-6)
                parked.send(leases.waiting > 0)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        results.send("ready")
        while cmds.recv():
            try:
                go.set()
                verdict = leases.acquire("old", "s-old", RESOURCE, TTL_MS, timeout_s=10)
                t1 = perf_ns()
                leases.release(verdict.lease.lease_id)
                results.send(t1)
            except Exception as exc:  # reported by the holder
                results.send(f"{type(exc).__name__}: {exc}")
        done.set()
        go.set()
        watcher.join(5)


def bench_handoff(url: str, plan: RedisPlan) -> list[Row]:
    """Row 3: release() in this process → a waiter in another process holds the lease."""
    ctx = multiprocessing.get_context("spawn")
    cmd_send, cmd_recv = ctx.Pipe()
    parked_recv, parked_send = ctx.Pipe(duplex=False)
    res_recv, res_send = ctx.Pipe(duplex=False)
    latencies: list[float] = []
    warmup = 5
    with Klockwork.open(url) as kw:
        kw.register_agent("old", 1)  # the waiter is older: it gets WAIT, not DIE
        kw.register_agent("young", 2)
        proc = ctx.Process(target=_waiter, args=(url, cmd_recv, parked_send, res_send))
        proc.start()
        try:
            if not res_recv.poll(60) or res_recv.recv() != "ready":
                raise RuntimeError("the waiter process did not start")
            leases = kw.leases
            for i in range(plan.handoff_rounds + warmup):
                held = leases.try_acquire("young", "s-young", RESOURCE, TTL_MS)
                if not held.granted:
                    raise RuntimeError(f"holder not granted: {held.status}")
                cmd_send.send(True)
                if not parked_recv.poll(15) or not parked_recv.recv():
                    raise RuntimeError("the waiter never started waiting")
                t0 = perf_ns()
                leases.release(held.lease.lease_id)
                if not res_recv.poll(15):
                    raise RuntimeError("the waiter was not granted within 15 s")
                t1 = res_recv.recv()
                if not isinstance(t1, int):
                    raise RuntimeError(f"the waiter failed: {t1}")
                if i >= warmup:
                    latencies.append(t1 - t0)
                time.sleep(0.001 + (i % 5) / 1000)  # the waiter idles a little, as agents do
        finally:
            cmd_send.send(False)
            proc.join(15)
            if proc.is_alive():  # pragma: no cover
                proc.kill()
    ordered = sorted(latencies)
    median, p99 = statistics.median(ordered), _pct(ordered, 0.99)
    return [
        Row(
            "Redis cross-process hand-off, release() → waiter holds (median; p90 column: p99)",
            Stats(median, p99, len(ordered)),
            None,
            "",
            f"median ≤ {HANDOFF_MEDIAN_MS:.0f} ms",
            HANDOFF_MEDIAN_MS * 1e6,
            absolute_ns=True,
            note=f"not pinned; {len(ordered)} hand-offs after {warmup} warm-ups; from "
            "perf_counter_ns() before the holder's release() to the waiter's stamp after its "
            f"blocking acquire() returned (CLOCK_MONOTONIC, system-wide); p90 "
            f"{_pct(ordered, 0.9) / 1e6:.2f} ms, p99 {p99 / 1e6:.2f} ms, "
            f"max {ordered[-1] / 1e6:.2f} ms",
        )
    ]


# --------------------------------------------------------------------------- main
@contextlib.contextmanager
def restored_on_signal(pinning: Pinning) -> Iterator[None]:
    """Restore the server's affinity on SIGTERM (KeyboardInterrupt unwinds by itself)."""

    def stop(signum: int, frame: object) -> None:
        pinning.restore()
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        pinning.restore()
        signal.signal(signal.SIGTERM, before)


def main(argv: list[str] | None = None) -> int:
    """Run every row; print the table (exit 0 whether or not targets are met)."""
    args = parse_quick(
        __doc__ or "",
        argv,
        profile="also print where each operation's time goes: wall, client CPU, "
        "server command time (INFO commandstats)",
    )
    plan = QUICK if args.quick else FULL
    base = bench_url()
    client = connect(base)
    if client is None:
        return 0
    namespace = f"bench-{uuid.uuid4().hex}"
    url = with_namespace(base, namespace)
    version = client.info("server").get("redis_version", "?")
    print_header(args.quick, f"Redis store vs redis-py on Redis {version} at {base}")
    started = time.monotonic()
    load_start = os.getloadavg()[0]
    rows: list[Row] = []
    profiled: list[str] = []
    pinned = "not pinned"
    pinning = Pinning(client, base)
    try:
        with restored_on_signal(pinning):
            log("[loopback] ...")
            rows.append(bench_loopback(client, plan, "not pinned"))
            pinned = pinning.describe if pinning.pin() else f"not pinned: {pinning.why_not}"
            # A fresh client after pinning: its connection is made by the pinned process.
            pinned_client = client.__class__.from_url(base, socket_timeout=5)
            try:
                if pinning.cpu is not None:
                    rows.append(bench_loopback(pinned_client, plan, f"pinned to CPU {pinning.cpu}"))
                log("[leases] ...")
                lease_rows, profiled = bench_leases(
                    pinned_client, url, namespace, plan, pinned, args.profile
                )
                rows += lease_rows
                log("[bus] ...")
                bus_rows, bus_profiled = bench_bus(
                    pinned_client, url, namespace, plan, pinned, args.profile
                )
                rows += bus_rows
                profiled += bus_profiled
            finally:
                pinned_client.close()
                pinning.restore()
            log("[hand-off] ...")
            rows += bench_handoff(url, plan)
    finally:
        removed = delete_namespace(client, namespace)
        client.close()
    print()
    print_table(rows)
    if profiled:
        print(f"\nwhere the time goes ({pinned}):")
        print("\n".join(profiled))
    load_end = os.getloadavg()[0]
    print(
        f"\ntotal {time.monotonic() - started:.1f} s · 1-min load average "
        f"{load_start:.2f} → {load_end:.2f} · namespace {namespace}: {removed} keys unlinked"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
