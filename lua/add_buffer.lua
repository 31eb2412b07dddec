--[[
add_buffer.lua: insert one subsegment into its segment (docs/design.md §5 step 4).

Purpose
  Resolve the subsegment's segment root through the redirect map, record
  redirects for its spans, merge the member-keys index and counters of spans
  that were roots of earlier segments, add the subsegment's salt to the root's
  index and update the ic/ibc/hrs counters and the first-seen time. Detach the
  subsegment into a segment of its own (keyed by its salt) when it would push
  the segment over the byte limit or when the segment's flush lock is held.
  Re-inserting a salt that is already indexed is a no-op for the counters, so a
  redelivered batch does not inflate ic/ibc.
  The queue update happens outside (the queue lives in another slot); this
  script returns the deadline for it.

KEYS
  KEYS[1]  "<project_id>:<trace_id>" (pt). Every key touched is in the {pt}
           slot, which is the slot of this bare key.

ARGV
  1  key prefix (P)
  2  parent span id of the subsegment (its top-most known parent)
  3  "1" if the subsegment contains its segment root span, else "0"
  4  TTL in seconds for every key written
  5  payload bytes of the subsegment
  6  max segment bytes (0 = unlimited)
  7  salt (32 hex)
  8  "1" to detach when the flush lock is held, else "0"
  9  now, epoch seconds (may be fractional)
  10 timeout seconds (segment without root)
  11 root timeout seconds (segment with root)
  12 max segment lifetime seconds (0 = no cap)
  13.. span ids of the subsegment

Returns a flat array
  [1] segment key "P:s:{pt}:<root or salt>"
  [2] 1 if the segment has seen its root span, else 0
  [3] deadline, epoch seconds as a string with millisecond precision
  [4] detach reason: 0 = none, 1 = too large, 2 = flush lock held
  [5] 1 if the salt was already indexed (redelivery; nothing counted), else 0
  [6..] span ids of earlier segments merged into this one (their queue
        entries are stale)

Extra keys of spanbuf's own (same slot, ignored by readers of Sentry's layout)
  P:fs:<segment key>   first-seen time of the segment, for the lifetime cap
  P:cut:<segment key>  on a detached segment: the root id it was cut from
]]

local pt = KEYS[1]
local prefix = ARGV[1]
local parent = ARGV[2]
local has_segment_span = ARGV[3] == "1"
local ttl = tonumber(ARGV[4])
local byte_count = tonumber(ARGV[5])
local max_bytes = tonumber(ARGV[6])
local salt = ARGV[7]
local check_lock = ARGV[8] == "1"
local now = tonumber(ARGV[9])
local timeout = tonumber(ARGV[10])
local root_timeout = tonumber(ARGV[11])
local max_lifetime = tonumber(ARGV[12])
local FIRST_ID = 13
local num_spans = #ARGV - FIRST_ID + 1

-- Lua's unpack() is limited by the C stack (a few thousand values): every
-- variadic call below goes in pages of this many values.
local PAGE = 1000

local tag = "{" .. pt .. "}"
local ssr_key = prefix .. ":ssr:" .. tag
local function segment_key(id) return prefix .. ":s:" .. tag .. ":" .. id end
local function mk_key(id) return prefix .. ":mk:" .. tag .. ":" .. id end
local function meta_key(kind, seg) return prefix .. ":" .. kind .. ":" .. seg end

local function sadd_paged(key, members)
    for i = 1, #members, PAGE do
        redis.call("SADD", key, unpack(members, i, math.min(i + PAGE - 1, #members)))
    end
end

local function deadline_of(seg, has_root)
    local deadline = now + (has_root and root_timeout or timeout)
    if max_lifetime > 0 then
        local first_seen = tonumber(redis.call("GET", meta_key("fs", seg)) or now)
        deadline = math.min(deadline, first_seen + max_lifetime)
    end
    return string.format("%.3f", deadline)
end

-- 1. Resolve the segment root through the redirect map.
local root = parent
for _ = 0, 100 do
    local next_root = redis.call("HGET", ssr_key, root)
    if not next_root or next_root == root then break end
    root = next_root
end

-- 2. Redelivery: the salt is already indexed under the root or as a detached
--    segment of its own. Counters stay as they are.
for _, candidate in ipairs({ root, salt }) do
    if redis.call("SISMEMBER", mk_key(candidate), salt) == 1 then
        local seg = segment_key(candidate)
        local has_root = redis.call("GET", meta_key("hrs", seg)) == "1"
        return { seg, has_root and 1 or 0, deadline_of(seg, has_root), 0, 1 }
    end
end

local set_key = segment_key(root)

-- 3. Root flag and redirects, before the detach decision: later descendants
--    must resolve to the real root, not to a detached salt.
local has_root = has_segment_span or redis.call("GET", meta_key("hrs", set_key)) == "1"
if has_root then
    redis.call("SETEX", meta_key("hrs", set_key), ttl, "1")
end
for i = FIRST_ID, #ARGV, PAGE do
    local pairs_ = {}
    for j = i, math.min(i + PAGE - 1, #ARGV) do
        pairs_[#pairs_ + 1] = ARGV[j]
        pairs_[#pairs_ + 1] = root
    end
    redis.call("HSET", ssr_key, unpack(pairs_))
end
redis.call("EXPIRE", ssr_key, ttl)

-- 4. Children that were roots of earlier segments, and their bytes.
local target_ibc = tonumber(redis.call("GET", meta_key("ibc", set_key)) or "0")
local children = {}
for i = FIRST_ID, #ARGV do
    local id = ARGV[i]
    if id ~= parent and id ~= root then
        children[#children + 1] = id
    end
end
-- A child segment that a flusher has locked is left alone: its data is being
-- delivered under its own id, and merging it now would move salts the
-- flusher is about to clean up.
local child_ic = {}
local child_ibc = {}
for i = 1, #children, PAGE do
    local keys = {}
    local last = math.min(i + PAGE - 1, #children)
    for j = i, last do
        local seg = segment_key(children[j])
        keys[#keys + 1] = meta_key("ic", seg)
        keys[#keys + 1] = meta_key("ibc", seg)
        keys[#keys + 1] = meta_key("fl", seg)
    end
    local values = redis.call("MGET", unpack(keys))
    for j = i, last do
        local k = (j - i) * 3
        if not (check_lock and values[k + 3]) then
            child_ic[j] = values[k + 1]
            child_ibc[j] = values[k + 2]
            if child_ibc[j] then
                byte_count = byte_count + tonumber(child_ibc[j])
            end
        end
    end
end

-- 5. Detach decision. A new, empty target has nothing to be cut from, so size
--    alone never detaches it.
local detach = 0
if max_bytes > 0 and target_ibc > 0 and target_ibc + byte_count > max_bytes then
    detach = 1
elseif check_lock and redis.call("EXISTS", meta_key("fl", set_key)) == 1 then
    detach = 2
end
local target = root
if detach > 0 then
    target = salt
    set_key = segment_key(salt)
    redis.call("SETEX", meta_key("cut", set_key), ttl, root)
end
local ic_key = meta_key("ic", set_key)
local ibc_key = meta_key("ibc", set_key)
local fs_key = meta_key("fs", set_key)
local target_mk = mk_key(target)

-- First-seen time: the earliest of the target's and every merged child's.
local first_seen = tonumber(redis.call("GET", fs_key) or now)

-- 6. Merge children that were segment roots: index, counters, first-seen.
local merged = {}
local merged_ic = 0
for j, id in ipairs(children) do
    local seg = segment_key(id)
    if child_ic[j] then
        merged_ic = merged_ic + tonumber(child_ic[j])
        local child_mk = mk_key(id)
        local cursor = "0"
        repeat
            local page = redis.call("SSCAN", child_mk, cursor, "COUNT", PAGE)
            cursor = page[1]
            sadd_paged(target_mk, page[2])
        until cursor == "0"
        local child_fs = redis.call("GET", meta_key("fs", seg))
        if child_fs then
            first_seen = math.min(first_seen, tonumber(child_fs))
        end
        redis.call("DEL", meta_key("ic", seg), child_mk, meta_key("fs", seg), meta_key("hrs", seg))
        merged[#merged + 1] = id
    end
    if child_ibc[j] then
        redis.call("DEL", meta_key("ibc", seg))
    end
end

-- 7. Index the salt, count, stamp first-seen, refresh TTLs.
redis.call("SADD", target_mk, salt)
redis.call("EXPIRE", target_mk, ttl)
redis.call("INCRBY", ic_key, num_spans + merged_ic)
redis.call("EXPIRE", ic_key, ttl)
redis.call("INCRBY", ibc_key, byte_count)
redis.call("EXPIRE", ibc_key, ttl)
redis.call("SET", fs_key, string.format("%.3f", first_seen), "EX", ttl)

-- A detached part inherits the root flag for its deadline only; hrs of the
-- original target was set above.
local result = { set_key, has_root and 1 or 0, deadline_of(set_key, has_root), detach, 0 }
for _, id in ipairs(merged) do
    result[#result + 1] = id
end
return result
