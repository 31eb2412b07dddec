//! `spanbuf bench`: ingest and flush end to end through a real Redis (and,
//! with `--kafka`, the real producer), measured the way an operator tunes.
//!
//! One *point* is one configuration run on one workload, in its own process
//! so that peak RSS and every `SPANBUF_*` setting belong to that point alone
//! ([`run_point`]). The orchestrator ([`sweep`]) generates the workload once,
//! runs every point of the `--sweep` grid as a child process, and writes the
//! table, CSV, JSON and plot ([`plot`]).
//!
//! A point works like the worker: an ingest loop stages batches of
//! `SPANBUF_BATCH_MAX_SPANS` lines in coalescing windows (`SPANBUF_WINDOW_*`)
//! and writes each due window, while a flush loop runs cycles every
//! `SPANBUF_FLUSH_INTERVAL_MS` at the same live clock (wall time, held at the
//! oldest staged batch as the worker holds it); after the input ends the flush
//! loop keeps going until every queue is empty (so a point lasts at least
//! `SPANBUF_ROOT_TIMEOUT_SECS`). Redis figures come from `INFO cpu` and `INFO
//! commandstats` deltas, so the Redis must serve nothing else while a point
//! runs. Ingest, flush and the sink are the worker's own code; this module
//! owns only the loops, the measurements and the reports.

pub mod plot;
pub mod sweep;

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use bytes::Bytes;

use crate::clock::{wall_ms, LiveClock};
use crate::config::{Config, OutputCodec};
use crate::engine::{shard_of, Engine};
use crate::flush::FlushError;
use crate::ingest::window::Window;
use crate::ingest::{IngestError, ShardedSpan};
use crate::kafka::producer::KafkaSink;
use crate::kafka::KafkaError;
use crate::metrics::Metrics;
use crate::sink::{Delivery, Sink, SinkError};
use crate::span::record::FlushedSegment;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bench: cannot read the workload {path}: {source}")]
    Input {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bench: {0}")]
    Store(#[from] StoreError),
    #[error("bench: {0}")]
    Ingest(#[from] IngestError),
    #[error("bench: {0}")]
    Flush(#[from] FlushError),
    #[error("bench: {0}")]
    Kafka(#[from] KafkaError),
    #[error("bench: the flush queues of shards 0..{shards} hold {segments} segments before the run; bench needs a Redis (or a SPANBUF_KEY_PREFIX) nobody else uses")]
    NotEmpty { shards: u32, segments: u64 },
    #[error("bench: {segments} segments still queued {waited_secs} s after the input ended (--max-wait-secs); they stay in Redis")]
    Unfinished { segments: u64, waited_secs: u64 },
    #[error("bench: {0}")]
    Other(String),
}

/// How one point runs.
#[derive(Debug, Clone)]
pub struct PointOptions {
    /// NDJSON workload, one span per line.
    pub input: PathBuf,
    /// Shards (flush queues); a span's shard is its trace id modulo this.
    pub shards: u32,
    /// Deliver through the Kafka producer to `SPANBUF_OUTPUT_TOPIC` instead
    /// of encoding and discarding the records.
    pub kafka: bool,
    /// Longest wait for the queues to empty after the input ended.
    pub max_wait: Duration,
}

/// What one point measured. Rates are per wall-clock second; "per 1k spans"
/// figures divide by the input lines.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PointResult {
    pub spans_in: u64,
    pub spans_invalid: u64,
    pub spans_flushed: u64,
    pub spans_duplicate: u64,
    pub spans_dropped: u64,
    pub segments_flushed: u64,
    pub records: u64,
    pub record_bytes: u64,
    /// Wall time from the first batch to the last one ingested.
    pub ingest_secs: f64,
    /// Wall time from the first batch until every queue was empty.
    pub total_secs: f64,
    /// Time spent in flush cycles that flushed something.
    pub flush_busy_secs: f64,
    /// Input lines over `ingest_secs` (the flusher runs concurrently).
    pub spans_per_sec: f64,
    /// Segments flushed over `flush_busy_secs`: the flusher's capacity.
    pub segments_per_sec: f64,
    /// User + system CPU of this process, milliseconds per 1000 input lines.
    pub worker_cpu_ms_per_1k_spans: f64,
    /// Redis `used_cpu_user + used_cpu_sys` (all primaries), milliseconds per 1000 lines.
    pub redis_cpu_ms_per_1k_spans: f64,
    /// Redis commands (`INFO commandstats` calls, all primaries) per 1000 lines.
    pub redis_commands_per_1k_spans: f64,
    /// Pipelined round trips to Redis per 1000 lines.
    pub redis_round_trips_per_1k_spans: f64,
    /// Peak resident set size of this process.
    pub peak_rss_bytes: u64,
    /// Delivery time minus queue deadline over the flushed segments.
    pub lateness_p50_secs: f64,
    pub lateness_p99_secs: f64,
    pub lateness_max_secs: f64,
}

/// Runs one point: the configuration is `config`, the process is ours alone.
pub async fn run_point(config: &Config, options: &PointOptions) -> Result<PointResult, BenchError> {
    let shards: Vec<u32> = (0..options.shards.max(1)).collect();
    let file = std::fs::File::open(&options.input).map_err(|source| BenchError::Input {
        path: options.input.display().to_string(),
        source,
    })?;
    let store = Arc::new(Store::connect(&config.redis, config.buffer.slice_id).await?);
    let queued: u64 = store
        .queue_snapshots(&shards, 0.0, 1)
        .await?
        .iter()
        .map(|q| q.size)
        .sum();
    if queued > 0 {
        return Err(BenchError::NotEmpty {
            shards: options.shards,
            segments: queued,
        });
    }
    // The same workload again: its traces' delivered records from an earlier
    // run would turn every span into a duplicate.
    store.forget_delivered().await?;
    let metrics = Arc::new(Metrics::new().map_err(|e| BenchError::Other(e.to_string()))?);
    let sink = if options.kafka {
        let kafka = KafkaSink::new(config, metrics.clone())?;
        kafka
            .check_topics(
                &[config.kafka.output_topic.as_str()],
                Duration::from_secs(10),
            )
            .await?;
        BenchSink::Kafka(kafka)
    } else {
        BenchSink::Discard(DiscardSink::new(config.buffer.output_codec))
    };
    let sink = Arc::new(sink);

    let redis_before = RedisCounters::read(&store).await?;
    let cpu_before = process_cpu_secs();
    let trips_before = store.round_trips();
    let started = Instant::now();

    let input_done = Arc::new(AtomicBool::new(false));
    let clock = Arc::new(LiveClock::default());
    let engine = Arc::new(Engine::new(config, store.clone(), metrics.clone()));
    let flush_task = tokio::spawn(flush_loop(
        engine.clone(),
        shards.clone(),
        sink.clone(),
        clock.clone(),
        Duration::from_millis(config.worker.flush_interval_ms),
        input_done.clone(),
        options.max_wait,
    ));
    let ingest = ingest_all(config, options, &engine, &metrics, &clock, file).await;
    input_done.store(true, Ordering::Release);
    let ingest_secs = started.elapsed().as_secs_f64();
    let flushed = flush_task
        .await
        .map_err(|e| BenchError::Other(format!("flush task: {e}")))?;
    let ingested = ingest?;
    let flushed = flushed?;
    let total_secs = started.elapsed().as_secs_f64();
    if let BenchSink::Kafka(kafka) = sink.as_ref() {
        kafka.flush(Duration::from_secs(30)).await?;
    }

    let cpu_secs = process_cpu_secs() - cpu_before;
    let redis_after = RedisCounters::read(&store).await?;
    let spans_in = ingested.lines;
    let per_1k = |x: f64| {
        if spans_in == 0 {
            0.0
        } else {
            x * 1000.0 / spans_in as f64
        }
    };
    let mut lateness = flushed.lateness;
    lateness.sort_by(f64::total_cmp);
    Ok(PointResult {
        spans_in,
        spans_invalid: ingested.invalid,
        spans_flushed: flushed.spans,
        spans_duplicate: flushed.duplicates + ingested.duplicates,
        spans_dropped: flushed.dropped + ingested.refused,
        segments_flushed: flushed.segments,
        records: flushed.records,
        record_bytes: sink.bytes(),
        ingest_secs,
        total_secs,
        flush_busy_secs: flushed.busy_secs,
        spans_per_sec: rate(spans_in as f64, ingest_secs),
        segments_per_sec: rate(flushed.segments as f64, flushed.busy_secs),
        worker_cpu_ms_per_1k_spans: per_1k(cpu_secs * 1000.0),
        redis_cpu_ms_per_1k_spans: per_1k((redis_after.cpu_secs - redis_before.cpu_secs) * 1000.0),
        redis_commands_per_1k_spans: per_1k(
            redis_after.commands.saturating_sub(redis_before.commands) as f64,
        ),
        redis_round_trips_per_1k_spans: per_1k((store.round_trips() - trips_before) as f64),
        peak_rss_bytes: crate::process::peak_rss_bytes(),
        lateness_p50_secs: quantile(&lateness, 0.50),
        lateness_p99_secs: quantile(&lateness, 0.99),
        lateness_max_secs: lateness.last().copied().unwrap_or(0.0),
    })
}

fn rate(count: f64, secs: f64) -> f64 {
    if secs > 0.0 {
        count / secs
    } else {
        0.0
    }
}

/// The `q` quantile of sorted values (nearest rank); 0 when empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// What the ingest side of a point read and wrote.
#[derive(Debug, Default)]
struct Ingested {
    lines: u64,
    invalid: u64,
    /// Spans already buffered (in-window copies, re-ingested subsegments).
    duplicates: u64,
    /// Spans refused over `SPANBUF_MAX_TRACE_SPANS` (dropped).
    refused: u64,
}

/// Reads the workload on a blocking thread in batches of
/// `SPANBUF_BATCH_MAX_SPANS` lines and stages them in coalescing windows, as
/// the worker does with its poll batches: each batch is stamped with the wall
/// clock when it arrives (its "Kafka timestamp"), the clock holds at the
/// window's oldest stamp until the window is in Redis.
async fn ingest_all(
    config: &Config,
    options: &PointOptions,
    engine: &Engine,
    metrics: &Metrics,
    clock: &LiveClock,
    file: std::fs::File,
) -> Result<Ingested, BenchError> {
    let batch_size = config.kafka.batch_max_spans.max(1);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<String>>>(4);
    let reader = std::thread::spawn(move || {
        let mut batch = Vec::with_capacity(batch_size);
        for line in std::io::BufReader::new(file).lines() {
            match line {
                Ok(line) if line.trim().is_empty() => {}
                Ok(line) => {
                    batch.push(line);
                    if batch.len() == batch_size
                        && tx
                            .blocking_send(Ok(std::mem::replace(
                                &mut batch,
                                Vec::with_capacity(batch_size),
                            )))
                            .is_err()
                    {
                        return;
                    }
                }
                Err(err) => {
                    let _ = tx.blocking_send(Err(err));
                    return;
                }
            }
        }
        if !batch.is_empty() {
            let _ = tx.blocking_send(Ok(batch));
        }
    });
    let bounds = *engine.bounds();
    let mut out = Ingested::default();
    let mut window = Window::default();
    let result = async {
        loop {
            // Wait for the next batch no longer than the staged window may.
            let next = match window.due_in(&bounds, Instant::now()) {
                None => rx.recv().await,
                Some(wait) => match tokio::time::timeout(wait, rx.recv()).await {
                    Ok(next) => next,
                    Err(_) => {
                        write(engine, &mut window, clock, &mut out).await?;
                        continue;
                    }
                },
            };
            let Some(batch) = next else { break };
            let batch = batch.map_err(|source| BenchError::Input {
                path: options.input.display().to_string(),
                source,
            })?;
            let messages = batch.len();
            out.lines += messages as u64;
            let mut spans = Vec::with_capacity(batch.len());
            let mut reasons = Vec::new();
            for line in batch {
                match engine.decode(Bytes::from(line)) {
                    Ok(span) => spans.push(ShardedSpan {
                        shard: shard_of(&span.trace_id, options.shards),
                        span,
                    }),
                    Err(err) => reasons.push(err.reason),
                }
            }
            out.invalid += reasons.len() as u64;
            metrics.record_invalid(reasons);
            let stamp = wall_ms();
            clock.hold(stamp);
            window.stage(spans, messages, stamp, []);
            if window.is_due(&bounds, Instant::now()) {
                write(engine, &mut window, clock, &mut out).await?;
            }
        }
        write(engine, &mut window, clock, &mut out).await
    }
    .await;
    drop(rx);
    if reader.join().is_err() {
        return Err(BenchError::Other(
            "the workload reader thread panicked".into(),
        ));
    }
    result.map(|()| out)
}

/// Writes a staged window at its oldest stamp and releases the clock.
async fn write(
    engine: &Engine,
    window: &mut Window,
    clock: &LiveClock,
    out: &mut Ingested,
) -> Result<(), BenchError> {
    if let Some(oldest) = window.oldest_ms() {
        let outcome = engine
            .write(window.spans(), LiveClock::window_clock(oldest))
            .await?;
        out.duplicates += outcome.spans_redelivered as u64;
        out.refused += outcome.spans_refused as u64;
    }
    window.clear();
    clock.release();
    Ok(())
}

/// What the flush loop delivered.
#[derive(Debug, Default)]
struct Flushed {
    segments: u64,
    spans: u64,
    duplicates: u64,
    dropped: u64,
    records: u64,
    busy_secs: f64,
    lateness: Vec<f64>,
}

/// Flush cycles at the wall clock until the input is done and every queue is
/// empty, or `max_wait` after the input ended.
async fn flush_loop(
    engine: Arc<Engine>,
    shards: Vec<u32>,
    sink: Arc<BenchSink>,
    clock: Arc<LiveClock>,
    interval: Duration,
    input_done: Arc<AtomicBool>,
    max_wait: Duration,
) -> Result<Flushed, BenchError> {
    let mut out = Flushed::default();
    let mut done_at: Option<Instant> = None;
    loop {
        let done = input_done.load(Ordering::Acquire);
        let cycle_start = Instant::now();
        let cycle = engine
            .flush_cycle(&shards, clock.now(), sink.as_ref())
            .await?;
        if cycle.segments_flushed > 0 {
            out.busy_secs += cycle_start.elapsed().as_secs_f64();
        }
        out.segments += cycle.segments_flushed as u64;
        out.spans += cycle.spans_flushed as u64;
        out.duplicates += cycle.spans_duplicate as u64;
        out.dropped += cycle.spans_dropped();
        out.records += cycle.records as u64;
        out.lateness.extend_from_slice(&cycle.lateness_secs);
        if cycle.more_due {
            continue;
        }
        if done {
            let queued: u64 = engine
                .store()
                .queue_snapshots(&shards, 0.0, 1)
                .await?
                .iter()
                .map(|q| q.size)
                .sum();
            if queued == 0 {
                return Ok(out);
            }
            let since = *done_at.get_or_insert_with(Instant::now);
            if since.elapsed() > max_wait {
                return Err(BenchError::Unfinished {
                    segments: queued,
                    waited_secs: max_wait.as_secs(),
                });
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// Where a point's records go.
enum BenchSink {
    Discard(DiscardSink),
    Kafka(KafkaSink),
}

impl BenchSink {
    fn bytes(&self) -> u64 {
        match self {
            BenchSink::Discard(d) => d.bytes.load(Ordering::Relaxed),
            BenchSink::Kafka(_) => 0,
        }
    }
}

impl Sink for BenchSink {
    async fn deliver(&self, records: &[FlushedSegment]) -> Result<Delivery, SinkError> {
        match self {
            BenchSink::Discard(d) => d.deliver(records).await,
            BenchSink::Kafka(k) => k.deliver(records).await,
        }
    }
}

/// Encodes every record with the configured codec (so the codec's cost is
/// measured) and drops it.
struct DiscardSink {
    codec: OutputCodec,
    bytes: std::sync::atomic::AtomicU64,
}

impl DiscardSink {
    fn new(codec: OutputCodec) -> Self {
        Self {
            codec,
            bytes: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Sink for DiscardSink {
    async fn deliver(&self, records: &[FlushedSegment]) -> Result<Delivery, SinkError> {
        let mut bytes = 0u64;
        for record in records {
            bytes += record.encode(self.codec)?.len() as u64;
        }
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(Delivery::complete())
    }
}

/// Redis counters summed over the primaries.
#[derive(Debug, Clone, Copy, Default)]
struct RedisCounters {
    cpu_secs: f64,
    commands: u64,
}

impl RedisCounters {
    async fn read(store: &Store) -> Result<Self, StoreError> {
        let mut out = RedisCounters::default();
        for text in store.info("cpu").await? {
            out.cpu_secs += info_f64(&text, "used_cpu_user") + info_f64(&text, "used_cpu_sys");
        }
        for text in store.info("commandstats").await? {
            out.commands += command_calls(&text);
        }
        Ok(out)
    }
}

/// A decimal field of `INFO` text; 0 when absent.
fn info_f64(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Sum of `calls=` over the `cmdstat_*` lines of `INFO commandstats`.
fn command_calls(text: &str) -> u64 {
    text.lines()
        .filter(|line| line.starts_with("cmdstat_"))
        .filter_map(|line| {
            line.split([':', ','])
                .find_map(|field| field.strip_prefix("calls="))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

/// User + system CPU seconds of this process so far.
fn process_cpu_secs() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }

    #[test]
    fn info_fields_are_parsed() {
        let cpu = "# CPU\r\nused_cpu_sys:1.250000\r\nused_cpu_user:2.500000\r\n";
        assert_eq!(
            info_f64(cpu, "used_cpu_sys") + info_f64(cpu, "used_cpu_user"),
            3.75
        );
        assert_eq!(info_f64(cpu, "used_cpu_sys_children"), 0.0);
        let stats = "# Commandstats\r\ncmdstat_evalsha:calls=10,usec=5,usec_per_call=0.5,rejected_calls=0,failed_calls=0\r\ncmdstat_zadd:calls=7,usec=1\r\n";
        assert_eq!(command_calls(stats), 17);
    }

    #[test]
    fn this_process_has_cpu_time() {
        let spin: u64 = (0..2_000_000u64).map(|i| i % 7).sum();
        assert!(spin > 0);
        assert!(process_cpu_secs() > 0.0);
    }
}
