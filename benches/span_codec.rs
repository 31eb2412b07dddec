//! Benchmarks of the span codec hot paths: decoding one input span (JSON and
//! MessagePack), packing / unpacking one subsegment's payloads for Redis, and
//! building and encoding the output record of a 50-span segment.
//!
//! Input is a realistic ~900-byte `ingest-spans` span; a subsegment is 50 such
//! spans with distinct ids, descriptions and timings, so compression ratios are
//! those of real data rather than of 50 identical copies.
//!
//! Run: `cargo bench --bench span_codec` (add `-- --quick` for a short run;
//! filter with e.g. `-- build_records` or `-- flushed_segment`).

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::{json, Value};
use spanbuf::span::compress::{decode_member, encode_members};
use spanbuf::span::decode_span;
use spanbuf::span::record::{build_records, SegmentPayloads};

const MAX_SPAN_BYTES: usize = 1 << 20;
const SUBSEGMENT_SPANS: usize = 50;

/// Cheap deterministic pseudo-random hex (splitmix64), so every run and every
/// span differ the same way.
fn hex(seed: u64, len: usize) -> String {
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

/// One span of a Django request's segment, shaped like Relay's `ingest-spans`
/// output (typed `attributes`, flat `data`).
fn sample_span(i: u64) -> Value {
    let start = 1_700_000_000.0 + i as f64 * 0.0137;
    let segment_id = hex(1, 16);
    let (op, description) = match i % 4 {
        0 => ("db", format!("SELECT \"sentry_project\".\"id\" FROM \"sentry_project\" WHERE \"id\" = %s LIMIT {i}")),
        1 => ("cache.get", format!("project-config:{}", hex(2000 + i, 24))),
        2 => ("http.client", format!("GET https://api.example.com/v2/items/{}", 300 + i)),
        _ => ("function", format!("sentry.api.endpoints.project_details.get_{i}")),
    };
    json!({
        "trace_id": hex(0, 32),
        "span_id": hex(1000 + i, 16),
        "parent_span_id": segment_id,
        "project_id": 4_505_000_000_000_123u64,
        "organization_id": 1_234_567,
        "received": start + 2.5,
        "start_timestamp": start,
        "end_timestamp": start + 0.0042 + (i % 7) as f64 * 0.001,
        "is_segment": false,
        "op": op,
        "description": description,
        "attributes": {
            "sentry.segment.id": {"type": "string", "value": segment_id},
            "sentry.op": {"type": "string", "value": op},
            "sentry.exclusive_time": {"type": "double", "value": 3.1 + i as f64 * 0.01},
        },
        "data": {
            "sentry.origin": "auto.db.django",
            "sentry.environment": "production",
            "sentry.release": "backend@24.11.0",
            "sentry.sdk.name": "sentry.python.django",
            "sentry.sdk.version": "2.19.0",
            "sentry.platform": "python",
            "sentry.transaction": "/api/0/projects/{slug}/",
            "db.system": "postgresql",
            "server.address": "10.2.0.17",
            "thread.id": (140_210_000 + i % 3).to_string(),
            "thread.name": "uWSGIWorker3Core1",
            "db.name": "sentry",
        },
    })
}

fn json_payloads() -> Vec<Vec<u8>> {
    (0..SUBSEGMENT_SPANS as u64)
        .map(|i| serde_json::to_vec(&sample_span(i)).unwrap())
        .collect()
}

fn bench_decode(c: &mut Criterion) {
    let span = sample_span(0);
    let json = serde_json::to_vec(&span).unwrap();
    let msgpack = rmp_serde::to_vec_named(&span).unwrap();
    eprintln!(
        "sample span: {} bytes as JSON, {} bytes as MessagePack",
        json.len(),
        msgpack.len()
    );
    assert!(decode_span(&json, MAX_SPAN_BYTES).is_ok());
    assert!(decode_span(&msgpack, MAX_SPAN_BYTES).is_ok());

    let mut group = c.benchmark_group("decode_span");
    group.throughput(Throughput::Elements(1));
    group.bench_function("json", |b| {
        b.iter(|| decode_span(black_box(&json), MAX_SPAN_BYTES))
    });
    group.bench_function("msgpack", |b| {
        b.iter(|| decode_span(black_box(&msgpack), MAX_SPAN_BYTES))
    });
    group.finish();
}

fn bench_members(c: &mut Criterion) {
    let payloads = json_payloads();
    let raw_bytes: usize = payloads.iter().map(Vec::len).sum();
    let limit = raw_bytes * 2;

    let mut group = c.benchmark_group("encode_members_50");
    group.throughput(Throughput::Bytes(raw_bytes as u64));
    for level in [0, 3] {
        let blob = encode_members(&payloads, level).unwrap();
        eprintln!(
            "50 spans, {raw_bytes} bytes, at level {level}: {} bytes",
            blob[0].len()
        );
        group.bench_function(format!("level_{level}"), |b| {
            b.iter(|| encode_members(black_box(&payloads), level))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("decode_member_50");
    group.throughput(Throughput::Bytes(raw_bytes as u64));
    for level in [0, 3] {
        let blob = encode_members(&payloads, level).unwrap().remove(0);
        let mut out: Vec<Bytes> = Vec::with_capacity(SUBSEGMENT_SPANS);
        group.bench_function(format!("level_{level}"), |b| {
            b.iter(|| {
                out.clear();
                decode_member(black_box(&blob), limit, &mut out)
            })
        });
    }
    group.finish();
}

/// One segment of 50 spans as the flusher sees it: segment id = the parent of
/// every sample span, a seed shaped like segment key + salts.
fn bench_records(c: &mut Criterion) {
    let payloads: Vec<Bytes> = json_payloads().into_iter().map(Bytes::from).collect();
    let raw_bytes: usize = payloads.iter().map(Bytes::len).sum();
    let segment_id = hex(1, 16);
    let trace_id = hex(0, 32);
    let seed = format!(
        "span-buf:s:{{4505000000000123:{trace_id}}}:{segment_id}\x00{}\x00{}",
        hex(7, 32),
        hex(8, 32)
    );
    let input = SegmentPayloads {
        segment_id: &segment_id,
        project_id: 4_505_000_000_000_123,
        trace_id: &trace_id,
        payloads: &payloads,
        flush_seed: seed.as_bytes(),
    };
    let max_segment_bytes = 10 * 1024 * 1024;
    let built = build_records(&input, max_segment_bytes);
    assert_eq!((built.records.len(), built.spans), (1, SUBSEGMENT_SPANS));
    // Chunks of about a fifth of the segment, to price the split.
    let chunk_bytes = built.bytes / 5;
    assert!(build_records(&input, chunk_bytes).records.len() > 1);
    let record = &built.records[0];
    let json = record.to_json().unwrap();
    let msgpack = record.to_msgpack().unwrap();
    eprintln!(
        "50-span segment: {raw_bytes} payload bytes, {} span bytes out, record {} bytes as JSON, {} as MessagePack",
        built.bytes,
        json.len(),
        msgpack.len()
    );

    let mut group = c.benchmark_group("build_records");
    group.throughput(Throughput::Bytes(raw_bytes as u64));
    group.bench_function("50_spans", |b| {
        b.iter(|| build_records(black_box(&input), max_segment_bytes))
    });
    group.bench_function("50_spans_chunked", |b| {
        b.iter(|| build_records(black_box(&input), chunk_bytes))
    });
    group.finish();

    let mut group = c.benchmark_group("flushed_segment");
    group.throughput(Throughput::Bytes(json.len() as u64));
    group.bench_function("to_json_50", |b| b.iter(|| black_box(record).to_json()));
    group.bench_function("to_msgpack_50", |b| {
        b.iter(|| black_box(record).to_msgpack())
    });
    group.finish();
}

criterion_group!(benches, bench_decode, bench_members, bench_records);
criterion_main!(benches);
