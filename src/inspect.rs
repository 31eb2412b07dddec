//! `spanbuf inspect`: what the buffer in Redis looks like right now, for an
//! operator who was paged.
//!
//! Owns the report's data model ([`InspectReport`], stable snake_case JSON
//! via serde), its collection ([`inspect`]) and its table rendering
//! ([`render_table`]). Per shard: the flush queue's depth, its oldest
//! deadline, the flush lag and how many segments are due. Totals: segments
//! queued, payload sets and their members, spans buffered, redirect maps,
//! flush locks held. Per primary: memory and key count.
//!
//! Keys are found with `SCAN … COUNT 1000` on every primary (never `KEYS`),
//! and the scan is bounded: after `max_keys` keys it stops counting and the
//! report says `truncated`. The queues are still all found (the rest of the
//! keyspace is walked with `MATCH <prefix>:q:*` from the same cursor, which
//! returns only queue keys), so the per-shard figures are exact either way;
//! the counts that come from the scan are lower bounds when truncated.
//!
//! Must not write to Redis or talk to it other than through [`Store`]; must
//! not read the wall clock (the caller passes `now`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::config::Config;
use crate::store::{scan_pattern, KeyFamily, Primary, Store, StoreError};

/// Keys asked for per `SCAN` call: bounded work per call on the server.
pub const SCAN_COUNT: usize = 1000;

/// Default of `--max-keys`.
pub const DEFAULT_MAX_KEYS: u64 = 1_000_000;

/// Queues read per round trip.
const QUEUES_PER_TRIP: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// Redis did not answer, or the connection could not be set up.
    #[error("inspect: cannot reach redis")]
    Connect(#[source] StoreError),
    /// Redis answered the connection check but a read failed.
    #[error("inspect: cannot read the buffer from redis")]
    Read(#[source] StoreError),
}

/// Standalone server or Redis Cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    Standalone,
    Cluster,
}

/// Everything `spanbuf inspect` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InspectReport {
    /// The clock the ages and lags are relative to, epoch seconds.
    pub now: f64,
    pub mode: RedisMode,
    /// `SPANBUF_KEY_PREFIX`.
    pub key_prefix: String,
    /// `SPANBUF_SLICE_ID`: when set, only that slice's queues are shown.
    pub slice_id: Option<u32>,
    /// One entry per flush queue, by slice then shard number.
    pub shards: Vec<ShardReport>,
    pub totals: Totals,
    /// One entry per primary, by address.
    pub primaries: Vec<PrimaryReport>,
    /// The key budget of the scan (`--max-keys`).
    pub max_keys: u64,
    /// Keys under the prefix the scan counted (at most `max_keys`).
    pub keys_scanned: u64,
    /// The scan stopped at `max_keys`: the totals taken from the scan
    /// (`payload_sets` to `other_keys`) are lower bounds. Shards and
    /// primaries are complete either way.
    pub truncated: bool,
}

/// One shard's flush queue (`P:q:<shard>` or `P:q:<slice>-<shard>`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShardReport {
    pub slice_id: Option<u32>,
    pub shard: u32,
    pub queue_key: String,
    /// Segments queued (`ZCARD`).
    pub queued_segments: u64,
    /// Segments whose deadline is ≤ now (`ZCOUNT -inf now`).
    pub due_segments: u64,
    /// The earliest deadline, epoch seconds; `None` for an empty queue.
    pub oldest_deadline: Option<f64>,
    /// `now − oldest_deadline`, seconds: negative while it is in the future.
    pub oldest_deadline_age_secs: Option<f64>,
    /// Flush lag: `now − oldest_deadline` when positive, else 0 (as the
    /// flusher reports it in `spanbuf_flush_lag_seconds`).
    pub lag_secs: f64,
}

/// Totals over the whole buffer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Totals {
    /// Sum of the queue depths (exact).
    pub segments_queued: u64,
    /// Sum of the due counts (exact).
    pub segments_due: u64,
    /// The largest shard lag, seconds.
    pub max_lag_secs: f64,
    /// Payload sets `P:s:{pt:salt}:salt` found by the scan.
    pub payload_sets: u64,
    /// Sum of `SCARD` of those payload sets. Not a span count: with
    /// compression on (`SPANBUF_COMPRESSION_LEVEL` ≠ -1) one member is one
    /// zstd blob holding all spans of a subsegment; only at level -1 is a
    /// member one span.
    pub payload_members: u64,
    /// Sum of the `P:ic:<segment key>` counters found by the scan: spans
    /// ingested into segments and not yet removed by a flush's cleanup
    /// (docs/design.md §4, §6). This is the span count of the buffer.
    pub spans_buffered: u64,
    /// Member-keys indexes `P:mk:{pt}:root`: segments that hold data.
    pub segment_indexes: u64,
    /// Redirect maps `P:ssr:{pt}` (one per trace with buffered spans or
    /// leftover redirects).
    pub redirect_maps: u64,
    /// Flush locks held `P:fl:<segment key>`.
    pub flush_locks: u64,
    /// Other keys under the prefix: segment metadata (`hrs`, `ibc`, `fs`,
    /// `cut`) is not counted here; unknown families are, as is a segment key
    /// `P:s:{pt}:root` that exists as a key (spanbuf never writes one).
    pub other_keys: u64,
    /// Sum of `used_memory` over the primaries, bytes.
    pub used_memory_bytes: u64,
    /// Sum of `DBSIZE` over the primaries (all keys, not only spanbuf's).
    pub db_keys: u64,
}

/// One primary's memory and size.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrimaryReport {
    /// `host:port`.
    pub address: String,
    /// `used_memory`, bytes.
    pub used_memory_bytes: u64,
    /// `maxmemory`, bytes; 0 = no limit.
    pub maxmemory_bytes: u64,
    /// `DBSIZE`.
    pub db_keys: u64,
}

/// Connects to the configured Redis and collects the report at clock `now`
/// (epoch seconds), counting at most `max_keys` keys.
pub async fn inspect(
    config: &Config,
    now: f64,
    max_keys: u64,
) -> Result<InspectReport, InspectError> {
    let store = Store::connect(&config.redis, config.buffer.slice_id)
        .await
        .map_err(InspectError::Connect)?;
    let standalone = server_address(&config.redis.url);
    collect(&store, &standalone, config.buffer.slice_id, now, max_keys)
        .await
        .map_err(InspectError::Read)
}

/// What the scan counted.
#[derive(Default)]
struct Tally {
    keys_scanned: u64,
    truncated: bool,
    payload_sets: u64,
    payload_members: u64,
    spans_buffered: u64,
    segment_indexes: u64,
    redirect_maps: u64,
    flush_locks: u64,
    other_keys: u64,
    /// `(slice, shard)` → queue key.
    queues: BTreeMap<(Option<u32>, u32), String>,
}

impl Tally {
    fn queue(&mut self, prefix: &str, key: &str) {
        if let Some(KeyFamily::Queue { slice_id, shard }) = KeyFamily::of(prefix, key) {
            self.queues.insert((slice_id, shard), key.to_string());
        }
    }

    /// Classifies one page of counted keys and reads the sizes it needs.
    async fn count(
        &mut self,
        store: &Store,
        prefix: &str,
        keys: &[String],
    ) -> Result<(), StoreError> {
        let mut payload_sets = Vec::new();
        let mut counters = Vec::new();
        for key in keys {
            self.keys_scanned += 1;
            match KeyFamily::of(prefix, key) {
                Some(KeyFamily::Queue { .. }) => self.queue(prefix, key),
                Some(KeyFamily::PayloadSet) => payload_sets.push(key.clone()),
                Some(KeyFamily::IngestedCount) => counters.push(key.clone()),
                Some(KeyFamily::MemberKeys) => self.segment_indexes += 1,
                Some(KeyFamily::Redirects) => self.redirect_maps += 1,
                Some(KeyFamily::FlushLock) => self.flush_locks += 1,
                Some(KeyFamily::SegmentMeta | KeyFamily::Marker | KeyFamily::Delivered) => {}
                Some(KeyFamily::Other) | None => self.other_keys += 1,
            }
        }
        self.payload_sets += payload_sets.len() as u64;
        self.payload_members += store.set_sizes(&payload_sets).await?.iter().sum::<u64>();
        self.spans_buffered += store
            .counters(&counters)
            .await?
            .iter()
            .flatten()
            .sum::<u64>();
        Ok(())
    }
}

async fn collect(
    store: &Store,
    standalone_address: &str,
    slice_id: Option<u32>,
    now: f64,
    max_keys: u64,
) -> Result<InspectReport, StoreError> {
    let prefix = store.keys().prefix().to_string();
    let primaries = store.primaries().await?;

    let mut primary_reports = Vec::with_capacity(primaries.len());
    for primary in &primaries {
        let stats = store.primary_stats(primary).await?;
        primary_reports.push(PrimaryReport {
            address: primary
                .address()
                .unwrap_or_else(|| standalone_address.to_string()),
            used_memory_bytes: stats.used_memory_bytes,
            maxmemory_bytes: stats.maxmemory_bytes,
            db_keys: stats.db_keys,
        });
    }

    let mut tally = Tally::default();
    for primary in &primaries {
        scan_primary(store, primary, &prefix, max_keys, &mut tally).await?;
    }

    let queues: Vec<((Option<u32>, u32), String)> = tally
        .queues
        .iter()
        .filter(|((slice, _), _)| slice_id.is_none() || *slice == slice_id)
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    let mut shards = Vec::with_capacity(queues.len());
    for chunk in queues.chunks(QUEUES_PER_TRIP) {
        let keys: Vec<String> = chunk.iter().map(|(_, key)| key.clone()).collect();
        let stats = store.queue_stats(&keys, now).await?;
        for (((slice, shard), queue_key), stats) in chunk.iter().zip(stats) {
            let age = stats.oldest_deadline.map(|d| now - d);
            shards.push(ShardReport {
                slice_id: *slice,
                shard: *shard,
                queue_key: queue_key.clone(),
                queued_segments: stats.queued,
                due_segments: stats.due,
                oldest_deadline: stats.oldest_deadline,
                oldest_deadline_age_secs: age,
                lag_secs: age.map_or(0.0, |a| a.max(0.0)),
            });
        }
    }

    let totals = Totals {
        segments_queued: shards.iter().map(|s| s.queued_segments).sum(),
        segments_due: shards.iter().map(|s| s.due_segments).sum(),
        max_lag_secs: shards.iter().map(|s| s.lag_secs).fold(0.0, f64::max),
        payload_sets: tally.payload_sets,
        payload_members: tally.payload_members,
        spans_buffered: tally.spans_buffered,
        segment_indexes: tally.segment_indexes,
        redirect_maps: tally.redirect_maps,
        flush_locks: tally.flush_locks,
        other_keys: tally.other_keys,
        used_memory_bytes: primary_reports.iter().map(|p| p.used_memory_bytes).sum(),
        db_keys: primary_reports.iter().map(|p| p.db_keys).sum(),
    };
    Ok(InspectReport {
        now,
        mode: if store.is_cluster() {
            RedisMode::Cluster
        } else {
            RedisMode::Standalone
        },
        key_prefix: prefix,
        slice_id,
        shards,
        totals,
        primaries: primary_reports,
        max_keys,
        keys_scanned: tally.keys_scanned,
        truncated: tally.truncated,
    })
}

/// Scans one primary: counts keys under the prefix while the budget lasts,
/// then walks the rest of its keyspace for queue keys only.
async fn scan_primary(
    store: &Store,
    primary: &Primary,
    prefix: &str,
    max_keys: u64,
    tally: &mut Tally,
) -> Result<(), StoreError> {
    let every_key = scan_pattern(prefix, "*");
    let queue_keys = scan_pattern(prefix, "q:*");
    let mut cursor = 0;
    loop {
        let room = max_keys.saturating_sub(tally.keys_scanned);
        // Out of budget, keep asking for every key until one is left
        // uncounted (that is what `truncated` means), then for queues only.
        let pattern = if room > 0 || !tally.truncated {
            &every_key
        } else {
            &queue_keys
        };
        let page = store
            .scan_page(primary, cursor, pattern, SCAN_COUNT)
            .await?;
        let take = usize::try_from(room).map_or(page.keys.len(), |r| r.min(page.keys.len()));
        let (counted, beyond) = page.keys.split_at(take);
        if !beyond.is_empty() {
            tally.truncated = true;
        }
        tally.count(store, prefix, counted).await?;
        for key in beyond {
            tally.queue(prefix, key);
        }
        if page.cursor == 0 {
            return Ok(());
        }
        cursor = page.cursor;
    }
}

/// `host:port` (or the socket path) of a Redis URL, without credentials.
fn server_address(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = match rest.find(['/', '?']) {
        // Userinfo ends at the last '@' before the path.
        Some(end) => match rest[..end].rfind('@') {
            Some(at) => &rest[at + 1..],
            None => rest,
        },
        None => rest.rsplit_once('@').map_or(rest, |(_, host)| host),
    };
    if scheme.ends_with("unix") {
        rest.split('?').next().unwrap_or(rest).to_string()
    } else {
        rest.split(['/', '?']).next().unwrap_or(rest).to_string()
    }
}

/// The report as an aligned plain-text table: a heading, the shards, the
/// totals, the primaries.
pub fn render_table(report: &InspectReport) -> String {
    let mut out = String::new();
    let mode = match report.mode {
        RedisMode::Standalone => "standalone redis".to_string(),
        RedisMode::Cluster => format!("redis cluster of {} primaries", report.primaries.len()),
    };
    let slice = report
        .slice_id
        .map(|s| format!(", slice {s}"))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "spanbuf inspect: {mode}, prefix {:?}{slice}, now {:.3}\n",
        report.key_prefix, report.now
    );

    if report.shards.is_empty() {
        let _ = writeln!(out, "no flush queues under {}:q:*", report.key_prefix);
    } else {
        let with_slice = report.shards.iter().any(|s| s.slice_id.is_some());
        let mut header = Vec::new();
        if with_slice {
            header.push("SLICE");
        }
        header.extend([
            "SHARD",
            "QUEUED",
            "DUE",
            "OLDEST DEADLINE",
            "OLDEST AGE",
            "LAG",
        ]);
        let rows = report
            .shards
            .iter()
            .map(|s| {
                let mut row = Vec::new();
                if with_slice {
                    row.push(s.slice_id.map_or_else(|| "-".into(), |id| id.to_string()));
                }
                row.extend([
                    s.shard.to_string(),
                    s.queued_segments.to_string(),
                    s.due_segments.to_string(),
                    s.oldest_deadline
                        .map_or_else(|| "-".into(), |d| format!("{d:.3}")),
                    s.oldest_deadline_age_secs.map_or_else(|| "-".into(), age),
                    format!("{:.3}s", s.lag_secs),
                ]);
                row
            })
            .collect();
        let mut right = vec![true; header.len()];
        let age_column = header.len() - 2;
        right[age_column] = false;
        out.push_str(&table(&header, rows, &right));
    }

    let t = &report.totals;
    // Figures from the scan are lower bounds when it was truncated.
    let scan_note = |note: &str| match (report.truncated, note.is_empty()) {
        (false, true) => String::new(),
        (false, false) => format!("({note})"),
        (true, true) => "(lower bound: scan truncated)".to_string(),
        (true, false) => format!("(lower bound: scan truncated; {note})"),
    };
    let lines: Vec<(&str, String, String)> = vec![
        (
            "segments queued",
            t.segments_queued.to_string(),
            String::new(),
        ),
        ("segments due", t.segments_due.to_string(), String::new()),
        ("max lag", format!("{:.3}s", t.max_lag_secs), String::new()),
        ("payload sets", t.payload_sets.to_string(), scan_note("")),
        (
            "payload set members",
            t.payload_members.to_string(),
            scan_note("a zstd member holds a whole subsegment, not one span"),
        ),
        (
            "spans buffered",
            t.spans_buffered.to_string(),
            scan_note("sum of the ic counters"),
        ),
        (
            "segment indexes",
            t.segment_indexes.to_string(),
            scan_note(""),
        ),
        ("redirect maps", t.redirect_maps.to_string(), scan_note("")),
        ("flush locks held", t.flush_locks.to_string(), scan_note("")),
        ("other keys", t.other_keys.to_string(), scan_note("")),
        (
            "keys scanned",
            report.keys_scanned.to_string(),
            if report.truncated {
                format!("(truncated at --max-keys {})", report.max_keys)
            } else {
                String::new()
            },
        ),
        (
            "used memory",
            human_bytes(t.used_memory_bytes),
            "(all primaries)".to_string(),
        ),
        (
            "keys in db",
            t.db_keys.to_string(),
            "(DBSIZE, all primaries)".to_string(),
        ),
    ];
    let _ = writeln!(out, "\nTOTALS");
    let rows = lines
        .into_iter()
        .map(|(label, value, note)| vec![label.to_string(), value, note])
        .collect();
    out.push_str(&table(&[], rows, &[false, true, false]));
    if report.truncated {
        let _ = writeln!(
            out,
            "TRUNCATED: the scan stopped counting at --max-keys {}; counts from the scan are \
             lower bounds (shard queues are complete)",
            report.max_keys
        );
    }

    let _ = writeln!(out);
    let header = ["PRIMARY", "USED MEMORY", "MAXMEMORY", "USED %", "KEYS"];
    let rows = report
        .primaries
        .iter()
        .map(|p| {
            vec![
                p.address.clone(),
                bytes(p.used_memory_bytes),
                if p.maxmemory_bytes == 0 {
                    "no limit".into()
                } else {
                    bytes(p.maxmemory_bytes)
                },
                if p.maxmemory_bytes == 0 {
                    "-".into()
                } else {
                    format!(
                        "{:.1}%",
                        p.used_memory_bytes as f64 * 100.0 / p.maxmemory_bytes as f64
                    )
                },
                p.db_keys.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(&header, rows, &[false, true, true, true, true]));
    out
}

/// `12.500s ago` or `in 3.000s`.
fn age(secs: f64) -> String {
    if secs >= 0.0 {
        format!("{secs:.3}s ago")
    } else {
        format!("in {:.3}s", -secs)
    }
}

/// `1234567 B (1.2 MiB)`.
fn bytes(n: u64) -> String {
    if n < 1024 {
        format!("{n} B")
    } else {
        format!("{n} B ({})", human_bytes(n))
    }
}

/// `1.2 MiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = u;
    }
    if unit == "B" {
        format!("{n} B")
    } else {
        format!("{value:.1} {unit}")
    }
}

/// Columns padded to their widest cell, two spaces apart; `right[i]` aligns
/// column `i` to the right. No header line when `header` is empty. Trailing
/// spaces are trimmed.
fn table(header: &[&str], rows: Vec<Vec<String>>, right: &[bool]) -> String {
    let mut all: Vec<Vec<String>> = Vec::with_capacity(rows.len() + 1);
    if !header.is_empty() {
        all.push(header.iter().map(|h| h.to_string()).collect());
    }
    all.extend(rows);
    let columns = all.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            all.iter()
                .filter_map(|row| row.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &all {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            let width = widths[c];
            if right.get(c).copied().unwrap_or(false) {
                let _ = write!(line, "{cell:>width$}");
            } else {
                let _ = write!(line, "{cell:<width$}");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(shard: u32, queued: u64, due: u64, oldest: Option<f64>, now: f64) -> ShardReport {
        let age = oldest.map(|d| now - d);
        ShardReport {
            slice_id: None,
            shard,
            queue_key: format!("span-buf:q:{shard}"),
            queued_segments: queued,
            due_segments: due,
            oldest_deadline: oldest,
            oldest_deadline_age_secs: age,
            lag_secs: age.map_or(0.0, |a| a.max(0.0)),
        }
    }

    fn report(truncated: bool) -> InspectReport {
        let now = 1_700_000_030.0;
        InspectReport {
            now,
            mode: RedisMode::Standalone,
            key_prefix: "span-buf".into(),
            slice_id: None,
            shards: vec![
                shard(0, 2, 1, Some(1_700_000_010.0), now),
                shard(1, 1, 0, Some(1_700_000_060.0), now),
                shard(12, 1500, 1500, Some(1_699_999_910.0), now),
                shard(13, 0, 0, None, now),
            ],
            totals: Totals {
                segments_queued: 1503,
                segments_due: 1501,
                max_lag_secs: 120.0,
                payload_sets: 9,
                payload_members: 9,
                spans_buffered: 42,
                segment_indexes: 5,
                redirect_maps: 4,
                flush_locks: 1,
                other_keys: 0,
                used_memory_bytes: 1_153_434,
                db_keys: 40,
            },
            primaries: vec![PrimaryReport {
                address: "127.0.0.1:6379".into(),
                used_memory_bytes: 1_153_434,
                maxmemory_bytes: 0,
                db_keys: 40,
            }],
            max_keys: 1_000_000,
            keys_scanned: 40,
            truncated,
        }
    }

    #[test]
    fn table_has_aligned_shard_rows_in_order() {
        let text = render_table(&report(false));
        let lines: Vec<&str> = text.lines().collect();
        let header = lines
            .iter()
            .position(|l| l.starts_with("SHARD"))
            .expect("a shard header");
        assert_eq!(
            &lines[header..header + 5],
            &[
                "SHARD  QUEUED   DUE  OLDEST DEADLINE  OLDEST AGE         LAG",
                "    0       2     1   1700000010.000  20.000s ago    20.000s",
                "    1       1     0   1700000060.000  in 30.000s      0.000s",
                "   12    1500  1500   1699999910.000  120.000s ago  120.000s",
                "   13       0     0                -  -               0.000s",
            ]
        );
        for line in [
            "spans buffered             42  (sum of the ic counters)",
            "flush locks held            1",
            "used memory           1.1 MiB  (all primaries)",
            "PRIMARY                 USED MEMORY  MAXMEMORY  USED %  KEYS",
            "127.0.0.1:6379  1153434 B (1.1 MiB)   no limit       -    40",
        ] {
            assert!(text.contains(&format!("\n{line}\n")), "{line:?} in\n{text}");
        }
        assert!(!text.contains("TRUNCATED"), "{text}");
    }

    #[test]
    fn truncation_is_stated() {
        let text = render_table(&report(true));
        assert!(
            text.contains("TRUNCATED: the scan stopped counting at --max-keys 1000000"),
            "{text}"
        );
        for line in [
            "keys scanned               40  (truncated at --max-keys 1000000)",
            "payload sets                9  (lower bound: scan truncated)",
            "spans buffered             42  (lower bound: scan truncated; sum of the ic counters)",
            "segments queued          1503",
        ] {
            assert!(text.contains(&format!("\n{line}\n")), "{line:?} in\n{text}");
        }
    }

    #[test]
    fn slices_get_a_column_and_no_queues_say_so() {
        let mut r = report(false);
        r.shards[0].slice_id = Some(3);
        let text = render_table(&r);
        assert!(text.contains("SLICE  SHARD  QUEUED"), "{text}");
        assert!(text.contains("\n    3      0       2"), "{text}");
        r.shards.clear();
        assert!(render_table(&r).contains("no flush queues under span-buf:q:*"));
    }

    #[test]
    fn json_field_names_are_stable() {
        let json = serde_json::to_value(report(true)).expect("serialises");
        assert_eq!(json["truncated"], true);
        assert_eq!(json["mode"], "standalone");
        assert_eq!(json["shards"][0]["queued_segments"], 2);
        assert_eq!(json["shards"][0]["lag_secs"], 20.0);
        assert_eq!(
            json["shards"][3]["oldest_deadline"],
            serde_json::Value::Null
        );
        assert_eq!(json["totals"]["spans_buffered"], 42);
        assert_eq!(json["primaries"][0]["maxmemory_bytes"], 0);
    }

    #[test]
    fn server_address_drops_credentials_and_path() {
        for (url, want) in [
            ("redis://127.0.0.1:6379", "127.0.0.1:6379"),
            (
                "redis://user:p@ss@redis.internal:6380/0",
                "redis.internal:6380",
            ),
            ("rediss://:secret@host:6390/?protocol=resp3", "host:6390"),
            ("redis://host", "host"),
            ("unix:///tmp/redis.sock", "/tmp/redis.sock"),
            ("redis+unix:///run/redis.sock?db=2", "/run/redis.sock"),
        ] {
            assert_eq!(server_address(url), want, "{url}");
        }
    }

    #[test]
    fn bytes_are_readable() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(2048), "2048 B (2.0 KiB)");
        assert_eq!(bytes(3 << 30), "3221225472 B (3.0 GiB)");
    }
}
