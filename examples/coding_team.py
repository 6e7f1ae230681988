"""A coding team: a supervisor and three ``create_agent`` workers edit one repository at once.

Each worker gets one line, ``middleware=[KlockworkMiddleware(kw, resources=..., gates=...)]``.
``backend`` and ``frontend`` edit ``app.py`` in parallel threads and lose nothing
(a lease serialises them). ``ops`` tries to deploy without the tests: refused, and
its model is told why; its next deploy waits for the ``lead``, who approves from
another thread (ops may not approve its own). Then the audit trail is verified.
Offline (fake chat models); exit 0 when the story holds.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool

from klockwork import Klockwork
from klockwork.core.errors import NotAnApproverError
from klockwork.core.governance.policy import Condition, Policy
from klockwork.integrations.langchain import KlockworkMiddleware, resolve_identity


def call(name: str, **args: Any) -> dict[str, Any]:
    return {"name": name, "args": args, "id": f"{name}-{sorted(args.items())}"}


POLICIES = [
    Policy(name="no-untested-deploys", action="deploy", effect="deny", priority=10,
           conditions=[Condition(field="args.skip_tests", operator="eq", value=True)]),
    Policy(name="prod-needs-the-lead", action="deploy", effect="require_approval",
           approvers=["lead"]),
]  # fmt: skip
WORKERS = ("backend", "frontend", "ops")
START, TIMELINE, GRANT = time.monotonic(), [], "leased {resource} (fencing token {fencing_token})"
PLANS = {  # task -> the model's turns (tool calls), then "Done."
    "kick-off": [[call("assign", worker="backend", task="add checkout"),
                  call("assign", worker="frontend", task="add render")],
                 [call("assign", worker="ops", task="ship it")]],
    "add checkout": [[call("edit_file", path="app.py", line="def checkout(): ...")]],
    "add render": [[call("edit_file", path="app.py", line="def render(): ...")]],
    "ship it": [[call("deploy", env="prod", skip_tests=True)], [call("deploy", env="prod")]],
}  # fmt: skip


def note(who: str, what: str) -> None:
    TIMELINE.append(f"  +{(time.monotonic() - START) * 1000:4.0f} ms  {who:<10} {what}")


class Scripted(BaseChatModel):
    """A fake chat model that plays ``PLANS[task]``."""

    _llm_type = "scripted"

    def bind_tools(self, tools: Any, **kwargs: Any) -> Scripted:
        return self

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        turns = PLANS[str(messages[0].content)]  # the task
        turn = sum(isinstance(m, AIMessage) for m in messages)
        if isinstance(last := messages[-1], ToolMessage) and last.status == "error":
            note(resolve_identity().agent_id, f"reads: {last.content}")
        reply = AIMessage("", tool_calls=turns[turn]) if turn < len(turns) else AIMessage("Done.")
        return ChatResult(generations=[ChatGeneration(message=reply)])


def build_team(kw: Klockwork, repo: Path) -> Any:
    @tool
    def edit_file(path: str, line: str) -> str:
        """Append a line to a file of the repository."""
        text = (repo / path).read_text()
        time.sleep(0.15)  # the model "thinks" between read and write: the race window
        (repo / path).write_text(text + line + "\n")
        note(resolve_identity().agent_id, f"wrote {line!r} to {path}")
        return f"added {line!r} to {path}"

    @tool
    def deploy(env: str, skip_tests: bool = False) -> str:
        """Deploy the repository (after its tests, unless skip_tests)."""
        note("ops", f"deployed to {env}")
        return f"deployed to {env}"

    mw = KlockworkMiddleware(kw, resources={"edit_file": "FILE:{path}"}, gates={"deploy": "deploy"},
                             approval_timeout_s=10)  # fmt: skip
    tools = [edit_file, deploy]
    workers = {n: create_agent(Scripted(), tools, middleware=[mw], name=n) for n in WORKERS}

    @tool
    def assign(worker: str, task: str) -> str:
        """Hand a task to a worker; returns its report."""
        note("supervisor", f"-> {worker}: {task}")
        out = workers[worker].invoke({"messages": [("user", task)]})
        return str(out["messages"][-1].content)

    return create_agent(Scripted(), [assign], name="supervisor")


def lead(kw: Klockwork, stop: threading.Event) -> None:
    """The team lead, in another thread: reviews what waits for approval."""
    while not stop.wait(0.01):
        for pending in kw.approvals.list():
            note(pending.requester, f"waits for approval ({pending.policy_name})")
            try:
                kw.approvals.approve(pending.approval_id, approver="ops")
            except NotAnApproverError:
                note("ops", "tries to approve its own deploy: refused (NotAnApproverError)")
            kw.approvals.approve(pending.approval_id, approver="lead", comment="LGTM")
            note("lead", f"approves {pending.action}: LGTM")


def main() -> int:
    kw, stop = Klockwork(), threading.Event()
    [kw.policies.add(p) for p in POLICIES]
    kw.add_listener(lambda e: "granted" in e.kind and note(e.agent_id, GRANT.format(**e.data)))
    reviewer = threading.Thread(target=lead, args=(kw, stop), daemon=True)
    reviewer.start()
    with tempfile.TemporaryDirectory(prefix="klockwork-team-") as name:
        (Path(name) / "app.py").write_text("def main(): ...\n")
        out = build_team(kw, Path(name)).invoke({"messages": [("user", "kick-off")]})
        stop.set()
        reviewer.join()
        app = (Path(name) / "app.py").read_text()
    print("Timeline (ms since start):", *TIMELINE, sep="\n")
    print("app.py after the team:\n    " + app.rstrip().replace("\n", "\n    "))
    verified, kinds = kw.audit.verify(), [e.kind for e in kw.audit.query(limit=500).entries]
    shipped = sum("deployed to prod" in line for line in TIMELINE)
    voters = [[d.approver for d in a.decisions] for a in kw.approvals.list(status=None)]
    print("Audit trail:", ", ".join(f"{k} x{kinds.count(k)}" for k in dict.fromkeys(kinds)))
    checks = {
        "no lost edit: both functions are in app.py": "checkout" in app and "render" in app,
        "the untested deploy was refused": kinds.count("action.denied") == 1,
        "approved by the lead, deployed once": voters == [["lead"]] and shipped == 1,
        "audit chain verified": verified.valid,
        "the supervisor finished": out["messages"][-1].content == "Done.",
    }
    print(*(f"  {'ok  ' if ok else 'FAIL'} {what}" for what, ok in checks.items()), sep="\n")
    kw.close()
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
