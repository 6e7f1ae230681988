"""Governance records on Redis: compare-and-set transitions, one version per record.

``update_record`` reads the record and its version, runs the pure
transition in Python, and writes the result with a Lua compare-and-set of
the version (:data:`.scripts.RECORD_CAS`). Two processes voting at once
both read version 3; the first write makes it 4, the second finds 4 and
starts again from the record as it now is, so each transition applies to
the last one and a decision is made exactly once::

    1. A and B read approval v3 (pending, 0 votes of a quorum of 1)
    2. A's transition: approved; CAS(v3 -> v4) succeeds
    3. B's transition: approved; CAS(v3 -> v4) fails (v4 stored)
    4. B re-reads v4 (approved by A) and its transition says so

Transitions are pure (see :data:`~klockwork.core.stores.base.Transition`),
so running one again on a newer record is safe.

Retention: the settled records of each kind in ``RETAINED_KINDS`` beyond
the newest ``retain_inactive`` are deleted in batches (the same rule as
the other stores, ``stores.base.in_play``), each with a compare-and-set of
the version it was judged by, so a record that changed meanwhile stays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from klockwork.core.errors import StoreUnavailableError
from klockwork.core.stores.base import RETAINED_KINDS, Transition, in_play, record_status
from klockwork.core.stores.redis import scripts

if TYPE_CHECKING:
    from klockwork.core.stores.redis.connection import RedisConnection

__all__ = ["RedisRecords"]

_M = TypeVar("_M", bound=BaseModel)
_T = TypeVar("_T")

#: How many times a transition is tried against concurrent writers before
#: the store gives up (fails closed): contention on one record is brief.
CAS_TRIES = 100
#: Retention prunes a kind once it holds this many records beyond the limit
#: (at most; fewer when the limit is small): amortised O(1) per record.
PRUNE_BATCH = 1024


def _text(value: bytes | str | None) -> str | None:
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

    def _read(self, doing: str, *keys: str, fields: Sequence[str]) -> list[list[Any]]:
        """``HMGET key fields`` of each key in one round trip."""
        with self._conn.translated(doing):
            self._check_open()
            pipe = self._conn.sync.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(key, *fields)
            return list(pipe.execute())

    def update_record(
        self, kind: str, key: str, model: type[_M], transition: Transition[_M, _T]
    ) -> _T:
        """See :meth:`Store.update_record`: a compare-and-set of the record's version."""
        rk = self._conn.key("rec", kind, key)
        doing = f"update a {kind} record"
        for _ in range(CAS_TRIES):
            ((version, body),) = self._read(doing, rk, fields=("v", "b"))
            current = None if body is None else model.model_validate_json(body)
            new, result = transition(current)
            if new is current:
                return result  # nothing to write: the read was the transition
            args = [kind, key, _text(version) or "0"]
            if new is None:
                args += ["del", "", ""]
            else:
                args += ["put", record_status(new) or "", new.model_dump_json()]
            res = self._call(scripts.RECORD_CAS, args, doing)
            if res["ok"]:
                count = int(res["count"])
                if count and kind in RETAINED_KINDS:
                    if count > self._retain + min(PRUNE_BATCH, self._retain):
                        self._prune_records(kind, model)
                return result
        raise StoreUnavailableError(
            f"redis store: the {kind} record {key!r} kept changing under {CAS_TRIES} tries"
        )

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
        with conn.translated(f"list {kind} records"):
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
        with conn.translated(doing):
            index = conn.key("ridx", kind)
            excess = conn.sync.zcard(index) - self._retain
            if excess <= 0:
                return
            keys = [_text(k) or "" for k in conn.sync.zrange(index, 0, excess - 1)]
        found = self._read(doing, *(conn.key("rec", kind, k) for k in keys), fields=("v", "b"))

        def status_of(linked_kind: str, linked_key: str) -> str | None:
            ((st,),) = self._read(doing, conn.key("rec", linked_kind, linked_key), fields=("s",))
            return _text(st) or None

        for key, (version, body) in zip(keys, found, strict=True):
            if body is None or in_play(model.model_validate_json(body), status_of):
                continue
            # A CAS on the version it was judged by: a record changed since stays.
            self._call(scripts.RECORD_CAS, [kind, key, _text(version) or "0", "del", "", ""], doing)
