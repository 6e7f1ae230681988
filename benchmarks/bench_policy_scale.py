"""How a gate's cost grows with the number of policies for *other* actions.

Measures ``kw.gates.can_i("agent", "act.run", {"i": 1})`` on memory engines
holding 1, 100 and 10 000 policies (half exact actions, half globs, none
matching but the last, ``act.*``) and prints each as a ratio to the
one-policy gate measured in the same run: every engine's ``can_i`` is timed
in the same interleaved batches (``bench_leases.compare``: a function call
per operation, batches of equal wall time, the order rotating from one round
to the next, the garbage collector off during a batch). A gate that looks
policies up by action stays flat.

Target (PASS/MISS): gate cost with 10 000 policies for other actions / with
1: ≤ 1.3x. The 100-policy row is informational. The exit status is 0 whether
the target is met or not: this is a measurement, not a test.

    .venv/bin/python benchmarks/bench_policy_scale.py            # full run (~3 s)
    .venv/bin/python benchmarks/bench_policy_scale.py --quick    # smoke run
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
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

from klockwork import Klockwork, Policy  # noqa: E402

SIZES = (1, 100, 10_000)
TARGET = 1.3  # 10 000 policies / 1


FULL, QUICK = BATCH_FULL, BATCH_QUICK


def engine(policies: int, tmp: Path) -> Klockwork:
    """A memory engine with ``policies`` policies, only the last (``act.*``) matching.

    The other policies come in one ``kw.policies.load`` of a JSON file (one
    merge: adding 10 000 policies one by one rebuilds the index each time).
    """
    kw = Klockwork(audit_leases=False)
    others = [
        {"name": f"o{i}", "action": f"other{i}.*" if i % 2 else f"other.{i}", "effect": "deny"}
        for i in range(policies - 1)
    ]
    if others:
        path = tmp / f"policies-{policies}.json"
        path.write_text(json.dumps({"policies": others}))
        kw.policies.load(path)
    kw.policies.add(Policy(name="mine", action="act.*", effect="allow"))
    if len(kw.policies.list()) != policies:  # pragma: no cover
        raise RuntimeError(f"expected {policies} policies, found {len(kw.policies.list())}")
    return kw


def run(plan: BatchPlan) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="klockwork-bench-") as tmp:
        engines = {n: engine(n, Path(tmp)) for n in SIZES}
    for n, kw in engines.items():
        result = kw.gates.can_i("agent", "act.run", {"i": 1})
        if result.status != "executed" or result.policy_name != "mine":  # pragma: no cover
            raise RuntimeError(f"{n} policies: unexpected decision {result}")
    gc.collect()
    gc.freeze()  # the policies live for the whole run: keep them out of collections
    try:
        fns: dict[str, Callable[[], object]] = {}
        for n, kw in engines.items():
            can_i = kw.gates.can_i
            fns[str(n)] = lambda can_i=can_i: can_i("agent", "act.run", {"i": 1})
        stats = compare(fns, plan.batches, plan.batch_ms)
    finally:
        gc.unfreeze()
        for kw in engines.values():
            kw.close()
    base = stats[str(SIZES[0])]
    rows = []
    for n in SIZES[1:]:
        big = n == max(SIZES)
        rows.append(
            Row(
                f"gate cost with {n:,} policies for other actions / with 1",
                stats[str(n)],
                base,
                "the same can_i, an engine with the matching policy only",
                f"≤ {TARGET}x" if big else "",
                TARGET if big else None,
                note="kw.gates.can_i('agent', 'act.run', {'i': 1}); half the other policies "
                "exact actions, half globs",
                section="target" if big else "info",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    opts = parse_quick(__doc__, argv)
    plan = QUICK if opts.quick else FULL
    print_header(opts.quick, "memory engine · gate cost vs number of policies")
    started = time.monotonic()
    rows = run(plan)
    print_table(rows)
    print(f"({time.monotonic() - started:.1f} s)")
    return 0  # a measurement, not a test: a MISS does not fail the run


if __name__ == "__main__":
    sys.exit(main())
