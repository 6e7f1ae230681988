"""The audit journal on Redis: entries written in a decision's own script.

Every store script that records audit entries includes :data:`JOURNAL_LUA`,
so an entry and its decision are applied together or not at all; the
sealer (:mod:`klockwork.core.audit.redis`) chains them later. The keys are
``audit:seq`` (the last seq handed out) and ``audit:pending`` (seq → row).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from klockwork.core.stores.base import JournalRow

__all__ = ["JOURNAL_LUA", "journal_args"]

#: Append journal rows (a Lua snippet other scripts may include): ``rows`` is
#: a list of JSON texts ``[ts, kind, agent_id, session_id, data text]``;
#: returns the seqs they were given. Gapless: a script that runs it either
#: completes (every seq has its row) or was never applied.
JOURNAL_LUA = """
local function journal(seq_key, pending_key, rows)
  local seqs = {}
  for i = 1, #rows do
    local seq = redis.call('INCR', seq_key)
    redis.call('HSET', pending_key, seq, rows[i])
    seqs[i] = seq
  end
  return seqs
end
"""


def journal_args(rows: Sequence[JournalRow]) -> list[str]:
    """The ``ARGV`` of :data:`JOURNAL_LUA`'s rows (a row's own seq is ignored: Redis assigns it)."""
    return [json.dumps([r[1], r[2], r[3], r[4], r[5]]) for r in rows]
