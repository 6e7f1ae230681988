"""How a gate's cost grows with the number of policies for *other* actions.

Measures ``kw.gates.can_i("agent", "act.run")`` with 1, 100 and 10 000
policies (half exact actions, half globs, none matching but the last) and
prints each as a ratio to the one-policy gate measured in the same run.
A gate that looks policies up by action stays flat.

    .venv/bin/python benchmarks/bench_policy_scale.py
"""

from __future__ import annotations

import statistics
import time

from klockwork import Klockwork, Policy

CALLS = 2_000
ROUNDS = 5


def gate_us(policies: int) -> float:
    """Median µs per ``can_i`` with ``policies`` policies (one of them matching)."""
    kw = Klockwork(audit_leases=False)
    for i in range(policies - 1):
        action = f"other{i}.*" if i % 2 else f"other.{i}"
        kw.policies.add(Policy(name=f"o{i}", action=action, effect="deny"))
    kw.policies.add(Policy(name="mine", action="act.*", effect="allow"))
    rounds = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(CALLS):
            kw.gates.can_i("agent", "act.run", {"i": 1})
        rounds.append((time.perf_counter() - started) / CALLS * 1e6)
    kw.close()
    return statistics.median(rounds)


def main() -> None:
    gate_us(1)  # warm up
    base = gate_us(1)
    for n in (1, 100, 10_000):
        took = gate_us(n)
        ratio = took / base
        print(f"can_i with {n:>6} policies: {took:8.2f} µs  {ratio:6.2f}x the one-policy gate")


if __name__ == "__main__":
    main()
