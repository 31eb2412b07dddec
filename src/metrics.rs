//! Every metric spanbuf exports, declared once, with its own Registry.
//!
//! Metric names appear in this file only (STYLE.md). Each field's doc comment
//! is its HELP text. Labels come from closed sets (`reason`, `kind`, …), never
//! from ids. Callers record per batch, not per span. The loss-accounting names
//! are fixed by DESIGN §9.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
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
}

#[derive(Debug, thiserror::Error)]
#[error("metrics: cannot register {name}: {source}")]
pub struct MetricsError {
    name: String,
    #[source]
    source: prometheus::Error,
}

fn counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter, MetricsError> {
    let c = IntCounter::new(name, help).map_err(|source| MetricsError {
        name: name.into(),
        source,
    })?;
    registry
        .register(Box::new(c.clone()))
        .map_err(|source| MetricsError {
            name: name.into(),
            source,
        })?;
    Ok(c)
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
) -> Result<IntCounterVec, MetricsError> {
    let c = IntCounterVec::new(Opts::new(name, help), &[label]).map_err(|source| MetricsError {
        name: name.into(),
        source,
    })?;
    registry
        .register(Box::new(c.clone()))
        .map_err(|source| MetricsError {
            name: name.into(),
            source,
        })?;
    Ok(c)
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> Result<Histogram, MetricsError> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).map_err(
        |source| MetricsError {
            name: name.into(),
            source,
        },
    )?;
    registry
        .register(Box::new(h.clone()))
        .map_err(|source| MetricsError {
            name: name.into(),
            source,
        })?;
    Ok(h)
}

/// Latency buckets for Redis-bound work: 0.5 ms … 10 s.
fn latency_buckets() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
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
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for the text format except on
        // invalid metric families, which the registry rejects at register.
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_conventions_and_reasons_start_at_zero() {
        let m = Metrics::new().expect("metrics register");
        let text = m.render();
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
        let text = m.render();
        assert!(text.contains("spanbuf_spans_invalid_total{reason=\"bad_id\"} 2"));
        assert!(text.contains("spanbuf_spans_invalid_total{reason=\"too_large\"} 1"));
    }
}
