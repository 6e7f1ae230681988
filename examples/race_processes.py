"""Two agent processes, one file: the race of race_two_agents.py, across processes.

Each agent is a ``create_agent`` agent in a process of its own (as on two
machines), with a fake chat model that calls ``append_line(path, line)``
on the same ``notes.md``. The tool reads the file, "thinks" for 100 ms,
then writes it back with its line added. Both processes start together
(a start barrier), so both read before either writes.

Run 1, the plain tool: one edit is lost. Run 2, the same tool under
``@klock_protected("FILE:{path}", predicate="MUTATES", kw=kw)`` where both
processes open **one shared engine** (``Klockwork.open(url)``): the second
agent waits for the first one's lease (or backs off and retries), and both
edits survive. The fencing tokens each agent was granted are printed.

    .venv/bin/python examples/race_processes.py                   # SQLite file
    .venv/bin/python examples/race_processes.py --url redis://127.0.0.1:6379/0
    make demo-redis                                                # the Redis run

Exit code 0 when run 1 lost an edit and run 2 kept both.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _demo_store import demo_store, url_argument
from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.tools import tool

from klockwork import Klockwork
from klockwork.integrations.langchain import klock_protected

AGENTS = ("agent-a", "agent-b")


class ScriptedModel(GenericFakeChatModel):
    """A fake chat model that replays its script; binding tools changes nothing."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedModel:
        return self


def read_modify_write(path: str, line: str) -> str:
    content = Path(path).read_text()
    time.sleep(0.1)  # the agent "works" between reading and writing: the race window
    Path(path).write_text(content + line + "\n")
    return f"appended {line!r}"


def agent_process(name: str, path: str, url: str, protected: bool, go: str) -> int:
    """One agent: wait for the start signal, call append_line once, report its leases."""
    with Klockwork.open(url) as kw:
        tokens: list[int] = []
        kw.add_listener(
            lambda e: tokens.append(e.data["fencing_token"]) if e.kind == "lease.granted" else None
        )
        if protected:

            @tool("append_line")
            @klock_protected("FILE:{path}", predicate="MUTATES", kw=kw)
            def append_line(path: str, line: str) -> str:
                """Append one line to a text file."""
                return read_modify_write(path, line)

        else:

            @tool("append_line")
            def append_line(path: str, line: str) -> str:
                """Append one line to a text file."""
                return read_modify_write(path, line)

        call = {"name": "append_line", "args": {"path": path, "line": f"- {name} was here"},
                "id": f"call-{name}"}  # fmt: skip
        model = ScriptedModel(messages=iter([AIMessage("", tool_calls=[call]), "Done."]))
        agent = create_agent(model, [append_line], name=name)
        print(json.dumps({"ready": name}), flush=True)
        while not Path(go).exists():  # the start barrier: both agents begin together
            time.sleep(0.001)
        started = time.monotonic()
        agent.invoke({"messages": [("user", "Add your line to the notes.")]})
        took = int((time.monotonic() - started) * 1000)
        print(json.dumps({"agent": name, "ms": took, "tokens": tokens}), flush=True)
    return 0


def run_team(url: str, path: Path, protected: bool) -> list[str]:
    """Start both agent processes together; return the file's lines."""
    path.write_text("# notes\n")
    go = path.with_suffix(".go")
    go.unlink(missing_ok=True)
    args = [sys.executable, __file__, "agent"]
    run = [str(path), url, str(int(protected)), str(go)]
    procs = [subprocess.Popen([*args, a, *run], stdout=subprocess.PIPE, text=True) for a in AGENTS]
    try:
        for p in procs:  # each says "ready" once its engine and agent are built
            assert p.stdout is not None
            json.loads(p.stdout.readline())
        go.touch()
        reports = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    finally:
        _ = [p.kill() for p in procs if p.poll() is None]  # never leave one behind
    for r in sorted(reports, key=lambda r: r["ms"]):
        leased = f", lease token {r['tokens']}" if r["tokens"] else ""
        print(f"    {r['agent']} (process) done in {r['ms']} ms{leased}")
    text = path.read_text()
    print("    " + text.rstrip().replace("\n", "\n    "))
    return text.splitlines()


def main(argv: list[str]) -> int:
    if argv[:1] == ["agent"]:
        name, path, url, protected, go = argv[1:6]
        return agent_process(name, path, url, protected == "1", go)
    with demo_store(url_argument(argv), "race") as url, tempfile.TemporaryDirectory() as tmp:
        print(f"Store shared by the agent processes: {url.split('?')[0]}")
        print("Run 1: two agent processes append to notes.md with a plain tool")
        lines = run_team(url, Path(tmp) / "notes.md", protected=False)
        lost = sum(line.endswith("was here") for line in lines) == 1
        print("  -> lost update: only 1 of 2 edits survived\n" if lost else "  -> no edit lost\n")
        print("Run 2: the same tool with @klock_protected('FILE:{path}', predicate='MUTATES')")
        lines = run_team(url, Path(tmp) / "notes.md", protected=True)
        kept = all(f"- {agent} was here" in lines for agent in AGENTS)
        print("  -> both edits survived" if kept else "  -> an edit was lost despite the lease")
    return 0 if lost and kept else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
