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
import cProfile
import io
import itertools
import pstats
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

# Timing, results and the table are bench_leases's: one definition for every benchmark.
from bench_leases import Row, compare, environment, print_table  # noqa: E402

from klockwork import Klockwork, MemoryStore, Policy  # noqa: E402

TARGET_NS = 10_000  # allow-policy gate() median
ANCHOR = "a bare Python function call doing nothing"


@dataclass(frozen=True)
class Plan:
    batches: int
    batch_ms: float


FULL = Plan(batches=41, batch_ms=10.0)
QUICK = Plan(batches=9, batch_ms=4.0)


def nothing() -> None:
    """The anchor: a bare Python function call that does nothing."""


def engine() -> Klockwork:
    kw = Klockwork(MemoryStore())
    kw.policies.add(Policy(name="reads", action="repo.read", effect="allow"))
    kw.policies.add(Policy(name="repo", action="repo.*", effect="require_approval"))
    kw.policies.add(Policy(name="no-infra", action="infra.*", effect="deny"))
    return kw


def run(plan: Plan) -> list[Row]:
    kw = engine()
    quiet = engine()  # diagnostic: the same gate with audit recording switched off
    quiet.gates._audit = lambda *args, **kwargs: 0
    ids = itertools.count()
    gate, execute, can_i = kw.gates.gate, kw.gates.execute, kw.gates.can_i
    meta = {"repo": "klockwork", "branch": "main"}
    fns: dict[str, Callable[[], object]] = {
        "anchor": nothing,
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
        # The audited engine's flush ends each of its batches, inside the timing.
        settle = {
            name: kw.audit.flush for name in fns if name != "anchor" and "no audit" not in name
        }
        stats = compare(fns, plan.batches, plan.batch_ms, settle)
    finally:
        kw.close()
        quiet.close()
    anchor = stats.pop("anchor")
    rows = []
    for name, ours in stats.items():
        target = name == "gate() allow policy"
        rows.append(
            Row(
                name,
                ours,
                anchor,
                ANCHOR,
                f"median <= {TARGET_NS / 1000:.0f} us" if target else "",
                limit=TARGET_NS if target else None,
                absolute_ns=target,
            )
        )
    return rows


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
    env = environment()
    print(
        f"klockwork {env['klockwork']} ({env['commit'] or 'no git'}) · {env['python']} · "
        f"{env['cpus']} CPUs ({env['cpu']}) · {'quick' if opts.quick else 'full'} run · "
        "memory engine"
    )
    started = time.monotonic()
    rows = run(plan)
    print_table(rows)
    print(f"({time.monotonic() - started:.1f} s)")
    if opts.profile:
        profile()
    return 0 if all(r.verdict != "MISS" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
