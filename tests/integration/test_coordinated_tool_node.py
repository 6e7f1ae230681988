"""CoordinatedToolNode: a ToolNode with the middleware's per-call logic, in hand-built graphs."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Annotated, Any

import pytest
from langchain_core.messages import AIMessage, AnyMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import InjectedState, ToolNode, tools_condition
from langgraph.types import Command, Send
from lc_helpers import scripted
from typing_extensions import TypedDict

from klockwork import Klockwork
from klockwork.core.errors import InvalidRequestError
from klockwork.core.governance.policy import Condition, Policy
from klockwork.integrations.langchain import agent_config
from klockwork.integrations.langgraph import CoordinatedToolNode

AGENT = "builder"


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    owner: str


class Edits:
    """An edit tool that records when each call ran and reads the graph state."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.spans: dict[str, tuple[float, float]] = {}
        self.owners: list[str] = []

        @tool
        def edit(path: str, text: str, state: Annotated[dict[str, Any], InjectedState]) -> str:
            """Edit a file."""
            start = time.monotonic()
            time.sleep(delay_s)
            with self.lock:
                self.spans[text] = (start, time.monotonic())
                self.owners.append(state["owner"])
            return f"edited {path}"

        self.tool = edit


def calls(*items: tuple[str, str, str]) -> AIMessage:
    return AIMessage(
        "",
        tool_calls=[{"name": "edit", "args": {"path": p, "text": t}, "id": i} for i, p, t in items],
    )


def graph(node: ToolNode, *turns: AIMessage, send: bool = False, saver: Any = None) -> Any:
    model = scripted(*turns, "Done.")

    def agent(state: State) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    def fan_out(state: State) -> Any:
        last = state["messages"][-1]
        if not isinstance(last, AIMessage) or not last.tool_calls:
            return END
        return [
            Send("tools", {"__type": "tool_call_with_context", "tool_call": c, "state": state})
            for c in last.tool_calls
        ]

    builder = StateGraph(State)
    builder.add_node("agent", agent)
    builder.add_node("tools", node)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", fan_out if send else tools_condition)
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=saver)


def tool_messages(out: dict[str, Any]) -> list[ToolMessage]:
    return [m for m in out["messages"] if isinstance(m, ToolMessage)]


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


INPUT: Any = {"messages": [("user", "edit")], "owner": "ada"}


@pytest.mark.parametrize("send", [False, True])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_same_file_serialised_other_files_overlap(kw: Klockwork, send: bool, mode: str) -> None:
    edits = Edits(delay_s=0.3)
    node = CoordinatedToolNode([edits.tool], kw, resources={"edit": "FILE:{path}"})
    g = graph(
        node,
        calls(("c1", "/m.py", "one"), ("c2", "/m.py", "two")),
        calls(("c3", "/x.py", "three"), ("c4", "/y.py", "four")),
        send=send,
    )
    cfg = agent_config(AGENT, "s1")
    out = g.invoke(INPUT, cfg) if mode == "sync" else asyncio.run(g.ainvoke(INPUT, cfg))
    assert [m.status for m in tool_messages(out)] == ["success"] * 4
    assert not overlap(edits.spans["one"], edits.spans["two"])
    assert overlap(edits.spans["three"], edits.spans["four"])
    assert edits.owners == ["ada"] * 4  # InjectedState still injected
    assert kw.leases.list() == []


def test_refusals_are_error_messages_and_errors_follow_handle_tool_errors(kw: Klockwork) -> None:
    secret = Condition(field="path", operator="eq", value="/secret")
    kw.policies.add(
        Policy(name="no-secrets", action="fs.edit", effect="deny", conditions=[secret], priority=10)
    )
    kw.policies.add(Policy(name="edits", action="fs.edit", effect="allow"))

    @tool
    def boom(path: str) -> str:
        """Fail."""
        raise ValueError("kaboom")

    edits = Edits()
    node = CoordinatedToolNode(
        [edits.tool, boom],
        kw,
        resources={"edit": "FILE:{path}", "boom": "FILE:{path}"},
        gates={"edit": {"action": "fs.edit", "metadata": lambda a: {"path": a["path"]}}},
        handle_tool_errors=True,
    )
    turn = AIMessage(
        "",
        tool_calls=[
            {"name": "edit", "args": {"path": "/secret", "text": "s"}, "id": "c1"},
            {"name": "edit", "args": {"path": "", "text": "e"}, "id": "c2"},
            {"name": "boom", "args": {"path": "/b"}, "id": "c3"},
        ],
    )
    out = graph(node, turn).invoke(INPUT, agent_config(AGENT))
    secret, empty, boom_msg = tool_messages(out)
    assert secret.status == "error" and "no-secrets" in str(secret.content)
    assert empty.status == "error" and "'path' is empty" in str(empty.content)
    assert boom_msg.status == "error" and "kaboom" in str(boom_msg.content)
    assert edits.spans == {} and kw.leases.list() == []


def test_a_template_naming_a_missing_argument_raises_at_construction(kw: Klockwork) -> None:
    with pytest.raises(InvalidRequestError, match="file"):
        CoordinatedToolNode([Edits().tool], kw, resources={"edit": "FILE:{file}"})


def test_hitl_approval_in_a_checkpointed_graph(kw: Klockwork) -> None:
    core = Condition(field="path", operator="ne", value="/core.py")
    kw.policies.add(
        Policy(
            name="ask",
            action="fs.edit",
            effect="allow",
            on_fail="require_approval",
            conditions=[core],
        )
    )
    edits = Edits()
    node = CoordinatedToolNode(
        [edits.tool],
        kw,
        resources={"edit": "FILE:{path}"},
        gates={"edit": {"action": "fs.edit", "metadata": lambda a: {"path": a["path"]}}},
    )
    g = graph(node, calls(("c1", "/core.py", "x")), send=True, saver=InMemorySaver())
    cfg = agent_config(AGENT, thread_id="t-1")
    out = g.invoke(INPUT, cfg)
    (pending,) = out["__interrupt__"]
    assert pending.value["action_requests"][0]["name"] == "edit"
    out = g.invoke(Command(resume={"decisions": [{"type": "approve"}], "approver": "alice"}), cfg)
    assert tool_messages(out)[0].content == "edited /core.py"
    assert len(kw.approvals.list(status=None)) == 1


def test_parallel_approvals_in_a_node_are_resumed_together_by_interrupt_id(kw: Klockwork) -> None:
    kw.policies.add(Policy(name="ask", action="fs.edit", effect="require_approval"))
    edits = Edits()
    node = CoordinatedToolNode(
        [edits.tool], kw, resources={"edit": "FILE:{path}"}, gates={"edit": "fs.edit"}
    )
    g = graph(node, calls(("c1", "/a", "a"), ("c2", "/b", "b")), send=True, saver=InMemorySaver())
    cfg = agent_config(AGENT, thread_id="t-2")
    interrupts = g.invoke(INPUT, cfg)["__interrupt__"]
    assert len(interrupts) == 2 and edits.spans == {}
    answer = {"decisions": [{"type": "approve"}], "approver": "alice"}
    out = g.invoke(Command(resume={i.id: answer for i in interrupts}), cfg)
    assert sorted(m.content for m in tool_messages(out)) == ["edited /a", "edited /b"]
    assert len(kw.approvals.list(status=None)) == 2
