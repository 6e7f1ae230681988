"""What every bus script starts with (see :mod:`.bus_scripts` for the layout).

:data:`PRELUDE` reads the calling conventions (prefix, request id, time,
token) and answers a call made again under its request id; :data:`LIB`
holds the steps the scripts share, each named after the memory store's
step it mirrors.
"""

from __future__ import annotations

__all__ = ["LIB", "PRELUDE", "REQUEST_TTL_MS"]

#: How long a mutating call's reply is kept for a retry with its request id.
REQUEST_TTL_MS = 15_000

PRELUDE = f"""
local P = ARGV[1]
local RID = ARGV[2]
local REPLAY = nil  -- a read's kept outcome: ids, not payloads (see READ)
if RID ~= '' then
  local done = redis.call('GET', P .. 'req:' .. RID)
  if done then
    local kind = string.sub(done, 1, 1)
    if kind == 's' then return string.sub(done, 2) end
    if kind == 'j' then return cjson.decode(string.sub(done, 2)) end
    REPLAY = string.sub(done, 2)
  end
end
local NOW
if ARGV[3] ~= '' then
  NOW = tonumber(ARGV[3])
else
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local NOW_TEXT = string.format('%.0f', NOW)
local TOKEN = ARGV[4]
local REQUEST_TTL_MS = {REQUEST_TTL_MS}
-- Keep the reply under the request id (see the module docstring), return it.
-- A reply is a string, or a table of strings and small integers (cjson keeps
-- both exactly).
local function finish(reply)
  if RID ~= '' then
    local kept = type(reply) == 'string' and 's' .. reply or 'j' .. cjson.encode(reply)
    redis.call('SET', P .. 'req:' .. RID, kept, 'PX', REQUEST_TTL_MS)
  end
  return reply
end
"""

#: Functions shared by the scripts; each mirrors the memory store's step named.
LIB = r"""
local function int(n) return string.format('%.0f', n) end
local function seq_of(id) return tonumber(string.match(id, '^(%d+)')) end
local function by_seq(a, b) return seq_of(a) < seq_of(b) end
local function skey(c) return P .. 's:' .. c end
local function gkey(kind, c, g) return P .. kind .. ':' .. c .. '|' .. g end
local function opt(text) if text == '' or not text then return nil end return tonumber(text) end

-- Something changed on channel c: move the version, wake the processes
-- waiting on c (each subscribes to wake:<c> while it does; see .wake).
local function wake(c)
  redis.call('INCR', P .. 'ver')
  redis.call('PUBLISH', P .. 'wake:' .. c, TOKEN)
end

-- The channel's number (registering the channel on first use).
local function channel_no(c)
  local n = redis.call('HGET', P .. 'chans', c)
  if not n then
    n = tostring(redis.call('INCR', P .. 'nchan'))
    redis.call('HSET', P .. 'chans', c, n)
  end
  return n
end

-- The channel's own retention if set, else the default given.
local function retention(c, len, age)
  local own = redis.call('HMGET', P .. 'm:' .. c, 'len', 'age')
  if own[1] then return tonumber(own[1]), opt(own[2]) end
  return len, age
end

-- A channel a script appends to: its number and newest seq, read once per
-- channel per script (not per message: a batch of 100 paid 200 extra
-- commands for them), kept in the table and stored back by save_channel.
local function open_channel(c)
  local last = redis.call('HGET', P .. 'm:' .. c, 'last')
  return {c = c, n = channel_no(c), last = tonumber(last or '0'), s = skey(c), k = P .. 'k:' .. c}
end

-- Store back the newest seq of what append added (before trim reads it).
local function save_channel(ch)
  if ch.added then redis.call('HSET', P .. 'm:' .. ch.c, 'last', int(ch.last)) end
end

-- MemoryBus._append on an open channel: a new entry {id, fields}, or the
-- one its key holds.
local function append(ch, payload, key, visible_at)
  if key ~= '' then
    local seq = redis.call('HGET', ch.k, key)
    if seq then
      local held = redis.call('XRANGE', ch.s, seq, seq)
      if held[1] then return held[1] end
    end
  end
  ch.last, ch.added = ch.last + 1, true
  local seq = int(ch.last)
  local fields = {'p', payload, 't', NOW_TEXT, 'v', NOW_TEXT}
  if visible_at > NOW then fields[6] = int(visible_at) end
  if key ~= '' then
    fields[7], fields[8] = 'k', key
    redis.call('HSET', ch.k, key, seq)
  end
  local id = seq .. '-' .. ch.n
  redis.call('XADD', ch.s, id, unpack(fields))
  return {id, fields}
end

-- MemoryBus._trim: drop the oldest entries beyond (len, age), read or not,
-- with their keys, the deliveries and schedules of every group.
local function trim(c, len, age)
  local s = skey(c)
  local last = tonumber(redis.call('HGET', P .. 'm:' .. c, 'last') or '0')
  local upto = last - len
  if age then  -- past the length limit, drop on while the oldest is too old
    local cutoff, from, step, young = NOW - age, int(math.max(upto + 1, 0)), 1, nil
    while true do
      local batch = redis.call('XRANGE', s, from, '+', 'COUNT', step)
      for _, e in ipairs(batch) do
        if tonumber(e[2][4]) >= cutoff then young = seq_of(e[1]); break end
      end
      if young or #batch < step then break end
      from, step = '(' .. batch[#batch][1], math.min(step * 4, 256)
    end
    upto = young and young - 1 or last
  end
  if upto < 1 then return end
  local groups = redis.call('HKEYS', P .. 'g:' .. c)
  local keyed = redis.call('HLEN', P .. 'k:' .. c) > 0
  local scheduled = {}
  for _, g in ipairs(groups) do
    if redis.call('ZCARD', gkey('w', c, g)) > 0 then scheduled[#scheduled + 1] = gkey('w', c, g) end
  end
  if keyed or #scheduled > 0 then  -- read what goes: its key, its schedules
    local from = '-'
    while true do
      local batch = redis.call('XRANGE', s, from, int(upto), 'COUNT', 500)
      for _, e in ipairs(batch) do
        local f = e[2]
        if f[8] and redis.call('HGET', P .. 'k:' .. c, f[8]) == int(seq_of(e[1])) then
          redis.call('HDEL', P .. 'k:' .. c, f[8])
        end
        if f[6] ~= f[4] then
          for _, w in ipairs(scheduled) do redis.call('ZREM', w, e[1]) end
        end
      end
      if #batch < 500 then break end
      from = '(' .. batch[#batch][1]
    end
  end
  if redis.call('XTRIM', s, 'MINID', int(upto + 1)) == 0 then return end
  for _, g in ipairs(groups) do  -- XTRIM leaves PEL entries behind: end them
    while true do
      local pend = redis.call('XPENDING', s, g, '-', int(upto), 500)
      if #pend == 0 then break end
      local ids = {}
      for i, p in ipairs(pend) do ids[i] = p[1] end
      redis.call('XACK', s, g, unpack(ids))
      redis.call('ZREM', gkey('d', c, g), unpack(ids))
      redis.call('HDEL', gkey('e', c, g), unpack(ids))
      if #pend < 500 then break end
    end
  end
end

-- MemoryBus._group: create the group unless it exists; true if created.
local function create_group(c, g, vis, maxd, start)
  channel_no(c)
  if redis.call('HEXISTS', P .. 'g:' .. c, g) == 1 then return false end
  local r = redis.pcall('XGROUP', 'CREATE', skey(c), g, start == 'new' and '$' or '0', 'MKSTREAM')
  if type(r) == 'table' and r.err and not string.find(r.err, 'BUSYGROUP', 1, true) then
    error(r.err)
  end
  redis.call('HSET', P .. 'g:' .. c, g, vis .. ' ' .. maxd .. ' ' .. int(NOW))
  return true
end

-- MemoryBus._info: {channel, group, spec, pending, lag}.
local function group_info(c, g)
  local s = skey(c)
  local last_id = '0-0'
  for _, info in ipairs(redis.call('XINFO', 'GROUPS', s)) do
    if info[2] == g then
      for i = 1, #info, 2 do
        if info[i] == 'last-delivered-id' then last_id = info[i + 1] end
      end
    end
  end
  -- lag: visible messages never handed out, and delayed ones passed, due now
  local lag = redis.call('ZCOUNT', gkey('w', c, g), '-inf', int(NOW))
  local from = '(' .. last_id
  while true do
    local batch = redis.call('XRANGE', s, from, '+', 'COUNT', 500)
    for _, e in ipairs(batch) do
      if tonumber(e[2][6]) <= NOW then lag = lag + 1 end
    end
    if #batch < 500 then break end
    from = '(' .. batch[#batch][1]
  end
  local pending = redis.call('XPENDING', s, g)[1]
  return {c, g, redis.call('HGET', P .. 'g:' .. c, g), pending, lag}
end

-- rules.plan_read over PEL entries {id, consumer, idle, attempts} in seq
-- order: a dead letter for each that used its last attempt (not counted),
-- up to count redelivered; the room left (count - #redeliver) goes to
-- messages the group never handed out. Checked against rules.plan_read.
local function plan_read(expired, count, maxd)
  local redeliver, dead = {}, {}
  for _, p in ipairs(expired) do
    if p[4] >= maxd then
      dead[#dead + 1] = p
    elseif #redeliver < count then
      redeliver[#redeliver + 1] = p
    end
  end
  return redeliver, dead
end

-- A message as one line of a reply: id, published_at, visible_at[, attempt],
-- payload (JSON text has no raw tab or newline, so neither splits it). One
-- concatenation, no table: it runs for every message a read returns.
local function line(id, f, attempt)
  if attempt then
    return id .. '\t' .. f[4] .. '\t' .. f[6] .. '\t' .. attempt .. '\t' .. f[2]
  end
  return id .. '\t' .. f[4] .. '\t' .. f[6] .. '\t' .. f[2]
end

local function sorted_keys(key)
  local names = redis.call('HKEYS', key)
  table.sort(names)
  return names
end
"""
