//! `spanbuf run`: the Kafka consumer-group worker.
//!
//! Three loops under one cancellation token:
//! - **consume**: poll batches from the input topic → decode (invalid spans
//!   counted and sent to the dead-letter topic) → stage in a coalescing window
//!   (docs/design.md §5) → when the window is full or old enough, ingest it
//!   into Redis → commit its offsets, in that order, only for partitions still
//!   held in the epoch they were consumed in (a revoked partition's staged
//!   spans are dropped uncommitted). Backpressure pauses the assigned
//!   partitions (never a sleep in the poll loop): soft when the flusher is
//!   behind, hard when Redis memory is near its limit, and while Redis is
//!   unreachable (retried with capped backoff, nothing committed).
//! - **flush**: cycles over the shards held now at the worker clock (the
//!   oldest Kafka timestamp of the latest window, carried forward in wall
//!   time; held there while a window is staged), delivering to the output
//!   topic and awaiting the broker.
//! - **http**: `/metrics`, `/health`, `/ready`.
//!
//! Shutdown (SIGTERM/SIGINT): stop consuming, write the window in hand to
//! Redis, commit what Redis acknowledged, let the flusher finish its cycle,
//! flush the producer, exit 0; a second signal exits at once. A loop that
//! ends with an error stops the others and the process exits non-zero.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::CommitMode;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod memory;

use crate::clock::{wall_ms, LiveClock};
use crate::config::Config;
use crate::engine::Engine;
use crate::http::{self, Health};
use crate::ingest::window::{PartitionMark, Window};
use crate::ingest::ShardedSpan;
use crate::kafka::consumer::{Consumed, InputConsumer};
use crate::kafka::producer::KafkaSink;
use crate::kafka::KafkaError;
use crate::metrics::Metrics;
use crate::span::InvalidSpan;
use crate::store::{Store, StoreError};
use memory::MemoryWatch;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("worker: {0}")]
    Kafka(#[from] KafkaError),
    #[error("worker: redis would evict buffered spans when full: {0}; set maxmemory-policy noeviction (spanbuf pauses consumption before the limit, SPANBUF_MAX_REDIS_MEMORY_PERCENT)")]
    EvictingRedis(String),
    #[error("worker: {0}")]
    Store(#[from] StoreError),
    #[error("worker: {0}")]
    Ingest(#[from] crate::ingest::IngestError),
    #[error("worker: http endpoint failed: {0}")]
    Http(#[from] http::HttpError),
    #[error("worker: cannot register metrics: {0}")]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("worker: a loop task failed to run: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("worker: shutdown took longer than {0:?}; exiting with work in hand")]
    ShutdownTimeout(Duration),
}

/// Backoff for Redis and dead-letter retries: 100 ms doubling to 5 s.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The least time a new partition's shard waits to be caught up with before
/// it is flushed anyway.
const CATCH_UP_LIMIT_MIN: Duration = Duration::from_secs(60);
/// How often the data-loss marker is checked.
const MARKER_CHECK_EVERY: Duration = Duration::from_secs(2);

/// State shared by the loops.
struct Shared {
    config: Config,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    store: Arc<Store>,
    /// Ingest and flush; one flush-lock token for the process.
    engine: Engine,
    sink: Arc<KafkaSink>,
    clock: LiveClock,
    /// Largest flush lag of the last cycle, milliseconds (soft backpressure).
    flush_lag_ms: AtomicU64,
}

/// Runs the worker until `shutdown` is cancelled (or a loop fails).
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let metrics = Arc::new(Metrics::new()?);
    let health = Health::new(Duration::from_secs(config.worker.max_loop_stall_secs));

    let listener = tokio::net::TcpListener::bind(config.http.addr)
        .await
        .map_err(|source| http::HttpError::Bind {
            addr: config.http.addr,
            source,
        })?;
    let http_task = tokio::spawn(http::serve_listener(
        listener,
        metrics.clone(),
        health.clone(),
        shutdown.clone(),
    ));

    let store = Arc::new(connect_store(&config, &health, &shutdown).await?);
    check_redis_memory(&config, &store).await?;
    let sink = Arc::new(KafkaSink::new(&config, metrics.clone())?);
    let mut topics = vec![
        config.kafka.input_topic.as_str(),
        config.kafka.output_topic.as_str(),
    ];
    if let Some(dlq) = &config.kafka.dlq_topic {
        topics.push(dlq);
    }
    sink.check_topics(&topics, Duration::from_secs(10)).await?;
    sink.check_output_limit(Duration::from_secs(10)).await?;
    health.set_kafka_ok(true);

    let consumer = Arc::new(InputConsumer::new(&config)?);
    let engine = Engine::new(&config, store.clone(), metrics.clone());
    let shared = Arc::new(Shared {
        engine,
        config,
        metrics,
        health: health.clone(),
        store,
        sink,
        clock: LiveClock::default(),
        flush_lag_ms: AtomicU64::new(0),
    });

    // Each loop stops the others when it ends, so a failure is never silent.
    let consume_stop = CancellationToken::new();
    let flush_stop = CancellationToken::new();
    health.register_loop("consume");
    health.register_loop("flush");
    let consume_task = tokio::spawn(consume_loop(
        shared.clone(),
        consumer.clone(),
        consume_stop.clone(),
    ));
    let flush_task = tokio::spawn(flush_loop(
        shared.clone(),
        consumer.clone(),
        flush_stop.clone(),
    ));

    // Order of the drain: consume first (the batch in hand reaches Redis and
    // is committed), then the flusher finishes its cycle, then the producer.
    let mut consume_watch = consume_task;
    let mut flush_watch = flush_task;
    let result: Result<(), WorkerError> = tokio::select! {
        () = shutdown.cancelled() => {
            let timeout = Duration::from_secs(shared.config.worker.shutdown_timeout_secs);
            drain(consume_stop, &mut consume_watch, flush_stop, &mut flush_watch, timeout).await
        }
        ended = &mut consume_watch => {
            flush_stop.cancel();
            let flushed = flush_watch.await;
            ended?.and(flushed?)
        }
        ended = &mut flush_watch => {
            consume_stop.cancel();
            let consumed = consume_watch.await;
            ended?.and(consumed?)
        }
    };
    health.unregister_loop("consume");
    health.unregister_loop("flush");
    shutdown.cancel();
    if let Err(err) = shared.sink.flush(Duration::from_secs(10)).await {
        tracing::warn!(error = %err, "flushing the producer at exit");
    }
    match http_task.await {
        Ok(Err(err)) => tracing::warn!(error = %err, "http endpoint"),
        Err(err) => tracing::warn!(error = %err, "http task"),
        Ok(Ok(())) => {}
    }
    result
}

async fn drain(
    consume_stop: CancellationToken,
    consume: &mut JoinHandle<Result<(), WorkerError>>,
    flush_stop: CancellationToken,
    flush: &mut JoinHandle<Result<(), WorkerError>>,
    timeout: Duration,
) -> Result<(), WorkerError> {
    tracing::info!("shutting down: finishing the batch in hand, then the flush cycle");
    let work = async {
        consume_stop.cancel();
        let consumed = consume.await;
        flush_stop.cancel();
        let flushed = flush.await;
        consumed?.and(flushed?)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(WorkerError::ShutdownTimeout(timeout)),
    }
}

/// Logs what Redis's memory settings mean for the buffer, and refuses to run
/// on a Redis that evicts keys when full: every evicted key is a lost span,
/// silently. No `maxmemory` is accepted (hard backpressure is then off).
async fn check_redis_memory(config: &Config, store: &Store) -> Result<(), WorkerError> {
    let nodes = store.memory_settings().await?;
    let evicting: Vec<String> = nodes
        .iter()
        .filter(|n| n.evicts())
        .map(|n| {
            format!(
                "maxmemory {} bytes with maxmemory-policy {}",
                n.maxmemory, n.policy
            )
        })
        .collect();
    if !evicting.is_empty() {
        return Err(WorkerError::EvictingRedis(evicting.join("; ")));
    }
    let percent = config.worker.max_redis_memory_percent;
    let reserve = memory::window_cost(&crate::engine::window_bounds(config));
    for node in &nodes {
        let pause_at = MemoryWatch::pause_at(percent, reserve, node.maxmemory);
        tracing::info!(
            maxmemory = node.maxmemory,
            policy = %node.policy,
            window_reserve = reserve,
            pauses_above = pause_at,
            "redis memory settings"
        );
        if pause_at == Some(0) {
            tracing::warn!(
                maxmemory = node.maxmemory,
                window_reserve = reserve,
                "one coalescing window (SPANBUF_WINDOW_MAX_BYTES, SPANBUF_WINDOW_MAX_SPANS) needs more room than SPANBUF_MAX_REDIS_MEMORY_PERCENT of this maxmemory: consumption pauses whenever Redis holds anything; lower the window or raise maxmemory"
            );
        }
    }
    if nodes.iter().any(|n| n.maxmemory == 0) {
        tracing::warn!(
            "redis has no maxmemory: hard backpressure (SPANBUF_MAX_REDIS_MEMORY_PERCENT) cannot engage, and Redis grows until the machine runs out of memory"
        );
    } else if config.worker.max_redis_memory_percent == 0 {
        tracing::warn!("SPANBUF_MAX_REDIS_MEMORY_PERCENT is 0: hard backpressure is off");
    }
    Ok(())
}

/// Connects to Redis, retrying transient failures with backoff until
/// `shutdown`; a non-transient failure (e.g. scripts refused) is fatal.
async fn connect_store(
    config: &Config,
    health: &Health,
    shutdown: &CancellationToken,
) -> Result<Store, WorkerError> {
    let mut backoff = BACKOFF_START;
    loop {
        match Store::connect(&config.redis, config.buffer.slice_id).await {
            Ok(store) => {
                health.set_redis_ok(true);
                return Ok(store);
            }
            Err(err) if err.is_transient() && !shutdown.is_cancelled() => {
                health.set_redis_ok(false);
                tracing::warn!(error = %err, retry_in = ?backoff, "redis not reachable at start; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return Err(err.into()),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// Why consumption is paused, if it is.
fn pause_reason(shared: &Shared, memory: &MemoryWatch) -> Option<&'static str> {
    let w = &shared.config.worker;
    let lag_secs = shared.flush_lag_ms.load(Ordering::Relaxed) as f64 / 1000.0;
    if w.max_flush_lag_secs > 0 && lag_secs > w.max_flush_lag_secs as f64 {
        return Some("flush_lag");
    }
    if memory.over() {
        return Some("redis_memory");
    }
    None
}

/// Watches the data-loss marker: a key spanbuf keeps in Redis (with the
/// buffer's TTL, refreshed every check). If it vanishes, or another process
/// had to create it anew, Redis lost what it held — restarted without
/// persistence, flushed, or evicted keys — and the spans buffered there are
/// gone. Nothing can recover them; this makes the loss visible
/// (`spanbuf_redis_data_loss_total` and an error log) instead of silent.
/// Standalone Redis: exact. Redis Cluster: the marker lives on one primary,
/// so only a loss on that node is seen.
struct DataLossMarker {
    token: String,
    /// The value last seen; `None` before the first successful check.
    seen: Option<String>,
}

impl DataLossMarker {
    fn new() -> Self {
        Self {
            token: format!("{:032x}", rand::random::<u128>()),
            seen: None,
        }
    }

    async fn check(&mut self, shared: &Shared) {
        let ttl = shared.config.redis.ttl_secs;
        let (created, value) = match shared.store.touch_marker(&self.token, ttl).await {
            Ok(reply) => reply,
            Err(err) => {
                tracing::warn!(error = %err, "checking the data-loss marker");
                return;
            }
        };
        if let Some(seen) = &self.seen {
            if created || *seen != value {
                shared.metrics.redis_data_loss_total.inc();
                tracing::error!(
                    "redis lost the buffer (the marker key was gone): spans buffered before are lost; is persistence (AOF) on, and maxmemory-policy noeviction?"
                );
            }
        }
        self.seen = Some(value);
    }
}

/// Health owns the `spanbuf_backpressure_active` gauge (exported per scrape).
fn set_backpressure(shared: &Shared, reason: &'static str, active: bool) {
    shared.health.set_backpressure(reason, active);
}

async fn consume_loop(
    shared: Arc<Shared>,
    consumer: Arc<InputConsumer>,
    stop: CancellationToken,
) -> Result<(), WorkerError> {
    let batch_max = shared.config.kafka.batch_max_spans;
    let batch_wait = Duration::from_millis(shared.config.kafka.batch_max_ms);
    let bounds = *shared.engine.bounds();
    let mut window = Window::default();
    let mut carried: Vec<Consumed> = Vec::new();
    let mut paused_for: Option<&'static str> = None;
    let mut memory = MemoryWatch::new(
        shared.config.worker.max_redis_memory_percent,
        memory::window_cost(&bounds),
    );
    let mut marker_checked = Instant::now() - MARKER_CHECK_EVERY;
    let mut marker = DataLossMarker::new();

    // A newly assigned partition's shard is flushed only once what the
    // previous owner left (or a backlog) is in Redis (docs/design.md §7).
    let b = &shared.config.buffer;
    let catch_up_limit =
        CATCH_UP_LIMIT_MIN.max(Duration::from_secs(b.timeout_secs.max(b.root_timeout_secs)));
    while !stop.is_cancelled() {
        shared.health.progress("consume");
        shared
            .health
            .set_assigned_partitions(consumer.assignment().partitions());
        consumer.assignment().promote(
            |p| window.partitions().contains_key(&p) || carried.iter().any(|m| m.partition == p),
            catch_up_limit,
        );

        // A due window goes to Redis first (also while paused: it is bounded,
        // and holding it would hold the clock).
        if window.is_due(&bounds, Instant::now()) {
            memory.wrote(memory::written_cost(window.span_count(), window.bytes()));
            write_window(
                &shared,
                &consumer,
                &mut window,
                &mut carried,
                CommitMode::Async,
            )
            .await?;
            continue;
        }

        // Backpressure: pause, keep serving the group, resume when it clears.
        // Hard backpressure keeps room for the next window (worker/memory.rs).
        if memory.check_due(Instant::now()) {
            match shared.store.memory().await {
                Ok(nodes) => memory.sampled(nodes, Instant::now()),
                Err(err) => {
                    memory.sample_failed(Instant::now());
                    tracing::warn!(error = %err, "reading redis memory");
                }
            }
        }
        if marker_checked.elapsed() >= MARKER_CHECK_EVERY {
            marker_checked = Instant::now();
            marker.check(&shared).await;
        }
        let reason = pause_reason(&shared, &memory);
        if reason != paused_for {
            if let Some(old) = paused_for {
                set_backpressure(&shared, old, false);
            }
            if let Some(new) = reason {
                tracing::warn!(reason = new, "pausing consumption");
                shared
                    .metrics
                    .backpressure_pauses_total
                    .with_label_values(&[new])
                    .inc();
                set_backpressure(&shared, new, true);
            } else {
                tracing::info!("resuming consumption");
            }
            consumer.set_paused(reason.is_some())?;
            paused_for = reason;
        }
        if paused_for.is_some() {
            // Newly assigned partitions start unpaused: pause them too.
            consumer.set_paused(true)?;
            let wait = window
                .due_in(&bounds, Instant::now())
                .map_or(Duration::from_millis(200), |d| {
                    d.min(Duration::from_millis(200))
                });
            tokio::select! {
                () = stop.cancelled() => break,
                message = consumer.idle_poll(wait) => carried.extend(message),
            }
            continue;
        }

        // Poll no longer than the window may wait, and no more than fits.
        let wait = window
            .due_in(&bounds, Instant::now())
            .map_or(batch_wait, |d| d.min(batch_wait));
        let room = window.room(&bounds).clamp(1, batch_max);
        let byte_room = window.byte_room(&bounds).max(1);
        let batch = match consumer
            .next_batch(
                std::mem::take(&mut carried),
                room,
                byte_room,
                wait,
                wait,
                &stop,
            )
            .await
        {
            Ok(batch) => batch,
            Err(err) => {
                shared.health.set_kafka_ok(false);
                tracing::warn!(error = %err, "consuming failed; retrying");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(BACKOFF_START) => continue,
                }
            }
        };
        shared.health.set_kafka_ok(true);
        stage_batch(&shared, &consumer, &mut window, batch).await?;
    }
    // Shutdown: the window in hand always reaches Redis; the commit is
    // synchronous so it is on the broker before we leave.
    if !window.is_empty() {
        write_window(
            &shared,
            &consumer,
            &mut window,
            &mut carried,
            CommitMode::Sync,
        )
        .await?;
    }
    Ok(())
}

/// Decode → dead-letter → stage one polled batch. Messages of a partition no
/// longer held (revoked during the poll) are left for its new owner.
async fn stage_batch(
    shared: &Shared,
    consumer: &InputConsumer,
    window: &mut Window,
    batch: Vec<Consumed>,
) -> Result<(), WorkerError> {
    if batch.is_empty() {
        return Ok(());
    }
    shared
        .metrics
        .messages_consumed_total
        .inc_by(batch.len() as u64);
    let assignment = consumer.assignment();
    let mut marks: BTreeMap<i32, (i64, u64)> = BTreeMap::new();
    let mut spans = Vec::with_capacity(batch.len());
    let mut invalid: Vec<(&Consumed, InvalidSpan)> = Vec::new();
    let mut oldest = i64::MAX;
    let mut staged = 0;
    for message in &batch {
        let Some(epoch) = assignment.epoch(message.partition) else {
            continue;
        };
        let mark = marks
            .entry(message.partition)
            .or_insert((message.offset + 1, epoch));
        mark.0 = mark.0.max(message.offset + 1);
        oldest = oldest.min(message.timestamp_ms.unwrap_or_else(wall_ms));
        staged += 1;
        match shared.engine.decode(message.payload.clone()) {
            Ok(span) => spans.push(ShardedSpan {
                shard: u32::try_from(message.partition).unwrap_or(0),
                span,
            }),
            Err(err) => invalid.push((message, err)),
        }
    }
    if staged == 0 {
        return Ok(());
    }
    // The clock holds at the oldest staged span until the window is in Redis.
    shared.clock.hold(oldest);
    shared
        .metrics
        .record_invalid(invalid.iter().map(|(_, e)| e.reason));
    for (message, err) in &invalid {
        tracing::debug!(partition = message.partition, offset = message.offset, error = %err, "invalid span");
    }
    if let Some(dlq) = &shared.config.kafka.dlq_topic {
        forward_invalid(shared, dlq, &invalid).await?;
    }
    let released = window.stage(
        spans,
        staged,
        oldest,
        marks
            .into_iter()
            .map(|(p, (next_offset, epoch))| (p, PartitionMark { next_offset, epoch })),
    );
    record_released(shared, released);
    Ok(())
}

/// Staged spans dropped because their partition was revoked: the new owner
/// (or this process again, under a new epoch) reads them from the commit.
fn record_released(shared: &Shared, spans: usize) {
    if spans > 0 {
        tracing::info!(
            spans,
            "staged spans of revoked partitions left to their new owner"
        );
        shared
            .metrics
            .window_spans_released_total
            .inc_by(spans as u64);
    }
}

/// Writes the window to Redis, then commits its offsets. Staged spans of a
/// partition revoked since are dropped uncommitted. Redis failures are
/// retried with backoff (consumption paused meanwhile, nothing committed)
/// until they clear; only then are the offsets committed.
async fn write_window(
    shared: &Shared,
    consumer: &InputConsumer,
    window: &mut Window,
    carried: &mut Vec<Consumed>,
    mode: CommitMode,
) -> Result<(), WorkerError> {
    let assignment = consumer.assignment();
    record_released(shared, window.drop_revoked(|p| assignment.epoch(p)));
    if window.is_empty() {
        window.clear();
        shared.clock.release();
        return Ok(());
    }
    let now = LiveClock::window_clock(window.oldest_ms().unwrap_or_else(wall_ms));
    shared
        .metrics
        .window_spans
        .observe(window.span_count() as f64);

    let mut backoff = BACKOFF_START;
    let mut paused = false;
    loop {
        // After a failed attempt the window may be in Redis all the same (a
        // lost reply): the retry counts what it finds there as consumed.
        let written = if paused {
            shared.engine.write_again(window.spans(), now).await
        } else {
            shared.engine.write(window.spans(), now).await
        };
        match written {
            Ok(_) => break,
            Err(err) if err.is_transient() => {
                shared.health.set_redis_ok(false);
                if err.is_oom() {
                    // Only flushing frees memory. A held clock lets nothing
                    // newer than this window fall due, and a shard not caught
                    // up is not flushed at all: both would wait for ever for
                    // a window that waits for memory. Run the clock on in
                    // wall time and flush every shard; segments this window
                    // extends may go out without it (the price of a full
                    // Redis; hard backpressure is there to avoid it).
                    let held = shared.clock.release();
                    let gated = consumer.assignment().give_up_catching_up();
                    if held || gated {
                        shared.metrics.redis_full_total.inc();
                        tracing::warn!("redis is full (OOM): the flush clock runs on and every shard flushes while the window waits, so that flushing frees memory");
                    }
                }
                if !paused {
                    tracing::warn!(error = %err, "redis unavailable; pausing consumption and retrying the window");
                    shared
                        .metrics
                        .backpressure_pauses_total
                        .with_label_values(&["redis_down"])
                        .inc();
                    set_backpressure(shared, "redis_down", true);
                    consumer.set_paused(true)?;
                    paused = true;
                }
                // Keep serving the group while waiting. A message that still
                // arrives (a partition assigned meanwhile) goes to the next
                // window: dropping it would let a later commit skip it.
                carried.extend(consumer.idle_poll(backoff).await);
                consumer.set_paused(true)?;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(err) => return Err(err.into()),
        }
    }
    shared.health.set_redis_ok(true);
    if paused {
        tracing::info!("redis is back; resuming consumption");
        set_backpressure(shared, "redis_down", false);
        consumer.set_paused(false)?;
    }
    let offsets = window
        .partitions()
        .iter()
        .map(|(&p, mark)| (p, mark.next_offset, mark.epoch));
    let commit = if crate::fault::no_commit() {
        Ok(0)
    } else {
        consumer.commit(offsets, mode)
    };
    match commit {
        Ok(_) => shared
            .metrics
            .offset_commits_total
            .with_label_values(&["ok"])
            .inc(),
        Err(err) => {
            // The data is in Redis; a later commit covers these offsets, or
            // the next owner re-ingests them idempotently.
            shared
                .metrics
                .offset_commits_total
                .with_label_values(&["error"])
                .inc();
            tracing::warn!(error = %err, "committing offsets failed");
        }
    }
    window.clear();
    shared.clock.release();
    Ok(())
}

/// Sends invalid input to the dead-letter topic (original bytes; reason,
/// source partition and offset in headers), retrying each for a bounded time
/// ([`forward_one`]): the offsets are committed past these messages only
/// after that.
/// Dead letters in flight at once: each is awaited, but not one by one.
const DLQ_IN_FLIGHT: usize = 64;

async fn forward_invalid(
    shared: &Shared,
    topic: &str,
    invalid: &[(&Consumed, InvalidSpan)],
) -> Result<(), WorkerError> {
    use futures::StreamExt;
    let mut pending = futures::stream::FuturesUnordered::new();
    for (message, err) in invalid {
        if pending.len() >= DLQ_IN_FLIGHT {
            if let Some(Err(fatal)) = pending.next().await {
                return Err(WorkerError::from(fatal));
            }
        }
        pending.push(forward_one(shared, topic, message, err));
    }
    while let Some(done) = pending.next().await {
        done?;
    }
    Ok(())
}

/// Forwards one invalid message to the dead-letter topic, retrying for at
/// most the producer's message timeout: the batch (and with it the window's
/// clock) waits for its dead letters, so a dead-letter topic that cannot take
/// them (deleted, not writable, too small a limit) must not hold consumption
/// for good. A message given up on is counted
/// (`spanbuf_dlq_records_dropped_total{reason}`) and logged with its
/// partition and offset; its span is already counted as invalid.
/// A producer that can never deliver again (fenced) ends the worker instead:
/// the batch stays uncommitted and a restarted worker forwards it.
async fn forward_one(
    shared: &Shared,
    topic: &str,
    message: &Consumed,
    err: &InvalidSpan,
) -> Result<(), KafkaError> {
    let partition = message.partition.to_string();
    let offset = message.offset.to_string();
    let headers: [(&str, &[u8]); 4] = [
        ("spanbuf-invalid-reason", err.reason.as_str().as_bytes()),
        ("spanbuf-invalid-detail", err.detail.as_bytes()),
        ("spanbuf-source-partition", partition.as_bytes()),
        ("spanbuf-source-offset", offset.as_bytes()),
    ];
    let give_up_at = tokio::time::Instant::now() + shared.sink.message_timeout();
    let mut backoff = BACKOFF_START;
    loop {
        let (reason, error) = match shared
            .sink
            .produce_raw(topic, None, &message.payload, &headers)
            .await
        {
            Ok(()) => {
                shared.metrics.dlq_records_total.inc();
                return Ok(());
            }
            // Can never succeed: retrying would block the partition.
            Err(e) if e.is_message_too_large() => {
                shared
                    .metrics
                    .produce_errors_total
                    .with_label_values(&["too_large"])
                    .inc();
                ("too_large", e)
            }
            Err(e) if e.is_invalid_record() => ("rejected", e),
            Err(e) => {
                // A fenced producer can never deliver: end the worker.
                shared.sink.check_fatal()?;
                if tokio::time::Instant::now() + backoff >= give_up_at {
                    ("gave_up", e)
                } else {
                    tracing::warn!(error = %e, retry_in = ?backoff, "dead-letter produce failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
        };
        shared
            .metrics
            .dlq_records_dropped_total
            .with_label_values(&[reason])
            .inc();
        tracing::error!(partition = message.partition, offset = message.offset, %reason, error = %error,
            "invalid span not forwarded to the dead-letter topic; counted, and consumption goes on");
        return Ok(());
    }
}

async fn flush_loop(
    shared: Arc<Shared>,
    consumer: Arc<InputConsumer>,
    stop: CancellationToken,
) -> Result<(), WorkerError> {
    let interval = Duration::from_millis(shared.config.worker.flush_interval_ms);
    let mut backoff = BACKOFF_START;
    while !stop.is_cancelled() {
        shared
            .metrics
            .partitions_catching_up
            .set(consumer.assignment().catching_up() as i64);
        let shards = consumer.assignment().shards();
        let wait = match shared
            .engine
            .flush_cycle(&shards, shared.clock.now(), shared.sink.as_ref())
            .await
        {
            Ok(cycle) => {
                shared.health.progress("flush");
                // Also when deliveries failed: a broker outage grows the lag,
                // and soft backpressure then keeps the data in Kafka.
                shared
                    .flush_lag_ms
                    .store((cycle.max_lag_secs * 1000.0) as u64, Ordering::Relaxed);
                if cycle.records_undelivered > 0 {
                    shared.sink.check_fatal()?;
                    tracing::warn!(
                        records = cycle.records_undelivered,
                        error = cycle.delivery_error.as_deref().unwrap_or(""),
                        retry_in = ?backoff,
                        "delivery failed; those segments stay buffered (and locked by this worker) for the retry"
                    );
                    let wait = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    wait
                } else {
                    backoff = BACKOFF_START;
                    if cycle.more_due {
                        Duration::ZERO
                    } else {
                        interval
                    }
                }
            }
            Err(err) => {
                // A producer in a fatal state fails every later delivery:
                // stop (the supervisor restarts us) rather than spin.
                shared.sink.check_fatal()?;
                tracing::warn!(error = %err, retry_in = ?backoff, "flush cycle failed; segments stay buffered");
                let wait = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                wait
            }
        };
        if !wait.is_zero() {
            // Shutdown only between cycles: a cycle always finishes its cleanup.
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
    Ok(())
}
