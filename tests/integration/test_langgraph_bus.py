"""Bus nodes in LangGraph graphs: publish_node, await_node, timeouts, re-runs, async."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypedDict

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from klockwork import Klockwork
from klockwork.core.errors import InvalidRequestError
from klockwork.integrations.langgraph import (
    BUS_STATE_KEYS,
    MESSAGES_KEY,
    PUBLISHED_KEY,
    TIMED_OUT_KEY,
    BusState,
    await_node,
    publish_node,
)


class State(TypedDict, total=False):
    topic: str
    route: str
    answer: str
    klockwork_published: dict[str, dict[str, Any]]
    klockwork_messages: dict[str, list[dict[str, Any]]]
    timed_out: bool


@pytest.fixture(params=["memory", "sqlite"])
def kw(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Klockwork]:
    if request.param == "memory":
        engine = Klockwork()
    else:
        engine = Klockwork.open(f"sqlite:///{tmp_path / 'kw.db'}")
    yield engine
    engine.close()


def lag(kw: Klockwork, channel: str, group: str) -> tuple[int, int]:
    (info,) = kw.bus.groups(channel)
    assert info.group == group
    return info.pending, info.lag


def payloads(state: Any, channel: str) -> list[dict[str, Any]]:
    return [m["payload"] for m in state[MESSAGES_KEY][channel]]


def pub_then_wait(kw: Klockwork, **compile_args: Any) -> Any:
    builder = StateGraph(State)
    builder.add_node("pub", publish_node(kw, "jobs", lambda s: {"topic": s["topic"]}))
    builder.add_node("wait", await_node(kw, ["jobs"], group="workers", wait_s=5))
    builder.add_edge(START, "pub")
    builder.add_edge("pub", "wait")
    builder.add_edge("wait", END)
    return builder.compile(checkpointer=InMemorySaver(), **compile_args)


def test_the_state_keys_are_named_once() -> None:
    assert BUS_STATE_KEYS == (PUBLISHED_KEY, MESSAGES_KEY, TIMED_OUT_KEY)
    assert BUS_STATE_KEYS == ("klockwork_published", "klockwork_messages", "timed_out")
    assert set(BusState.__annotations__) == set(BUS_STATE_KEYS)


# -- a graph that publishes then awaits ---------------------------------------------------------
def test_a_graph_publishes_then_awaits(kw: Klockwork) -> None:
    kw.bus.create_group("jobs", "workers")
    graph = pub_then_wait(kw)
    out = graph.invoke({"topic": "build"}, {"configurable": {"thread_id": "t1"}})
    (message,) = kw.bus.peek("jobs")
    assert out[PUBLISHED_KEY] == {"jobs": {"id": message.id, "seq": 1}}
    assert out[TIMED_OUT_KEY] is False
    (got,) = out[MESSAGES_KEY]["jobs"]
    assert got == {
        "id": message.id,
        "channel": "jobs",
        "seq": 1,
        "payload": {"topic": "build"},
        "published_at": message.published_at,
        "visible_at": message.visible_at,
    }
    assert lag(kw, "jobs", "workers") == (0, 0)  # consumed for the group


def test_publish_nodes_add_up_and_payload_defaults_to_empty(kw: Klockwork) -> None:
    builder = StateGraph(State)
    builder.add_node("a", publish_node(kw, "left"))
    builder.add_node("b", publish_node(kw, "right", {"fixed": True}))
    builder.add_edge(START, "a")
    builder.add_edge("a", "b")
    builder.add_edge("b", END)
    out = builder.compile().invoke({})
    assert set(out[PUBLISHED_KEY]) == {"left", "right"}
    assert kw.bus.peek("left")[0].payload == {}
    assert kw.bus.peek("right")[0].payload == {"fixed": True}


def test_parallel_publishes_merge_through_the_bus_state_reducer(kw: Klockwork) -> None:
    class Merged(BusState, total=False):
        topic: str

    builder = StateGraph(Merged)
    builder.add_node("a", publish_node(kw, "left"))
    builder.add_node("b", publish_node(kw, "right"))
    builder.add_edge(START, "a")
    builder.add_edge(START, "b")
    builder.add_edge("a", END)
    builder.add_edge("b", END)
    out = builder.compile().invoke({"topic": "x"})
    assert set(out[PUBLISHED_KEY]) == {"left", "right"}


# -- timeouts --------------------------------------------------------------------------------------
def routed(kw: Klockwork, **await_args: Any) -> Any:
    builder = StateGraph(State)
    builder.add_node("wait", await_node(kw, **await_args))
    builder.add_node("proceed", lambda s: {"route": "proceed"})
    builder.add_node("escalate", lambda s: {"route": "escalate"})
    builder.add_edge(START, "wait")
    builder.add_conditional_edges(
        "wait", lambda s: "escalate" if s["timed_out"] else "proceed", ["escalate", "proceed"]
    )
    builder.add_edge("proceed", END)
    builder.add_edge("escalate", END)
    return builder.compile(checkpointer=InMemorySaver())


def test_a_timeout_routes_the_graph(kw: Klockwork) -> None:
    kw.bus.create_group("replies", "bot")
    graph = routed(kw, channels=["replies"], group="bot", wait_s=0.05)
    late = graph.invoke({}, {"configurable": {"thread_id": "t1"}})
    assert late["route"] == "escalate" and late[TIMED_OUT_KEY] is True
    assert late[MESSAGES_KEY] == {"replies": []}

    kw.bus.publish("replies", {"ok": True})
    done = graph.invoke({}, {"configurable": {"thread_id": "t2"}})
    assert done["route"] == "proceed" and done[TIMED_OUT_KEY] is False
    assert payloads(done, "replies") == [{"ok": True}]


def test_a_timed_out_await_consumes_nothing(kw: Klockwork) -> None:
    kw.bus.create_group("a", "g")
    kw.bus.create_group("b", "g")
    kw.bus.publish("a", {"half": 1})
    graph = routed(kw, channels=["a", "b"], mode="all", group="g", wait_s=0.05)
    out = graph.invoke({}, {"configurable": {"thread_id": "t1"}})
    assert out["route"] == "escalate"
    assert payloads(out, "a") == [{"half": 1}]  # seen, and handed back
    assert sum(lag(kw, "a", "g")) == 1  # still the group's: waiting to be redelivered
    kw.bus.publish("b", {"half": 2})
    out = graph.invoke({}, {"configurable": {"thread_id": "t2"}})
    assert out["route"] == "proceed"
    assert payloads(out, "a") == [{"half": 1}] and payloads(out, "b") == [{"half": 2}]
    assert lag(kw, "a", "g") == (0, 0) and lag(kw, "b", "g") == (0, 0)


def test_without_a_group_the_node_waits_for_new_messages_and_consumes_nothing(
    kw: Klockwork,
) -> None:
    kw.bus.publish("news", {"old": True})
    node = await_node(kw, "news", wait_s=0.05)
    assert node.invoke({})[TIMED_OUT_KEY] is True  # published before the wait began

    async def main() -> dict[str, Any]:
        waiting = asyncio.ensure_future(node.ainvoke({}))
        await asyncio.sleep(0.02)
        await kw.bus.apublish("news", {"new": True})
        return await waiting

    node = await_node(kw, "news", wait_s=5)
    out = asyncio.run(main())
    assert out[TIMED_OUT_KEY] is False and payloads(out, "news") == [{"new": True}]


# -- re-runs: one publish, one consumption ---------------------------------------------------------
STEP: RunnableConfig = {"configurable": {"thread_id": "t1", "checkpoint_ns": "work:task-1"}}


def test_running_a_step_again_publishes_once_and_consumes_once(kw: Klockwork) -> None:
    kw.bus.create_group("jobs", "workers")
    pub = publish_node(kw, "jobs", {"n": 1})
    first = pub.invoke({}, STEP)
    again = pub.invoke({}, STEP)
    assert first == again and len(kw.bus.peek("jobs")) == 1

    wait = await_node(kw, ["jobs"], group="workers", wait_s=1)
    got = wait.invoke({}, STEP)
    kw.bus.publish("jobs", {"n": 2})  # arrives between the run and its re-run
    assert wait.invoke({}, STEP) == got
    assert payloads(got, "jobs") == [{"n": 1}]
    assert lag(kw, "jobs", "workers") == (0, 1)  # {"n": 2} is still the group's

    other: RunnableConfig = {"configurable": {"thread_id": "t1", "checkpoint_ns": "work:task-2"}}
    assert payloads(wait.invoke({}, other), "jobs") == [{"n": 2}]  # another step: anew
    assert len(kw.bus.peek("jobs")) == 2
    assert pub.invoke({}, other)[PUBLISHED_KEY]["jobs"]["seq"] == 3


def test_an_explicit_key_wins_and_no_thread_means_no_key(kw: Klockwork) -> None:
    keyed = publish_node(kw, "jobs", {"n": 1}, key="only-once")
    assert keyed.invoke({}) == keyed.invoke({}, STEP)
    plain = publish_node(kw, "jobs", {"n": 2})
    plain.invoke({})
    plain.invoke({})  # nothing to resume: two calls, two messages
    assert [m.payload["n"] for m in kw.bus.peek("jobs")] == [1, 2, 2]


def work_graph(kw: Klockwork) -> Any:
    """One node that publishes, awaits, then asks a human: a resume re-runs all of it."""
    pub = publish_node(kw, "requests", lambda s: {"topic": s["topic"]})
    wait = await_node(kw, ["replies"], group="bot", wait_s=5)

    def work(state: State, config: RunnableConfig) -> dict[str, Any]:
        update = {**pub.invoke(state, config), **wait.invoke(state, config)}
        answer = interrupt({"seen": payloads(update, "replies")})
        return {**update, "answer": answer}

    builder = StateGraph(State)
    builder.add_node("work", work)
    builder.add_edge(START, "work")
    builder.add_edge("work", END)
    return builder.compile(checkpointer=InMemorySaver())


def test_a_resumed_node_does_not_publish_or_consume_twice(kw: Klockwork) -> None:
    kw.bus.create_group("replies", "bot")
    kw.bus.publish("replies", {"r": 1})
    graph = work_graph(kw)
    run: RunnableConfig = {"configurable": {"thread_id": "t1"}}
    paused = graph.invoke({"topic": "x"}, run)
    assert paused["__interrupt__"][0].value == {"seen": [{"r": 1}]}
    kw.bus.publish("replies", {"r": 2})  # while the graph is paused

    done = graph.invoke(Command(resume="ok"), run)
    assert done["answer"] == "ok"
    assert payloads(done, "replies") == [{"r": 1}]  # the first run's messages, again
    assert len(kw.bus.peek("requests")) == 1  # published once
    assert done[PUBLISHED_KEY]["requests"]["seq"] == 1
    assert lag(kw, "replies", "bot") == (0, 1)  # {"r": 2} not consumed by the re-run


def test_interrupting_after_the_await_node_and_resuming(kw: Klockwork) -> None:
    kw.bus.create_group("jobs", "workers")
    graph = pub_then_wait(kw, interrupt_after=["wait"])
    run: RunnableConfig = {"configurable": {"thread_id": "t1"}}
    paused = graph.invoke({"topic": "a"}, run)
    assert payloads(paused, "jobs") == [{"topic": "a"}]
    kw.bus.publish("jobs", {"topic": "later"})
    done = graph.invoke(None, run)
    assert done[MESSAGES_KEY] == paused[MESSAGES_KEY]
    assert len(kw.bus.peek("jobs")) == 2  # ours and the later one: nothing twice
    assert lag(kw, "jobs", "workers") == (0, 1)


def test_a_step_that_failed_after_publishing_publishes_once_when_run_again(
    kw: Klockwork,
) -> None:
    pub = publish_node(kw, "events", {"e": 1})
    failures = [RuntimeError("crash after the publish")]

    def flaky(state: State, config: RunnableConfig) -> dict[str, Any]:
        update = pub.invoke(state, config)
        if failures:
            raise failures.pop()
        return update

    builder = StateGraph(State)
    builder.add_node("flaky", flaky)
    builder.add_edge(START, "flaky")
    builder.add_edge("flaky", END)
    graph = builder.compile(checkpointer=InMemorySaver())
    run: RunnableConfig = {"configurable": {"thread_id": "t1"}}
    with pytest.raises(RuntimeError, match="crash"):
        graph.invoke({}, run)
    out = graph.invoke(None, run)  # the failed step runs again
    assert out[PUBLISHED_KEY]["events"]["seq"] == 1
    assert len(kw.bus.peek("events")) == 1


# -- async graphs ----------------------------------------------------------------------------------
def test_an_async_graph_publishes_awaits_and_resumes_without_repeats(kw: Klockwork) -> None:
    kw.bus.create_group("jobs", "workers")
    kw.bus.create_group("replies", "bot")
    kw.bus.publish("replies", {"r": 1})

    def sync_only(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an async graph must use the async twins")

    async def main() -> tuple[Any, Any, Any]:
        out = await pub_then_wait(kw).ainvoke({"topic": "a"}, {"configurable": {"thread_id": "a"}})
        pub = publish_node(kw, "requests", {"q": 1})
        wait = await_node(kw, ["replies"], group="bot", wait_s=5)

        async def work(state: State, config: RunnableConfig) -> dict[str, Any]:
            update = {**await pub.ainvoke(state, config), **await wait.ainvoke(state, config)}
            return {**update, "answer": interrupt("go on?")}

        builder = StateGraph(State)
        builder.add_node("work", work)
        builder.add_edge(START, "work")
        builder.add_edge("work", END)
        graph = builder.compile(checkpointer=InMemorySaver())
        run: RunnableConfig = {"configurable": {"thread_id": "b"}}
        paused = await graph.ainvoke({}, run)
        await kw.bus.apublish("replies", {"r": 2})
        done = await graph.ainvoke(Command(resume="yes"), run)
        return out, paused, done

    mp = pytest.MonkeyPatch()
    with mp.context() as patched:
        patched.setattr(kw.bus, "publish", sync_only)
        patched.setattr(kw.bus, "await_channels", sync_only)
        out, paused, done = asyncio.run(main())
    assert payloads(out, "jobs") == [{"topic": "a"}] and out[TIMED_OUT_KEY] is False
    assert "__interrupt__" in paused
    assert done["answer"] == "yes" and payloads(done, "replies") == [{"r": 1}]
    assert len(kw.bus.peek("requests")) == 1
    assert lag(kw, "replies", "bot") == (0, 1)


def test_an_async_await_times_out(kw: Klockwork) -> None:
    graph = routed(kw, channels=["replies"], group="bot", wait_s=0.05)
    out = asyncio.run(graph.ainvoke({}, {"configurable": {"thread_id": "t"}}))
    assert out["route"] == "escalate" and out[TIMED_OUT_KEY] is True


# -- bad options ----------------------------------------------------------------------------------
def test_bad_options_are_refused_when_the_node_is_built(kw: Klockwork) -> None:
    with pytest.raises(InvalidRequestError, match="kw"):
        publish_node(object(), "jobs")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="channel"):
        publish_node(kw, "no spaces")
    with pytest.raises(InvalidRequestError, match="payload"):
        publish_node(kw, "jobs", ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="payload"):
        publish_node(kw, "jobs", {"x": object()})
    with pytest.raises(InvalidRequestError, match="key"):
        publish_node(kw, "jobs", key="")
    with pytest.raises(InvalidRequestError, match="channels"):
        await_node(kw, [])
    with pytest.raises(InvalidRequestError, match="mode"):
        await_node(kw, ["a"], mode="some")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="n"):
        await_node(kw, ["a"], n=0)
    with pytest.raises(InvalidRequestError, match="wait_s"):
        await_node(kw, ["a"], wait_s=-1)
    with pytest.raises(InvalidRequestError, match="group"):
        await_node(kw, ["a"], group="no spaces")
    with pytest.raises(InvalidRequestError, match="consumer"):
        await_node(kw, ["a"], consumer="c")  # a consumer without a group


def test_a_payload_callable_returning_a_non_object_fails_when_the_node_runs(
    kw: Klockwork,
) -> None:
    node = publish_node(kw, "jobs", lambda s: ["x"])  # type: ignore[arg-type,return-value]
    with pytest.raises(InvalidRequestError, match="payload"):
        node.invoke({})
    assert kw.bus.peek("jobs") == []
