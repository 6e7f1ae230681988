"""The Lua library every Redis lease script starts with (see :mod:`.scripts`).

:data:`PRELUDE` reads the common arguments, answers a retried request from
its stored outcome and fixes the time; :data:`LIB` holds the functions the
transitions share, each a Lua twin of the Python function it names
(``rules.judge``, ``rules.ancestors``, ``MemoryStore._deactivate``, ...).
``finish`` also writes the call's audit entries (:mod:`.journal`) with its
outcome: both are applied, or neither.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from klockwork.core.stores.redis.journal import ENTRY_LUA, JOURNAL_LUA

__all__ = ["LIB", "PRELUDE", "REQUEST_TTL_MS", "library"]

#: How long a mutating call's outcome is kept for a retry with its request
#: id: longer than the socket timeout plus a reconnect.
REQUEST_TTL_MS = 15_000

#: The common arguments of a call, and its answer if it ran already (a
#: retried request): shared by :data:`PRELUDE` and :func:`library` (inside
#: ``begin``, so that ``return done`` ends the call there too).
_BEGIN = """
P, RID = ARGV[1], ARGV[2]
RETAIN = tonumber(ARGV[4])
FENCE_LIMIT = math.max(2 * RETAIN, 1024)
ENTRIES, AUDIT = {}, false
if RID ~= '' then
  local done = redis.call('GET', P .. 'req:' .. RID)
  if done then return done end
end
if ARGV[3] ~= '' then
  NOW = tonumber(ARGV[3])
else
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

#: The per-call state every transition reads (set by ``_BEGIN``): the key
#: prefix, the request id, retention, the time, this call's audit entries
#: (journal rows, see journal.py, written by finish with its outcome) and
#: AUDIT: whether the lease transitions write theirs.
_STATE = "local P, RID, RETAIN, FENCE_LIMIT, NOW, ENTRIES, AUDIT\n"

_FINISH = f"""
-- Journal the entries, store the outcome under the request id (see the
-- module docstring), return it. ``j``: the entries' seqs.
local function finish(result)
  if #ENTRIES > 0 then
    result.j = journal(P .. 'audit:seq', P .. 'audit:pending', ENTRIES)
  end
  local text = cjson.encode(result)
  if RID ~= '' then redis.call('SET', P .. 'req:' .. RID, text, 'PX', {REQUEST_TTL_MS}) end
  return text
end
"""

PRELUDE = _STATE + _BEGIN + JOURNAL_LUA + _FINISH

#: Functions shared by the scripts; each mirrors the Python function named
#: (and the lease entries they write: :data:`.journal.ENTRY_LUA`).
LIB = (
    ENTRY_LUA
    + r"""
local function int(n) return string.format('%d', n) end

-- Byte order of two strings (Python's str < on UTF-8 text), locale-free.
local function lt(a, b)
  if a == b then return false end
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- a < b for canonical decimal integers of any size (int64 priorities).
local function int_lt(a, b)
  local na, nb = string.sub(a, 1, 1) == '-', string.sub(b, 1, 1) == '-'
  if na ~= nb then return na end
  if na then a, b = string.sub(b, 2), string.sub(a, 2) end
  if #a ~= #b then return #a < #b end
  return lt(a, b)
end

-- rules.is_older: lower priority, then lower agent id, then lower session id.
local function older(pa, aa, sa, pb, ab, sb)
  if pa ~= pb then return int_lt(pa, pb) end
  if aa ~= ab then return lt(aa, ab) end
  return lt(sa, sb)
end

-- rules.within_session: s is h or a sub-session of it (h/...).
local function within(s, h)
  return s == h or string.sub(s, 1, #h + 1) == h .. '/'
end

-- rules.COMPATIBLE_PAIRS (symmetric); every other pair conflicts.
local COMPAT = {
  PROVIDES = {CONSUMES = true, DEPENDS_ON = true},
  CONSUMES = {PROVIDES = true, CONSUMES = true, DEPENDS_ON = true},
  DEPENDS_ON = {PROVIDES = true, CONSUMES = true, DEPENDS_ON = true},
}
local function conflicts(a, b)
  local c = COMPAT[a]
  return not (c and c[b])
end

local function last_slash(s)
  local found, from = nil, 1
  while true do
    local j = string.find(s, '/', from, true)
    if not j then return found end
    found, from = j, j + 1
  end
end

-- rules.ancestors: strict ancestors of a normalised key, nearest first.
local function ancestors(key)
  local out = {}
  local colon = string.find(key, ':', 1, true)
  local rtype, path = string.sub(key, 1, colon - 1), string.sub(key, colon + 1)
  if rtype ~= 'FILE' or path == '/' then return out end
  local cut = last_slash(path)
  while cut and cut > 1 do
    path = string.sub(path, 1, cut - 1)
    out[#out + 1] = rtype .. ':' .. path
    cut = last_slash(path)
  end
  if cut == 1 then out[#out + 1] = rtype .. ':/' end
  return out
end

-- rules.overlaps for a reservation's key r and a parsed intent.
local function overlaps(r, intent)
  if r == intent.k then return true end
  for _, a in ipairs(intent.anc) do if a == r then return true end end
  for _, a in ipairs(ancestors(r)) do if a == intent.k then return true end end
  return false
end

local FIELDS = {'a', 's', 'k', 'p', 'pr', 't', 'at', 'e', 'ttl', 'st', 'why'}
local function load(id)
  local v = redis.call('HMGET', P .. 'l:' .. id, unpack(FIELDS))
  if not v[1] then return nil end
  return {id = id, a = v[1], s = v[2], k = v[3], p = v[4], pr = v[5], t = v[6], at = v[7],
          e = tonumber(v[8]), ttl = v[9], st = v[10], why = v[11]}
end

-- A lease as codec.lease_record reads it.
local function row(l)
  return {l.id, l.a, l.s, l.k, l.p, l.pr, l.t, l.at, int(l.e), l.ttl, l.st, l.why or cjson.null}
end

local function rows(ls)
  local out = {}
  for i, l in ipairs(ls) do out[i] = row(l) end
  return out
end

-- memory.MemoryStore._prune_fences: forget the oldest idle keys' history.
local function prune_fences()
  local keep = math.floor(FENCE_LIMIT / 2)
  local n = redis.call('ZCARD', P .. 'fence')
  if n <= keep then return end
  local floor = tonumber(redis.call('GET', P .. 'fencefloor') or '0')
  local old = redis.call('ZRANGE', P .. 'fence', 0, n - keep - 1, 'WITHSCORES')
  for i = 1, #old, 2 do
    local key, token = old[i], tonumber(old[i + 1])
    local live = redis.call('EXISTS', P .. 'act:' .. key, P .. 'below:' .. key) > 0
    if not live then
      for _, a in ipairs(ancestors(key)) do
        if redis.call('EXISTS', P .. 'act:' .. a) > 0 then live = true; break end
      end
    end
    if not live then
      if token > floor then floor = token end
      redis.call('ZREM', P .. 'fence', key)
      redis.call('ZREM', P .. 'fencelex', key)
    end
  end
  redis.call('SET', P .. 'fencefloor', int(floor))
end

-- memory.MemoryStore._deactivate: end an ACTIVE lease, unlink it, retire it.
local function deactivate(l, state, why)
  local lk = P .. 'l:' .. l.id
  l.st = state
  if why then
    l.why = why
    redis.call('HSET', lk, 'st', state, 'why', why)
  else
    redis.call('HSET', lk, 'st', state)
  end
  local ak = P .. 'act:' .. l.k
  redis.call('SREM', ak, l.id)
  if redis.call('EXISTS', ak) == 0 then  -- the key's last active lease
    for _, a in ipairs(ancestors(l.k)) do redis.call('SREM', P .. 'below:' .. a, l.k) end
  end
  redis.call('ZREM', P .. 'exp', l.id)
  redis.call('SREM', P .. 'held:' .. l.a, l.id)
  local n = redis.call('RPUSH', P .. 'retired', l.id)
  if n > RETAIN then
    redis.call('DEL', P .. 'l:' .. redis.call('LPOP', P .. 'retired'))
    if redis.call('ZCARD', P .. 'fence') > FENCE_LIMIT then prune_fences() end
  end
  -- every end is audited (LeaseAudit.ended): lease.expired/released/revoked
  if AUDIT then entry('lease.' .. string.lower(state), l.a, l.s, ended_text(l)) end
end

-- redis.call(cmd, key, ...args) in chunks of 1000 elements of ``step``
-- arguments each (unpack has a stack limit); returns the replies' sum.
local function call_many(cmd, key, args, step)
  local total, size = 0, 1000 * step
  for from = 1, #args, size do
    total = total + redis.call(cmd, key, unpack(args, from, math.min(from + size - 1, #args)))
  end
  return total
end

-- Leases of ``ids`` (a set's members) appended to ``out``.
local function load_all(ids, out)
  for _, id in ipairs(ids) do
    local l = load(id)
    if l then out[#out + 1] = l end
  end
end

-- memory.MemoryStore._overlapping: ACTIVE leases on the key, above and below it.
-- ``cache`` (optional): ancestor -> its leases, read once per call (the
-- intents of a manifest in one directory share their ancestors).
local function overlapping(intent, cache)
  local found = {}
  load_all(redis.call('SMEMBERS', P .. 'act:' .. intent.k), found)
  for _, a in ipairs(intent.anc) do
    local above = cache and cache[a]
    if not above then
      above = {}
      load_all(redis.call('SMEMBERS', P .. 'act:' .. a), above)
      if cache then cache[a] = above end
    end
    for _, l in ipairs(above) do found[#found + 1] = l end
  end
  for _, d in ipairs(redis.call('SMEMBERS', P .. 'below:' .. intent.k)) do
    load_all(redis.call('SMEMBERS', P .. 'act:' .. d), found)
  end
  return found
end

-- Intents from ARGV[i...]: key, predicate, #ancestors, ancestors..., then
-- ``extra`` more arguments each (returned in intent.x). Returns them and the next index.
local function read_intents(i, extra)
  local n = tonumber(ARGV[i]); i = i + 1
  local intents = {}
  for j = 1, n do
    local it = {k = ARGV[i], p = ARGV[i + 1], anc = {}, x = {}}
    local na = tonumber(ARGV[i + 2]); i = i + 3
    for m = 1, na do it.anc[m] = ARGV[i]; i = i + 1 end
    for m = 1, extra do it.x[m] = ARGV[i]; i = i + 1 end
    intents[j] = it
  end
  return intents, i
end

-- rules.judge, given the requester (agent, session, priority string).
local function judge(agent, session, prio, intents, candidates)
  local blockers, expired, seen = {}, {}, {}
  local dies, wait = false, nil
  for i, it in ipairs(intents) do
    for _, h in ipairs(candidates[i]) do
      if h.st == 'ACTIVE' then
        if h.e <= NOW then
          if not seen[h.id] then seen[h.id] = true; expired[#expired + 1] = h end
        elseif conflicts(it.p, h.p) and not (h.a == agent and within(session, h.s))
            and not seen[h.id] then
          seen[h.id] = true
          blockers[#blockers + 1] = row(h)
          if not older(prio, agent, session, h.pr, h.a, h.s) then dies = true end
          local left = h.e - NOW
          if wait == nil or left < wait then wait = left end
        end
      end
    end
  end
  local resv = redis.call('HGETALL', P .. 'resv')
  for f = 1, #resv, 2 do
    local r = cjson.decode(resv[f + 1])
    if r.u <= NOW then
      -- a waiter that stopped without withdrawing (crashed): drop it here,
      -- so the hash stays as small as the set of live waiters
      redis.call('HDEL', P .. 'resv', resv[f])
    elseif not (r.a == agent and r.s == session)
        and not older(prio, agent, session, r.pr, r.a, r.s) then
      for _, item in ipairs(r.i) do
        for _, it in ipairs(intents) do
          if conflicts(it.p, item[2]) and overlaps(item[1], it) then
            blockers[#blockers + 1] = {'R', r.a, r.s, item[1], item[2], r.pr, int(r.u)}
            dies = true
            break
          end
        end
      end
    end
  end
  local status = 'GRANTED'
  if #blockers > 0 then status = dies and 'DIE' or 'WAIT' end
  return status, blockers, wait, expired
end
"""
)


def library(prefix: str, bodies: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """A Redis 7 function library (``FUNCTION LOAD``) running the scripts' ``bodies``.

    Under EVALSHA every call runs ``PRELUDE + LIB + body`` from the top,
    defining the state, ``finish`` and every function of :data:`LIB` again
    (some 20 µs of server time per call). Here they are defined once, when
    the library is loaded; each call of a function runs ``begin`` (what
    :data:`PRELUDE` does: the same text) and its body, unchanged, as a
    local function (``KEYS``/``ARGV`` are upvalues set by ``begin``).

    Args:
        prefix: the library's name starts with it (letters, digits, ``_``).
        bodies: short name → the Lua body of a script written for
            ``PRELUDE + LIB + body``.

    Returns:
        The library's code and the function name of each short name. The
        names carry a digest of the code, so processes running different
        versions of klockwork on one server each load and call their own.
    """
    parts = ["local KEYS, ARGV\n", _STATE, JOURNAL_LUA, _FINISH, LIB]
    parts += ["local function begin(keys, args)\nKEYS, ARGV = keys, args\n", _BEGIN, "end\n"]
    code = "".join(parts) + "".join(bodies.values())
    version = hashlib.sha1(code.encode(), usedforsecurity=False).hexdigest()[:16]
    names = {short: f"{prefix}_{version}_{short}" for short in bodies}
    for short, body in bodies.items():
        name = names[short]
        parts += [
            f"local function {short}_body()\n{body}\nend\n",
            f"redis.register_function('{name}', function(keys, args)\n",
            "  local done = begin(keys, args)\n",
            "  if done then return done end\n",
            f"  return {short}_body()\nend)\n",
        ]
    return f"#!lua name={prefix}_{version}\n" + "".join(parts), names
