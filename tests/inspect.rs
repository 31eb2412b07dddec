//! `spanbuf inspect` against real Redis (standalone and a local 3-master
//! cluster): the library report at a clock the test passes in, and the binary
//! as an operator runs it (`--json`, the table, `--max-keys`, Redis down).
//!
//! Every figure is checked against a buffer whose contents the test knows
//! exactly, and the key count against an independent reader of Redis.

mod common;
mod support;

use std::process::Output;

use serde_json::Value;

use common::both;
use common::*;
use spanbuf::inspect::{inspect, InspectReport, RedisMode, ShardReport};
use spanbuf::store::Keys;

const T0: f64 = 1_700_000_000.0;
/// The clock of the library checks: 30 s after the main ingest.
const NOW: f64 = T0 + 30.0;

both!(
    report_matches_the_buffer,
    max_keys_truncates_but_keeps_every_shard
);

/// Fills the buffer of `env` (default timeouts: 10 s with root, 60 s without)
/// and takes one flush lock:
/// - shard 0: trace 1 root + child (one segment, 2 spans, deadline T0+10) and
///   trace 2 orphan (1 span, deadline T0+60);
/// - shard 1: trace 3 orphan (1 span, deadline T0+60);
/// - shard 2, ingested at T0-100: trace 4 with two roots, one with a child
///   (two segments, 3 spans, deadline T0-90).
///
/// 5 segments, 5 payload sets (one subsegment each), 7 spans, 4 traces.
async fn populate(env: &mut Env) {
    let (t1, t2, t3, t4) = (trace(1), trace(2), trace(3), trace(4));
    env.ingest_on(
        0,
        &[
            TestSpan::new(&t1, &id(1), None),
            TestSpan::new(&t1, &id(2), Some(&id(1))),
        ],
        T0,
    )
    .await;
    env.ingest_on(0, &[TestSpan::new(&t2, &id(3), Some(&id(99)))], T0)
        .await;
    env.ingest_on(1, &[TestSpan::new(&t3, &id(4), Some(&id(98)))], T0)
        .await;
    env.ingest_on(
        2,
        &[
            TestSpan::new(&t4, &id(5), None),
            TestSpan::new(&t4, &id(6), None),
            TestSpan::new(&t4, &id(7), Some(&id(6))),
        ],
        T0 - 100.0,
    )
    .await;
    let segment = env.keys().segment(&Keys::pt(1, &t1), &id(1));
    env.hold_lock(&segment, "another-flusher").await;
}

/// `(shard, queued, due)` of every shard row.
fn shard_counts(shards: &[ShardReport]) -> Vec<(u32, u64, u64)> {
    shards
        .iter()
        .map(|s| (s.shard, s.queued_segments, s.due_segments))
        .collect()
}

const EXPECTED_SHARDS: [(u32, u64, u64); 3] = [(0, 2, 1), (1, 1, 0), (2, 2, 2)];

async fn report_matches_the_buffer(backend: Backend) {
    let mut env = Env::start(backend, |_| {}).await;
    populate(&mut env).await;

    let report: InspectReport = inspect(&env.config, NOW, 1_000_000)
        .await
        .expect("inspect succeeds");

    assert_eq!(shard_counts(&report.shards), EXPECTED_SHARDS);
    let deadlines: Vec<Option<f64>> = report.shards.iter().map(|s| s.oldest_deadline).collect();
    assert_eq!(
        deadlines,
        [Some(T0 + 10.0), Some(T0 + 60.0), Some(T0 - 90.0)]
    );
    let ages: Vec<Option<f64>> = report
        .shards
        .iter()
        .map(|s| s.oldest_deadline_age_secs)
        .collect();
    assert_eq!(ages, [Some(20.0), Some(-30.0), Some(120.0)]);
    let lags: Vec<f64> = report.shards.iter().map(|s| s.lag_secs).collect();
    assert_eq!(lags, [20.0, 0.0, 120.0]);
    assert_eq!(report.shards[1].queue_key, env.keys().queue(1));

    let t = &report.totals;
    assert_eq!(t.segments_queued, 5);
    assert_eq!(t.segments_due, 3);
    assert_eq!(t.max_lag_secs, 120.0);
    assert_eq!(t.payload_sets, 5);
    // Default compression: one zstd member per subsegment.
    assert_eq!(t.payload_members, 5);
    assert_eq!(t.spans_buffered, 7);
    assert_eq!(t.segment_indexes, 5);
    assert_eq!(t.redirect_maps, 4);
    assert_eq!(t.flush_locks, 1);
    assert_eq!(t.other_keys, 0);

    // Every key under the prefix, as an independent reader finds them.
    let all_keys = env.inspect.all_keys().await.len() as u64;
    assert!(!report.truncated);
    assert_eq!(report.keys_scanned, all_keys);
    assert_eq!(report.max_keys, 1_000_000);
    // Fresh servers hold only spanbuf's keys: the DBSIZEs add up to them.
    assert_eq!(t.db_keys, all_keys);
    assert_eq!(
        report.primaries.iter().map(|p| p.db_keys).sum::<u64>(),
        all_keys
    );
    assert!(report.primaries.iter().all(|p| p.used_memory_bytes > 0));
    assert_eq!(
        t.used_memory_bytes,
        report
            .primaries
            .iter()
            .map(|p| p.used_memory_bytes)
            .sum::<u64>()
    );

    let mut addresses: Vec<String> = report.primaries.iter().map(|p| p.address.clone()).collect();
    addresses.sort();
    let mut expected: Vec<String> = match backend {
        Backend::Standalone => vec![env.config.redis.url.clone()],
        Backend::Cluster => env.config.redis.cluster_urls.clone(),
    }
    .into_iter()
    .map(|url| url.trim_start_matches("redis://").to_string())
    .collect();
    expected.sort();
    assert_eq!(addresses, expected);
    match backend {
        Backend::Standalone => assert_eq!(report.mode, RedisMode::Standalone),
        Backend::Cluster => {
            assert_eq!(report.mode, RedisMode::Cluster);
            // The keys really are spread, so the totals above summed nodes.
            let holding = report.primaries.iter().filter(|p| p.db_keys > 0).count();
            assert!(holding >= 2, "{:?}", report.primaries);
        }
    }

    // A later clock: everything is due, lags grow, nothing else changes.
    let later = inspect(&env.config, T0 + 1000.0, 1_000_000)
        .await
        .expect("inspect succeeds");
    assert_eq!(
        shard_counts(&later.shards),
        [(0, 2, 2), (1, 1, 1), (2, 2, 2)]
    );
    assert_eq!(later.totals.max_lag_secs, 1090.0);
    assert_eq!(later.totals.spans_buffered, 7);
}

async fn max_keys_truncates_but_keeps_every_shard(backend: Backend) {
    let mut env = Env::start(backend, |_| {}).await;
    populate(&mut env).await;
    let all_keys = env.inspect.all_keys().await.len() as u64;

    let report = inspect(&env.config, NOW, 1)
        .await
        .expect("inspect succeeds");
    assert!(report.truncated);
    assert_eq!(report.keys_scanned, 1);
    assert_eq!(report.max_keys, 1);
    assert_eq!(shard_counts(&report.shards), EXPECTED_SHARDS);
    assert_eq!(report.totals.segments_queued, 5);
    assert_eq!(report.totals.db_keys, all_keys);

    // A budget of exactly the key count counts everything: not truncated.
    let exact = inspect(&env.config, NOW, all_keys)
        .await
        .expect("inspect succeeds");
    assert!(!exact.truncated);
    assert_eq!(exact.keys_scanned, all_keys);
    assert_eq!(exact.totals.payload_sets, 5);

    let short = inspect(&env.config, NOW, all_keys - 1)
        .await
        .expect("inspect succeeds");
    assert!(short.truncated);
    assert_eq!(short.keys_scanned, all_keys - 1);
    assert_eq!(shard_counts(&short.shards), EXPECTED_SHARDS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_slice_shows_only_its_queues() {
    let mut env = Env::start(Backend::Standalone, |c| c.buffer.slice_id = Some(2)).await;
    env.ingest_on(5, &[TestSpan::new(&trace(1), &id(1), None)], T0)
        .await;
    // A queue of the unsliced layout under the same prefix.
    let _: i64 = env
        .inspect
        .query(redis::cmd("ZADD").arg("span-buf:q:7").arg(T0).arg("x"))
        .await;

    let report = inspect(&env.config, NOW, 1_000).await.expect("inspect");
    assert_eq!(report.slice_id, Some(2));
    assert_eq!(report.shards.len(), 1, "{:?}", report.shards);
    assert_eq!(report.shards[0].slice_id, Some(2));
    assert_eq!(report.shards[0].shard, 5);
    assert_eq!(report.shards[0].queue_key, "span-buf:q:2-5");
    assert_eq!(report.shards[0].due_segments, 1);
    assert_eq!(report.shards[0].lag_secs, 20.0);
}

// ---------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------

async fn spanbuf(args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_spanbuf"));
    cmd.args(args).env_clear();
    if let Ok(path) = std::env::var("PATH") {
        cmd.env("PATH", path);
    }
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().await.expect("spanbuf runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn json_of(out: &Output) -> Value {
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout.trim().lines().count(),
        1,
        "one JSON object: {stdout}"
    );
    serde_json::from_str(stdout.trim()).expect("stdout is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_prints_json_and_a_table() {
    let mut env = Env::start(Backend::Standalone, |_| {}).await;
    populate(&mut env).await;
    let url = env.config.redis.url.clone();
    let vars = [("SPANBUF_REDIS_URL", url.as_str())];

    // The binary runs on the wall clock: every 2023 deadline is overdue.
    let json = json_of(&spanbuf(&["inspect", "--json"], &vars).await);
    let shards = json["shards"].as_array().expect("shards array");
    let rows: Vec<(u64, u64, u64)> = shards
        .iter()
        .map(|s| {
            let n = |f: &str| s[f].as_u64().unwrap_or_else(|| panic!("{f} in {s}"));
            (n("shard"), n("queued_segments"), n("due_segments"))
        })
        .collect();
    assert_eq!(rows, [(0, 2, 2), (1, 1, 1), (2, 2, 2)]);
    for shard in shards {
        assert!(shard["lag_secs"].as_f64().expect("lag") > 0.0, "{shard}");
        assert!(shard["oldest_deadline"].as_f64().expect("deadline") < T0 + 61.0);
    }
    assert_eq!(json["mode"], "standalone");
    assert_eq!(json["key_prefix"], "span-buf");
    assert_eq!(json["truncated"], false);
    assert_eq!(json["totals"]["segments_queued"], 5);
    assert_eq!(json["totals"]["payload_sets"], 5);
    assert_eq!(json["totals"]["spans_buffered"], 7);
    assert_eq!(json["totals"]["redirect_maps"], 4);
    assert_eq!(json["totals"]["flush_locks"], 1);
    assert_eq!(
        json["primaries"][0]["address"],
        url.trim_start_matches("redis://")
    );
    assert!(json["primaries"][0]["used_memory_bytes"].as_u64() > Some(0));

    let out = spanbuf(&["inspect"], &vars).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let leading: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().take(3).collect())
        .collect();
    for row in [["0", "2", "2"], ["1", "1", "1"], ["2", "2", "2"]] {
        assert!(
            leading.iter().any(|l| l.as_slice() == row),
            "no shard row {row:?} in\n{table}"
        );
    }
    assert!(table.contains("SHARD"), "{table}");
    assert!(table.contains("flush locks held"), "{table}");
    assert!(!table.contains("TRUNCATED"), "{table}");

    let json = json_of(&spanbuf(&["inspect", "--json", "--max-keys", "1"], &vars).await);
    assert_eq!(json["truncated"], true);
    assert_eq!(json["keys_scanned"], 1);
    assert_eq!(json["shards"].as_array().map(Vec::len), Some(3));

    let out = spanbuf(&["inspect", "--max-keys", "1"], &vars).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("TRUNCATED"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_fails_cleanly_without_redis() {
    let server = support::RedisServer::start();
    let url = server.url();
    drop(server);
    let out = spanbuf(
        &["inspect", "--json"],
        &[
            ("SPANBUF_REDIS_URL", url.as_str()),
            ("SPANBUF_REDIS_TIMEOUT_MS", "2000"),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("cannot reach redis"), "{stderr}");
}
