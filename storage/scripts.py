"""Lua scripts that keep a payload's bookkeeping atomic on the server.

Each script runs as one step in Redis, so a crash of the caller can never leave half an
update: an entry is acknowledged and its payload freed together, a stage's columns are added
and the entry forwarded together, and the in-flight counters used for back-pressure always
agree with the entries they count.

A payload is a hash (its layout, see ``storage.codec``) and one string key per segment; the
segment bytes are written with a plain SET before a script runs, never passed through a script
(a script argument is copied twice more, and Redis stores a SET value straight off the socket).

Bookkeeping: a payload hash carries a marker field ``i:<stream key>`` (its byte size) while it
is in flight on that stream; ``<stream key>:inflight`` holds the stream's ``entries`` and
``bytes`` totals. ``release`` drops the marker and the totals together, once, however many
times it is called.

The scripts touch the payload keys they find in stream entries, which they do not declare as
KEYS. Every key of a run shares the hash tag ``{run}``, so on Redis Cluster they all sit in
the slot of the declared keys and the scripts run there unchanged.
"""

from __future__ import annotations

_PRELUDE = """
local function entry_fields(stream, id)
  local found = redis.call('XRANGE', stream, id, id)
  if #found == 0 then return nil end
  local fields, flat = {}, found[1][2]
  for i = 1, #flat, 2 do fields[flat[i]] = flat[i + 1] end
  return fields
end
local function release(payload, stream, inflight)
  local size = redis.call('HGET', payload, 'i:' .. stream)
  if size then
    redis.call('HDEL', payload, 'i:' .. stream)
    redis.call('HINCRBY', inflight, 'entries', -1)
    redis.call('HINCRBY', inflight, 'bytes', -tonumber(size))
  end
end
local function admit(payload, stream, inflight, size)
  redis.call('HSET', payload, 'i:' .. stream, size)
  redis.call('HINCRBY', inflight, 'entries', 1)
  redis.call('HINCRBY', inflight, 'bytes', size)
end
local function segments(payload)
  local keys = {}
  for _, field in ipairs(redis.call('HKEYS', payload)) do
    if string.sub(field, 1, 4) == 'seg:' then keys[#keys + 1] = string.sub(field, 5) end
  end
  return keys
end
local function free(payload)
  for _, key in ipairs(segments(payload)) do redis.call('DEL', key) end
  redis.call('DEL', payload)
end
local function has_column(order, name)
  return string.find('\\n' .. order .. '\\n', '\\n' .. name .. '\\n', 1, true) ~= nil
end
"""

# KEYS: stream, payload, inflight, segment (SET just before), put mark. ARGV: max_entries, max_bytes,
# bytes, rows, meta, the put mark's TTL in seconds, then the payload hash's field/value pairs.
# Appends the entry unless the stream is at its bound (0 = no bound); a lone entry always fits, so one
# batch larger than the byte bound cannot wedge the stream. Returns the entry id, or nil when refused
# (the segment is deleted). Idempotent: the put mark (SET NX) holds the id of the entry appended for
# this payload, and a repeat (a client retrying after a lost reply) returns that id and appends nothing;
# its segment, SET again just before, is deleted if the entry was consumed meanwhile.
PUT = (
    _PRELUDE
    + """
local done = redis.call('GET', KEYS[5])
if done then
  if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('DEL', KEYS[4]) end
  return done
end
local entries = tonumber(redis.call('HGET', KEYS[3], 'entries') or '0')
local bytes = tonumber(redis.call('HGET', KEYS[3], 'bytes') or '0')
local max_entries, max_bytes, size = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if entries > 0 and ((max_entries > 0 and entries >= max_entries) or (max_bytes > 0 and bytes + size > max_bytes)) then
  redis.call('DEL', KEYS[4])
  return false
end
redis.call('HSET', KEYS[2], unpack(ARGV, 7))
admit(KEYS[2], KEYS[1], KEYS[3], size)
local id = redis.call('XADD', KEYS[1], '*', 'payload', KEYS[2], 'rows', ARGV[4], 'bytes', ARGV[3], 'meta', ARGV[5])
redis.call('SET', KEYS[5], id, 'NX', 'EX', tonumber(ARGV[6]))
return id
"""
)

# KEYS: stream, inflight, retired set. ARGV: group, mode (delete | retire | keep), ids...
# Returns how many ids were pending. Only an entry this call acknowledged releases its payload,
# so an id acknowledged twice (by a slow consumer after a reclaim) changes nothing.
ACK = (
    _PRELUDE
    + """
local acked = 0
for i = 3, #ARGV do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    acked = acked + 1
    local fields = entry_fields(KEYS[1], ARGV[i])
    if fields then
      release(fields['payload'], KEYS[1], KEYS[2])
      if ARGV[2] == 'delete' then
        free(fields['payload'])
      elseif ARGV[2] == 'retire' then
        redis.call('SADD', KEYS[3], fields['payload'])
      end
    end
  end
end
return acked
"""
)

# KEYS: source stream, its inflight, destination stream, its inflight, new segment ('' if none).
# ARGV: group, id, n_ready, the ready column names (n_ready of them), meta ('' keeps the entry's),
# then the new segment's column names. The segment joins the payload only if none of its
# columns is there yet, so a stage that redoes an entry cannot overwrite what it wrote before.
# Returns nil if the entry was not pending (another consumer finished it first: the new segment
# is deleted), 0 if a ready column is still missing (another stage will forward it), else the
# id on the destination stream.
ADVANCE = (
    _PRELUDE
    + """
local group, id, n_ready, segment = ARGV[1], ARGV[2], tonumber(ARGV[3]), KEYS[5]
local fields = entry_fields(KEYS[1], id)
if redis.call('XACK', KEYS[1], group, id) == 0 or not fields or redis.call('EXISTS', fields['payload']) == 0 then
  if segment ~= '' then redis.call('DEL', segment) end
  return false
end
local payload = fields['payload']
local order = redis.call('HGET', payload, 'columns')
if segment ~= '' then
  local fresh, names = true, {}
  for i = 5 + n_ready, #ARGV do
    if has_column(order, ARGV[i]) then fresh = false end
    names[#names + 1] = ARGV[i]
  end
  if fresh then
    order = order .. '\\n' .. table.concat(names, '\\n')
    redis.call('HSET', payload, 'columns', order, 'seg:' .. segment, table.concat(names, '\\n'))
  else
    redis.call('DEL', segment)
  end
end
for i = 4, 3 + n_ready do
  if not has_column(order, ARGV[i]) then return 0 end
end
release(payload, KEYS[1], KEYS[2])
local size = 0
for _, key in ipairs(segments(payload)) do size = size + redis.call('STRLEN', key) end
admit(payload, KEYS[3], KEYS[4], size)
local meta = ARGV[4 + n_ready]
if meta == '' then meta = fields['meta'] end
return redis.call('XADD', KEYS[3], '*', 'payload', payload, 'rows', fields['rows'], 'bytes', size, 'meta', meta)
"""
)

# KEYS: stream, inflight, dead-letter stream. ARGV: group, id, reason, deliveries.
# Moves a pending entry to the dead-letter stream; its payload is kept there for inspection.
DEAD_LETTER = (
    _PRELUDE
    + """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return false end
local fields = entry_fields(KEYS[1], ARGV[2]) or {}
local payload = fields['payload'] or ''
if payload ~= '' then release(payload, KEYS[1], KEYS[2]) end
return redis.call('XADD', KEYS[3], '*', 'stream', KEYS[1], 'group', ARGV[1], 'entry', ARGV[2],
  'payload', payload, 'reason', ARGV[3], 'deliveries', ARGV[4])
"""
)

# KEYS: none. ARGV: payload keys. Deletes each payload with its segments (retired payloads).
FREE = (
    _PRELUDE
    + """
for i = 1, #ARGV do free(ARGV[i]) end
return #ARGV
"""
)
