--[[
queue_remove.lua: remove flushed segments from a flush queue, but only entries
whose deadline is unchanged (docs/design.md §6 step 6).

Purpose
  A segment that received spans after the flusher read its queue entry has a
  new deadline: its entry must stay so the new spans are flushed later. Only
  entries whose score still equals the score the flusher saw are removed.

KEYS
  KEYS[1]  the queue key P:q:<shard> (its own slot).

ARGV
  pairs: segment key, score as read by the flusher

Returns
  the number of entries removed
]]

local removed = 0
for i = 1, #ARGV, 2 do
    local score = redis.call("ZSCORE", KEYS[1], ARGV[i])
    if score and tonumber(score) == tonumber(ARGV[i + 1]) then
        removed = removed + redis.call("ZREM", KEYS[1], ARGV[i])
    end
end
return removed
