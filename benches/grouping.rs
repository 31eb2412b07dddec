//! Benchmarks of in-batch grouping ([`spanbuf::ingest::group`]) and of the salt
//! that names each subsegment's payload set ([`Subsegment::salt`]), on batches
//! of 500 spans (the consumer's default batch size) in four shapes:
//!
//! - `deep_tree_shuffled`: one trace, one segment of 500 spans, each under one
//!   of the three spans made just before it (about 250 levels deep), arriving
//!   in random order: long redirect chains to follow;
//! - `deep_tree_leaves_first`: the same tree with every child arriving before
//!   its parent: each arrival moves the subtree gathered so far under it;
//! - `50_traces_x_10_shuffled`: 50 segments of 10 spans, interleaved at random;
//! - `500_independent`: 500 spans of 500 traces whose parents are not in the
//!   batch, so 500 one-span subsegments.
//!
//! Spans carry no `sentry.segment.id`, so grouping has to follow parents.
//!
//! `window_20000` groups one coalescing window (docs/design.md §5) of the
//! default 20,000 spans from `spanbuf gen`'s shuffled workload (1,000 traces
//! × 20 spans, depth 3, sliding shuffle over 1,000 lines), then salts and
//! compresses every subsegment as ingest does: the worker's per-window CPU
//! before Redis. Throughput is in spans. Run: `cargo bench --bench grouping`.

mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use spanbuf::ingest::{group, ShardedSpan, Subsegment};
use spanbuf::span::decode_span;

use common::{hex, span_json, SpanIds, MAX_SPAN_BYTES};

const BATCH_SPANS: usize = 500;
/// Grouping reads only ids; small payloads keep set-up quick.
const SPAN_BYTES: usize = 300;
/// Kafka partitions the batch was consumed from.
const SHARDS: u32 = 4;

/// A span of `trace` with a fresh id, under `parent` (a root when `None`).
fn ids(trace_id: &str, seed: u64, parent: Option<&str>) -> SpanIds {
    SpanIds {
        trace_id: trace_id.to_owned(),
        span_id: hex(seed, 16),
        parent_span_id: parent.map(str::to_owned),
        segment_id: None,
    }
}

/// One trace's tree in creation order (parents first).
fn deep_tree(rng: &mut StdRng) -> Vec<SpanIds> {
    let trace_id = hex(1, 32);
    let mut spans = vec![ids(&trace_id, 100, None)];
    for k in 1..BATCH_SPANS {
        let back = rng.random_range(1..=k.min(3));
        let parent = spans[k - back].span_id.clone();
        spans.push(ids(&trace_id, 100 + k as u64, Some(&parent)));
    }
    spans
}

/// 50 segments of 10 spans, each span under a random earlier one of its trace.
fn many_traces(rng: &mut StdRng) -> Vec<SpanIds> {
    let mut spans = Vec::with_capacity(BATCH_SPANS);
    for t in 0..50u64 {
        let trace_id = hex(10_000 + t, 32);
        let first = spans.len();
        spans.push(ids(&trace_id, 20_000 + t * 10, None));
        for k in 1..10u64 {
            let parent = spans[first + rng.random_range(0..k as usize)]
                .span_id
                .clone();
            spans.push(ids(&trace_id, 20_000 + t * 10 + k, Some(&parent)));
        }
    }
    spans.shuffle(rng);
    spans
}

/// Spans of distinct traces, each under a parent outside the batch.
fn independent() -> Vec<SpanIds> {
    (0..BATCH_SPANS as u64)
        .map(|k| ids(&hex(30_000 + k, 32), 40_000 + k, Some(&hex(50_000 + k, 16))))
        .collect()
}

/// The batch as `decode_batch` hands it to grouping.
fn decode(spans: &[SpanIds]) -> Vec<ShardedSpan> {
    spans
        .iter()
        .enumerate()
        .map(|(i, ids)| ShardedSpan {
            shard: i as u32 % SHARDS,
            span: decode_span(&span_json(ids, i as u64, SPAN_BYTES), MAX_SPAN_BYTES)
                .expect("generated spans are valid"),
        })
        .collect()
}

/// `(name, batch, expected number of subsegments)`.
fn batches() -> Vec<(&'static str, Vec<ShardedSpan>, usize)> {
    let mut rng = StdRng::seed_from_u64(0x5ba9_0001);
    let mut tree = deep_tree(&mut rng);
    tree.shuffle(&mut rng);
    let shuffled = decode(&tree);
    let mut tree = deep_tree(&mut rng);
    tree.reverse();
    let leaves_first = decode(&tree);
    vec![
        ("deep_tree_shuffled", shuffled, 1),
        ("deep_tree_leaves_first", leaves_first, 1),
        (
            "50_traces_x_10_shuffled",
            decode(&many_traces(&mut rng)),
            50,
        ),
        ("500_independent", decode(&independent()), BATCH_SPANS),
    ]
}

fn bench_group_and_salt(c: &mut Criterion) {
    let batches = batches();
    let grouped: Vec<Vec<Subsegment>> = batches
        .iter()
        .map(|(name, batch, expected)| {
            assert_eq!(batch.len(), BATCH_SPANS);
            let subs = group(batch);
            assert_eq!(subs.len(), *expected, "{name}");
            assert_eq!(
                subs.iter().map(|s| s.spans.len()).sum::<usize>(),
                BATCH_SPANS
            );
            subs
        })
        .collect();

    let mut bench = c.benchmark_group("group_500");
    bench.throughput(Throughput::Elements(BATCH_SPANS as u64));
    for (name, batch, _) in &batches {
        bench.bench_function(*name, |b| b.iter(|| group(black_box(batch))));
    }
    bench.finish();

    // Every subsegment of the batch, as ingest salts them.
    let mut bench = c.benchmark_group("salt_500");
    bench.throughput(Throughput::Elements(BATCH_SPANS as u64));
    for ((name, batch, _), subs) in batches.iter().zip(&grouped) {
        bench.bench_function(*name, |b| {
            b.iter(|| {
                black_box(subs)
                    .iter()
                    .map(|s| s.salt(batch))
                    .collect::<Vec<String>>()
            })
        });
    }
    bench.finish();
}

/// One default-sized window of the shuffled workload, decoded.
fn window() -> Vec<ShardedSpan> {
    let spec = spanbuf::gen::GenSpec {
        traces: WINDOW_SPANS / 20,
        spans_per_segment: 20,
        ..spanbuf::gen::GenSpec::default()
    };
    let mut window = Vec::with_capacity(WINDOW_SPANS);
    spanbuf::gen::generate(&spec, |line| {
        let span = decode_span(line, MAX_SPAN_BYTES).expect("generated spans are valid");
        window.push(ShardedSpan { shard: 0, span });
    });
    window
}

const WINDOW_SPANS: usize = 20_000;

fn bench_window(c: &mut Criterion) {
    let window = window();
    assert_eq!(window.len(), WINDOW_SPANS);
    let subs = group(&window);
    assert!(
        subs.len() >= WINDOW_SPANS / 20,
        "{} subsegments",
        subs.len()
    );

    let mut bench = c.benchmark_group("window_20000");
    bench.throughput(Throughput::Elements(WINDOW_SPANS as u64));
    bench.sample_size(20);
    bench.bench_function("group", |b| b.iter(|| group(black_box(&window))));
    bench.bench_function("group_salt_compress", |b| {
        b.iter(|| {
            let subs = group(black_box(&window));
            let mut stored = 0usize;
            for sub in &subs {
                let payloads: Vec<&[u8]> = sub
                    .spans
                    .iter()
                    .map(|&i| window[i].span.payload.as_ref())
                    .collect();
                let members =
                    spanbuf::span::compress::encode_members(&payloads, 0).expect("compress");
                stored += members.iter().map(Vec::len).sum::<usize>() + sub.salt(&window).len();
            }
            stored
        })
    });
    bench.finish();
}

criterion_group!(benches, bench_group_and_salt, bench_window);
criterion_main!(benches);
