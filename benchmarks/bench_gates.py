"""Gate benchmarks: what one policy check costs next to doing nothing at all.

The anchor is a bare Python function call that does nothing, timed in the
same process the same way (a function call per operation, batches
interleaved so that drift hits every side alike); the table prints median
and p90 per operation and the ratio. The target is absolute: an allow-policy
``kw.gates.gate()`` on the memory engine within 10 µs (median). Every gate
that runs records its audit entry as it would in production (the audit
writer hashes them on its own thread).

    .venv/bin/python benchmarks/bench_gates.py            # full run (< 1 min)
    .venv/bin/python benchmarks/bench_gates.py --quick    # smoke run (< 10 s)
    .venv/bin/python benchmarks/bench_gates.py --profile  # also cProfile gate()
"""

import argparse
import contextlib
import cProfile
import gc
import io
import itertools
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from klockwork import Klockwork, MemoryStore, Policy, __version__  # noqa: E402

perf_ns = time.perf_counter_ns
TARGET_NS = 10_000  # allow-policy gate() median


@dataclass(frozen=True)
class Plan:
    batches: int
    batch_ms: float


FULL = Plan(batches=41, batch_ms=10.0)
QUICK = Plan(batches=9, batch_ms=4.0)


@dataclass
class Stats:
    """Median and p90 of per-batch nanoseconds per operation."""

    median_ns: float
    p90_ns: float

    @classmethod
    def of(cls, values: list[float]) -> "Stats":
        ordered = sorted(values)
        p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
        return cls(statistics.median(ordered), p90)


def fmt_ns(ns: float) -> str:
    if ns < 1_000:
        return f"{ns:.0f} ns"
    if ns < 1_000_000:
        return f"{ns / 1_000:.2f} µs"
    return f"{ns / 1_000_000:.2f} ms"


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _batch_ns(fn: Callable[[], object], n: int) -> float:
    rng = range(n)
    t0 = perf_ns()
    for _ in rng:
        fn()
    return (perf_ns() - t0) / n


def _calibrate(fn: Callable[[], object], batch_ms: float) -> int:
    """Warm ``fn`` up; return how many calls fill ``batch_ms`` of wall time."""
    n, spent = 0, 0
    budget = max(20_000_000, int(batch_ms * 5_000_000))
    while spent < budget or n < 100:
        t0 = perf_ns()
        for _ in range(50):
            fn()
        spent += perf_ns() - t0
        n += 50
    return max(10, int(batch_ms * 1_000_000 * n / spent))


def compare(fns: dict[str, Callable[[], object]], plan: Plan) -> dict[str, Stats]:
    """Interleaved batches (rotating order, GC off within a batch); ns/op per function."""
    names = list(fns)
    sizes = {name: _calibrate(fns[name], plan.batch_ms) for name in names}
    means: dict[str, list[float]] = {name: [] for name in names}
    for i in range(plan.batches):
        gc.collect(1)
        order = names[i % len(names) :] + names[: i % len(names)]
        with no_gc():
            for name in order:
                means[name].append(_batch_ns(fns[name], sizes[name]))
    return {name: Stats.of(values) for name, values in means.items()}


def nothing() -> None:
    """The anchor: a bare Python function call that does nothing."""


def engine() -> Klockwork:
    kw = Klockwork(MemoryStore())
    kw.policies.add(Policy(name="reads", action="repo.read", effect="allow"))
    kw.policies.add(Policy(name="repo", action="repo.*", effect="require_approval"))
    kw.policies.add(Policy(name="no-infra", action="infra.*", effect="deny"))
    return kw


def run(plan: Plan) -> list[tuple[str, Stats, str]]:
    kw = engine()
    quiet = engine()  # diagnostic: the same gate with audit recording switched off
    quiet.gates._audit = lambda *args, **kwargs: 0
    ids = itertools.count()
    gate, execute, can_i = kw.gates.gate, kw.gates.execute, kw.gates.can_i
    meta = {"repo": "klockwork", "branch": "main"}
    fns: dict[str, Callable[[], object]] = {
        "bare function call (anchor)": nothing,
        "gate() allow policy": lambda: gate("agent-1", "repo.read", meta),
        "execute(event_id=new) allow": lambda: execute(
            "agent-1", "repo.read", meta, f"evt-{next(ids)}"
        ),
        "execute(event_id=seen) repeat": lambda: execute("agent-1", "repo.read", meta, "evt-0"),
        "can_i() allow policy": lambda: can_i("agent-1", "repo.read", meta),
        "gate() allow, no audit (diagnostic)": lambda: quiet.gates.gate(
            "agent-1", "repo.read", meta
        ),
    }
    try:
        stats = compare(fns, plan)
        kw.audit.flush()
    finally:
        kw.close()
        quiet.close()
    targets = {"gate() allow policy": f"allow-policy gate() <= {fmt_ns(TARGET_NS)}"}
    return [(name, s, targets.get(name, "")) for name, s in stats.items()]


def print_table(rows: list[tuple[str, Stats, str]]) -> bool:
    anchor = rows[0][1].median_ns
    header = ("benchmark", "median (p90)", "vs bare call", "target", "")
    table = [header]
    ok = True
    for name, s, target in rows:
        verdict = ""
        if target:
            passed = s.median_ns <= TARGET_NS
            ok = ok and passed
            verdict = "PASS" if passed else "MISS"
        table.append(
            (
                name,
                f"{fmt_ns(s.median_ns)} (p90 {fmt_ns(s.p90_ns)})",
                f"{s.median_ns / anchor:,.0f}x" if s is not rows[0][1] else "1x",
                target or "-",
                verdict,
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, line in enumerate(table):
        print("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(line)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return ok


def profile(n: int = 20_000) -> None:
    """cProfile ``n`` allow-policy gates; print where the time goes."""
    kw = engine()
    meta = {"repo": "klockwork", "branch": "main"}
    for _ in range(1_000):
        kw.gates.gate("agent-1", "repo.read", meta)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        kw.gates.gate("agent-1", "repo.read", meta)
    prof.disable()
    kw.close()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
    print(f"\ncProfile of {n:,} allow-policy gate() calls, by own time:")
    print(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run")
    parser.add_argument("--profile", action="store_true", help="also cProfile gate()")
    opts = parser.parse_args(argv)
    plan = QUICK if opts.quick else FULL
    print(
        f"klockwork {__version__} · Python {platform.python_version()} · "
        f"{platform.machine()} · {'quick' if opts.quick else 'full'} run · memory engine"
    )
    started = time.monotonic()
    ok = print_table(run(plan))
    print(f"\n({time.monotonic() - started:.1f} s)")
    if opts.profile:
        profile()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
