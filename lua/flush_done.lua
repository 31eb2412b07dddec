#!lua flags=allow-oom
--[[
flush_done.lua: precise cleanup of a delivered segment (docs/design.md §6 step 6).

Purpose
  After Kafka confirmed delivery, remove exactly the salts that were delivered
  from the segment's member-keys index and subtract exactly their counts.
  Delete the segment's keys (and the redirects of its delivered spans) only if
  nothing else remains; a subsegment that arrived after the load keeps the
  segment alive and is flushed later. Release the flush lock only if it still
  holds our token. While the segment lives on, the redirects of its
  delivered spans stay (a later child must still find the segment); they
  expire with their TTL. Salts that another cleanup already removed (a second
  flusher delivered the same snapshot after a lock expiry) subtract nothing.
  The payload sets live in other slots: the caller unlinks the salts this
  script reports as removed.

Runs at and above maxmemory
  Flagged allow-oom (the first line): flushing is what frees memory, so the
  lock, the cleanup and the dequeue must work when Redis refuses other writes
  (maxmemory-policy noeviction); without the flag the lock's SET was refused
  and nothing could ever be flushed.

KEYS (every key the script touches, all in the trace's {pt} slot; the
same list as flush_load's, so Redis Cluster refuses the call while the slot
migrates and one of them is not on the node, instead of running it against
half-moved keys)
  KEYS[1]  P:mk:{pt}:<root>      member-keys index
  KEYS[2]  P:ic:<segment key>    ingested span count
  KEYS[3]  P:ibc:<segment key>   ingested byte count
  KEYS[4]  P:hrs:<segment key>   root flag
  KEYS[5]  P:fs:<segment key>    first-seen time
  KEYS[6]  P:cut:<segment key>   root a detached segment was cut from
  KEYS[7]  P:fl:<segment key>    flush lock
  KEYS[8]  P:ssr:{pt}            redirect map
  KEYS[9]  P:dl:{pt}             delivered record

ARGV
  1  key prefix (P) and
  2  segment root id (or salt, for a detached segment): not read (KEYS
     names everything); kept so the per-segment scripts share their
     leading arguments
  3  flusher token
  4  spans of the snapshot that could not be loaded (already counted as
     dropped); subtracted from ic once, by the cleanup that removes salts
  5  TTL in seconds of the trace's delivered record; 0 = keep none
  6  number of delivered salts S; -1 for a further page of a large
     segment's delivered span ids (see below)
  7 .. 6+3S   triples: salt, span count, byte count (what its payload set held)
  7+3S ..     span ids of the delivered spans (their redirects are deleted
              when the segment is deleted; they are appended to the
              delivered record)

The delivered record (spanbuf's own)
  "P:dl:{pt}": the span ids the trace delivered, each followed by a comma,
  living the given TTL from the trace's first delivery (extended by later
  ones). A span read again from Kafka after its segment was flushed (a
  worker that crashed before committing) is ingested afresh; flush_load
  returns this record and the flusher counts such spans as duplicates
  instead of delivering them again under another flush_id. Written only by
  the cleanup that removed salts, so a repeated cleanup appends nothing.

A further page (ARGV[6] = -1, no salts): the span ids after the first page
of a segment with more than a page of them, sent after its cleanup so that no
call carries an unbounded number of them: their redirects are deleted if the
segment is (still) gone, and they are appended to the delivered record.

Returns a flat array
  [1] 1 if the segment's keys were deleted (nothing else remained), else 0
  [2] 1 if the lock was released, 0 if it was not ours (or locks are off)
  [3..] salts this call removed from the index (unlink their payload sets)
]]

local mk_key, ic_key, ibc_key, hrs_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local fs_key, cut_key, lock_key, ssr_key = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local dl_key = KEYS[9]
local token = ARGV[3]
local unloaded = tonumber(ARGV[4])
local delivered_ttl = tonumber(ARGV[5])
local num_salts = tonumber(ARGV[6])
local FIRST_SALT = 7
local FIRST_SPAN = FIRST_SALT + 3 * math.max(num_salts, 0)
local PAGE = 1000

-- Never creates a key (it would have no TTL) and never goes below zero.
local function subtract(key, n)
    local value = redis.call("GET", key)
    if value then
        redis.call("SET", key, math.max(0, tonumber(value) - n), "KEEPTTL")
    end
end

local removed = {}
local spans = 0
local bytes = 0
for i = FIRST_SALT, FIRST_SPAN - 1, 3 do
    if redis.call("SREM", mk_key, ARGV[i]) == 1 then
        removed[#removed + 1] = ARGV[i]
        spans = spans + tonumber(ARGV[i + 1])
        bytes = bytes + tonumber(ARGV[i + 2])
    end
end
if #removed > 0 then
    spans = spans + unloaded
end

local function forget_redirects()
    for i = FIRST_SPAN, #ARGV, PAGE do
        redis.call("HDEL", ssr_key, unpack(ARGV, i, math.min(i + PAGE - 1, #ARGV)))
    end
end

-- The delivered record: one SET for a trace's first delivery, APPEND and
-- EXPIRE after that.
local function record_delivered()
    if delivered_ttl == 0 or #ARGV < FIRST_SPAN then
        return
    end
    local parts = {}
    for i = FIRST_SPAN, #ARGV do
        parts[#parts + 1] = ARGV[i]
    end
    local ids = table.concat(parts, ",") .. ","
    if not redis.call("SET", dl_key, ids, "EX", delivered_ttl, "NX") then
        redis.call("APPEND", dl_key, ids)
        redis.call("EXPIRE", dl_key, delivered_ttl)
    end
end

if num_salts < 0 then
    if redis.call("EXISTS", mk_key) == 0 then
        forget_redirects()
    end
    record_delivered()
    return { 0, 0 }
end

if #removed > 0 then
    record_delivered()
end

local deleted = 0
if redis.call("EXISTS", mk_key) == 0 then
    -- Nothing else buffered: the segment is gone, and with it the redirects
    -- of the spans just delivered (a late child then starts a new segment).
    redis.call("DEL", ic_key, ibc_key, hrs_key, fs_key, cut_key)
    forget_redirects()
    deleted = 1
elseif #removed > 0 then
    -- New data arrived after the load: keep it and its share of the counts.
    subtract(ic_key, spans)
    subtract(ibc_key, bytes)
end

local released = 0
if redis.call("GET", lock_key) == token then
    redis.call("DEL", lock_key)
    released = 1
end

local result = { deleted, released }
for _, salt in ipairs(removed) do
    result[#result + 1] = salt
end
return result
