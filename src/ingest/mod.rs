//! Ingest of one batch (docs/design.md §5 steps 2–5): group → compress → insert →
//! queue.
//!
//! Takes already decoded spans (decoding and the counting of invalid input
//! happen in the caller, which owns the raw messages) and writes them to Redis
//! through [`Store`] in a fixed number of round trips: payload sets and insert
//! calls (one pipeline on standalone Redis, two stages on a cluster), then the
//! queue update. Must not commit offsets or flush: the caller commits only
//! after [`Ingestor::ingest`] returned `Ok`.

pub mod group;
pub mod window;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

pub use group::{group, split_large, ShardedSpan, Subsegment, MAX_SUBSEGMENT_SPANS};

use crate::config::{BufferConfig, RedisConfig};
use crate::metrics::Metrics;
use crate::span::compress::{encode_members, CompressError};
use crate::span::{decode_span, InvalidSpan};
use crate::store::{Detach, InsertParams, QueueUpdate, Store, StoreError, SubsegmentWrite};

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("ingest: writing the batch to redis failed: {0}")]
    Store(#[from] StoreError),
    #[error("ingest: compressing a subsegment failed: {0}")]
    Compress(#[from] CompressError),
}

impl IngestError {
    /// A retry of the same batch may succeed (the insert is idempotent).
    pub fn is_transient(&self) -> bool {
        match self {
            IngestError::Store(e) => e.is_transient(),
            IngestError::Compress(_) => false,
        }
    }

    /// Redis is full and refused the write (see [`StoreError::is_oom`]).
    pub fn is_oom(&self) -> bool {
        matches!(self, IngestError::Store(e) if e.is_oom())
    }
}

/// A batch of raw messages after decoding (docs/design.md §5 step 1).
#[derive(Debug, Default)]
pub struct DecodedBatch {
    pub spans: Vec<ShardedSpan>,
    /// `(position in the raw batch, why it is invalid)`.
    pub invalid: Vec<(usize, InvalidSpan)>,
}

/// Decodes raw messages `(shard, bytes)` and sorts out invalid ones, counting
/// them in `spanbuf_spans_invalid_total{reason}`. Never fails: bad input is
/// data, not an error.
pub fn decode_batch<'a>(
    raw: impl IntoIterator<Item = (u32, &'a [u8])>,
    max_span_bytes: usize,
    metrics: &Metrics,
) -> DecodedBatch {
    let mut batch = DecodedBatch::default();
    for (position, (shard, bytes)) in raw.into_iter().enumerate() {
        match decode_span(bytes, max_span_bytes) {
            Ok(span) => batch.spans.push(ShardedSpan { shard, span }),
            Err(invalid) => batch.invalid.push((position, invalid)),
        }
    }
    metrics.record_invalid(batch.invalid.iter().map(|(_, e)| e.reason));
    batch
}

/// The batch with every span after the first of the same `(project, trace,
/// span id)` left out, and how many were left out. A batch can hold a span
/// twice (a redelivery mixed into it); stored raw, both copies would collapse
/// into one set member while the counters said two, and the flush would count
/// the difference as lost. Borrows the batch when it has no duplicates.
fn without_duplicates(batch: &[ShardedSpan]) -> (Cow<'_, [ShardedSpan]>, usize) {
    let mut seen: HashSet<(u64, &str, &str)> = HashSet::with_capacity(batch.len());
    let duplicate: Vec<bool> = batch
        .iter()
        .map(|s| !seen.insert((s.span.project_id, &s.span.trace_id, &s.span.span_id)))
        .collect();
    let count = duplicate.iter().filter(|&&d| d).count();
    if count == 0 {
        return (Cow::Borrowed(batch), 0);
    }
    let kept = batch
        .iter()
        .zip(duplicate)
        .filter(|(_, duplicate)| !duplicate)
        .map(|(span, _)| span.clone())
        .collect();
    (Cow::Owned(kept), count)
}

/// The ingest knobs, taken from the configuration once.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    pub ttl_secs: u64,
    pub max_segment_bytes: u64,
    pub compression_level: i32,
    pub flush_locks: bool,
    pub timeout_secs: u64,
    pub root_timeout_secs: u64,
    pub max_lifetime_secs: u64,
    /// `SPANBUF_MAX_TRACE_SPANS`; 0 = no cap.
    pub max_trace_spans: u64,
}

impl IngestSettings {
    pub fn from_config(redis: &RedisConfig, buffer: &BufferConfig) -> Self {
        Self {
            ttl_secs: redis.ttl_secs,
            max_segment_bytes: buffer.max_segment_bytes,
            compression_level: buffer.compression_level,
            flush_locks: buffer.flush_lock_ttl_secs > 0,
            timeout_secs: buffer.timeout_secs,
            root_timeout_secs: buffer.root_timeout_secs,
            max_lifetime_secs: buffer.max_segment_lifetime_secs,
            max_trace_spans: buffer.max_trace_spans,
        }
    }
}

/// What one batch did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IngestOutcome {
    /// Spans written (excluding redelivered ones).
    pub spans: usize,
    /// Spans not written because they were there already: subsegments that
    /// were already indexed (a redelivered batch), and second copies of a span
    /// within the batch.
    pub spans_redelivered: usize,
    pub subsegments: usize,
    pub detached_too_large: usize,
    pub detached_locked: usize,
    /// Earlier segments merged into another one.
    pub segments_merged: usize,
    /// Spans refused because their trace holds `SPANBUF_MAX_TRACE_SPANS`
    /// already (consumed, and counted as dropped `trace_too_large`).
    pub spans_refused: usize,
    /// Redis round trips the batch took.
    pub round_trips: u64,
}

/// Writes batches of spans into the buffer.
pub struct Ingestor {
    store: Arc<Store>,
    settings: IngestSettings,
    metrics: Arc<Metrics>,
}

impl Ingestor {
    pub fn new(store: Arc<Store>, settings: IngestSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            settings,
            metrics,
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Ingests one batch at clock `now` (epoch seconds). On `Err` nothing is
    /// guaranteed to be written; retrying the same batch is safe (with
    /// [`Ingestor::ingest_again`]).
    pub async fn ingest(
        &self,
        batch: &[ShardedSpan],
        now: f64,
    ) -> Result<IngestOutcome, IngestError> {
        self.ingest_attempt(batch, now, false).await
    }

    /// Ingests a batch again after [`Ingestor::ingest`] (or this) failed on
    /// it. The failed attempt may have been written all the same (its reply
    /// was lost, or a later stage failed), so subsegments Redis already holds
    /// count as consumed, not as redelivered: that attempt counted nothing.
    pub async fn ingest_again(
        &self,
        batch: &[ShardedSpan],
        now: f64,
    ) -> Result<IngestOutcome, IngestError> {
        self.ingest_attempt(batch, now, true).await
    }

    async fn ingest_attempt(
        &self,
        batch: &[ShardedSpan],
        now: f64,
        after_failed_attempt: bool,
    ) -> Result<IngestOutcome, IngestError> {
        if batch.is_empty() {
            return Ok(IngestOutcome::default());
        }
        let timer = self.metrics.ingest_batch_duration_seconds.start_timer();
        let trips_before = self.store.round_trips();
        let (batch, in_batch_duplicates) = without_duplicates(batch);
        let batch = batch.as_ref();
        let subsegments = split_large(group(batch), MAX_SUBSEGMENT_SPANS);

        let mut writes = Vec::with_capacity(subsegments.len());
        let mut raw_bytes = 0u64;
        let mut stored_bytes = 0u64;
        for sub in &subsegments {
            let payloads: Vec<&[u8]> = sub
                .spans
                .iter()
                .map(|&i| batch[i].span.payload.as_ref())
                .collect();
            let byte_count: u64 = payloads.iter().map(|p| p.len() as u64).sum();
            let members = encode_members(&payloads, self.settings.compression_level)?;
            raw_bytes += byte_count;
            stored_bytes += members.iter().map(|m| m.len() as u64).sum::<u64>();
            writes.push(SubsegmentWrite {
                pt: sub.pt(),
                salt: sub.salt(batch),
                parent: &sub.parent,
                has_segment_span: sub.has_segment_span(batch),
                byte_count,
                members,
                span_ids: sub
                    .spans
                    .iter()
                    .map(|&i| batch[i].span.span_id.as_str())
                    .collect(),
            });
        }

        let params = InsertParams {
            ttl_secs: self.settings.ttl_secs,
            max_segment_bytes: self.settings.max_segment_bytes,
            check_lock: self.settings.flush_locks,
            now,
            timeout_secs: self.settings.timeout_secs,
            root_timeout_secs: self.settings.root_timeout_secs,
            max_lifetime_secs: self.settings.max_lifetime_secs,
            max_trace_spans: self.settings.max_trace_spans,
        };
        let replies = self.store.insert_subsegments(&writes, &params).await?;

        // Queue: the last deadline per (shard, segment) wins; segments merged
        // away leave their queue, unless the batch queues them again.
        let mut adds: BTreeMap<u32, BTreeMap<String, f64>> = BTreeMap::new();
        let mut removes: BTreeMap<u32, HashSet<String>> = BTreeMap::new();
        let mut outcome = IngestOutcome {
            subsegments: subsegments.len(),
            spans_redelivered: in_batch_duplicates,
            ..IngestOutcome::default()
        };
        let keys = self.store.keys();
        let mut refused_sets = Vec::new();
        let mut hot_traces = BTreeSet::new();
        for ((sub, write), reply) in subsegments.iter().zip(&writes).zip(&replies) {
            if reply.refused {
                // Consumed and lost: counted, never silent. Its payload set
                // (written before the insert) goes at once.
                outcome.spans += sub.spans.len();
                outcome.spans_refused += sub.spans.len();
                refused_sets.push(keys.payload(&write.pt, &write.salt));
                hot_traces.insert(write.pt.as_str());
                continue;
            }
            if reply.redelivered && !after_failed_attempt {
                outcome.spans_redelivered += sub.spans.len();
            } else {
                outcome.spans += sub.spans.len();
            }
            match reply.detach {
                Detach::None => {}
                Detach::TooLarge => outcome.detached_too_large += 1,
                Detach::Locked => outcome.detached_locked += 1,
            }
            outcome.segments_merged += reply.merged.len();
            adds.entry(sub.shard)
                .or_default()
                .insert(reply.segment_key.clone(), reply.deadline);
            let gone = removes.entry(sub.shard).or_default();
            for id in &reply.merged {
                gone.insert(keys.segment(&write.pt, id));
            }
        }
        let updates: Vec<QueueUpdate> = adds
            .into_iter()
            .map(|(shard, members)| {
                let remove = removes
                    .remove(&shard)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|k| !members.contains_key(k))
                    .collect();
                QueueUpdate {
                    shard,
                    add: members.into_iter().collect(),
                    remove,
                }
            })
            .collect();
        self.store
            .update_queues(&updates, self.settings.ttl_secs)
            .await?;
        if !refused_sets.is_empty() {
            tracing::warn!(
                spans = outcome.spans_refused,
                traces = ?hot_traces,
                limit = self.settings.max_trace_spans,
                "traces over SPANBUF_MAX_TRACE_SPANS: spans refused and counted as dropped (trace_too_large)"
            );
            self.store
                .unlink("unlink refused payload sets", refused_sets)
                .await?;
        }

        outcome.round_trips = self.store.round_trips() - trips_before;
        self.record(&outcome, raw_bytes, stored_bytes);
        timer.observe_duration();
        Ok(outcome)
    }

    fn record(&self, outcome: &IngestOutcome, raw_bytes: u64, stored_bytes: u64) {
        let m = &self.metrics;
        m.spans_consumed_total.inc_by(outcome.spans as u64);
        m.spans_dropped_total
            .with_label_values(&["trace_too_large"])
            .inc_by(outcome.spans_refused as u64);
        m.spans_redelivered_total
            .inc_by(outcome.spans_redelivered as u64);
        m.ingest_subsegments_total
            .inc_by(outcome.subsegments as u64);
        m.subsegments_detached_total
            .with_label_values(&["too_large"])
            .inc_by(outcome.detached_too_large as u64);
        m.subsegments_detached_total
            .with_label_values(&["locked"])
            .inc_by(outcome.detached_locked as u64);
        m.segments_merged_total
            .inc_by(outcome.segments_merged as u64);
        m.ingest_payload_bytes_total
            .with_label_values(&["raw"])
            .inc_by(raw_bytes);
        m.ingest_payload_bytes_total
            .with_label_values(&["stored"])
            .inc_by(stored_bytes);
    }
}
