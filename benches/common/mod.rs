//! Inputs shared by the criterion benches (`span_codec`, `grouping`):
//! deterministic ids and `ingest-spans` JSON spans of a chosen size.
//!
//! Spans differ from one another in ids, descriptions, timings and attribute
//! values, so parsers, hashes and zstd see real-looking data rather than one
//! span repeated. This module only builds inputs: it must not time anything.

use serde_json::{json, Map, Value};

/// `SPANBUF_MAX_SPAN_BYTES` for the benches: large enough never to reject.
pub const MAX_SPAN_BYTES: usize = 1 << 20;

/// The project of every generated span.
pub const PROJECT_ID: u64 = 4_505_000_000_000_123;

/// Cheap deterministic pseudo-random hex (splitmix64): every run and every
/// span differ the same way.
pub fn hex(seed: u64, len: usize) -> String {
    let mut x = seed;
    let mut out = String::with_capacity(len + 16);
    while out.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.push_str(&format!("{:016x}", z ^ (z >> 31)));
    }
    out.truncate(len);
    out
}

/// Where a span sits: the ids that decide its trace, segment and parent.
#[derive(Debug, Clone)]
pub struct SpanIds {
    /// 32 hex.
    pub trace_id: String,
    /// 16 hex.
    pub span_id: String,
    /// `None` makes the span a segment root (`is_segment: true`).
    pub parent_span_id: Option<String>,
    /// Written as the `sentry.segment.id` attribute when known upstream (it
    /// then decides the span's subsegment, whatever its parent).
    pub segment_id: Option<String>,
}

/// Span `i` as one JSON line of about `target_bytes` (at least the ~330 bytes
/// of its fixed fields; at most one `data` entry, ~70 bytes, over the target).
///
/// Fixed fields: the ids, project, `received`, timestamps, `is_segment`, `op`,
/// a description of one of four kinds. Then flat `data` entries, as Relay
/// writes them, until the target is reached: first a Django request's usual
/// ones, then varied header-like entries.
pub fn span_json(ids: &SpanIds, i: u64, target_bytes: usize) -> Vec<u8> {
    let start = 1_700_000_000.0 + i as f64 * 0.0137;
    let (op, description) = match i % 4 {
        0 => ("db", format!("SELECT \"sentry_project\".\"id\" FROM \"sentry_project\" WHERE \"id\" = %s LIMIT {i}")),
        1 => ("cache.get", format!("project-config:{}", hex(2000 + i, 24))),
        2 => ("http.client", format!("GET https://api.example.com/v2/items/{}", 300 + i)),
        _ => ("function", format!("sentry.api.endpoints.project_details.get_{i}")),
    };
    let mut span = json!({
        "trace_id": ids.trace_id,
        "span_id": ids.span_id,
        "parent_span_id": ids.parent_span_id,
        "project_id": PROJECT_ID,
        "received": start + 2.5,
        "start_timestamp": start,
        "end_timestamp": start + 0.0042 + (i % 7) as f64 * 0.001,
        "is_segment": ids.parent_span_id.is_none(),
        "op": op,
        "description": description,
    });
    if let Some(segment_id) = &ids.segment_id {
        span["attributes"] = json!({
            "sentry.segment.id": {"type": "string", "value": segment_id},
        });
    }
    let mut size = encode(&span).len() + r#","data":{}"#.len();
    let mut data = Map::new();
    let mut k = 0;
    while size < target_bytes {
        let (key, value) = data_entry(k, i);
        // "key":"value" and a comma.
        size += key.len() + value.len() + 6;
        data.insert(key, Value::String(value));
        k += 1;
    }
    if !data.is_empty() {
        span["data"] = Value::Object(data);
    }
    encode(&span)
}

fn encode(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("a json! value always serializes")
}

/// The `k`-th `data` entry of span `i`.
fn data_entry(k: usize, i: u64) -> (String, String) {
    const USUAL: [(&str, &str); 11] = [
        ("sentry.origin", "auto.db.django"),
        ("sentry.environment", "production"),
        ("sentry.release", "backend@24.11.0"),
        ("sentry.sdk.name", "sentry.python.django"),
        ("sentry.sdk.version", "2.19.0"),
        ("sentry.platform", "python"),
        ("sentry.transaction", "/api/0/projects/{slug}/"),
        ("db.system", "postgresql"),
        ("server.address", "10.2.0.17"),
        ("thread.name", "uWSGIWorker3Core1"),
        ("db.name", "sentry"),
    ];
    match USUAL.get(k) {
        Some((key, value)) => ((*key).to_owned(), (*value).to_owned()),
        None if k == USUAL.len() => ("thread.id".to_owned(), (140_210_000 + i % 3).to_string()),
        None => (
            format!("http.request.header.x-trace-{k}"),
            hex(i << 16 | k as u64, 40),
        ),
    }
}
