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
  The nine keys of flush_done's header, in the same order (one list,
  Keys::segment_keys); this script touches KEYS[1] (index), [2] (ic), [3]
  (ibc), [6] (cut), [7] (lock), [8] (redirect map) and [9] (delivered
  record), not [4] and [5]. Declaring every key makes Redis Cluster refuse
  the call while the slot migrates and one of them is not on the node.

ARGV
  1  key prefix (P); not read (KEYS names everything)
  2  segment root id (or salt, for a detached segment)
  3  flusher token
  4  lock TTL in milliseconds; 0 = locks disabled
  5  lock hold in milliseconds (>= the TTL): how long the lock key stays
     after its last refresh (see "The lock" below)

The lock
  The lock key lives the hold (the data's TTL), not the lock TTL: until the
  cleanup deletes it, or until a successor takes the segment over. While it
  exists add_buffer detaches new spans instead of merging them, so a
  delivery whose cleanup never ran (the flusher died after the broker's
  acknowledgement) is delivered again from the same snapshot, under the same
  flush ids, and the spans that came meanwhile go out as a part of their
  own. The holder refreshes the lock while it delivers; silent for the lock
  TTL (hold - PTTL >= TTL) the holder is taken for dead and the lock taken
  over. Only then is PTTL read: an uncontended lock costs one SET, as before.
  A lock whose PTTL is at most the lock TTL was not set with a hold (Sentry's
  flusher sharing the Redis, an older spanbuf): it is never taken over, it
  expires. Every worker of a fleet must use the same SPANBUF_REDIS_TTL_SECS
  and SPANBUF_FLUSH_LOCK_TTL_SECS: one with a longer hold would take the
  live locks of one with a shorter hold over (a re-delivery of the same
  snapshot, duplicates with the same flush ids).

Returns a flat array
  [1] 1 if locked (or locks are off, or the lock already held our token, or
      its holder was silent for the lock TTL and the lock was taken over),
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

local mk_key, ic_key, ibc_key, cut_key = KEYS[1], KEYS[2], KEYS[3], KEYS[6]
local lock_key, ssr_key, dl_key = KEYS[7], KEYS[8], KEYS[9]
local root = ARGV[2]
local token = ARGV[3]
local lock_ttl_ms = tonumber(ARGV[4])
local hold_ms = tonumber(ARGV[5])

if lock_ttl_ms > 0 then
    local got = redis.call("SET", lock_key, token, "NX", "PX", hold_ms)
    if not got then
        if redis.call("GET", lock_key) == token then
            -- Our own lock, kept from a cycle whose delivery failed: take it
            -- again and deliver the same snapshot.
            redis.call("PEXPIRE", lock_key, hold_ms)
        else
            -- Another flusher's. Taken over only if it is one of ours (its
            -- TTL longer than a lock TTL: set with the hold) and silent for
            -- the lock TTL. A shorter one (a lock of Sentry's flusher, or of
            -- an older spanbuf) is held until it expires.
            local pttl = redis.call("PTTL", lock_key)
            if pttl <= lock_ttl_ms or hold_ms - pttl < lock_ttl_ms then
                return { 0 }
            end
            -- Its holder went silent (died after delivering, before its
            -- cleanup): the snapshot is unchanged, deliver it again.
            redis.call("SET", lock_key, token, "PX", hold_ms)
        end
    end
end

local meta = redis.call("MGET", ic_key, ibc_key, cut_key, dl_key)
local ic = tonumber(meta[1] or "-1")
local ibc = tonumber(meta[2] or "-1")

local segment_id = root
local cut = meta[3]
if cut then
    -- The part was cut off from segment `cut`, which may since have been
    -- merged under a higher root.
    segment_id = cut
    for _ = 0, 100 do
        local next_root = redis.call("HGET", ssr_key, segment_id)
        if not next_root or next_root == segment_id then break end
        segment_id = next_root
    end
end

local result = { 1, ic, ibc, segment_id, meta[4] or "" }
local salts = redis.call("SMEMBERS", mk_key)
for i = 1, #salts do
    result[#result + 1] = salts[i]
end
return result
