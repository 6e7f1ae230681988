"""SQLite audit benchmark: AuditLog append rate into a SQLite file, against memory.

In one run this prints, each as the median of several rounds (best shown too):

(a) the end-to-end append rate into :class:`SqliteAuditBackend`: ``record``
    calls plus the ``flush`` that waits until they are hashed and committed
    (the writer commits one ``BEGIN IMMEDIATE`` transaction per batch of up
    to 1024 entries; WAL, ``synchronous=NORMAL``);
(b) the same with ``rebase=True`` (one writer, so nothing is re-chained:
    this measures the mode's overhead only);
(c) the same into :class:`MemoryAuditBackend`, and how many times slower
    SQLite is than memory;
(d) ``verify`` over the SQLite chain.

Target (PASS/MISS): (a) >= 10 000 entries/s. The exit status is 0 whether the
target is met or not: this is a measurement, not a test.

    .venv/bin/python benchmarks/bench_audit_sqlite.py            # full run (~20 s)
    .venv/bin/python benchmarks/bench_audit_sqlite.py --quick    # smoke run
"""

import argparse
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from klockwork.core.audit.log import AuditBackend, AuditLog, MemoryAuditBackend  # noqa: E402
from klockwork.core.audit.sqlite import SqliteAuditBackend  # noqa: E402
from klockwork.core.clock import SystemClock  # noqa: E402

perf = time.perf_counter
TARGET = 10_000
# The record shape, the verify timing and the formatting are bench_audit's:
# one definition, so the memory and SQLite figures stay comparable.
from bench_audit import DATA  # noqa: E402
from bench_audit import verify_rate as _verify_rate  # noqa: E402


def append_rate(backend: AuditBackend, n: int) -> tuple[float, AuditLog]:
    """End-to-end rate of ``n`` records + flush into ``backend`` (entries/s)."""
    log = AuditLog(backend, clock=SystemClock())
    log.record("lease.granted", "agent-1", "session-1", DATA)  # start the writer
    log.flush()
    record = log.record
    t0 = perf()
    for i in range(n):
        record("lease.granted", f"agent-{i % 8}", "session-1", DATA)
    log.flush()
    return n / (perf() - t0), log


def verify_rate(log: AuditLog) -> float:
    return _verify_rate(log)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer entries and rounds")
    args = parser.parse_args()
    n, rounds = (20_000, 3) if args.quick else (100_000, 5)
    print(
        f"klockwork sqlite audit benchmark: python {platform.python_version()}, "
        f"sqlite {sqlite3.sqlite_version}, "
        f"{os.cpu_count()} cpus, {n:,} entries x {rounds} rounds (median; best)"
    )
    sqlites: list[float] = []
    rebases: list[float] = []
    memories: list[float] = []
    verifies: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):  # interleaved, so drift hits every side alike
            rate, log = append_rate(SqliteAuditBackend(Path(tmp) / f"plain{r}.db"), n)
            sqlites.append(rate)
            verifies.append(verify_rate(log))
            log.close()
            rate, log = append_rate(SqliteAuditBackend(Path(tmp) / f"rebase{r}.db", rebase=True), n)
            rebases.append(rate)
            log.close()
            rate, log = append_rate(MemoryAuditBackend(), n)
            memories.append(rate)
            log.close()

    def row(name: str, rates: list[float]) -> float:
        med = statistics.median(rates)
        print(f"  {name:<40}{med:>12,.0f} /s  (best {max(rates):,.0f} /s)")
        return med

    sql = row("(a) sqlite: record + flush", sqlites)
    reb = row("(b) sqlite rebase=True: record + flush", rebases)
    mem = row("(c) memory: record + flush", memories)
    ver = row(f"(d) verify, sqlite ({n + 1:,} entries)", verifies)
    print()
    print(f"  sqlite is {mem / sql:.1f}x slower than memory; rebase mode {mem / reb:.1f}x")
    print(f"  verify reads {ver / sql:.1f}x faster than sqlite appends")
    verdict = "PASS" if sql >= TARGET else "MISS"
    print(f"  sqlite append {sql:,.0f}/s vs target {TARGET:,}/s: {verdict}")
    return 0  # a measurement, not a test: a MISS does not fail the run


if __name__ == "__main__":
    sys.exit(main())
