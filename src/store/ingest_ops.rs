//! Store operations of the ingest path (docs/design.md §5 steps 3–5): payload sets,
//! the `add_buffer` insert script, and the queue update.
//!
//! Translates ingest requests into pipelined commands and parses the replies.
//! Must not decide anything about grouping or deadlines beyond what the Lua
//! script returns.

use redis::Value;

use super::{Keys, Op, Store, StoreError};

/// Queue members per ZADD / ZREM: a page takes Redis well under a millisecond.
const QUEUE_PAGE: usize = 250;

/// Parameters shared by every insert of one batch.
#[derive(Debug, Clone)]
pub struct InsertParams {
    pub ttl_secs: u64,
    pub max_segment_bytes: u64,
    /// Detach a subsegment whose segment is being flushed (locks enabled).
    pub check_lock: bool,
    /// The batch clock, epoch seconds.
    pub now: f64,
    pub timeout_secs: u64,
    pub root_timeout_secs: u64,
    /// 0 = no cap.
    pub max_lifetime_secs: u64,
    /// Spans one trace may buffer (its redirect map's entries); 0 = no cap.
    pub max_trace_spans: u64,
}

/// One subsegment to write: its payload members and the insert call's input.
#[derive(Debug, Clone)]
pub struct SubsegmentWrite<'a> {
    /// `project_id:trace_id`.
    pub pt: String,
    pub salt: String,
    /// The subsegment's top-most known parent span id.
    pub parent: &'a str,
    pub has_segment_span: bool,
    /// Raw payload bytes of the subsegment.
    pub byte_count: u64,
    /// Members of the payload set (one zstd blob, or raw payloads).
    pub members: Vec<Vec<u8>>,
    pub span_ids: Vec<&'a str>,
}

/// Why a subsegment became a segment of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detach {
    None,
    TooLarge,
    Locked,
}

/// What the insert script decided for one subsegment.
#[derive(Debug, Clone, PartialEq)]
pub struct InsertReply {
    /// `P:s:{pt}:root` (or `:salt` when detached): the queue member.
    pub segment_key: String,
    pub has_root: bool,
    /// Flush deadline, epoch seconds (lifetime cap applied).
    pub deadline: f64,
    pub detach: Detach,
    /// The salt was already indexed: a redelivered subsegment, not counted.
    pub redelivered: bool,
    /// Refused: the trace would buffer more than `max_trace_spans`. Nothing
    /// was indexed; the payload set is the caller's to unlink.
    pub refused: bool,
    /// Span ids whose earlier segments were merged into this one.
    pub merged: Vec<String>,
}

/// Queue changes of one shard.
#[derive(Debug, Clone, Default)]
pub struct QueueUpdate {
    pub shard: u32,
    /// `(segment key, deadline)`.
    pub add: Vec<(String, f64)>,
    /// Segment keys merged away.
    pub remove: Vec<String>,
}

impl Store {
    /// Stage 1: `SADD` + `EXPIRE` of every payload set; stage 2: one
    /// `add_buffer` call per subsegment. Payloads land before any index
    /// references them, so a flusher never sees a salt without its data.
    pub async fn insert_subsegments(
        &self,
        writes: &[SubsegmentWrite<'_>],
        params: &InsertParams,
    ) -> Result<Vec<InsertReply>, StoreError> {
        let keys = self.keys();
        let mut payload_ops = Vec::with_capacity(writes.len() * 2);
        let mut insert_ops = Vec::with_capacity(writes.len());
        for write in writes {
            let payload_key = keys.payload(&write.pt, &write.salt);
            let mut sadd = redis::cmd("SADD");
            sadd.arg(&payload_key).arg(&write.members);
            let mut expire = redis::cmd("EXPIRE");
            expire.arg(&payload_key).arg(params.ttl_secs);
            payload_ops.push(Op::new(payload_key.clone(), sadd));
            payload_ops.push(Op::new(payload_key, expire));

            let mut call = self
                .scripts
                .add_buffer
                .call(&[&keys.redirects(&write.pt), &keys.guard(&write.pt)]);
            call.arg(keys.prefix())
                .arg(write.parent)
                .arg(if write.has_segment_span { "1" } else { "0" })
                .arg(params.ttl_secs)
                .arg(write.byte_count)
                .arg(params.max_segment_bytes)
                .arg(&write.salt)
                .arg(if params.check_lock { "1" } else { "0" })
                .arg(format!("{:.3}", params.now))
                .arg(params.timeout_secs)
                .arg(params.root_timeout_secs)
                .arg(params.max_lifetime_secs)
                .arg(params.max_trace_spans)
                .arg(&write.span_ids);
            insert_ops.push(Op::new(write.pt.clone(), call));
        }
        let mut stages = self
            .exec_stages("insert subsegments", vec![payload_ops, insert_ops])
            .await?;
        let replies = stages.pop().unwrap_or_default();
        replies.into_iter().map(parse_insert_reply).collect()
    }

    /// `ZADD` the segments with their deadlines, `EXPIRE` the queue, `ZREM`
    /// the segments merged away. One round trip for all shards.
    pub async fn update_queues(
        &self,
        updates: &[QueueUpdate],
        ttl_secs: u64,
    ) -> Result<(), StoreError> {
        let keys: &Keys = self.keys();
        let mut ops = Vec::new();
        for update in updates {
            let queue = keys.queue(update.shard);
            if !update.add.is_empty() {
                // In pages: one ZADD of a whole window's segments held Redis
                // for milliseconds (p99 2.8 ms for ~1,500 members).
                for page in update.add.chunks(QUEUE_PAGE) {
                    let mut zadd = redis::cmd("ZADD");
                    zadd.arg(&queue);
                    for (member, deadline) in page {
                        zadd.arg(format!("{deadline:.3}")).arg(member);
                    }
                    ops.push(Op::new(queue.clone(), zadd));
                }
                // Like the span counters, the queue outlives the data by a
                // TTL: a flusher back from a stall longer than the TTL still
                // finds the segments and counts what expired.
                let mut expire = redis::cmd("EXPIRE");
                expire.arg(&queue).arg(ttl_secs.saturating_mul(2));
                ops.push(Op::new(queue.clone(), expire));
            }
            for page in update.remove.chunks(QUEUE_PAGE) {
                let mut zrem = redis::cmd("ZREM");
                zrem.arg(&queue).arg(page);
                ops.push(Op::new(queue.clone(), zrem));
            }
        }
        self.exec_stages("update queues", vec![ops]).await?;
        Ok(())
    }
}

fn bad_reply(detail: String) -> StoreError {
    StoreError::UnexpectedReply {
        operation: "add_buffer",
        detail,
    }
}

fn as_text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn as_int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(i) => Some(*i),
        other => as_text(other)?.parse().ok(),
    }
}

fn parse_insert_reply(value: Value) -> Result<InsertReply, StoreError> {
    let Value::Array(items) = value else {
        return Err(bad_reply(format!("expected an array, got {value:?}")));
    };
    if items.len() < 5 {
        return Err(bad_reply(format!(
            "expected at least 5 items, got {}",
            items.len()
        )));
    }
    let segment_key =
        as_text(&items[0]).ok_or_else(|| bad_reply("segment key is not text".into()))?;
    let has_root =
        as_int(&items[1]).ok_or_else(|| bad_reply("has_root is not an integer".into()))? == 1;
    let deadline: f64 = as_text(&items[2])
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad_reply(format!("deadline is not a number: {:?}", items[2])))?;
    let (detach, refused) = match as_int(&items[3]) {
        Some(0) => (Detach::None, false),
        Some(1) => (Detach::TooLarge, false),
        Some(2) => (Detach::Locked, false),
        Some(3) => (Detach::None, true),
        other => return Err(bad_reply(format!("unknown detach reason {other:?}"))),
    };
    let redelivered =
        as_int(&items[4]).ok_or_else(|| bad_reply("redelivered is not an integer".into()))? == 1;
    let merged = items[5..]
        .iter()
        .map(|v| as_text(v).ok_or_else(|| bad_reply("merged id is not text".into())))
        .collect::<Result<_, _>>()?;
    Ok(InsertReply {
        segment_key,
        has_root,
        deadline,
        detach,
        redelivered,
        refused,
        merged,
    })
}
