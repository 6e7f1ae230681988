"""Two agents, one file: a lost update, then the same tool protected by a klockwork lease.

One LangGraph graph fans out from START to two ``create_agent`` agents,
``agent-a`` and ``agent-b``, which run in parallel. Each one's (fake) chat
model asks for the same tool call, ``append_line(path, line)`` on the same
``notes.md``. The tool reads the file, "thinks" for 100 ms, then writes the
content back with its line added: a classic read-modify-write.

Run 1 uses the plain tool. Both agents read the file before either writes,
so the second write silently overwrites the first: one edit is lost.

Run 2 adds one decorator under ``@tool``::

    @klock_protected("FILE:{path}", predicate="MUTATES", kw=kw)

Now each call holds a MUTATES lease on ``FILE:<path>`` while it runs. The
agent's identity comes from the run config (``create_agent(name=...)`` puts
it there), so the tool's code and signature do not change. The other agent
is refused (wait-die: the older agent waits, the younger backs off and
retries), gets the lease once it is released, and both edits survive. The
lease timeline printed at the end comes from the engine's own events.

Offline: fake chat models, an in-memory engine, no server. The outcome is
deterministic (both agents read within a few ms, well inside the 100 ms
window); which agent goes first, and so WAIT or DIE, varies from run to run.

    make demo                                   # or:
    .venv/bin/python examples/race_two_agents.py

Exit code 0 when run 1 lost an edit and run 2 kept both (a smoke check).
"""

from __future__ import annotations

import sys
import tempfile
import time
from itertools import groupby
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.tools import BaseTool, tool
from langgraph.graph import START, MessagesState, StateGraph

from klockwork import GovernanceEvent, Klockwork
from klockwork.integrations.langchain import klock_protected

AGENTS = ("agent-a", "agent-b")
kw = Klockwork()  # in-memory engine, embedded in this process


def read_modify_write(path: str, line: str) -> str:
    content = Path(path).read_text()
    time.sleep(0.1)  # the agent "works" between reading and writing: the race window
    Path(path).write_text(content + line + "\n")
    return f"appended {line!r}"


@tool
def append_line(path: str, line: str) -> str:
    """Append one line to a text file."""
    return read_modify_write(path, line)


@tool("append_line")
@klock_protected("FILE:{path}", predicate="MUTATES", kw=kw)
def protected_append_line(path: str, line: str) -> str:
    """Append one line to a text file."""
    return read_modify_write(path, line)


class ScriptedModel(GenericFakeChatModel):
    """A fake chat model that replays its script; binding tools changes nothing."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedModel:
        return self


def scripted_model(agent: str, path: Path) -> ScriptedModel:
    """First turn: call append_line on ``path``. Second turn: say it is done."""
    call = {
        "name": "append_line",
        "args": {"path": str(path), "line": f"- {agent} was here"},
        "id": f"call-{agent}",
    }
    return ScriptedModel(messages=iter([AIMessage("", tool_calls=[call]), "Done."]))


def run_team(append_tool: BaseTool, path: Path) -> list[str]:
    """Fan out from START to both agents (they run in parallel); return the file's lines."""
    path.write_text("# notes\n")
    builder = StateGraph(MessagesState)
    for agent in AGENTS:
        model = scripted_model(agent, path)
        builder.add_node(agent, create_agent(model, [append_tool], name=agent))
        builder.add_edge(START, agent)
    builder.compile().invoke({"messages": [("user", "Add your line to the notes.")]})
    text = path.read_text()
    print("    " + text.rstrip().replace("\n", "\n    "))
    return text.splitlines()


def describe(event: GovernanceEvent) -> str:
    kind = event.kind.removeprefix("lease.")  # granted / denied / released
    if kind == "denied":
        resource, predicate = event.data["intents"][0]
        holders = ", ".join(c["agent_id"] for c in event.data["conflicts"])
        return f"{kind:<8}  {predicate} {resource}  {event.data['verdict']}: held by {holders}"
    data = event.data
    return f"{kind:<8}  {data['predicate']} {data['resource']}  token {data['fencing_token']}"


def print_timeline(events: list[GovernanceEvent], tmp: str) -> None:
    """One line per lease event; an agent's back-to-back denials (DIE retries) share one."""
    for (agent, what), group in groupby(events, key=lambda e: (e.agent_id, describe(e))):
        first, *again = group
        tries = f"  ({len(again) + 1} tries)" if again else ""
        print(f"  +{first.ts - events[0].ts:4d} ms  {agent}  {what.replace(tmp, '$TMP')}{tries}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="klockwork-demo-") as tmp:
        print("Run 1: two agents append to notes.md with a plain tool")
        lines = run_team(append_line, Path(tmp) / "notes.md")
        lost = sum(line.endswith("was here") for line in lines) == 1
        print("  -> lost update: only 1 of 2 edits survived\n" if lost else "  -> no edit lost\n")

        print("Run 2: the same tool with @klock_protected('FILE:{path}', predicate='MUTATES')")
        events: list[GovernanceEvent] = []
        kw.add_listener(events.append)
        lines = run_team(protected_append_line, Path(tmp) / "notes.md")
        kept = all(f"- {agent} was here" in lines for agent in AGENTS)
        print("  -> both edits survived\n" if kept else "  -> an edit was lost despite the lease\n")

        print(f"Lease timeline, from the engine's events ($TMP = {tmp}):")
        print_timeline(events, tmp)
    kw.close()
    return 0 if lost and kept else 1


if __name__ == "__main__":
    sys.exit(main())
