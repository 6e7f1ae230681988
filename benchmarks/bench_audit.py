"""Audit log benchmarks: recording, sealing and verifying, against the floor.

In one run this prints, for the in-memory audit log (``AuditLog`` on its
default ``MemoryAuditBackend``, as ``Klockwork()`` builds it):

(a) the hot-path rate of ``AuditLog.record`` (timed on the caller's thread,
    record calls only; informational);
(b) "memory audit append+seal": the same records plus the ``flush`` that
    waits until they are sealed (hashed as blocks, stored): end to end;
(c) the rate of ``AuditLog.verify`` over the chain the round built (the
    default backend keeps only its newest ``DEFAULT_AUDIT_RETAIN`` entries,
    100 000: verify checks those; the row says how many);
(d) the floor: a bare ``list.append`` of the same fields under a
    ``threading.Lock`` (garbage collector off while it runs, see
    :func:`floor_rate`).

Targets (PASS/MISS, on the absolute rates, as the hot-path issue states
them): (b) >= 300 000 entries/s, (c) >= 1 000 000 entries/s.

This shared machine's speed drifts a lot from one run to the next, so each
rate is also printed normalised to the machine: beside it, the floor (d)
measured in the same rounds, and the median over rounds of rate / floor of
that round. Rounds are interleaved (floor, record, flush, verify, then
again), so drift hits every side alike; each figure is the median of the
rounds (the best is shown too). The writer thread shares the GIL with the
recording thread, so (a) includes whatever CPU the writer takes while the
records are being made. The exit status is 0 whether targets are met or not:
this is a measurement, not a test.

    .venv/bin/python benchmarks/bench_audit.py            # full run (~10 s)
    .venv/bin/python benchmarks/bench_audit.py --quick    # smoke run
"""

import argparse
import gc
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from klockwork.core.audit.log import AuditLog  # noqa: E402
from klockwork.core.clock import SystemClock  # noqa: E402

perf = time.perf_counter
TARGET_APPEND_SEAL = 300_000  # record + flush, entries/s
TARGET_VERIFY = 1_000_000  # entries/s
# What the engine records for a granted lease (klockwork/core/leases/manager.py).
DATA = {
    "lease_id": "01J0Z8K5Q7W2X3Y4Z5A6B7C8D9",
    "resource": "FILE:/src/auth.ts",
    "predicate": "MUTATES",
    "fencing_token": 42,
    "expires_at": 1_700_000_030_000,
}


def floor_rate(n: int) -> float:
    """Bare list.append under a threading.Lock: entries/s.

    The garbage collector is off while it runs: the tuples it appends would
    otherwise set off collections whose cost depends on what earlier rounds
    left behind, and make the floor swing by 2x from round to round
    (``record`` allocates nothing the collector tracks).
    """
    lock = threading.Lock()
    items: list[tuple[int, str, str, str, dict[str, object]]] = []
    append = items.append
    was = gc.isenabled()
    gc.disable()
    try:
        t0 = perf()
        for i in range(n):
            with lock:
                append((i, "lease.granted", "agent-1", "session-1", DATA))
        return n / (perf() - t0)
    finally:
        if was:
            gc.enable()


def record_rates(n: int) -> tuple[float, float, AuditLog]:
    """(record-only rate, end-to-end rate) for ``n`` records into a fresh log."""
    log = AuditLog(clock=SystemClock())
    log.record("lease.granted", "agent-1", "session-1", DATA)  # start the writer
    log.flush()
    record = log.record
    t0 = perf()
    for _ in range(n):
        record("lease.granted", "agent-1", "session-1", DATA)
    t1 = perf()
    log.flush()
    t2 = perf()
    return n / (t1 - t0), n / (t2 - t0), log


def verify_rate(log: AuditLog) -> tuple[float, int]:
    t0 = perf()
    result = log.verify()
    elapsed = perf() - t0
    if not result.valid:
        raise SystemExit(f"verify failed: {result.reason}")
    return result.checked / elapsed, result.checked


def fmt(rate: float) -> str:
    return f"{rate:,.0f} /s"


@dataclass
class Measured:
    """One measurement's per-round rates and the floor of the same rounds."""

    name: str
    rates: list[float]
    floors: list[float]
    target: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def vs_floor(self) -> float:
        """Median over rounds of rate / floor (1.0: as fast as the floor)."""
        return statistics.median(r / f for r, f in zip(self.rates, self.floors, strict=True))

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "info"
        return "PASS" if self.median >= self.target else "MISS"

    def cells(self) -> tuple[str, ...]:
        share = self.vs_floor
        is_floor = self.rates is self.floors
        return (
            self.name,
            fmt(self.median),
            fmt(max(self.rates)),
            "-" if is_floor else fmt(statistics.median(self.floors)),
            "-" if is_floor else f"{share:.3f} (floor {1 / share:.1f}x faster)",
            "-" if self.target is None else f">= {self.target:,.0f} /s",
            self.verdict,
        )


def print_table(rows: list[Measured]) -> None:
    header = (
        "measurement",
        "rate (median)",
        "best",
        "floor, same rounds",
        "rate / floor",
        "target",
        "",
    )
    table = [header, *(row.cells() for row in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, line in enumerate(table):
        print("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(line)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer entries and rounds")
    args = parser.parse_args(argv)
    n, rounds = (50_000, 3) if args.quick else (200_000, 5)
    print(
        f"klockwork audit benchmark: python {platform.python_version()}, "
        f"{os.cpu_count()} cpus, {n:,} entries x {rounds} rounds (median; best) · "
        f"{'quick' if args.quick else 'full'} run · memory"
    )
    started = time.monotonic()
    floors: list[float] = []
    records: list[float] = []
    e2es: list[float] = []
    verifies: list[float] = []
    checked = 0
    for _ in range(rounds):  # interleaved, so drift hits every side alike
        floors.append(floor_rate(n))
        rec, e2e, log = record_rates(n)
        records.append(rec)
        e2es.append(e2e)
        rate, checked = verify_rate(log)
        verifies.append(rate)
        log.close()
    rows = [
        Measured("(a) record, caller's thread", records, floors),
        Measured("(b) memory audit append+seal (record + flush)", e2es, floors, TARGET_APPEND_SEAL),
        Measured(f"(c) verify ({checked:,} entries)", verifies, floors, TARGET_VERIFY),
        Measured("(d) floor: list.append under Lock", floors, floors),
    ]
    print()
    print_table(rows)
    print()
    print(
        "* rate / floor: median over rounds of the rate divided by the floor's rate in the "
        "same round (normalised to this machine's speed during the run)"
    )
    print("* PASS/MISS compares the absolute median rate with the target")
    print(f"({time.monotonic() - started:.1f} s)")
    return 0  # a measurement, not a test: a MISS does not fail the run


if __name__ == "__main__":
    sys.exit(main())
