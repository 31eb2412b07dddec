#!lua flags=allow-oom
--[[
queue_remove.lua: remove flushed segments from a flush queue, but only entries
whose deadline is unchanged (docs/design.md §6 step 6).

Purpose
  A segment that received spans after the flusher read its queue entry has a
  new deadline: its entry must stay so the new spans are flushed later. Only
  entries whose score still equals the score the flusher saw are removed.

Runs at and above maxmemory
  Flagged allow-oom (the first line): flushing is what frees memory, so the
  lock, the cleanup and the dequeue must work when Redis refuses other writes
  (maxmemory-policy noeviction); without the flag the lock's SET was refused
  and nothing could ever be flushed.

KEYS
  KEYS[1]  the queue key P:q:<shard> (its own slot).

ARGV
  pairs: segment key, score as read by the flusher

Returns
  the number of entries removed
]]

-- One ZMSCORE and one ZREM per page, whatever the number of entries.
local PAGE = 1000
local removed = 0
for i = 1, #ARGV, 2 * PAGE do
    local last = math.min(i + 2 * PAGE - 1, #ARGV)
    local members = {}
    for j = i, last, 2 do
        members[#members + 1] = ARGV[j]
    end
    local scores = redis.call("ZMSCORE", KEYS[1], unpack(members))
    local gone = {}
    for k, member in ipairs(members) do
        local score = scores[k]
        if score and tonumber(score) == tonumber(ARGV[i + 2 * (k - 1) + 1]) then
            gone[#gone + 1] = member
        end
    end
    if #gone > 0 then
        removed = removed + redis.call("ZREM", KEYS[1], unpack(gone))
    end
end
return removed
