"""create_agent middleware benchmarks: what ``KlockworkMiddleware`` and ``CoordinatedToolNode`` add.

Rows (PASS/MISS against the issue's targets; ratios are taken in one run,
batches interleaved with the anchor's so that drift hits both alike):

* a ``create_agent`` run (a fake chat model asks for one tool call, then
  answers: two model calls, one tool call) with ``KlockworkMiddleware``
  (an allow-all gate, one MUTATES lease, audit on) / the same agent without
  it: ≤ 1.15x;
* a hand-built two-node graph (agent → tools → agent) whose tools node is a
  ``CoordinatedToolNode`` (same gate, lease and audit) / the same graph with
  LangGraph's ``ToolNode``: ≤ 1.15x;
* where the time goes (info): ``wrap_tool_call`` around a no-op handler, per
  call, and its parts: the gate (``kw.gates.gate`` + ``kw.gates.report``),
  the lease (``kw.leases.hold``: acquire + release), the rest (identity,
  metadata, resource keys), each measured on its own in the same run.

Each batch of an audited side ends with ``kw.audit.flush()``, timed: the
audit writer's work is charged to the side that made it. The exit status is
0 whether targets are met or not: this is a measurement, not a test.

    .venv/bin/python benchmarks/bench_middleware.py            # full run (~1 min)
    .venv/bin/python benchmarks/bench_middleware.py --quick    # smoke run (< 20 s)
    .venv/bin/python benchmarks/bench_middleware.py --profile  # cProfile of wrapped calls
"""

import cProfile
import itertools
import pstats
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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
    parse_quick,
    print_header,
    print_table,
)
from langchain.agents import create_agent  # noqa: E402
from langchain.agents.middleware.types import AgentMiddleware  # noqa: E402
from langchain_core.language_models import BaseChatModel  # noqa: E402
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage  # noqa: E402
from langchain_core.outputs import ChatGeneration, ChatResult  # noqa: E402
from langchain_core.tools import BaseTool, tool  # noqa: E402
from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402
from langgraph.graph import END, START, MessagesState, StateGraph  # noqa: E402
from langgraph.prebuilt import ToolNode, tools_condition  # noqa: E402
from langgraph.prebuilt.tool_node import ToolCallRequest  # noqa: E402

from klockwork import Klockwork, Policy  # noqa: E402
from klockwork.integrations.langchain import (  # noqa: E402
    KlockworkMiddleware,
    agent_config,
    resolve_identity,
)

RATIO = 1.15
PROFILE_HELP = "instead of the table: cProfile of wrapped tool calls, klockwork's functions"
ACTION = "fs.write"
CALL = {"name": "write_file", "args": {"path": "/bench/r", "text": "hi"}, "id": "call-1"}
START_INPUT: Any = {"messages": [("user", "write it")]}
CONFIG: Any = agent_config("bench", "s1")
OPTIONS: Any = {"resources": {"write_file": "FILE:{path}"}, "gates": {"write_file": ACTION}}


class OneCallModel(BaseChatModel):
    """Asks for one write_file call, then (a tool result in) answers: stateless, reusable."""

    _llm_type = "one-call"

    def bind_tools(self, tools: Any, **kwargs: Any) -> "OneCallModel":
        return self

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        done = isinstance(messages[-1], ToolMessage)
        reply = AIMessage("Done.") if done else AIMessage("", tool_calls=[CALL])
        return ChatResult(generations=[ChatGeneration(message=reply)])


@tool
def write_file(path: str, text: str) -> str:
    """Pretend to write a file."""
    return path


def engine() -> Klockwork:
    kw = Klockwork()  # in memory, audit on
    kw.policies.add(Policy(name="allow-writes", action=ACTION, effect="allow"))
    return kw


def checked(run: Callable[[], Any], kw: Klockwork | None) -> Callable[[], Any]:
    """``run`` once, checking it wrote and (with ``kw``) leased, gated and released."""
    out = run()
    (message,) = [m for m in out["messages"] if isinstance(m, ToolMessage)]
    if message.status != "success" or out["messages"][-1].content != "Done.":
        raise RuntimeError(f"the run did not go as scripted: {out['messages']}")
    if kw is not None:
        kw.audit.flush()
        kinds = [e.kind for e in kw.audit.query(limit=50).entries]
        for kind in ("action.executed", "lease.granted", "lease.released"):
            if kind not in kinds:
                raise RuntimeError(f"no {kind} in the audit trail: {kinds}")
        if kw.leases.list():
            raise RuntimeError("a lease was left behind")
    return run


class AfterModelNoop(AgentMiddleware):
    """A middleware whose ``after_model`` hook does nothing.

    What a turn-level approval hook would cost every run: KlockworkMiddleware
    has none (it asks a turn's approvals from the turn's tool calls).
    """

    def after_model(self, state: Any, runtime: Any) -> None:
        return None


def bench_agent(plan: BatchPlan) -> list[Row]:
    kw = engine()
    model = OneCallModel()
    ours = create_agent(model, [write_file], middleware=[KlockworkMiddleware(kw, **OPTIONS)])
    bare = create_agent(model, [write_file])
    hook = create_agent(model, [write_file], middleware=[AfterModelNoop()])
    # Checkpointed: the gate is judged as one call of its model turn (turn_approvals).
    middleware = [KlockworkMiddleware(kw, **OPTIONS)]
    ours_saved = create_agent(
        model, [write_file], middleware=middleware, checkpointer=InMemorySaver()
    )
    bare_saved = create_agent(model, [write_file], checkpointer=InMemorySaver())
    threads = itertools.count()

    def saved(agent: Any) -> Callable[[], Any]:
        # A new thread per run, so the checkpoint history does not grow.
        def run() -> Any:
            conf = {
                **CONFIG,
                "configurable": {**CONFIG["configurable"], "thread_id": f"t{next(threads)}"},
            }
            return agent.invoke(START_INPUT, conf)

        return run

    try:
        fns = {
            "ours": checked(lambda: ours.invoke(START_INPUT, CONFIG), kw),
            "bare": checked(lambda: bare.invoke(START_INPUT, CONFIG), None),
            "hook": checked(lambda: hook.invoke(START_INPUT, CONFIG), None),
            "ours_saved": checked(saved(ours_saved), kw),
            "bare_saved": checked(saved(bare_saved), None),
        }
        flush = kw.audit.flush
        stats = compare(fns, plan.batches, plan.batch_ms, {"ours": flush, "ours_saved": flush})
    finally:
        kw.close()
    return [
        Row(
            "create_agent run with KlockworkMiddleware vs without",
            stats["ours"],
            stats["bare"],
            "the same agent without middleware (2 model calls, 1 tool call)",
            f"≤ {RATIO:.2f}x",
            RATIO,
            note="allow-all gate, one MUTATES lease, audit on; batches end with kw.audit.flush()",
        ),
        Row(
            "  a no-op after_model middleware vs none (info)",
            stats["hook"],
            stats["bare"],
            "the agent without middleware",
            section="info",
            note="LangGraph's cost of the graph node an after_model hook adds (run per model call)",
        ),
        Row(
            "  the same, both with a checkpointer (info)",
            stats["ours_saved"],
            stats["bare_saved"],
            "the agent without middleware, with InMemorySaver (a new thread per run)",
            section="info",
            note="the gate judged as one call of its model turn (turn_approvals)",
        ),
    ]


def two_node_graph(tools_node: ToolNode) -> Any:
    model = OneCallModel()

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", tools_node)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: END})
    builder.add_edge("tools", "agent")
    return builder.compile()


def bench_tool_node(plan: BatchPlan) -> Row:
    name = "agent→tools graph: CoordinatedToolNode vs ToolNode"
    try:
        from klockwork.integrations.langgraph import CoordinatedToolNode
    except ImportError as exc:
        return Row(name, None, target=f"≤ {RATIO:.2f}x", note=f"skipped: {exc}")
    kw = engine()
    ours = two_node_graph(CoordinatedToolNode([write_file], kw, **OPTIONS))
    bare = two_node_graph(ToolNode([write_file]))
    try:
        fns = {
            "ours": checked(lambda: ours.invoke(START_INPUT, CONFIG), kw),
            "bare": checked(lambda: bare.invoke(START_INPUT, CONFIG), None),
        }
        stats = compare(fns, plan.batches, plan.batch_ms, {"ours": kw.audit.flush})
    finally:
        kw.close()
    return Row(
        name,
        stats["ours"],
        stats["bare"],
        "the same graph with LangGraph's ToolNode",
        f"≤ {RATIO:.2f}x",
        RATIO,
        note="same gate, lease and audit as the middleware row",
    )


def wrapped_call(kw: Klockwork) -> Callable[[], object]:
    """One tool call through ``KlockworkMiddleware.wrap_tool_call``, around a no-op handler."""
    mw = KlockworkMiddleware(kw, **OPTIONS)
    request = ToolCallRequest(
        tool_call=CALL,  # type: ignore[arg-type]
        tool=write_file if isinstance(write_file, BaseTool) else None,
        state={},
        runtime=SimpleNamespace(config=CONFIG),  # type: ignore[arg-type]
    )
    reply = ToolMessage("/bench/r", tool_call_id="call-1", name="write_file")

    def wrapped() -> object:
        return mw.wrap_tool_call(request, lambda r: reply)

    if wrapped() is not reply:
        raise RuntimeError("the wrapped call did not return the handler's message")
    return wrapped


def bench_profile(plan: BatchPlan) -> list[Row]:
    """Where the time goes: one wrapped call, and its parts each timed on its own."""
    kw = engine()
    gates, leases = kw.gates, kw.leases
    metadata = {"tool": "write_file", "args": CALL["args"]}
    intents = [("FILE:/bench/r", "MUTATES")]
    calls = itertools.count()

    def gate() -> None:
        result = gates.gate("bench", ACTION, metadata, None, None, session_id="s1")
        gates.report(result.audit_event_id or "", "success")

    def lease() -> None:  # each tool call leases in a sub-session of its own, as wrap does
        with leases.hold("bench", f"s1/call-{next(calls)}", intents, 30_000, timeout_s=30.0):
            pass

    try:
        fns = {
            "wrap": wrapped_call(kw),
            "gate": gate,
            "lease": lease,
            "identity": lambda: resolve_identity(CONFIG),
        }
        flush = kw.audit.flush
        stats = compare(fns, plan.batches, plan.batch_ms, dict.fromkeys(fns, flush))
    finally:
        kw.close()
    wrap = stats["wrap"]
    rest = wrap.median_ns - sum(stats[k].median_ns for k in ("gate", "lease", "identity"))
    rows = [
        Row("per call: wrap_tool_call around a no-op handler (info)", wrap, section="info"),
        Row("  the gate: kw.gates.gate + kw.gates.report (info)", stats["gate"], section="info"),
        Row("  the lease: kw.leases.hold (acquire+release) (info)", stats["lease"], section="info"),
        Row("  the identity: resolve_identity(config) (info)", stats["identity"], section="info"),
        Row(
            "  the rest: metadata, resource keys, checks (info)",
            Stats(rest, rest, wrap.samples),
            section="info",
            note="wrap minus the three medians above (p90 not measured)",
        ),
    ]
    for row in rows[1:]:
        assert row.ours is not None
        row.note = (row.note + "; " if row.note else "") + (
            f"{100 * row.ours.median_ns / wrap.median_ns:.0f}% of the wrapped call"
        )
    return rows


def profile(calls: int = 5000) -> None:
    """cProfile of ``calls`` wrapped tool calls: klockwork's functions by cumulative time."""
    kw = engine()
    wrapped = wrapped_call(kw)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        wrapped()
    kw.audit.flush()
    profiler.disable()
    kw.close()
    print(f"cProfile of {calls} wrap_tool_call calls (no-op handler), by cumulative time:")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(r"klockwork/|tools/base", 25)


def main(argv: list[str] | None = None) -> None:
    args = parse_quick(__doc__ or "", argv, profile=PROFILE_HELP)
    if args.profile:
        profile()
        return
    plan = BATCH_QUICK if args.quick else BATCH_FULL
    print_header(args.quick, "create_agent middleware and CoordinatedToolNode vs bare")
    rows = [*bench_agent(plan), bench_tool_node(plan), *bench_profile(plan)]
    print_table(rows)


if __name__ == "__main__":
    main()
