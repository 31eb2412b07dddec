#!lua flags=allow-oom
--[[
flush_load.lua: lock a due segment and read its index and counters (docs/design.md §6
steps 2–3), atomically.

Purpose
  Take the segment's flush lock with the flusher's token (unless locks are
  off), then return what the flusher needs to load it: the salts of its
  member-keys index, the ingested span and byte counts, and the segment id its
  spans must claim. Reading the index and the counters in one atomic step
  gives the flusher a consistent snapshot; cleanup later removes exactly that
  snapshot.

Runs at and above maxmemory
  Flagged allow-oom (the first line): flushing is what frees memory, so the
  lock, the cleanup and the dequeue must work when Redis refuses other writes
  (maxmemory-policy noeviction); without the flag the lock's SET was refused
  and nothing could ever be flushed.

KEYS
  KEYS[1]  "<project_id>:<trace_id>" (pt); every key touched is in the {pt}
           slot.

ARGV
  1  key prefix (P)
  2  segment root id (or salt, for a detached segment)
  3  flusher token
  4  lock TTL in milliseconds; 0 = locks disabled

Returns a flat array
  [1] 1 if locked (or locks are off, or the lock already held our token),
      0 if another flusher holds the lock (nothing else follows)
  [2] ingested span count (ic), -1 when absent
  [3] ingested byte count (ibc), -1 when absent
  [4] segment id the spans claim: the root, or for a detached segment the
      root it was cut from, followed through the redirect map to its current
      root
  [5] the trace's delivered record "P:dl:{pt}": span ids delivered by
      earlier flushes, each followed by a comma ("" when there is none);
      spans among them are duplicates of a delivery already made
  [6..] salts of the member-keys index
]]

local pt = KEYS[1]
local prefix = ARGV[1]
local root = ARGV[2]
local token = ARGV[3]
local lock_ttl_ms = tonumber(ARGV[4])

local tag = "{" .. pt .. "}"
local segment_key = prefix .. ":s:" .. tag .. ":" .. root
local function meta_key(kind) return prefix .. ":" .. kind .. ":" .. segment_key end

if lock_ttl_ms > 0 then
    local lock_key = meta_key("fl")
    local got = redis.call("SET", lock_key, token, "NX", "PX", lock_ttl_ms)
    if not got then
        -- Our own lock, kept from a cycle whose delivery failed: take it
        -- again (a fresh TTL) and deliver the same snapshot.
        if redis.call("GET", lock_key) ~= token then
            return { 0 }
        end
        redis.call("PEXPIRE", lock_key, lock_ttl_ms)
    end
end

local meta = redis.call("MGET", meta_key("ic"), meta_key("ibc"), meta_key("cut"),
    prefix .. ":dl:" .. tag)
local ic = tonumber(meta[1] or "-1")
local ibc = tonumber(meta[2] or "-1")

local segment_id = root
local cut = meta[3]
if cut then
    -- The part was cut off from segment `cut`, which may since have been
    -- merged under a higher root.
    segment_id = cut
    local ssr_key = prefix .. ":ssr:" .. tag
    for _ = 0, 100 do
        local next_root = redis.call("HGET", ssr_key, segment_id)
        if not next_root or next_root == segment_id then break end
        segment_id = next_root
    end
end

local result = { 1, ic, ibc, segment_id, meta[4] or "" }
local salts = redis.call("SMEMBERS", prefix .. ":mk:" .. tag .. ":" .. root)
for i = 1, #salts do
    result[#result + 1] = salts[i]
end
return result
