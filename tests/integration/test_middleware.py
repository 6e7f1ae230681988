"""KlockworkMiddleware: gates, leases and approvals around a real create_agent's tool calls."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command
from lc_helpers import scripted
from pydantic import ValidationError

from klockwork import Klockwork
from klockwork.core.clock import ManualClock
from klockwork.core.errors import InvalidRequestError, NotAnApproverError
from klockwork.core.governance.policy import Condition, Policy
from klockwork.integrations.langchain import KlockworkMiddleware, agent_config

AGENT = "writer"
CFG: Any = {"configurable": {"thread_id": "t-1"}}
START: Any = {"messages": [("user", "go")]}


class Files:
    """A write_file tool recording, per call, when its body entered and left, and its leases."""

    def __init__(self, kw: Klockwork, delay_s: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.spans: dict[str, tuple[float, float]] = {}
        self.leases: dict[str, list[str]] = {}
        self.written: list[tuple[str, str]] = []

        @tool
        def write_file(path: str, text: str) -> str:
            """Write text to a file."""
            start = time.monotonic()
            held = [f"{lease.resource}@{lease.session_id}" for lease in kw.leases.list(AGENT)]
            time.sleep(delay_s)
            with self.lock:
                self.spans[text] = (start, time.monotonic())
                self.leases[text] = held
                self.written.append((path, text))
            return f"wrote {path}"

        self.tool = write_file


def turn(*calls: tuple[str, str, str]) -> AIMessage:
    """One model turn calling write_file once per (call id, path, text)."""
    return AIMessage(
        "",
        tool_calls=[
            {"name": "write_file", "args": {"path": p, "text": t}, "id": i} for i, p, t in calls
        ],
    )


def build(kw: Klockwork, files: Files, *turns: AIMessage, saver: Any = None, **mw: Any) -> Any:
    mw.setdefault("resources", {"write_file": "FILE:{path}"})
    return create_agent(
        scripted(*turns, "Done."),
        [files.tool],
        middleware=[KlockworkMiddleware(kw, **mw)],
        checkpointer=saver,
        name=AGENT,
    )


def tool_messages(out: dict[str, Any]) -> list[ToolMessage]:
    return [m for m in out["messages"] if isinstance(m, ToolMessage)]


def kinds(kw: Klockwork) -> list[str]:
    return [e.kind for e in kw.audit.query(limit=500).entries]


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def add_policies(kw: Klockwork) -> None:
    kw.policies.add(
        Policy(
            name="no-etc",
            action="fs.write",
            effect="deny",
            conditions=[Condition(field="system", operator="eq", value=True)],
            priority=10,
        )
    )
    kw.policies.add(
        Policy(
            name="big-writes",
            action="fs.write",
            effect="allow",
            conditions=[Condition(field="size", operator="lte", value=10)],
            on_fail="require_approval",
            approvers=["alice", "bob"],
        )
    )


GATES: Any = {
    "write_file": {
        "action": "fs.write",
        "metadata": lambda a: {"system": a["path"].startswith("/etc"), "size": len(a["text"])},
    }
}


@pytest.fixture
def gkw(kw: Klockwork) -> Klockwork:
    add_policies(kw)
    return kw


# -- leases ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_call_runs_under_its_lease_in_a_sub_session(kw: Klockwork, mode: str) -> None:
    files = Files(kw)
    graph = build(kw, files, turn(("c1", "/a.txt", "hi")))
    cfg = agent_config(AGENT, "s1")
    out = graph.invoke(START, cfg) if mode == "sync" else asyncio.run(graph.ainvoke(START, cfg))
    assert tool_messages(out)[0].content == "wrote /a.txt"
    (held,) = files.leases["hi"]
    assert held.startswith("FILE:/a.txt@s1/call-")
    assert kw.leases.list() == []  # released
    assert kinds(kw).count("lease.granted") == 1


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_parallel_calls_on_one_file_are_serialised_on_two_files_overlap(
    kw: Klockwork, mode: str
) -> None:
    files = Files(kw, delay_s=0.3)
    graph = build(
        kw,
        files,
        turn(("c1", "/same", "one"), ("c2", "/same", "two")),
        turn(("c3", "/x", "three"), ("c4", "/y", "four")),
    )
    cfg = agent_config(AGENT, "s1")
    out = graph.invoke(START, cfg) if mode == "sync" else asyncio.run(graph.ainvoke(START, cfg))
    assert [m.status for m in tool_messages(out)] == ["success"] * 4
    assert not overlap(files.spans["one"], files.spans["two"])
    assert overlap(files.spans["three"], files.spans["four"])


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_calls_on_one_file_take_it_in_the_order_the_model_listed_them(
    kw: Klockwork, mode: str
) -> None:
    for _ in range(3):  # whichever thread or task LangGraph starts first
        files = Files(kw, delay_s=0.02)
        listed = ["first", "second", "third", "fourth"]
        # c-ids sort in reverse: nothing but the listed order can explain the result
        calls = [(f"c{9 - i}", "/same", text) for i, text in enumerate(listed)]
        graph = build(kw, files, turn(*calls), turn(("c0", "/other", "alone")))
        cfg = agent_config(AGENT, "s1")
        out = graph.invoke(START, cfg) if mode == "sync" else asyncio.run(graph.ainvoke(START, cfg))
        assert [m.status for m in tool_messages(out)] == ["success"] * 5
        same = [text for path, text in files.written if path == "/same"]
        assert same == listed


def test_a_later_call_does_not_wait_for_an_earlier_one_that_finished_before_a_resume(
    kw: Klockwork,
) -> None:
    from klockwork.integrations.langchain.turn_order import TurnOrder

    order = TurnOrder()
    ai = turn(("c1", "/same", "a"), ("c2", "/same", "b"))
    state = {"messages": [ai]}
    first = order.place(state, ai.tool_calls[0], lambda c: {"FILE:/same"})
    assert first is not None and first.followed and first.before == ()
    order.finished(first, kw)  # the first run: c1 finished, then the run paused
    resumed = TurnOrder()  # a new process: nothing in memory, the store remembers
    second = resumed.place(state, ai.tool_calls[1], lambda c: {"FILE:/same"})
    assert second is not None and second.before == (f"{ai.id or ''}/c1",)
    started = time.monotonic()
    resumed.wait(second, kw, timeout_s=5)
    assert time.monotonic() - started < 1


def test_a_bad_path_and_a_busy_file_are_error_messages_and_the_run_goes_on(kw: Klockwork) -> None:
    files = Files(kw)
    held = kw.leases.acquire("other", "s", [("FILE:/busy", "MUTATES")], 60_000)
    graph = build(kw, files, turn(("c1", "", "empty"), ("c2", "/busy", "busy")), timeout_s=0.2)
    out = graph.invoke(START, agent_config(AGENT))
    empty, busy = tool_messages(out)
    assert empty.status == "error" and "'path' is empty" in str(empty.content)
    assert busy.status == "error" and "Resource busy: FILE:/busy" in str(busy.content)
    assert "other" in str(busy.content)
    assert files.written == [] and out["messages"][-1].content == "Done."
    kw.leases.release(held.leases[0].lease_id)


def test_configuration_mistakes_raise_at_construction() -> None:
    for bad in (
        {"resources": {"w": 3}},
        {"resources": {"w": ("FILE:{p}", "READS")}},
        {"resources": {"w": {"resource": "FILE:{p}", "mode": "x"}}},
        {"gates": {"w": ""}},
        {"gates": {"w": {"action": "a", "when": 1}}},
        {"default_predicate": "WRITES"},
        {"ttl_ms": -1},
    ):
        with pytest.raises(InvalidRequestError):
            KlockworkMiddleware(**bad)


# -- gates without a checkpointer -----------------------------------------------------
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_allowed_runs_denied_is_an_error_message(gkw: Klockwork, mode: str) -> None:
    files = Files(gkw)
    graph = build(gkw, files, turn(("c1", "/ok", "small"), ("c2", "/etc/passwd", "x")), gates=GATES)
    cfg = agent_config(AGENT)
    out = graph.invoke(START, cfg) if mode == "sync" else asyncio.run(graph.ainvoke(START, cfg))
    ok, denied = tool_messages(out)
    assert ok.status == "success" and files.written == [("/ok", "small")]
    assert denied.status == "error" and "no-etc" in str(denied.content)
    assert out["messages"][-1].content == "Done."
    executed = [e for e in gkw.audit.query(limit=200).entries if e.kind == "action.executed"]
    assert executed[0].data["metadata"]["tool"] == "write_file"
    assert executed[0].data["metadata"]["args"] == {"path": "/ok", "text": "small"}
    assert "action.denied" in kinds(gkw)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_approval_blocks_before_the_lease_and_another_thread_approves(
    gkw: Klockwork, mode: str
) -> None:
    files = Files(gkw)
    graph = build(gkw, files, turn(("c1", "/big", "x" * 40)), gates=GATES)
    seen: list[Any] = []

    def approve() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pending = gkw.approvals.list()
            if pending:
                seen.append(gkw.leases.list())  # the gate comes first: nothing leased yet
                gkw.approvals.approve(pending[0].approval_id, "alice")
                return
            time.sleep(0.02)

    thread = threading.Thread(target=approve)
    thread.start()
    cfg = agent_config(AGENT)
    out = graph.invoke(START, cfg) if mode == "sync" else asyncio.run(graph.ainvoke(START, cfg))
    thread.join()
    assert seen == [[]]
    assert tool_messages(out)[0].status == "success" and files.written == [("/big", "x" * 40)]


# -- approvals in a checkpointed run --------------------------------------------------
def hitl_graph(gkw: Klockwork, files: Files, *calls: tuple[str, str, str]) -> Any:
    return build(gkw, files, turn(*calls), gates=GATES, saver=InMemorySaver())


def test_the_interrupt_is_a_hitl_request_and_approve_resumes_once(gkw: Klockwork) -> None:
    files = Files(gkw)
    graph = hitl_graph(gkw, files, ("c1", "/big", "x" * 40))
    out = graph.invoke(START, CFG)
    (pending,) = out["__interrupt__"]
    value = pending.value
    assert value["action_requests"] == [
        {"name": "write_file", "args": {"path": "/big", "text": "x" * 40}, "description": (
            value["action_requests"][0]["description"])}
    ]  # fmt: skip
    assert "big-writes" in value["action_requests"][0]["description"]
    assert value["review_configs"] == [
        {"action_name": "write_file", "allowed_decisions": ["approve", "edit", "reject", "respond"]}
    ]
    (approval,) = value["klockwork"]["approvals"]
    assert value["klockwork"]["approval_ids"] == [approval["approval_id"]]
    assert approval["policy"] == "big-writes" and "deadline_ms" in approval
    assert approval["conditions"][0]["field"] == "size"
    assert gkw.leases.list() == []

    # the requester approving itself: refused, still pending, the run still paused
    with pytest.raises(NotAnApproverError):
        graph.invoke(Command(resume={"decisions": [{"type": "approve"}], "approver": AGENT}), CFG)
    assert gkw.approvals.get(approval["approval_id"]).status.value == "pending"
    with pytest.raises(ValidationError):  # LangChain's shape without the approver
        graph.invoke(Command(resume={"decisions": [{"type": "approve"}]}), CFG)

    out = graph.invoke(
        Command(resume={"decisions": [{"type": "approve"}], "approver": "alice"}), CFG
    )
    assert files.written == [("/big", "x" * 40)]
    assert tool_messages(out)[0].content == "wrote /big"
    assert gkw.approvals.get(approval["approval_id"]).status.value == "approved"
    assert len(gkw.approvals.list(status=None)) == 1  # the re-runs asked nothing again
    assert kinds(gkw).count("action.requested") == 1
    assert kinds(gkw).count("lease.granted") == 1


def test_reject_tells_the_model_not_to_retry(gkw: Klockwork) -> None:
    files = Files(gkw)
    graph = hitl_graph(gkw, files, ("c1", "/big", "x" * 40))
    graph.invoke(START, CFG)
    out = graph.invoke(
        Command(
            resume={"decisions": [{"type": "reject", "message": "too big"}], "approver": "bob"}
        ),
        CFG,
    )
    (message,) = tool_messages(out)
    assert message.status == "error" and "do not retry" in str(message.content)
    assert files.written == [] and out["messages"][-1].content == "Done."


def test_an_edit_is_judged_again_deny_wins(gkw: Klockwork) -> None:
    files = Files(gkw)
    graph = hitl_graph(gkw, files, ("c1", "/big", "x" * 40))
    graph.invoke(START, CFG)
    edit = {"name": "write_file", "args": {"path": "/etc/big", "text": "tiny"}}
    out = graph.invoke(
        Command(resume={"decisions": [{"type": "edit", "edited_action": edit}], "approver": "bob"}),
        CFG,
    )
    (message,) = tool_messages(out)
    assert message.status == "error" and "no-etc" in str(message.content)
    assert files.written == []


def test_an_edit_the_policies_allow_runs_with_the_edited_arguments(gkw: Klockwork) -> None:
    files = Files(gkw)
    graph = hitl_graph(gkw, files, ("c1", "/big", "x" * 40))
    graph.invoke(START, CFG)
    edit = {"name": "write_file", "args": {"path": "/small", "text": "tiny"}}
    graph.invoke(
        Command(resume={"decisions": [{"type": "edit", "edited_action": edit}], "approver": "bob"}),
        CFG,
    )
    assert files.written == [("/small", "tiny")]
    assert files.leases["tiny"][0].startswith("FILE:/small@")  # leased what runs


def test_an_edit_cannot_turn_the_call_into_another_tool(gkw: Klockwork) -> None:
    files = Files(gkw)
    graph = hitl_graph(gkw, files, ("c1", "/big", "x" * 40))
    graph.invoke(START, CFG)
    edit = {"name": "rm_rf", "args": {"path": "/"}}
    with pytest.raises(Exception, match="not make it another tool"):
        graph.invoke(
            Command(
                resume={"decisions": [{"type": "edit", "edited_action": edit}], "approver": "bob"}
            ),
            CFG,
        )
    assert files.written == []
    [pending] = gkw.approvals.list()  # still waiting for a valid decision
    assert pending.status.value == "pending"


def test_respond_answers_for_the_tool(gkw: Klockwork) -> None:
    files = Files(gkw)
    graph = hitl_graph(gkw, files, ("c1", "/big", "x" * 40))
    graph.invoke(START, CFG)
    decision = {"type": "respond", "message": "Written by hand instead."}
    out = graph.invoke(Command(resume={"decisions": [decision], "approver": "alice"}), CFG)
    (message,) = tool_messages(out)
    assert message.status == "success" and message.content == "Written by hand instead."
    assert files.written == []


def test_one_interrupt_per_turn_for_every_call_that_needs_approval(gkw: Klockwork) -> None:
    files = Files(gkw)
    graph = hitl_graph(
        gkw,
        files,
        ("c1", "/p", "y" * 40),  # needs approval
        ("c2", "/ok", "small"),  # allowed
        ("c3", "/etc/x", "z"),  # denied
        ("c4", "/q", "z" * 40),  # needs approval
    )
    out = graph.invoke(START, CFG)
    (pending,) = out["__interrupt__"]  # one interrupt for the turn
    value = pending.value
    assert [a["args"]["path"] for a in value["action_requests"]] == ["/p", "/q"]
    assert len(value["review_configs"]) == 2 and len(value["klockwork"]["approval_ids"]) == 2
    assert files.written == []  # nothing runs while the turn waits
    with pytest.raises(ValidationError, match="Number of human decisions"):
        graph.invoke(Command(resume={"decisions": [{"type": "approve"}], "approver": "alice"}), CFG)
    decisions = [{"type": "approve"}, {"type": "reject", "message": "not /q"}]
    out = graph.invoke(Command(resume={"decisions": decisions, "approver": "alice"}), CFG)
    by_id = {m.tool_call_id: m for m in tool_messages(out)}
    assert by_id["c1"].status == "success" and by_id["c2"].status == "success"
    assert by_id["c3"].status == "error" and "no-etc" in str(by_id["c3"].content)
    assert by_id["c4"].status == "error" and "do not retry" in str(by_id["c4"].content)
    assert sorted(p for p, _ in files.written) == ["/ok", "/p"]
    # the re-runs asked nothing again: two approvals, one request each, two leases
    assert len(gkw.approvals.list(status=None)) == 2
    assert kinds(gkw).count("action.requested") == 2
    assert kinds(gkw).count("lease.granted") == 2


def test_an_edit_that_still_needs_approval_asks_again_in_a_second_round(gkw: Klockwork) -> None:
    files = Files(gkw)
    graph = hitl_graph(gkw, files, ("c1", "/p", "y" * 40), ("c2", "/q", "z" * 40))
    graph.invoke(START, CFG)
    edit = {"name": "write_file", "args": {"path": "/r", "text": "w" * 40}}
    decisions = [{"type": "edit", "edited_action": edit}, {"type": "approve"}]
    out = graph.invoke(Command(resume={"decisions": decisions, "approver": "bob"}), CFG)
    (again,) = out["__interrupt__"]
    assert [a["args"]["path"] for a in again.value["action_requests"]] == ["/r"]
    assert files.written == []
    out = graph.invoke(
        Command(resume={"decisions": [{"type": "approve"}], "approver": "alice"}), CFG
    )
    assert sorted(p for p, _ in files.written) == ["/q", "/r"]
    assert len(gkw.approvals.list(status=None)) == 3


def test_an_approval_decided_out_of_band_wins(gkw: Klockwork) -> None:
    files = Files(gkw)
    graph = hitl_graph(gkw, files, ("c1", "/p", "y" * 40))
    value = graph.invoke(START, CFG)["__interrupt__"][0].value
    gkw.approvals.deny(value["klockwork"]["approval_ids"][0], "alice", "no")
    out = graph.invoke(Command(resume={"decisions": [{"type": "approve"}], "approver": "bob"}), CFG)
    assert tool_messages(out)[0].status == "error" and files.written == []


def test_async_checkpointed_approve(gkw: Klockwork) -> None:
    files = Files(gkw)
    graph = hitl_graph(gkw, files, ("c1", "/big", "x" * 40))

    async def run() -> dict[str, Any]:
        await graph.ainvoke(START, CFG)
        resume = {"decisions": [{"type": "approve"}], "approver": "alice"}
        result: dict[str, Any] = await graph.ainvoke(Command(resume=resume), CFG)
        return result

    out = asyncio.run(run())
    assert tool_messages(out)[0].content == "wrote /big"
    assert kinds(gkw).count("action.requested") == 1


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_approval_nobody_answers_in_time_is_an_error_message(gkw: Klockwork, mode: str) -> None:
    files = Files(gkw)
    graph = build(gkw, files, turn(("c1", "/big", "x" * 40)), gates=GATES, approval_timeout_s=0.2)
    cfg = agent_config(AGENT)
    out = graph.invoke(START, cfg) if mode == "sync" else asyncio.run(graph.ainvoke(START, cfg))
    (message,) = tool_messages(out)
    assert message.status == "error" and "still pending" in str(message.content)
    assert files.written == [] and gkw.leases.list() == []
    assert out["messages"][-1].content == "Done."


def test_an_approval_past_its_deadline_refuses_on_resume() -> None:
    clock = ManualClock(1_700_000_000_000)
    kw = Klockwork(clock=clock)
    kw.policies.add(
        Policy(
            name="big-writes",
            action="fs.write",
            effect="allow",
            conditions=[Condition(field="size", operator="lte", value=10)],
            on_fail="require_approval",
            approvers=["alice"],
            approval_timeout_s=60,
        )
    )
    files = Files(kw)
    graph = hitl_graph(kw, files, ("c1", "/big", "x" * 40))
    value = graph.invoke(START, CFG)["__interrupt__"][0].value
    assert value["klockwork"]["approvals"][0]["deadline_ms"] == 1_700_000_060_000
    clock.advance(61_000)
    out = graph.invoke(
        Command(resume={"decisions": [{"type": "approve"}], "approver": "alice"}), CFG
    )
    (message,) = tool_messages(out)
    assert message.status == "error" and "APPROVAL_EXPIRED" in str(message.content)
    assert files.written == []
    kw.close()


def test_the_middleware_adds_no_graph_node_of_its_own() -> None:
    """Approvals are asked from the tool calls: no after_model node runs per model call."""

    @tool
    def touch(path: str) -> str:
        """Touch a file."""
        return path

    for mw in (
        KlockworkMiddleware(resources={"touch": "FILE:{path}"}),
        KlockworkMiddleware(resources={"touch": "FILE:{path}"}, gates={"touch": "fs.touch"}),
    ):
        graph = create_agent(scripted("done"), tools=[touch], middleware=[mw])
        assert set(graph.get_graph().nodes) == {"__start__", "model", "tools", "__end__"}


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("by_id", [False, True], ids=["resume", "resume-by-interrupt-id"])
def test_a_turn_waits_as_one_and_resumes_as_one(gkw: Klockwork, mode: str, by_id: bool) -> None:
    """Three approvals and an allowed call: one interrupt, nothing runs, one resume runs all.

    The calls run as parallel tasks; the ones that do not lead pause without an
    interrupt of their own and take their decisions from the leader on resume,
    whether the resume names the interrupt or not.
    """
    files = Files(gkw)
    calls = [("c1", "/ok", "small"), ("c2", "/p", "y" * 40), ("c3", "/q", "z" * 40)]
    graph = hitl_graph(gkw, files, *calls, ("c4", "/r", "w" * 40))

    def invoke(value: Any) -> dict[str, Any]:
        if mode == "sync":
            out: dict[str, Any] = graph.invoke(value, CFG)
            return out
        return asyncio.run(graph.ainvoke(value, CFG))

    out = invoke(START)
    (pending,) = out["__interrupt__"]
    assert [a["args"]["path"] for a in pending.value["action_requests"]] == ["/p", "/q", "/r"]
    assert files.written == []
    decisions = [{"type": "approve"}, {"type": "reject", "message": "no"}, {"type": "approve"}]
    resume: Any = {"decisions": decisions, "approver": "alice"}
    out = invoke(Command(resume={pending.id: resume} if by_id else resume))
    assert "__interrupt__" not in out
    by_call = {m.tool_call_id: m.status for m in tool_messages(out)}
    assert by_call == {"c1": "success", "c2": "success", "c3": "error", "c4": "success"}
    assert sorted(p for p, _ in files.written) == ["/ok", "/p", "/r"]
    assert kinds(gkw).count("action.requested") == 3 and kinds(gkw).count("lease.granted") == 3


def test_a_resume_in_a_new_process_needs_nothing_of_the_first(gkw: Klockwork) -> None:
    """The paused turn is resumed by another agent object (another process): same outcome."""
    files = Files(gkw)
    saver = InMemorySaver()
    the_turn = turn(("c1", "/p", "y" * 40), ("c2", "/q", "z" * 40))
    first = build(gkw, files, the_turn, gates=GATES, saver=saver)
    assert len(first.invoke(START, CFG)["__interrupt__"]) == 1
    second = build(gkw, files, gates=GATES, saver=saver)  # its model only answers "Done."
    resume = {"decisions": [{"type": "approve"}, {"type": "approve"}], "approver": "bob"}
    out = second.invoke(Command(resume=resume), CFG)
    assert sorted(p for p, _ in files.written) == ["/p", "/q"]
    assert [m.status for m in tool_messages(out)] == ["success", "success"]


def test_calls_run_one_at_a_time_still_resume(gkw: Klockwork) -> None:
    """With max_concurrency=1 the leader (first in the model's order) runs first: no deadlock."""
    files = Files(gkw)
    graph = hitl_graph(gkw, files, ("c1", "/p", "y" * 40), ("c2", "/q", "z" * 40))
    cfg = {**CFG, "max_concurrency": 1}
    assert len(graph.invoke(START, cfg)["__interrupt__"]) == 1
    resume = {"decisions": [{"type": "approve"}, {"type": "approve"}], "approver": "bob"}
    out = graph.invoke(Command(resume=resume), cfg)
    assert sorted(p for p, _ in files.written) == ["/p", "/q"]
    assert [m.status for m in tool_messages(out)] == ["success", "success"]


@pytest.mark.parametrize("checkpointed", [False, True])
def test_arguments_that_break_the_gates_metadata_callable_are_an_error_message(
    gkw: Klockwork, checkpointed: bool
) -> None:
    files = Files(gkw)
    bad = AIMessage(
        "", tool_calls=[{"name": "write_file", "args": {"path": "/a"}, "id": "c1"}]
    )  # no "text": GATES' metadata callable reads a["text"]
    saver = InMemorySaver() if checkpointed else None
    graph = build(gkw, files, bad, saver=saver, gates=GATES)
    cfg = agent_config(AGENT, "s1", thread_id="t-bad") if checkpointed else agent_config(AGENT)
    out = graph.invoke(START, cfg)
    [message] = tool_messages(out)
    assert message.status == "error" and "gate" in message.content
    assert files.written == []
