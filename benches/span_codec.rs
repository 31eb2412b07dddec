//! Benchmarks of the span codec hot paths: decoding input spans (one at a time
//! and as a batch), packing / unpacking one subsegment's payloads for Redis,
//! building a segment's output records and encoding them as JSON or
//! MessagePack.
//!
//! Inputs come from `common::span_json`: `ingest-spans` spans whose ids,
//! descriptions, timings and attributes differ, so compression ratios are
//! those of real data rather than of identical copies. Sizes are printed once
//! per run. Throughput is in spans, except for compression (payload bytes).
//!
//! Run: `cargo bench --bench span_codec` (add `-- --quick` for a short run;
//! filter with e.g. `-- build_records` or `-- flushed_segment`).

mod common;

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use spanbuf::ingest::decode_batch;
use spanbuf::metrics::Metrics;
use spanbuf::span::compress::{decode_member, encode_members, LEVEL_RAW};
use spanbuf::span::decode_span;
use spanbuf::span::record::{build_records, SegmentPayloads};

use common::{hex, span_json, SpanIds, MAX_SPAN_BYTES, PROJECT_ID};

/// Spans in the subsegment that compression is measured on.
const SUBSEGMENT_SPANS: usize = 20;
/// Size of a typical span, as in the end-to-end bench.
const SPAN_BYTES: usize = 900;
/// Spans in a batch, the consumer's default.
const BATCH_SPANS: usize = 500;
/// `SPANBUF_MAX_SEGMENT_BYTES` default.
const MAX_SEGMENT_BYTES: usize = 10 * 1024 * 1024;

fn trace_id() -> String {
    hex(0, 32)
}

fn segment_id() -> String {
    hex(1, 16)
}

/// Span `i` of the segment: span 0 is the root, every other one hangs under
/// it; `segment_known` writes the `sentry.segment.id` attribute.
fn ids(i: u64, segment_known: bool) -> SpanIds {
    SpanIds {
        trace_id: trace_id(),
        span_id: if i == 0 {
            segment_id()
        } else {
            hex(1000 + i, 16)
        },
        parent_span_id: (i > 0).then(segment_id),
        segment_id: segment_known.then(segment_id),
    }
}

/// `n` spans of one segment, about `target_bytes` each. Even spans carry the
/// `sentry.segment.id` attribute, odd ones leave it for `build_records` to
/// fill in.
fn segment(n: usize, target_bytes: usize) -> Vec<Vec<u8>> {
    (0..n as u64)
        .map(|i| span_json(&ids(i, i % 2 == 0), i, target_bytes))
        .collect()
}

fn bench_decode(c: &mut Criterion) {
    // The smallest span: ids, timings, op and description, no attributes.
    let json_300 = span_json(&ids(1, false), 1, 300);
    let json_900 = span_json(&ids(1, true), 1, SPAN_BYTES);
    let json_2k = span_json(&ids(1, true), 1, 2048);
    let value: serde_json::Value = serde_json::from_slice(&json_900).expect("valid json");
    let msgpack_900 = rmp_serde::to_vec_named(&value).expect("encodes");
    // A cut-off line fails in the parser; a bad id only after the whole span
    // was walked.
    let truncated = json_300[..json_300.len() / 2].to_vec();
    let bad_id = String::from_utf8(json_300.clone())
        .expect("utf-8")
        .replacen(&hex(1001, 16), "not-a-span-id", 1)
        .into_bytes();
    eprintln!(
        "decode_span inputs: JSON {} / {} / {} bytes, MessagePack {} bytes, invalid {} and {} bytes",
        json_300.len(),
        json_900.len(),
        json_2k.len(),
        msgpack_900.len(),
        truncated.len(),
        bad_id.len()
    );
    for valid in [&json_300, &json_900, &json_2k, &msgpack_900] {
        assert!(decode_span(valid, MAX_SPAN_BYTES).is_ok());
    }
    for invalid in [&truncated, &bad_id] {
        assert!(decode_span(invalid, MAX_SPAN_BYTES).is_err());
    }

    let mut group = c.benchmark_group("decode_span");
    group.throughput(Throughput::Elements(1));
    for (name, input) in [
        ("json_300b", &json_300),
        ("json_900b", &json_900),
        ("json_2kb", &json_2k),
        ("msgpack_900b", &msgpack_900),
        ("invalid_truncated", &truncated),
        ("invalid_bad_id", &bad_id),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| decode_span(black_box(input), MAX_SPAN_BYTES))
        });
    }
    group.finish();
}

/// A 500-line batch of 900-byte spans, one line in 50 cut off (invalid).
fn bench_decode_batch(c: &mut Criterion) {
    let metrics = Metrics::new().expect("metrics registry");
    let lines: Vec<Vec<u8>> = segment(BATCH_SPANS, SPAN_BYTES)
        .into_iter()
        .enumerate()
        .map(|(i, mut line)| {
            if i % 50 == 49 {
                line.truncate(line.len() / 2);
            }
            line
        })
        .collect();
    let decoded = decode_batch(
        lines.iter().map(|l| (0, l.as_slice())),
        MAX_SPAN_BYTES,
        &metrics,
    );
    assert_eq!((decoded.spans.len(), decoded.invalid.len()), (490, 10));

    let mut group = c.benchmark_group("decode_batch");
    group.throughput(Throughput::Elements(BATCH_SPANS as u64));
    group.bench_function("500_lines_2pct_invalid", |b| {
        b.iter(|| {
            decode_batch(
                black_box(&lines).iter().map(|l| (0, l.as_slice())),
                MAX_SPAN_BYTES,
                &metrics,
            )
        })
    });
    group.finish();
}

fn bench_members(c: &mut Criterion) {
    let payloads = segment(SUBSEGMENT_SPANS, SPAN_BYTES);
    let raw_bytes: usize = payloads.iter().map(Vec::len).sum();
    let limit = raw_bytes * 2;
    let levels = [LEVEL_RAW, 0, 3];
    let members: Vec<Vec<Vec<u8>>> = levels
        .iter()
        .map(|&level| encode_members(&payloads, level).expect("compresses"))
        .collect();
    for (level, members) in levels.iter().zip(&members) {
        let stored: usize = members.iter().map(Vec::len).sum();
        eprintln!(
            "{SUBSEGMENT_SPANS} spans, {raw_bytes} bytes, at level {level}: {} member(s), {stored} bytes",
            members.len()
        );
    }

    let name = format!("encode_members_{SUBSEGMENT_SPANS}x{SPAN_BYTES}b");
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(raw_bytes as u64));
    for level in levels {
        group.bench_function(format!("level_{level}"), |b| {
            b.iter(|| encode_members(black_box(&payloads), level))
        });
    }
    group.finish();

    let name = format!("decode_member_{SUBSEGMENT_SPANS}x{SPAN_BYTES}b");
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(raw_bytes as u64));
    for (level, members) in levels.iter().zip(&members) {
        let mut out: Vec<Bytes> = Vec::with_capacity(SUBSEGMENT_SPANS);
        group.bench_function(format!("level_{level}"), |b| {
            b.iter(|| {
                out.clear();
                for member in black_box(members) {
                    decode_member(member, limit, &mut out).expect("decompresses");
                }
                out.len()
            })
        });
    }
    group.finish();
}

/// Segments of 20 and 1000 spans as the flusher loads them, with a seed
/// shaped like segment key + salts; the 1000-span one also split in about
/// five chunks, to price the split.
fn bench_records(c: &mut Criterion) {
    let trace_id = trace_id();
    let segment_id = segment_id();
    let seed = format!(
        "span-buf:s:{{{PROJECT_ID}:{trace_id}}}:{segment_id}\x00{}\x00{}",
        hex(7, 32),
        hex(8, 32)
    );
    let payloads: Vec<(usize, Vec<Bytes>)> = [SUBSEGMENT_SPANS, 1000]
        .into_iter()
        .map(|n| {
            let spans = segment(n, SPAN_BYTES)
                .into_iter()
                .map(Bytes::from)
                .collect();
            (n, spans)
        })
        .collect();

    let mut group = c.benchmark_group("build_records");
    let mut records = Vec::new();
    for (n, payloads) in &payloads {
        let input = SegmentPayloads {
            segment_id: &segment_id,
            project_id: PROJECT_ID,
            trace_id: &trace_id,
            payloads,
            flush_seed: seed.as_bytes(),
            delivered: "",
        };
        let built = build_records(&input, MAX_SEGMENT_BYTES);
        assert_eq!((built.records.len(), built.spans), (1, *n));
        group.throughput(Throughput::Elements(*n as u64));
        group.bench_function(format!("{n}_spans"), |b| {
            b.iter(|| build_records(black_box(&input), MAX_SEGMENT_BYTES))
        });
        if *n > SUBSEGMENT_SPANS {
            let chunk_bytes = built.bytes / 5;
            let chunks = build_records(&input, chunk_bytes).records.len();
            assert!(chunks > 1);
            eprintln!("{n}-span segment split at {chunk_bytes} bytes: {chunks} records");
            group.bench_function(format!("{n}_spans_chunked"), |b| {
                b.iter(|| build_records(black_box(&input), chunk_bytes))
            });
        }
        records.extend(built.records);
    }
    group.finish();

    let mut group = c.benchmark_group("flushed_segment");
    for record in &records {
        let n = record.span_count();
        let json = record.to_json().expect("encodes");
        let msgpack = record.to_msgpack().expect("encodes");
        eprintln!(
            "{n}-span record: {} bytes as JSON, {} as MessagePack",
            json.len(),
            msgpack.len()
        );
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("to_json_{n}"), |b| {
            b.iter(|| black_box(record).to_json())
        });
        group.bench_function(format!("to_msgpack_{n}"), |b| {
            b.iter(|| black_box(record).to_msgpack())
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_decode,
    bench_decode_batch,
    bench_members,
    bench_records
);
criterion_main!(benches);
