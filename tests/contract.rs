//! Settings the contract allows, tried through the binary as an operator runs
//! it: `spanbuf config` accepts them (warning at most), and `spanbuf replay`
//! does with them what docs/design.md says — chunking and detach with any pair
//! of segment and span limits, a lifetime cap below the timeout, and
//! duplicates counted as duplicates (never as loss) at every compression level
//! and batch size.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;
use serde_json::value::RawValue;

use support::{spanbuf, text, RedisServer};

const T0: f64 = 1_700_000_000.0;

fn trace(n: u64) -> String {
    format!("{n:032x}")
}

fn id(n: u64) -> String {
    format!("{n:016x}")
}

/// One span line; `filler` pads the JSON to about that many extra bytes.
fn span_line(
    trace: &str,
    span: &str,
    parent: Option<&str>,
    received: f64,
    filler: usize,
) -> String {
    let parent = parent.map_or("null".to_owned(), |p| format!("\"{p}\""));
    format!(
        r#"{{"trace_id":"{trace}","span_id":"{span}","parent_span_id":{parent},"project_id":1,"received":{received:.3},"data":{{"pad":"{}"}}}}"#,
        "x".repeat(filler)
    )
}

/// One FlushedSegment as written by replay, with the spans as their bytes.
#[derive(Deserialize)]
struct Record {
    flush_id: String,
    segment_id: String,
    #[serde(default)]
    skip_enrichment: bool,
    spans: Vec<Box<RawValue>>,
}

#[derive(Deserialize)]
struct OutSpan {
    span_id: String,
    is_segment: bool,
    attributes: BTreeMap<String, serde_json::Value>,
}

impl Record {
    fn spans(&self) -> Vec<OutSpan> {
        self.spans
            .iter()
            .map(|raw| serde_json::from_str(raw.get()).expect("span is json"))
            .collect()
    }

    fn span_bytes(&self) -> usize {
        self.spans.iter().map(|raw| raw.get().len()).sum()
    }
}

/// What one `spanbuf replay` run returned.
struct Replayed {
    summary: serde_json::Value,
    records: Vec<Record>,
    stderr: String,
}

impl Replayed {
    fn count(&self, field: &str) -> u64 {
        self.summary[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} in {}", self.summary))
    }

    /// Span id → how many records carried it.
    fn deliveries(&self) -> BTreeMap<String, usize> {
        let mut seen = BTreeMap::new();
        for record in &self.records {
            for span in record.spans() {
                *seen.entry(span.span_id).or_default() += 1;
            }
        }
        seen
    }
}

fn replay(
    dir: &Path,
    lines: &[String],
    args: &[&str],
    vars: &[(&str, &str)],
    server: &RedisServer,
) -> Replayed {
    let input = dir.join("spans.ndjson");
    let output = dir.join("segments.ndjson");
    std::fs::write(&input, lines.join("\n")).expect("write input");
    let mut all_args = vec![
        "replay",
        "--input",
        input.to_str().expect("utf-8 path"),
        "--output",
        output.to_str().expect("utf-8 path"),
    ];
    all_args.extend_from_slice(args);
    let url = server.url();
    let mut all_vars = vec![("SPANBUF_REDIS_URL", url.as_str())];
    all_vars.extend_from_slice(vars);
    let out = spanbuf(&all_args, &all_vars);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "replay {args:?} {vars:?}: {stderr}");
    let summary = serde_json::from_str(stderr.lines().last().expect("a summary line"))
        .expect("summary is json");
    let records = std::fs::read_to_string(&output)
        .expect("output written")
        .lines()
        .map(|l| serde_json::from_str(l).expect("record is json"))
        .collect();
    Replayed {
        summary,
        records,
        stderr,
    }
}

/// Every input span delivered exactly once, nothing counted as dropped.
fn assert_delivered_once(run: &Replayed, expected: &BTreeSet<String>, context: &str) {
    let deliveries = run.deliveries();
    let twice: Vec<_> = deliveries.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "{context}: delivered twice: {twice:?}");
    let got: BTreeSet<String> = deliveries.into_keys().collect();
    assert_eq!(&got, expected, "{context}: spans delivered");
    assert_eq!(run.count("spans_dropped"), 0, "{context}: {}", run.summary);
}

#[test]
fn config_accepts_what_the_contract_allows_and_blames_only_what_was_set() {
    for vars in [
        vec![("SPANBUF_MAX_SEGMENT_BYTES", "1400")],
        vec![
            ("SPANBUF_MAX_SEGMENT_BYTES", "1400"),
            ("SPANBUF_MAX_SPAN_BYTES", "65536"),
        ],
        vec![("SPANBUF_MAX_SEGMENT_LIFETIME_SECS", "30")],
        vec![("SPANBUF_MAX_SEGMENT_LIFETIME_SECS", "1")],
        vec![
            ("SPANBUF_TIMEOUT_SECS", "30"),
            ("SPANBUF_ROOT_TIMEOUT_SECS", "31"),
        ],
    ] {
        let out = spanbuf(&["config"], &vars);
        assert!(
            out.status.success(),
            "{vars:?} refused: {}",
            text(&out.stderr)
        );
        for (name, value) in &vars {
            assert!(
                text(&out.stdout).contains(&format!("{name}={value}\n")),
                "{vars:?}: {}",
                text(&out.stdout)
            );
        }
    }

    // Unusual settings are accepted with a warning on stderr.
    let out = spanbuf(&["config"], &[("SPANBUF_MAX_SEGMENT_LIFETIME_SECS", "30")]);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("warning") && stderr.contains("SPANBUF_MAX_SEGMENT_LIFETIME_SECS (30)"),
        "{stderr}"
    );

    // A TTL that the default lifetime cap outlasts would lose spans: refused,
    // naming the variable the operator set, not the default.
    let out = spanbuf(&["config"], &[("SPANBUF_REDIS_TTL_SECS", "300")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    let problems: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("SPANBUF_"))
        .collect();
    assert_eq!(problems.len(), 1, "{stderr}");
    assert!(
        problems[0].starts_with("SPANBUF_REDIS_TTL_SECS:"),
        "{stderr}"
    );
}

/// Ten traces, each one segment of a root and 11 children of about 600 bytes,
/// plus a 3,000-byte span per trace (over the 1,400-byte segment limit), in
/// batches of 4 lines: later batches reach segments that are already at the
/// limit (detach), and each flushed segment is chunked.
fn detach_and_chunk(vars: &[(&str, &str)]) {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut lines = Vec::new();
    let mut expected = BTreeSet::new();
    for t in 0..10 {
        let tr = trace(t + 1);
        let root = id(t * 100 + 1);
        lines.push(span_line(&tr, &root, None, T0, 500));
        expected.insert(root.clone());
        for c in 0..12 {
            let span = id(t * 100 + 2 + c);
            let filler = if c == 5 { 3000 } else { 500 };
            lines.push(span_line(&tr, &span, Some(&root), T0, filler));
            expected.insert(span);
        }
    }
    let run = replay(dir.path(), &lines, &["--batch-size", "4"], vars, &server);
    let context = format!("{vars:?}");
    assert_delivered_once(&run, &expected, &context);
    assert_eq!(run.count("spans_invalid"), 0, "{context}: {}", run.summary);

    let mut oversized_alone = 0;
    for record in &run.records {
        if record.spans.len() > 1 {
            assert!(
                record.span_bytes() <= 1400,
                "{context}: a chunk of {} spans holds {} bytes",
                record.spans.len(),
                record.span_bytes()
            );
        } else if record.span_bytes() > 1400 {
            oversized_alone += 1;
        }
        assert_eq!(record.flush_id.len(), 32);
        for span in record.spans() {
            // No span claims a segment id that is not a real root: every span
            // of trace t belongs to the segment of its root.
            let segment = span.attributes["sentry.segment.id"]["value"]
                .as_str()
                .expect("segment id filled in")
                .to_owned();
            assert_eq!(segment, record.segment_id, "{context}");
            assert!(expected.contains(&segment), "{context}: {segment}");
            assert_eq!(span.is_segment, span.span_id == record.segment_id);
        }
    }
    assert_eq!(
        oversized_alone, 10,
        "{context}: each large span is a chunk alone"
    );
    // Segments larger than the limit went out as flagged chunks.
    assert!(
        run.records.iter().filter(|r| r.skip_enrichment).count() >= 10,
        "{context}: {} records",
        run.records.len()
    );
}

#[test]
fn a_small_segment_limit_detaches_and_chunks_with_the_default_span_limit() {
    detach_and_chunk(&[("SPANBUF_MAX_SEGMENT_BYTES", "1400")]);
}

#[test]
fn a_small_segment_limit_detaches_and_chunks_with_a_larger_span_limit() {
    detach_and_chunk(&[
        ("SPANBUF_MAX_SEGMENT_BYTES", "1400"),
        ("SPANBUF_MAX_SPAN_BYTES", "65536"),
    ]);
}

#[test]
fn a_lifetime_below_the_timeout_flushes_at_the_cap() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // A rootless segment kept busy every 5 s: the 60 s inactivity timeout
    // would not fire before T0 + 85, the 30 s cap fires at T0 + 30.
    let busy = trace(1);
    let parent = id(999);
    let mut lines = Vec::new();
    let mut expected = BTreeSet::new();
    for i in 0..6 {
        let span = id(i + 1);
        lines.push(span_line(
            &busy,
            &span,
            Some(&parent),
            T0 + 5.0 * i as f64,
            10,
        ));
        expected.insert(span);
    }
    // Another trace moves the clock past the cap; it is not due itself.
    lines.push(span_line(&trace(2), &id(500), None, T0 + 31.0, 10));

    let run = replay(
        dir.path(),
        &lines,
        &["--batch-size", "1", "--no-drain"],
        &[("SPANBUF_MAX_SEGMENT_LIFETIME_SECS", "30")],
        &server,
    );
    assert_eq!(run.records.len(), 1, "{}", run.stderr);
    assert_eq!(run.records[0].segment_id, parent);
    let got: BTreeSet<String> = run.records[0]
        .spans()
        .into_iter()
        .map(|s| s.span_id)
        .collect();
    assert_eq!(got, expected);
    assert_eq!(run.count("spans_dropped"), 0);
    assert!(
        run.stderr.contains("the cap decides"),
        "the unusual setting is logged: {}",
        run.stderr
    );
}

/// 300 distinct spans (30 traces × a root and 9 children), each line given
/// twice: right after itself (the same batch at most sizes) and again after
/// the whole file (other batches; for 500 the first copy and the second
/// copy of the first 200 lines share the first batch).
fn duplicated_input() -> (Vec<String>, BTreeSet<String>) {
    let mut once = Vec::new();
    let mut expected = BTreeSet::new();
    for t in 0..30 {
        let tr = trace(t + 1);
        let root = id(t * 100 + 1);
        once.push(span_line(&tr, &root, None, T0, 200));
        expected.insert(root.clone());
        for c in 0..9 {
            let span = id(t * 100 + 2 + c);
            once.push(span_line(&tr, &span, Some(&root), T0, 200));
            expected.insert(span);
        }
    }
    let mut lines = Vec::new();
    for line in &once {
        lines.push(line.clone());
        lines.push(line.clone());
    }
    lines.extend(once.iter().cloned());
    (lines, expected)
}

#[test]
fn duplicates_are_counted_as_duplicates_at_every_compression_and_batch_size() {
    let (lines, expected) = duplicated_input();
    let total = lines.len() as u64;
    for compression in ["-1", "0", "3"] {
        for batch in ["1", "2", "500"] {
            let server = RedisServer::start();
            let dir = tempfile::tempdir().expect("tempdir");
            let run = replay(
                dir.path(),
                &lines,
                &["--batch-size", batch],
                &[("SPANBUF_COMPRESSION_LEVEL", compression)],
                &server,
            );
            let context = format!("compression {compression}, batch {batch}: {}", run.summary);
            assert_delivered_once(&run, &expected, &context);
            assert_eq!(run.count("spans_in"), total, "{context}");
            assert_eq!(run.count("spans_out"), expected.len() as u64, "{context}");
            assert_eq!(
                run.count("spans_duplicate"),
                total - expected.len() as u64,
                "{context}"
            );
        }
    }
}
