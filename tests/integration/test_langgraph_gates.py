"""Gate nodes in LangGraph graphs: gate_node, add_approval_gate, resuming across processes."""

from __future__ import annotations

import operator
import sqlite3
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command
from support import run_spawned

from klockwork import Klockwork
from klockwork.core.errors import GateDeniedError, InvalidRequestError, NotAnApproverError
from klockwork.core.governance.policy import Condition, Policy
from klockwork.integrations.langgraph import RESULT_KEY, add_approval_gate, gate_node

ROOT = Path(__file__).resolve().parents[2]
AGENT = "deployer"


class State(TypedDict, total=False):
    files: int
    env: str
    log: Annotated[list[str], operator.add]
    klockwork_gate: dict[str, Any]


def step(name: str) -> Any:
    def run(state: State) -> dict[str, Any]:
        return {"log": [name]}

    return run


def add_policies(kw: Klockwork) -> None:
    kw.policies.add(
        Policy(
            name="prod-freeze",
            action="deploy",
            effect="deny",
            conditions=[Condition(field="env", operator="eq", value="frozen")],
            priority=10,
        )
    )
    kw.policies.add(
        Policy(
            name="big-deploys",
            action="deploy",
            effect="allow",
            conditions=[Condition(field="files", operator="lte", value=50)],
            on_fail="require_approval",
            approvers=["alice"],
        )
    )


def metadata(state: State) -> dict[str, Any]:
    return {"files": state.get("files", 0), "env": state.get("env", "prod")}


def pipeline(kw: Klockwork, **gate: Any) -> StateGraph[Any, Any, Any, Any]:
    """plan -> deploy -> END, with the gate in front of deploy."""
    builder = StateGraph(State)
    builder.add_node("plan", step("plan"))
    builder.add_node("deploy", step("deploy"))
    builder.add_node("refused", step("refused"))
    builder.add_edge(START, "plan")
    builder.add_edge("plan", "deploy")
    builder.add_edge("deploy", END)
    builder.add_edge("refused", END)
    return add_approval_gate(
        builder, before="deploy", kw=kw, action="deploy", metadata=metadata, **gate
    )


def cfg(thread: str = "t-1") -> Any:
    return {"configurable": {"thread_id": thread, "agent_id": AGENT}}


def kinds(kw: Klockwork) -> list[str]:
    return [e.kind for e in kw.audit.query(limit=200).entries]


@pytest.fixture
def gkw() -> Any:
    engine = Klockwork()
    add_policies(engine)
    yield engine
    engine.close()


def test_allowed_runs_through_and_records_the_result(gkw: Klockwork) -> None:
    graph = pipeline(gkw).compile(checkpointer=InMemorySaver())
    out = graph.invoke({"files": 3}, cfg())
    assert out["log"] == ["plan", "deploy"]
    assert out[RESULT_KEY]["status"] == "executed"


def test_approval_interrupts_and_resume_is_idempotent(gkw: Klockwork) -> None:
    graph = pipeline(gkw).compile(checkpointer=InMemorySaver())
    out = graph.invoke({"files": 80}, cfg())
    assert out["log"] == ["plan"]
    value = out["__interrupt__"][0].value
    assert value["type"] == "klockwork.approval" and value["agent_id"] == AGENT
    assert value["conditions"][0]["actual"] == 80
    with pytest.raises(NotAnApproverError):
        graph.invoke(Command(resume={"type": "approve", "approver": "bob"}), cfg())
    assert gkw.approvals.get(value["approval_id"]).status.value == "pending"
    out = graph.invoke(Command(resume={"type": "approve", "approver": "alice"}), cfg())
    assert out["log"] == ["plan", "deploy"]
    assert len(gkw.approvals.list(status=None)) == 1
    assert kinds(gkw).count("action.requested") == 1
    assert kinds(gkw).count("action.executed") == 1


def test_edit_args_become_a_state_update(gkw: Klockwork) -> None:
    graph = pipeline(gkw).compile(checkpointer=InMemorySaver())
    graph.invoke({"files": 80}, cfg())
    # The edited state still has 80 files: judged again, it needs its own approval.
    paused = graph.invoke(
        Command(resume={"type": "edit", "approver": "alice", "args": {"env": "canary"}}), cfg()
    )
    assert paused["__interrupt__"][0].value["args"] == {"env": "canary"}
    out = graph.invoke(Command(resume={"type": "approve", "approver": "alice"}), cfg())
    assert out["env"] == "canary" and out["log"] == ["plan", "deploy"]
    # An edit that makes the action acceptable runs at once.
    graph = pipeline(gkw).compile(checkpointer=InMemorySaver())
    graph.invoke({"files": 80}, cfg("t-2"))
    out = graph.invoke(
        Command(resume={"type": "edit", "approver": "alice", "args": {"files": 10}}), cfg("t-2")
    )
    assert out["files"] == 10 and out["log"] == ["plan", "deploy"]


def test_reject_goes_to_on_denied(gkw: Klockwork) -> None:
    graph = pipeline(gkw, on_denied="refused").compile(checkpointer=InMemorySaver())
    graph.invoke({"files": 80}, cfg())
    out = graph.invoke(
        Command(resume={"type": "reject", "approver": "alice", "message": "not now"}), cfg()
    )
    assert out["log"] == ["plan", "refused"]
    assert out[RESULT_KEY]["denial_reason"] == "DENIED_BY_REVIEWER"


def test_policy_denial_raises_without_on_denied(gkw: Klockwork) -> None:
    graph = pipeline(gkw).compile(checkpointer=InMemorySaver())
    with pytest.raises(GateDeniedError) as info:
        graph.invoke({"files": 1, "env": "frozen"}, cfg())
    assert info.value.reason == "POLICY_DENIED" and info.value.policy == "prod-freeze"


def test_out_of_band_approval_before_resume(gkw: Klockwork) -> None:
    graph = pipeline(gkw).compile(checkpointer=InMemorySaver())
    approval_id = graph.invoke({"files": 80}, cfg())["__interrupt__"][0].value["approval_id"]
    gkw.approvals.deny(approval_id, "alice", "decided elsewhere")
    # the re-run sees the stored denial: no new interrupt, whatever the resume says
    with pytest.raises(GateDeniedError) as info:
        graph.invoke(Command(resume={"type": "approve", "approver": "alice"}), cfg())
    assert info.value.reason == "DENIED_BY_REVIEWER" and "decided elsewhere" in str(info.value)
    assert gkw.approvals.get(approval_id).status.value == "denied"
    assert graph.get_state(cfg()).values["log"] == ["plan"]


def test_without_a_checkpointer_the_node_blocks(gkw: Klockwork) -> None:
    graph = pipeline(gkw).compile()

    def approve() -> None:
        deadline = time.monotonic() + 5
        while not gkw.approvals.list() and time.monotonic() < deadline:
            time.sleep(0.01)
        gkw.approvals.approve(gkw.approvals.list()[0].approval_id, "alice")

    thread = threading.Thread(target=approve, daemon=True)
    thread.start()
    out = graph.invoke({"files": 80}, cfg())
    thread.join()
    assert out["log"] == ["plan", "deploy"]


def test_gate_node_by_hand(gkw: Klockwork) -> None:
    builder = StateGraph(State)
    builder.add_node("gate", gate_node(gkw, "deploy", {"files": 1}, agent_id=AGENT))
    builder.add_node("deploy", step("deploy"))
    builder.add_edge(START, "gate")
    builder.add_edge("gate", "deploy")
    out = builder.compile().invoke({})
    assert out["log"] == ["deploy"] and out[RESULT_KEY]["policy_name"] == "big-deploys"


# -- rerouting -------------------------------------------------------------------------
def test_reroutes_start_plain_join_and_conditional_edges(gkw: Klockwork) -> None:
    builder = StateGraph(State)
    for name in ("a", "b", "deploy", "other"):
        builder.add_node(name, step(name))
    builder.add_edge(START, "deploy")
    builder.add_edge("a", "deploy")
    builder.add_edge(["a", "b"], "deploy")

    def route(state: State) -> Literal["deploy", "other"]:
        return "deploy"

    builder.add_conditional_edges("other", route)
    builder.add_conditional_edges("b", lambda s: "go", {"go": "deploy", "no": END})
    add_approval_gate(
        builder, before="deploy", kw=gkw, action="deploy", metadata=metadata, name="g"
    )
    assert (START, "g") in builder.edges and ("a", "g") in builder.edges
    assert not any(end == "deploy" for _, end in builder.edges)
    assert (("a", "b"), "g") in builder.waiting_edges
    assert builder.branches["other"]["route"].ends == {"deploy": "g", "other": "other"}
    (b_branch,) = builder.branches["b"].values()
    assert b_branch.ends == {"go": "g", "no": END}
    out = builder.compile().invoke({"files": 1}, cfg())
    assert out["log"] == ["deploy"]


def test_refuses_what_it_cannot_reroute(gkw: Klockwork) -> None:
    builder = StateGraph(State)
    builder.add_node("a", step("a"))
    builder.add_node("deploy", step("deploy"))
    builder.add_edge(START, "a")
    builder.add_conditional_edges("a", lambda s: "deploy")
    with pytest.raises(InvalidRequestError, match="path map"):
        add_approval_gate(builder, before="deploy", kw=gkw, action="deploy")
    assert "gate_deploy" not in builder.nodes
    with pytest.raises(InvalidRequestError, match="no such node"):
        add_approval_gate(builder, before="nope", kw=gkw, action="deploy")


# -- across processes --------------------------------------------------------------------
def resume_elsewhere(kw_url: str, ck_path: str, start: Any) -> None:
    """A fresh process: fresh engine, fresh SqliteSaver, same graph; resume and finish."""
    start.wait(10)
    kw = Klockwork.open(kw_url)
    add_policies(kw)
    with sqlite3.connect(ck_path, check_same_thread=False) as conn:
        graph = pipeline(kw).compile(checkpointer=SqliteSaver(conn))
        out = graph.invoke(Command(resume={"type": "approve", "approver": "alice"}), cfg("x"))
    kw.close()
    assert out["log"] == ["plan", "deploy"], out


def test_resume_from_another_process_over_sqlite(tmp_path: Path) -> None:
    kw_url = f"sqlite:///{tmp_path / 'kw.db'}"
    ck_path = str(tmp_path / "checkpoints.db")
    kw = Klockwork.open(kw_url)
    add_policies(kw)
    with sqlite3.connect(ck_path, check_same_thread=False) as conn:
        graph = pipeline(kw).compile(checkpointer=SqliteSaver(conn))
        out = graph.invoke({"files": 80}, cfg("x"))
    approval_id = out["__interrupt__"][0].value["approval_id"]
    kw.close()

    run_spawned(resume_elsewhere, [(kw_url, ck_path)])

    kw = Klockwork.open(kw_url)
    assert kw.approvals.get(approval_id).status.value == "approved"
    assert len(kw.approvals.list(status=None)) == 1
    assert kinds(kw).count("action.requested") == 1
    assert kinds(kw).count("action.executed") == 1
    assert kw.audit.verify().valid
    kw.close()


def test_gated_tool_called_inside_a_node_keeps_calls_apart(gkw: Klockwork) -> None:
    from langchain_core.tools import tool

    from klockwork.integrations.langchain import gated_tool

    ran: list[int] = []

    @tool
    def deploy(files: int) -> str:
        """Deploy."""
        ran.append(files)
        return "ok"

    gated = gated_tool(deploy, action="deploy", kw=gkw, metadata=lambda a: {"files": a["files"]})

    def both(state: State) -> dict[str, Any]:
        return {"log": [gated.invoke({"files": 80}), gated.invoke({"files": 90})]}

    builder = StateGraph(State)
    builder.add_node("both", both)
    builder.add_edge(START, "both")
    graph = builder.compile(checkpointer=InMemorySaver())
    first = graph.invoke({}, cfg())["__interrupt__"][0].value
    second = graph.invoke(Command(resume={"type": "approve", "approver": "alice"}), cfg())
    assert second["__interrupt__"][0].value["approval_id"] != first["approval_id"]
    out = graph.invoke(Command(resume={"type": "approve", "approver": "alice"}), cfg())
    # LangGraph re-runs the node on each resume: the first body runs again
    # (its gate does not ask again); one gated call per node avoids that.
    assert out["log"] == ["ok", "ok"] and ran == [80, 80, 90]
    assert len(gkw.approvals.list(status=None)) == 2
    assert kinds(gkw).count("action.requested") == 2
