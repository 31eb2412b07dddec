//! Coalescing windows in the worker (docs/design.md §5), with real processes:
//! a window's offsets are committed only after Redis acknowledged it, SIGTERM
//! writes the window in hand, a SIGKILL with a window staged loses nothing
//! (nothing was committed, the next owner reads it again), a revoked
//! partition's staged spans go to its new owner uncommitted, and a window
//! never holds more than its byte bound.

mod e2e;
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use e2e::*;
use support::{Broker, RedisServer};

/// A window that is written only at shutdown (or when its partitions move).
fn held_window(redis: &RedisServer) -> Vec<(&'static str, String)> {
    vec![
        ("SPANBUF_REDIS_URL", redis.url()),
        ("SPANBUF_WINDOW_MAX_MS", "60000".into()),
        ("SPANBUF_WINDOW_MAX_SPANS", "100000".into()),
    ]
}

/// Offsets the group committed, summed over the input partitions.
fn committed(broker: &Broker) -> i64 {
    let group: BaseConsumer = broker
        .group_consumer_config(GROUP)
        .create()
        .expect("group reader");
    let mut wanted = TopicPartitionList::new();
    for p in 0..4 {
        wanted.add_partition(INPUT, p);
    }
    let total = group
        .committed_offsets(wanted, Duration::from_secs(10))
        .expect("committed offsets")
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum();
    drop(group);
    total
}

/// Keys of the buffer in Redis (payload sets, indexes, queues), not counting
/// spanbuf's data-loss marker.
fn buffered_keys(redis: &RedisServer) -> Vec<String> {
    let mut conn = redis.connection();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("span-buf:*")
        .query(&mut conn)
        .expect("keys");
    keys.into_iter()
        .filter(|k| k.starts_with("span-buf:s:") || k.starts_with("span-buf:q:"))
        .collect()
}

fn consumed(worker: &Worker) -> f64 {
    worker
        .metric("spanbuf_messages_consumed_total")
        .unwrap_or(0.0)
}

/// Servers, the 800 spans of `spans(0)` produced, and a worker whose held
/// window has staged all of them; with the span id → segment id expected.
fn staged() -> (RedisServer, Broker, Worker, BTreeMap<String, String>) {
    let redis = RedisServer::start();
    let broker = Broker::start();
    topics(&broker);
    let (lines, expected) = spans(0);
    produce(&broker, &lines);
    let worker = Worker::start_with(&broker, &held_window(&redis));
    wait_for(
        "the window to stage all spans",
        Duration::from_secs(60),
        || consumed(&worker) == 800.0,
    );
    (redis, broker, worker, expected)
}

#[test]
fn offsets_are_committed_only_after_the_window_is_in_redis_and_sigterm_writes_it() {
    let (redis, broker, mut first, expected) = staged();
    // Staged, not written: nothing in Redis, nothing committed.
    assert_eq!(first.metric("spanbuf_spans_consumed_total"), Some(0.0));
    assert_eq!(buffered_keys(&redis), Vec::<String>::new());
    assert_eq!(committed(&broker), 0);

    // SIGTERM writes the window in hand, then commits it.
    first.stop_cleanly();
    assert_eq!(committed(&broker), 800);
    assert!(
        !buffered_keys(&redis).is_empty(),
        "the window reached Redis"
    );

    // The next worker flushes what the first one wrote; nothing is read again.
    let mut second = Worker::start(&redis, &broker);
    let mut output = Output::new(&broker);
    output.read_until(&expected, 0, Duration::from_secs(90));
    assert_eq!(output.claimed(), expected);
    assert_eq!(output.deliveries, 800, "every span delivered once");
    assert_eq!(second.metric("spanbuf_messages_consumed_total"), Some(0.0));
    second.stop_cleanly();
}

#[test]
fn sigkill_with_a_window_staged_loses_nothing() {
    let (redis, broker, mut first, expected) = staged();
    first.kill();
    assert_eq!(committed(&broker), 0, "a staged window is never committed");
    assert_eq!(buffered_keys(&redis), Vec::<String>::new());

    let mut second = Worker::start(&redis, &broker);
    let mut output = Output::new(&broker);
    output.read_until(&expected, 0, Duration::from_secs(90));
    assert_eq!(output.claimed(), expected);
    assert_eq!(output.deliveries, 800, "every span delivered once");
    second.stop_cleanly();
}

#[test]
fn a_revoked_partitions_staged_spans_go_to_its_new_owner_uncommitted() {
    let redis = RedisServer::start();
    let broker = Broker::start();
    topics(&broker);
    let (lines, expected) = spans(0);
    produce(&broker, &lines);
    let mut a = Worker::start_with(&broker, &held_window(&redis));
    wait_for("a to stage all spans", Duration::from_secs(60), || {
        consumed(&a) == 800.0
    });
    // b joins: a's partitions are revoked (some come back under a new epoch)
    // while its window holds their spans.
    let mut b = Worker::start(&redis, &broker);
    wait_sharing(&a, &b, true);
    wait_for(
        "a to let go of revoked spans",
        Duration::from_secs(30),
        || {
            a.metric("spanbuf_window_spans_released_total")
                .unwrap_or(0.0)
                > 0.0
        },
    );
    // b writes and flushes its partitions at once; a writes what it still
    // holds (read again under the new epoch) when it stops.
    a.stop_cleanly();
    let mut output = Output::new(&broker);
    output.read_until(&expected, 0, Duration::from_secs(90));
    assert_eq!(output.claimed(), expected);
    assert_eq!(
        output.deliveries, 800,
        "no staged span of a revoked partition was written by its old owner"
    );
    assert_eq!(committed(&broker), 800);
    b.stop_cleanly();
}

#[test]
fn a_window_never_holds_more_than_its_byte_bound() {
    let redis = RedisServer::start();
    let broker = Broker::start();
    topics(&broker);
    let (lines, expected) = spans(0);
    let span_bytes = lines.iter().map(|(_, l)| l.len()).max().unwrap_or(0);
    produce(&broker, &lines);
    // The age bound only cuts the last window short (all 800 are there).
    let vars = [
        ("SPANBUF_REDIS_URL", redis.url()),
        ("SPANBUF_WINDOW_MAX_MS", "3000".into()),
        ("SPANBUF_WINDOW_MAX_SPANS", "100000".into()),
        ("SPANBUF_WINDOW_MAX_BYTES", "4096".into()),
    ];
    let mut worker = Worker::start_with(&broker, &vars);
    let mut output = Output::new(&broker);
    output.read_until(&expected, 0, Duration::from_secs(90));
    assert_eq!(output.claimed(), expected);

    // Windows are cut by bytes alone here (the span and age bounds are far
    // away): each holds at most 4096 bytes plus the one span that crossed it.
    let most = (4096 / span_bytes + 1) as f64;
    assert!(most < 50.0, "spans of {span_bytes} bytes");
    let windows = worker
        .metric("spanbuf_window_spans_count")
        .expect("windows");
    assert!(windows >= 800.0 / most, "{windows} windows");
    assert_eq!(
        worker.metric("spanbuf_window_spans_bucket{le=\"50\"}"),
        Some(windows),
        "every window within the byte bound"
    );
    assert_eq!(
        worker.metric("spanbuf_window_spans_sum"),
        Some(800.0),
        "every span written once"
    );
    worker.stop_cleanly();
}
