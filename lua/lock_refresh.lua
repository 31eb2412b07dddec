#!lua flags=allow-oom
--[[
lock_refresh.lua: extend a flush lock while its holder is still delivering
(docs/design.md §6 step 5).

Purpose
  A delivery can take longer than the lock TTL (a slow or recovering broker).
  If the lock expired mid-delivery, another flusher could take the segment,
  and a merge in that window could deliver the same spans again under a
  different flush id. The holder therefore extends its locks while it waits
  for the broker; only a lock that still holds the holder's token is
  extended, so a lock lost to expiry is never taken back.

Runs at and above maxmemory
  Flagged allow-oom (the first line): flushing is what frees memory, so the
  lock, the cleanup and the dequeue must work when Redis refuses other writes
  (maxmemory-policy noeviction); without the flag the lock's SET was refused
  and nothing could ever be flushed.

KEYS
  KEYS[1]  "<project_id>:<trace_id>" (pt); the lock key is in the {pt} slot.

ARGV
  1  key prefix (P)
  2  segment root id (or salt, for a detached segment)
  3  flusher token
  4  lock TTL in milliseconds

Returns 1 if the lock was still ours and is extended, 0 otherwise.

Cluster slot: {pt}, the slot of KEYS[1].
]]

local pt = KEYS[1]
local prefix = ARGV[1]
local root = ARGV[2]
local token = ARGV[3]
local lock_ttl_ms = tonumber(ARGV[4])

local lock_key = prefix .. ":fl:" .. prefix .. ":s:{" .. pt .. "}:" .. root
if redis.call("GET", lock_key) == token then
    redis.call("PEXPIRE", lock_key, lock_ttl_ms)
    return 1
end
return 0
