//! The flusher (docs/design.md §6): due candidates → lock → load → build → deliver →
//! precise cleanup, for the shards this process owns.
//!
//! One [`Flusher::flush_cycle`] handles up to `SPANBUF_MAX_FLUSH_SEGMENTS`
//! segments, and no more ingested bytes than `SPANBUF_MAX_FLUSH_BYTES` (at
//! least one segment), in a fixed number of Redis round trips (queues; lock+snapshot;
//! payload pages; cleanup; unlink+dequeue), whatever the number of segments.
//! Nothing is deleted before the sink confirmed delivery, and cleanup removes
//! exactly the snapshot that was delivered: spans that arrived after the load
//! stay buffered. Loss is counted once, by the cleanup that removes the data.
//! Must not talk to Redis except through [`Store`], nor encode for Kafka.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;

use crate::config::Config;
use crate::fault;
use crate::metrics::Metrics;
use crate::sink::{Delivery, Sink, SinkError, Undelivered};
use crate::span::compress::decode_member;
use crate::span::record::{build_records, BuiltSegment, FlushedSegment, SegmentPayloads};
use crate::store::{
    DeliveredSalt, DoneRequest, Keys, LoadRequest, Loaded, LockTimes, Store, StoreError,
};

#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("flush: redis failed: {0}")]
    Store(#[from] StoreError),
    #[error("flush: delivering {records} records failed, segments stay buffered: {source}")]
    Sink {
        records: usize,
        #[source]
        source: SinkError,
    },
}

/// The flush knobs, taken from the configuration once.
#[derive(Debug, Clone)]
pub struct FlushSettings {
    pub max_flush_segments: usize,
    /// 0 = locks disabled.
    pub lock_ttl_ms: u64,
    /// How long a lock stays after its last refresh, at least the lock TTL
    /// ([`LockTimes`]).
    pub lock_hold_ms: u64,
    pub max_segment_bytes: usize,
    pub page_size: usize,
    /// `SPANBUF_MAX_FLUSH_BYTES`: the cycle's byte budget.
    pub max_flush_bytes: u64,
    /// `SPANBUF_DELIVERED_TTL_SECS`: lifetime of the delivered record; 0 = off.
    pub delivered_ttl_secs: u64,
    /// Bound on one payload member's decompressed size
    /// ([`crate::span::compress::max_member_bytes`]).
    pub max_member_bytes: usize,
}

impl FlushSettings {
    pub fn from_config(config: &Config) -> Self {
        // What builds before coalescing windows wrote: one frame per
        // subsegment of a poll batch of maximal spans.
        let batch_bytes =
            (config.kafka.batch_max_spans as u64).saturating_mul(config.buffer.max_span_bytes);
        Self {
            max_flush_segments: config.buffer.max_flush_segments,
            lock_ttl_ms: config.buffer.flush_lock_ttl_secs * 1000,
            lock_hold_ms: config
                .redis
                .ttl_secs
                .max(config.buffer.flush_lock_ttl_secs)
                .saturating_mul(1000),
            // Within the output's message limit when the operator lowered it.
            max_segment_bytes: usize::try_from(crate::kafka::producer::record_chunk_bytes(config))
                .unwrap_or(usize::MAX),
            page_size: config.buffer.segment_page_size,
            max_flush_bytes: config.buffer.max_flush_bytes,
            delivered_ttl_secs: config.buffer.delivered_ttl_secs,
            max_member_bytes: crate::span::compress::max_member_bytes(
                usize::try_from(config.buffer.max_span_bytes).unwrap_or(usize::MAX),
                usize::try_from(batch_bytes.max(config.buffer.max_segment_bytes))
                    .unwrap_or(usize::MAX),
            ),
        }
    }
}

/// What one cycle did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CycleOutcome {
    /// Due candidates read from the queues.
    pub due: usize,
    /// Whether some shard had more due segments than this cycle took.
    pub more_due: bool,
    pub contended: usize,
    pub segments_flushed: usize,
    pub segments_empty: usize,
    pub records: usize,
    pub spans_flushed: usize,
    pub spans_duplicate: usize,
    pub spans_dropped_expired: u64,
    pub spans_dropped_unreadable: u64,
    /// Spans of records the sink can never deliver (too large, not
    /// encodable), by drop reason; their segments were cleaned up.
    pub spans_dropped_rejected: Vec<(&'static str, u64)>,
    /// Records the sink could not deliver now; their segments stay buffered
    /// (and locked by this flusher until the next cycle takes them again).
    pub records_undelivered: usize,
    /// The first delivery failure of the cycle, for the log.
    pub delivery_error: Option<String>,
    /// Redis round trips of the cycle.
    pub round_trips: u64,
    /// Ingested bytes of the segments this cycle took (its byte budget
    /// counts these).
    pub bytes_loaded: u64,
    /// Due segments locked but left for the next cycle: over the byte budget.
    pub over_budget: usize,
    /// The largest flush lag over the shards (now minus the oldest overdue
    /// deadline; 0 when nothing is overdue): the soft backpressure signal.
    pub max_lag_secs: f64,
    /// Per flushed segment: the time its records were delivered minus its
    /// queue deadline, seconds (negative only if clocks disagree).
    pub lateness_secs: Vec<f64>,
}

impl CycleOutcome {
    /// Spans counted as dropped by this cycle, every reason.
    pub fn spans_dropped(&self) -> u64 {
        self.spans_dropped_expired
            + self.spans_dropped_unreadable
            + self
                .spans_dropped_rejected
                .iter()
                .map(|(_, n)| n)
                .sum::<u64>()
    }

    fn add_rejected(&mut self, reason: &'static str, spans: u64) {
        match self
            .spans_dropped_rejected
            .iter_mut()
            .find(|(r, _)| *r == reason)
        {
            Some((_, n)) => *n += spans,
            None => self.spans_dropped_rejected.push((reason, spans)),
        }
    }
}

/// One due segment as the cycle carries it from load to cleanup.
struct Candidate {
    queue_key: String,
    segment_key: String,
    score: String,
    pt: String,
    project_id: u64,
    trace_id: String,
    root: String,
}

/// A locked segment's snapshot: candidate index, `ic`, segment id, sorted
/// salts.
/// (candidate, ingested spans, segment id, delivered record, sorted salts).
type Snapshot = (usize, Option<u64>, String, String, Vec<String>);

/// A loaded segment, ready to build.
struct LoadedSegment {
    candidate: usize,
    segment_id: String,
    ingested_spans: Option<u64>,
    /// The trace's delivered record (span ids, each followed by a comma).
    delivered: String,
    /// Sorted salts of the snapshot, with what their payload sets held.
    salts: Vec<DeliveredSalt>,
    payloads: Vec<Bytes>,
    unreadable: u64,
}

/// Flushes due segments of the owned shards to a [`Sink`].
pub struct Flusher {
    store: Arc<Store>,
    settings: FlushSettings,
    metrics: Arc<Metrics>,
    /// Unique to this flusher: the value of the locks it takes.
    token: String,
}

impl Flusher {
    pub fn new(store: Arc<Store>, settings: FlushSettings, metrics: Arc<Metrics>) -> Self {
        let token = format!("{:032x}", rand::random::<u128>());
        Self {
            store,
            settings,
            metrics,
            token,
        }
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// One cycle over `shards` at clock `now` (epoch seconds).
    pub async fn flush_cycle<S: Sink>(
        &self,
        shards: &[u32],
        now: f64,
        sink: &S,
    ) -> Result<CycleOutcome, FlushError> {
        let timer = self.metrics.flush_cycle_duration_seconds.start_timer();
        let trips_before = self.store.round_trips();
        let result = self.cycle(shards, now, sink).await;
        timer.observe_duration();
        match result {
            Ok(mut outcome) => {
                outcome.round_trips = self.store.round_trips() - trips_before;
                Ok(outcome)
            }
            Err(err) => {
                let stage = match err {
                    FlushError::Store(_) => "redis",
                    FlushError::Sink { .. } => "sink",
                };
                self.metrics
                    .flush_failures_total
                    .with_label_values(&[stage])
                    .inc();
                Err(err)
            }
        }
    }

    /// The lock TTL and hold for the scripts ([`LockTimes`]).
    fn lock_times(&self) -> LockTimes {
        LockTimes {
            ttl_ms: self.settings.lock_ttl_ms,
            hold_ms: self.settings.lock_hold_ms,
        }
    }

    /// Runs `delivery` while extending the held locks every third of their
    /// TTL, so a delivery slower than the TTL keeps its segments (see
    /// `lua/lock_refresh.lua`). A failed refresh is logged; the delivery goes
    /// on either way (its records are already on their way).
    async fn refreshing_locks<T>(
        &self,
        held: &[LoadRequest<'_>],
        delivery: impl std::future::Future<Output = T>,
    ) -> T {
        let ttl_ms = self.settings.lock_ttl_ms;
        if ttl_ms == 0 || held.is_empty() {
            return delivery.await;
        }
        let every = std::time::Duration::from_millis((ttl_ms / 3).max(1));
        tokio::pin!(delivery);
        loop {
            tokio::select! {
                out = &mut delivery => return out,
                () = tokio::time::sleep(every) => {
                    match self.store.refresh_locks(held, &self.token, self.lock_times()).await {
                        Ok(kept) => {
                            self.metrics.flush_lock_refreshes_total.inc();
                            if kept < held.len() {
                                tracing::warn!(lost = held.len() - kept, "flush locks expired during a delivery; another flusher may deliver those segments again (same flush id unless they changed)");
                            }
                        }
                        Err(err) => tracing::warn!(error = %err, "refreshing flush locks"),
                    }
                }
            }
        }
    }

    /// Steps 3–4: every payload set of the locked snapshots, decompressed,
    /// then the records of each segment (in segment order; each segment's
    /// records are contiguous, `chunks` of them).
    async fn load_and_build(
        &self,
        candidates: &[Candidate],
        snapshots: Vec<Snapshot>,
    ) -> Result<
        (
            Vec<LoadedSegment>,
            Vec<FlushedSegment>,
            Vec<(BuiltSegment, usize)>,
        ),
        FlushError,
    > {
        let sets: Vec<(String, String)> = snapshots
            .iter()
            .flat_map(|(i, _, _, _, salts)| {
                salts.iter().map(|s| (candidates[*i].pt.clone(), s.clone()))
            })
            .collect();
        let mut contents = self
            .store
            .load_payload_sets(&sets, self.settings.page_size)
            .await?
            .into_iter();

        let mut segments = Vec::with_capacity(snapshots.len());
        for (candidate, ingested_spans, segment_id, delivered, salts) in snapshots {
            let mut seg = LoadedSegment {
                candidate,
                segment_id,
                ingested_spans,
                delivered,
                salts: Vec::with_capacity(salts.len()),
                payloads: Vec::new(),
                unreadable: 0,
            };
            for salt in salts {
                let before = seg.payloads.len();
                for member in contents.next().flatten().unwrap_or_default() {
                    if let Err(err) =
                        decode_member(&member, self.settings.max_member_bytes, &mut seg.payloads)
                    {
                        tracing::warn!(segment = %candidates[candidate].segment_key, %salt, error = %err, "unreadable payload member");
                        seg.unreadable += 1;
                    }
                }
                let got = &seg.payloads[before..];
                seg.salts.push(DeliveredSalt {
                    salt,
                    spans: got.len() as u64,
                    bytes: got.iter().map(|p| p.len() as u64).sum(),
                });
            }
            segments.push(seg);
        }

        if !segments.is_empty() {
            fault::hit(fault::Point::AfterLoad);
        }

        // 4. Records.
        let mut records: Vec<FlushedSegment> = Vec::new();
        let mut built_segments = Vec::with_capacity(segments.len());
        for seg in &segments {
            let c = &candidates[seg.candidate];
            let mut seed = c.segment_key.clone().into_bytes();
            for salt in &seg.salts {
                seed.push(b'\n');
                seed.extend_from_slice(salt.salt.as_bytes());
            }
            let mut built = build_records(
                &SegmentPayloads {
                    segment_id: &seg.segment_id,
                    project_id: c.project_id,
                    trace_id: &c.trace_id,
                    payloads: &seg.payloads,
                    flush_seed: &seed,
                    delivered: &seg.delivered,
                },
                self.settings.max_segment_bytes,
            );
            let chunks = built.records.len();
            records.append(&mut built.records);
            built_segments.push((built, chunks));
        }
        Ok((segments, records, built_segments))
    }

    /// Cleanup, retried on a transient error for up to half the lock TTL
    /// (10 s without locks): the records are out, and a cleanup whose reply
    /// was lost may have happened — giving up would skip this cycle's
    /// accounting (and, had it not happened, deliver the segments again).
    /// `flush_done` is idempotent: a second run removes and subtracts
    /// nothing the first one did.
    async fn finish_with_retries(
        &self,
        done: &[DoneRequest<'_>],
    ) -> Result<Vec<crate::store::DoneReply>, FlushError> {
        let give_up_at = std::time::Instant::now()
            + match self.settings.lock_ttl_ms {
                0 => std::time::Duration::from_secs(10),
                ms => std::time::Duration::from_millis(ms / 2),
            };
        let mut backoff = std::time::Duration::from_millis(100);
        loop {
            match self
                .store
                .finish_segments(done, &self.token, self.settings.delivered_ttl_secs)
                .await
            {
                Ok(_) if fault::first_hit(fault::Point::CleanupReplyLost) => {
                    tracing::warn!(retry_in = ?backoff, "fault point: cleanup reply lost; retrying");
                    tokio::time::sleep(backoff).await;
                }
                Ok(replies) => return Ok(replies),
                Err(err)
                    if err.is_transient() && std::time::Instant::now() + backoff < give_up_at =>
                {
                    tracing::warn!(error = %err, retry_in = ?backoff, "cleanup after delivery failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    async fn cycle<S: Sink>(
        &self,
        shards: &[u32],
        now: f64,
        sink: &S,
    ) -> Result<CycleOutcome, FlushError> {
        let started = std::time::Instant::now();
        let mut outcome = CycleOutcome::default();
        if shards.is_empty() {
            return Ok(outcome);
        }
        let per_shard = self
            .settings
            .max_flush_segments
            .div_ceil(shards.len())
            .max(1);
        let keys = self.store.keys();

        // 1. Candidates, queue gauges.
        let snapshots = self.store.queue_snapshots(shards, now, per_shard).await?;
        let mut candidates = Vec::new();
        let mut foreign: Vec<(String, String, String)> = Vec::new();
        let mut seen = HashSet::new();
        for snap in &snapshots {
            let shard = snap.shard.to_string();
            self.metrics
                .queue_segments
                .with_label_values(&[&shard])
                .set(snap.size as i64);
            let lag = snap.oldest_deadline.map_or(0.0, |d| (now - d).max(0.0));
            self.metrics
                .flush_lag_seconds
                .with_label_values(&[&shard])
                .set(lag);
            outcome.max_lag_secs = outcome.max_lag_secs.max(lag);
            outcome.due += snap.due.len();
            outcome.more_due |= snap.due.len() >= per_shard;
            for (segment_key, score) in &snap.due {
                // A segment queued in two shards is taken once per cycle; its
                // other entry turns out empty in a later cycle.
                if !seen.insert(segment_key.clone()) {
                    continue;
                }
                match keys.parse_segment(segment_key) {
                    Some(seg) => candidates.push(Candidate {
                        queue_key: snap.queue_key.clone(),
                        segment_key: segment_key.clone(),
                        score: score.clone(),
                        pt: Keys::pt(seg.project_id, &seg.trace_id),
                        project_id: seg.project_id,
                        trace_id: seg.trace_id,
                        root: seg.root,
                    }),
                    None => {
                        foreign.push((snap.queue_key.clone(), segment_key.clone(), score.clone()))
                    }
                }
            }
        }
        // A member that is not a segment key of this prefix can never be
        // flushed: left in place it would hold the flush lag up for good (and
        // with it soft backpressure). Remove it, count it, say which.
        if !foreign.is_empty() {
            for (queue, member, _) in &foreign {
                tracing::warn!(%queue, %member, "queue member is not a segment key of this prefix; removed");
            }
            let removed = self.store.remove_queue_entries(&foreign).await?;
            self.metrics.queue_foreign_members_total.inc_by(removed);
        }
        if candidates.is_empty() {
            return Ok(outcome);
        }

        // 2–3. Lock and snapshot, then every payload set.
        let requests: Vec<LoadRequest<'_>> = candidates
            .iter()
            .map(|c| LoadRequest {
                pt: c.pt.clone(),
                root: &c.root,
            })
            .collect();
        let loaded = self
            .store
            .lock_and_load(&requests, &self.token, self.lock_times())
            .await?;
        let mut snapshots = Vec::new();
        // The cycle's byte budget (docs/design.md §6 step 1): segments are
        // taken in queue order while their ingested bytes fit, and at least
        // one; the locks of the rest are released at once and they wait for
        // the next cycle, which runs without delay.
        let mut budget_used = 0u64;
        let mut over_budget: Vec<LoadRequest<'_>> = Vec::new();
        for (i, load) in loaded.into_iter().enumerate() {
            match load {
                Loaded::Contended => outcome.contended += 1,
                Loaded::Snapshot {
                    ingested_spans,
                    ingested_bytes,
                    segment_id,
                    delivered,
                    mut salts,
                } => {
                    let bytes = ingested_bytes.unwrap_or(0);
                    if !snapshots.is_empty()
                        && budget_used.saturating_add(bytes) > self.settings.max_flush_bytes
                    {
                        over_budget.push(LoadRequest {
                            pt: candidates[i].pt.clone(),
                            root: &candidates[i].root,
                        });
                        continue;
                    }
                    budget_used = budget_used.saturating_add(bytes);
                    salts.sort();
                    snapshots.push((i, ingested_spans, segment_id, delivered, salts));
                }
            }
        }
        outcome.bytes_loaded = budget_used;
        if !over_budget.is_empty() {
            outcome.more_due = true;
            outcome.over_budget = over_budget.len();
            self.store.release_locks(&over_budget, &self.token).await?;
        }
        self.metrics
            .flush_lock_contention_total
            .inc_by(outcome.contended as u64);
        // Everything from here to the delivery runs under the locks, which
        // are extended every third of their TTL (a large cycle's load and
        // build count as much as a slow broker).
        let held: Vec<LoadRequest<'_>> = snapshots
            .iter()
            .map(|(i, ..)| LoadRequest {
                pt: candidates[*i].pt.clone(),
                root: &candidates[*i].root,
            })
            .collect();
        let staged = async {
            let (segments, records, built_segments) =
                self.load_and_build(&candidates, snapshots).await?;
            // 5. Deliver. A failed delivery cleans nothing up and keeps the
            // locks: this flusher takes them again next cycle (same token),
            // and meanwhile new spans of those segments detach
            // (docs/design.md §5), so the retry delivers the same snapshot
            // under the same flush ids.
            let delivery = if records.is_empty() {
                Delivery::complete()
            } else {
                if let Some(delay) = fault::deliver_delay() {
                    tokio::time::sleep(delay).await;
                }
                sink.deliver(&records)
                    .await
                    .map_err(|source| FlushError::Sink {
                        records: records.len(),
                        source,
                    })?
            };
            Ok::<_, FlushError>((segments, records, built_segments, delivery))
        };
        let (segments, records, built_segments, delivery) =
            self.refreshing_locks(&held, staged).await?;

        let delivered_at = now + started.elapsed().as_secs_f64();
        if !records.is_empty() {
            fault::hit(fault::Point::AfterDeliver);
        }

        // Per segment: all its records out (or never deliverable) → cleanup;
        // one that may go out later → it stays buffered, whole.
        let mut fates: Vec<Option<&Undelivered>> = vec![None; records.len()];
        for (i, why) in &delivery.undelivered {
            if let Some(fate) = fates.get_mut(*i) {
                *fate = Some(why);
            }
        }
        outcome.delivery_error = delivery.first_error().map(str::to_owned);
        let mut finished = Vec::with_capacity(segments.len());
        let mut first_record = 0;
        for (seg, (built, chunks)) in segments.iter().zip(&built_segments) {
            let range = first_record..first_record + chunks;
            first_record = range.end;
            let retry = fates[range.clone()]
                .iter()
                .any(|f| matches!(f, Some(Undelivered::Retry(_))));
            if retry {
                outcome.records_undelivered += fates[range].iter().filter(|f| f.is_some()).count();
                continue;
            }
            let mut rejected = Vec::new();
            for (record, fate) in records[range.clone()].iter().zip(&fates[range]) {
                if let Some(Undelivered::Rejected { reason, detail }) = fate {
                    tracing::error!(segment = %candidates[seg.candidate].segment_key, spans = record.span_count(), %reason, error = %detail,
                        "record can never be delivered; its spans are dropped and counted");
                    rejected.push((*reason, record.span_count() as u64));
                }
            }
            finished.push((seg, built, *chunks, rejected));
        }
        if outcome.records_undelivered > 0 {
            self.metrics
                .flush_failures_total
                .with_label_values(&["sink"])
                .inc();
        }

        // 6. Precise cleanup of what was delivered.
        let done: Vec<DoneRequest<'_>> = finished
            .iter()
            .map(|(seg, built, _, _)| {
                let c = &candidates[seg.candidate];
                let loaded = seg.payloads.len() as u64;
                DoneRequest {
                    pt: c.pt.clone(),
                    root: &c.root,
                    shard_queue: &c.queue_key,
                    segment_key: &c.segment_key,
                    score: &c.score,
                    unloaded: seg.ingested_spans.map_or(0, |ic| ic.saturating_sub(loaded)),
                    salts: seg.salts.clone(),
                    span_ids: built.span_ids.iter().map(String::as_str).collect(),
                }
            })
            .collect();
        if fault::armed(fault::Point::DuringCleanup) && done.len() > 1 {
            self.store
                .finish_segments(
                    &done[..done.len() / 2],
                    &self.token,
                    self.settings.delivered_ttl_secs,
                )
                .await?;
            fault::crash(fault::Point::DuringCleanup);
        }
        let replies = self.finish_with_retries(&done).await?;

        // Accounting: loss is counted by the cleanup that removed the data.
        let mut chunked = 0u64;
        for ((seg, built, chunks, rejected), (d, reply)) in
            finished.iter().zip(done.iter().zip(&replies))
        {
            chunked += u64::from(*chunks > 1);
            let rejected_spans: u64 = rejected.iter().map(|(_, n)| n).sum();
            outcome.spans_flushed += built.spans - rejected_spans as usize;
            outcome.spans_duplicate += built.duplicates;
            if seg.salts.is_empty() {
                outcome.segments_empty += 1;
            } else {
                outcome.segments_flushed += 1;
                // Scores come from Redis as decimal text; one that is not is
                // left out of the lateness, not guessed.
                if let Ok(deadline) = d.score.parse::<f64>() {
                    let late = delivered_at - deadline;
                    self.metrics.flush_lateness_seconds.observe(late.max(0.0));
                    outcome.lateness_secs.push(late);
                }
            }
            let removed_here =
                !reply.removed_salts.is_empty() || (seg.salts.is_empty() && reply.segment_deleted);
            if removed_here {
                // Each lost span counts once. Spans ingested but not loaded
                // were in payload sets that expired or in members that could
                // not be read: with an unreadable member, they count as
                // unreadable (its spans are among them), else as expired.
                // Without counters (they expired too) the spans of an
                // unreadable member are unknown: one per member, at least.
                match seg.ingested_spans {
                    Some(_) if seg.unreadable > 0 => {
                        outcome.spans_dropped_unreadable += d.unloaded;
                    }
                    Some(_) => outcome.spans_dropped_expired += d.unloaded,
                    None => outcome.spans_dropped_unreadable += seg.unreadable,
                }
                outcome.spans_dropped_unreadable += built.unparseable as u64;
                for (reason, spans) in rejected {
                    outcome.add_rejected(reason, *spans);
                }
            }
        }
        outcome.records = records.len() - delivery.undelivered.len();
        self.metrics.segments_chunked_total.inc_by(chunked);
        let m = &self.metrics;
        m.records_flushed_total.inc_by(outcome.records as u64);
        m.spans_flushed_total.inc_by(outcome.spans_flushed as u64);
        m.spans_duplicate_total
            .inc_by(outcome.spans_duplicate as u64);
        m.segments_flushed_total
            .inc_by(outcome.segments_flushed as u64);
        m.segments_empty_total.inc_by(outcome.segments_empty as u64);
        m.spans_dropped_total
            .with_label_values(&["expired"])
            .inc_by(outcome.spans_dropped_expired);
        m.spans_dropped_total
            .with_label_values(&["unreadable"])
            .inc_by(outcome.spans_dropped_unreadable);
        for (reason, spans) in &outcome.spans_dropped_rejected {
            m.spans_dropped_total
                .with_label_values(&[reason])
                .inc_by(*spans);
        }
        Ok(outcome)
    }
}
