"""The audit journal on Redis: entries written in a decision's own script.

Every store script that records audit entries journals them with its
outcome (``finish`` in :data:`.lua.PRELUDE` runs :data:`JOURNAL_LUA`), so
an entry and its decision are applied together or not at all; the sealer
(:mod:`klockwork.core.audit.redis`) chains them later. The keys are
``audit:seq`` (the last seq handed out) and ``audit:pending`` (seq → row).

Entries reach a script three ways:

* **Leases.** The lease scripts build their entries themselves, in Lua
  (:data:`ENTRY_LUA`): the canonical data text of ``lease.granted``,
  ``lease.denied`` and ``lease.released/expired/revoked``, byte for byte
  what the Python hooks write on the other stores (``encode._fast_text``,
  ``Denied.__audit_json__``). The store only says whether to
  (``lease_hooks`` set: the engine audits leases) and, for a grant after
  waiting, how many tries it took and how long it waited.
* **Records.** A record transition runs in Python inside a
  :class:`~.journaling.RedisSection`, which collects the entries it
  records; they travel with the record's compare-and-set and are written
  only if it succeeds.
* **Anything else** (``kw.audit.record``, a blocking acquire that gave up):
  :meth:`~.journaling.RedisJournal.append_journal`, a script of their own.

A row is the JSON text ``[ts, kind, agent_id, session_id, data text]``.
"""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Sequence

from klockwork.core.stores.base import JournalRow

__all__ = ["ENTRY_LUA", "JOURNAL_LUA", "journal_args"]

#: Append journal rows (a Lua snippet other scripts may include): ``rows`` is
#: a list of JSON texts ``[ts, kind, agent_id, session_id, data text]``;
#: returns the seqs they were given. Gapless: a script that runs it either
#: completes (every seq has its row) or was never applied. Two calls for
#: any number of rows (up to 1 000; then one HSET per 1 000 more).
JOURNAL_LUA = """
local function journal(seq_key, pending_key, rows)
  local n = #rows
  local first = redis.call('INCRBY', seq_key, n) - n
  local seqs = {}
  for from = 1, n, 1000 do
    local fields = {}
    for i = from, math.min(from + 999, n) do
      seqs[i] = first + i
      fields[#fields + 1] = first + i
      fields[#fields + 1] = rows[i]
    end
    redis.call('HSET', pending_key, unpack(fields))
  end
  return seqs
end
"""


def _lua_text(text: str) -> str:
    """``text`` as a Lua string literal: printable ASCII as it is, any other byte as ``\\ddd``."""
    return (
        "'"
        + "".join(ch if " " <= ch <= "~" and ch not in "'\\" else f"\\{ord(ch):03d}" for ch in text)
        + "'"
    )


#: Python's own escapes (``json.encoder.ESCAPE_DCT``, which ``encode_basestring``
#: applies: every character below 0x20, ``"`` and ``\\``) as a Lua table constructor.
_ESCAPES = (
    "{"
    + ", ".join(
        f"[{_lua_text(k)}] = {_lua_text(v)}" for k, v in sorted(json.encoder.ESCAPE_DCT.items())
    )
    + "}"
)

#: The lease entries a script writes (included in every lease script, after
#: PRELUDE, which declares ``NOW``, ``ENTRIES`` and ``AUDIT``). Each text is
#: exactly the one Python's hooks produce (``encode._fast_text`` for granted
#: and ended leases, ``Denied.__audit_json__`` for a refusal): keys sorted,
#: no spaces, strings as :func:`json.encoder.encode_basestring` writes them.
#: (Redis's ``cjson`` is no substitute: it escapes ``/``.)
ENTRY_LUA = (
    r"""
-- json.encoder.encode_basestring: '"' and '\' escaped, \b \f \n \r \t short,
-- every other byte below 0x20 as \u00xx; all else (UTF-8) as it is. Quotes
-- and backslashes by a pattern; the table of the rest (Python's own, see
-- _ESCAPES) is built only for a text with a control character: every call
-- of a script runs this library, and a table per call would cost more.
local function jstr(s)
  if not string.find(s, '[%z\1-\31"\\]') then return '"' .. s .. '"' end
  s = string.gsub(s, '["\\]', '\\%0')
  if string.find(s, '[%z\1-\31]') then
    s = string.gsub(s, '[%z\1-\31]', """
    + _ESCAPES
    + r""")
  end
  return '"' .. s .. '"'
end

-- One journal row of this call, at its time: kind is a fixed ASCII name.
local function entry(kind, agent, session, text)
  ENTRIES[#ENTRIES + 1] = '[' .. string.format('%d', NOW) .. ',"' .. kind .. '",'
    .. jstr(agent) .. ',' .. jstr(session) .. ',' .. jstr(text) .. ']'
end

-- An ended lease's data (LeaseRecord.__audit_data__): l as lua.LIB's load reads it.
local function ended_text(l)
  local reason = ''
  if l.why and l.why ~= '' then reason = ',"reason":' .. jstr(l.why) end
  return '{"fencing_token":' .. l.t .. ',"lease_id":' .. jstr(l.id) .. ',"predicate":"'
    .. l.p .. '"' .. reason .. ',"resource":' .. jstr(l.k) .. '}'
end

-- A grant's data (Lease.__audit_data__); after waiting (attempts ~= '') also
-- its tries and wait, as LeaseAudit.decided adds them (keys stay sorted).
local function granted_text(id, k, p, token, expires, attempts, waited)
  local body = '"expires_at":' .. string.format('%d', expires) .. ',"fencing_token":'
    .. string.format('%d', token) .. ',"lease_id":' .. jstr(id) .. ',"predicate":"' .. p
    .. '","resource":' .. jstr(k)
  if attempts == '' then return '{' .. body .. '}' end
  return '{"attempts":' .. attempts .. ',' .. body .. ',"waited_ms":' .. waited .. '}'
end

-- A refusal's data (Denied.__audit_json__): blockers are lease rows
-- {id, agent, session, key, predicate, ...} or reservations {'R', agent,
-- session, key, predicate, ...}, as judge returns them.
local function denied_text(status, intents, blockers, wait)
  local conflicts, wanted = {}, {}
  for i, b in ipairs(blockers) do
    local lease_id = 'null'
    if b[1] ~= 'R' then lease_id = jstr(b[1]) end
    conflicts[i] = '{"agent_id":' .. jstr(b[2]) .. ',"lease_id":' .. lease_id
      .. ',"predicate":"' .. b[5] .. '","resource":' .. jstr(b[4]) .. ',"session_id":'
      .. jstr(b[3]) .. '}'
  end
  for i, it in ipairs(intents) do wanted[i] = '[' .. jstr(it.k) .. ',"' .. it.p .. '"]' end
  local wait_text = 'null'
  if wait then wait_text = string.format('%d', wait) end
  return '{"conflicts":[' .. table.concat(conflicts, ',') .. '],"intents":['
    .. table.concat(wanted, ',') .. '],"verdict":"' .. status .. '","wait_time_ms":'
    .. wait_text .. '}'
end
"""
)


def journal_args(rows: Sequence[JournalRow]) -> list[str]:
    """The ``ARGV`` of :data:`JOURNAL_LUA`'s rows (a row's own seq is ignored: Redis assigns it)."""
    return [json.dumps([r[1], r[2], r[3], r[4], r[5]]) for r in rows]
