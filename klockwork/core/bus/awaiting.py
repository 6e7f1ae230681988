"""``await_channels``: wait for any / all / at least n messages across channels.

One :class:`AwaitCall` per call holds what it has seen so far; each try
asks the store only for what is still missing (:meth:`AwaitCall._wants`),
and the sync and async drivers only do the I/O. With a group, what the
call takes stays *pending* until the condition holds: then it is acked
(consumed) in one go; if the wait runs out, or the caller is cancelled or
interrupted, it is handed back with its attempt undone, so a timed-out
await consumes nothing.

An await with a ``key`` is idempotent: its satisfied result is stored
(record kind ``bus.await``) *before* the deliveries are acked, so a step
that crashes after the ack and runs again gets the same messages back
instead of consuming new ones.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from klockwork.core.bus.model import (
    AWAIT_MODES,
    AwaitResult,
    Message,
    channel_list,
    check_channel,
    check_dedup_key,
    check_group_name,
)
from klockwork.core.bus.rules import await_satisfied
from klockwork.core.bus.waiting import Attempt, Waiting
from klockwork.core.errors import InvalidRequestError
from klockwork.core.validation import check_int, check_timeout

if TYPE_CHECKING:
    from klockwork.core.bus.channels import Bus

__all__ = ["AWAIT_RECORD", "AwaitCall", "AwaitRecord"]

#: The record kind an idempotent await's result is stored under.
AWAIT_RECORD = "bus.await"
#: Most messages one await takes from one channel.
_PER_CHANNEL = 100


class AwaitRecord(BaseModel):
    """A satisfied, keyed await: what it returned (retention prunes old ones)."""

    model_config = ConfigDict(frozen=True)

    key: str
    status: str = "done"
    channel_order: list[str]
    messages: dict[str, list[dict[str, Any]]]
    created_at_ms: int


class AwaitCall:
    """One ``await_channels`` call (arguments checked on construction)."""

    def __init__(
        self,
        bus: Bus,
        channels: Sequence[str],
        mode: object,
        n: object,
        group: str | None,
        wait_s: object,
        consumer: str,
        after: Mapping[str, int] | None,
        key: str | None,
    ) -> None:
        self._bus = bus
        self.channels = channel_list(channels)
        if not isinstance(mode, str) or mode not in AWAIT_MODES:
            raise InvalidRequestError("mode", mode, "expected 'any', 'all' or 'at_least'")
        self.mode = mode
        self.n = check_int(n, "n", low=1, high=_PER_CHANNEL * len(self.channels))
        self.group = None if group is None else check_group_name(group, "group")
        self.consumer = check_group_name(consumer, "consumer")
        timeout = check_timeout(wait_s, "wait_s")
        self.wait_s = 0.0 if timeout is None else timeout
        if key is not None and self.group is None:
            raise InvalidRequestError("key", key, "an idempotent await needs a group")
        self.key = None if key is None else self._scoped(check_dedup_key(key))
        self.after = self._check_after(after)
        self.seen: dict[str, list[Message]] = {c: [] for c in self.channels}
        self._visibility_ms: dict[str, int] = {}

    def _scoped(self, key: str) -> str:
        """The record key: ``key`` within this group and these channels.

        The same key used by an await of another group or other channels
        is another await, not this one's stored result.
        """
        scope = json.dumps([self.group, self.channels, key], separators=(",", ":"))
        return hashlib.sha256(scope.encode()).hexdigest()

    def _check_after(self, after: Mapping[str, int] | None) -> dict[str, int] | None:
        if after is None:
            return None
        if self.group is not None:
            raise InvalidRequestError("after", after, "a group tracks its own position")
        if not isinstance(after, Mapping):
            raise InvalidRequestError("after", after, "expected {channel: seq}")
        out = {c: 0 for c in self.channels}
        for channel, seq in after.items():
            check_channel(channel, "after")
            out[channel] = check_int(seq, "after")
        return out

    # -- the decisions, shared by both drivers ----------------------------------------------
    def _wants(self) -> list[tuple[str, int]]:
        """(channel, how many to ask for) of this try."""
        counts = {c: len(m) for c, m in self.seen.items()}
        if self.mode == "all":
            return [(c, 1) for c in self.channels if counts[c] == 0]
        if self.mode == "at_least":
            missing = self.n - sum(counts.values())
            return [(c, min(missing, _PER_CHANNEL)) for c in self.channels if missing > 0]
        return [(c, _PER_CHANNEL) for c in self.channels]

    def _done(self) -> bool:
        return await_satisfied(self.mode, self.n, {c: len(m) for c, m in self.seen.items()})

    def _absorb(self, channel: str, messages: list[Message]) -> list[str]:
        """Add what a try saw; return the ids it already held (group awaits)."""
        seen = self.seen[channel]
        again: list[str] = []
        if self.group is not None and seen:
            # A delivery this call holds can time out while it waits and come
            # back to it: the same message, counted once (see _keep_held).
            held = {m.id for m in seen}
            again = [m.id for m in messages if m.id in held]
            messages = [m for m in messages if m.id not in held]
        seen.extend(messages)
        if self.after is not None and messages:
            self.after[channel] = messages[-1].seq
        return again

    def _keep_held(self, channel: str, ids: list[str]) -> None:
        """Deliveries this await held came back to it: take back the attempt, keep holding.

        The store counted a redelivery when the visibility timeout ran out
        under a waiting await; undoing it keeps an await from wearing its
        messages out towards the dead-letter channel. (An await that holds
        messages longer than ``max_deliveries`` timeouts still loses them
        to it: keep ``wait_s`` within the group's visibility timeout.)
        """
        if not ids or self.group is None:
            return
        store = self._bus._store
        if channel not in self._visibility_ms:
            groups = {g.group: g for g in store.bus_groups(channel, self._bus._clock.now_ms())}
            found = groups.get(self.group)
            self._visibility_ms[channel] = (
                round(found.visibility_timeout_s * 1000) if found is not None else 0
            )
        visible_again = self._bus._clock.now_ms() + self._visibility_ms[channel]
        store.bus_nack(channel, self.group, ids, visible_again, None, True, self.consumer)

    def _result(self, satisfied: bool) -> AwaitResult:
        return AwaitResult(satisfied, not satisfied, {c: list(m) for c, m in self.seen.items()})

    def _stored(self, record: AwaitRecord) -> AwaitResult:
        messages = {
            c: [Message(**fields) for fields in record.messages.get(c, [])]
            for c in record.channel_order
        }
        return AwaitResult(True, False, messages)

    def _record(self) -> AwaitRecord:
        assert self.key is not None
        return AwaitRecord(
            key=self.key,
            channel_order=self.channels,
            messages={c: [m.to_dict() for m in ms] for c, ms in self.seen.items()},
            created_at_ms=self._bus._clock.now_ms(),
        )

    def _keep(self, record: AwaitRecord) -> AwaitRecord:
        def create(current: AwaitRecord | None) -> tuple[AwaitRecord, AwaitRecord]:
            return (current, current) if current is not None else (record, record)

        return self._bus._store.update_record(AWAIT_RECORD, record.key, AwaitRecord, create)

    def _ids(self) -> dict[str, list[str]]:
        return {c: [m.id for m in ms] for c, ms in self.seen.items() if ms}

    # -- sync driver -------------------------------------------------------------------------------
    def run(self) -> AwaitResult:
        """Wait (this thread), then consume or hand back."""
        store = self._bus._store
        if self.key is not None:
            done = store.get_record(AWAIT_RECORD, self.key, AwaitRecord)
            if done is not None:
                return self._settle_stored(done)
        if self.group is None and self.after is None:
            self.after = store.bus_last_seqs(self.channels)
        try:
            satisfied = self._waiting().run(self._attempt)
        except BaseException:
            self._hand_back()
            raise
        if not satisfied:
            self._hand_back()
            return self._result(False)
        if self.key is not None:
            return self._settle_stored(self._keep(self._record()))
        self._ack()
        return self._result(True)

    def _waiting(self) -> Waiting[bool]:
        bus = self._bus
        keys = tuple("bus:" + c for c in self.channels)
        channels = tuple(self.channels)
        return Waiting(bus._store, bus._clock, bus._signals, keys, self.wait_s, channels)

    def _attempt(self) -> Attempt[bool]:
        due: int | None = None
        for channel, count in self._wants():
            if self.group is None:
                assert self.after is not None
                self._absorb(channel, self._bus.peek(channel, self.after[channel], count))
                continue
            out = self._bus._store.bus_read(
                *self._bus._read_args(channel, self.group, self.consumer, count)
            )
            got = [d.message for d in self._bus._deliveries(out, self.group, self.consumer)]
            self._keep_held(channel, self._absorb(channel, got))
            due = _earliest(due, out.next_due_ms)
        done = self._done()
        return done, done, due

    def _settle_stored(self, record: AwaitRecord) -> AwaitResult:
        result = self._stored(record)
        self.seen = {c: list(ms) for c, ms in result.messages.items()}
        self._ack()  # again, in case the first run stopped between storing and acking
        return result

    def _ack(self) -> None:
        if self.group is None:  # without a group nothing was taken
            return
        for channel, ids in self._ids().items():
            self._bus._store.bus_ack(channel, self.group, ids)

    def _hand_back(self) -> None:
        if self.group is None:
            return
        now = self._bus._clock.now_ms()
        for channel, ids in self._ids().items():
            self._bus._store.bus_nack(channel, self.group, ids, now, None, True, self.consumer)

    # -- async driver ------------------------------------------------------------------------------
    async def arun(self) -> AwaitResult:
        """Async twin of :meth:`run`: store calls off the loop, only this task waits."""
        run_io = self._bus._store.run_io
        if self.key is not None:
            done = await run_io(self._bus._store.get_record, AWAIT_RECORD, self.key, AwaitRecord)
            if done is not None:
                return await run_io(self._settle_stored, done)
        if self.group is None and self.after is None:
            self.after = await run_io(self._bus._store.bus_last_seqs, self.channels)
        try:
            satisfied = await self._waiting().arun(self._aattempt)
        except BaseException:
            await run_io(self._hand_back)
            raise
        if not satisfied:
            await run_io(self._hand_back)
            return self._result(False)
        if self.key is not None:
            record = await run_io(self._keep, self._record())
            return await run_io(self._settle_stored, record)
        await run_io(self._ack)
        return self._result(True)

    async def _aattempt(self) -> Attempt[bool]:
        due: int | None = None
        for channel, count in self._wants():
            if self.group is None:
                assert self.after is not None
                got = await self._bus.apeek(channel, self.after[channel], count)
                self._absorb(channel, got)
                continue
            out = await self._bus._aread(channel, self.group, self.consumer, count)
            got = [d.message for d in self._bus._deliveries(out, self.group, self.consumer)]
            again = self._absorb(channel, got)
            if again:
                await self._bus._store.run_io(self._keep_held, channel, again)
            due = _earliest(due, out.next_due_ms)
        done = self._done()
        return done, done, due


def _earliest(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None else min(a, b)
