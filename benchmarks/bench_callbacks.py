"""Audit callback benchmark: what ``AuditCallbackHandler`` adds to a LangGraph run.

The run: a two-node LangGraph graph (``START → first → second → END``) whose
nodes each call a ``@tool``, invoked with the identity in its metadata
(``agent_config``). With the audit handler each run records 10 entries:
``chain.start``/``chain.end`` for the graph and each node, and
``tool.start``/``tool.end`` for each tool call.

Measured in one process, in interleaved batches (the order rotates from one
round to the next, the garbage collector is off during a batch), as
``bench_leases.py`` does. The audited side ends each batch with
``kw.audit.flush()`` inside the timed region, so the background writer's
hashing of that batch's entries is charged to it, not to whichever side
runs next. The ratio is audited / bare; the target (PASS/MISS) is ≤ 1.10x.
The exit status is 0 whether the target is met or not (a measurement, not a
test); 1 only if the audit chain fails to verify after the run.

Informational rows, to show where the time goes: a handler whose methods do
nothing (LangChain's own cost of calling any handler), a handler that only
records one fixed minimal entry per event (that plus the audit log's own
cost: ``record`` on the hot path and the writer's hashing — the floor under
any audit handler), the audited run with ``record_chains=False`` (tools
only), and the async graph (async nodes and tool) with each handler.

    .venv/bin/python benchmarks/bench_callbacks.py            # full run (~1 min)
    .venv/bin/python benchmarks/bench_callbacks.py --quick    # smoke run (~15 s)
"""

import argparse
import asyncio
import gc
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

# Timing, results and the table are bench_leases's: one definition for every benchmark.
from bench_leases import (  # noqa: E402
    Row,
    Stats,
    _calibrate,
    environment,
    log,
    no_gc,
    perf_ns,
    print_table,
)
from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langgraph.graph import END, START, StateGraph  # noqa: E402

from klockwork import Klockwork  # noqa: E402
from klockwork.integrations.langchain import (  # noqa: E402
    AsyncAuditCallbackHandler,
    AuditCallbackHandler,
    agent_config,
)

ENTRIES_PER_RUN = 10
TARGET = 1.10


@dataclass(frozen=True)
class Plan:
    batches: int  # interleaved batches per side
    batch_ms: float  # wall time of one batch


FULL = Plan(batches=31, batch_ms=150.0)
QUICK = Plan(batches=9, batch_ms=60.0)


# --------------------------------------------------------------------------- the run
class State(TypedDict):
    total: int
    steps: list[str]


@tool
def add(total: int, amount: int) -> int:
    """Add ``amount`` to ``total``."""
    return total + amount


def first(state: State) -> dict[str, Any]:
    return {"total": add.invoke({"total": state["total"], "amount": 1}), "steps": ["first"]}


def second(state: State) -> dict[str, Any]:
    total = add.invoke({"total": state["total"], "amount": 2})
    return {"total": total, "steps": [*state["steps"], "second"]}


@tool
async def aadd(total: int, amount: int) -> int:
    """Add ``amount`` to ``total`` (async)."""
    return total + amount


async def afirst(state: State) -> dict[str, Any]:
    total = await aadd.ainvoke({"total": state["total"], "amount": 1})
    return {"total": total, "steps": ["first"]}


async def asecond(state: State) -> dict[str, Any]:
    total = await aadd.ainvoke({"total": state["total"], "amount": 2})
    return {"total": total, "steps": [*state["steps"], "second"]}


def build_graph(asynchronous: bool = False) -> Any:
    builder = StateGraph(State)
    builder.add_node("first", afirst if asynchronous else first)
    builder.add_node("second", asecond if asynchronous else second)
    builder.add_edge(START, "first")
    builder.add_edge("first", "second")
    builder.add_edge("second", END)
    return builder.compile()


class NoopHandler(BaseCallbackHandler):
    """Receives the same events and does nothing: LangChain's own cost of a handler."""

    run_inline = True

    def on_chain_start(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_chain_end(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_tool_start(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_tool_end(self, *args: Any, **kwargs: Any) -> None:
        pass


class RecordOnlyHandler(BaseCallbackHandler):
    """Records one fixed, minimal entry per event: the audit log's own floor."""

    run_inline = True

    def __init__(self, kw: Klockwork) -> None:
        self.record = kw.audit.record
        self.data = {"run_id": "01a1fede-ef0f-7467-8010-3a51aace268f"}

    def on_chain_start(self, *args: Any, **kwargs: Any) -> None:
        self.record("chain.start", "bench", "t-bench", self.data)

    def on_chain_end(self, *args: Any, **kwargs: Any) -> None:
        self.record("chain.end", "bench", "t-bench", self.data)

    def on_tool_start(self, *args: Any, **kwargs: Any) -> None:
        self.record("tool.start", "bench", "t-bench", self.data)

    def on_tool_end(self, *args: Any, **kwargs: Any) -> None:
        self.record("tool.end", "bench", "t-bench", self.data)


# --------------------------------------------------------------------------- timing
Side = tuple[Callable[[], object], Callable[[], object] | None]  # (operation, end of batch)


def interleave(sides: dict[str, Side], plan: Plan) -> dict[str, Stats]:
    """Median/p90 of per-batch ns/op; each batch's ``end`` hook is inside its timing."""
    names = list(sides)
    sizes = {name: _calibrate(sides[name][0], plan.batch_ms) for name in names}
    means: dict[str, list[float]] = {name: [] for name in names}
    for i in range(plan.batches):
        gc.collect(1)
        for name in names[i % len(names) :] + names[: i % len(names)]:
            fn, end = sides[name]
            n = sizes[name]
            if end is not None:
                end()  # start from a drained writer
            with no_gc():
                t0 = perf_ns()
                for _ in range(n):
                    fn()
                if end is not None:
                    end()
                means[name].append((perf_ns() - t0) / n)
    return {name: Stats.of(values) for name, values in means.items()}


async def ainterleave(
    sides: dict[str, tuple[Callable[[], Awaitable[object]], Callable[[], object] | None]],
    plan: Plan,
) -> dict[str, Stats]:
    """:func:`interleave` for coroutine functions."""
    names = list(sides)
    sizes: dict[str, int] = {}
    for name in names:
        fn = sides[name][0]
        n, t0 = 0, perf_ns()
        while perf_ns() - t0 < max(20_000_000, plan.batch_ms * 3_000_000) or n < 20:
            await fn()
            n += 1
        sizes[name] = max(5, int(plan.batch_ms * 1_000_000 * n / (perf_ns() - t0)))
    means: dict[str, list[float]] = {name: [] for name in names}
    for i in range(plan.batches):
        gc.collect(1)
        for name in names[i % len(names) :] + names[: i % len(names)]:
            fn, end = sides[name]
            if end is not None:
                end()
            with no_gc():
                t0 = perf_ns()
                for _ in range(sizes[name]):
                    await fn()
                if end is not None:
                    end()
                means[name].append((perf_ns() - t0) / sizes[name])
    return {name: Stats.of(values) for name, values in means.items()}


# --------------------------------------------------------------------------- benchmarks
def check(kw: Klockwork, graph: Any, config: dict[str, Any]) -> None:
    """One audited run records the expected entries, and the chain verifies."""
    before = kw.audit.checkpoint().seq
    if graph.invoke({"total": 0, "steps": []}, config)["total"] != 3:  # pragma: no cover
        raise RuntimeError("the graph computed something unexpected")
    kw.audit.flush()
    recorded = kw.audit.checkpoint().seq - before
    if recorded != ENTRIES_PER_RUN:  # pragma: no cover
        raise RuntimeError(f"expected {ENTRIES_PER_RUN} entries per run, got {recorded}")


def bench_sync(plan: Plan) -> tuple[list[Row], Klockwork]:
    kw = Klockwork()
    graph = build_graph()
    state: State = {"total": 0, "steps": []}
    bare = dict(agent_config("bench", thread_id="t-bench"))
    audited = {**bare, "callbacks": [AuditCallbackHandler(kw)]}
    tools_only = {**bare, "callbacks": [AuditCallbackHandler(kw, record_chains=False)]}
    noop = {**bare, "callbacks": [NoopHandler()]}
    floor = {**bare, "callbacks": [RecordOnlyHandler(kw)]}
    check(kw, graph, audited)
    invoke, flush = graph.invoke, kw.audit.flush
    res = interleave(
        {
            "audited": (lambda: invoke(state, audited), flush),
            "bare": (lambda: invoke(state, bare), None),
            "noop": (lambda: invoke(state, noop), None),
            "floor": (lambda: invoke(state, floor), flush),
            "tools_only": (lambda: invoke(state, tools_only), flush),
        },
        plan,
    )
    name = "2-node graph.invoke, AuditCallbackHandler vs no callbacks"
    return [
        Row(
            name,
            res["audited"],
            res["bare"],
            "the same invoke without callbacks",
            f"≤ {TARGET:.2f}x",
            TARGET,
            note=f"{ENTRIES_PER_RUN} entries per run, flushed inside each timed batch",
        ),
        Row(
            "  no-op handler vs no callbacks",
            res["noop"],
            res["bare"],
            section="info",
            note="LangChain's own cost of calling a handler (the floor under ours)",
        ),
        Row(
            "  record-only handler vs no callbacks",
            res["floor"],
            res["bare"],
            section="info",
            note="one fixed minimal kw.audit.record per event: the audit log's own floor",
        ),
        Row(
            "  audited, record_chains=False vs no callbacks",
            res["tools_only"],
            res["bare"],
            section="info",
            note="4 entries per run (tools only)",
        ),
    ], kw


def bench_async(plan: Plan, kw: Klockwork) -> list[Row]:
    """The same graph with async nodes and an async tool, run with ``ainvoke``."""
    graph = build_graph(asynchronous=True)
    state: State = {"total": 0, "steps": []}
    bare = dict(agent_config("bench", thread_id="t-bench"))
    audited = {**bare, "callbacks": [AsyncAuditCallbackHandler(kw)]}
    inline = {**bare, "callbacks": [AuditCallbackHandler(kw)]}

    async def run() -> dict[str, Stats]:
        ainvoke, flush = graph.ainvoke, kw.audit.flush
        return await ainterleave(
            {
                "audited": (lambda: ainvoke(state, audited), flush),
                "inline": (lambda: ainvoke(state, inline), flush),
                "bare": (lambda: ainvoke(state, bare), None),
            },
            plan,
        )

    res = asyncio.run(run())
    return [
        Row(
            "  async graph.ainvoke, AsyncAuditCallbackHandler vs none",
            res["audited"],
            res["bare"],
            section="info",
        ),
        Row(
            "  async graph.ainvoke, AuditCallbackHandler vs none",
            res["inline"],
            res["bare"],
            section="info",
            note="the sync handler is run_inline: called on the loop, no executor hop",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run")
    opts = parser.parse_args(argv)
    plan = QUICK if opts.quick else FULL
    env = environment()
    print(
        f"klockwork {env['klockwork']} ({env['commit'] or 'no git'}) · {env['python']} · "
        f"{env['cpus']} CPUs ({env['cpu']}) · langchain-core {env['langchain-core']} · "
        f"langgraph {env['langgraph']} · {'quick' if opts.quick else 'full'} run"
    )
    started = time.monotonic()
    log("[sync] ...")
    rows, kw = bench_sync(plan)
    log("[async] ...")
    rows += bench_async(plan, kw)
    result = kw.audit.verify()
    kw.close()
    print()
    print_table(rows)
    print(
        f"\naudit chain after the run: {result.checked} entries, "
        f"{'valid' if result.valid else 'INVALID: ' + result.reason}"
    )
    print(f"total {time.monotonic() - started:.1f} s · 1-min load average {env['load_average_1m']}")
    # A measurement, not a test: a MISS does not fail the run (a broken chain does).
    return 0 if result.valid else 1


if __name__ == "__main__":
    sys.exit(main())
