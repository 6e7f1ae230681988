"""The store's side of the Redis audit journal: record transitions' sections, appends.

What a journal row is, and the Lua that writes rows with a decision:
:mod:`.journal`. Here: :class:`RedisSection` collects the entries a record
transition records while it runs (``RECORD_CAS`` writes them with the
record, or not at all), and :class:`RedisJournal` gives the store
``journal_section`` / ``append_journal`` and wakes the sealer after a
script that wrote entries.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from klockwork.core.errors import StoreUnavailableError
from klockwork.core.stores.base import AuditJournal
from klockwork.core.stores.redis import scripts

__all__ = ["RedisJournal", "RedisSection"]


class RedisSection:
    """The audit entries a record transition records, sent with its compare-and-set.

    Used as ``with section:``, it is this thread's section for the block
    (what :meth:`RedisJournal.journal_section` answers; an outer one is
    restored after it). :meth:`append` answers 0 for the seq: Redis assigns
    it when the transition's script commits (nothing reads the seq of an
    entry recorded inside a transition).
    """

    __slots__ = ("_journal", "_local", "_outer", "rows")

    def __init__(self, journal: AuditJournal | None, local: threading.local | None = None) -> None:
        self._journal = journal
        self._local = local
        self._outer: RedisSection | None = None
        #: The journal rows (JSON texts) collected so far.
        self.rows: list[str] = []

    def __enter__(self) -> RedisSection:
        if self._local is not None:
            self._outer = getattr(self._local, "section", None)
            self._local.section = self
        return self

    def __exit__(self, *exc: object) -> None:
        if self._local is not None:
            self._local.section = self._outer

    def append(
        self,
        ts: int,
        kind: str,
        agent_id: str | None,
        session_id: str | None,
        data: Any,
        how: Any,
    ) -> int:
        """Keep one entry for the transition's script; 0: its seq is not known yet.

        Raises:
            StoreUnavailableError: no audit trail is attached to the store.
            InvalidRequestError: the data cannot be stored as UTF-8 text.
        """
        journal = self._journal
        if journal is None:
            raise StoreUnavailableError("no audit trail is attached to this store")
        self.rows.append(json.dumps([ts, kind, agent_id, session_id, journal.text(data, how)]))
        return 0


class RedisJournal:
    """The journal half of :class:`~klockwork.core.stores.redis.store.RedisStore`."""

    journal: AuditJournal | None

    def _init_journal(self) -> None:
        self._journal_local = threading.local()

    if TYPE_CHECKING:  # what RedisStore provides

        def _call(
            self,
            source: str,
            args: Sequence[str],
            doing: str,
            now_ms: int | None = None,
            *,
            mutating: bool = True,
            rid: str | None = None,
        ) -> Any: ...

    def journal_section(self) -> RedisSection | None:
        """The record transition running on this thread, if any (its entries join it)."""
        section: RedisSection | None = getattr(self._journal_local, "section", None)
        return section

    def _journal_section(self) -> RedisSection:
        """A section for a record transition: ``with`` it around the transition."""
        return RedisSection(self.journal, self._journal_local)

    def _journaled(self, res: Any) -> None:
        """After a script: if it journaled entries, have the sealer chain them."""
        if "j" in res:
            journal = self.journal
            if journal is not None:
                journal.committed()

    def append_journal(
        self, entries: Sequence[tuple[int, str, str | None, str | None, Any, Any]]
    ) -> list[int]:
        """Store audit entries ``(ts, kind, agent_id, session_id, data, how)`` in one script.

        Exactly once, as every mutating call (its request id): a retried
        call whose first reply was lost does not write them twice.

        Returns:
            Their seqs.

        Raises:
            StoreUnavailableError: Redis cannot answer (nothing was written,
                or the entries were and the reply was lost twice).
        """
        section = RedisSection(self.journal)
        for entry in entries:
            section.append(*entry)
        res = self._call(scripts.JOURNAL, section.rows, "record audit entries")
        self._journaled(res)
        return [int(seq) for seq in res.get("j", ())]
