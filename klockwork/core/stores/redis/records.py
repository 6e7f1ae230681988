"""Governance records on Redis: compare-and-set transitions, one version per record.

``update_record`` takes the record's lock and reads it with its version
(:data:`.scripts.RECORD_LOCK`, one script), runs the transition in Python,
and writes the result with a Lua compare-and-set of the version that also
releases the lock (:data:`.scripts.RECORD_CAS`). Two processes voting at
once are served one after the other, each seeing the last::

    1. A locks approval v3 (pending, 0 votes of a quorum of 1) and reads it
    2. B finds it locked and waits (backing off from 0.5 ms to 20 ms)
    3. A's transition: approved (its entry approval.decided kept aside);
       CAS(v3 -> v4) writes the record and the entry, unlocks
    4. B locks and reads v4 (approved by A): its transition says so

Why a lock and not only the version CAS: transitions record audit entries
as they decide (inside the atomic section, as the other stores run them),
so a transition must run once per change, never again after losing a
race. The entries it records are collected (:class:`.journaling.RedisSection`)
and sent with the CAS, which writes them only if it succeeds: a decision
whose write never reached Redis leaves no entry. The version CAS still
guards the write: a lock that expired under a transition slower than its
lifetime fails closed instead of writing (record and entries alike).

Retention: the settled records of each kind in ``RETAINED_KINDS`` beyond
the newest ``retain_inactive`` are deleted in batches (the same rule as
the other stores, ``stores.base.in_play``), each with a compare-and-set of
the version it was judged by, so a record that changed meanwhile stays.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from klockwork.core.errors import StoreUnavailableError
from klockwork.core.stores.base import RETAINED_KINDS, Transition, in_play, record_status
from klockwork.core.stores.redis import scripts

if TYPE_CHECKING:
    from klockwork.core.stores.redis.connection import RedisConnection
    from klockwork.core.stores.redis.journaling import RedisSection

__all__ = ["RedisRecords"]

_M = TypeVar("_M", bound=BaseModel)
_T = TypeVar("_T")

#: How long a record's lock lives (ms): far longer than any transition (pure
#: functions, plus an in-process audit append); a crashed holder's lock
#: frees itself after it.
LOCK_MS = 10_000
#: How long a transition waits for a record locked by another (s) before the
#: store fails closed.
LOCK_WAIT_S = 10.0
#: Retention prunes a kind once it holds this many records beyond the limit
#: (at most; fewer when the limit is small): amortised O(1) per record.
PRUNE_BATCH = 1024


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class RedisRecords:
    """The record primitives of :class:`~klockwork.core.stores.redis.store.RedisStore`."""

    _conn: RedisConnection
    _retain: int

    def _call(
        self,
        source: str,
        args: Sequence[str],
        doing: str,
        now_ms: int | None = None,
        *,
        mutating: bool = True,
    ) -> Any:
        raise NotImplementedError  # RedisStore's

    def _check_open(self) -> None:
        raise NotImplementedError  # RedisStore's

    def _io(self, doing: str) -> AbstractContextManager[None]:
        raise NotImplementedError  # RedisStore's

    def _read(self, doing: str, *keys: str, fields: Sequence[str]) -> list[list[Any]]:
        """``HMGET key fields`` of each key in one round trip."""
        with self._io(doing):
            self._check_open()
            pipe = self._conn.sync.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(key, *fields)
            return list(pipe.execute())

    def _new_ids(self, n: int) -> list[str]:
        raise NotImplementedError  # RedisStore's

    if TYPE_CHECKING:  # RedisJournal's (a stub here would hide it: it comes later)

        def _journal_section(self) -> RedisSection: ...

        def _journaled(self, res: Any) -> None: ...

    def _lock(self, kind: str, key: str, token: str, doing: str) -> Any:
        """Take the record's lock (waiting for another holder) and read it: ``{v, b}``."""
        args = [kind, key, token, str(LOCK_MS)]
        deadline = time.monotonic() + LOCK_WAIT_S
        pause = 0.0005
        while True:
            res = self._call(scripts.RECORD_LOCK, args, doing, mutating=False)
            if not res.get("busy"):
                return res
            if time.monotonic() > deadline:
                raise StoreUnavailableError(
                    f"redis store: the {kind} record {key!r} stayed locked by another "
                    f"transition for {LOCK_WAIT_S:g} s"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def update_record(
        self, kind: str, key: str, model: type[_M], transition: Transition[_M, _T]
    ) -> _T:
        """See :meth:`Store.update_record`: under the record's lock, then a version CAS."""
        doing = f"update a {kind} record"
        token = self._new_ids(1)[0]
        res = self._lock(kind, key, token, doing)
        version, body = res["v"], res["b"]
        try:
            # The entries the transition records are kept for the CAS (below).
            with self._journal_section() as section:
                current = None if body is None else model.model_validate_json(body)
                new, result = transition(current)
        except BaseException:
            self._call(scripts.RECORD_UNLOCK, [kind, key, token], doing, mutating=False)
            raise
        entries = section.rows
        if new is current and not entries:  # nothing to write
            self._call(scripts.RECORD_UNLOCK, [kind, key, token], doing, mutating=False)
            return result
        args = [kind, key, version]
        if new is current:  # only entries to write
            args += ["keep", "", ""]
        elif new is None:
            args += ["del", "", ""]
        else:
            args += ["put", record_status(new) or "", new.model_dump_json()]
        res = self._call(scripts.RECORD_CAS, [*args, token, *entries], doing)
        self._journaled(res)
        if not res["ok"]:
            # Only if the lock expired under a transition slower than LOCK_MS:
            # running it again could record its effects twice, so fail closed.
            raise StoreUnavailableError(
                f"redis store: the {kind} record {key!r} changed during a transition "
                f"that outlived its {LOCK_MS} ms lock; nothing was written"
            )
        count = int(res["count"])
        if (
            count
            and kind in RETAINED_KINDS
            and count > self._retain + min(PRUNE_BATCH, self._retain)
        ):
            self._prune_records(kind, model)
        return result

    def get_record(self, kind: str, key: str, model: type[_M]) -> _M | None:
        """See :meth:`Store.get_record`."""
        ((body,),) = self._read(
            f"read a {kind} record", self._conn.key("rec", kind, key), fields=("b",)
        )
        return None if body is None else model.model_validate_json(body)

    def list_records(self, kind: str, model: type[_M], status: str | None = None) -> list[_M]:
        """See :meth:`Store.list_records`: in creation order, through a per-status index."""
        conn = self._conn
        index = conn.key("ridx", kind) if status is None else conn.key("rst", kind, status)
        with self._io(f"list {kind} records"):
            self._check_open()
            keys = [_text(k) or "" for k in conn.sync.zrange(index, 0, -1)]
        if not keys:
            return []
        found = self._read(
            f"list {kind} records", *(conn.key("rec", kind, k) for k in keys), fields=("b", "s")
        )
        return [
            model.model_validate_json(body)
            for body, st in found
            if body is not None and (status is None or _text(st) == status)
        ]

    def _prune_records(self, kind: str, model: type[BaseModel]) -> None:
        """Delete the oldest settled records of ``kind`` beyond the newest ``retain``."""
        conn = self._conn
        doing = f"prune {kind} records"
        with self._io(doing):
            index = conn.key("ridx", kind)
            excess = conn.sync.zcard(index) - self._retain
            if excess <= 0:
                return
            keys = [_text(k) or "" for k in conn.sync.zrange(index, 0, excess - 1)]
        found = self._read(doing, *(conn.key("rec", kind, k) for k in keys), fields=("v", "b"))

        def status_of(linked_kind: str, linked_key: str) -> str | None:
            ((st,),) = self._read(doing, conn.key("rec", linked_kind, linked_key), fields=("s",))
            return _text(st) or None

        for key, (_, body) in zip(keys, found, strict=True):
            if body is None or in_play(model.model_validate_json(body), status_of):
                continue
            # Under the record's lock (skipped if busy: it is changing, so
            # perhaps back in play), by the version it is judged by now.
            token = self._new_ids(1)[0]
            res = self._call(
                scripts.RECORD_LOCK, [kind, key, token, str(LOCK_MS)], doing, mutating=False
            )
            if res.get("busy"):
                continue
            if res["b"] is None or in_play(model.model_validate_json(res["b"]), status_of):
                self._call(scripts.RECORD_UNLOCK, [kind, key, token], doing, mutating=False)
                continue
            self._call(scripts.RECORD_CAS, [kind, key, res["v"], "del", "", "", token], doing)
