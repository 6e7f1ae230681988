"""Helpers shared by the LangChain integration tests."""

from __future__ import annotations

import threading
import time
from typing import Any

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage

from klockwork import Klockwork

#: Registered in every test engine: "old" wins wait-die against "young" (lower = older).
OLD, YOUNG = "old", "young"


class Probe:
    """Records when a tool body ran and how many bodies ran at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inside = 0
        self.max_inside = 0
        self.starts: list[float] = []

    def enter(self) -> None:
        with self._lock:
            self.inside += 1
            self.max_inside = max(self.max_inside, self.inside)
            self.starts.append(time.monotonic())

    def leave(self) -> None:
        with self._lock:
            self.inside -= 1


def release_later(kw: Klockwork, lease_ids: list[str], delay_s: float) -> list[float]:
    """Release ``lease_ids`` from another thread after ``delay_s``; returns [release time]."""
    released: list[float] = []

    def release() -> None:
        released.append(time.monotonic())
        for lease_id in lease_ids:
            kw.leases.release(lease_id)

    timer = threading.Timer(delay_s, release)
    timer.daemon = True
    timer.start()
    return released


class ScriptedModel(GenericFakeChatModel):
    """A fake chat model that replays its script; binding tools changes nothing."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedModel:
        return self


def scripted(*messages: AIMessage | str) -> ScriptedModel:
    """A :class:`ScriptedModel` answering with ``messages`` in order."""
    return ScriptedModel(messages=iter(messages))


def calls_tool(name: str, call_id: str = "c1", **args: Any) -> AIMessage:
    """A model turn that calls one tool."""
    return AIMessage("", tool_calls=[{"name": name, "args": args, "id": call_id}])


class FakeKlock:
    """A stand-in for Klock's own client: its dict API, with real exclusion.

    Wait-die as Klock's server decides it: an older requester gets WAIT, a
    younger one DIE (lower priority = older).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.priority: dict[str, int] = {}
        self.holders: dict[str, tuple[str, str]] = {}  # resource -> (agent, lease id)
        self.calls: list[tuple[str, ...]] = []
        self.next_id = 0

    def register_agent(self, agent_id: str, priority: int) -> None:
        self.priority[agent_id] = priority

    def acquire_lease(
        self, agent_id: str, session_id: str, rtype: str, path: str, predicate: str, ttl_ms: int
    ) -> dict[str, Any]:
        resource = f"{rtype}:{path}"
        with self.lock:
            self.calls.append(("acquire", agent_id, resource, predicate))
            holder = self.holders.get(resource)
            if holder is None or holder[0] == agent_id:
                self.next_id += 1
                lease_id = f"lease-{self.next_id}"
                self.holders[resource] = (agent_id, lease_id)
                return {"success": True, "lease_id": lease_id, "resource": resource}
            older = self.priority.get(agent_id, 10**9) < self.priority.get(holder[0], 10**9)
            return {"success": False, "reason": "WAIT" if older else "DIE", "wait_time": 10}

    def heartbeat_lease(self, lease_id: str) -> bool:
        with self.lock:
            self.calls.append(("heartbeat", lease_id))
            return any(held == lease_id for _, held in self.holders.values())

    def release_lease(self, lease_id: str) -> bool:
        with self.lock:
            self.calls.append(("release", lease_id))
            for resource, (_, held) in list(self.holders.items()):
                if held == lease_id:
                    del self.holders[resource]
                    return True
            return False
