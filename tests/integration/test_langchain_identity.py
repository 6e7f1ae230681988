"""Who a protected call leases as: agent_config, resolve_identity, and what tools see."""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.runnables.config import var_child_runnable_config
from langchain_core.tools import BaseTool, tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode

from klockwork import Klockwork
from klockwork.integrations.langchain import (
    KlockConflictError,
    agent_config,
    klock_protected,
    protect_tool,
    resolve_identity,
)


def test_agent_config_puts_identity_in_configurable_and_metadata() -> None:
    config = agent_config("writer", "s1", thread_id="t1", model="m")
    assert config["configurable"] == {
        "agent_id": "writer",
        "session_id": "s1",
        "thread_id": "t1",
        "model": "m",
    }
    assert config["metadata"] == {"agent_id": "writer", "session_id": "s1"}
    assert agent_config("writer") == {
        "configurable": {"agent_id": "writer"},
        "metadata": {"agent_id": "writer"},
    }
    with pytest.raises(ValueError, match="agent_id"):
        agent_config("")


def test_explicit_identity_wins_over_the_config() -> None:
    ident = resolve_identity(agent_config("cfg", "cfg-s"), agent_id="arg", session_id="arg-s")
    assert ident == ("arg", "arg-s", "argument", "argument")


_ID = st.none() | st.sampled_from(["", "a", "b-2"]) | st.integers(0, 2)


@settings(max_examples=300, deadline=None)
@given(
    conf_agent=_ID,
    conf_session=_ID,
    meta_agent=_ID,
    ctx_agent=_ID,
    ctx_session=_ID,
    top_level=st.booleans(),
    arg_agent=st.none() | st.just("arg"),
    arg_session=st.none() | st.just("arg-s"),
)
def test_the_short_way_for_a_plain_config_reads_what_the_merge_would(
    conf_agent: Any,
    conf_session: Any,
    meta_agent: Any,
    ctx_agent: Any,
    ctx_session: Any,
    top_level: bool,
    arg_agent: str | None,
    arg_session: str | None,
) -> None:
    """A dict config is read without ensure_config when its configurable names both ids."""

    def present(**ids: Any) -> dict[str, Any]:
        return {k: v for k, v in ids.items() if v is not None}

    config: dict[str, Any] = {
        "configurable": present(agent_id=conf_agent, session_id=conf_session),
        "metadata": present(agent_id=meta_agent),
    }
    if top_level:  # a key outside CONFIG_KEYS: ensure_config moves it into configurable
        config["agent_id"] = "top"
    context = {"configurable": present(agent_id=ctx_agent, session_id=ctx_session)}
    token = var_child_runnable_config.set(context)  # type: ignore[arg-type]
    try:
        fast = resolve_identity(config, agent_id=arg_agent, session_id=arg_session)
        merged = resolve_identity(
            MappingProxyType(config), agent_id=arg_agent, session_id=arg_session
        )
    finally:
        var_child_runnable_config.reset(token)
    assert (fast.agent_id, fast.agent_source, fast.session_source) == (
        merged.agent_id,
        merged.agent_source,
        merged.session_source,
    )
    if fast.session_source != "fresh":
        assert fast.session_id == merged.session_id


def test_configurable_wins_over_metadata() -> None:
    config = {
        "configurable": {"agent_id": "conf", "session_id": "conf-s"},
        "metadata": {"agent_id": "meta", "session_id": "meta-s", "lc_agent_name": "named"},
    }
    assert resolve_identity(config)[:2] == ("conf", "conf-s")


def test_metadata_identity_then_lc_agent_name() -> None:
    meta = resolve_identity({"metadata": {"agent_id": "meta", "lc_agent_name": "named"}})
    assert (meta.agent_id, meta.agent_source) == ("meta", "metadata")
    named = resolve_identity({"metadata": {"lc_agent_name": "researcher"}})
    assert (named.agent_id, named.agent_source) == ("researcher", "lc_agent_name")


def test_session_falls_back_to_thread_id() -> None:
    conf = resolve_identity({"configurable": {"agent_id": "a", "thread_id": "t1"}})
    assert (conf.session_id, conf.session_source) == ("t1", "thread_id")
    meta = resolve_identity({"metadata": {"thread_id": 42}})
    assert (meta.session_id, meta.session_source) == ("42", "thread_id")


def test_anonymous_calls_get_the_process_agent_and_a_fresh_session_each() -> None:
    first, second = resolve_identity(), resolve_identity()
    assert first.agent_id == second.agent_id == f"process-{os.getpid()}"
    assert first.agent_source == "anonymous"
    assert first.session_source == second.session_source == "fresh"
    assert first.session_id != second.session_id


def test_runtime_context_outside_a_graph_does_not_fail() -> None:
    assert resolve_identity({"configurable": {"x": 1}}).agent_source == "anonymous"


@dataclass
class Ctx:
    agent_id: str
    session_id: str | None = None


def run_in_tool_node(tool_obj: BaseTool, context: Any, config: dict[str, Any]) -> ToolMessage:
    builder = StateGraph(MessagesState, context_schema=type(context))
    builder.add_node("tools", ToolNode([tool_obj]))
    builder.add_edge(START, "tools")
    builder.add_edge("tools", END)
    call = {"name": tool_obj.name, "args": {"path": "/a"}, "id": "c1"}
    out = builder.compile().invoke(
        {"messages": [AIMessage("", tool_calls=[call])]}, context=context, config=config
    )
    message = out["messages"][-1]
    assert isinstance(message, ToolMessage)
    return message


def _parent(session_id: str) -> str:
    parent, sep, _ = session_id.rpartition("/call-")
    return parent if sep else session_id


def whoami_tool(kw: Klockwork) -> BaseTool:
    @tool
    @klock_protected("FILE:{path}", kw=kw, timeout_s=1.0)
    def whoami(path: str) -> str:
        """Report who holds the lease on the path."""
        leases = kw.leases.list(resource=f"FILE:{path}")
        # Each call leases in its own sub-session "<session>/call-<n>"; report
        # the session it runs inside (fresh anonymous sessions have no parent).
        (holder,) = {f"{lease.agent_id}/{_parent(lease.session_id)}" for lease in leases}
        return holder

    return whoami


def test_langgraph_runtime_context_gives_the_identity(kw: Klockwork) -> None:
    message = run_in_tool_node(
        whoami_tool(kw), Ctx("ctx-agent", "ctx-session"), {"configurable": {"thread_id": "t"}}
    )
    assert message.content == "ctx-agent/ctx-session"
    # With no session in the context, the thread id is the session; a dict context works too.
    message = run_in_tool_node(
        whoami_tool(kw), {"agent_id": "dict-agent"}, {"configurable": {"thread_id": "t9"}}
    )
    assert message.content == "dict-agent/t9"


def test_tools_lease_as_the_configured_identity(kw: Klockwork) -> None:
    whoami = whoami_tool(kw)
    assert whoami.invoke({"path": "/a"}, config=agent_config("w", "s")) == "w/s"
    assert whoami.invoke({"path": "/a"}, config={"metadata": {"agent_id": "m"}}).startswith(
        "m/call-"
    )
    named = {"metadata": {"lc_agent_name": "researcher", "thread_id": "t1"}}
    assert whoami.invoke({"path": "/a"}, config=named) == "researcher/t1"
    assert whoami.invoke({"path": "/a"}, config={"configurable": {"thread_id": "t2"}}) == (
        f"process-{os.getpid()}/t2"
    )


def test_protect_tool_identity_overrides_the_config(kw: Klockwork) -> None:
    @tool
    def whoami(path: str) -> str:
        """Report who holds the lease on the path."""
        (lease,) = kw.leases.list(resource=f"FILE:{path}")
        return f"{lease.agent_id}/{_parent(lease.session_id)}"

    fixed = protect_tool(whoami, "FILE:{path}", kw=kw, agent_id="fixed", session_id="fs")
    assert fixed.invoke({"path": "/a"}, config=agent_config("cfg", "cs")) == "fixed/fs"


def test_nested_protection_reuses_the_enclosing_session(kw: Klockwork) -> None:
    # Protected below @tool *and* wrapped again: the inner call must not wait for
    # the outer one, even with no session anywhere.
    stacked = protect_tool(whoami_tool(kw), "FILE:{path}", kw=kw, timeout_s=0.2)
    out = stacked.invoke({"path": "/a"}, config={"metadata": {"agent_id": "solo"}})
    assert out.startswith("solo/call-")  # both leases (outer and inner) in one session


def test_a_thread_started_inside_a_protected_call_gets_its_own_session(kw: Klockwork) -> None:
    seen: list[str] = []

    @klock_protected("FILE:/inner", kw=kw, timeout_s=0.05, on_conflict="raise")
    def inner() -> str:
        return "inner ran"

    @klock_protected("FILE:/inner", kw=kw)
    def outer() -> None:
        worker = threading.Thread(target=lambda: seen.append(_call(inner)))
        worker.start()
        worker.join()

    outer()
    assert seen == ["KlockConflictError"]  # parallel work is excluded, not reentrant


def _call(fn: Any) -> str:
    try:
        return str(fn())
    except Exception as exc:
        return type(exc).__name__


def test_each_call_leases_in_its_own_sub_session(kw: Klockwork) -> None:
    @tool
    @klock_protected("FILE:{path}", kw=kw)
    def session_of(path: str) -> str:
        """Report the session of the lease on the path."""
        (lease,) = kw.leases.list(resource=f"FILE:{path}")
        return lease.session_id

    first = session_of.invoke({"path": "/a"}, config=agent_config("w", "s"))
    second = session_of.invoke({"path": "/a"}, config=agent_config("w", "s"))
    assert first.startswith("s/call-") and second.startswith("s/call-")
    assert first != second


def test_a_call_is_reentrant_with_what_its_session_holds(kw: Klockwork) -> None:
    # The thread itself holds the file (e.g. a graph-level lease); its tool calls
    # run inside that session and may use it, instead of waiting for themselves.
    kw.leases.acquire("w", "t1", ("FILE:/a", "MUTATES"), 5_000)
    whoami = whoami_tool(kw)
    config = {"configurable": {"agent_id": "w", "thread_id": "t1"}}
    # Granted at once (its timeout is 1 s, the thread's lease lasts 5 s).
    assert whoami.invoke({"path": "/a"}, config=config) == "w/t1"
    # ...but another agent, or another thread of the same agent, is excluded.
    other = {"configurable": {"agent_id": "w", "thread_id": "t2"}}
    with pytest.raises(KlockConflictError, match="Resource busy"):
        whoami_tool(kw).invoke({"path": "/a"}, config=other)


def test_parallel_calls_of_one_agent_in_one_thread_exclude_each_other(kw: Klockwork) -> None:
    # The lost update this library exists to prevent, from a single agent: one
    # model turn with two parallel calls that read-modify-write the same file.
    content = {"/notes.md": ""}
    inside = threading.Barrier(2, timeout=1.0)

    @tool
    @klock_protected("FILE:{path}", kw=kw, timeout_s=5.0)
    def append_line(path: str, line: str) -> str:
        """Append a line to a file."""
        text = content[path]
        with contextlib.suppress(threading.BrokenBarrierError):
            inside.wait()  # both inside at once would be a double grant
        content[path] = text + line + "\n"
        return "ok"

    config = {"configurable": {"agent_id": "solo", "thread_id": "t1"}}
    threads = [
        threading.Thread(target=append_line.invoke, args=({"path": "/notes.md", "line": x}, config))
        for x in ("a", "b")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(content["/notes.md"].splitlines()) == ["a", "b"]


def _child_call_id(queue: Any) -> None:
    from klockwork.integrations.langchain import identity

    queue.put(identity._new_call_id())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_process_never_reuses_its_parents_call_ids() -> None:
    # Equal call ids in two processes would put their calls in one session:
    # reentrant with each other, so both would be granted the same file.
    import multiprocessing

    from klockwork.integrations.langchain import identity

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_call_id, args=(queue,))
    child.start()
    theirs = queue.get(timeout=10)
    child.join(10)
    ours = identity._new_call_id()
    assert theirs.rsplit("-", 1)[0] != ours.rsplit("-", 1)[0]  # different process tokens
