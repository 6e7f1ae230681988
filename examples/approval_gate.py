"""An agent merges pull requests through an approval gate; a human approves from another process.

Policies on ``pr.merge``: any PR touching ``infra/`` is denied; up to 50
files merge at once; above 50 a member of ``approvers`` must approve.

Run 1: a 3-file PR merges. Run 2: a PR touching infra/ is refused with the
reason. Run 3: a 73-file PR pauses the graph (a LangGraph interrupt); alice
approves with ``klockwork approvals approve`` in a second process; a third
process (fresh engine, fresh SqliteSaver, same files) resumes the graph and
the merge happens once. The audit chain is verified at the end. Offline.

    .venv/bin/python examples/approval_gate.py

Exit code 0 when the whole story holds (a smoke check).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.types import Command

from klockwork import Klockwork
from klockwork.core.governance.policy import Condition, Policy
from klockwork.integrations.langchain.gating import gated_tool

POLICIES = [
    Policy(name="hands-off-infra", action="pr.merge", effect="deny", priority=10,
           conditions=[Condition(field="dirs", operator="contains", value="infra")]),
    Policy(name="big-prs-need-review", action="pr.merge", effect="allow",
           conditions=[Condition(field="files", operator="lte", value=50)],
           on_fail="require_approval", approvers=["alice", "bob"], approval_timeout_s=3600),
]  # fmt: skip
PRS = {101: ["src/app.py", "src/util.py", "README.md"],
       102: ["infra/prod.tf", "src/app.py"],
       103: [f"src/module_{i}.py" for i in range(73)]}  # fmt: skip


class ScriptedModel(BaseChatModel):
    """Asks for one merge, then (once a tool result is in) says it is done: resumable anywhere."""

    call: dict[str, Any]
    _llm_type = "scripted"

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedModel:
        return self

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        done = any(isinstance(m, ToolMessage) for m in messages)
        reply = AIMessage("Done.") if done else AIMessage("", tool_calls=[self.call])
        return ChatResult(generations=[ChatGeneration(message=reply)])


def pr_facts(args: dict[str, Any]) -> dict[str, Any]:
    """What the policies look at: the file count and the top-level directories."""
    files = args["files"]
    return {"pr": args["pr"], "files": len(files), "dirs": sorted({f.split("/")[0] for f in files})}


def build_agent(kw: Klockwork, saver: SqliteSaver, log: Path, pr: int) -> Any:
    @tool
    def merge_pr(pr: int, files: list[str]) -> str:
        """Merge a pull request."""
        with log.open("a") as out:
            out.write(f"{pr}\n")
        return f"merged #{pr} ({len(files)} files)"

    gated = gated_tool(merge_pr, action="pr.merge", metadata=pr_facts, kw=kw)
    call = {"name": "merge_pr", "args": {"pr": pr, "files": PRS[pr]}, "id": f"call-{pr}"}
    return create_agent(ScriptedModel(call=call), [gated], checkpointer=saver, name="merge-bot")


def open_all(tmp: Path) -> tuple[Klockwork, SqliteSaver]:
    kw = Klockwork.open(f"sqlite:///{tmp / 'klockwork.db'}")
    [kw.policies.add(policy) for policy in POLICIES]
    return kw, SqliteSaver(sqlite3.connect(tmp / "checkpoints.db", check_same_thread=False))


def tool_result(out: dict[str, Any]) -> str:
    msg = [m for m in out["messages"] if isinstance(m, ToolMessage)][-1]
    return f"{msg.status}: {msg.content}"


def run(tmp: Path, pr: int, command: Any = None) -> dict[str, Any]:
    """Start (or, with ``command``, resume) PR ``pr``'s thread with a fresh engine and saver."""
    kw, saver = open_all(tmp)
    agent = build_agent(kw, saver, tmp / "merged.log", pr)
    start = command or {"messages": [("user", f"merge PR {pr}")]}
    out = agent.invoke(start, {"configurable": {"thread_id": f"pr-{pr}"}})
    kw.close()
    return dict(out)


def resume(tmp: Path, pr: int) -> None:
    """In a fresh process: the approval is decided already; the resume value only wakes the run."""
    out = run(tmp, pr, Command(resume={"type": "approve", "approver": "alice"}))
    print(f"  [pid {os.getpid()}] resumed the graph -> {tool_result(out)}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="klockwork-approval-") as name:
        tmp = Path(name)
        print("Run 1: a 3-file PR\n  ->", tool_result(run(tmp, 101)))
        refused = tool_result(run(tmp, 102))
        print("Run 2: a PR touching infra/\n  ->", refused)
        print("Run 3: a 73-file PR")
        out = run(tmp, 103)
        value = out["__interrupt__"][0].value
        print(f"  -> paused: {value['message']}\n     {value['approval_id']}, {value['approvers']}")
        url = f"sqlite:///{tmp / 'klockwork.db'}"
        cli = [sys.executable, "-m", "klockwork.cli", "approvals", "approve", value["approval_id"],
               "--approver", "alice", "--comment", "reviewed", "--url", url]  # fmt: skip
        done = subprocess.run(cli, capture_output=True, text=True)
        print(f"  [klockwork CLI] approved by alice (exit {done.returncode}) {done.stdout.strip()}")
        resumed = subprocess.run([sys.executable, __file__, "--resume", name, "103"])
        merged = (tmp / "merged.log").read_text().split()
        kw = Klockwork.open(url)
        kinds = [e.kind for e in kw.audit.query(limit=200).entries]
        approvals, verified = kw.approvals.list(status=None), kw.audit.verify()
        kw.close()
        check = subprocess.run([sys.executable, "-m", "klockwork.cli", "audit", "verify", url],
                               capture_output=True, text=True)  # fmt: skip
        ok = verified.valid and check.returncode == 0
        print(f"Merged PRs: {merged}\nAudit trail: {', '.join(kinds)}")
        print("  -> audit chain verified" if ok else f"  -> AUDIT BROKEN: {verified.reason}")
        story = ok and merged == ["101", "103"] and done.returncode == resumed.returncode == 0
        story = story and len(approvals) == 1 and kinds.count("action.requested") == 1
        story = story and refused.startswith("error:") and "POLICY_DENIED" in refused
        print("The story held." if story else "The story did NOT hold.")
        return 0 if story else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--resume"]:
        resume(Path(sys.argv[2]), int(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
