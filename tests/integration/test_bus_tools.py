"""bus_tools: agents that coordinate by messages over kw.bus."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import BaseTool
from lc_helpers import calls_tool, scripted

from klockwork import InvalidRequestError, Klockwork
from klockwork.integrations.langchain import agent_config, bus_tools


def call(tool: BaseTool, config: Any = None, call_id: str = "c1", **args: Any) -> ToolMessage:
    """Invoke ``tool`` the way ToolNode does (a tool call): the answer is a ToolMessage."""
    out = tool.invoke({"type": "tool_call", "id": call_id, "name": tool.name, "args": args}, config)
    assert isinstance(out, ToolMessage)
    return out


def read_json(message: ToolMessage) -> Any:
    assert message.status == "success", message.content
    return json.loads(str(message.content))


def tool_messages(state: dict[str, Any], name: str) -> list[ToolMessage]:
    return [m for m in state["messages"] if isinstance(m, ToolMessage) and m.name == name]


def test_bus_tools_are_three_tools_with_readable_schemas(kw: Klockwork) -> None:
    send, read, wait = bus_tools(kw, channels=["tasks", "team.*"])
    assert [t.name for t in (send, read, wait)] == [
        "send_message",
        "read_messages",
        "wait_for_messages",
    ]
    for t in (send, read, wait):
        assert "tasks, team.*" in t.description  # the model is told what it may use
        assert "config" not in t.tool_call_schema.model_json_schema()["properties"]
    assert set(wait.tool_call_schema.model_json_schema()["properties"]) == {
        "channels",
        "mode",
        "n",
        "timeout_s",
    }


def test_two_agents_coordinate_by_messages(kw: Klockwork) -> None:
    tools = bus_tools(kw, wait_s=10)
    planner = create_agent(
        scripted(
            calls_tool(
                "send_message", "p1", channel="tasks", message={"op": "add", "args": [2, 3]}
            ),
            calls_tool("wait_for_messages", "p2", channels=["results"]),
            "The sum is 5.",
        ),
        tools,
        name="planner",
    )
    worker = create_agent(
        scripted(
            calls_tool("wait_for_messages", "w1", channels=["tasks"]),
            calls_tool("send_message", "w2", channel="results", message={"sum": 5}),
            "Done.",
        ),
        tools,
        name="worker",
    )
    out: dict[str, Any] = {}

    def run(name: str, agent: Any) -> None:
        out[name] = agent.invoke({"messages": [("user", "go")]})

    threads = [threading.Thread(target=run, args=a) for a in (("w", worker), ("p", planner))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    task = read_json(tool_messages(out["w"], "wait_for_messages")[0])
    assert task["satisfied"]
    [got] = task["messages"]["tasks"]
    assert got["from"] == "planner" and got["message"] == {"op": "add", "args": [2, 3]}
    result = read_json(tool_messages(out["p"], "wait_for_messages")[0])
    assert result["messages"]["results"][0]["from"] == "worker"
    assert result["messages"]["results"][0]["message"] == {"sum": 5}
    assert out["p"]["messages"][-1].content == "The sum is 5."
    # Each agent read through a group of its own, and consumed what it read.
    groups = {(g.channel, g.group): g.pending for g in kw.bus.groups()}
    assert groups == {("tasks", "worker"): 0, ("results", "planner"): 0}


def test_read_acks_what_it_returns_with_sender_and_attempt(kw: Klockwork) -> None:
    _, read, _ = bus_tools(kw)
    bob = agent_config("bob")
    kw.bus.create_group("tasks", "bob", visibility_timeout_s=60)
    kw.bus.publish("tasks", {"from": "alice", "n": 1})
    kw.bus.publish("tasks", {"n": 2})  # published without the tools: no sender
    first = kw.bus.subscribe("tasks", "bob", "someone-else", max_messages=1)
    kw.bus.nack("tasks", "bob", first, error="crashed")
    got = read_json(call(read, bob, channel="tasks"))
    assert [(m["seq"], m["from"], m["attempt"], m["message"]) for m in got["messages"]] == [
        (1, "alice", 2, {"n": 1}),
        (2, None, 1, {"n": 2}),
    ]
    assert read_json(call(read, bob, channel="tasks"))["count"] == 0  # acked: read once
    assert kw.bus.groups("tasks")[0].pending == 0


def test_a_reader_does_not_miss_what_was_sent_before_its_first_read(kw: Klockwork) -> None:
    send, read, _ = bus_tools(kw)
    call(send, agent_config("alice"), channel="news", message="early")
    got = read_json(call(read, agent_config("bob"), channel="news"))
    assert [m["message"] for m in got["messages"]] == [{"text": "early"}]
    late_only = bus_tools(kw, start="new")[1]
    assert read_json(call(late_only, agent_config("carol"), channel="news"))["count"] == 0


def test_max_messages_limits_a_read(kw: Klockwork) -> None:
    send, read, _ = bus_tools(kw)
    for i in range(5):
        call(send, agent_config("alice"), channel="tasks", message={"i": i})
    first = read_json(call(read, agent_config("bob"), channel="tasks", max_messages=2))
    rest = read_json(call(read, agent_config("bob"), channel="tasks"))
    assert [m["message"]["i"] for m in first["messages"] + rest["messages"]] == [0, 1, 2, 3, 4]


def test_a_shared_group_splits_the_work(kw: Klockwork) -> None:
    send, _, _ = bus_tools(kw)
    _, read, _ = bus_tools(kw, group="workers")
    for i in range(4):
        call(send, agent_config("boss"), channel="jobs", message={"i": i})
    a = read_json(call(read, agent_config("w1"), channel="jobs", max_messages=2))["messages"]
    b = read_json(call(read, agent_config("w2"), channel="jobs", max_messages=5))["messages"]
    assert sorted(m["message"]["i"] for m in a + b) == [0, 1, 2, 3]
    assert len(a) == 2 and len(b) == 2
    [info] = kw.bus.groups("jobs")
    assert info.group == "workers" and info.pending == 0


def test_identity_comes_from_the_config_and_the_model_cannot_forge_it(kw: Klockwork) -> None:
    send, _, _ = bus_tools(kw)
    call(send, agent_config("alice"), channel="c", message={"x": 1, "from": "mallory"})
    call(send, {"metadata": {"lc_agent_name": "named"}}, channel="c", message="hi")
    fixed_send, fixed_read, _ = bus_tools(kw, agent_id="fixed")
    call(fixed_send, agent_config("alice"), channel="c", message="argument wins")
    assert [m.payload["from"] for m in kw.bus.peek("c")] == ["alice", "named", "fixed"]
    read_json(call(fixed_read, agent_config("alice"), channel="c"))
    assert [g.group for g in kw.bus.groups("c")] == ["fixed"]


def test_an_identity_outside_the_group_alphabet_still_reads(kw: Klockwork) -> None:
    send, read, _ = bus_tools(kw)
    call(send, agent_config("boss"), channel="c", message="hi")
    for agent in ("Agent Smith", "agent/one"):
        got = read_json(call(read, agent_config(agent), channel="c"))
        assert got["count"] == 1  # a group of its own, named after it
    names = sorted(g.group for g in kw.bus.groups("c"))
    assert len(names) == 2 and names[0].startswith("Agent_Smith-")
    assert names[1].startswith("agent_one-")


def test_only_the_allowed_channels_are_accepted(kw: Klockwork) -> None:
    send, read, wait = bus_tools(kw, channels=["tasks", "team.*"], wait_s=0.1)
    alice = agent_config("alice")
    for tool, args in (
        (send, {"channel": "secrets", "message": "x"}),
        (read, {"channel": "secrets"}),
        (wait, {"channels": ["tasks", "secrets"]}),
        (send, {"channel": "team", "message": "x"}),
    ):
        refused = call(tool, alice, **args)
        assert refused.status == "error"
        assert "is not a channel you may use (tasks, team.*)" in str(refused.content)
    assert read_json(call(send, alice, channel="team.red", message="ok"))["sent"]
    assert [c.channel for c in kw.bus.channels()] == ["team.red"]  # nothing else was touched


@pytest.mark.parametrize(
    ("tool_index", "args", "says"),
    [
        (0, {"channel": "bad name!", "message": "x"}, "'channel' a channel name is"),
        (0, {"channel": "tasks", "message": ["not", "an", "object"]}, "message"),
        (0, {"channel": "tasks", "message": {"big": "x" * (1 << 20)}}, "larger than"),
        (0, {"channel": "tasks"}, "message: Field required"),
        (1, {"channel": "tasks", "max_messages": 0}, "max_messages"),
        (1, {"channel": "tasks", "max_messages": "many"}, "max_messages"),
        (2, {"channels": []}, "names no channel"),
        (2, {"channels": ["a", "a"]}, "names a channel twice"),
        (2, {"channels": ["a"], "mode": "some"}, "mode"),
        (2, {"channels": ["a"], "timeout_s": -1}, "timeout_s"),
    ],
)
def test_bad_input_from_the_model_is_an_error_tool_message(
    kw: Klockwork, tool_index: int, args: dict[str, Any], says: str
) -> None:
    tool = bus_tools(kw, wait_s=0.1)[tool_index]
    refused = call(tool, agent_config("alice"), **args)
    assert refused.status == "error" and refused.tool_call_id == "c1"
    assert says in str(refused.content) and "did not run" in str(refused.content)
    assert kw.bus.channels() == []


def test_a_mistake_inside_an_agent_run_is_read_by_the_model_not_raised(kw: Klockwork) -> None:
    agent = create_agent(
        scripted(
            calls_tool("send_message", "a1", channel="elsewhere", message="x"),
            calls_tool("send_message", "a2", channel="tasks", message="x"),
            "ok",
        ),
        bus_tools(kw, channels=["tasks"]),
        name="alice",
    )
    state = agent.invoke({"messages": [("user", "go")]})
    first, second = tool_messages(state, "send_message")
    assert first.status == "error" and "elsewhere" in str(first.content)
    assert second.status == "success"
    assert [m.payload for m in kw.bus.peek("tasks")] == [{"text": "x", "from": "alice"}]


def test_wait_modes_and_a_timeout_cut_to_the_tools_limit(kw: Klockwork) -> None:
    send, _, wait = bus_tools(kw, wait_s=0.2)
    alice, bob = agent_config("alice"), agent_config("bob")
    start = time.monotonic()
    out = read_json(call(wait, bob, channels=["a", "b"], mode="all", timeout_s=3600))
    assert time.monotonic() - start < 2
    assert out == {"satisfied": False, "timed_out": True, "messages": {"a": [], "b": []}}
    call(send, alice, channel="a", message="1")
    out = read_json(call(wait, bob, channels=["a", "b"], mode="all"))
    assert out["timed_out"]  # a timed-out await consumes nothing...
    call(send, alice, channel="b", message="2")
    out = read_json(call(wait, bob, channels=["a", "b"], mode="all"))
    assert out["satisfied"] and [len(v) for v in out["messages"].values()] == [1, 1]
    for i in range(3):
        call(send, alice, channel="a", message=str(i))
    out = read_json(call(wait, bob, channels="a", mode="at_least", n=3))  # a lone name is forgiven
    assert out["satisfied"] and len(out["messages"]["a"]) == 3


def test_wait_wakes_when_another_agent_sends(kw: Klockwork) -> None:
    send, _, wait = bus_tools(kw, wait_s=10)
    read_json(call(wait, agent_config("bob"), channels=["x"], timeout_s=0))  # group exists now
    timer = threading.Timer(
        0.1, lambda: call(send, agent_config("alice"), channel="x", message="!")
    )
    timer.start()
    start = time.monotonic()
    out = read_json(call(wait, agent_config("bob"), channels=["x"]))
    assert out["satisfied"] and time.monotonic() - start < 5
    timer.join()


async def test_async_tools_and_two_async_agents(kw: Klockwork) -> None:
    send, read, wait = bus_tools(kw, wait_s=10)
    sent = await send.ainvoke({"channel": "c", "message": "hi"}, agent_config("alice"))
    assert json.loads(sent)["seq"] == 1
    got = json.loads(await read.ainvoke({"channel": "c"}, agent_config("bob")))
    assert got["messages"][0]["from"] == "alice"
    refused = await read.ainvoke(
        {"type": "tool_call", "id": "c9", "name": "read_messages", "args": {"channel": "x y"}},
        agent_config("bob"),
    )
    assert isinstance(refused, ToolMessage) and refused.status == "error"

    pinger = create_agent(
        scripted(
            calls_tool("send_message", "p1", channel="ping", message="ping"),
            calls_tool("wait_for_messages", "p2", channels=["pong"]),
            "got pong",
        ),
        [send, read, wait],
        name="pinger",
    )
    ponger = create_agent(
        scripted(
            calls_tool("wait_for_messages", "q1", channels=["ping"]),
            calls_tool("send_message", "q2", channel="pong", message="pong"),
            "sent pong",
        ),
        [send, read, wait],
        name="ponger",
    )
    a, b = await asyncio.wait_for(
        asyncio.gather(
            ponger.ainvoke({"messages": [("user", "go")]}),
            pinger.ainvoke({"messages": [("user", "go")]}),
        ),
        timeout=30,
    )
    pong = json.loads(str(tool_messages(b, "wait_for_messages")[0].content))
    assert pong["messages"]["pong"][0] == {
        "seq": 1,
        "id": pong["messages"]["pong"][0]["id"],
        "from": "ponger",
        "message": {"text": "pong"},
    }
    assert a["messages"][-1].content == "sent pong"
    assert isinstance(b["messages"][-1], AIMessage) and b["messages"][-1].content == "got pong"


def test_bad_options_raise_before_any_tool_is_made(kw: Klockwork) -> None:
    with pytest.raises(InvalidRequestError, match="channels"):
        bus_tools(kw, channels="tasks")
    with pytest.raises(InvalidRequestError, match="channels"):
        bus_tools(kw, channels=["bad name"])
    with pytest.raises(InvalidRequestError, match="group"):
        bus_tools(kw, group="two words")
    with pytest.raises(InvalidRequestError, match="wait_s"):
        bus_tools(kw, wait_s=-1)
    with pytest.raises(InvalidRequestError, match="start"):
        bus_tools(kw, start="latest")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="agent_id"):
        bus_tools(kw, agent_id=" padded ")
