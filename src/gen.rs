//! Deterministic synthetic workloads: spans as Sentry's ingest-spans JSON,
//! for `spanbuf gen`, the benchmarks and load tests.
//!
//! A seed fixes everything: trace and span ids, tree shapes, payload padding,
//! arrival order. Each trace has `segments_per_trace` segments (the first is
//! the trace root, the others are inner roots marked `is_segment`, hanging
//! under a span of the first); each segment is a tree of `spans_per_segment`
//! spans at most `depth` levels deep. Arrival is shuffled within windows;
//! optionally some spans arrive late (after their segment's deadline) and some
//! lines are invalid. Must not do I/O: lines are handed to a callback.

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde_json::json;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenSpec {
    pub seed: u64,
    pub traces: usize,
    pub segments_per_trace: usize,
    pub spans_per_segment: usize,
    /// Levels of a segment's tree, the root being level 1.
    pub depth: usize,
    /// Approximate size of one span's JSON.
    pub payload_bytes: usize,
    /// Arrival order is shuffled within windows of this many lines (0 or 1 = in order).
    pub shuffle_window: usize,
    /// How the window moves: sliding (every span arrives up to a window late,
    /// so a segment's spans spread over about a window of lines and children
    /// come before their parents half the time, as real traffic does) or in
    /// fixed blocks (each block shuffled on its own).
    pub shuffle: Shuffle,
    /// Fraction of spans that arrive `late_after_secs` after the rest of the stream.
    pub late_fraction: f64,
    pub late_after_secs: f64,
    /// Fraction of extra lines that are invalid (not JSON, bad ids, wrong types).
    pub invalid_fraction: f64,
    pub projects: u64,
    /// `received` of the first line, epoch seconds.
    pub start: f64,
    /// Lines per second of `received` time.
    pub rate: f64,
}

/// The arrival order of [`GenSpec::shuffle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Shuffle {
    /// Lines pass through a buffer of a window's lines from which each new
    /// line pushes a random one out: a window that slides along the stream.
    #[default]
    Sliding,
    /// The stream is cut into blocks of a window, each shuffled on its own.
    Blocks,
}

impl Default for GenSpec {
    fn default() -> Self {
        Self {
            seed: 1,
            traces: 1000,
            segments_per_trace: 1,
            spans_per_segment: 20,
            depth: 3,
            payload_bytes: 900,
            shuffle_window: 1000,
            shuffle: Shuffle::Sliding,
            late_fraction: 0.0,
            late_after_secs: 120.0,
            invalid_fraction: 0.0,
            projects: 10,
            start: 1_700_000_000.0,
            rate: 50_000.0,
        }
    }
}

/// What was generated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenSummary {
    pub lines: usize,
    pub spans: usize,
    pub invalid: usize,
    pub late: usize,
    pub segments: usize,
}

/// One span before its `received` time is known: serialized, because a
/// `serde_json::Value` takes about five times the memory and the whole
/// workload is held for the shuffle.
struct Pending {
    json: Box<[u8]>,
    late: bool,
}

/// Generates the workload and hands each NDJSON line (without newline) to
/// `emit`, in arrival order.
pub fn generate(spec: &GenSpec, mut emit: impl FnMut(&[u8])) -> GenSummary {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut summary = GenSummary::default();
    let mut stream: Vec<Pending> =
        Vec::with_capacity(spec.traces * spec.segments_per_trace * spec.spans_per_segment);
    let segments = spec.segments_per_trace.max(1);
    let per_segment = spec.spans_per_segment.max(1);
    let depth = spec.depth.max(1);

    for t in 0..spec.traces {
        let trace_id = format!("{:032x}", rng.random::<u128>());
        let project_id = 1 + (t as u64 % spec.projects.max(1));
        let mut first_segment_ids: Vec<String> = Vec::new();
        for s in 0..segments {
            summary.segments += 1;
            // (span id, level) of this segment's spans so far.
            let mut spans: Vec<(String, usize)> = Vec::with_capacity(per_segment);
            for i in 0..per_segment {
                let span_id = format!("{:016x}", rng.random::<u64>());
                let (parent, level) = if i == 0 {
                    let parent = if s == 0 {
                        None
                    } else {
                        first_segment_ids.choose(&mut rng).cloned()
                    };
                    (parent, 1)
                } else {
                    let eligible: Vec<&(String, usize)> =
                        spans.iter().filter(|(_, l)| *l < depth).collect();
                    let (pid, plevel) = eligible
                        .choose(&mut rng)
                        .map_or((&spans[0].0, &1), |(p, l)| (p, l));
                    (Some(pid.clone()), plevel + 1)
                };
                let mut value = json!({
                    "trace_id": trace_id,
                    "span_id": span_id,
                    "parent_span_id": parent,
                    "project_id": project_id,
                    "organization_id": 1,
                    "start_timestamp": spec.start + i as f64 * 0.001,
                    "end_timestamp": spec.start + i as f64 * 0.001 + 0.0005,
                    "op": "db.query",
                    "status": "ok",
                    "attributes": {
                        "sentry.environment": {"type": "string", "value": "production"},
                        "sentry.release": {"type": "string", "value": "backend@24.11.0"},
                        "db.system": {"type": "string", "value": "postgresql"},
                    },
                    "description": "",
                });
                if i == 0 && s > 0 {
                    value["is_segment"] = json!(true);
                }
                pad(&mut value, spec.payload_bytes);
                if s == 0 {
                    first_segment_ids.push(span_id.clone());
                }
                let late = i > 0 && rng.random_bool(spec.late_fraction.clamp(0.0, 1.0));
                summary.late += usize::from(late);
                // Serializing a Value built above cannot fail (string keys only).
                let json = serde_json::to_vec(&value)
                    .unwrap_or_default()
                    .into_boxed_slice();
                stream.push(Pending { json, late });
                spans.push((span_id, level));
            }
        }
    }
    summary.spans = stream.len();

    // Late spans go to the end; arrival is shuffled within windows.
    let (mut on_time, late): (Vec<Pending>, Vec<Pending>) =
        stream.into_iter().partition(|p| !p.late);
    if spec.shuffle_window > 1 {
        match spec.shuffle {
            Shuffle::Sliding => {
                // A buffer of a window's lines; each line in pushes a random
                // one out. A line waits a window on average, some much longer.
                let mut buffer: Vec<Pending> = Vec::with_capacity(spec.shuffle_window);
                let mut shuffled = Vec::with_capacity(on_time.len());
                for pending in on_time {
                    buffer.push(pending);
                    if buffer.len() == spec.shuffle_window {
                        let pick = rng.random_range(0..buffer.len());
                        shuffled.push(buffer.swap_remove(pick));
                    }
                }
                while !buffer.is_empty() {
                    let pick = rng.random_range(0..buffer.len());
                    shuffled.push(buffer.swap_remove(pick));
                }
                on_time = shuffled;
            }
            Shuffle::Blocks => {
                for window in on_time.chunks_mut(spec.shuffle_window) {
                    window.shuffle(&mut rng);
                }
            }
        }
    }
    let step = 1.0 / spec.rate.max(1e-9);
    let mut received = spec.start;
    for (k, pending) in on_time.into_iter().chain(late).enumerate() {
        let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(&pending.json) else {
            summary.spans -= 1;
            continue;
        };
        if pending.late && k > 0 {
            received = received.max(spec.start + (k as f64) * step + spec.late_after_secs);
        } else {
            received += step;
        }
        value["received"] = json!((received * 1000.0).round() / 1000.0);
        if rng.random_bool(spec.invalid_fraction.clamp(0.0, 1.0)) {
            summary.invalid += 1;
            summary.lines += 1;
            emit(&invalid_line(&mut rng, &value));
        }
        summary.lines += 1;
        match serde_json::to_vec(&value) {
            Ok(line) => emit(&line),
            // Serializing a Value built above cannot fail (no non-string keys).
            Err(_) => summary.spans -= 1,
        }
    }
    summary
}

/// Pads the description so the serialized span is about `target` bytes.
fn pad(value: &mut serde_json::Value, target: usize) {
    let current = serde_json::to_vec(value).map_or(0, |v| v.len());
    if target > current {
        value["description"] = json!("x".repeat(target - current));
    }
}

/// A line of one of the invalid kinds, derived from a valid span.
fn invalid_line(rng: &mut StdRng, valid: &serde_json::Value) -> Vec<u8> {
    let mut v = valid.clone();
    match rng.random_range(0..5) {
        0 => return b"{\"truncated\": ".to_vec(),
        1 => v["span_id"] = json!("not-hex"),
        2 => v["project_id"] = json!("one"),
        3 => {
            if let Some(map) = v.as_object_mut() {
                map.remove("trace_id");
            }
        }
        _ => return b"\xff\xfe not utf-8".to_vec(),
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::span::decode_span;

    fn lines(spec: &GenSpec) -> (Vec<Vec<u8>>, GenSummary) {
        let mut out = Vec::new();
        let summary = generate(spec, |l| out.push(l.to_vec()));
        (out, summary)
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let spec = GenSpec {
            traces: 20,
            ..GenSpec::default()
        };
        assert_eq!(lines(&spec).0, lines(&spec).0);
        let other = GenSpec {
            seed: 2,
            ..spec.clone()
        };
        assert_ne!(lines(&spec).0, lines(&other).0);
    }

    #[test]
    fn sliding_shuffle_spreads_a_segment_and_puts_children_first_often() {
        let spec = GenSpec {
            traces: 200,
            ..GenSpec::default()
        };
        let (out, _) = lines(&spec);
        let spans: Vec<_> = out
            .iter()
            .map(|l| decode_span(l, 1 << 20).expect("valid"))
            .collect();
        let mut first: HashMap<&str, usize> = HashMap::new();
        let mut last: HashMap<&str, usize> = HashMap::new();
        let mut position: HashMap<&str, usize> = HashMap::new();
        for (i, s) in spans.iter().enumerate() {
            first.entry(s.trace_id.as_str()).or_insert(i);
            last.insert(s.trace_id.as_str(), i);
            position.insert(s.span_id.as_str(), i);
        }
        // A 20-span segment spreads over most of a 1000-line window.
        let mean_spread =
            first.iter().map(|(t, f)| (last[t] - f) as f64).sum::<f64>() / first.len() as f64;
        assert!(mean_spread > 600.0, "mean spread {mean_spread}");
        // Children before their parents about half the time.
        let with_parent: Vec<_> = spans
            .iter()
            .filter_map(|s| Some((s, position.get(s.parent_span_id.as_deref()?)?)))
            .collect();
        let early = with_parent
            .iter()
            .filter(|(s, &p)| position[s.span_id.as_str()] < p)
            .count() as f64
            / with_parent.len() as f64;
        assert!((0.3..0.6).contains(&early), "children first {early}");

        // Blocks are another order of the same spans.
        let blocks = GenSpec {
            shuffle: Shuffle::Blocks,
            ..spec
        };
        let (out, _) = lines(&blocks);
        assert_ne!(out, lines(&spec).0);
    }

    #[test]
    fn shape_sizes_and_validity() {
        let spec = GenSpec {
            traces: 30,
            segments_per_trace: 3,
            spans_per_segment: 7,
            depth: 2,
            payload_bytes: 900,
            ..GenSpec::default()
        };
        let (out, summary) = lines(&spec);
        assert_eq!(summary.spans, 30 * 3 * 7);
        assert_eq!(summary.segments, 90);
        assert_eq!(out.len(), summary.lines);
        let mut inner_roots = 0;
        let mut last_received = 0.0;
        for line in &out {
            let span = decode_span(line, 1 << 20).expect("valid");
            assert!((880..=960).contains(&line.len()), "{} bytes", line.len());
            inner_roots += usize::from(span.is_segment_span && span.parent_span_id.is_some());
            let received = span.received.expect("received");
            assert!(received >= last_received, "received never goes backwards");
            last_received = received;
        }
        assert_eq!(inner_roots, 30 * 2);
    }

    #[test]
    fn late_and_invalid_fractions() {
        let spec = GenSpec {
            traces: 100,
            late_fraction: 0.1,
            invalid_fraction: 0.05,
            ..GenSpec::default()
        };
        let (out, summary) = lines(&spec);
        assert!(summary.late > 100 && summary.late < 300, "{summary:?}");
        assert!(summary.invalid > 40 && summary.invalid < 170, "{summary:?}");
        let invalid = out
            .iter()
            .filter(|l| decode_span(l, 1 << 20).is_err())
            .count();
        assert_eq!(invalid, summary.invalid);
        let last = decode_span(out.last().expect("lines"), 1 << 20)
            .ok()
            .and_then(|s| s.received)
            .unwrap_or(f64::MAX);
        assert!(
            last >= spec.start + spec.late_after_secs,
            "late spans come after the delay"
        );
    }
}
