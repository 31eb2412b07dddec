//! The `spanbuf` binary as an operator runs it: `spanbuf config` with good and
//! bad environments, and `spanbuf check` against a real Redis.

mod support;

use support::{spanbuf, text};

#[test]
fn config_prints_the_effective_configuration() {
    let out = spanbuf(
        &["config"],
        &[
            (
                "SPANBUF_REDIS_URL",
                "redis://spanbuf:hunter2@redis.internal:6380/0",
            ),
            ("SPANBUF_TIMEOUT_SECS", "90"),
            ("SPANBUF_KAFKA_PROP_SASL_PASSWORD", "kafka-secret"),
            ("SPANBUF_KAFKA_PROP_SECURITY_PROTOCOL", "SASL_SSL"),
        ],
    );
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}, stderr {}",
        out.status,
        text(&out.stderr)
    );
    assert!(stdout.contains("SPANBUF_TIMEOUT_SECS=90\n"), "{stdout}");
    assert!(
        stdout.contains("SPANBUF_ROOT_TIMEOUT_SECS=10\n"),
        "defaults are shown: {stdout}"
    );
    assert!(
        stdout.contains("SPANBUF_REDIS_URL=redis://spanbuf:***@redis.internal:6380/0\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("security.protocol=SASL_SSL")
            || stdout.contains("SECURITY_PROTOCOL=SASL_SSL"),
        "{stdout}"
    );
    for secret in ["hunter2", "kafka-secret"] {
        assert!(!stdout.contains(secret), "{secret} leaked: {stdout}");
        assert!(!text(&out.stderr).contains(secret));
    }
}

#[test]
fn bad_configuration_exits_2_naming_every_bad_variable() {
    let out = spanbuf(
        &["config"],
        &[
            ("SPANBUF_TIMEOUT_SECS", "soon"),
            ("SPANBUF_COMPRESSION_LEVEL", "99"),
            ("SPANBUF_OUTPUT_CODEC", "xml"),
            ("SPANBUF_ROOT_TIMOUT_SECS", "5"),
            ("SPANBUF_REDIS_URL", "http://user:hunter2@host"),
            ("SPANBUF_LOG_LEVEL", "spanbuf=loud"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let stderr = text(&out.stderr);
    for var in [
        "SPANBUF_TIMEOUT_SECS=\"soon\"",
        "SPANBUF_COMPRESSION_LEVEL=\"99\"",
        "SPANBUF_OUTPUT_CODEC=\"xml\"",
        "SPANBUF_ROOT_TIMOUT_SECS",
        "SPANBUF_REDIS_URL",
        "SPANBUF_LOG_LEVEL=\"spanbuf=loud\"",
    ] {
        assert!(stderr.contains(var), "{var} not named in: {stderr}");
    }
    assert!(
        stderr.contains("SPANBUF_ROOT_TIMEOUT_SECS"),
        "suggests the right name: {stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
    // One line per problem after the heading.
    assert_eq!(
        stderr.lines().filter(|l| l.contains("SPANBUF_")).count(),
        6,
        "{stderr}"
    );
}

#[test]
fn check_reports_redis_and_fails_cleanly_without_it() {
    let server = support::RedisServer::start();
    let out = spanbuf(&["check"], &[("SPANBUF_REDIS_URL", &server.url())]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("redis ok (standalone)"));

    let port = server.port();
    drop(server);
    let out = spanbuf(
        &["check"],
        &[
            ("SPANBUF_REDIS_URL", &format!("redis://127.0.0.1:{port}")),
            ("SPANBUF_REDIS_TIMEOUT_MS", "2000"),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("redis"), "{stderr}");
}

#[test]
fn replay_writes_records_and_a_summary_line() {
    let server = support::RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("spans.ndjson");
    let output = dir.path().join("segments.ndjson");
    let trace = "0123456789abcdef0123456789abcdef";
    let mut lines = vec![
        format!(
            r#"{{"trace_id":"{trace}","span_id":"000000000000000a","parent_span_id":null,"project_id":1,"received":1700000000.0}}"#
        ),
        String::new(),
        "garbage line".to_string(),
        format!(
            r#"{{"trace_id":"{trace}","span_id":"000000000000000b","parent_span_id":"000000000000000a","project_id":1}}"#
        ),
        format!(r#"{{"trace_id":"{trace}","span_id":"bad","project_id":1}}"#),
    ];
    lines.push(String::new());
    std::fs::write(&input, lines.join("\n")).expect("write input");

    let out = spanbuf(
        &[
            "replay",
            "--input",
            input.to_str().expect("utf-8 path"),
            "--output",
            output.to_str().expect("utf-8 path"),
            "--batch-size",
            "2",
        ],
        &[("SPANBUF_REDIS_URL", &server.url())],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let summary: serde_json::Value =
        serde_json::from_str(stderr.lines().last().expect("a summary line"))
            .expect("summary is json");
    assert_eq!(
        summary,
        serde_json::json!({"spans_in": 4, "spans_invalid": 2, "segments_out": 1, "records_out": 1,
                           "spans_out": 2, "spans_duplicate": 0, "spans_dropped": 0})
    );
    let records = std::fs::read_to_string(&output).expect("output written");
    assert_eq!(records.lines().count(), 1);
    let record: serde_json::Value = serde_json::from_str(records.trim()).expect("record is json");
    assert_eq!(record["segment_id"], "000000000000000a");
    assert_eq!(record["spans"].as_array().map(Vec::len), Some(2));
    assert_eq!(record["flush_id"].as_str().map(str::len), Some(32));
}

#[test]
fn replay_of_a_missing_file_fails_with_its_name() {
    let server = support::RedisServer::start();
    let out = spanbuf(
        &["replay", "--input", "/nonexistent/spans.ndjson"],
        &[("SPANBUF_REDIS_URL", &server.url())],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("/nonexistent/spans.ndjson"),
        "{}",
        text(&out.stderr)
    );
}

/// Issue 12 item 12: `spanbuf run` on a Redis that evicts keys when full
/// exits at once naming the setting (every evicted key is a lost span); on a
/// Redis without `maxmemory` it says hard backpressure cannot engage.
#[test]
fn run_refuses_an_evicting_redis_and_warns_without_maxmemory() {
    let evicting = support::RedisServer::start_with(&[
        "--maxmemory",
        "100mb",
        "--maxmemory-policy",
        "allkeys-lru",
    ]);
    let out = spanbuf(
        &["run"],
        &[
            ("SPANBUF_REDIS_URL", &evicting.url()),
            ("SPANBUF_HTTP_ADDR", "127.0.0.1:0"),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("maxmemory-policy allkeys-lru") && stderr.contains("noeviction"),
        "{stderr}"
    );

    // No maxmemory: a warning, then the worker goes on (and here fails on the
    // missing broker, which ends the test quickly).
    let unlimited = support::RedisServer::start();
    let out = spanbuf(
        &["run"],
        &[
            ("SPANBUF_REDIS_URL", &unlimited.url()),
            ("SPANBUF_HTTP_ADDR", "127.0.0.1:0"),
            ("SPANBUF_KAFKA_BROKERS", "127.0.0.1:1"),
        ],
    );
    let stderr = text(&out.stderr);
    assert!(stderr.contains("redis has no maxmemory"), "{stderr}");
    assert!(stderr.contains("redis memory settings"), "{stderr}");
}

/// Issue 12 item 10: memory stays bounded whatever the segments. A parent
/// arriving after 60 child segments of 900 kB each (their spans came first)
/// used to merge them all into one 54 MB segment, loaded and turned into
/// records by one flush. With children merged only up to
/// `SPANBUF_MAX_SEGMENT_BYTES` and a cycle byte budget, `spanbuf replay`
/// holds a few segments at a time; its peak RSS (logged at the end) shows it.
#[test]
fn replay_memory_stays_bounded_with_many_large_child_segments() {
    let server = support::RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("spans.ndjson");
    let trace = format!("{:032x}", 0xbead_u64);
    let id = |n: u64| format!("{:016x}", n);
    let span = |span: u64, parent: Option<u64>, filler: usize| {
        let parent = parent.map_or("null".to_owned(), |p| format!("\"{}\"", id(p)));
        format!(
            r#"{{"trace_id":"{trace}","span_id":"{}","parent_span_id":{parent},"project_id":1,"description":"{}"}}"#,
            id(span),
            "x".repeat(filler)
        )
    };
    // Batches of 61 lines: 9 of grandchildren (9 per child, 100 kB each,
    // padded with small spans of another trace), then the root with its 60
    // children in one batch of their own.
    let mut lines = Vec::new();
    for c in 0..60u64 {
        for g in 0..9u64 {
            lines.push(span(0x10000 + c * 16 + g, Some(0x100 + c), 100_000));
        }
    }
    let other = format!("{:032x}", 0xfeed_u64);
    let mut n = 0u64;
    while lines.len() % 61 != 0 {
        n += 1;
        lines.push(format!(
            r#"{{"trace_id":"{other}","span_id":"{}","parent_span_id":null,"project_id":1}}"#,
            id(0x90000 + n)
        ));
    }
    lines.push(span(1, None, 0));
    for c in 0..60u64 {
        lines.push(span(0x100 + c, Some(1), 0));
    }
    std::fs::write(&input, lines.join("\n")).expect("write input");
    let output = dir.path().join("records.ndjson");
    let out = spanbuf(
        &[
            "replay",
            "--input",
            input.to_str().expect("utf-8 path"),
            "--output",
            output.to_str().expect("utf-8 path"),
            "--batch-size",
            "61",
        ],
        &[
            ("SPANBUF_REDIS_URL", &server.url()),
            ("SPANBUF_MAX_SEGMENT_BYTES", "1048576"),
            ("SPANBUF_MAX_FLUSH_BYTES", "4194304"),
            ("SPANBUF_LOG_LEVEL", "info"),
            ("SPANBUF_LOG_FORMAT", "json"),
        ],
    );
    let stderr = text(&out.stderr);
    assert!(
        out.status.success(),
        "{}",
        &stderr[stderr.len().saturating_sub(2000)..]
    );
    let summary: serde_json::Value =
        serde_json::from_str(stderr.lines().last().expect("a summary line"))
            .expect("summary is json");
    assert_eq!(summary["spans_out"], lines.len() as u64, "{summary}");
    assert_eq!(summary["spans_dropped"], 0, "{summary}");
    let peak = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|l| l["fields"]["peak_rss_bytes"].as_u64())
        .expect("the peak RSS is logged");
    // Every record claims the root, however the segment was split.
    let records = std::fs::read_to_string(&output).expect("output written");
    let mut largest = 0;
    for line in records.lines() {
        let record: serde_json::Value = serde_json::from_str(line).expect("record is json");
        if record["trace_id"] == trace {
            assert_eq!(record["segment_id"], id(1));
        }
        largest = largest.max(line.len());
    }
    eprintln!("peak rss {peak} bytes, largest record {largest} bytes");
    assert!(
        peak < 100 * 1024 * 1024,
        "54 MB of spans, peak RSS {peak} bytes"
    );
}

/// `spanbuf audit --records-topic` stopped reading once it had seen as many
/// spans as the input holds, counting a record delivered twice (same
/// flush_id, which the contract allows) twice: the records after it were
/// never read and their spans reported missing, exactly as many as the
/// duplicates (what the chaos runs showed). It now counts distinct spans.
#[test]
fn audit_reads_past_a_record_delivered_twice() {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let broker = support::Broker::start();
    broker.create_topic("records", 1);
    let trace = format!("{:032x}", 0xa0d17_u64);
    let span = |id: &str, parent: Option<&str>| {
        serde_json::json!({"trace_id": trace, "span_id": id, "parent_span_id": parent,
                           "project_id": 1, "start_timestamp": 1.0, "end_timestamp": 2.0})
    };
    let a = [
        span("000000000000000a", None),
        span("000000000000000b", Some("000000000000000a")),
    ];
    let c = [
        span("000000000000000c", None),
        span("000000000000000d", Some("000000000000000c")),
    ];
    let record = |flush_id: &str, segment: &str, spans: &[serde_json::Value]| {
        serde_json::json!({"flush_id": flush_id, "segment_id": segment, "project_id": 1,
                           "trace_id": trace, "spans": spans})
        .to_string()
    };
    let producer: ThreadedProducer<DefaultProducerContext> =
        broker.client_config().create().expect("producer");
    for payload in [
        record("f1", "000000000000000a", &a),
        record("f1", "000000000000000a", &a),
        record("f2", "000000000000000c", &c),
    ] {
        producer
            .send(
                BaseRecord::to("records")
                    .key(trace.as_bytes())
                    .payload(&payload),
            )
            .map_err(|(e, _)| e)
            .expect("produce");
    }
    producer
        .flush(std::time::Duration::from_secs(10))
        .expect("flush");

    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("spans.ndjson");
    let lines: Vec<String> = a.iter().chain(&c).map(|s| s.to_string()).collect();
    std::fs::write(&input, lines.join("\n")).expect("write spans");
    let out = spanbuf(
        &[
            "audit",
            "--spans",
            input.to_str().expect("utf-8 path"),
            "--records-topic",
            "records",
            "--idle-secs",
            "3",
        ],
        &[("SPANBUF_KAFKA_BROKERS", &broker.bootstrap())],
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the report is json");
    assert_eq!(report["missing"], 0, "{report}");
    assert_eq!(report["duplicated_same_flush_id"], 2, "{report}");
    assert_eq!(report["records"], 3, "{report}");
}
