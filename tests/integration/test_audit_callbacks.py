"""AuditCallbackHandler / AsyncAuditCallbackHandler / audit_context on real LangChain runs."""

from __future__ import annotations

import asyncio
import json
import logging
import operator
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import interrupt

from klockwork import InvalidRequestError, Klockwork, StoreUnavailableError
from klockwork.core.audit.chain import AuditEntry
from klockwork.core.audit.log import verify_file
from klockwork.integrations.langchain import (
    REDACTED,
    AsyncAuditCallbackHandler,
    AuditCallbackHandler,
    agent_config,
    audit_context,
)

CALLBACK_KINDS = {"tool.start", "tool.end", "tool.error", "chain.start", "chain.end", "llm.end"}


# --------------------------------------------------------------------------- helpers
def entries(kw: Klockwork) -> list[AuditEntry]:
    """Every callback entry in the chain, oldest first."""
    out: list[AuditEntry] = []
    cursor = None
    while True:
        page = kw.audit.query(cursor=cursor, limit=1000)
        out.extend(e for e in page.entries if e.kind in CALLBACK_KINDS)
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


def kinds(found: list[AuditEntry]) -> list[str]:
    return [e.kind for e in found]


def run(handler: Any, *configs: dict[str, Any]) -> dict[str, Any]:
    """A run config with ``handler`` as its callback (merged over ``configs``)."""
    merged: dict[str, Any] = {}
    for config in configs:
        merged.update(config)
    merged["callbacks"] = [handler]
    return merged


@tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@tool
def fail(reason: str) -> str:
    """Always fails."""
    raise ValueError(f"cannot: {reason}")


@tool
def login(user: str, password: str) -> str:
    """Log in."""
    return f"welcome {user}"


class ScriptedModel(GenericFakeChatModel):
    """A fake chat model that replays its script; binding tools changes nothing."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedModel:
        return self


def scripted(*messages: AIMessage | str) -> ScriptedModel:
    return ScriptedModel(messages=iter(messages))


class Total(TypedDict):
    total: int


def two_node_graph() -> Any:
    """START → first → second → END; each node calls the ``add`` tool."""

    def first(state: Total) -> dict[str, int]:
        return {"total": add.invoke({"a": state["total"], "b": 1})}

    def second(state: Total) -> dict[str, int]:
        return {"total": add.invoke({"a": state["total"], "b": 2})}

    builder = StateGraph(Total)
    builder.add_node("first", first)
    builder.add_node("second", second)
    builder.add_edge(START, "first")
    builder.add_edge("first", "second")
    builder.add_edge("second", END)
    return builder.compile()


@pytest.fixture
def default_engine(kw: Klockwork) -> Iterator[Klockwork]:
    Klockwork.set_default(kw)
    yield kw
    Klockwork.set_default(None)


# --------------------------------------------------------------------------- tools
def test_tool_run_records_start_and_end_with_identity(kw: Klockwork) -> None:
    handler = AuditCallbackHandler(kw)
    assert add.invoke({"a": 2, "b": 3}, config=run(handler, agent_config("writer", "s1"))) == 5

    start, end = entries(kw)
    assert (start.kind, end.kind) == ("tool.start", "tool.end")
    for entry in (start, end):
        assert (entry.agent_id, entry.session_id) == ("writer", "s1")
        assert entry.data["tool"] == "add"
        assert entry.data["run_id"] == start.data["run_id"]
    assert start.data["inputs"] == {"a": 2, "b": 3}
    assert end.data["outputs"] == 5
    assert end.seq == start.seq + 1
    assert kw.audit.verify().valid
    assert handler.failures == 0


def test_tool_error_is_recorded_and_the_error_still_raised(kw: Klockwork) -> None:
    handler = AuditCallbackHandler(kw)
    with pytest.raises(ValueError, match="cannot: disk full"):
        fail.invoke({"reason": "disk full"}, config=run(handler, agent_config("writer")))

    start, error = entries(kw)
    assert (start.kind, error.kind) == ("tool.start", "tool.error")
    assert error.data["error"] == {"type": "ValueError", "message": "cannot: disk full"}
    assert error.data["tool"] == "fail"
    assert error.agent_id == "writer"


def test_anonymous_run_is_recorded_as_the_process_agent(kw: Klockwork) -> None:
    import os

    add.invoke({"a": 1, "b": 1}, config=run(AuditCallbackHandler(kw)))
    start, _ = entries(kw)
    assert start.agent_id == f"process-{os.getpid()}"
    assert start.session_id is None


# --------------------------------------------------------------------------- LangGraph
def test_two_node_graph_records_nodes_and_tools_with_thread_and_node(kw: Klockwork) -> None:
    handler = AuditCallbackHandler(kw)
    config = run(handler, agent_config("planner", thread_id="t-42"))
    assert two_node_graph().invoke({"total": 0}, config) == {"total": 3}

    found = entries(kw)
    assert kinds(found) == [
        "chain.start",  # the graph
        "chain.start",  # first
        "tool.start",
        "tool.end",
        "chain.end",
        "chain.start",  # second
        "tool.start",
        "tool.end",
        "chain.end",
        "chain.end",  # the graph
    ]
    graph_start, first_start, tool_start, tool_end, first_end = found[:5]
    assert {(e.agent_id, e.session_id) for e in found} == {("planner", "t-42")}
    assert {e.data["thread_id"] for e in found} == {"t-42"}
    assert first_start.data["name"] == "first"
    assert first_start.data["langgraph_node"] == "first"
    assert first_start.data["parent_run_id"] == graph_start.data["run_id"]
    assert tool_start.data["langgraph_node"] == "first"
    assert tool_start.data["parent_run_id"] == first_start.data["run_id"]
    assert tool_start.data["inputs"] == {"a": 0, "b": 1}
    assert tool_end.data["outputs"] == 1
    assert first_end.data["outputs"] == {"total": 1}
    assert "error" not in first_end.data
    assert found[-1].data["run_id"] == graph_start.data["run_id"]
    assert found[-1].data["outputs"] == {"total": 3}
    assert kw.audit.verify().valid


def test_failing_node_is_chain_end_with_the_error(kw: Klockwork) -> None:
    def broken(state: Total) -> dict[str, int]:
        raise RuntimeError("node exploded")

    builder = StateGraph(Total)
    builder.add_node("broken", broken)
    builder.add_edge(START, "broken")
    with pytest.raises(RuntimeError, match="node exploded"):
        builder.compile().invoke({"total": 0}, run(AuditCallbackHandler(kw)))

    ends = [e for e in entries(kw) if e.kind == "chain.end"]
    assert [e.data["name"] for e in ends] == ["broken", "LangGraph"]
    for end in ends:
        assert end.data["error"] == {"type": "RuntimeError", "message": "node exploded"}
        assert "outputs" not in end.data
        assert "interrupted" not in end.data


def test_interrupt_is_recorded_as_interrupted_not_failed(kw: Klockwork) -> None:
    def ask(state: Total) -> dict[str, int]:
        return {"total": interrupt("how much?")}

    builder = StateGraph(Total)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    graph = builder.compile(checkpointer=InMemorySaver())
    graph.invoke({"total": 0}, run(AuditCallbackHandler(kw), {"configurable": {"thread_id": "t"}}))

    ask_end = next(e for e in entries(kw) if e.kind == "chain.end" and e.data["name"] == "ask")
    assert ask_end.data["interrupted"] is True
    assert ask_end.data["error"]["type"] == "GraphInterrupt"


def test_create_agent_records_model_answers_tool_calls_and_agent_name(kw: Klockwork) -> None:
    call = {"name": "add", "args": {"a": 2, "b": 2}, "id": "call-1"}
    usage = {"input_tokens": 12, "output_tokens": 3, "total_tokens": 15}
    model = scripted(AIMessage("", tool_calls=[call]), AIMessage("It is 4.", usage_metadata=usage))
    agent = create_agent(model, [add], name="calculator")
    result = agent.invoke({"messages": [("user", "2+2?")]}, run(AuditCallbackHandler(kw)))
    assert result["messages"][-1].content == "It is 4."

    found = entries(kw)
    assert {e.agent_id for e in found} == {"calculator"}  # from create_agent(name=...)
    llm_ends = [e for e in found if e.kind == "llm.end"]
    assert len(llm_ends) == 2
    asked, answered = llm_ends
    assert asked.data["langgraph_node"] == "model"
    assert asked.data["outputs"]["type"] == "ai"
    assert asked.data["outputs"]["tool_calls"] == [
        {"name": "add", "args": call["args"], "id": "call-1"}
    ]
    assert answered.data["outputs"]["content"] == "It is 4."
    assert answered.data["usage"] == usage
    assert "usage" not in asked.data  # the model reported none

    tool_start = next(e for e in found if e.kind == "tool.start")
    tool_end = next(e for e in found if e.kind == "tool.end")
    assert tool_start.data["tool_call_id"] == "call-1"
    assert tool_start.data["langgraph_node"] == "tools"
    # A ToolMessage is recorded as a small dict, not a LangChain object.
    assert tool_end.data["outputs"] == {
        "type": "tool",
        "content": "4",
        "name": "add",
        "tool_call_id": "call-1",
        "status": "success",
    }
    # Graph state (messages) is recorded as plain data too.
    agent_start = found[0]
    assert agent_start.kind == "chain.start"
    assert agent_start.data["name"] == "calculator"
    assert kw.audit.verify().valid


def test_agent_id_in_metadata_wins_over_the_agent_name(kw: Klockwork) -> None:
    agent = create_agent(scripted(AIMessage("hi")), [add], name="calculator")
    agent.invoke(
        {"messages": [("user", "hi")]}, run(AuditCallbackHandler(kw), agent_config("alice"))
    )
    assert {e.agent_id for e in entries(kw)} == {"alice"}


def test_record_llm_and_record_chains_can_be_turned_off(kw: Klockwork) -> None:
    call = {"name": "add", "args": {"a": 1, "b": 1}, "id": "c"}
    agent = create_agent(scripted(AIMessage("", tool_calls=[call]), AIMessage("2")), [add])
    handler = AuditCallbackHandler(kw, record_llm=False, record_chains=False)
    agent.invoke({"messages": [("user", "1+1")]}, run(handler))
    assert kinds(entries(kw)) == ["tool.start", "tool.end"]


# --------------------------------------------------------------------------- redaction, truncation
def test_redacted_keys_never_reach_the_trail(kw: Klockwork, tmp_path: Path) -> None:
    secret = "hunter2-s3cret"
    call = {"name": "login", "args": {"user": "bob", "password": secret}, "id": "c1"}
    agent = create_agent(scripted(AIMessage("", tool_calls=[call]), AIMessage("in")), [login])
    handler = AuditCallbackHandler(kw, redact=["PASSWORD", "api_key"])  # case-insensitive
    agent.invoke(
        {"messages": [("user", "log in")]},
        run(handler, {"metadata": {"agent_id": "ops"}}),
    )
    login.invoke(
        {"user": "eve", "password": secret}, config=run(handler, {"metadata": {"agent_id": "x"}})
    )

    found = entries(kw)
    tool_starts = [e for e in found if e.kind == "tool.start"]
    assert [e.data["inputs"] for e in tool_starts] == [
        {"user": "bob", "password": REDACTED},
        {"user": "eve", "password": REDACTED},
    ]
    llm_end = next(e for e in found if e.kind == "llm.end")
    assert llm_end.data["outputs"]["tool_calls"][0]["args"]["password"] == REDACTED
    path = tmp_path / "audit.jsonl"
    kw.audit.export(path)
    assert secret not in path.read_text(encoding="utf-8")
    assert verify_file(path).valid


def test_redaction_callable_sees_dotted_paths(kw: Klockwork) -> None:
    seen: list[str] = []

    def redact(path: str, value: Any) -> Any:
        seen.append(path)
        return "***" if path == "inputs.text" else value

    @tool
    def note(title: str, text: str, tags: list[str]) -> dict[str, Any]:
        """Write a note."""
        return {"saved": title, "tags": tags}

    args = {"title": "t", "text": "private", "tags": ["a", "b"]}
    note.invoke(args, config=run(AuditCallbackHandler(kw, redact=redact)))
    start, end = entries(kw)
    assert start.data["inputs"] == {"title": "t", "text": "***", "tags": ["a", "b"]}
    assert end.data["outputs"] == {"saved": "t", "tags": ["a", "b"]}
    assert {"inputs", "inputs.title", "inputs.text", "inputs.tags", "inputs.tags.1"} <= set(seen)
    assert {"outputs", "outputs.saved", "outputs.tags.0"} <= set(seen)


def test_a_failing_redactor_never_records_the_raw_value(kw: Klockwork) -> None:
    def redact(path: str, value: Any) -> Any:
        raise KeyError("redactor bug")

    handler = AuditCallbackHandler(kw, redact=redact)
    assert login.invoke({"user": "u", "password": "pw-raw"}, config=run(handler)) == "welcome u"
    start, end = entries(kw)
    assert start.data["inputs"] == "[unavailable: KeyError]"
    assert end.data["outputs"] == "[unavailable: KeyError]"
    assert handler.failures == 2
    assert isinstance(handler.last_error, KeyError)


def test_long_fields_are_truncated_with_a_marker(kw: Klockwork) -> None:
    @tool
    def echo(text: str, items: list[int]) -> str:
        """Echo."""
        return text

    handler = AuditCallbackHandler(kw, max_field_chars=100)
    text = "x" * 5000
    echo.invoke({"text": text, "items": list(range(10_000))}, config=run(handler))

    start, end = entries(kw)
    assert end.data["outputs"] == "x" * 100 + "…[truncated 4900 chars]"
    inputs = start.data["inputs"]
    assert inputs["text"].startswith("x" * 90)
    assert inputs["text"].endswith("chars]")
    assert len(inputs["text"]) < 130
    assert inputs["…"] == "[truncated 1 keys]"  # the text used the budget up: items is cut
    assert len(json.dumps(start.data)) < 600

    handler_big = AuditCallbackHandler(kw, max_field_chars=50)
    echo.invoke({"text": "short", "items": list(range(10_000))}, config=run(handler_big))
    items = entries(kw)[-2].data["inputs"]["items"]
    assert items[-1].startswith("…[truncated ")
    assert 30 < len(items) < 60


def test_bad_options_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="max_field_chars"):
        AuditCallbackHandler(max_field_chars=0)
    with pytest.raises(InvalidRequestError, match="redact"):
        AuditCallbackHandler(redact=[1, 2])  # type: ignore[list-item]
    with pytest.raises(InvalidRequestError, match="kw"):
        AuditCallbackHandler("memory://")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- failures
def test_a_failing_audit_does_not_break_the_run_by_default(
    kw: Klockwork, caplog: pytest.LogCaptureFixture
) -> None:
    handler = AuditCallbackHandler(kw)
    kw.close()
    with caplog.at_level(logging.WARNING, logger="klockwork.audit"):
        assert two_node_graph().invoke({"total": 0}, run(handler)) == {"total": 3}
        assert add.invoke({"a": 1, "b": 1}, config=run(handler)) == 2
    assert handler.failures == 12  # 10 graph events + 2 tool events
    assert isinstance(handler.last_error, StoreUnavailableError)
    warnings = [r for r in caplog.records if r.name == "klockwork.audit"]
    assert len(warnings) == 1  # logged once, then counted


def test_fail_closed_stops_the_run_before_the_tool_runs(kw: Klockwork) -> None:
    ran: list[str] = []

    @tool
    def side_effect(x: str) -> str:
        """Does something that must be audited."""
        ran.append(x)
        return x

    handler = AuditCallbackHandler(kw, fail_closed=True)
    assert handler.raise_error
    assert side_effect.invoke({"x": "ok"}, config=run(handler)) == "ok"
    kw.close()
    with pytest.raises(StoreUnavailableError):
        side_effect.invoke({"x": "unaudited"}, config=run(handler))
    with pytest.raises(StoreUnavailableError):
        two_node_graph().invoke({"total": 0}, run(handler))
    assert ran == ["ok"]


@tool
async def aadd(a: int, b: int) -> int:
    """Add two numbers (async)."""
    return a + b


async def test_fail_closed_async(kw: Klockwork) -> None:
    handler = AsyncAuditCallbackHandler(kw, fail_closed=True)
    assert await aadd.ainvoke({"a": 1, "b": 2}, config=run(handler)) == 3
    kw.close()
    with pytest.raises(StoreUnavailableError):
        await aadd.ainvoke({"a": 1, "b": 2}, config=run(handler))


async def test_async_handler_records_sync_tools_called_from_async_code(kw: Klockwork) -> None:
    # LangChain runs a sync tool's ainvoke on a worker thread with the sync
    # callback manager, which drives async handlers on a loop of its own.
    handler = AsyncAuditCallbackHandler(kw)
    assert await add.ainvoke({"a": 1, "b": 2}, config=run(handler, agent_config("w"))) == 3
    assert kinds(entries(kw)) == ["tool.start", "tool.end"]
    assert {e.agent_id for e in entries(kw)} == {"w"}


# --------------------------------------------------------------------------- concurrency
class Fan(TypedDict):
    done: Annotated[list[int], operator.add]


def fan_out_graph(width: int) -> Any:
    """START → ``width`` parallel nodes (each calls a tool on LangGraph's worker threads)."""
    builder = StateGraph(Fan)
    for i in range(width):

        def node(state: Fan, i: int = i) -> dict[str, list[int]]:
            return {"done": [add.invoke({"a": i, "b": 0})]}

        builder.add_node(f"n{i}", node)
        builder.add_edge(START, f"n{i}")
    return builder.compile()


def test_parallel_runs_on_worker_threads_give_a_gapless_chain(kw: Klockwork) -> None:
    handler = AuditCallbackHandler(kw)
    graph = fan_out_graph(4)
    threads: set[int] = set()

    def one(i: int) -> None:
        threads.add(threading.get_ident())
        result = graph.invoke({"done": []}, run(handler, agent_config(f"agent-{i % 4}")))
        assert sorted(result["done"]) == [0, 1, 2, 3]
        add.invoke({"a": i, "b": i}, config=run(handler, agent_config(f"agent-{i % 4}")))

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, range(40)))

    found = entries(kw)
    per_graph = 2 + 4 * 4  # graph start/end, and per node: start, tool start, tool end, end
    assert len(found) == 40 * (per_graph + 2)
    result = kw.audit.verify()
    assert result.valid, result.reason
    seqs = [e.seq for e in found]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # gapless: nothing else recorded
    # Every run that started ended, with the identity of its own caller.
    starts = {e.data["run_id"]: e for e in found if e.kind.endswith(".start")}
    ends = {e.data["run_id"]: e for e in found if e.kind.endswith((".end", ".error"))}
    assert starts.keys() == ends.keys()
    assert all(ends[r].agent_id == s.agent_id for r, s in starts.items())
    assert len(threads) > 1
    assert not handler._runs  # nothing left behind
    assert handler.failures == 0


async def test_async_handler_in_an_async_graph_never_blocks_the_loop(kw: Klockwork) -> None:
    @tool
    async def slow_add(a: int, b: int) -> int:
        """Add, slowly."""
        await asyncio.sleep(0.005)
        return a + b

    async def first(state: Total) -> dict[str, int]:
        return {"total": await slow_add.ainvoke({"a": state["total"], "b": 1})}

    async def second(state: Total) -> dict[str, int]:
        return {"total": await slow_add.ainvoke({"a": state["total"], "b": 2})}

    builder = StateGraph(Total)
    builder.add_node("first", first)
    builder.add_node("second", second)
    builder.add_edge(START, "first")
    builder.add_edge("first", "second")
    graph = builder.compile()

    loop_thread = threading.get_ident()
    recorded_on: set[int] = set()

    def redact(path: str, value: Any) -> Any:  # runs inside the handler's coroutines
        recorded_on.add(threading.get_ident())
        return value

    handler = AsyncAuditCallbackHandler(kw, redact=redact)
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    runs, started = 0, time.perf_counter()
    while runs < 20 or time.perf_counter() - started < 0.3:
        results = await asyncio.gather(
            *(graph.ainvoke({"total": i}, run(handler, agent_config(f"a{i}"))) for i in range(5))
        )
        assert [r["total"] for r in results] == [i + 3 for i in range(5)]
        runs += 5
    stop.set()
    await ticking

    assert len(entries(kw)) == runs * 10
    assert kw.audit.verify().valid
    assert recorded_on == {loop_thread}  # on the loop itself: no executor hop
    # The loop kept ticking while the graphs were audited (robust to a stray slow tick).
    assert len(gaps) >= 30
    assert sorted(gaps)[int(len(gaps) * 0.9)] < 0.05


# --------------------------------------------------------------------------- audit_context
async def test_audit_context_covers_sync_and_async_runs(kw: Klockwork) -> None:
    graph = two_node_graph()
    with audit_context(kw, redact={"b"}) as handler:
        await asyncio.to_thread(add.invoke, {"a": 1, "b": 2}, agent_config("sync-tool"))
        assert await graph.ainvoke({"total": 0}, agent_config("async-graph")) == {"total": 3}
        fan_out_graph(3).invoke({"done": []}, agent_config("threads"))
    add.invoke({"a": 1, "b": 1}, agent_config("outside"))  # after the block: not audited

    found = entries(kw)
    by_agent: dict[str, list[str]] = {}
    for e in found:
        by_agent.setdefault(str(e.agent_id), []).append(e.kind)
    assert by_agent["sync-tool"] == ["tool.start", "tool.end"]
    assert len(by_agent["async-graph"]) == 10
    assert len(by_agent["threads"]) == 2 + 3 * 4
    assert "outside" not in by_agent
    # Each event once, although child runs inherit the handler and re-check the context.
    keys = [(e.kind, e.data["run_id"]) for e in found]
    assert len(keys) == len(set(keys))
    assert all(e.data["inputs"]["b"] == REDACTED for e in found if e.kind == "tool.start")
    assert handler.failures == 0
    assert kw.audit.verify().valid


async def test_audit_context_as_async_with_and_nested(kw: Klockwork) -> None:
    other = Klockwork()
    try:
        async with audit_context(kw):
            await add.ainvoke({"a": 1, "b": 1}, agent_config("outer"))
            with audit_context(other):
                await add.ainvoke({"a": 2, "b": 2}, agent_config("inner"))
            await add.ainvoke({"a": 3, "b": 3}, agent_config("outer-again"))
        assert [e.agent_id for e in entries(kw)] == ["outer"] * 2 + ["outer-again"] * 2
        assert [e.agent_id for e in entries(other)] == ["inner"] * 2
    finally:
        other.close()


def test_default_engine_is_used_without_kw(default_engine: Klockwork) -> None:
    handler = AuditCallbackHandler()
    add.invoke({"a": 1, "b": 1}, config=run(handler, agent_config("d")))
    assert handler.kw is default_engine
    assert kinds(entries(default_engine)) == ["tool.start", "tool.end"]
