//! End-to-end ingest throughput against a real, freshly started Redis.
//!
//! `cargo bench --bench ingest_throughput` generates a synthetic workload
//! (default 100k spans: 5000 traces × 20 spans of ~900 bytes, arrival shuffled
//! within a 1000-span window), ingests it in 500-span batches one after the
//! other (as one consumer does), and prints spans/s, batches/s and Redis round
//! trips per batch (under `cargo test` it is a 5k-span smoke run). Environment knobs: `BENCH_SPANS`, `BENCH_BATCH`,
//! `BENCH_CLUSTER=1` (a local 3-master cluster instead of one server), and any
//! `SPANBUF_*` variable (compression level, …).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use spanbuf::config::Config;
use spanbuf::ingest::{decode_batch, IngestSettings, Ingestor};
use spanbuf::metrics::Metrics;
use spanbuf::store::Store;

const SPANS_PER_TRACE: usize = 20;
const SHUFFLE_WINDOW: usize = 1000;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Spans as JSON lines: each trace is a root with a two-level tree under it.
fn workload(total: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let traces = total.div_ceil(SPANS_PER_TRACE);
    let mut lines = Vec::with_capacity(total);
    for t in 0..traces {
        let trace_id = format!("{:032x}", rng.random::<u128>() ^ t as u128);
        let ids: Vec<String> = (0..SPANS_PER_TRACE)
            .map(|_| format!("{:016x}", rng.random::<u64>()))
            .collect();
        for (i, span_id) in ids.iter().enumerate() {
            if lines.len() == total {
                break;
            }
            let parent = match i {
                0 => serde_json::Value::Null,
                1..=4 => ids[0].clone().into(),
                _ => ids[1 + i % 4].clone().into(),
            };
            let span = serde_json::json!({
                "trace_id": trace_id,
                "span_id": span_id,
                "parent_span_id": parent,
                "project_id": 1 + (t % 10),
                "organization_id": 1,
                "is_segment": i == 0,
                "start_timestamp": 1_700_000_000.0 + i as f64,
                "end_timestamp": 1_700_000_000.5 + i as f64,
                "received": 1_700_000_000.0 + (t * SPANS_PER_TRACE + i) as f64 / 10_000.0,
                "op": "db.query",
                "description": format!("SELECT * FROM table_{i} WHERE id = %s AND tenant = %s ORDER BY created DESC LIMIT 100 -- trace {t}"),
                "status": "ok",
                "attributes": {
                    "sentry.environment": {"type": "string", "value": "production"},
                    "sentry.release": {"type": "string", "value": "backend@24.11.0+abcdef0123456789"},
                    "sentry.platform": {"type": "string", "value": "python"},
                    "sentry.sdk.name": {"type": "string", "value": "sentry.python.django"},
                    "sentry.sdk.version": {"type": "string", "value": "2.18.0"},
                    "db.system": {"type": "string", "value": "postgresql"},
                    "server.address": {"type": "string", "value": "db-replica-3.internal.example.com"},
                    "thread.name": {"type": "string", "value": "uwsgi-worker-7"},
                    "http.route": {"type": "string", "value": "/api/0/organizations/{org}/events/"},
                },
            });
            lines.push(serde_json::to_vec(&span).expect("json"));
        }
    }
    for window in lines.chunks_mut(SHUFFLE_WINDOW) {
        window.shuffle(&mut rng);
    }
    lines
}

fn main() {
    // `cargo bench` passes `--bench`; under `cargo test` this runs as a small
    // smoke test of the same path.
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let total = env_usize("BENCH_SPANS", if bench_mode { 100_000 } else { 5_000 });
    let batch_size = env_usize("BENCH_BATCH", 500);
    let cluster = std::env::var("BENCH_CLUSTER").is_ok_and(|v| v == "1");
    let mut config = Config::from_env().unwrap_or_else(|e| panic!("bad configuration:\n{e}"));

    let _standalone;
    let _cluster;
    if cluster {
        let c = support::RedisCluster::start();
        config.redis.cluster_urls = c.urls();
        _cluster = Some(c);
    } else {
        let s = support::RedisServer::start();
        config.redis.url = s.url();
        _standalone = Some(s);
    }

    let lines = workload(total, 42);
    let avg = lines.iter().map(Vec::len).sum::<usize>() / lines.len().max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let store = Arc::new(Store::connect(&config.redis, config.buffer.slice_id).await.expect("redis"));
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let ingestor = Ingestor::new(
            store.clone(),
            IngestSettings::from_config(&config.redis, &config.buffer),
            metrics.clone(),
        );
        let started = Instant::now();
        let mut trips = 0;
        let mut batches = 0;
        let mut subsegments = 0;
        for chunk in lines.chunks(batch_size) {
            let batch = decode_batch(
                chunk.iter().map(|l| (0u32, l.as_slice())),
                config.buffer.max_span_bytes as usize,
                &metrics,
            );
            let now = batch.spans.iter().filter_map(|s| s.span.received).fold(f64::MAX, f64::min);
            let out = ingestor.ingest(&batch.spans, now).await.expect("ingest");
            trips += out.round_trips;
            subsegments += out.subsegments;
            batches += 1;
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "ingest_throughput: {total} spans (avg {avg} B) in {batches} batches of {batch_size} on {} redis, compression level {}: {:.2} s, {:.0} spans/s, {:.1} batches/s, {:.2} round trips/batch, {:.1} subsegments/batch, {} spans consumed",
            if cluster { "cluster" } else { "standalone" },
            config.buffer.compression_level,
            secs,
            total as f64 / secs,
            batches as f64 / secs,
            trips as f64 / batches as f64,
            subsegments as f64 / batches as f64,
            metrics.spans_consumed_total.get(),
        );
    });
}
