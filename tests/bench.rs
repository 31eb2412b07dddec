//! `spanbuf bench` and `spanbuf gen` as an operator runs them: a real sweep
//! through a real Redis (and once through a real broker) must write a table,
//! CSV, JSON and a PNG with one row per point, and account for every span;
//! `gen` must give the same bytes for the same seed.

mod support;

use support::{spanbuf, text};

use std::path::Path;

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Short timeouts so a point ends soon after its input.
const FAST: [(&str, &str); 3] = [
    ("SPANBUF_ROOT_TIMEOUT_SECS", "1"),
    ("SPANBUF_TIMEOUT_SECS", "2"),
    ("SPANBUF_FLUSH_INTERVAL_MS", "50"),
];

#[test]
fn sweep_writes_table_csv_json_and_plot_and_accounts_for_every_span() {
    let server = support::RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = server.url();
    let mut vars = vec![("SPANBUF_REDIS_URL", url.as_str())];
    vars.extend(FAST);
    let out = spanbuf(
        &[
            "bench",
            "--traces",
            "60",
            "--spans-per-segment",
            "5",
            "--segments-per-trace",
            "2",
            "--shards",
            "3",
            "--out-dir",
            path(dir.path()),
            "--sweep",
            "COMPRESSION_LEVEL=-1,3",
            "--sweep",
            "SPANBUF_OUTPUT_CODEC=json,msgpack",
        ],
        &vars,
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");

    // The table: a header and one row per point, first variable slowest.
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    for column in [
        "COMPRESSION_LEVEL",
        "OUTPUT_CODEC",
        "spans/s",
        "redis cpu ms/1k",
        "late p99 s",
    ] {
        assert!(lines[0].contains(column), "{column} missing: {stdout}");
    }
    let settings: Vec<Vec<&str>> = lines[1..]
        .iter()
        .map(|l| l.split_whitespace().take(2).collect())
        .collect();
    assert_eq!(
        settings,
        [
            ["-1", "json"],
            ["-1", "msgpack"],
            ["3", "json"],
            ["3", "msgpack"]
        ]
    );

    // JSON: every span of every point flushed exactly once, and the
    // measurements filled in.
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("bench.json")).expect("bench.json"),
    )
    .expect("bench.json is JSON");
    let points = json.as_array().expect("an array of points");
    assert_eq!(points.len(), 4);
    assert_eq!(points[1]["settings"]["SPANBUF_OUTPUT_CODEC"], "msgpack");
    for point in points {
        let r = &point["result"];
        let n = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
        assert_eq!(n("spans_in"), 600.0, "{r}");
        assert_eq!(n("spans_flushed"), 600.0, "{r}");
        assert_eq!(n("segments_flushed"), 120.0, "{r}");
        assert_eq!(
            n("spans_dropped") + n("spans_duplicate") + n("spans_invalid"),
            0.0,
            "{r}"
        );
        for positive in [
            "spans_per_sec",
            "segments_per_sec",
            "worker_cpu_ms_per_1k_spans",
            "redis_cpu_ms_per_1k_spans",
            "redis_commands_per_1k_spans",
            "redis_round_trips_per_1k_spans",
            "peak_rss_bytes",
            "record_bytes",
        ] {
            assert!(n(positive) > 0.0, "{positive} not positive: {r}");
        }
        assert!(n("lateness_p50_secs") >= 0.0, "{r}");
        assert!(n("lateness_p99_secs") >= n("lateness_p50_secs"), "{r}");
        assert!(n("lateness_max_secs") >= n("lateness_p99_secs"), "{r}");
    }

    // CSV: same rows, swept variables first.
    let csv = std::fs::read_to_string(dir.path().join("bench.csv")).expect("bench.csv");
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 5, "{csv}");
    assert!(
        rows[0].starts_with("SPANBUF_COMPRESSION_LEVEL,SPANBUF_OUTPUT_CODEC,"),
        "{csv}"
    );
    assert!(rows[0].contains("spans_per_sec"), "{csv}");
    assert!(rows[4].starts_with("3,msgpack,"), "{csv}");
    assert!(rows
        .iter()
        .all(|r| r.split(',').count() == rows[0].split(',').count()));

    // The plot and the generated workload.
    let png = std::fs::read(dir.path().join("bench.png")).expect("bench.png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let workload = std::fs::read_to_string(dir.path().join("workload.ndjson")).expect("workload");
    assert_eq!(workload.lines().count(), 600);
    for file in ["bench.json", "bench.csv", "bench.png"] {
        assert!(stderr.contains(file), "{file} not reported: {stderr}");
    }
}

#[test]
fn a_bad_sweep_fails_before_touching_redis_naming_the_point() {
    let server = support::RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = spanbuf(
        &[
            "bench",
            "--out-dir",
            path(dir.path()),
            "--sweep",
            "COMPRESSION_LEVEL=3,99",
            "--sweep",
            "MAX_FLUSH_SEGMENTS=100",
        ],
        &[("SPANBUF_REDIS_URL", &server.url())],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("COMPRESSION_LEVEL=99 MAX_FLUSH_SEGMENTS=100"),
        "{stderr}"
    );
    assert!(stderr.contains("SPANBUF_COMPRESSION_LEVEL"), "{stderr}");
    assert!(
        !stderr.contains("COMPRESSION_LEVEL=3 "),
        "only the bad point: {stderr}"
    );
    let mut conn = server.connection();
    let keys: u64 = redis::cmd("DBSIZE").query(&mut conn).expect("dbsize");
    assert_eq!(keys, 0, "nothing was written");
}

#[test]
fn bench_refuses_a_redis_whose_queues_are_in_use() {
    let server = support::RedisServer::start();
    let mut conn = server.connection();
    let _: i64 = redis::cmd("ZADD")
        .arg("span-buf:q:1")
        .arg(1)
        .arg("span-buf:s:{1:abc}:def")
        .query(&mut conn)
        .expect("zadd");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = spanbuf(
        &["bench", "--traces", "5", "--out-dir", path(dir.path())],
        &[("SPANBUF_REDIS_URL", &server.url())],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("hold 1 segments"), "{stderr}");
    assert!(!dir.path().join("bench.json").exists());
}

#[test]
fn bench_through_kafka_delivers_what_the_audit_finds_on_the_topic() {
    let server = support::RedisServer::start();
    let broker = support::Broker::start();
    broker.create_topic("bench-out", 2);
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, brokers) = (server.url(), broker.bootstrap());
    let mut vars = vec![
        ("SPANBUF_REDIS_URL", url.as_str()),
        ("SPANBUF_KAFKA_BROKERS", brokers.as_str()),
        ("SPANBUF_OUTPUT_TOPIC", "bench-out"),
    ];
    vars.extend(FAST);
    let out = spanbuf(
        &[
            "bench",
            "--kafka",
            "--traces",
            "40",
            "--spans-per-segment",
            "4",
            "--out-dir",
            path(dir.path()),
        ],
        &vars,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("bench.json")).expect("bench.json"),
    )
    .expect("json");
    assert_eq!(json[0]["result"]["spans_flushed"], 160, "{json}");
    assert!(
        !dir.path().join("bench.png").exists(),
        "no plot without a sweep"
    );

    let workload = dir.path().join("workload.ndjson");
    let audit = spanbuf(
        &[
            "audit",
            "--spans",
            path(&workload),
            "--records-topic",
            "bench-out",
            "--idle-secs",
            "10",
        ],
        &vars,
    );
    let report = text(&audit.stdout);
    assert!(audit.status.success(), "{report}\n{}", text(&audit.stderr));
    let report: serde_json::Value = serde_json::from_str(report.trim()).expect("audit json");
    assert_eq!(report["spans_out"], 160, "{report}");
    assert_eq!(report["missing"], 0, "{report}");
}

#[test]
fn gen_is_deterministic_per_seed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |seed: &str, name: &str| {
        let file = dir.path().join(name);
        let out = spanbuf(
            &[
                "gen",
                "--seed",
                seed,
                "--traces",
                "30",
                "--segments-per-trace",
                "3",
                "--spans-per-segment",
                "7",
                "--depth",
                "4",
                "--late-fraction",
                "0.1",
                "--invalid-fraction",
                "0.05",
                "--output",
                path(&file),
            ],
            &[],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let summary: serde_json::Value =
            serde_json::from_str(text(&out.stderr).trim()).expect("summary json");
        (std::fs::read(&file).expect("output"), summary)
    };
    let (a, summary) = run("7", "a.ndjson");
    let (b, _) = run("7", "b.ndjson");
    let (c, _) = run("8", "c.ndjson");
    assert_eq!(a, b, "same seed, same bytes");
    assert_ne!(a, c, "another seed, other bytes");
    assert_eq!(summary["spans"], 30 * 3 * 7);
    assert_eq!(summary["segments"], 30 * 3);
    let lines = a.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count();
    assert_eq!(summary["lines"], lines);
    assert!(summary["invalid"].as_u64().unwrap_or(0) > 0, "{summary}");
    assert!(summary["late"].as_u64().unwrap_or(0) > 0, "{summary}");
}
