"""The Lua scripts of the Redis lease store: one per transition, run atomically by Redis.

Every script is ``PRELUDE + LIB + body`` and is called the same way::

    KEYS[1]  {ns}:token   -- any key of the namespace: routes the call to its
                          -- Cluster slot (every key is hash-tagged {ns})
    ARGV[1]  '{ns}:'      -- the key prefix; the scripts build keys from it
    ARGV[2]  request id   -- '' for read-only scripts (see below)
    ARGV[3]  now_ms       -- '' to read the server's clock (TIME), the default
    ARGV[4]  retain       -- ended leases kept (``retain_inactive``)
    ARGV[5...]            -- the script's own arguments (documented on it)

and returns one JSON text (``cjson``), parsed by :mod:`.codec`.

**Keys** (all ``{ns}:``-prefixed; ``<k>`` a normalised resource key)::

    token              INCR counter: every fencing token (one per store)
    l:<lease_id>       hash a s k p pr t at e ttl st why: one lease
    act:<k>            set of ids of the ACTIVE leases on exactly <k>
    below:<k>          set of descendant keys of <k> that have ACTIVE leases
                       (kept as memory.py keeps ``_below``: ancestors and
                       descendants of a key are found without scanning)
    exp                zset lease id -> expires_at of every ACTIVE lease
                       (sweep and list read it)
    held:<agent>       set of ids of an agent's ACTIVE leases (register's
                       busy check, list_leases of one agent)
    retired            list of ended lease ids, oldest first (retention)
    fence / fencelex   zsets key -> newest token granted on it / key by
                       byte order (descendants are one ZRANGEBYLEX range)
    fencefloor         the newest token whose key's history was pruned
    ag:<agent>         hash p (priority) r (registered_at) v (revoked_at)
    resv               hash 'agent\\nsession' -> JSON reservation of a waiter
    req:<request id>   the JSON outcome of a mutating call, kept 15 s
    lease:wake         Pub/Sub channel: '<store token> <key>' per release or revoke
    born               the namespace's incarnation: a random id set by the first
                       store to open it; a store grants only while it is the
                       one it saw at open (see BORN)
    audit:seq          the last audit seq handed out; audit:pending: seq -> the
                       journal row of an entry not sealed yet (see :mod:`.journal`;
                       the sealed chain's keys are klockwork.core.audit.redis's)

**Exactly once.** Each mutating call carries a request id (128 random bits
drawn in Python). A script first looks for ``req:<id>``: if the call ran
already (its reply was lost to a timeout or a dropped connection and the
client sent it again) it returns the stored outcome and changes nothing.
So a retry can never grant twice, or report "not active" for a release it
performed itself.

**Numbers.** Lua numbers are doubles: times and tokens (< 2^53) are exact,
but priorities are any int64, so they travel and are compared as canonical
decimal strings (``int_lt`` of :data:`.lua.LIB`), never converted. Strings
(agent and session ids) are compared byte by byte (``lt``): UTF-8 byte
order is code point order, which is what Python's ``<`` uses, and it does
not depend on the server's locale as Lua's ``<`` on strings does.
"""

from __future__ import annotations

from klockwork.core.stores.redis.lua import LIB, PRELUDE, library

__all__ = [
    "ACQUIRE",
    "BORN",
    "END",
    "FUNCTIONS",
    "FENCE",
    "GET_LEASE",
    "HEARTBEAT",
    "JOURNAL",
    "JUDGE",
    "LEASE_LIBRARY",
    "LIST",
    "RECORD_CAS",
    "RECORD_LOCK",
    "RECORD_UNLOCK",
    "REGISTER",
    "RELEASE_MANY",
    "RESOLVE",
    "REVOKE_AGENT",
    "SWEEP",
    "UNRESERVE",
]


#: Decide and apply one lease request (``Store.try_acquire``).
#: ARGV[5] agent, [6] session, [7] ttl_ms, [8] reserve_ms ('' none),
#: [9] clear reservation '1'/'0', then the intents (see ``read_intents``),
#: each followed by the lease id it gets if granted (drawn in Python: Lua
#: has no unguessable randomness, its math.random is seeded the same way),
#: then the namespace's incarnation the store saw at open (see BORN), and
#: last what to audit (:mod:`.journal`): '' nothing, 'g' grants and expiries,
#: 'a' refusals too (a blocking acquire's refused tries are not outcomes),
#: then the tries and the wait (ms) of a grant after waiting ('' '' if not).
#: Returns {st, now, granted, blockers, wait, expired}, {revoked = at} or
#: {lost = true} (with j, the seqs of its audit entries, if it wrote any).
_ACQUIRE = r"""
local agent, session, ttl = ARGV[5], ARGV[6], tonumber(ARGV[7])
local reserve = ARGV[8]
local intents, last = read_intents(10, 1)
local audit, attempts, waited = ARGV[last + 1], ARGV[last + 2], ARGV[last + 3]
AUDIT = audit ~= ''
if redis.call('GET', P .. 'born') ~= ARGV[last] then
  -- the namespace is not the one this store opened: it lost its data
  return finish({lost = true})
end
local ak = P .. 'ag:' .. agent
local found = redis.call('HMGET', ak, 'p', 'v')
local prio = found[1]
if not prio then
  prio = int(NOW)
  redis.call('HSET', ak, 'p', prio, 'r', prio)
elseif found[2] then
  return finish({revoked = found[2], pr = prio})
end
local candidates = {}
local above = {}
for i, it in ipairs(intents) do candidates[i] = overlapping(it, above) end
local status, blockers, wait, expired = judge(agent, session, prio, intents, candidates)
for _, l in ipairs(expired) do deactivate(l, 'EXPIRED', nil) end
local field = agent .. '\n' .. session
if status ~= 'GRANTED' then
  if reserve ~= '' then
    local items = {}
    for i, it in ipairs(intents) do items[i] = {it.k, it.p} end
    redis.call('HSET', P .. 'resv', field,
      cjson.encode({a = agent, s = session, pr = prio, u = NOW + tonumber(reserve), i = items}))
  end
  if audit == 'a' then
    entry('lease.denied', agent, session, denied_text(status, intents, blockers, wait))
  end
  return finish({st = status, now = int(NOW), granted = {}, blockers = blockers,
                 wait = wait or cjson.null, expired = rows(expired)})
end
local granted = {}
local expires = NOW + ttl
-- one INCRBY, ZADD and SADD for every intent: tokens first + 1, first + 2, ...
local n = #intents
local first = redis.call('INCRBY', KEYS[1], n) - n
local exp, fence, lex, ids = {}, {}, {}, {}
for i, it in ipairs(intents) do
  local id = it.x[1]
  local token = first + i
  redis.call('HSET', P .. 'l:' .. id, 'a', agent, 's', session, 'k', it.k, 'p', it.p,
    'pr', prio, 't', int(token), 'at', int(NOW), 'e', int(expires), 'ttl', ARGV[7], 'st', 'ACTIVE')
  local act = P .. 'act:' .. it.k
  redis.call('SADD', act, id)
  if redis.call('SCARD', act) == 1 then  -- the key's first active lease
    for _, a in ipairs(it.anc) do redis.call('SADD', P .. 'below:' .. a, it.k) end
  end
  exp[2 * i - 1], exp[2 * i] = expires, id
  fence[2 * i - 1], fence[2 * i] = token, it.k
  lex[2 * i - 1], lex[2 * i] = 0, it.k
  ids[i] = id
  granted[i] = {id, agent, session, it.k, it.p, prio, int(token), int(NOW), int(expires),
                ARGV[7], 'ACTIVE', cjson.null}
  if AUDIT then
    entry('lease.granted', agent, session,
          granted_text(id, it.k, it.p, token, expires, attempts, waited))
  end
end
call_many('ZADD', P .. 'exp', exp, 2)
call_many('SADD', P .. 'held:' .. agent, ids, 1)
if call_many('ZADD', P .. 'fence', fence, 2) > 0 then  -- a key new to the history
  call_many('ZADD', P .. 'fencelex', lex, 2)  -- (pruning drops a key from both)
end
if ARGV[9] == '1' then redis.call('HDEL', P .. 'resv', field) end
return finish({st = 'GRANTED', now = int(NOW), granted = granted, blockers = {},
               wait = cjson.null, expired = rows(expired)})
"""
ACQUIRE = PRELUDE + LIB + _ACQUIRE

#: Only ``rules.judge`` over given facts (tests run the vectors through it).
#: ARGV[5] agent, [6] session, [7] priority, then the intents, each followed
#: by its candidates as a JSON list of lease rows.
JUDGE = (
    PRELUDE
    + LIB
    + r"""
local intents = read_intents(8, 1)
local candidates = {}
for i, it in ipairs(intents) do
  local ls = {}
  for j, r in ipairs(cjson.decode(it.x[1])) do
    ls[j] = {id = r[1], a = r[2], s = r[3], k = r[4], p = r[5], pr = r[6], t = r[7],
             at = r[8], e = tonumber(r[9]), ttl = r[10], st = r[11]}
  end
  candidates[i] = ls
end
local status, blockers, wait, expired = judge(ARGV[5], ARGV[6], ARGV[7], intents, candidates)
return finish({st = status, now = int(NOW), granted = {}, blockers = blockers,
               wait = wait or cjson.null, expired = rows(expired)})
"""
)

#: End one ACTIVE lease (release or revoke), as ``END`` and ``RELEASE_MANY``
#: do for each id: an expired one is marked EXPIRED instead; an end publishes
#: '<token> <resource>' on lease:wake (token '' none), which wakes waiters in
#: other processes (inside the script: the wake-up leaves once the end is
#: committed). Returns {ended = row} | {expired = row} | {} (not active).
_END_LUA = r"""
local function end_lease(id, state, why, token)
  local l = load(id)
  if not l or l.st ~= 'ACTIVE' then return {} end
  if l.e <= NOW then
    deactivate(l, 'EXPIRED', nil)
    return {expired = row(l)}
  end
  deactivate(l, state, why)
  if token ~= '' then redis.call('PUBLISH', P .. 'lease:wake', token .. ' ' .. l.k) end
  return {ended = row(l)}
end
"""

#: Release or revoke (``Store.release`` / ``Store.revoke``).
#: ARGV[5] lease id, [6] 'RELEASED' or 'REVOKED', [7] reason ('' none),
#: [8] the calling store's token ('' none: no wake-up published),
#: [9] '1' to audit the end (see ``deactivate``), '' not.
#: Returns {now, ended = row} | {now, expired = row} | {now} (not active).
_END = (
    _END_LUA
    + r"""
AUDIT = ARGV[9] == '1'
local why = nil
if ARGV[6] == 'REVOKED' then why = ARGV[7] end
local out = end_lease(ARGV[5], ARGV[6], why, ARGV[8])
out.now = int(NOW)
return finish(out)
"""
)
END = PRELUDE + LIB + _END

#: Release several leases in one call (``Store.release_many``): ``END``'s
#: release of each id in turn, so the audit entries and wake-ups are those
#: of as many ``END`` calls, in the same order, journaled together.
#: ARGV[5] the calling store's token ('' none), [6] '1' to audit, '' not,
#: [7...] the lease ids. Returns {now, ends = [one END outcome per id]}.
_RELEASE_MANY = (
    _END_LUA
    + r"""
AUDIT = ARGV[6] == '1'
local ends = {}
for i = 7, #ARGV do ends[i - 6] = end_lease(ARGV[i], 'RELEASED', nil, ARGV[5]) end
return finish({now = int(NOW), ends = ends})
"""
)
RELEASE_MANY = PRELUDE + LIB + _RELEASE_MANY

#: Renew (``Store.heartbeat``). ARGV[5] lease id, [6] ttl_ms ('' its own),
#: [7] '1' to audit an expiry it finds.
#: Returns {now, ok = row} | {now, expired = row} | {now, ended = row} | {now}.
_HEARTBEAT = r"""
AUDIT = ARGV[7] == '1'
local l = load(ARGV[5])
if not l then return finish({now = int(NOW)}) end
if l.st == 'ACTIVE' and l.e <= NOW then
  deactivate(l, 'EXPIRED', nil)
  return finish({now = int(NOW), expired = row(l)})
end
if l.st ~= 'ACTIVE' then return finish({now = int(NOW), ended = row(l)}) end
local ttl = ARGV[6]
if ttl == '' then ttl = l.ttl end
l.e = NOW + tonumber(ttl)
redis.call('HSET', P .. 'l:' .. l.id, 'e', int(l.e))
redis.call('ZADD', P .. 'exp', l.e, l.id)
return finish({now = int(NOW), ok = row(l)})
"""
HEARTBEAT = PRELUDE + LIB + _HEARTBEAT

#: Read one lease, expiring it if due (``Store.get_lease``). ARGV[5] lease id,
#: [6] '1' to audit the expiry. Returns {now, lease = row, expired = bool} or {now}.
GET_LEASE = (
    PRELUDE
    + LIB
    + r"""
AUDIT = ARGV[6] == '1'
local l = load(ARGV[5])
if not l then return finish({now = int(NOW)}) end
local expired = false
if l.st == 'ACTIVE' and l.e <= NOW then
  deactivate(l, 'EXPIRED', nil)
  expired = true
end
return finish({now = int(NOW), lease = row(l), expired = expired})
"""
)

#: Expire every ACTIVE lease past its expiry; drop stale reservations
#: (``Store.sweep``). ARGV[5] '1' to audit the expiries. Returns {now, expired = rows}.
SWEEP = (
    PRELUDE
    + LIB
    + r"""
AUDIT = ARGV[5] == '1'
local due = {}
load_all(redis.call('ZRANGEBYSCORE', P .. 'exp', '-inf', NOW), due)
local expired = {}
for _, l in ipairs(due) do
  if l.st == 'ACTIVE' and l.e <= NOW then
    deactivate(l, 'EXPIRED', nil)
    expired[#expired + 1] = l
  end
end
local resv = redis.call('HGETALL', P .. 'resv')
for i = 1, #resv, 2 do
  if cjson.decode(resv[i + 1]).u <= NOW then redis.call('HDEL', P .. 'resv', resv[i]) end
end
return finish({now = int(NOW), expired = rows(expired)})
"""
)

#: Active leases, all or overlapping one intent (``Store.list_leases``);
#: read-only. ARGV[5] '1' with an intent (then the intent), 'a' for one
#: agent's (ARGV[6] the agent), '0' for all.
#: Returns {now, leases = rows} (the caller drops the expired ones).
LIST = (
    PRELUDE
    + LIB
    + r"""
local found = {}
if ARGV[5] == '1' then
  found = overlapping(read_intents(6, 0)[1])
elseif ARGV[5] == 'a' then
  load_all(redis.call('SMEMBERS', P .. 'held:' .. ARGV[6]), found)
else
  load_all(redis.call('ZRANGE', P .. 'exp', 0, -1), found)
end
return cjson.encode({now = int(NOW), leases = rows(found)})
"""
)

#: Facts to judge a fencing token by (``Store.fence_state``); read-only.
#: ARGV[5] token, [6] descendant range lo ('' flat key), [7] hi, then the intent.
#: Returns {newest, floor, active, live}.
FENCE = (
    PRELUDE
    + LIB
    + r"""
local token = ARGV[5]
local it = read_intents(8, 0)[1]
local keys = {it.k}
for _, a in ipairs(it.anc) do keys[#keys + 1] = a end
local newest = nil
local function see(score)
  if score then
    score = tonumber(score)
    if newest == nil or score > newest then newest = score end
  end
end
for _, s in ipairs(redis.call('ZMSCORE', P .. 'fence', unpack(keys))) do see(s) end
if ARGV[6] ~= '' then
  local below = redis.call('ZRANGEBYLEX', P .. 'fencelex', '[' .. ARGV[6], '(' .. ARGV[7])
  for from = 1, #below, 1000 do  -- in chunks: unpack() has a stack limit
    local chunk = {unpack(below, from, math.min(from + 999, #below))}
    for _, s in ipairs(redis.call('ZMSCORE', P .. 'fence', unpack(chunk))) do see(s) end
  end
end
local active, live = false, false
for i, k in ipairs(keys) do
  for _, id in ipairs(redis.call('SMEMBERS', P .. 'act:' .. k)) do
    local l = load(id)
    if l and l.t == token and l.e > NOW then
      live = true
      if i == 1 then active = true end
    end
  end
end
return cjson.encode({newest = newest and int(newest) or cjson.null,
  floor = redis.call('GET', P .. 'fencefloor') or '0', active = active, live = live})
"""
)

#: Create or update an agent (``Store.register_agent``). ARGV[5] agent,
#: [6] priority ('' keep / now). Returns {p, r, v} or {busy = priority}.
REGISTER = (
    PRELUDE
    + LIB
    + r"""
local ak = P .. 'ag:' .. ARGV[5]
local found = redis.call('HMGET', ak, 'p', 'r', 'v')
if not found[1] then
  local p = ARGV[6]
  if p == '' then p = int(NOW) end
  redis.call('HSET', ak, 'p', p, 'r', int(NOW))
  return finish({p = p, r = int(NOW), v = cjson.null})
end
local out = {p = found[1], r = found[2], v = found[3] or cjson.null}
if ARGV[6] == '' or ARGV[6] == found[1] then return finish(out) end
local busy = false
for _, id in ipairs(redis.call('SMEMBERS', P .. 'held:' .. ARGV[5])) do
  local l = load(id)
  if l and l.e > NOW then busy = true; break end
end
if not busy then
  local prefix = ARGV[5] .. '\n'
  local resv = redis.call('HGETALL', P .. 'resv')
  for i = 1, #resv, 2 do
    if string.sub(resv[i], 1, #prefix) == prefix and cjson.decode(resv[i + 1]).u > NOW then
      busy = true; break
    end
  end
end
if busy then return finish({busy = found[1]}) end
redis.call('HSET', ak, 'p', ARGV[6])
out.p = ARGV[6]
return finish(out)
"""
)

#: Mark an agent revoked, registering it if unknown (``Store.revoke_agent``).
#: ARGV[5] agent. Returns {}.
REVOKE_AGENT = (
    PRELUDE
    + LIB
    + r"""
local ak = P .. 'ag:' .. ARGV[5]
if redis.call('EXISTS', ak) == 0 then redis.call('HSET', ak, 'p', int(NOW), 'r', int(NOW)) end
redis.call('HSETNX', ak, 'v', int(NOW))
return finish({})
"""
)

#: Drop a waiter's reservation (``Store.unreserve``). ARGV[5] agent, [6] session.
UNRESERVE = (
    PRELUDE
    + r"""
redis.call('HDEL', P .. 'resv', ARGV[5] .. '\n' .. ARGV[6])
return finish({})
"""
)

#: Compare-and-set one governance record (``Store.update_record``).
#: ARGV[5] kind, [6] key, [7] expected version ('0': none yet), [8] 'put' or
#: 'del', [9] status ('' none), [10] JSON body. Record keys:
#: rec:<kind>:<key> hash v (version) s (status) b (body) n (creation seq);
#: ridx:<kind> zset key by n (creation order); rst:<kind>:<status> the same,
#: per status (list_records by status); rseq the creation counter.
#: [11] the token of the record's lock (see RECORD_LOCK), released here,
#: [12...] the audit entries the transition recorded (journal rows, see
#: :mod:`.journal`): written only if the compare-and-set succeeds. 'keep'
#: instead of 'put' writes the entries of a transition that left the record
#: as it was (still under the version check).
#: Returns {ok, count} (count: records of the kind, after a new one) or {ok = false}.
RECORD_CAS = (
    PRELUDE
    + r"""
local kind, key = ARGV[5], ARGV[6]
local rk = P .. 'rec:' .. kind .. ':' .. key
local lk = P .. 'rlock:' .. kind .. ':' .. key
if redis.call('GET', lk) == ARGV[11] then redis.call('DEL', lk) end
local cur = redis.call('HMGET', rk, 'v', 's', 'n')
if (cur[1] or '0') ~= ARGV[7] then return finish({ok = false}) end
for i = 12, #ARGV do ENTRIES[#ENTRIES + 1] = ARGV[i] end
if ARGV[8] == 'keep' then return finish({ok = true, count = 0}) end
if cur[2] and cur[2] ~= '' and cur[2] ~= ARGV[9] or ARGV[8] == 'del' then
  if cur[2] and cur[2] ~= '' then redis.call('ZREM', P .. 'rst:' .. kind .. ':' .. cur[2], key) end
end
if ARGV[8] == 'del' then
  redis.call('DEL', rk)
  redis.call('ZREM', P .. 'ridx:' .. kind, key)
  return finish({ok = true, count = 0})
end
local n, count = cur[3], 0
if not n then
  n = redis.call('INCR', P .. 'rseq')
  redis.call('ZADD', P .. 'ridx:' .. kind, n, key)
  count = redis.call('ZCARD', P .. 'ridx:' .. kind)
end
if ARGV[9] ~= '' then redis.call('ZADD', P .. 'rst:' .. kind .. ':' .. ARGV[9], n, key) end
redis.call('HSET', rk, 'v', tonumber(ARGV[7]) + 1, 's', ARGV[9], 'b', ARGV[10], 'n', n)
return finish({ok = true, count = count})
"""
)

#: Write audit entries of their own (``Store.append_journal``): ARGV[5...]
#: journal rows. Returns {j = their seqs}.
JOURNAL = (
    PRELUDE
    + r"""
for i = 5, #ARGV do ENTRIES[#ENTRIES + 1] = ARGV[i] end
return finish({})
"""
)

#: Lock one record for a transition and read it. ARGV[5] kind, [6] key,
#: [7] lock token, [8] lock lifetime (ms). The same token may lock again (a
#: retried call whose reply was lost). Returns {v, b} or {busy = true}.
#: Transitions run in Python and may record audit entries as they decide:
#: the lock makes each run once per change, as a SQL transaction would
#: (a bare version CAS would let a loser's transition run, and audit, too).
RECORD_LOCK = r"""
local P = ARGV[1]
local lk = P .. 'rlock:' .. ARGV[5] .. ':' .. ARGV[6]
local held = redis.call('GET', lk)
if held and held ~= ARGV[7] then return cjson.encode({busy = true}) end
redis.call('SET', lk, ARGV[7], 'PX', ARGV[8])
local cur = redis.call('HMGET', P .. 'rec:' .. ARGV[5] .. ':' .. ARGV[6], 'v', 'b')
return cjson.encode({v = cur[1] or '0', b = cur[2] or cjson.null})
"""

#: Unlock a record the transition left unchanged. ARGV[5] kind, [6] key, [7] token.
RECORD_UNLOCK = r"""
local lk = ARGV[1] .. 'rlock:' .. ARGV[5] .. ':' .. ARGV[6]
if redis.call('GET', lk) == ARGV[7] then redis.call('DEL', lk) end
return '{}'
"""

#: Find out what became of requests whose replies never came (their callers
#: got StoreUnavailableError). ARGV[1] the key prefix, [2] how long (ms) an
#: id found unrun stays marked done, [3...] the request ids. For each: the
#: outcome the request stored if it ran; if not, the id is marked done, so
#: that the request, should it still reach the server (queued while the
#: server was frozen), changes nothing (PRELUDE finds the mark).
#: Returns one JSON text per id: its outcome, or {"abandoned":true}.
RESOLVE = r"""
local P = ARGV[1]
local out = {}
for i = 3, #ARGV do
  local k = P .. 'req:' .. ARGV[i]
  local done = redis.call('GET', k)
  if not done then
    done = '{"abandoned":true}'
    redis.call('SET', k, done, 'PX', ARGV[2])
  end
  out[#out + 1] = done
end
return out
"""

#: Learn the namespace's incarnation (setting it if the namespace is new).
#: KEYS[1] {ns}:born, ARGV[1] a fresh random id. Returns the id in force.
#: A server that restarts without persistence, or a namespace whose keys
#: were deleted, loses it: the acquire script of a store opened before then
#: refuses to grant ({lost = true}) instead of granting a held resource
#: again with fencing tokens from 1.
BORN = r"""
local born = redis.call('GET', KEYS[1])
if born then return born end  -- (a read, so a replica answers it too)
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""

#: The hot path's scripts, also as functions of one Redis 7 library
#: (``FUNCTION LOAD`` once, then ``FCALL``: the library is not re-run on
#: every call; see :func:`.lua.library` and :mod:`.functions`): each
#: script's source → its function's name. Same bodies, same arguments,
#: same replies.
LEASE_LIBRARY, _NAMES = library(
    "klockwork_leases",
    {"acquire": _ACQUIRE, "end": _END, "release_many": _RELEASE_MANY, "heartbeat": _HEARTBEAT},
)
FUNCTIONS = {
    ACQUIRE: _NAMES["acquire"],
    END: _NAMES["end"],
    RELEASE_MANY: _NAMES["release_many"],
    HEARTBEAT: _NAMES["heartbeat"],
}
