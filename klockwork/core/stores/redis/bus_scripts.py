"""The Lua scripts of the bus on Redis Streams: one per primitive, run atomically by Redis.

Every script is ``PRELUDE + LIB + body`` and is called the same way::

    KEYS[1]  {ns}:bus:ver -- any key of the namespace: routes the call to its
                          -- Cluster slot (every key is hash-tagged {ns})
    ARGV[1]  '{ns}:bus:'  -- the key prefix; the scripts build keys from it
    ARGV[2]  request id   -- '' for read-only scripts (see below)
    ARGV[3]  now_ms       -- '' to read the server's clock (TIME), the default
    ARGV[4]  token        -- the calling store's, on the wake-ups it publishes
    ARGV[5...]            -- the script's own arguments (documented on it)

**Keys** (all ``{ns}:bus:``-prefixed; ``<c>`` a channel, ``<g>`` a group;
names may contain ``:`` but never ``|``)::

    s:<c>        the stream. Entry ids are ``<seq>-<n>``: the seq (contiguous
                 from 1, as the other stores number messages) and the
                 channel's number, so an id is unique across channels and
                 XRANGE/XTRIM MINID/XPENDING address messages by seq.
                 Fields, always in this order: p payload, t published_at,
                 v visible_at, then k key when published with one.
    chans        hash channel -> its number n (from the counter nchan)
    m:<c>        hash last (newest seq), len/age (the channel's own retention)
    k:<c>        hash idempotency key -> seq, removed with the message when
                 it is trimmed (a TTL could expire while the message is still
                 retained and let a retry publish twice)
    g:<c>        hash group -> 'visibility_ms max_deliveries created_at'
    d:<c>|<g>    zset id -> visibility deadline of each delivery in the PEL
    w:<c>|<g>    zset id -> visible_at of each delayed message the group passed
    e:<c>|<g>    hash id -> the error of the delivery's last nack
    ver          counter moved by every change (``bus_version``)
    wake:<c>     the Pub/Sub channel of wake-ups on <c>: the publisher's token
    req:<rid>    the reply of a mutating call, kept 15 s (see below)

**Why the side structures.** A consumer group's PEL holds the deliveries,
their consumer and their attempt (delivery count, set with XCLAIM
RETRYCOUNT); XREADGROUP hands out new messages and XACK ends a delivery.
But a PEL entry's idle time runs on the server's clock, cannot be set in
the future (XCLAIM clamps it to now) and is not indexed by time, so the
visibility deadlines live in ``d`` (a nack moves one to now, the caller's
clock works when ``server_time=False``, the earliest deadline is one ZRANGE
away for a sleeping waiter); XAUTOCLAIM's "idle >= visibility timeout"
becomes ZRANGEBYSCORE over ``d``, and the claim is XCLAIM. A delayed
message is invisible until ``visible_at``, which Streams cannot express:
a read that meets one takes it out of the PEL (XACK) into ``w`` until it is
due, then hands it out with XCLAIM FORCE (attempt 1), as the memory store
schedules it. The seq of a message is its stream id, so no index is
needed for it.

**Exactly once.** Each mutating call carries a request id drawn in Python.
A script first looks for ``req:<id>``: if the call ran already (its reply
was lost to a timeout and the client sent it again) it returns the stored
reply and changes nothing, so a retried publish never publishes twice. A
read keeps the ids and attempts it handed out, not their payloads (which
could hold megabytes for 15 s): its replay reads them back.

**Numbers.** Lua numbers are doubles (exact below 2^53): times and seqs
leave a script as decimal strings (``int``), never as Lua's ``%.14g``.

**Replies** are text: a line per message, fields tab-separated, the JSON
payload last (JSON text holds no raw tab or newline). The client's parsing
of nested replies, not the scripts, was what a batch of 100 messages
cost most.

Needs Redis 7.0 or later: script shebangs (a write script out of memory is
refused before it starts, so a publish of several messages is never half
done), and XCLAIM that skips entries trimmed from the stream.
"""

from __future__ import annotations

from klockwork.core.stores.redis.bus_lib import LIB, PRELUDE

__all__ = [
    "ACK",
    "CHANNELS",
    "CREATE_GROUP",
    "GROUPS",
    "LAST_SEQS",
    "NACK",
    "PUBLISH",
    "RANGE",
    "READ",
    "SET_RETENTION",
]


def _script(body: str) -> str:
    # The shebang makes Redis 7 check before the script runs that it may
    # write (out of memory: refused whole, never stopped half way).
    return "#!lua\n" + PRELUDE + LIB + body


def _reader(body: str) -> str:
    """A read-only script: says so (Redis refuses any write in it)."""
    return "#!lua flags=no-writes\n" + PRELUDE + LIB + body


#: ARGV[5] the channels, a JSON list of [channel, default len, default age
#: or null]; ARGV[6] the items, a JSON list of [channel index, key or "",
#: visible_at - now]; ARGV[7...] their payloads. (Two arguments for the
#: metadata of a whole batch: each argument costs the client more than
#: the script.) Returns '\n'-separated lines: first now, then the number
#: and the first new seq of each channel (tab-separated); then a line per
#: item: empty for a new message (the next seq of its channel, published
#: now, visible at max(now + offset, now): the client knows the rest), or
#: id, published_at, visible_at[, payload] of the message its key held
#: (the payload only when it differs). Building a full line per message
#: cost the script more than its XADD.
PUBLISH = _script(r"""
local chans, items = cjson.decode(ARGV[5]), cjson.decode(ARGV[6])
local open, head = {}, {NOW_TEXT}
for i, ch in ipairs(chans) do
  local o = open_channel(ch[1])
  open[i] = o
  head[#head + 1] = o.n .. '\t' .. int(o.last + 1)
end
local out = {table.concat(head, '\t')}
for i, item in ipairs(items) do
  local payload, ch = ARGV[6 + i], open[item[1]]
  local before = ch.last
  local m = append(ch, payload, item[2], NOW + item[3])
  local row = ''
  if ch.last == before then  -- its key held a message: sent whole
    local f = m[2]
    row = m[1] .. '\t' .. f[4] .. '\t' .. f[6]
    if f[2] ~= payload then row = row .. '\t' .. f[2] end
  end
  out[i + 1] = row
end
for i, ch in ipairs(chans) do
  save_channel(open[i])
  local age = ch[3]
  if age == cjson.null then age = nil end
  trim(ch[1], retention(ch[1], ch[2], age))
  wake(ch[1])
end
return finish(table.concat(out, '\n'))
""")

#: ARGV[5] channel, [6] group, [7] consumer, [8] count, then the spec of a
#: group created by this read ([9] visibility ms, [10] max deliveries,
#: [11] start), and the dead-letter channel's default retention ([12] len,
#: [13] age or ''). The decisions are rules.plan_read's: timed-out
#: deliveries in seq order, a dead letter for each that used its last
#: attempt (not counted), up to count redelivered, then the room left for
#: messages the group never handed out, oldest first.
#: Returns lines: 'now, next due or "", n deliveries', n delivery lines
#: (with their attempt), then a line per dead letter published.
READ = _script(r"""
local c, g, consumer, count = ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])
local s = skey(c)
if REPLAY then  -- this read ran already: the same deliveries again, read back by id
  local head, n, out = nil, 0, {''}
  for row in string.gmatch(REPLAY, '[^\n]+') do
    if not head then
      head = row
    else
      local id, attempt = string.match(row, '^(%S+)\t(%S+)$')
      local from = attempt == 'dead' and skey(c .. '.dead') or s
      local m = redis.call('XRANGE', from, id, id)[1]
      if m and attempt == 'dead' then
        out[#out + 1] = line(m[1], m[2])
      elseif m then
        out[#out + 1] = line(m[1], m[2], attempt)
        n = n + 1
      end
    end
  end
  out[1] = string.match(head, '^(%S*\t%S*\t)') .. n
  return table.concat(out, '\n')
end
if redis.call('HEXISTS', P .. 'g:' .. c, g) == 0 then
  create_group(c, g, ARGV[9], ARGV[10], ARGV[11])
end
local vis, maxd = string.match(redis.call('HGET', P .. 'g:' .. c, g), '^(%d+) (%d+)')
vis, maxd = tonumber(vis), tonumber(maxd)
local d, w, e = gkey('d', c, g), gkey('w', c, g), gkey('e', c, g)

local due_ids = redis.call('ZRANGEBYSCORE', d, '-inf', int(NOW))
table.sort(due_ids, by_seq)
local expired = {}
for _, id in ipairs(due_ids) do
  local p = redis.call('XPENDING', s, g, id, id, 1)[1]  -- {id, consumer, idle, attempts}
  if p then expired[#expired + 1] = p else redis.call('ZREM', d, id) end
end
local redeliver, dead = plan_read(expired, count, maxd)

local deadline = int(NOW + vis)
local out, kept = {''}, {''}  -- the reply, and what a replay needs of it
for _, p in ipairs(redeliver) do
  local attempt = p[4] + 1
  local got = redis.call('XCLAIM', s, g, consumer, '0', p[1], 'RETRYCOUNT', attempt)[1]
  if got then
    redis.call('ZADD', d, deadline, p[1])
    out[#out + 1] = line(got[1], got[2], attempt)
    kept[#kept + 1] = got[1] .. '\t' .. attempt
  else
    redis.call('ZREM', d, p[1])
  end
end
local room = count - #redeliver
-- Delayed messages passed earlier and visible now: older than any new one.
local ready = redis.call('ZRANGEBYSCORE', w, '-inf', int(NOW))
table.sort(ready, by_seq)
for _, id in ipairs(ready) do
  if room <= 0 then break end
  redis.call('ZREM', w, id)
  local got = redis.call('XCLAIM', s, g, consumer, '0', id, 'FORCE', 'RETRYCOUNT', '1')[1]
  if got then
    redis.call('ZADD', d, deadline, id)
    out[#out + 1] = line(got[1], got[2], 1)
    kept[#kept + 1] = id .. '\t1'
    room = room - 1
  end
end
while room > 0 do
  local r = redis.call('XREADGROUP', 'GROUP', g, consumer, 'COUNT', room, 'STREAMS', s, '>')
  if not r then break end
  local batch = r[1][2]
  local fresh = {}
  for _, m in ipairs(batch) do
    if tonumber(m[2][6]) > NOW then  -- delayed: out of the PEL until it is due
      redis.call('XACK', s, g, m[1])
      redis.call('ZADD', w, m[2][6], m[1])
    else
      fresh[#fresh + 1] = deadline
      fresh[#fresh + 1] = m[1]
      out[#out + 1] = line(m[1], m[2], 1)
      kept[#kept + 1] = m[1] .. '\t1'
      room = room - 1
    end
  end
  if #fresh > 0 then redis.call('ZADD', d, unpack(fresh)) end
  if #batch == 0 then break end
end
local delivered = #out - 1

if #dead > 0 then
  local dc = c .. '.dead'
  local letters = nil  -- opened by the first letter: no letter, no channel
  for _, p in ipairs(dead) do
    local id = p[1]
    local m = redis.call('XRANGE', s, id, id)[1]
    local err = redis.call('HGET', e, id)
    redis.call('XACK', s, g, id)
    redis.call('ZREM', d, id)
    redis.call('HDEL', e, id)
    if m then  -- bus_io.dead_letter_bytes, field by field
      local f = m[2]
      local body = '{"message":{"id":' .. cjson.encode(id) .. ',"channel":' .. cjson.encode(c)
        .. ',"seq":' .. int(seq_of(id)) .. ',"payload":' .. f[2] .. ',"published_at":' .. f[4]
        .. ',"visible_at":' .. f[6] .. '},"group":' .. cjson.encode(g) .. ',"attempts":'
        .. int(p[4]) .. ',"last_consumer":' .. cjson.encode(p[2]) .. ',"last_error":'
        .. (err and cjson.encode(err) or 'null') .. '}'
      letters = letters or open_channel(dc)
      local letter = append(letters, body, g .. ':' .. id, NOW)
      out[#out + 1] = line(letter[1], letter[2])
      kept[#kept + 1] = letter[1] .. '\tdead'
    end
  end
  if letters then save_channel(letters) end
  trim(dc, retention(dc, tonumber(ARGV[12]), opt(ARGV[13])))
  wake(dc)
end

local due = nil
for _, key in ipairs({d, w}) do
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] and (not due or tonumber(first[2]) < due) then due = tonumber(first[2]) end
end
if due and due < NOW then due = NOW end  -- due already, not handed out this time
if delivered > 0 then redis.call('INCR', P .. 'ver') end
out[1] = int(NOW) .. '\t' .. (due and int(due) or '') .. '\t' .. delivered
if RID ~= '' then  -- ids only: a reply's payloads could hold megabytes for 15 s
  kept[1] = out[1]
  redis.call('SET', P .. 'req:' .. RID, 'r' .. table.concat(kept, '\n'), 'PX', REQUEST_TTL_MS)
end
return table.concat(out, '\n')
""")

#: ARGV[5] channel, [6] group, [7] the ids, space-separated. Returns how
#: many were pending, -1 when the channel has no such group.
ACK = _script(r"""
local c, g = ARGV[5], ARGV[6]
if redis.call('HEXISTS', P .. 'g:' .. c, g) == 0 then return finish('-1') end
local s, d, e = skey(c), gkey('d', c, g), gkey('e', c, g)
local n, ids = 0, {}
local function flush()
  n = n + redis.call('XACK', s, g, unpack(ids))
  redis.call('ZREM', d, unpack(ids))
  redis.call('HDEL', e, unpack(ids))
  ids = {}
end
for id in string.gmatch(ARGV[7], '%S+') do
  ids[#ids + 1] = id
  if #ids == 500 then flush() end
end
if #ids > 0 then flush() end
if n > 0 then redis.call('INCR', P .. 'ver') end
return finish(tostring(n))
""")

#: ARGV[5] channel, [6] group, [7] deadline - now (when the deliveries are
#: due again), [8] '1' with an error, [9] the error, [10] '1' to undo the
#: attempt, [11] consumer ('' any), [12] the ids, space-separated. Returns how many were
#: handed back, -1 when the channel has no such group.
NACK = _script(r"""
local c, g = ARGV[5], ARGV[6]
if redis.call('HEXISTS', P .. 'g:' .. c, g) == 0 then return finish('-1') end
local s, d, e = skey(c), gkey('d', c, g), gkey('e', c, g)
local deadline = int(NOW + tonumber(ARGV[7]))
local has_error, undo, only = ARGV[8] == '1', ARGV[10] == '1', ARGV[11]
local n, seen = 0, {}
for id in string.gmatch(ARGV[12], '%S+') do
  if not seen[id] then
    seen[id] = true
    local p = redis.call('XPENDING', s, g, id, id, 1)[1]
    if p and (only == '' or p[2] == only) then
      redis.call('ZADD', d, deadline, id)
      if has_error then redis.call('HSET', e, id, ARGV[9]) end
      if undo then  -- never below 0: a second undo of one delivery takes nothing
        local back = int(math.max(p[4] - 1, 0))
        redis.call('XCLAIM', s, g, p[2], '0', id, 'RETRYCOUNT', back, 'JUSTID')
      end
      n = n + 1
    end
  end
end
if n > 0 then wake(c) end
return finish(tostring(n))
""")

#: ARGV[5] channel, [6] after seq, [7] limit. Returns a line per visible
#: message with a greater seq, oldest first.
RANGE = _reader(r"""
local s, limit = skey(ARGV[5]), tonumber(ARGV[7])
local out, from = {}, int(tonumber(ARGV[6]) + 1)
while #out < limit do
  local want = limit - #out
  local batch = redis.call('XRANGE', s, from, '+', 'COUNT', want)
  for _, m in ipairs(batch) do
    if tonumber(m[2][6]) <= NOW then out[#out + 1] = line(m[1], m[2]) end
  end
  if #batch < want then break end
  from = '(' .. batch[#batch][1]
end
return table.concat(out, '\n')
""")

#: ARGV[5...] channels. Returns the newest seq of each ('0' if none).
LAST_SEQS = _reader(r"""
local out = {}
for i = 5, #ARGV do
  out[#out + 1] = redis.call('HGET', P .. 'm:' .. ARGV[i], 'last') or '0'
end
return out
""")

#: ARGV[5] channel ('' every channel). Returns group_info of each group, by
#: channel then group name.
GROUPS = _reader(r"""
local chans = ARGV[5] ~= '' and {ARGV[5]} or sorted_keys(P .. 'chans')
local out = {}
for _, c in ipairs(chans) do
  for _, g in ipairs(sorted_keys(P .. 'g:' .. c)) do out[#out + 1] = group_info(c, g) end
end
return out
""")

#: Returns {channel, last seq, length, {groups}, own len or '', own age or ''}
#: of every channel, by name.
CHANNELS = _reader(r"""
local out = {}
for _, c in ipairs(sorted_keys(P .. 'chans')) do
  local m = redis.call('HMGET', P .. 'm:' .. c, 'last', 'len', 'age')
  out[#out + 1] = {c, m[1] or '0', redis.call('XLEN', skey(c)), sorted_keys(P .. 'g:' .. c),
                   m[2] or '', m[3] or ''}
end
return out
""")

#: ARGV[5] channel, [6] len, [7] age or ''. Gives the channel its own
#: retention and trims at once.
SET_RETENTION = _script(r"""
local c = ARGV[5]
channel_no(c)
redis.call('HSET', P .. 'm:' .. c, 'len', ARGV[6], 'age', ARGV[7])
trim(c, tonumber(ARGV[6]), opt(ARGV[7]))
redis.call('INCR', P .. 'ver')
return finish(1)
""")

#: ARGV[5] channel, [6] group, [7] visibility ms, [8] max deliveries,
#: [9] start. Returns {1 if created else 0, group_info}.
CREATE_GROUP = _script(r"""
local c, g = ARGV[5], ARGV[6]
local created = create_group(c, g, ARGV[7], ARGV[8], ARGV[9])
if created then redis.call('INCR', P .. 'ver') end
return finish({created and 1 or 0, group_info(c, g)})
""")
