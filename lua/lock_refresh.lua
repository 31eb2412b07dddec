#!lua flags=allow-oom
--[[
lock_refresh.lua: extend a flush lock while its holder is still delivering
(docs/design.md §6 step 5).

Purpose
  A delivery can take longer than the lock TTL (a slow or recovering broker).
  Silent for the lock TTL, a holder is taken for dead and its lock taken
  over (flush_load), and another flusher would deliver the segment again.
  The holder therefore refreshes its locks while it waits for the broker;
  only a lock that still holds the holder's token is refreshed, so a lock
  lost to a takeover (or deleted) is never taken back.

Runs at and above maxmemory
  Flagged allow-oom (the first line): flushing is what frees memory, so the
  lock, the cleanup and the dequeue must work when Redis refuses other writes
  (maxmemory-policy noeviction); without the flag the lock's SET was refused
  and nothing could ever be flushed.

KEYS
  KEYS[1]  the flush lock P:fl:<segment key>, the only key touched (a
           single key: while its slot migrates, Redis runs the call on
           whichever node holds the lock, or on the importing node when
           neither does, which then answers 0).

ARGV
  1  key prefix (P) and
  2  segment root id (or salt, for a detached segment): not read (KEYS[1]
     names the lock); kept so the per-segment scripts share their leading
     arguments
  3  flusher token
  4  lock hold in milliseconds (flush_load's ARGV[5]): a refresh restarts
     it, which tells other flushers the holder is alive

Returns 1 if the lock was still ours and is extended, 0 otherwise.

Cluster slot: {pt}, the slot of KEYS[1].
]]

local lock_key = KEYS[1]
local token = ARGV[3]
local hold_ms = tonumber(ARGV[4])

if redis.call("GET", lock_key) == token then
    redis.call("PEXPIRE", lock_key, hold_ms)
    return 1
end
return 0
