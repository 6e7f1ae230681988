"""A planner hands tasks to two worker agents in other processes, over the bus.

Two worker processes (this file, ``worker``) take the planner's tasks through
one consumer group (each task to one worker), run their agent and ack, or nack
with the error: ``flaky`` fails once and comes back as attempt 2, ``poison``
always fails and after ``max_deliveries=2`` is a dead letter on ``tasks.dead``.
The planner agent sends and awaits with ``bus_tools``; fake chat models, offline.
Run: ``.venv/bin/python examples/handoff.py`` (a SQLite file; exit 0 when the
story holds), or ``... handoff.py --url redis://127.0.0.1:6379/0`` to hand over
through Redis (``make demo-redis``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from _demo_store import demo_store, url_argument
from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool

from klockwork import Klockwork
from klockwork.integrations.langchain import bus_tools

TASKS = {"t1": "report", "t2": "flaky", "t3": "poison", "t4": "summary"}


class RuleModel(BaseChatModel):
    """A fake chat model: replays ``script`` (the planner), or follows rules (a worker)."""

    script: tuple[AIMessage, ...] = ()
    _llm_type = "rules"

    def bind_tools(self, tools: Any, **kwargs: Any) -> RuleModel:
        return self  # the rules already know the tools

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        if self.script:
            reply = self.script[sum(isinstance(m, AIMessage) for m in messages)]
        elif isinstance(last := messages[-1], HumanMessage):  # a task: solve it
            reply = call("solve", **json.loads(str(last.content)))
        elif isinstance(last, ToolMessage) and last.name == "solve":  # report the answer
            answer = {**json.loads(str(messages[0].content)), "answer": last.content}
            reply = call("send_message", channel="results", message=answer)
        else:
            reply = AIMessage("Reported.")
        return ChatResult(generations=[ChatGeneration(message=reply)])


def call(name: str, **args: Any) -> AIMessage:
    return AIMessage("", tool_calls=[{"name": name, "args": args, "id": f"{name}-{args}"}])


def worker(url: str, name: str) -> int:
    """Take tasks through the ``workers`` group until the planner says stop."""

    @tool
    def solve(task: str, kind: str, attempt: int) -> str:
        """Do one task."""
        if kind == "poison":
            raise ValueError(f"cannot parse task {task}: malformed input")
        if kind == "flaky" and attempt == 1:
            raise TimeoutError("upstream timed out")  # and recovers by the next attempt
        time.sleep(0.2)  # working (meanwhile the other worker takes the next task)
        return f"{kind} done"

    with Klockwork.open(url) as kw:
        agent = create_agent(RuleModel(), [solve, *bus_tools(kw, channels=["results"])], name=name)
        kw.bus.publish("ready", {"worker": name})
        while not kw.bus.peek("control"):
            for d in kw.bus.subscribe("tasks", "workers", name, max_messages=1, wait_s=0.2):
                task = {"task": d.payload["task"], "kind": d.payload["kind"], "attempt": d.attempt}
                what = f"  {name}: {task['task']} attempt {d.attempt}"
                try:
                    agent.invoke({"messages": [HumanMessage(json.dumps(task))]})
                except Exception as exc:
                    print(f"{what} failed ({exc}) -> nack", flush=True)
                    kw.bus.nack("tasks", "workers", [d], error=str(exc))
                else:
                    print(f"{what} done -> ack", flush=True)
                    kw.bus.ack("tasks", "workers", [d])
    return 0


def planner(kw: Klockwork, url: str) -> dict[str, Any]:
    """Start two workers, hand out the tasks, wait for every outcome; return what arrived."""
    kw.bus.create_group("tasks", "workers", visibility_timeout_s=5, max_deliveries=2)
    kw.bus.create_group("ready", "planner", start="earliest")
    sends = [call("send_message", channel="tasks", message={"task": t, "kind": k}).tool_calls[0]
             for t, k in TASKS.items()]  # fmt: skip
    script = (
        AIMessage("", tool_calls=sends),
        call("wait_for_messages", channels=["results", "tasks.dead"], mode="at_least", n=4),
        AIMessage("Every task is settled."),
    )
    tools = bus_tools(kw, channels=["tasks", "results", "tasks.dead"])
    agent = create_agent(RuleModel(script=script), tools, name="planner")
    args = [sys.executable, __file__, "worker", url]
    workers = [subprocess.Popen([*args, f"worker-{i}"]) for i in (1, 2)]
    try:
        ready = kw.bus.await_channels(["ready"], "at_least", 2, group="planner", wait_s=120)
        print(f"planner: {ready.count} workers ready; 4 tasks -> 'tasks' (group 'workers')")
        state = agent.invoke({"messages": [("user", "Hand out the tasks, collect results.")]})
        print(f"planner: {state['messages'][-1].content}")
        kw.bus.publish("control", {"stop": True})
        codes = [w.wait(timeout=60) for w in workers]
    finally:
        _ = [w.kill() for w in workers if w.poll() is None]  # never leave one behind
    waited = [m for m in state["messages"] if getattr(m, "name", "") == "wait_for_messages"]
    return {**json.loads(str(waited[0].content)), "codes": codes}


def check(kw: Klockwork, seen: dict[str, Any]) -> bool:
    """Print what the planner got; True if the story held."""
    results = [m["message"] for m in seen["messages"]["results"]]
    dead = [m["message"] for m in seen["messages"]["tasks.dead"]]
    print("planner: results and dead letters, awaited with mode='at_least', n=4:")
    for r in results:
        print(f"  result  {r['task']} ({r['kind']}) attempt {r['attempt']}: {r['answer']}")
    for d in dead:
        print(f"  dead    {d['message']['payload']['task']} x{d['attempts']}: {d['last_error']}")
    return bool(
        seen["satisfied"]
        and seen["codes"] == [0, 0]
        and sorted((r["task"], r["attempt"]) for r in results) == [("t1", 1), ("t2", 2), ("t4", 1)]
        and [(d["message"]["payload"]["task"], d["attempts"]) for d in dead] == [("t3", 2)]
        and all("malformed input" in d["last_error"] for d in dead)
        and all(g.pending == 0 for g in kw.bus.groups("tasks"))
    )


def main() -> int:
    if sys.argv[1:2] == ["worker"]:
        return worker(sys.argv[2], sys.argv[3])
    with demo_store(url_argument(sys.argv[1:]), "handoff") as url, Klockwork.open(url) as kw:
        print(f"Bus shared by the planner and the worker processes: {url.split('?')[0]}")
        ok = check(kw, planner(kw, url))
    print("The hand-off held." if ok else "Something went wrong.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
