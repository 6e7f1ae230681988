"""Lease nodes in LangGraph graphs: lease_node, release_node, leases_released, ensure_leases."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from klockwork import Klockwork
from klockwork.core.errors import InvalidRequestError, LeaseLostError, LeaseTimeoutError
from klockwork.integrations.langgraph import (
    LEASES_KEY,
    LeasesState,
    aensure_leases,
    ensure_leases,
    lease_node,
    leases_released,
    merge_leases,
    release_node,
)

RESOURCE = "FILE:/repo/auth"


class State(LeasesState, total=False):
    seen: list[Any]


@pytest.fixture(params=["memory", "sqlite"])
def kw(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Klockwork]:
    if request.param == "memory":
        engine = Klockwork()
    else:
        engine = Klockwork.open(f"sqlite:///{tmp_path / 'kw.db'}")
    yield engine
    engine.close()


def cfg(thread: str, agent: str = "alice") -> RunnableConfig:
    return {"configurable": {"thread_id": thread, "agent_id": agent}}


def linear(kw: Klockwork, work: Callable[..., Any], **lease_args: Any) -> Any:
    builder = StateGraph(State)
    builder.add_node("lease", lease_node(kw, lease_args.pop("intents", RESOURCE), **lease_args))
    builder.add_node("work", work)
    builder.add_node("release", release_node(kw))
    builder.add_edge(START, "lease")
    builder.add_edge("lease", "work")
    builder.add_edge("work", "release")
    builder.add_edge("release", END)
    return builder.compile(checkpointer=InMemorySaver())


def test_lease_work_release_with_the_fencing_token_in_the_state(kw: Klockwork) -> None:
    def work(state: State) -> dict[str, Any]:
        entry = state[LEASES_KEY][RESOURCE]
        live = kw.leases.get(entry["lease_id"])
        assert live is not None and live.state.value == "ACTIVE"
        kw.leases.check_fencing(RESOURCE, entry["fencing_token"])
        return {"seen": [dict(entry)]}

    out = linear(kw, work).invoke({}, cfg("t1"))
    (entry,) = out["seen"]
    assert entry["resource"] == RESOURCE and entry["predicate"] == "MUTATES"
    assert entry["agent_id"] == "alice" and entry["session_id"] == "t1"
    assert entry["fencing_token"] > 0 and entry["reacquired"] == 0
    assert entry["previous_token"] is None
    assert out[LEASES_KEY] == {}  # released and removed from the state
    assert kw.leases.list() == []


def test_intents_from_the_state_and_manifests(kw: Klockwork) -> None:
    seen: list[Any] = []

    def work(state: State) -> dict[str, Any]:
        seen.append(sorted(state[LEASES_KEY]))
        return {}

    graph = linear(
        kw,
        work,
        intents=lambda s: [f"FILE:/repo/{s['seen'][0]}", ("DB:users", "CONSUMES")],
    )
    graph.invoke({"seen": ["a/./b"]}, cfg("t1"))
    assert seen == [["DB:users", "FILE:/repo/a/b"]]
    assert kw.leases.list() == []


def test_bad_options_fail_when_the_graph_is_built(kw: Klockwork) -> None:
    with pytest.raises(InvalidRequestError):
        lease_node(kw, "not-a-resource")
    with pytest.raises(InvalidRequestError):
        lease_node(kw, RESOURCE, ttl_ms=0)
    with pytest.raises(InvalidRequestError):
        lease_node(kw, RESOURCE, on_lost="ignore")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        lease_node("kw", RESOURCE)  # type: ignore[arg-type]


def test_two_concurrent_runs_on_one_resource_are_serialised(kw: Klockwork) -> None:
    intervals: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def work(state: State) -> dict[str, Any]:
        start = time.monotonic()
        time.sleep(0.15)
        with lock:
            intervals.append(
                (start, time.monotonic(), state[LEASES_KEY][RESOURCE]["fencing_token"])
            )
        return {}

    graph = linear(kw, work, timeout_s=20)
    errors: list[BaseException] = []

    def run(thread: str, agent: str) -> None:
        try:
            graph.invoke({}, cfg(thread, agent))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"t{i}", f"agent-{i}")) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    intervals.sort()
    assert len(intervals) == 3
    for (_, end, _), (start, _, _) in itertools.pairwise(intervals):
        assert end <= start, intervals
    tokens = [token for *_, token in intervals]
    assert tokens == sorted(tokens) and len(set(tokens)) == 3
    assert kw.leases.list() == []


def test_a_rerun_of_the_lease_step_grants_nothing_twice(kw: Klockwork) -> None:
    lease = lease_node(kw, RESOURCE)
    runs: list[str] = []

    def lease_and_ask(state: State, config: RunnableConfig) -> dict[str, Any]:
        update = lease.invoke(state, config)  # runs again when the step resumes
        runs.append(update[LEASES_KEY][RESOURCE]["lease_id"])
        interrupt("go on?")
        return update

    builder = StateGraph(State)
    builder.add_node("lease", lease_and_ask)
    builder.add_node("release", release_node(kw))
    builder.add_edge(START, "lease")
    builder.add_edge("lease", "release")
    graph = builder.compile(checkpointer=InMemorySaver())
    config = cfg("t1")
    graph.invoke({}, config)
    assert len(kw.leases.list()) == 1
    out = graph.invoke(Command(resume="yes"), config)
    assert len(runs) == 2 and runs[0] == runs[1]  # the first grant, adopted
    assert out[LEASES_KEY] == {} and kw.leases.list() == []


def test_a_lease_already_in_the_state_is_kept(kw: Klockwork) -> None:
    node = lease_node(kw, RESOURCE)
    config = cfg("t1")
    first = node.invoke({}, config)
    again = node.invoke(first, config)
    assert again == first
    assert len(kw.leases.list()) == 1
    release_node(kw).invoke(first, config)
    assert kw.leases.list() == []


def paused_graph(kw: Klockwork, on_lost: str = "reacquire") -> Any:
    """lease → review (interrupt) → work (ensure_leases) → release."""

    def review(state: State) -> dict[str, Any]:
        interrupt("review the plan")
        return {}

    def work(state: State, config: RunnableConfig) -> dict[str, Any]:
        update = ensure_leases(kw, state, config, on_lost=on_lost)  # type: ignore[arg-type]
        entry = update[LEASES_KEY][RESOURCE]
        kw.leases.check_fencing(RESOURCE, entry["fencing_token"])
        return {**update, "seen": [dict(entry)]}

    builder = StateGraph(State)
    builder.add_node("lease", lease_node(kw, RESOURCE, ttl_ms=600))
    builder.add_node("review", review)
    builder.add_node("work", work)
    builder.add_node("release", release_node(kw))
    builder.add_edge(START, "lease")
    builder.add_edge("lease", "review")
    builder.add_edge("review", "work")
    builder.add_edge("work", "release")
    return builder.compile(checkpointer=InMemorySaver())


def test_a_pause_releases_and_the_resume_reacquires_with_a_new_token(kw: Klockwork) -> None:
    graph, config = paused_graph(kw), cfg("t1")
    with leases_released(kw) as scope:
        graph.invoke({}, config)
        assert len(scope.lease_ids) == 1
    old = graph.get_state(config).values[LEASES_KEY][RESOURCE]
    assert kw.leases.list() == []  # the pause holds nothing
    # Someone else works on the resource meanwhile.
    with kw.leases.hold("bob", "s-bob", (RESOURCE, "MUTATES")) as held:
        bobs = held.lease.fencing_token
    with leases_released(kw):
        out = graph.invoke(Command(resume="ok"), config)
    (entry,) = out["seen"]
    assert entry["reacquired"] == 1 and entry["previous_token"] == old["fencing_token"]
    assert entry["fencing_token"] > bobs > old["fencing_token"]
    assert out[LEASES_KEY] == {} and kw.leases.list() == []


def test_on_lost_fail_routes_to_lease_lost_error(kw: Klockwork) -> None:
    graph, config = paused_graph(kw, on_lost="fail"), cfg("t1")
    graph.invoke({}, config)  # no scope: the lease stays held and renewed over the pause
    entry = graph.get_state(config).values[LEASES_KEY][RESOURCE]
    assert kw.leases.get(entry["lease_id"]).state.value == "ACTIVE"  # type: ignore[union-attr]
    kw.leases.revoke(entry["lease_id"], "admin")
    with pytest.raises(LeaseLostError, match="no longer held"):
        graph.invoke(Command(resume="ok"), config)


def test_a_lease_kept_over_a_pause_is_not_reacquired(kw: Klockwork) -> None:
    graph, config = paused_graph(kw), cfg("t1")
    graph.invoke({}, config)
    old = graph.get_state(config).values[LEASES_KEY][RESOURCE]
    time.sleep(0.9)  # longer than the ttl: the renewer kept it
    out = graph.invoke(Command(resume="ok"), config)
    (entry,) = out["seen"]
    assert entry["lease_id"] == old["lease_id"] and entry["reacquired"] == 0
    assert kw.leases.list() == []


def test_resume_in_a_new_process_after_the_lease_expired(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'kw.db'}"
    saver = InMemorySaver()
    config = cfg("t1")
    first = Klockwork.open(url)
    graph = paused_graph(first)
    graph.checkpointer = saver
    graph.invoke({}, config)
    old = graph.get_state(config).values[LEASES_KEY][RESOURCE]
    first.close()  # the process is gone: nobody renews the lease
    time.sleep(0.8)
    second = Klockwork.open(url)
    try:
        again = paused_graph(second)
        again.checkpointer = saver
        out = again.invoke(Command(resume="ok"), config)
        (entry,) = out["seen"]
        assert entry["reacquired"] == 1 and entry["fencing_token"] > old["fencing_token"]
        assert second.leases.list() == []
    finally:
        second.close()


def test_a_failing_run_inside_the_scope_releases_its_leases(kw: Klockwork) -> None:
    def work(state: State) -> dict[str, Any]:
        raise RuntimeError("boom")

    graph = linear(kw, work)
    with pytest.raises(RuntimeError, match="boom"), leases_released(kw):
        graph.invoke({}, cfg("t1"))
    assert kw.leases.list() == []
    # Without the scope the lease outlives the failure, until released by hand.
    config = cfg("t2")
    with pytest.raises(RuntimeError, match="boom"):
        graph.invoke({}, config)
    assert len(kw.leases.list()) == 1
    release_node(kw).invoke(graph.get_state(config).values, config)
    assert kw.leases.list() == []


def test_the_lease_is_renewed_while_the_run_goes_on(kw: Klockwork) -> None:
    def work(state: State) -> dict[str, Any]:
        entry = state[LEASES_KEY][RESOURCE]
        time.sleep(0.8)  # several ttls
        live = kw.leases.get(entry["lease_id"])
        assert live is not None and live.state.value == "ACTIVE"
        assert live.expires_at > entry["expires_at"]
        return {}

    linear(kw, work, ttl_ms=300).invoke({}, cfg("t1"))
    assert kw.leases.list() == []


def test_a_conflict_past_the_timeout_fails_the_node(kw: Klockwork) -> None:
    graph = linear(kw, lambda s: {}, timeout_s=0.2)
    hold = kw.leases.hold("aaa-older", "s0", (RESOURCE, "MUTATES"))
    with hold, pytest.raises(LeaseTimeoutError):
        graph.invoke({}, cfg("t1", "zed"))
    assert kw.leases.list() == []


def test_parallel_lease_nodes_compose_and_release_some(kw: Klockwork) -> None:
    seen: list[Any] = []
    builder = StateGraph(State)
    builder.add_node("a", lease_node(kw, "FILE:/a"))
    builder.add_node("b", lease_node(kw, ("DB:b", "CONSUMES")))
    builder.add_node("work", lambda s: seen.append(sorted(s[LEASES_KEY])) or {})
    builder.add_node("drop_a", release_node(kw, resources=["FILE:/a/"]))
    builder.add_node("check", lambda s: seen.append(sorted(s[LEASES_KEY])) or {})
    builder.add_node("release", release_node(kw))
    builder.add_edge(START, "a")
    builder.add_edge(START, "b")
    builder.add_edge(["a", "b"], "work")
    builder.add_edge("work", "drop_a")
    builder.add_edge("drop_a", "check")
    builder.add_edge("check", "release")
    out = builder.compile(checkpointer=InMemorySaver()).invoke({}, cfg("t1"))
    assert seen == [["DB:b", "FILE:/a"], ["DB:b"]]
    assert out[LEASES_KEY] == {} and kw.leases.list() == []


def test_merge_leases_removes_with_none() -> None:
    left = {"A": {"lease_id": "1"}, "B": {"lease_id": "2"}}
    assert merge_leases(left, {"A": None, "C": {"lease_id": "3"}}) == {
        "B": {"lease_id": "2"},
        "C": {"lease_id": "3"},
    }
    assert merge_leases(None, None) == {}


def test_async_graph(kw: Klockwork) -> None:
    async def work(state: State, config: RunnableConfig) -> dict[str, Any]:
        update = await aensure_leases(kw, state, config)
        return {**update, "seen": [update[LEASES_KEY][RESOURCE]["fencing_token"]]}

    async def fails(state: State) -> dict[str, Any]:
        raise RuntimeError("boom")

    async def main() -> None:
        out = await linear(kw, work).ainvoke({}, cfg("t1"))
        assert out["seen"][0] > 0 and out[LEASES_KEY] == {}
        assert kw.leases.list() == []
        with pytest.raises(RuntimeError):
            async with leases_released(kw):
                await linear(kw, fails).ainvoke({}, cfg("t2"))
        assert kw.leases.list() == []

    asyncio.run(main())


def test_async_runs_on_one_resource_are_serialised(kw: Klockwork) -> None:
    intervals: list[tuple[float, float]] = []

    async def work(state: State) -> dict[str, Any]:
        start = time.monotonic()
        await asyncio.sleep(0.1)
        intervals.append((start, time.monotonic()))
        return {}

    graph = linear(kw, work, timeout_s=20)

    async def main() -> None:
        async with leases_released(kw):
            await asyncio.gather(*(graph.ainvoke({}, cfg(f"t{i}", f"a{i}")) for i in range(3)))

    asyncio.run(main())
    intervals.sort()
    assert len(intervals) == 3
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert end <= start, intervals
    assert kw.leases.list() == []
