"""Gate benchmarks: what one policy check costs next to doing nothing at all.

The anchor is a bare Python function call that does nothing, timed in the
same process the same way (a function call per operation, batches
interleaved so that drift hits every side alike); the table prints median
and p90 per operation and the ratio. Every gate that runs records its audit
entry as it would in production; each batch of an audited call ends with
``kw.audit.flush()`` inside the timing, so sealing that batch's entries is
charged to it (``can_i`` records nothing and is not charged a flush).

Targets (PASS/MISS):

* ``gate execute (allow, audit on) vs can_i``: ``kw.gates.execute(agent,
  action, metadata)`` without an ``event_id`` (a decision plus its audit
  entry) / ``kw.gates.can_i`` (the same decision, nothing recorded), both on
  the same memory engine and allow policy, in the same interleaved batches:
  ≤ 2.0x;
* an allow-policy ``kw.gates.gate()`` on the memory engine within 10 µs
  (median; absolute).

The exit status is 0 whether targets are met or not: this is a measurement,
not a test.

    .venv/bin/python benchmarks/bench_gates.py            # full run (< 1 min)
    .venv/bin/python benchmarks/bench_gates.py --quick    # smoke run (< 10 s)
    .venv/bin/python benchmarks/bench_gates.py --profile  # also cProfile gate()
"""

import cProfile
import io
import itertools
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

# Timing, results and the table are bench_leases's: one definition for every benchmark.
from bench_leases import (  # noqa: E402
    BATCH_FULL,
    BATCH_QUICK,
    BatchPlan,
    Row,
    compare,
    parse_quick,
    print_header,
    print_table,
)

from klockwork import Klockwork, MemoryStore, Policy  # noqa: E402

TARGET_NS = 10_000  # allow-policy gate() median
EXECUTE_VS_CAN_I = 2.0  # execute (allow, audited, no event_id) / can_i
ANCHOR = "a bare Python function call doing nothing"


FULL, QUICK = BATCH_FULL, BATCH_QUICK


def nothing() -> None:
    """The anchor: a bare Python function call that does nothing."""


def engine() -> Klockwork:
    kw = Klockwork(MemoryStore())
    kw.policies.add(Policy(name="reads", action="repo.read", effect="allow"))
    kw.policies.add(Policy(name="repo", action="repo.*", effect="require_approval"))
    kw.policies.add(Policy(name="no-infra", action="infra.*", effect="deny"))
    return kw


def run(plan: BatchPlan) -> list[Row]:
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
        "execute() allow, no event_id": lambda: execute("agent-1", "repo.read", meta),
        "can_i() allow policy": lambda: can_i("agent-1", "repo.read", meta),
        "gate() allow, no audit (diagnostic)": lambda: quiet.gates.gate(
            "agent-1", "repo.read", meta
        ),
    }
    try:
        # The audited engine's flush ends each of its batches, inside the timing.
        # can_i records nothing: no flush is charged to it.
        settle = {
            name: kw.audit.flush
            for name in fns
            if name != "anchor" and "no audit" not in name and not name.startswith("can_i")
        }
        stats = compare(fns, plan.batches, plan.batch_ms, settle)
    finally:
        kw.close()
        quiet.close()
    anchor = stats.pop("anchor")
    rows = [
        Row(
            "gate execute (allow, audit on) vs can_i",
            stats["execute() allow, no event_id"],
            stats["can_i() allow policy"],
            "kw.gates.can_i(), same engine, agent, action and metadata (same batches)",
            f"≤ {EXECUTE_VS_CAN_I:.1f}x",
            EXECUTE_VS_CAN_I,
            note="execute(agent, action, metadata) without event_id: the decision plus its "
            "audit entry; each batch ends with kw.audit.flush(), timed",
        )
    ]
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
    opts = parse_quick(__doc__, argv, profile="also cProfile gate()")
    plan = QUICK if opts.quick else FULL
    print_header(opts.quick, "memory engine")
    started = time.monotonic()
    rows = run(plan)
    print_table(rows)
    print(f"({time.monotonic() - started:.1f} s)")
    if opts.profile:
        profile()
    return 0  # a measurement, not a test: MISS rows do not fail the run


if __name__ == "__main__":
    sys.exit(main())
