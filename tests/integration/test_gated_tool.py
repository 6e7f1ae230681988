"""gated_tool: the gate before a tool, approvals as LangGraph interrupts or blocking waits."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command
from pydantic import ValidationError

from klockwork import Klockwork
from klockwork.core.clock import ManualClock
from klockwork.core.errors import GateDeniedError, InvalidRequestError, NotAnApproverError
from klockwork.core.governance.policy import Condition, Policy
from klockwork.integrations.langchain.approval_flow import APPROVAL_REQUEST_TYPE
from klockwork.integrations.langchain.gating import gated_tool
from klockwork.integrations.langchain.tools import protect_tool

AGENT = "merger"


class ScriptedModel(GenericFakeChatModel):
    """Replays its script; binding tools changes nothing."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedModel:
        return self


def add_policies(kw: Klockwork, **approval: Any) -> None:
    kw.policies.add(
        Policy(
            name="no-infra",
            action="pr.merge",
            effect="deny",
            conditions=[Condition(field="dirs", operator="contains", value="infra")],
            priority=10,
        )
    )
    kw.policies.add(
        Policy(
            name="big-prs",
            action="pr.merge",
            effect="allow",
            conditions=[Condition(field="files", operator="lte", value=50)],
            on_fail="require_approval",
            approvers=["alice", "bob"],
            **approval,
        )
    )


class Merges:
    """A merge_pr tool that records what it merged."""

    def __init__(self) -> None:
        self.merged: list[tuple[int, int]] = []

        @tool
        def merge_pr(pr: int, files: int) -> str:
            """Merge a pull request."""
            self.merged.append((pr, files))
            return f"merged #{pr} ({files} files)"

        self.tool: BaseTool = merge_pr


def gated(kw: Klockwork, merges: Merges, **options: Any) -> BaseTool:
    return gated_tool(
        merges.tool, action="pr.merge", kw=kw, metadata=lambda a: {"files": a["files"]}, **options
    )


def agent(kw: Klockwork, merges: Merges, files: int, saver: Any = None, **options: Any) -> Any:
    call = {"name": "merge_pr", "args": {"pr": 7, "files": files}, "id": "call-1"}
    model = ScriptedModel(messages=iter([AIMessage("", tool_calls=[call]), "Done."]))
    return create_agent(
        model,
        [gated(kw, merges, **options)],
        checkpointer=saver or InMemorySaver(),
        name=AGENT,
    )


CFG: Any = {"configurable": {"thread_id": "t-1"}}
START: Any = {"messages": [("user", "merge PR 7")]}


def tool_messages(out: dict[str, Any]) -> list[ToolMessage]:
    return [m for m in out["messages"] if isinstance(m, ToolMessage)]


def kinds(kw: Klockwork) -> list[str]:
    return [e.kind for e in kw.audit.query(limit=200).entries]


@pytest.fixture
def gkw() -> Any:
    engine = Klockwork()
    add_policies(engine)
    yield engine
    engine.close()


def test_small_pr_runs_without_asking(gkw: Klockwork) -> None:
    merges = Merges()
    out = agent(gkw, merges, files=3).invoke(START, CFG)
    assert "__interrupt__" not in out
    assert merges.merged == [(7, 3)]
    assert kinds(gkw) == ["action.executed"]


def test_approval_interrupts_then_a_refused_decider_then_alice(gkw: Klockwork) -> None:
    merges = Merges()
    graph = agent(gkw, merges, files=73)
    out = graph.invoke(START, CFG)
    (pending,) = out["__interrupt__"]
    value = pending.value
    assert value["type"] == APPROVAL_REQUEST_TYPE and value["agent_id"] == AGENT
    assert value["action"] == "pr.merge" and value["policy"] == "big-prs"
    assert value["conditions"] == [
        {"field": "files", "operator": "lte", "expected": 50, "actual": 73}
    ]
    assert value["allowed_decisions"] == ["approve", "edit", "reject"]
    assert value["args"] == {"pr": 7, "files": 73}
    approval_id = value["approval_id"]

    # the requester itself, then someone not in approvers: refused, still pending
    for who in (AGENT, "mallory"):
        with pytest.raises(NotAnApproverError):
            graph.invoke(Command(resume={"type": "approve", "approver": who}), CFG)
        assert gkw.approvals.get(approval_id).status.value == "pending"
    # a malformed answer: refused by the schema, the graph stays paused, and the
    # error says what a resume value must look like
    for malformed in ({"type": "maybe", "approver": "alice"}, True, "approve"):
        with pytest.raises(ValidationError) as info:
            graph.invoke(Command(resume=malformed), CFG)
        assert "resumed with Command(resume={'type': 'approve' | 'edit' | 'reject'" in str(
            info.value
        )
        assert f"Got {malformed!r}" in str(info.value)
    assert merges.merged == []

    out = graph.invoke(Command(resume={"type": "approve", "approver": "alice"}), CFG)
    assert merges.merged == [(7, 73)]
    assert tool_messages(out)[-1].content == "merged #7 (73 files)"
    assert gkw.approvals.get(approval_id).status.value == "approved"
    # the node ran four more times; still exactly one approval and one request
    assert len(gkw.approvals.list(status=None)) == 1
    assert kinds(gkw).count("action.requested") == 1
    assert kinds(gkw).count("action.executed") == 1


def test_an_edit_is_judged_again_and_one_that_still_needs_approval_asks_again(
    gkw: Klockwork,
) -> None:
    merges = Merges()
    graph = agent(gkw, merges, files=73)
    first = graph.invoke(START, CFG)["__interrupt__"][0].value["approval_id"]
    with pytest.raises(ValidationError):  # not an argument of merge_pr
        graph.invoke(
            Command(resume={"type": "edit", "approver": "bob", "args": {"force": True}}), CFG
        )
    # Still 73 files: the edited action needs its own approval.
    out = graph.invoke(Command(resume={"type": "edit", "approver": "bob", "args": {"pr": 8}}), CFG)
    assert merges.merged == []
    second = out["__interrupt__"][0].value
    assert second["approval_id"] != first and second["args"]["pr"] == 8  # asked about the edit
    assert gkw.approvals.get(first).status.value == "denied"  # replaced by the edit
    assert "replaced by an edit" in gkw.approvals.get(first).decisions[0].comment
    graph.invoke(Command(resume={"type": "approve", "approver": "alice"}), CFG)
    assert merges.merged == [(8, 73)]


def test_an_edit_the_policies_allow_runs_at_once(gkw: Klockwork) -> None:
    merges = Merges()
    graph = agent(gkw, merges, files=73)
    graph.invoke(START, CFG)
    graph.invoke(Command(resume={"type": "edit", "approver": "bob", "args": {"files": 12}}), CFG)
    assert merges.merged == [(7, 12)]
    executed = [e for e in gkw.audit.query(limit=200).entries if e.kind == "action.executed"]
    assert [e.data["metadata"] for e in executed] == [{"files": 12}]


def test_an_edit_into_a_denied_action_never_runs(gkw: Klockwork) -> None:
    """An approver's edit cannot walk around a deny policy (the edit escaped it before)."""
    merges = Merges()
    tool = gated_tool(
        merges.tool,
        action="pr.merge",
        kw=gkw,
        metadata=lambda a: {"files": a["files"], "dirs": ["infra"] if a["pr"] == 666 else []},
    )
    call = {"name": "merge_pr", "args": {"pr": 7, "files": 73}, "id": "call-1"}
    model = ScriptedModel(messages=iter([AIMessage("", tool_calls=[call]), "Done."]))
    graph = create_agent(model, [tool], checkpointer=InMemorySaver(), name=AGENT)
    graph.invoke(START, CFG)
    out = graph.invoke(
        Command(resume={"type": "edit", "approver": "bob", "args": {"pr": 666, "files": 1}}), CFG
    )
    assert merges.merged == []
    (msg,) = tool_messages(out)
    assert msg.status == "error" and "POLICY_DENIED" in str(msg.content)
    assert "no-infra" in str(msg.content)


def test_an_event_id_serves_one_action_only(gkw: Klockwork) -> None:
    """An approval is bound to the exact action it approved: no transplanting it."""
    gkw.gates.execute(AGENT, "pr.merge", {"files": 73}, event_id="pr-7")
    with pytest.raises(InvalidRequestError, match="another action"):
        gkw.gates.execute(AGENT, "pr.merge", {"files": 74}, event_id="pr-7")
    with pytest.raises(InvalidRequestError, match="another action"):
        gkw.gates.execute("someone-else", "pr.merge", {"files": 73}, event_id="pr-7")
    assert gkw.gates.execute(AGENT, "pr.merge", {"files": 73}, event_id="pr-7").status == (
        "requested"
    )


def test_reject_never_runs_the_tool(gkw: Klockwork) -> None:
    merges = Merges()
    graph = agent(gkw, merges, files=73)
    graph.invoke(START, CFG)
    out = graph.invoke(
        Command(resume={"type": "reject", "approver": "bob", "message": "too big, split it"}),
        CFG,
    )
    assert merges.merged == []
    (msg,) = tool_messages(out)
    assert msg.status == "error" and msg.tool_call_id == "call-1"
    assert "DENIED_BY_REVIEWER" in str(msg.content) and "too big, split it" in str(msg.content)
    assert kinds(gkw).count("action.denied") == 1


def test_expired_approval_is_a_denial_on_resume() -> None:
    clock = ManualClock(1_700_000_000_000)
    kw = Klockwork(clock=clock)
    add_policies(kw, approval_timeout_s=60)
    merges = Merges()
    graph = agent(kw, merges, files=73)
    out = graph.invoke(START, CFG)
    assert out["__interrupt__"][0].value["deadline_ms"] == 1_700_000_060_000
    clock.advance(61_000)
    out = graph.invoke(Command(resume={"type": "approve", "approver": "alice"}), CFG)
    assert merges.merged == []
    (msg,) = tool_messages(out)
    assert msg.status == "error" and "APPROVAL_EXPIRED" in str(msg.content)
    kw.close()


def test_out_of_band_decision_before_resume_wins(gkw: Klockwork) -> None:
    merges = Merges()
    graph = agent(gkw, merges, files=73)
    approval_id = graph.invoke(START, CFG)["__interrupt__"][0].value["approval_id"]
    gkw.approvals.approve(approval_id, "alice", "looked at it in the CLI")
    # whatever the resume says, the stored decision stands and nothing is asked again
    out = graph.invoke(Command(resume={"type": "reject", "approver": "bob"}), CFG)
    assert "__interrupt__" not in out
    assert merges.merged == [(7, 73)]
    approval = gkw.approvals.get(approval_id)
    assert [d.approver for d in approval.decisions] == ["alice"]
    assert kinds(gkw).count("action.requested") == 1


def test_quorum_of_two_interrupts_twice(gkw: Klockwork) -> None:
    gkw.policies.remove("big-prs")
    gkw.policies.add(
        Policy(name="two-eyes", action="pr.merge", effect="require_approval", quorum=2)
    )
    merges = Merges()
    graph = agent(gkw, merges, files=5)
    graph.invoke(START, CFG)
    out = graph.invoke(Command(resume={"type": "approve", "approver": "alice"}), CFG)
    assert out["__interrupt__"][0].value["decisions"][0]["approver"] == "alice"
    assert merges.merged == []
    graph.invoke(Command(resume={"type": "approve", "approver": "bob"}), CFG)
    assert merges.merged == [(7, 5)]
    assert len(gkw.approvals.list(status=None)) == 1


async def test_async_agent_interrupt_and_resume(gkw: Klockwork) -> None:
    merges = Merges()
    graph = agent(gkw, merges, files=73)
    out = await graph.ainvoke(START, CFG)
    assert out["__interrupt__"]
    await graph.ainvoke(Command(resume={"type": "approve", "approver": "alice"}), CFG)
    assert merges.merged == [(7, 73)]
    assert kinds(gkw).count("action.requested") == 1


async def test_async_agent_on_the_sqlite_store(tmp_path: Any) -> None:
    kw = Klockwork.open(f"sqlite:///{tmp_path / 'kw.db'}")
    add_policies(kw)
    merges = Merges()
    graph = agent(kw, merges, files=73)
    assert (await graph.ainvoke(START, CFG))["__interrupt__"]
    with pytest.raises(NotAnApproverError):
        await graph.ainvoke(Command(resume={"type": "approve", "approver": "zed"}), CFG)
    await graph.ainvoke(Command(resume={"type": "approve", "approver": "alice"}), CFG)
    assert merges.merged == [(7, 73)]
    assert kinds(kw) == ["action.requested", "approval.decided", "action.executed"]
    kw.close()


# -- outside a checkpointed graph: the call blocks ------------------------------------
def decide_later(kw: Klockwork, verdict: str, delay_s: float = 0.1) -> threading.Thread:
    def decide() -> None:
        deadline = time.monotonic() + 5
        while not kw.approvals.list() and time.monotonic() < deadline:
            time.sleep(0.01)
        (approval,) = kw.approvals.list()
        time.sleep(delay_s)
        if verdict == "approve":
            kw.approvals.approve(approval.approval_id, "alice")
        else:
            kw.approvals.deny(approval.approval_id, "alice", "not today")

    thread = threading.Thread(target=decide, daemon=True)
    thread.start()
    return thread


def test_outside_a_graph_blocks_until_approved(gkw: Klockwork) -> None:
    merges = Merges()
    thread = decide_later(gkw, "approve")
    out = gated(gkw, merges, agent_id=AGENT).invoke({"pr": 1, "files": 90})
    thread.join()
    assert out == "merged #1 (90 files)" and merges.merged == [(1, 90)]


def test_outside_a_graph_denied_is_an_error_message(gkw: Klockwork) -> None:
    merges = Merges()
    thread = decide_later(gkw, "deny")
    call = {"type": "tool_call", "name": "merge_pr", "args": {"pr": 1, "files": 90}, "id": "c9"}
    msg = gated(gkw, merges, agent_id=AGENT).invoke(call)
    thread.join()
    assert isinstance(msg, ToolMessage) and msg.status == "error" and msg.tool_call_id == "c9"
    assert "DENIED_BY_REVIEWER" in str(msg.content) and "not today" in str(msg.content)
    assert merges.merged == []


def test_policy_denial_names_the_failed_condition(gkw: Klockwork) -> None:
    merges = Merges()
    tool_ = gated_tool(
        merges.tool,
        action="pr.merge",
        kw=gkw,
        agent_id=AGENT,
        metadata=lambda a: {"files": a["files"], "dirs": ["infra", "src"]},
    )
    text = tool_.invoke({"pr": 2, "files": 1})
    assert "POLICY_DENIED" in text and "no-infra" in text
    assert "matched: dirs contains 'infra' (actual ['infra', 'src'])" in text
    assert merges.merged == []
    with pytest.raises(GateDeniedError) as info:
        gated_tool(
            merges.tool,
            action="pr.merge",
            kw=gkw,
            agent_id=AGENT,
            metadata={"files": 1, "dirs": ["infra"]},
            on_denied="raise",
        ).invoke({"pr": 2, "files": 1})
    assert info.value.reason == "POLICY_DENIED"
    assert merges.merged == []


def test_timeout_outside_a_graph_is_an_error_and_stays_pending(gkw: Klockwork) -> None:
    merges = Merges()
    text = gated(gkw, merges, agent_id=AGENT, timeout_s=0.05).invoke({"pr": 3, "files": 99})
    assert "was not run" in text and merges.merged == []
    assert len(gkw.approvals.list()) == 1


def test_the_copy_keeps_the_tool_schema(gkw: Klockwork) -> None:
    merges = Merges()
    copy = gated(gkw, merges)
    assert copy.name == merges.tool.name and copy.args == merges.tool.args
    assert copy.description == merges.tool.description


def test_protect_tool_gates_outside_the_lease(gkw: Klockwork) -> None:
    held_during_run: list[int] = []

    @tool
    def merge_pr(pr: int, files: int) -> str:
        """Merge a pull request."""
        held_during_run.append(len(gkw.leases.list()))
        return "merged"

    protected = protect_tool(
        merge_pr,
        "REPO:main",
        kw=gkw,
        gates="pr.merge",
        gate_metadata=lambda a: {"files": a["files"]},
    )
    call = {"name": "merge_pr", "args": {"pr": 7, "files": 73}, "id": "call-1"}
    model = ScriptedModel(messages=iter([AIMessage("", tool_calls=[call]), "Done."]))
    graph = create_agent(model, [protected], checkpointer=InMemorySaver(), name=AGENT)
    assert graph.invoke(START, CFG)["__interrupt__"]
    assert gkw.leases.list() == []  # paused before anything was leased
    graph.invoke(Command(resume={"type": "approve", "approver": "alice"}), CFG)
    assert held_during_run == [1] and gkw.leases.list() == []
