--[[
add_buffer.lua: insert one subsegment into its segment (docs/design.md §5 step 4).

Purpose
  Resolve the subsegment's segment root through the redirect map, record
  redirects for its spans, merge the member-keys index and counters of spans
  that were roots of earlier segments, add the subsegment's salt to the root's
  index and update the ic/ibc/hrs counters and the first-seen time. Detach the
  subsegment into a segment of its own (keyed by its salt) when it would push
  the segment over the byte limit or when the segment's flush lock is held.
  Earlier segments rooted at the subsegment's spans are merged only while
  the target stays within the byte limit; the rest stay segments of their
  own, cut from the root (P:cut:), so no merge builds an unbounded segment.
  Re-inserting a salt that is already indexed is a no-op for the counters, so a
  redelivered batch does not inflate ic/ibc.
  The queue update happens outside (the queue lives in another slot); this
  script returns the deadline for it.

Cost (it runs for every subsegment, so Redis CPU is mostly this script)
  Everything the call needs about the target segment is read in one MGET and
  every counter is written with one SET (the script is atomic, so
  read-modify-write is safe). A new segment costs about 11 commands, adding to
  an existing one about 9: HGET (root), MGET (target), SADD (index; its reply
  is the redelivery check), HSET + EXPIRE (redirects), MGET of the spans' ic
  keys (earlier segments rooted at these spans; one key per span, since every
  key read is a keyspace lookup), SET ic, SET ibc, and for a new segment
  EXPIRE of the index and SET of hrs/fs. Merging an earlier segment adds an
  MGET, an SSCAN and a DEL. A segment's own keys (index, ic, ibc, hrs, fs) get
  their TTL once, when the segment is created, and keep it (KEEPTTL; the
  index's EXPIRE NX on later calls only matters once it expired): the
  segment is flushed within SPANBUF_MAX_SEGMENT_LIFETIME_SECS of its first
  span, which the configuration keeps below the TTL, and its first payload
  set, written once, expires then anyway. `ic` lives twice the TTL, so a
  flush after the data expired still counts the loss. The redirect map is shared by the
  trace's segments and is refreshed on every call.

KEYS
  KEYS[1]  the trace's redirect map "P:ssr:{pt}"; every key touched is in its
           {pt} slot (the others depend on the root it resolves to, so they
           cannot be named before the call).
  KEYS[2]  "P:guard:{pt}", a key nothing ever writes. Because it is always
           missing, Redis Cluster refuses the call while the trace's slot
           migrates (ASK from the migrating node, TRYAGAIN on the importing
           one; the caller retries) instead of running it on either node
           against half-moved keys. Outside a migration it changes nothing.

ARGV
  1  key prefix (P)
  2  parent span id of the subsegment (its top-most known parent)
  3  "1" if the subsegment contains its segment root span, else "0"
  4  TTL in seconds for every key written (twice that for ic)
  5  payload bytes of the subsegment
  6  max segment bytes (0 = unlimited)
  7  salt (32 hex)
  8  "1" to detach when the flush lock is held, else "0"
  9  now, epoch seconds (may be fractional)
  10 timeout seconds (segment without root)
  11 root timeout seconds (segment with root)
  12 max segment lifetime seconds (0 = no cap)
  13 max spans one trace may buffer, counted as the entries of its redirect
     map (0 = no cap)
  14.. span ids of the subsegment

Returns a flat array
  [1] segment key "P:s:{pt}:<root or salt>"
  [2] 1 if the segment has seen its root span, else 0
  [3] deadline, epoch seconds as a string with millisecond precision
  [4] detach reason: 0 = none, 1 = too large, 2 = flush lock held,
      3 = refused: the trace would buffer more than ARGV[13] spans (nothing
      was written; the caller counts the spans and unlinks the payload set)
  [5] 1 if the salt was already indexed (redelivery; nothing counted), else 0
  [6..] span ids of earlier segments merged into this one (their queue
        entries are stale)

Extra keys of spanbuf's own (same slot, ignored by readers of Sentry's layout)
  P:fs:<segment key>   first-seen time of the segment, for the lifetime cap
  P:cut:<segment key>  on a detached segment: the root id it was cut from
]]

local ssr_key = KEYS[1]
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
local max_trace_spans = tonumber(ARGV[13])
local FIRST_ID = 14
local num_spans = #ARGV - FIRST_ID + 1

-- Lua's unpack() is limited by the C stack (a few thousand values): every
-- variadic call below goes in pages of this many values.
local PAGE = 1000

-- "P:ssr:{pt}" -> "{pt}"
local tag = string.sub(ssr_key, #prefix + 6)
local function segment_key(id) return prefix .. ":s:" .. tag .. ":" .. id end
local function mk_key(id) return prefix .. ":mk:" .. tag .. ":" .. id end
local function meta_key(kind, seg) return prefix .. ":" .. kind .. ":" .. seg end

local function sadd_paged(key, members)
    for i = 1, #members, PAGE do
        redis.call("SADD", key, unpack(members, i, math.min(i + PAGE - 1, #members)))
    end
end

local function deadline_of(first_seen, has_root)
    local deadline = now + (has_root and root_timeout or timeout)
    if max_lifetime > 0 then
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
local set_key = segment_key(root)
local salt_key = segment_key(salt)

-- 2. What the call needs of the target, and of a detached segment of this
--    very salt (a redelivery of a subsegment that was cut off earlier).
local meta = redis.call("MGET",
    meta_key("hrs", set_key), meta_key("ic", set_key), meta_key("ibc", set_key),
    meta_key("fs", set_key), meta_key("fl", set_key),
    meta_key("cut", salt_key), meta_key("hrs", salt_key), meta_key("fs", salt_key))
local target_has_root = meta[1] == "1"
local target_ic = tonumber(meta[2] or "0")
local target_ibc = tonumber(meta[3] or "0")
local target_fs = tonumber(meta[4] or now)
local target_locked = meta[5] ~= false

if meta[6] then
    local has_root = meta[7] == "1"
    return { salt_key, has_root and 1 or 0, deadline_of(tonumber(meta[8] or now), has_root), 0, 1 }
end

-- 3. Index the salt under the root; an unchanged index is a redelivery.
if redis.call("SADD", mk_key(root), salt) == 0 then
    return { set_key, target_has_root and 1 or 0, deadline_of(target_fs, target_has_root), 0, 1 }
end

-- 3b. A hot trace (one trace id carrying a flood of spans) would make its
--     redirect map, its slot and every later call on it grow without bound:
--     past the cap, the subsegment is refused (HLEN is O(1)).
if max_trace_spans > 0 and redis.call("HLEN", ssr_key) + num_spans > max_trace_spans then
    redis.call("SREM", mk_key(root), salt)
    return { set_key, 0, deadline_of(now, false), 3, 0 }
end

-- 4. Redirects, before the detach decision: later descendants must resolve
--    to the real root, not to a detached salt.
for i = FIRST_ID, #ARGV, PAGE do
    local pairs_ = {}
    for j = i, math.min(i + PAGE - 1, #ARGV) do
        pairs_[#pairs_ + 1] = ARGV[j]
        pairs_[#pairs_ + 1] = root
    end
    redis.call("HSET", ssr_key, unpack(pairs_))
end
redis.call("EXPIRE", ssr_key, ttl)

-- 5. Children that were roots of earlier segments. Most span ids are not:
--    one MGET of their ic keys finds those that are (each key read costs a
--    keyspace lookup, so this stays one key per span), a second reads the
--    rest of what merging needs for those few. A child segment that a flusher
--    has locked is left alone: its data is being delivered under its own id,
--    and merging it now would move salts the flusher is about to clean up.
local ic_prefix = prefix .. ":ic:" .. prefix .. ":s:" .. tag .. ":"
local found = {}
for i = FIRST_ID, #ARGV, PAGE do
    local ids = {}
    local keys = {}
    for j = i, math.min(i + PAGE - 1, #ARGV) do
        local id = ARGV[j]
        if id ~= parent and id ~= root then
            ids[#ids + 1] = id
            keys[#keys + 1] = ic_prefix .. id
        end
    end
    if #keys > 0 then
        local values = redis.call("MGET", unpack(keys))
        for k = 1, #ids do
            if values[k] then
                found[#found + 1] = { id = ids[k], ic = tonumber(values[k]) }
            end
        end
    end
end
local child = {}
local own_bytes = byte_count
for i = 1, #found, PAGE do
    local keys = {}
    local last = math.min(i + PAGE - 1, #found)
    for j = i, last do
        local seg = segment_key(found[j].id)
        keys[#keys + 1] = meta_key("ibc", seg)
        keys[#keys + 1] = meta_key("fl", seg)
        keys[#keys + 1] = meta_key("fs", seg)
    end
    local values = redis.call("MGET", unpack(keys))
    for j = i, last do
        local k = (j - i) * 3
        if not (check_lock and values[k + 2]) then
            local c = found[j]
            c.ibc = values[k + 1] and tonumber(values[k + 1])
            c.fs = values[k + 3] and tonumber(values[k + 3])
            child[#child + 1] = c
        end
    end
end

-- 6. Detach decision, on the subsegment's own bytes. A new, empty target has
--    nothing to be cut from, so size alone never detaches it.
local detach = 0
if max_bytes > 0 and target_ibc > 0 and target_ibc + own_bytes > max_bytes then
    detach = 1
elseif check_lock and target_locked then
    detach = 2
end
local target = root
local ic, ibc, first_seen = target_ic, target_ibc, target_fs
local new_segment = target_ic == 0 and target_ibc == 0
if detach > 0 then
    redis.call("SREM", mk_key(root), salt)
    target = salt
    set_key = salt_key
    ic, ibc, first_seen, new_segment = 0, 0, now, true
    redis.call("SET", meta_key("cut", set_key), root, "EX", ttl)
    redis.call("SADD", mk_key(salt), salt)
end
local target_mk = mk_key(target)

-- 7. Merge children that were segment roots: index, counters, first-seen.
--    Only as many as the byte limit allows: a child segment that does not
--    fit stays a segment of its own, cut from the root (its record carries
--    the root's id), so merging many large children never builds a segment
--    over the limit. The redirects already send its later descendants to
--    the root.
local merged = {}
local fs_changed = new_segment
for _, c in ipairs(child) do
    local seg = segment_key(c.id)
    if c.ic and max_bytes > 0 and (c.ibc or 0) > 0
        and ibc + byte_count + c.ibc > max_bytes then
        redis.call("SET", meta_key("cut", seg), root, "EX", ttl)
        c.ic, c.ibc = nil, nil
    end
    if c.ic then
        local child_mk = mk_key(c.id)
        local cursor = "0"
        repeat
            local page = redis.call("SSCAN", child_mk, cursor, "COUNT", PAGE)
            cursor = page[1]
            sadd_paged(target_mk, page[2])
        until cursor == "0"
        if c.fs and c.fs < first_seen then
            first_seen = c.fs
            fs_changed = true
        end
        redis.call("DEL", meta_key("ic", seg), child_mk, meta_key("fs", seg), meta_key("hrs", seg))
        ic = ic + c.ic
        merged[#merged + 1] = c.id
    end
    if c.ibc then
        redis.call("DEL", meta_key("ibc", seg))
        byte_count = byte_count + c.ibc
    end
end

-- 8. Counters (one SET each, TTL included), and what a new segment needs once.
ic = ic + num_spans
ibc = ibc + byte_count
-- A segment's own keys all expire together, `ttl` after it was created:
-- written in one call, the index and the counters get the same expiry, so
-- the counters' absence (a new segment) means the index is new too.
-- The span counter outlives the data by a TTL (docs/design.md §4): a flush
-- that comes only after the payload sets expired (a flusher stalled past the
-- TTL) still knows how many spans were lost and counts them as expired,
-- instead of finding an "empty" segment. Then the index may be gone while
-- the counter lives: a later subsegment re-creates the index, and NX gives
-- it a TTL without moving the one it still has.
if new_segment then
    redis.call("SET", meta_key("ic", set_key), ic, "EX", ttl * 2)
    redis.call("SET", meta_key("ibc", set_key), ibc, "EX", ttl)
    redis.call("EXPIRE", target_mk, ttl)
else
    redis.call("SET", meta_key("ic", set_key), ic, "KEEPTTL")
    redis.call("SET", meta_key("ibc", set_key), ibc, "KEEPTTL")
    redis.call("EXPIRE", target_mk, ttl, "NX")
end
if fs_changed then
    redis.call("SET", meta_key("fs", set_key), string.format("%.3f", first_seen), "EX", ttl)
end
-- The root flag belongs to the real root's segment; a detached part inherits
-- it for its deadline only.
local has_root = has_segment_span or target_has_root
if has_segment_span and not target_has_root then
    redis.call("SET", meta_key("hrs", segment_key(root)), "1", "EX", ttl)
end

local result = { set_key, has_root and 1 or 0, deadline_of(first_seen, has_root), detach, 0 }
for _, id in ipairs(merged) do
    result[#result + 1] = id
end
return result
