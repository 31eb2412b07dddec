//! `spanbuf replay` (docs/design.md §7): recorded spans through the real ingest and
//! flush code against Redis, without Kafka.
//!
//! Reads NDJSON, cuts it into batches, gives each batch the clock of its
//! minimum `received`, ingests it, flushes everything due at that clock, and at
//! the end (unless `--no-drain`) moves the clock past every deadline and
//! flushes the rest. Owns only the replay loop, its clock and its summary;
//! decoding, ingest and flush are the [`Engine`] every driver runs.

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;

use crate::clock::ReplayClock;
use crate::config::Config;
use crate::engine::{shard_of, Engine};
use crate::flush::{CycleOutcome, FlushError};
use crate::ingest::{IngestError, ShardedSpan};
use crate::metrics::Metrics;
use crate::sink::{NdjsonSink, Sink, SinkError};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("replay: cannot read input {path}: {source}")]
    Input {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("replay: cannot open output: {0}")]
    Output(#[from] SinkError),
    #[error("replay: {0}")]
    Store(#[from] StoreError),
    #[error("replay: {0}")]
    Ingest(#[from] IngestError),
    #[error("replay: {0}")]
    Flush(#[from] FlushError),
    #[error("replay: {0}")]
    Options(String),
}

/// Command-line options of `spanbuf replay`.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// NDJSON input; `-` = stdin.
    pub input: PathBuf,
    /// NDJSON output; `-` = stdout.
    pub output: PathBuf,
    pub batch_size: usize,
    pub shards: u32,
    /// Flush everything left at the end of input.
    pub drain: bool,
}

/// The summary line printed on stderr at the end of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplaySummary {
    pub spans_in: u64,
    pub spans_invalid: u64,
    pub segments_out: u64,
    pub records_out: u64,
    pub spans_out: u64,
    pub spans_duplicate: u64,
    pub spans_dropped: u64,
}

impl ReplaySummary {
    fn add(&mut self, cycle: &CycleOutcome) {
        self.segments_out += cycle.segments_flushed as u64;
        self.records_out += cycle.records as u64;
        self.spans_out += cycle.spans_flushed as u64;
        self.spans_duplicate += cycle.spans_duplicate as u64;
        self.spans_dropped += cycle.spans_dropped();
    }
}

/// Runs a replay with its own store connection.
pub async fn replay(
    config: &Config,
    options: &ReplayOptions,
) -> Result<ReplaySummary, ReplayError> {
    if options.batch_size == 0 || options.shards == 0 {
        return Err(ReplayError::Options(
            "--batch-size and --shards must be at least 1".into(),
        ));
    }
    // Input first: a wrong path must not truncate the output or touch Redis.
    let input: Box<dyn BufRead + Send> = if options.input.as_os_str() == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        let file = std::fs::File::open(&options.input).map_err(|source| ReplayError::Input {
            path: options.input.display().to_string(),
            source,
        })?;
        Box::new(std::io::BufReader::new(file))
    };
    let store = Arc::new(Store::connect(&config.redis, config.buffer.slice_id).await?);
    let metrics = Arc::new(Metrics::new().map_err(|e| ReplayError::Options(e.to_string()))?);
    let sink = NdjsonSink::open(&options.output)?;
    run(config, options, store, metrics, input, &sink).await
}

/// The replay loop over any input and sink (tests drive it directly).
pub async fn run<S: Sink>(
    config: &Config,
    options: &ReplayOptions,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    input: Box<dyn BufRead + Send>,
    sink: &S,
) -> Result<ReplaySummary, ReplayError> {
    let engine = Engine::new(config, store, metrics.clone());
    let shards: Vec<u32> = (0..options.shards).collect();

    let mut summary = ReplaySummary::default();
    let mut clock = ReplayClock::default();
    let mut lines = input.lines();
    loop {
        // One batch of non-blank lines.
        let mut batch = Vec::with_capacity(options.batch_size);
        let mut invalid = Vec::new();
        let mut batch_min: Option<f64> = None;
        let mut line_no = summary.spans_in;
        while batch.len() + invalid.len() < options.batch_size {
            let Some(line) = lines.next() else { break };
            let line = line.map_err(|source| ReplayError::Input {
                path: options.input.display().to_string(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            line_no += 1;
            let line_clock = match engine.decode(Bytes::from(line)) {
                Ok(span) => {
                    let c = clock.line(span.received);
                    let shard = shard_of(&span.trace_id, options.shards);
                    batch.push(ShardedSpan { shard, span });
                    c
                }
                Err(err) => {
                    tracing::debug!(line = line_no, error = %err, "invalid span");
                    invalid.push(err.reason);
                    clock.line(None)
                }
            };
            batch_min = Some(batch_min.map_or(line_clock, |m: f64| m.min(line_clock)));
        }
        let Some(batch_min) = batch_min else { break };
        summary.spans_in += (batch.len() + invalid.len()) as u64;
        summary.spans_invalid += invalid.len() as u64;
        metrics.record_invalid(invalid);

        let now = clock.batch(batch_min);
        let ingested = engine.write(&batch, now).await?;
        // Spans already buffered (a copy earlier in the batch, or the same
        // subsegment ingested before) are duplicates, not consumed twice.
        summary.spans_duplicate += ingested.spans_redelivered as u64;
        summary.spans_dropped += ingested.spans_refused as u64;
        engine
            .flush_due(&shards, now, sink, |cycle| summary.add(cycle))
            .await?;
    }

    if options.drain {
        // Every deadline is at most the last clock plus the longest timeout.
        let longest = config
            .buffer
            .timeout_secs
            .max(config.buffer.root_timeout_secs) as f64;
        let now = clock.current() + longest + 1.0;
        engine
            .flush_due(&shards, now, sink, |cycle| summary.add(cycle))
            .await?;
    }
    Ok(summary)
}
