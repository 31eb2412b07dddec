//! The one pipeline every driver runs (docs/design.md §5–§7): decode → shard
//! → coalesce → ingest → flush → sink.
//!
//! `spanbuf run` (Kafka in and out, the live clock), `spanbuf replay` (NDJSON in
//! and out, the replay clock) and `spanbuf bench` (NDJSON in, records
//! discarded or produced, the live clock) differ only in their source, sink and
//! clock: each builds one [`Engine`] and feeds it. The engine owns the decoder
//! limits, the coalescing window bounds, the ingestor and the flusher (one
//! flush-lock token per process); the drivers own their loops, retries,
//! commits and clocks. Must not know Kafka or files.

use std::sync::Arc;

use bytes::Bytes;

use crate::config::Config;
use crate::flush::{CycleOutcome, FlushError, FlushSettings, Flusher};
use crate::ingest::window::WindowBounds;
use crate::ingest::{IngestError, IngestOutcome, IngestSettings, Ingestor, ShardedSpan};
use crate::metrics::Metrics;
use crate::sink::Sink;
use crate::span::{decode_span_bytes, InvalidSpan, Span};
use crate::store::Store;

/// Ingest and flush over one store, with one configuration.
pub struct Engine {
    ingestor: Ingestor,
    flusher: Flusher,
    bounds: WindowBounds,
    max_span_bytes: usize,
}

impl Engine {
    pub fn new(config: &Config, store: Arc<Store>, metrics: Arc<Metrics>) -> Self {
        Self {
            ingestor: Ingestor::new(
                store.clone(),
                IngestSettings::from_config(&config.redis, &config.buffer),
                metrics.clone(),
            ),
            flusher: Flusher::new(store, FlushSettings::from_config(config), metrics),
            bounds: window_bounds(config),
            max_span_bytes: usize::try_from(config.buffer.max_span_bytes).unwrap_or(usize::MAX),
        }
    }

    /// When a coalescing window is written.
    pub fn bounds(&self) -> &WindowBounds {
        &self.bounds
    }

    pub fn store(&self) -> &Arc<Store> {
        self.ingestor.store()
    }

    /// Decodes one input message or line (docs/design.md §2); the bytes become
    /// the span's payload without a copy.
    pub fn decode(&self, bytes: Bytes) -> Result<Span, InvalidSpan> {
        decode_span_bytes(bytes, self.max_span_bytes)
    }

    /// Writes one window of spans at clock `now` (epoch seconds). `Ok` means
    /// Redis acknowledged all of it: the caller may commit its input then.
    /// Retrying the same window after an error is safe.
    pub async fn write(
        &self,
        spans: &[ShardedSpan],
        now: f64,
    ) -> Result<IngestOutcome, IngestError> {
        self.ingestor.ingest(spans, now).await
    }

    /// Writes a window again after [`Engine::write`] failed on it (see
    /// [`Ingestor::ingest_again`]: what the failed attempt wrote counts as
    /// consumed now).
    pub async fn write_again(
        &self,
        spans: &[ShardedSpan],
        now: f64,
    ) -> Result<IngestOutcome, IngestError> {
        self.ingestor.ingest_again(spans, now).await
    }

    /// One flush cycle over `shards` at clock `now`.
    pub async fn flush_cycle<S: Sink>(
        &self,
        shards: &[u32],
        now: f64,
        sink: &S,
    ) -> Result<CycleOutcome, FlushError> {
        self.flusher.flush_cycle(shards, now, sink).await
    }

    /// Flush cycles at `now` until nothing due is left, or until a full cycle
    /// made no progress (every candidate locked by another flusher: their lock
    /// TTL decides). `each` sees every cycle's outcome.
    pub async fn flush_due<S: Sink>(
        &self,
        shards: &[u32],
        now: f64,
        sink: &S,
        mut each: impl FnMut(&CycleOutcome),
    ) -> Result<(), FlushError> {
        loop {
            let cycle = self.flush_cycle(shards, now, sink).await?;
            each(&cycle);
            let progressed = cycle.segments_flushed + cycle.segments_empty > 0;
            if !cycle.more_due || !progressed {
                return Ok(());
            }
        }
    }
}

/// The coalescing window bounds of the configuration (docs/design.md §5).
pub fn window_bounds(config: &Config) -> WindowBounds {
    WindowBounds {
        max_spans: config.worker.window_max_spans,
        max_bytes: config.worker.window_max_bytes,
        max_age: std::time::Duration::from_millis(config.worker.window_max_ms),
    }
}

/// The shard of a trace for drivers without Kafka partitions (replay,
/// bench): its id as a number modulo `shards`, stable across runs and
/// processes. The worker's shard is the partition the span came from.
pub fn shard_of(trace_id: &str, shards: u32) -> u32 {
    let n = u128::from_str_radix(trace_id, 16).unwrap_or(0);
    (n % u128::from(shards.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_is_the_trace_id_modulo() {
        assert_eq!(shard_of("0000000000000000000000000000000a", 4), 2);
        assert_eq!(shard_of("ffffffffffffffffffffffffffffffff", 1), 0);
        assert_eq!(shard_of("0000000000000000000000000000000a", 0), 0);
    }
}
