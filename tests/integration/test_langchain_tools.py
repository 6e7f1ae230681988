"""protect_tool / protect_tools and @klock_protected above @tool: copies of tool objects."""

from __future__ import annotations

import time
from typing import Any

import pytest
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import BaseTool, StructuredTool, Tool, ToolException, tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from lc_helpers import OLD, YOUNG, Probe
from pydantic import BaseModel

from klockwork import Klockwork
from klockwork.integrations.langchain import (
    KlockConflictError,
    agent_config,
    klock_protected,
    protect_tool,
    protect_tools,
)


def tool_call(name: str, call_id: str = "c1", **args: Any) -> dict[str, Any]:
    return {"type": "tool_call", "id": call_id, "name": name, "args": args}


def holders(kw: Klockwork) -> list[tuple[str, str]]:
    return [(lease.agent_id, lease.resource) for lease in kw.leases.list()]


@pytest.fixture
def write_file(kw: Klockwork) -> StructuredTool:
    @tool(return_direct=True)
    def write_file(path: str, text: str = "") -> str:
        """Write text to a file."""
        return f"wrote {path} under {holders(kw)}"

    assert isinstance(write_file, StructuredTool)
    write_file.tags = ["io"]
    write_file.metadata = {"kind": "fs"}
    return write_file


def assert_same_surface(protected: BaseTool, original: BaseTool) -> None:
    assert protected.name == original.name
    assert protected.description == original.description
    assert protected.args == original.args
    assert protected.args_schema == original.args_schema
    assert (
        protected.tool_call_schema.model_json_schema()
        == original.tool_call_schema.model_json_schema()
    )
    for field in ("return_direct", "response_format", "tags", "metadata", "handle_tool_error"):
        assert getattr(protected, field) == getattr(original, field), field
    assert isinstance(protected, type(original))


def test_protect_tool_keeps_the_surface_and_leaves_the_original(
    kw: Klockwork, write_file: StructuredTool
) -> None:
    protected = protect_tool(write_file, "FILE:{path}", kw=kw)
    assert_same_surface(protected, write_file)
    assert protected.invoke({"path": "/a"}, config=agent_config("w")) == (
        "wrote /a under [('w', 'FILE:/a')]"
    )
    assert write_file.invoke({"path": "/a"}) == "wrote /a under []"  # original unprotected


def test_tool_error_mode_ends_as_an_error_tool_message(
    kw: Klockwork, write_file: StructuredTool
) -> None:
    protected = protect_tool(write_file, "FILE:{path}", kw=kw, timeout_s=0.05)
    kw.leases.acquire(OLD, "o", ("FILE:/a", "MUTATES"), 5_000)
    message = protected.invoke(tool_call("write_file", path="/a"), config=agent_config(YOUNG))
    assert isinstance(message, ToolMessage)
    assert (message.status, message.tool_call_id, message.name) == ("error", "c1", "write_file")
    assert "old (session o) holds MUTATES on FILE:/a" in message.content
    assert "reason DIE" in message.content
    # Invoked with bare args there is no ToolMessage to make: the call returns the text.
    text = protected.invoke({"path": "/a"}, config=agent_config(YOUNG))
    assert isinstance(text, str) and text.startswith("Resource busy: FILE:/a.")
    assert holders(kw) == [(OLD, "FILE:/a")]  # the refused calls left nothing behind


async def test_tool_error_mode_async(kw: Klockwork, write_file: StructuredTool) -> None:
    @tool
    async def awrite(path: str) -> str:
        """Write a file asynchronously."""
        return "written"

    protected = protect_tool(awrite, "FILE:{path}", kw=kw, timeout_s=0.05)
    assert await protected.ainvoke({"path": "/a"}) == "written"
    await kw.leases.aacquire(YOUNG, "y", ("FILE:/a", "MUTATES"), 5_000)
    message = await protected.ainvoke(tool_call("awrite", "c7", path="/a"), agent_config(OLD))
    assert (message.status, message.tool_call_id) == ("error", "c7")
    assert "reason WAIT_TIMEOUT" in message.content
    # A sync-only tool awaited runs in a worker thread; the refusal is still a message.
    sync_tool = protect_tool(write_file, "FILE:{path}", kw=kw, timeout_s=0.05)
    message = await sync_tool.ainvoke(tool_call("write_file", "c8", path="/a"), agent_config(OLD))
    assert (message.status, message.tool_call_id) == ("error", "c8")


def test_raise_mode_lets_the_tools_own_handler_decide(
    kw: Klockwork, write_file: StructuredTool
) -> None:
    protected = protect_tool(write_file, "FILE:{path}", kw=kw, timeout_s=0.05, on_conflict="raise")
    kw.leases.acquire(OLD, "o", ("FILE:/a", "MUTATES"), 5_000)
    with pytest.raises(KlockConflictError) as info:
        protected.invoke(tool_call("write_file", path="/a"), config=agent_config(YOUNG))
    assert (info.value.agent_id, info.value.resource_path) == (YOUNG, "FILE:/a")
    handled = protected.model_copy(update={"handle_tool_error": "busy, later"})
    message = handled.invoke(tool_call("write_file", path="/a"), config=agent_config(YOUNG))
    assert (message.status, message.content) == ("error", "busy, later")


def test_other_exceptions_behave_exactly_as_in_the_original(kw: Klockwork) -> None:
    @tool
    def flaky(path: str, kind: str) -> str:
        """Fail in the requested way."""
        if kind == "tool":
            raise ToolException("tool says no")
        raise LookupError("plain failure")

    protected = protect_tool(flaky, "FILE:{path}", kw=kw)
    with pytest.raises(ToolException, match="tool says no"):
        protected.invoke(tool_call("flaky", path="/a", kind="tool"))
    with pytest.raises(LookupError):
        protected.invoke(tool_call("flaky", path="/a", kind="plain"))
    flaky.handle_tool_error = True
    protected = protect_tool(flaky, "FILE:{path}", kw=kw)
    message = protected.invoke(tool_call("flaky", path="/a", kind="tool"))
    assert (message.status, message.content) == ("error", "tool says no")
    assert kw.leases.list() == []


def test_content_and_artifact_tool_gets_an_error_message_too(kw: Klockwork) -> None:
    @tool(response_format="content_and_artifact")
    def fetch(path: str) -> tuple[str, dict[str, str]]:
        """Fetch a file with its raw bytes."""
        return "content", {"raw": path}

    protected = protect_tool(fetch, "FILE:{path}", kw=kw, timeout_s=0.05)
    ok = protected.invoke(tool_call("fetch", path="/a"))
    assert (ok.content, ok.artifact, ok.status) == ("content", {"raw": "/a"}, "success")
    kw.leases.acquire(OLD, "o", ("FILE:/a", "MUTATES"), 5_000)
    refused = protected.invoke(tool_call("fetch", path="/a"), config=agent_config(YOUNG))
    assert refused.status == "error"


def test_single_input_tool(kw: Klockwork) -> None:
    def shout(query: str) -> str:
        return f"{query.upper()} {holders(kw)}"

    original = Tool(name="shout", func=shout, description="Shout the query.")
    protected = protect_tool(original, "TOPIC:{query}", kw=kw)
    assert_same_surface(protected, original)
    assert protected.invoke("hi") == "HI [('" + protected_agent() + "', 'TOPIC:hi')]"


def protected_agent() -> str:
    import os

    return f"process-{os.getpid()}"


class PathInput(BaseModel):
    path: str


class CustomTool(BaseTool):
    name: str = "custom"
    description: str = "A hand-written tool."
    kw: Any = None

    def _run(self, path: str) -> str:
        return f"sync {holders(self.kw)}"


class CustomAsyncTool(CustomTool):
    args_schema: type[BaseModel] = PathInput

    async def _arun(self, path: str) -> str:
        return f"async {holders(self.kw)}"


async def test_custom_basetool_subclass(kw: Klockwork) -> None:
    for original in (CustomTool(kw=kw), CustomAsyncTool(kw=kw)):
        protected = protect_tool(original, "FILE:{path}", kw=kw, timeout_s=0.05)
        assert_same_surface(protected, original)
        assert protected.invoke({"path": "/a"}, agent_config("w")) == "sync [('w', 'FILE:/a')]"
        prefix = "async" if isinstance(original, CustomAsyncTool) else "sync"
        assert await protected.ainvoke({"path": "/a"}, agent_config("w")) == (
            f"{prefix} [('w', 'FILE:/a')]"
        )
        assert original.invoke({"path": "/a"}) == "sync []"
    lease = kw.leases.acquire(OLD, "o", ("FILE:/a", "MUTATES"), 5_000).lease
    message = await protected.ainvoke(tool_call("custom", path="/a"), agent_config(YOUNG))
    assert message.status == "error"
    kw.leases.release(lease.lease_id)


def test_klock_protected_above_tool(kw: Klockwork, write_file: StructuredTool) -> None:
    short = klock_protected("FILE:{path}", kw=kw, timeout_s=0.05)(write_file)
    klock = klock_protected(kw, "agent-k", "s", "FILE", lambda a: a["path"], max_retries=0)(
        write_file
    )
    assert_same_surface(short, write_file)
    assert_same_surface(klock, write_file)
    assert klock.invoke({"path": "/a"}) == "wrote /a under [('agent-k', 'FILE:/a')]"
    kw.leases.acquire(OLD, "o", ("FILE:/a", "MUTATES"), 5_000)
    assert short.invoke(tool_call("write_file", path="/a"), agent_config(YOUNG)).status == "error"
    with pytest.raises(KlockConflictError):  # Klock's signature raises, as Klock does
        klock.invoke(tool_call("write_file", path="/a"))


def test_protect_tools_by_name(kw: Klockwork, write_file: StructuredTool) -> None:
    def read_file(path: str) -> str:
        """Read a file."""
        return f"read under {holders(kw)}"

    @tool
    def clock() -> str:
        """Tell the time."""
        return "noon"

    protected = protect_tools(
        [write_file, read_file, clock],
        {"write_file": "FILE:{path}", "read_file": "FILE:{path}"},
        kw=kw,
        agent_id="w",
    )
    assert [t.name for t in protected] == ["write_file", "read_file", "clock"]
    assert protected[1].invoke({"path": "/a"}) == "read under [('w', 'FILE:/a')]"
    assert protected[2] is clock
    with pytest.raises(ValueError, match="names no tool"):
        protect_tools([write_file], {"wirte_file": "FILE:{path}"}, kw=kw)
    everything = protect_tools([write_file, read_file], "TABLE:all", kw=kw, agent_id="w")
    assert everything[1].invoke({"path": "/a"}) == "read under [('w', 'TABLE:all')]"


def test_parallel_tool_calls_in_a_tool_node_exclude_each_other(kw: Klockwork) -> None:
    probe = Probe()

    @tool
    def append(path: str, line: str) -> str:
        """Append a line to a file."""
        probe.enter()
        time.sleep(0.05)
        probe.leave()
        return "appended"

    node = ToolNode([protect_tool(append, "FILE:{path}", kw=kw)])
    builder = StateGraph(MessagesState)
    builder.add_node("tools", node)
    builder.add_edge(START, "tools")
    builder.add_edge("tools", END)
    calls = [
        {"name": "append", "args": {"path": "/log", "line": str(i)}, "id": f"c{i}"}
        for i in range(3)
    ]
    out = builder.compile().invoke({"messages": [AIMessage("", tool_calls=calls)]})
    results = out["messages"][1:]
    assert [m.content for m in results] == ["appended"] * 3
    assert probe.max_inside == 1
