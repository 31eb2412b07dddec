//! Audit: compares the spans that went in with the records that came out.
//!
//! The expected segment of a span is found the way a reader of the whole
//! input would: walk up its parents (within its trace and project) to the
//! nearest segment root (`is_segment`, or no parent), or to the top-most
//! known parent when the root never arrived. The audit reports spans missing,
//! spans delivered twice with different `flush_id`s (a duplicate with the same
//! id is allowed: downstream drops it), spans under another segment than
//! expected, and records with spans that were never sent. Pure logic: the
//! caller reads the input and the records.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::span::record::FlushedSegment;
use crate::span::Span;

/// `(project_id, trace_id, span_id)`.
/// `(project_id, trace_id, span_id)`.
pub type SpanKey = (u64, String, String);

/// The key of every span of a record, in order (an unreadable span has an
/// empty span id).
pub fn span_keys(record: &FlushedSegment) -> Vec<SpanKey> {
    record
        .spans
        .iter()
        .map(|raw| {
            let span_id = serde_json::from_str::<serde_json::Value>(raw.get())
                .ok()
                .and_then(|v| {
                    v.get("span_id")
                        .and_then(|s| s.as_str())
                        .map(str::to_string)
                })
                .unwrap_or_default();
            (record.project_id, record.trace_id.clone(), span_id)
        })
        .collect()
}

/// What the audit found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AuditReport {
    pub spans_in: usize,
    pub spans_out: usize,
    pub records: usize,
    pub segments: usize,
    /// Valid input spans never delivered.
    pub missing: usize,
    /// Spans delivered more than once with different flush ids.
    pub duplicated_with_other_flush_id: usize,
    /// Spans delivered again with the same flush id (harmless).
    pub duplicated_same_flush_id: usize,
    /// Spans delivered under another segment id than expected.
    pub wrong_root: usize,
    /// Delivered spans that were not in the input.
    pub unexpected: usize,
    /// Up to 10 examples per problem, for a human.
    pub examples: BTreeMap<String, Vec<String>>,
    /// The metrics' conservation, when metrics were given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conservation: Option<Conservation>,
}

/// consumed = flushed + duplicate + dropped + buffered, from the workers'
/// counters (summed over every `/metrics` text given) and the spans still
/// buffered in Redis. Holds across restarts only if no process died in
/// between: a killed process takes its counters with it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Conservation {
    pub consumed: u64,
    pub flushed: u64,
    pub duplicate: u64,
    pub dropped: u64,
    pub buffered: u64,
    /// `consumed - flushed - duplicate - dropped - buffered`: spans lost
    /// without a reason (positive) or delivered more than once (negative).
    pub unaccounted: i64,
    /// Times a worker found Redis had lost the buffer; when non-zero, the
    /// unaccounted spans are that loss.
    pub redis_data_loss: u64,
}

impl Conservation {
    /// From Prometheus text expositions and the spans buffered in Redis.
    pub fn from_metrics(texts: &[String], buffered: u64) -> Conservation {
        let sum = |name: &str| -> u64 {
            texts
                .iter()
                .map(|t| metric_sum(t, name))
                .sum::<f64>()
                .round() as u64
        };
        let mut c = Conservation {
            consumed: sum("spanbuf_spans_consumed_total"),
            flushed: sum("spanbuf_spans_flushed_total"),
            duplicate: sum("spanbuf_spans_duplicate_total"),
            dropped: sum("spanbuf_spans_dropped_total"),
            buffered,
            unaccounted: 0,
            redis_data_loss: sum("spanbuf_redis_data_loss_total"),
        };
        let out = c.flushed + c.duplicate + c.dropped + c.buffered;
        c.unaccounted =
            i64::try_from(c.consumed).unwrap_or(i64::MAX) - i64::try_from(out).unwrap_or(i64::MAX);
        c
    }

    pub fn is_balanced(&self) -> bool {
        self.unaccounted == 0
    }
}

/// The sum of every series of `name` (any labels) in a text exposition.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

impl AuditReport {
    pub fn is_clean(&self) -> bool {
        self.missing == 0
            && self.duplicated_with_other_flush_id == 0
            && self.wrong_root == 0
            && self.unexpected == 0
            && self
                .conservation
                .as_ref()
                .is_none_or(Conservation::is_balanced)
    }

    fn example(&mut self, problem: &str, key: &SpanKey) {
        let list = self.examples.entry(problem.to_string()).or_default();
        if list.len() < 10 {
            list.push(format!("{}:{}:{}", key.0, key.1, key.2));
        }
    }
}

/// The expected segment id of every input span.
pub fn expected_segments(spans: &[Span]) -> HashMap<SpanKey, String> {
    let by_key: HashMap<SpanKey, &Span> = spans
        .iter()
        .map(|s| ((s.project_id, s.trace_id.clone(), s.span_id.clone()), s))
        .collect();
    let mut out = HashMap::with_capacity(spans.len());
    for (key, span) in &by_key {
        let mut at: &Span = span;
        let mut segment = at.effective_parent_id().to_string();
        // Bounded walk: a cycle in hostile input must not hang the audit.
        for _ in 0..by_key.len().min(10_000) {
            if at.is_segment_span {
                segment = at.span_id.clone();
                break;
            }
            let parent = at.effective_parent_id().to_string();
            match by_key.get(&(key.0, key.1.clone(), parent.clone())) {
                Some(next) if next.span_id != at.span_id => {
                    at = next;
                    segment = parent;
                }
                _ => {
                    segment = parent;
                    break;
                }
            }
        }
        out.insert(key.clone(), segment);
    }
    out
}

/// Audits delivered `records` against the input `spans`.
pub fn audit(spans: &[Span], records: &[FlushedSegment]) -> AuditReport {
    let expected = expected_segments(spans);
    let mut report = AuditReport {
        spans_in: expected.len(),
        records: records.len(),
        ..AuditReport::default()
    };
    let mut seen: HashMap<SpanKey, String> = HashMap::new();
    let mut segments: HashSet<(u64, String, String)> = HashSet::new();
    for record in records {
        segments.insert((
            record.project_id,
            record.trace_id.clone(),
            record.segment_id.clone(),
        ));
        for key in span_keys(record) {
            report.spans_out += 1;
            match seen.get(&key) {
                Some(flush_id) if *flush_id == record.flush_id => {
                    report.duplicated_same_flush_id += 1;
                    continue;
                }
                Some(_) => {
                    report.duplicated_with_other_flush_id += 1;
                    report.example("duplicated_with_other_flush_id", &key);
                    continue;
                }
                None => {
                    seen.insert(key.clone(), record.flush_id.clone());
                }
            }
            match expected.get(&key) {
                None => {
                    report.unexpected += 1;
                    report.example("unexpected", &key);
                }
                Some(segment) if *segment != record.segment_id => {
                    report.wrong_root += 1;
                    report.example("wrong_root", &key);
                }
                Some(_) => {}
            }
        }
    }
    report.segments = segments.len();
    for key in expected.keys() {
        if !seen.contains_key(key) {
            report.missing += 1;
            report.example("missing", key);
        }
    }
    report
}

#[cfg(test)]
mod tests {

    #[test]
    fn conservation_sums_series_over_processes() {
        let a = "# HELP x\nspanbuf_spans_consumed_total 100\nspanbuf_spans_flushed_total 70\nspanbuf_spans_dropped_total{reason=\"expired\"} 3\nspanbuf_spans_dropped_total{reason=\"unreadable\"} 2\nspanbuf_spans_consumed_totalx 9\n".to_string();
        let b = "spanbuf_spans_consumed_total 50\nspanbuf_spans_flushed_total 60\nspanbuf_spans_duplicate_total 1\n".to_string();
        let c = Conservation::from_metrics(&[a.clone(), b.clone()], 14);
        assert_eq!(
            (c.consumed, c.flushed, c.duplicate, c.dropped),
            (150, 130, 1, 5)
        );
        assert_eq!(c.unaccounted, 0);
        assert!(c.is_balanced());
        let short = Conservation::from_metrics(&[a, b], 4);
        assert_eq!(short.unaccounted, 10);
        assert!(!short.is_balanced());
    }

    use super::*;
    use crate::span::record::{build_records, SegmentPayloads};

    fn span(id: &str, parent: Option<&str>, is_segment: bool) -> Span {
        let json = serde_json::json!({
            "trace_id": "0123456789abcdef0123456789abcdef", "span_id": id,
            "parent_span_id": parent, "project_id": 1, "is_segment": is_segment,
        });
        let bytes = serde_json::to_vec(&json).unwrap_or_default();
        crate::span::decode_span(&bytes, 1 << 20).expect("valid test span")
    }

    fn record(segment: &str, spans: &[&Span], seed: &[u8]) -> FlushedSegment {
        let payloads: Vec<bytes::Bytes> = spans.iter().map(|s| s.payload.clone()).collect();
        let built = build_records(
            &SegmentPayloads {
                segment_id: segment,
                project_id: 1,
                trace_id: "0123456789abcdef0123456789abcdef",
                payloads: &payloads,
                flush_seed: seed,
                delivered: "",
            },
            usize::MAX,
        );
        built.records.into_iter().next().expect("one record")
    }

    const A: &str = "000000000000000a";
    const B: &str = "000000000000000b";
    const C: &str = "000000000000000c";
    const S: &str = "0000000000000005";
    const X: &str = "00000000000000ff";

    #[test]
    fn expected_segment_walks_to_the_nearest_root_or_top_parent() {
        let spans = vec![
            span(A, None, false),
            span(B, Some(A), false),
            span(S, Some(B), true),
            span(C, Some(S), false),
            span(X, Some("0000000000000999"), false),
        ];
        let e = expected_segments(&spans);
        let get = |id: &str| {
            e[&(
                1,
                "0123456789abcdef0123456789abcdef".to_string(),
                id.to_string(),
            )]
                .clone()
        };
        assert_eq!(get(A), A);
        assert_eq!(get(B), A);
        assert_eq!(get(S), S);
        assert_eq!(get(C), S);
        assert_eq!(get(X), "0000000000000999");
    }

    #[test]
    fn clean_and_each_kind_of_problem() {
        let (a, b, c) = (
            span(A, None, false),
            span(B, Some(A), false),
            span(C, Some(B), false),
        );
        let input = vec![a.clone(), b.clone(), c.clone()];
        let good = record(A, &[&a, &b, &c], b"1");
        let report = audit(&input, &[good.clone(), good.clone()]);
        assert!(report.is_clean(), "{report:?}");
        assert_eq!((report.duplicated_same_flush_id, report.segments), (3, 1));

        let partial = record(A, &[&a, &b], b"1");
        let report = audit(&input, &[partial]);
        assert_eq!(report.missing, 1);
        assert!(!report.is_clean());

        let other = record(A, &[&a, &b, &c], b"2");
        let report = audit(&input, &[good.clone(), other]);
        assert_eq!(report.duplicated_with_other_flush_id, 3);

        let wrong = record(B, &[&c], b"3");
        let report = audit(&input, &[record(A, &[&a, &b], b"4"), wrong]);
        assert_eq!(report.wrong_root, 1);
        assert_eq!(report.examples["wrong_root"].len(), 1);

        let report = audit(&input[..2], &[good]);
        assert_eq!(report.unexpected, 1);
    }
}
