"""A refusal or a bad resource argument reaches the model; it never ends the agent run.

Every way of protecting a tool (below ``@tool``, above it, on a ``BaseTool``
subclass's ``_run``/``_arun``, ``protect_tool``, Klock's signature with our
client and with a Klock client of its own), inside LangGraph's ``ToolNode``
and inside ``create_agent``, sync and async, without ``handle_tool_error``:
the call ends as ``ToolMessage(status="error")`` and the tool body never runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from lc_helpers import OLD, YOUNG, FakeKlock, calls_tool, scripted
from pydantic import BaseModel

from klockwork import EventLoopBlockedError, KlockClient, Klockwork, Policy
from klockwork.integrations.langchain import (
    agent_config,
    gated_tool,
    klock_protected,
    protect_tool,
)

HELD = "/repo/a.py"


class EditArgs(BaseModel):
    path: str
    text: str


def build(
    position: str, kw: Klockwork, klock: FakeKlock, ran: list[str], run_async: bool
) -> BaseTool:
    """The ``edit`` tool protected in ``position``; its body appends to ``ran``."""

    def edit(path: str, text: str) -> str:
        """Edit a file."""
        ran.append(path)
        return "edited"

    def async_edit() -> Callable[..., Any]:
        async def edit(path: str, text: str) -> str:  # the tool's name, as @tool takes it
            """Edit a file."""
            ran.append(path)
            return "edited"

        return edit

    aedit = async_edit()
    fn: Callable[..., Any] = aedit if run_async else edit
    short = klock_protected("FILE:{path}", kw=kw, timeout_s=0.05)
    if position == "below_tool":
        return tool(short(fn))
    if position == "above_tool":
        return short(tool(fn))
    if position == "protect_tool":
        return protect_tool(tool(fn), "FILE:{path}", kw=kw, timeout_s=0.05)
    if position == "basetool_run":

        class EditTool(BaseTool):
            name: str = "edit"
            description: str = "Edit a file."
            args_schema: type[BaseModel] = EditArgs

            @klock_protected("FILE:{path}", kw=kw, timeout_s=0.05)
            def _run(self, path: str, text: str) -> str:
                return edit(path, text)

            @klock_protected("FILE:{path}", kw=kw, timeout_s=0.05)
            async def _arun(self, path: str, text: str) -> str:
                return await aedit(path, text)

        return EditTool()
    extract: Callable[[dict[str, Any]], str] = lambda args: args["path"]  # noqa: E731
    if position == "klock_form":  # Klock's signature, our client: raises by default
        guard = klock_protected(KlockClient(kw), None, None, "FILE", extract, max_retries=0)
        return tool(guard(fn))
    assert position == "klock_foreign"  # Klock's signature and a Klock client of its own
    guard = klock_protected(klock, None, None, "FILE", extract, max_retries=1)
    return tool(guard(fn))


async def run(runner: str, t: BaseTool, args: dict[str, Any], run_async: bool) -> list[ToolMessage]:
    """Run one tool call through ``runner``; return the tool messages the run produced."""
    config = agent_config(YOUNG)
    graph: Any
    if runner == "tool_node":
        builder = StateGraph(MessagesState)
        builder.add_node("tools", ToolNode([t]))
        builder.add_edge(START, "tools")
        builder.add_edge("tools", END)
        graph = builder.compile()
        state: dict[str, Any] = {"messages": [calls_tool("edit", **args)]}
    else:
        graph = create_agent(scripted(calls_tool("edit", **args), "done"), [t])
        state = {"messages": [HumanMessage("edit it")]}
    out = await graph.ainvoke(state, config) if run_async else graph.invoke(state, config)
    return [m for m in out["messages"] if isinstance(m, ToolMessage)]


POSITIONS = [
    "below_tool",
    "above_tool",
    "protect_tool",
    "basetool_run",
    "klock_form",
    "klock_foreign",
]
CASES = {
    "busy": ({"path": HELD, "text": "x"}, "Resource busy: FILE:/repo/a.py"),
    "escaping_path": ({"path": "../etc/passwd", "text": "x"}, "escapes its root"),
    "empty_path": ({"path": "", "text": "x"}, "'path' is empty"),
}


@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("runner", ["tool_node", "create_agent"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("position", POSITIONS)
async def test_the_model_reads_an_error_message_and_the_run_goes_on(
    kw: Klockwork, position: str, case: str, runner: str, run_async: bool
) -> None:
    klock = FakeKlock()
    klock.register_agent(OLD, 0)
    klock.register_agent(YOUNG, 100)
    held = kw.leases.acquire(OLD, "s", (f"FILE:{HELD}", "MUTATES"), 60_000).lease
    klock.acquire_lease(OLD, "s", "FILE", HELD, "MUTATES", 60_000)
    ran: list[str] = []
    args, says = CASES[case]

    messages = await run(runner, build(position, kw, klock, ran, run_async), args, run_async)

    assert [m.status for m in messages] == ["error"]
    assert says in str(messages[0].content)
    if case != "busy":
        assert "Invalid argument for tool 'edit'" in str(messages[0].content)
    assert ran == []  # the tool body never ran
    # nothing was left held, and the older agent's lease is untouched
    assert [lease.lease_id for lease in kw.leases.list()] == [held.lease_id]
    assert [agent for agent, _ in klock.holders.values()] == [OLD]


@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("position", POSITIONS)
async def test_a_free_resource_still_runs_the_tool(
    kw: Klockwork, position: str, run_async: bool
) -> None:
    klock = FakeKlock()
    ran: list[str] = []
    messages = await run(
        "create_agent",
        build(position, kw, klock, ran, run_async),
        {"path": "/repo/b.py", "text": "x"},
        run_async,
    )
    assert [(m.status, m.content) for m in messages] == [("success", "edited")]
    assert ran == ["/repo/b.py"]
    assert kw.leases.list() == [] and klock.holders == {}


async def test_a_sync_invoke_on_the_loop_names_ainvoke(kw: Klockwork) -> None:
    """Called on a running loop's thread, a sync tool that would wait says what to call."""
    kw.leases.acquire(OLD, "s", (f"FILE:{HELD}", "MUTATES"), 60_000)
    edit = build("below_tool", kw, FakeKlock(), [], run_async=False)
    with pytest.raises(EventLoopBlockedError) as info:
        edit.invoke({"path": HELD, "text": "x"}, agent_config(YOUNG, "s2"))
    assert (info.value.call, info.value.use) == ("edit.invoke(...)", "await edit.ainvoke(...)")
    kw.policies.add(Policy(name="ask", action="edit", effect="require_approval"))
    gated = gated_tool(build("below_tool", kw, FakeKlock(), [], False), action="edit", kw=kw)
    with pytest.raises(EventLoopBlockedError, match=r"await edit\.ainvoke") as gate_info:
        gated.invoke({"path": "/repo/b.py", "text": "x"}, agent_config(YOUNG))
    assert gate_info.value.waiting_for == "an approval"
    assert kw.approvals.list() == []  # refused before an approval was opened
