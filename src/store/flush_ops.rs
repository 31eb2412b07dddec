//! Store operations of the flush path (docs/design.md §6): queue reads, lock and
//! snapshot, paged payload loading, precise cleanup.
//!
//! Translates flush requests into pipelined stages and parses the replies;
//! every stage covers all segments and shards of a cycle at once, so a cycle's
//! round trips do not grow with the number of segments. Must not build records
//! or decide what was delivered.

use redis::Value;

use super::{Op, Store, StoreError};

/// What one shard's queue looks like at the start of a cycle.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSnapshot {
    pub shard: u32,
    pub queue_key: String,
    /// Segments in the queue.
    pub size: u64,
    /// The earliest deadline, if any.
    pub oldest_deadline: Option<f64>,
    /// Due segments: `(segment key, score exactly as Redis returned it)`.
    pub due: Vec<(String, String)>,
}

/// How long a flush lock protects its holder, and how long it stays.
///
/// A lock lives `hold_ms` from its last refresh: until the cleanup deletes
/// it, or for the data's TTL after its holder died. While it exists, spans
/// that arrive detach instead of merging into the snapshot (`add_buffer`), so
/// a delivery whose cleanup never ran (a crash after the broker's
/// acknowledgement) is delivered again from the same snapshot, under the same
/// flush ids. Another flusher takes a lock over once its holder has been
/// silent for `ttl_ms` (`flush_load`: `hold_ms − PTTL ≥ ttl_ms`); the holder
/// refreshes it every third of that while it delivers.
#[derive(Debug, Clone, Copy)]
pub struct LockTimes {
    /// `SPANBUF_FLUSH_LOCK_TTL_SECS` in ms; 0 = locks disabled.
    pub ttl_ms: u64,
    /// At least `ttl_ms`: `SPANBUF_REDIS_TTL_SECS` in ms.
    pub hold_ms: u64,
}

/// A segment to lock and load.
#[derive(Debug, Clone)]
pub struct LoadRequest<'a> {
    pub pt: String,
    pub root: &'a str,
}

/// Delivered span ids per `flush_done` call: a segment with more goes in
/// further calls of a page each, so no call is unbounded work for Redis.
const SPAN_IDS_PER_CALL: usize = 1000;

/// The snapshot of one segment taken under its lock.
#[derive(Debug, Clone, PartialEq)]
pub enum Loaded {
    /// Another flusher holds the lock.
    Contended,
    Snapshot {
        /// `ic`, if present.
        ingested_spans: Option<u64>,
        /// `ibc`, if present.
        ingested_bytes: Option<u64>,
        /// The id the spans claim.
        segment_id: String,
        /// The trace's delivered record: span ids delivered by earlier
        /// flushes, each followed by a comma (`""` when none).
        delivered: String,
        salts: Vec<String>,
    },
}

/// One payload set's content: `None` when the set does not exist (expired).
pub type PayloadSet = Option<Vec<Vec<u8>>>;

/// A delivered salt: what its payload set held.
#[derive(Debug, Clone)]
pub struct DeliveredSalt {
    pub salt: String,
    pub spans: u64,
    pub bytes: u64,
}

/// Cleanup of one segment.
#[derive(Debug, Clone)]
pub struct DoneRequest<'a> {
    pub pt: String,
    pub root: &'a str,
    pub shard_queue: &'a str,
    pub segment_key: &'a str,
    /// The queue score seen at the start of the cycle.
    pub score: &'a str,
    /// Spans of the snapshot that could not be loaded (counted as dropped).
    pub unloaded: u64,
    pub salts: Vec<DeliveredSalt>,
    pub span_ids: Vec<&'a str>,
}

/// What cleanup did for one segment.
#[derive(Debug, Clone, PartialEq)]
pub struct DoneReply {
    pub segment_deleted: bool,
    pub lock_released: bool,
    /// Salts removed from the index (their payload sets were unlinked).
    pub removed_salts: Vec<String>,
}

impl Store {
    /// One call of a per-segment script for each segment, all with the same
    /// arguments: key prefix, segment root, flusher token, then `tail`;
    /// `KEYS` = every key of the segment ([`SegmentKeys::all`]), or with
    /// `lock_only` just its flush lock (`lock_refresh`).
    fn segment_calls(
        &self,
        script: &super::scripts::LuaScript,
        segments: &[LoadRequest<'_>],
        token: &str,
        tail: &[u64],
        lock_only: bool,
    ) -> Vec<Op> {
        segments
            .iter()
            .map(|s| {
                let keys = self.keys().segment_keys(&s.pt, s.root);
                let mut call = if lock_only {
                    script.call(&[&keys.flush_lock])
                } else {
                    script.call(&keys.all())
                };
                call.arg(self.keys().prefix()).arg(s.root).arg(token);
                for arg in tail {
                    call.arg(*arg);
                }
                Op::new(s.pt.clone(), call)
            })
            .collect()
    }

    /// Per shard: due candidates (score ≤ `now`, at most `per_shard`), the
    /// queue size and its earliest deadline. One round trip for all shards.
    pub async fn queue_snapshots(
        &self,
        shards: &[u32],
        now: f64,
        per_shard: usize,
    ) -> Result<Vec<QueueSnapshot>, StoreError> {
        let mut ops = Vec::with_capacity(shards.len() * 3);
        for &shard in shards {
            let queue = self.keys().queue(shard);
            let mut due = redis::cmd("ZRANGEBYSCORE");
            due.arg(&queue)
                .arg("-inf")
                .arg(format_score(now))
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(per_shard);
            let mut size = redis::cmd("ZCARD");
            size.arg(&queue);
            let mut oldest = redis::cmd("ZRANGE");
            oldest.arg(&queue).arg(0).arg(0).arg("WITHSCORES");
            ops.push(Op::new(queue.clone(), due));
            ops.push(Op::new(queue.clone(), size));
            ops.push(Op::new(queue, oldest));
        }
        let replies = self.exec("read queues", &ops).await?;
        let mut out = Vec::with_capacity(shards.len());
        for (&shard, chunk) in shards.iter().zip(replies.chunks(3)) {
            let [due, size, oldest] = chunk else {
                return Err(bad("read queues", "short reply".into()));
            };
            let due_pairs = pairs(due)?;
            let oldest_deadline = pairs(oldest)?
                .first()
                .map(|(_, score)| parse_f64(score))
                .transpose()?;
            out.push(QueueSnapshot {
                shard,
                queue_key: self.keys().queue(shard),
                size: as_u64(size)
                    .ok_or_else(|| bad("read queues", format!("ZCARD reply {size:?}")))?,
                oldest_deadline,
                due: due_pairs,
            });
        }
        Ok(out)
    }

    /// Locks (unless `lock.ttl_ms` is 0) and snapshots every segment, one
    /// `flush_load` call each, in one round trip.
    pub async fn lock_and_load(
        &self,
        segments: &[LoadRequest<'_>],
        token: &str,
        lock: LockTimes,
    ) -> Result<Vec<Loaded>, StoreError> {
        let ops = self.segment_calls(
            &self.scripts.flush_load,
            segments,
            token,
            &[lock.ttl_ms, lock.hold_ms],
            false,
        );
        let replies = self.exec("lock and load segments", &ops).await?;
        replies.into_iter().map(parse_loaded).collect()
    }

    /// Reads every payload set with `SSCAN … COUNT page_size`: one round trip
    /// per page round, all sets of the cycle together.
    pub async fn load_payload_sets(
        &self,
        sets: &[(String, String)],
        page_size: usize,
    ) -> Result<Vec<PayloadSet>, StoreError> {
        let keys: Vec<String> = sets
            .iter()
            .map(|(pt, salt)| self.keys().payload(pt, salt))
            .collect();
        let mut members: Vec<Vec<Vec<u8>>> = vec![Vec::new(); keys.len()];
        let mut open: Vec<(usize, String)> =
            (0..keys.len()).map(|i| (i, "0".to_string())).collect();
        while !open.is_empty() {
            let ops: Vec<Op> = open
                .iter()
                .map(|(i, cursor)| {
                    let mut scan = redis::cmd("SSCAN");
                    scan.arg(&keys[*i]).arg(cursor).arg("COUNT").arg(page_size);
                    Op::new(keys[*i].clone(), scan)
                })
                .collect();
            let replies = self.exec("load payload sets", &ops).await?;
            let mut next = Vec::new();
            for ((i, _), reply) in open.into_iter().zip(replies) {
                let Value::Array(mut parts) = reply else {
                    return Err(bad("load payload sets", format!("SSCAN reply {reply:?}")));
                };
                if parts.len() != 2 {
                    return Err(bad(
                        "load payload sets",
                        "SSCAN reply without two parts".into(),
                    ));
                }
                let page = parts.pop().unwrap_or(Value::Nil);
                let cursor = as_text(&parts[0])
                    .ok_or_else(|| bad("load payload sets", "SSCAN cursor".into()))?;
                if let Value::Array(items) = page {
                    for item in items {
                        if let Value::BulkString(bytes) = item {
                            members[i].push(bytes);
                        }
                    }
                }
                if cursor != "0" {
                    next.push((i, cursor));
                }
            }
            open = next;
        }
        // An empty SSCAN result means the set does not exist: Redis deletes
        // empty sets, and ingest never writes one.
        Ok(members
            .into_iter()
            .map(|m| if m.is_empty() { None } else { Some(m) })
            .collect())
    }

    /// Extends the locks this flusher still holds (one `lock_refresh` call
    /// each, one round trip); returns how many were still ours.
    pub async fn refresh_locks(
        &self,
        segments: &[LoadRequest<'_>],
        token: &str,
        lock: LockTimes,
    ) -> Result<usize, StoreError> {
        let ops = self.segment_calls(
            &self.scripts.lock_refresh,
            segments,
            token,
            &[lock.hold_ms],
            true,
        );
        let replies = self.exec("refresh flush locks", &ops).await?;
        Ok(replies
            .iter()
            .filter(|v| matches!(v, Value::Int(1)))
            .count())
    }

    /// Releases the locks this flusher holds on `segments` and touches
    /// nothing else (`flush_done` with no salts): used when delivery failed.
    pub async fn release_locks(
        &self,
        segments: &[LoadRequest<'_>],
        token: &str,
    ) -> Result<(), StoreError> {
        // Nothing unloaded, no delivered record, zero salts and span ids:
        // only the lock is released.
        let ops = self.segment_calls(&self.scripts.flush_done, segments, token, &[0, 0, 0], false);
        self.exec("release flush locks", &ops).await?;
        Ok(())
    }

    /// Removes queue entries `(queue key, member, score)` whose score is still
    /// the one given (`queue_remove`, one call per queue, one round trip);
    /// returns how many were removed.
    pub async fn remove_queue_entries(
        &self,
        entries: &[(String, String, String)],
    ) -> Result<u64, StoreError> {
        let mut by_queue: std::collections::BTreeMap<&str, Vec<(&str, &str)>> = Default::default();
        for (queue, member, score) in entries {
            by_queue.entry(queue).or_default().push((member, score));
        }
        let ops: Vec<Op> = by_queue
            .into_iter()
            .map(|(queue, members)| {
                let mut call = self.scripts.queue_remove.call(&[queue]);
                for (member, score) in members {
                    call.arg(member).arg(score);
                }
                Op::new(queue, call)
            })
            .collect();
        let replies = self.exec("remove queue entries", &ops).await?;
        Ok(replies
            .iter()
            .map(|v| match v {
                Value::Int(n) => u64::try_from(*n).unwrap_or(0),
                _ => 0,
            })
            .sum())
    }

    /// Precise cleanup of every segment (`flush_done`, one round trip), then
    /// the unlinking of the payload sets it removed (one UNLINK for all on a
    /// standalone server, one per slot on a cluster) and the conditional queue
    /// removal (one more round trip).
    pub async fn finish_segments(
        &self,
        done: &[DoneRequest<'_>],
        token: &str,
        delivered_ttl_secs: u64,
    ) -> Result<Vec<DoneReply>, StoreError> {
        if done.is_empty() {
            return Ok(Vec::new());
        }
        let ops: Vec<Op> = done
            .iter()
            .map(|d| {
                let keys = self.keys().segment_keys(&d.pt, d.root);
                let mut call = self.scripts.flush_done.call(&keys.all());
                call.arg(self.keys().prefix())
                    .arg(d.root)
                    .arg(token)
                    .arg(d.unloaded)
                    .arg(delivered_ttl_secs)
                    .arg(d.salts.len());
                for salt in &d.salts {
                    call.arg(&salt.salt).arg(salt.spans).arg(salt.bytes);
                }
                call.arg(&d.span_ids[..d.span_ids.len().min(SPAN_IDS_PER_CALL)]);
                Op::new(d.pt.clone(), call)
            })
            .collect();
        let replies: Vec<DoneReply> = self
            .exec("clean up segments", &ops)
            .await?
            .into_iter()
            .map(parse_done)
            .collect::<Result<_, _>>()?;

        let payloads: Vec<String> = done
            .iter()
            .zip(&replies)
            .flat_map(|(d, reply)| {
                reply
                    .removed_salts
                    .iter()
                    .map(|salt| self.keys().payload(&d.pt, salt))
            })
            .collect();
        let mut ops = self.multi_key_ops("UNLINK", payloads);
        // A large segment's further delivered span ids, a page per call:
        // their redirects and the delivered record (`flush_done` with -1).
        for (d, reply) in done.iter().zip(&replies) {
            if reply.removed_salts.is_empty() {
                continue;
            }
            let keys = self.keys().segment_keys(&d.pt, d.root);
            for page in d.span_ids.chunks(SPAN_IDS_PER_CALL).skip(1) {
                let mut call = self.scripts.flush_done.call(&keys.all());
                call.arg(self.keys().prefix())
                    .arg(d.root)
                    .arg(token)
                    .arg(0)
                    .arg(delivered_ttl_secs)
                    .arg(-1)
                    .arg(page);
                ops.push(Op::new(d.pt.clone(), call));
            }
        }
        let mut by_queue: std::collections::BTreeMap<&str, Vec<&DoneRequest<'_>>> =
            Default::default();
        // Only a segment whose keys were deleted leaves its queue: one that
        // still holds data (spans that arrived after the load) keeps its entry,
        // even with the score seen at the start of the cycle (a deadline fixed
        // by the lifetime cap does not move), so the rest is flushed too.
        for (d, reply) in done.iter().zip(&replies) {
            if reply.segment_deleted {
                by_queue.entry(d.shard_queue).or_default().push(d);
            }
        }
        for (queue, entries) in by_queue {
            let mut call = self.scripts.queue_remove.call(&[queue]);
            for d in entries {
                call.arg(d.segment_key).arg(d.score);
            }
            ops.push(Op::new(queue, call));
        }
        self.exec("unlink payloads and dequeue", &ops).await?;
        Ok(replies)
    }
}

fn format_score(score: f64) -> String {
    if score.is_infinite() {
        if score > 0.0 { "+inf" } else { "-inf" }.to_string()
    } else {
        format!("{score:.3}")
    }
}

fn bad(operation: &'static str, detail: String) -> StoreError {
    StoreError::UnexpectedReply { operation, detail }
}

fn as_text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Double(d) => Some(d.to_string()),
        _ => None,
    }
}

fn as_u64(value: &Value) -> Option<u64> {
    match value {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => as_text(other)?.parse().ok(),
    }
}

fn as_i64(value: &Value) -> Option<i64> {
    match value {
        Value::Int(i) => Some(*i),
        other => as_text(other)?.parse().ok(),
    }
}

fn parse_f64(text: &str) -> Result<f64, StoreError> {
    text.parse()
        .map_err(|_| bad("read queues", format!("score {text:?} is not a number")))
}

/// `[member, score, member, score, …]` (RESP2) or `[[member, score], …]` (RESP3).
fn pairs(value: &Value) -> Result<Vec<(String, String)>, StoreError> {
    let Value::Array(items) = value else {
        return Err(bad(
            "read queues",
            format!("expected an array, got {value:?}"),
        ));
    };
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut iter = items.iter();
    while let Some(first) = iter.next() {
        match first {
            Value::Array(pair) if pair.len() == 2 => {
                out.push((text_or(&pair[0])?, text_or(&pair[1])?));
            }
            member => {
                let score = iter
                    .next()
                    .ok_or_else(|| bad("read queues", "member without score".into()))?;
                out.push((text_or(member)?, text_or(score)?));
            }
        }
    }
    Ok(out)
}

fn text_or(value: &Value) -> Result<String, StoreError> {
    as_text(value).ok_or_else(|| bad("read queues", format!("expected text, got {value:?}")))
}

fn parse_loaded(value: Value) -> Result<Loaded, StoreError> {
    const OP: &str = "flush_load";
    let Value::Array(items) = value else {
        return Err(bad(OP, format!("expected an array, got {value:?}")));
    };
    match items.first().and_then(as_i64) {
        Some(0) => return Ok(Loaded::Contended),
        Some(1) if items.len() >= 5 => {}
        _ => return Err(bad(OP, format!("unexpected reply {items:?}"))),
    }
    let count = |v: &Value| as_i64(v).and_then(|n| u64::try_from(n).ok());
    let segment_id = as_text(&items[3]).ok_or_else(|| bad(OP, "segment id is not text".into()))?;
    let delivered =
        as_text(&items[4]).ok_or_else(|| bad(OP, "delivered record is not text".into()))?;
    let salts = items[5..]
        .iter()
        .map(|v| as_text(v).ok_or_else(|| bad(OP, "salt is not text".into())))
        .collect::<Result<_, _>>()?;
    Ok(Loaded::Snapshot {
        ingested_spans: count(&items[1]),
        ingested_bytes: count(&items[2]),
        segment_id,
        delivered,
        salts,
    })
}

fn parse_done(value: Value) -> Result<DoneReply, StoreError> {
    const OP: &str = "flush_done";
    let Value::Array(items) = value else {
        return Err(bad(OP, format!("expected an array, got {value:?}")));
    };
    if items.len() < 2 {
        return Err(bad(OP, format!("short reply {items:?}")));
    }
    let flag = |v: &Value| as_i64(v) == Some(1);
    Ok(DoneReply {
        segment_deleted: flag(&items[0]),
        lock_released: flag(&items[1]),
        removed_salts: items[2..]
            .iter()
            .map(|v| as_text(v).ok_or_else(|| bad(OP, "salt is not text".into())))
            .collect::<Result<_, _>>()?,
    })
}
