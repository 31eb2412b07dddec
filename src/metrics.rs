//! Every metric spanbuf exports, declared once, with its own Registry.
//!
//! Metric names appear in this file only (the house rule: one metrics file). Each field's doc comment
//! is its HELP text. Labels come from closed sets (`reason`, `kind`, …), never
//! from ids. Callers record per batch, not per span. The loss-accounting names
//! are fixed by docs/design.md §9.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::span::InvalidReason;

/// The metrics of one process.
pub struct Metrics {
    registry: Registry,
    /// Valid spans written to Redis (redelivered subsegments excluded).
    pub spans_consumed_total: IntCounter,
    /// Invalid input spans, by reason.
    pub spans_invalid_total: IntCounterVec,
    /// Spans of subsegments that were already buffered (a redelivered batch); not counted again.
    pub spans_redelivered_total: IntCounter,
    /// Subsegments written by ingest.
    pub ingest_subsegments_total: IntCounter,
    /// Subsegments that became a segment of their own, by reason (too_large, locked).
    pub subsegments_detached_total: IntCounterVec,
    /// Earlier segments merged into another one when their parent arrived.
    pub segments_merged_total: IntCounter,
    /// Span payload bytes ingested, by kind (raw = as received, stored = after compression).
    pub ingest_payload_bytes_total: IntCounterVec,
    /// Time to write one batch to Redis (grouping, compression, insert, queue update).
    pub ingest_batch_duration_seconds: Histogram,
    /// Spans in delivered records.
    pub spans_flushed_total: IntCounter,
    /// Duplicate spans (same span id in one segment) removed at flush.
    pub spans_duplicate_total: IntCounter,
    /// Spans ingested but not delivered, by reason (expired = payload gone from Redis, unreadable = corrupt or foreign data, too_large = a record larger than the output accepts, unencodable = not encodable with the output codec).
    pub spans_dropped_total: IntCounterVec,
    /// Segments delivered and cleaned up.
    pub segments_flushed_total: IntCounter,
    /// Due queue entries with no data behind them (stale entries), cleaned up.
    pub segments_empty_total: IntCounter,
    /// Segments delivered in several chunks because they exceeded the size limit.
    pub segments_chunked_total: IntCounter,
    /// Output records delivered.
    pub records_flushed_total: IntCounter,
    /// Due segments skipped because another flusher held their lock.
    pub flush_lock_contention_total: IntCounter,
    /// Flush cycles that failed, by stage (redis, sink); the segments stay buffered.
    pub flush_failures_total: IntCounterVec,
    /// Segments in the flush queue of a shard.
    pub queue_segments: IntGaugeVec,
    /// Now minus the oldest due deadline of a shard's queue; 0 when nothing is overdue.
    pub flush_lag_seconds: GaugeVec,
    /// Time of one flush cycle (read queues, lock, load, build, deliver, clean up).
    pub flush_cycle_duration_seconds: Histogram,
    /// Delivery time minus the queue deadline of each flushed segment: how late the flusher is.
    pub flush_lateness_seconds: Histogram,
    /// Seconds since a loop last completed a cycle, by loop (consume, flush).
    pub loop_stall_seconds: GaugeVec,
    /// 1 while consumption is paused, by reason (flush_lag = soft, redis_memory = hard, redis_down).
    pub backpressure_active: IntGaugeVec,
    /// Times consumption was paused, by reason.
    pub backpressure_pauses_total: IntCounterVec,
    /// Flush-lock refreshes during slow deliveries (one per refresh round).
    pub flush_lock_refreshes_total: IntCounter,
    /// Times this process found Redis had lost the buffer (the marker key gone or replaced).
    pub redis_data_loss_total: IntCounter,
    /// Windows Redis refused as full (OOM at maxmemory) while the flush clock was held or a shard waited to catch up; the clock then runs on in wall time and every shard flushes.
    pub redis_full_total: IntCounter,
    /// Records produced to the output topic and acknowledged by the broker.
    pub records_produced_total: IntCounter,
    /// Bytes of records acknowledged by the broker.
    pub produced_bytes_total: IntCounter,
    /// Records the broker refused or that timed out, by kind (delivery, encode, too_large, invalid).
    pub produce_errors_total: IntCounterVec,
    /// Invalid spans forwarded to the dead-letter topic.
    pub dlq_records_total: IntCounter,
    /// Invalid spans not forwarded to the dead-letter topic, by reason (too_large = beyond its message limit, rejected = refused by the broker as invalid, gave_up = retried for the producer's message timeout).
    pub dlq_records_dropped_total: IntCounterVec,
    /// Kafka input messages consumed (valid or not).
    pub messages_consumed_total: IntCounter,
    /// Offset commits, by outcome (ok, error).
    pub offset_commits_total: IntCounterVec,
    /// Partitions currently assigned to this process.
    pub assigned_partitions: prometheus::IntGauge,
    /// Assigned partitions whose shard is not flushed yet: this process has not caught up with what the previous owner left.
    pub partitions_catching_up: prometheus::IntGauge,
    /// Flush-queue members that were not segment keys of this prefix,
    /// removed (they can never be flushed and would hold the lag up).
    pub queue_foreign_members_total: IntCounter,
    /// Valid spans per coalescing window written to Redis.
    pub window_spans: Histogram,
    /// Staged spans of partitions revoked before their window was written,
    /// left uncommitted for the partition's new owner (not a loss).
    pub window_spans_released_total: IntCounter,
}

#[derive(Debug, thiserror::Error)]
#[error("metrics: cannot register {name}: {source}")]
pub struct MetricsError {
    name: String,
    #[source]
    source: prometheus::Error,
}

/// Registers a freshly built collector under `name`.
fn register<C>(
    registry: &Registry,
    name: &str,
    built: Result<C, prometheus::Error>,
) -> Result<C, MetricsError>
where
    C: prometheus::core::Collector + Clone + 'static,
{
    let wrap = |source| MetricsError {
        name: name.into(),
        source,
    };
    let collector = built.map_err(wrap)?;
    registry
        .register(Box::new(collector.clone()))
        .map_err(wrap)?;
    Ok(collector)
}

fn counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter, MetricsError> {
    register(registry, name, IntCounter::new(name, help))
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
) -> Result<IntCounterVec, MetricsError> {
    register(
        registry,
        name,
        IntCounterVec::new(Opts::new(name, help), &[label]),
    )
}

fn int_gauge_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
) -> Result<IntGaugeVec, MetricsError> {
    register(
        registry,
        name,
        IntGaugeVec::new(Opts::new(name, help), &[label]),
    )
}

fn gauge_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
) -> Result<GaugeVec, MetricsError> {
    register(
        registry,
        name,
        GaugeVec::new(Opts::new(name, help), &[label]),
    )
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> Result<Histogram, MetricsError> {
    register(
        registry,
        name,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)),
    )
}

/// The closed `reason` set of `spanbuf_backpressure_active`.
pub const BACKPRESSURE_REASONS: [&str; 3] = ["flush_lag", "redis_memory", "redis_down"];

/// The closed `reason` set of `spanbuf_spans_dropped_total`.
pub const DROP_REASONS: [&str; 5] = [
    "expired",
    "unreadable",
    "too_large",
    "unencodable",
    "trace_too_large",
];

/// Spans per window: 1 … 1,000,000.
fn window_buckets() -> Vec<f64> {
    [
        1, 10, 20, 50, 100, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000, 1_000_000,
    ]
    .into_iter()
    .map(f64::from)
    .collect()
}

/// Latency buckets for Redis-bound work: 0.5 ms … 10 s.
fn latency_buckets() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
}

fn lateness_buckets() -> Vec<f64> {
    vec![
        0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    ]
}

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let r = Registry::new();
        let m = Metrics {
            spans_consumed_total: counter(&r, "spanbuf_spans_consumed_total", "Valid spans written to Redis (redelivered subsegments excluded).")?,
            spans_invalid_total: counter_vec(&r, "spanbuf_spans_invalid_total", "Invalid input spans, by reason.", "reason")?,
            spans_redelivered_total: counter(&r, "spanbuf_spans_redelivered_total", "Spans of subsegments that were already buffered (a redelivered batch); not counted again.")?,
            ingest_subsegments_total: counter(&r, "spanbuf_ingest_subsegments_total", "Subsegments written by ingest.")?,
            subsegments_detached_total: counter_vec(&r, "spanbuf_subsegments_detached_total", "Subsegments that became a segment of their own, by reason (too_large, locked).", "reason")?,
            segments_merged_total: counter(&r, "spanbuf_segments_merged_total", "Earlier segments merged into another one when their parent arrived.")?,
            ingest_payload_bytes_total: counter_vec(&r, "spanbuf_ingest_payload_bytes_total", "Span payload bytes ingested, by kind (raw = as received, stored = after compression).", "kind")?,
            ingest_batch_duration_seconds: histogram(&r, "spanbuf_ingest_batch_duration_seconds", "Time to write one batch to Redis (grouping, compression, insert, queue update).", latency_buckets())?,
            spans_flushed_total: counter(&r, "spanbuf_spans_flushed_total", "Spans in delivered records.")?,
            spans_duplicate_total: counter(&r, "spanbuf_spans_duplicate_total", "Duplicate spans removed at flush: the same span id twice in one segment, or a span the trace delivered before (read again after its flush).")?,
            spans_dropped_total: counter_vec(&r, "spanbuf_spans_dropped_total", "Spans ingested but not delivered, by reason (expired = payload gone from Redis, unreadable = corrupt or foreign data, too_large = a record larger than the output accepts, unencodable = not encodable with the output codec).", "reason")?,
            segments_flushed_total: counter(&r, "spanbuf_segments_flushed_total", "Segments delivered and cleaned up.")?,
            segments_empty_total: counter(&r, "spanbuf_segments_empty_total", "Due queue entries with no data behind them (stale entries), cleaned up.")?,
            segments_chunked_total: counter(&r, "spanbuf_segments_chunked_total", "Segments delivered in several chunks because they exceeded the size limit.")?,
            records_flushed_total: counter(&r, "spanbuf_records_flushed_total", "Output records delivered.")?,
            flush_lock_contention_total: counter(&r, "spanbuf_flush_lock_contention_total", "Due segments skipped because another flusher held their lock.")?,
            flush_failures_total: counter_vec(&r, "spanbuf_flush_failures_total", "Flush cycles that failed, by stage (redis, sink); the segments stay buffered.", "stage")?,
            queue_segments: int_gauge_vec(&r, "spanbuf_queue_segments", "Segments in the flush queue of a shard.", "shard")?,
            flush_lag_seconds: gauge_vec(&r, "spanbuf_flush_lag_seconds", "Now minus the oldest due deadline of a shard's queue; 0 when nothing is overdue.", "shard")?,
            flush_cycle_duration_seconds: histogram(&r, "spanbuf_flush_cycle_duration_seconds", "Time of one flush cycle (read queues, lock, load, build, deliver, clean up).", latency_buckets())?,
            flush_lateness_seconds: histogram(&r, "spanbuf_flush_lateness_seconds", "Delivery time minus the queue deadline of each flushed segment: how late the flusher is.", lateness_buckets())?,
            loop_stall_seconds: gauge_vec(&r, "spanbuf_loop_stall_seconds", "Seconds since a loop last completed a cycle, by loop (consume, flush).", "loop")?,
            backpressure_active: int_gauge_vec(&r, "spanbuf_backpressure_active", "1 while consumption is paused, by reason (flush_lag = soft, redis_memory = hard, redis_down).", "reason")?,
            backpressure_pauses_total: counter_vec(&r, "spanbuf_backpressure_pauses_total", "Times consumption was paused, by reason.", "reason")?,
            flush_lock_refreshes_total: counter(&r, "spanbuf_flush_lock_refreshes_total", "Flush-lock refreshes during slow deliveries (one per refresh round).")?,
            redis_data_loss_total: counter(&r, "spanbuf_redis_data_loss_total", "Times this process found Redis had lost the buffer (the marker key gone or replaced).")?,
            redis_full_total: counter(&r, "spanbuf_redis_full_total", "Windows Redis refused as full (OOM at maxmemory) while the flush clock was held or a shard waited to catch up; the clock then runs on in wall time and every shard flushes.")?,
            records_produced_total: counter(&r, "spanbuf_records_produced_total", "Records produced to the output topic and acknowledged by the broker.")?,
            produced_bytes_total: counter(&r, "spanbuf_produced_bytes_total", "Bytes of records acknowledged by the broker.")?,
            produce_errors_total: counter_vec(&r, "spanbuf_produce_errors_total", "Records the broker refused or that timed out, by kind (delivery, encode, too_large, invalid).", "kind")?,
            dlq_records_total: counter(&r, "spanbuf_dlq_records_total", "Invalid spans forwarded to the dead-letter topic.")?,
            dlq_records_dropped_total: counter_vec(&r, "spanbuf_dlq_records_dropped_total", "Invalid spans not forwarded to the dead-letter topic, by reason (too_large = beyond its message limit, rejected = refused by the broker as invalid, gave_up = retried for the producer's message timeout).", "reason")?,
            messages_consumed_total: counter(&r, "spanbuf_messages_consumed_total", "Kafka input messages consumed (valid or not).")?,
            offset_commits_total: counter_vec(&r, "spanbuf_offset_commits_total", "Offset commits, by outcome (ok, error).", "outcome")?,
            assigned_partitions: register(&r, "spanbuf_assigned_partitions", prometheus::IntGauge::new("spanbuf_assigned_partitions", "Partitions currently assigned to this process."))?,
            partitions_catching_up: register(&r, "spanbuf_partitions_catching_up", prometheus::IntGauge::new("spanbuf_partitions_catching_up", "Assigned partitions whose shard is not flushed yet: this process has not caught up with what the previous owner left."))?,
            queue_foreign_members_total: counter(&r, "spanbuf_queue_foreign_members_total", "Flush-queue members that were not segment keys of this prefix, removed: they can never be flushed and would hold the flush lag up.")?,
            window_spans: histogram(&r, "spanbuf_window_spans", "Valid spans per coalescing window written to Redis.", window_buckets())?,
            window_spans_released_total: counter(&r, "spanbuf_window_spans_released_total", "Staged spans of partitions revoked before their window was written, left uncommitted for the new owner (not a loss).")?,
            registry: r,
        };
        // Closed label sets are exported from the start, at zero, so alerts
        // and dashboards see every series before the first event.
        for reason in InvalidReason::ALL {
            m.spans_invalid_total.with_label_values(&[reason.as_str()]);
        }
        for reason in ["too_large", "locked"] {
            m.subsegments_detached_total.with_label_values(&[reason]);
        }
        for kind in ["raw", "stored"] {
            m.ingest_payload_bytes_total.with_label_values(&[kind]);
        }
        for reason in ["too_large", "rejected", "gave_up"] {
            m.dlq_records_dropped_total.with_label_values(&[reason]);
        }
        for reason in DROP_REASONS {
            m.spans_dropped_total.with_label_values(&[reason]);
        }
        for stage in ["redis", "sink"] {
            m.flush_failures_total.with_label_values(&[stage]);
        }
        for reason in BACKPRESSURE_REASONS {
            m.backpressure_active.with_label_values(&[reason]);
            m.backpressure_pauses_total.with_label_values(&[reason]);
        }
        for kind in ["delivery", "encode", "too_large", "invalid"] {
            m.produce_errors_total.with_label_values(&[kind]);
        }
        for outcome in ["ok", "error"] {
            m.offset_commits_total.with_label_values(&[outcome]);
        }
        Ok(m)
    }

    /// Counts invalid spans of one batch by reason.
    pub fn record_invalid(&self, reasons: impl IntoIterator<Item = InvalidReason>) {
        let mut counts = [0u64; InvalidReason::ALL.len()];
        for reason in reasons {
            if let Some(i) = InvalidReason::ALL.iter().position(|r| *r == reason) {
                counts[i] += 1;
            }
        }
        for (reason, n) in InvalidReason::ALL.iter().zip(counts) {
            if n > 0 {
                self.spans_invalid_total
                    .with_label_values(&[reason.as_str()])
                    .inc_by(n);
            }
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_conventions_and_reasons_start_at_zero() {
        let m = Metrics::new().expect("metrics register");
        let text = m.render().expect("render");
        for family in m.registry().gather() {
            let name = family.name();
            assert!(name.starts_with("spanbuf_"), "{name}");
            if family.get_field_type() == prometheus::proto::MetricType::COUNTER {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
        for reason in InvalidReason::ALL {
            assert!(
                text.contains(&format!(
                    "spanbuf_spans_invalid_total{{reason=\"{}\"}} 0",
                    reason.as_str()
                )),
                "{text}"
            );
        }
        m.record_invalid([
            InvalidReason::BadId,
            InvalidReason::BadId,
            InvalidReason::TooLarge,
        ]);
        let text = m.render().expect("render");
        assert!(text.contains("spanbuf_spans_invalid_total{reason=\"bad_id\"} 2"));
        assert!(text.contains("spanbuf_spans_invalid_total{reason=\"too_large\"} 1"));
    }
}
