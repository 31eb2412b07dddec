//! Store operations of `spanbuf inspect`: read-only views of the buffer for
//! an operator who was paged.
//!
//! Owns the Redis side of inspection: which primaries there are, one `SCAN`
//! page on one primary (a cluster's keyspace is split over its primaries and a
//! `SCAN` cursor belongs to one node), batched per-key reads (queue figures,
//! set sizes, counters), memory and key counts per primary, and the reverse of
//! the key layout (which family a scanned key belongs to, which shard a queue
//! serves) next to the code that finds those keys.
//!
//! Must not write to Redis, and must never send `KEYS`: every scan is paged
//! with `SCAN … COUNT`, so each call is bounded work on the server. How far to
//! scan is the caller's decision.

use redis::cluster_routing::{
    MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo, SingleNodeRoutingInfo,
};
use redis::{Cmd, Value};

use super::{info_field, Backend, Op, Store, StoreError};

/// One primary Redis node, as the inspector addresses it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Primary {
    /// `(host, port)` as the cluster names the node; `None` for the one
    /// server of standalone mode.
    node: Option<(String, u16)>,
}

impl Primary {
    /// `host:port` of a cluster primary; `None` in standalone mode (the
    /// caller knows the URL it configured).
    pub fn address(&self) -> Option<String> {
        self.node
            .as_ref()
            .map(|(host, port)| format!("{host}:{port}"))
    }
}

/// Memory and key count of one primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryStats {
    /// `used_memory` of `INFO memory`, bytes.
    pub used_memory_bytes: u64,
    /// `maxmemory` of `INFO memory`, bytes; 0 = no limit.
    pub maxmemory_bytes: u64,
    /// `DBSIZE`: every key of the selected database, not only spanbuf's.
    pub db_keys: u64,
}

/// One page of a `SCAN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanPage {
    /// The cursor for the next call; 0 when the scan of this primary is done.
    pub cursor: u64,
    pub keys: Vec<String>,
}

/// One flush queue's figures at a given clock.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueStats {
    /// `ZCARD`: segments queued.
    pub queued: u64,
    /// `ZCOUNT -inf now`: segments due.
    pub due: u64,
    /// The lowest score (`ZRANGE 0 0 WITHSCORES`): the oldest deadline,
    /// epoch seconds; `None` for an empty (absent) queue.
    pub oldest_deadline: Option<f64>,
}

/// The family of a key under the prefix, after docs/design.md §4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFamily {
    /// `P:q:<shard>` or `P:q:<slice>-<shard>`.
    Queue { slice_id: Option<u32>, shard: u32 },
    /// `P:s:{pt:salt}:salt`.
    PayloadSet,
    /// `P:mk:{pt}:root`.
    MemberKeys,
    /// `P:ssr:{pt}`.
    Redirects,
    /// `P:fl:<segment key>`.
    FlushLock,
    /// `P:ic:<segment key>`.
    IngestedCount,
    /// `P:hrs:`, `P:ibc:`, `P:fs:`, `P:cut:` of a segment.
    SegmentMeta,
    /// `P:marker`, the data-loss marker the workers keep.
    Marker,
    /// `P:dl:{pt}`, a trace's record of delivered span ids.
    Delivered,
    /// Anything else under the prefix, including a segment key
    /// `P:s:{pt}:root` existing as a key (spanbuf never writes one: segment
    /// keys only name queue members and suffix the metadata keys).
    Other,
}

impl KeyFamily {
    /// Classifies `key`; `None` when it is not under `prefix` at all.
    pub fn of(prefix: &str, key: &str) -> Option<KeyFamily> {
        let rest = key.strip_prefix(prefix)?.strip_prefix(':')?;
        let (family, tail) = rest.split_once(':').unwrap_or((rest, ""));
        Some(match family {
            "q" => match parse_queue_suffix(tail) {
                Some((slice_id, shard)) => KeyFamily::Queue { slice_id, shard },
                None => KeyFamily::Other,
            },
            "s" if is_payload_set(tail) => KeyFamily::PayloadSet,
            "mk" => KeyFamily::MemberKeys,
            "ssr" => KeyFamily::Redirects,
            "fl" => KeyFamily::FlushLock,
            "ic" => KeyFamily::IngestedCount,
            "hrs" | "ibc" | "fs" | "cut" => KeyFamily::SegmentMeta,
            "marker" if tail.is_empty() => KeyFamily::Marker,
            "dl" => KeyFamily::Delivered,
            _ => KeyFamily::Other,
        })
    }
}

/// `<shard>` or `<slice>-<shard>` (the part after `P:q:`), as
/// [`Keys::queue`](super::Keys::queue) builds it.
fn parse_queue_suffix(tail: &str) -> Option<(Option<u32>, u32)> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match tail.split_once('-') {
        Some((slice, shard)) if digits(slice) && digits(shard) => {
            Some((Some(slice.parse().ok()?), shard.parse().ok()?))
        }
        None if digits(tail) => Some((None, tail.parse().ok()?)),
        _ => None,
    }
}

/// `{pt:salt}:salt` (the part after `P:s:`), with `pt` = `project:trace`. A
/// segment key `{pt}:root` has one colon inside the tag and is not one.
fn is_payload_set(tail: &str) -> bool {
    let Some((tag, salt)) = tail
        .strip_prefix('{')
        .and_then(|rest| rest.split_once("}:"))
    else {
        return false;
    };
    let mut parts = tag.split(':');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(project), Some(trace), Some(tag_salt), None)
            if !project.is_empty() && !trace.is_empty() && !salt.is_empty() && tag_salt == salt
    )
}

/// A `SCAN MATCH` pattern for `<prefix>:<rest>`: the prefix is taken
/// literally (glob characters escaped), `rest` is a glob.
pub fn scan_pattern(prefix: &str, rest: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + rest.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push(':');
    out.push_str(rest);
    out
}

impl Store {
    /// Every primary: the one server in standalone mode; in cluster mode the
    /// primaries the cluster connection knows (it asks each one for its
    /// `DBSIZE`, which also checks they answer). Sorted by address.
    pub async fn primaries(&self) -> Result<Vec<Primary>, StoreError> {
        const OP: &str = "list primaries";
        let Backend::Cluster(pool) = &self.backend else {
            return Ok(vec![Primary { node: None }]);
        };
        let fut = async {
            let mut conn = pool.get().await.map_err(super::pool_error)?;
            conn.route_command(
                redis::cmd("DBSIZE"),
                RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    // Special: one reply per node, keyed by its address.
                    Some(ResponsePolicy::Special),
                )),
            )
            .await
            .map_err(|source| StoreError::Redis {
                operation: OP,
                source,
            })
        };
        let reply = self.with_timeout(OP, fut).await?;
        let Value::Map(nodes) = reply else {
            return Err(bad(OP, format!("expected a map by node, got {reply:?}")));
        };
        let mut primaries = nodes
            .into_iter()
            .map(|(address, _)| {
                let address = text(&address).ok_or_else(|| bad(OP, "node address".into()))?;
                let (host, port) = address
                    .rsplit_once(':')
                    .and_then(|(host, port)| Some((host.to_string(), port.parse().ok()?)))
                    .ok_or_else(|| bad(OP, format!("node address {address:?}")))?;
                Ok(Primary {
                    node: Some((host, port)),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        primaries.sort();
        Ok(primaries)
    }

    /// `INFO memory` and `DBSIZE` of one primary.
    pub async fn primary_stats(&self, primary: &Primary) -> Result<PrimaryStats, StoreError> {
        let mut info = redis::cmd("INFO");
        info.arg("memory");
        let info = self.on_primary(primary, "info memory", info).await?;
        let info = text(&info).ok_or_else(|| bad("info memory", format!("INFO reply {info:?}")))?;
        let size = self
            .on_primary(primary, "dbsize", redis::cmd("DBSIZE"))
            .await?;
        Ok(PrimaryStats {
            used_memory_bytes: info_field(&info, "used_memory"),
            maxmemory_bytes: info_field(&info, "maxmemory"),
            db_keys: as_u64(&size).ok_or_else(|| bad("dbsize", format!("reply {size:?}")))?,
        })
    }

    /// Deletes every trace's delivered record (`P:dl:*`, a `SCAN` per
    /// primary); how many. For `spanbuf bench`, which feeds the same workload
    /// run after run: each run must deliver it, not count it as delivered.
    pub async fn forget_delivered(&self) -> Result<u64, StoreError> {
        let pattern = scan_pattern(self.keys().prefix(), "dl:*");
        let mut removed = 0;
        for primary in self.primaries().await? {
            let mut cursor = 0;
            loop {
                let page = self.scan_page(&primary, cursor, &pattern, 1000).await?;
                if !page.keys.is_empty() {
                    removed += page.keys.len() as u64;
                    self.unlink("forget delivered records", page.keys).await?;
                }
                cursor = page.cursor;
                if cursor == 0 {
                    break;
                }
            }
        }
        Ok(removed)
    }

    /// One `SCAN cursor MATCH pattern COUNT count` on one primary.
    pub async fn scan_page(
        &self,
        primary: &Primary,
        cursor: u64,
        pattern: &str,
        count: usize,
    ) -> Result<ScanPage, StoreError> {
        const OP: &str = "scan";
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count);
        let reply = self.on_primary(primary, OP, scan).await?;
        let Value::Array(mut parts) = reply else {
            return Err(bad(OP, format!("SCAN reply {reply:?}")));
        };
        let (Some(Value::Array(items)), Some(next), None) = (parts.pop(), parts.pop(), parts.pop())
        else {
            return Err(bad(OP, "SCAN reply without cursor and keys".into()));
        };
        let cursor = as_u64(&next).ok_or_else(|| bad(OP, format!("SCAN cursor {next:?}")))?;
        let keys = items
            .iter()
            .map(|k| text(k).ok_or_else(|| bad(OP, format!("key {k:?} is not text"))))
            .collect::<Result<_, _>>()?;
        Ok(ScanPage { cursor, keys })
    }

    /// Depth, due count (score ≤ `now`) and oldest deadline of each queue,
    /// in order. One round trip.
    pub async fn queue_stats(
        &self,
        queue_keys: &[String],
        now: f64,
    ) -> Result<Vec<QueueStats>, StoreError> {
        const OP: &str = "read queue stats";
        let mut ops = Vec::with_capacity(queue_keys.len() * 3);
        for queue in queue_keys {
            let mut size = redis::cmd("ZCARD");
            size.arg(queue);
            let mut due = redis::cmd("ZCOUNT");
            due.arg(queue).arg("-inf").arg(format!("{now:.3}"));
            let mut oldest = redis::cmd("ZRANGE");
            oldest.arg(queue).arg(0).arg(0).arg("WITHSCORES");
            ops.push(Op::new(queue.clone(), size));
            ops.push(Op::new(queue.clone(), due));
            ops.push(Op::new(queue.clone(), oldest));
        }
        let replies = self.exec(OP, &ops).await?;
        replies
            .chunks(3)
            .map(|chunk| {
                let [size, due, oldest] = chunk else {
                    return Err(bad(OP, "short reply".into()));
                };
                let count =
                    |v: &Value| as_u64(v).ok_or_else(|| bad(OP, format!("count reply {v:?}")));
                let oldest: Vec<(String, f64)> = redis::from_redis_value_ref(oldest)
                    .map_err(|e| bad(OP, format!("ZRANGE WITHSCORES reply: {e}")))?;
                Ok(QueueStats {
                    queued: count(size)?,
                    due: count(due)?,
                    oldest_deadline: oldest.first().map(|(_, score)| *score),
                })
            })
            .collect()
    }

    /// `SCARD` of each key, in order (0 for a key that is gone). One stage.
    pub async fn set_sizes(&self, keys: &[String]) -> Result<Vec<u64>, StoreError> {
        const OP: &str = "read set sizes";
        let ops: Vec<Op> = keys
            .iter()
            .map(|key| {
                let mut scard = redis::cmd("SCARD");
                scard.arg(key);
                Op::new(key.clone(), scard)
            })
            .collect();
        self.exec(OP, &ops)
            .await?
            .iter()
            .map(|v| as_u64(v).ok_or_else(|| bad(OP, format!("SCARD reply {v:?}"))))
            .collect()
    }

    /// The integer value of each string key, in order; `None` for a key that
    /// is gone or does not hold a non-negative integer. One stage.
    pub async fn counters(&self, keys: &[String]) -> Result<Vec<Option<u64>>, StoreError> {
        let ops: Vec<Op> = keys
            .iter()
            .map(|key| {
                let mut get = redis::cmd("GET");
                get.arg(key);
                Op::new(key.clone(), get)
            })
            .collect();
        Ok(self
            .exec("read counters", &ops)
            .await?
            .iter()
            .map(as_u64)
            .collect())
    }

    /// Runs one command on one primary (never redirected), under the timeout.
    async fn on_primary(
        &self,
        primary: &Primary,
        operation: &'static str,
        cmd: Cmd,
    ) -> Result<Value, StoreError> {
        let fut = async {
            match (&self.backend, &primary.node) {
                (Backend::Standalone(pool), _) => {
                    let mut conn = pool.get().await.map_err(super::pool_error)?;
                    cmd.query_async::<Value>(&mut conn).await
                }
                (Backend::Cluster(pool), Some((host, port))) => {
                    let mut conn = pool.get().await.map_err(super::pool_error)?;
                    let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: host.clone(),
                        port: *port,
                    });
                    conn.route_command(cmd, routing).await
                }
                (Backend::Cluster(_), None) => {
                    return Err(bad(
                        operation,
                        "a cluster primary without an address".into(),
                    ))
                }
            }
            .map_err(|source| StoreError::Redis { operation, source })
        };
        self.with_timeout(operation, fut).await
    }
}

fn bad(operation: &'static str, detail: String) -> StoreError {
    StoreError::UnexpectedReply { operation, detail }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn as_u64(value: &Value) -> Option<u64> {
    match value {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => text(other)?.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Keys;

    const TRACE: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn every_family_keys_builds_is_recognised() {
        let keys = Keys::new("span-buf", None);
        let pt = Keys::pt(7, TRACE);
        let salt = "0123456789abcdef0123456789abcdef";
        let seg = keys.segment(&pt, "00000000000000aa");
        let of = |key: &str| KeyFamily::of("span-buf", key);
        assert_eq!(of(&keys.payload(&pt, salt)), Some(KeyFamily::PayloadSet));
        assert_eq!(of(&keys.member_keys(&pt, "r")), Some(KeyFamily::MemberKeys));
        assert_eq!(of(&keys.redirects(&pt)), Some(KeyFamily::Redirects));
        assert_eq!(of(&keys.flush_lock(&seg)), Some(KeyFamily::FlushLock));
        assert_eq!(of(&keys.marker()), Some(KeyFamily::Marker));
        assert_eq!(
            of(&keys.ingested_count(&seg)),
            Some(KeyFamily::IngestedCount)
        );
        for meta in [
            keys.has_root(&seg),
            keys.ingested_bytes(&seg),
            keys.first_seen(&seg),
            keys.cut_from(&seg),
        ] {
            assert_eq!(of(&meta), Some(KeyFamily::SegmentMeta), "{meta}");
        }
        assert_eq!(
            of(&keys.queue(12)),
            Some(KeyFamily::Queue {
                slice_id: None,
                shard: 12
            })
        );
        assert_eq!(
            of(&Keys::new("span-buf", Some(3)).queue(4)),
            Some(KeyFamily::Queue {
                slice_id: Some(3),
                shard: 4
            })
        );
    }

    #[test]
    fn segment_keys_and_strangers_are_not_payload_sets_or_queues() {
        let keys = Keys::new("span-buf", None);
        let seg = keys.segment(&Keys::pt(7, TRACE), "00000000000000aa");
        let of = |key: &str| KeyFamily::of("span-buf", key);
        assert_eq!(of(&seg), Some(KeyFamily::Other));
        assert_eq!(of("span-buf:s:{7:t:a}:b"), Some(KeyFamily::Other));
        assert_eq!(of("span-buf:s:{7:t:a:b}:b"), Some(KeyFamily::Other));
        assert_eq!(of("span-buf:q:"), Some(KeyFamily::Other));
        assert_eq!(of("span-buf:q:x"), Some(KeyFamily::Other));
        assert_eq!(of("span-buf:q:1-"), Some(KeyFamily::Other));
        assert_eq!(of("span-buf:q:-1"), Some(KeyFamily::Other));
        assert_eq!(of("span-buf:q:1-2-3"), Some(KeyFamily::Other));
        assert_eq!(of("span-buf:q:99999999999"), Some(KeyFamily::Other));
        assert_eq!(of("span-buf:zz"), Some(KeyFamily::Other));
        assert_eq!(of("span-buffer:q:1"), None);
        assert_eq!(of("other:q:1"), None);
    }

    #[test]
    fn scan_patterns_take_the_prefix_literally() {
        assert_eq!(scan_pattern("span-buf", "*"), "span-buf:*");
        assert_eq!(scan_pattern("span-buf", "q:*"), "span-buf:q:*");
        assert_eq!(scan_pattern(r"a*b?[c]\d", "*"), r"a\*b\?\[c\]\\d:*");
    }
}
