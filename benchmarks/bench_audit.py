"""Audit log benchmarks: recording, writing and verifying, against the floor.

In one run this prints:

(a) the hot-path rate of ``AuditLog.record`` (timed on the caller's thread,
    record calls only) and the end-to-end rate (the same records plus the
    ``flush`` that waits for them to be hashed and stored), in memory;
(b) the rate of ``AuditLog.verify`` over the whole chain;
(c) the floor: a bare ``list.append`` under a ``threading.Lock``, and how many
    times slower ``record`` is than it.

Targets (PASS/MISS): end-to-end >= 100 000 entries/s, verify >= 300 000
entries/s on at least 200 000 entries. Each measurement is repeated and the
median is reported (the best is shown too); the writer thread shares the GIL
with the recording thread, so (a) includes whatever CPU the writer takes
while the records are being made.

    .venv/bin/python benchmarks/bench_audit.py            # full run (~1 min)
    .venv/bin/python benchmarks/bench_audit.py --quick    # smoke run
"""

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from klockwork.core.audit.log import AuditLog  # noqa: E402
from klockwork.core.clock import SystemClock  # noqa: E402

perf = time.perf_counter
TARGET_E2E = 100_000
TARGET_VERIFY = 300_000
# What the engine records for a granted lease (klockwork/core/leases/manager.py).
DATA = {
    "lease_id": "01J0Z8K5Q7W2X3Y4Z5A6B7C8D9",
    "resource": "FILE:/src/auth.ts",
    "predicate": "MUTATES",
    "fencing_token": 42,
    "expires_at": 1_700_000_030_000,
}


def floor_rate(n: int) -> float:
    """Bare list.append under a threading.Lock: entries/s."""
    lock = threading.Lock()
    items: list[tuple[int, str, str, str, dict[str, object]]] = []
    append = items.append
    t0 = perf()
    for i in range(n):
        with lock:
            append((i, "lease.granted", "agent-1", "session-1", DATA))
    return n / (perf() - t0)


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
    return f"{rate:>12,.0f} /s"


def verdict(value: float, target: float) -> str:
    return "PASS" if value >= target else "MISS"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer entries and rounds")
    args = parser.parse_args()
    n, rounds = (50_000, 3) if args.quick else (200_000, 5)
    print(
        f"klockwork audit benchmark: python {platform.python_version()}, "
        f"{os.cpu_count()} cpus, {n:,} entries x {rounds} rounds (median; best)"
    )
    floors, records, e2es, verifies = [], [], [], []
    checked = 0
    for _ in range(rounds):  # interleaved, so drift hits every side alike
        floors.append(floor_rate(n))
        rec, e2e, log = record_rates(n)
        records.append(rec)
        e2es.append(e2e)
        rate, checked = verify_rate(log)
        verifies.append(rate)
        log.close()

    def row(name: str, rates: list[float], extra: str = "") -> float:
        med = statistics.median(rates)
        print(f"  {name:<34}{fmt(med)}  (best {fmt(max(rates)).strip()}){extra}")
        return med

    floor = row("floor: list.append under Lock", floors)
    rec = row("(a) record, caller's thread", records)
    e2e = row("(a) record + flush, end to end", e2es)
    ver = row(f"(b) verify ({checked:,} entries)", verifies)
    print()
    print(f"  (c) record is {floor / rec:.1f}x the floor; end to end {floor / e2e:.1f}x the floor")
    print(f"  end to end  {e2e:,.0f}/s vs target {TARGET_E2E:,}/s: {verdict(e2e, TARGET_E2E)}")
    print(
        f"  verify      {ver:,.0f}/s vs target {TARGET_VERIFY:,}/s: {verdict(ver, TARGET_VERIFY)}"
    )
    ok = (
        e2e >= TARGET_E2E and ver >= TARGET_VERIFY and checked >= (200_000 if not args.quick else 0)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
