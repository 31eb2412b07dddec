//! End-to-end ingest throughput against a real, freshly started Redis.
//!
//! `cargo bench --bench ingest_throughput` generates a synthetic workload with
//! `spanbuf::gen` (default 100k spans: 5000 traces × 20 spans of ~900 bytes,
//! arrival shuffled within a 1000-span window), ingests it in 500-span batches one after the
//! other (as one consumer does), and prints spans/s, batches/s and Redis round
//! trips per batch (under `cargo test` it is a 5k-span smoke run). Environment knobs: `BENCH_SPANS`, `BENCH_BATCH`,
//! `BENCH_CLUSTER=1` (a local 3-master cluster instead of one server), and any
//! `SPANBUF_*` variable (compression level, …).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Instant;

use spanbuf::config::Config;
use spanbuf::gen::{generate, GenSpec};
use spanbuf::ingest::{decode_batch, IngestSettings, Ingestor};
use spanbuf::metrics::Metrics;
use spanbuf::store::Store;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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

    // 20-span traces of ~900-byte spans, shuffled within 1000-line windows.
    let spec = GenSpec {
        seed: 42,
        traces: total.div_ceil(20),
        spans_per_segment: 20,
        ..GenSpec::default()
    };
    let mut lines = Vec::with_capacity(total);
    generate(&spec, |line| lines.push(line.to_vec()));
    lines.truncate(total);
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
