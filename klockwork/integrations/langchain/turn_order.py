"""Calls of one model turn that touch the same resource take it in tool-call order.

Leases already keep two such calls from overlapping; this makes the order
deterministic: the call listed first in the model's message goes first,
whichever thread LangGraph starts first. A call waits (before it asks for
its lease) until every earlier call of its turn on a shared resource key is
*finished*: it ran, was refused, raised, or paused at an interrupt (a
paused call gives up its place: the later ones do not wait for a human).
Without a checkpointer an approval is waited for inside the call, so the
later calls wait for it too, up to their lease timeout; then they go on
and the lease alone orders them.

A resumed run may not run again a sibling that finished before the pause
(LangGraph keeps finished tasks' writes). So a finished call that a later
one waits for is also recorded in the store (record kind ``tool_call``,
retention-pruned), and a waiter looks there too. Only turns that list
several calls on one key pay anything: one store write per such call.

A waiter never waits longer than the call's lease timeout; then it goes on
and the lease alone orders the calls.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from langchain_core.messages import AIMessage
from pydantic import BaseModel, ConfigDict

from klockwork.core.clock import SystemClock
from klockwork.core.engine import Klockwork
from klockwork.core.notify import Signals

__all__ = ["TOOL_CALL_RECORD", "CallOrder", "TurnOrder"]

#: Record kind of a finished call that a later call of its turn waits for.
TOOL_CALL_RECORD = "tool_call"
#: How long a waiter waits when the call has no lease timeout.
_MAX_WAIT_S = 300.0
_REMEMBERED = 10_000
#: Waits are bounded in real time, whatever clock the engine runs on.
_REAL_TIME = SystemClock()


class FinishedCall(BaseModel):
    """A tool call of a multi-call turn that has finished (stored for resumes)."""

    model_config = ConfigDict(frozen=True)

    call_id: str
    status: str = "done"


class CallOrder(NamedTuple):
    """Where one call stands in its turn."""

    call_id: str
    #: Earlier calls of the turn on a key this call uses: wait for them
    #: (a call is named ``<model message id>/<call id>``).
    before: tuple[str, ...]
    #: A later call of the turn uses one of this call's keys: record the finish.
    followed: bool


def turn_message(state: Any, call_id: str | None) -> AIMessage | None:
    """The model message (of the agent's state) that made the tool call ``call_id``."""
    messages = state.get("messages") if isinstance(state, Mapping) else None
    for message in reversed(messages or ()):
        if isinstance(message, AIMessage) and any(
            c.get("id") == call_id for c in message.tool_calls
        ):
            return message
    return None


class TurnOrder:
    """The turn sequencer of one coordinator (see the module docstring)."""

    def __init__(self) -> None:
        self._signals = Signals()
        self._lock = threading.Lock()
        self._finished: OrderedDict[str, None] = OrderedDict()

    def place(
        self,
        state: Any,
        call: Mapping[str, Any],
        keys_of: Callable[[Mapping[str, Any]], set[str]],
    ) -> CallOrder | None:
        """This call's place in its turn, or None when no other call of it shares a key.

        ``keys_of(call)`` gives a call's resource keys; it is not called for
        a turn of one call (the common case pays nothing).
        """
        message = turn_message(state, call["id"])
        if message is None or len(message.tool_calls) < 2:
            return None
        turn, calls = message.id or "", message.tool_calls
        # Call ids are unique within a model message, not forever (scripted
        # models reuse "c1"): a call is known as "<message id>/<call id>".
        mine = keys_of(call)
        if not mine:
            return None
        before: list[str] = []
        followed, seen_self = False, False
        for other in calls:
            if other.get("id") == call["id"]:
                seen_self = True
                continue
            if not mine & keys_of(other):
                continue
            if seen_self:
                followed = True
            else:
                before.append(f"{turn}/{other['id']}")
        if not before and not followed:
            return None
        return CallOrder(f"{turn}/{call['id']}", tuple(before), followed)

    def _done(self, call_id: str, kw: Klockwork) -> bool:
        if call_id in self._finished:
            return True
        return kw.store.get_record(TOOL_CALL_RECORD, call_id, FinishedCall) is not None

    def wait(self, order: CallOrder, kw: Klockwork, timeout_s: float | None) -> None:
        """Block until the earlier calls finished (or the time runs out)."""
        deadline = time.monotonic() + (_MAX_WAIT_S if timeout_s is None else timeout_s)
        while True:
            epoch = self._signals.epoch
            pending = tuple(c for c in order.before if not self._done(c, kw))
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                return
            self._signals.sleep(pending, epoch, left, _REAL_TIME)

    async def await_(self, order: CallOrder, kw: Klockwork, timeout_s: float | None) -> None:
        """Async twin of :meth:`wait` (store reads off the loop)."""
        deadline = time.monotonic() + (_MAX_WAIT_S if timeout_s is None else timeout_s)
        while True:
            epoch = self._signals.epoch
            done = [await kw.store.run_io(self._done, c, kw) for c in order.before]
            pending = tuple(c for c, ok in zip(order.before, done, strict=True) if not ok)
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                return
            await self._signals.asleep(pending, epoch, left, _REAL_TIME)

    def finished(self, order: CallOrder, kw: Klockwork) -> None:
        """The call is over (however it ended): let the later ones go."""
        if order.followed:
            record = FinishedCall(call_id=order.call_id)

            def create(current: FinishedCall | None) -> tuple[FinishedCall, None]:
                return (current or record), None

            # Best effort: the in-process mark below still lets this run go on.
            with contextlib.suppress(Exception):
                kw.store.update_record(TOOL_CALL_RECORD, order.call_id, FinishedCall, create)
        with self._lock:
            self._finished[order.call_id] = None
            while len(self._finished) > _REMEMBERED:
                self._finished.popitem(last=False)
        self._signals.notify(order.call_id)
