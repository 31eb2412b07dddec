//! `spanbuf run` end to end with real processes: a redis-server, the tansu
//! broker, and the spanbuf binary. Spans produced to the input topic come out
//! as records on the output topic, every span exactly once under its root;
//! invalid input goes to the dead-letter topic; offsets are committed; SIGTERM
//! drains and exits 0.

mod e2e;
mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use e2e::*;
use support::{Broker, RedisServer};

#[test]
fn spans_in_records_out_with_dlq_commits_and_graceful_shutdown() {
    let redis = RedisServer::start();
    let broker = Broker::start();
    topics(&broker);
    let (lines, expected) = spans(0);
    produce(&broker, &lines);
    let garbage = vec![
        ("x".to_string(), b"not json".to_vec()),
        (
            "y".to_string(),
            br#"{"trace_id":"x","span_id":"y","project_id":1}"#.to_vec(),
        ),
    ];
    produce(&broker, &garbage);

    let mut worker = Worker::start(&redis, &broker);

    let mut output = Output::new(&broker);
    output.read_until(&expected, 2, Duration::from_secs(90));
    let dlq = &output.dlq;
    assert_eq!(output.claimed(), expected, "every span under its root");
    let reasons = dlq;
    assert!(
        reasons.contains(&Some(b"malformed".to_vec())),
        "{reasons:?}"
    );
    assert!(reasons.contains(&Some(b"bad_id".to_vec())), "{reasons:?}");

    // Metrics and health while running.
    wait_for(
        "metrics to show the flushed spans",
        Duration::from_secs(10),
        || worker.metric("spanbuf_spans_flushed_total") == Some(800.0),
    );
    assert_eq!(worker.metric("spanbuf_spans_consumed_total"), Some(800.0));
    assert_eq!(
        worker.metric("spanbuf_spans_invalid_total{reason=\"malformed\"}"),
        Some(1.0)
    );
    assert_eq!(worker.metric("spanbuf_dlq_records_total"), Some(2.0));
    let (status, body) = worker.get("/health").expect("health answers");
    assert_eq!(status, 200, "{body}");
    let (status, body) = worker.get("/ready").expect("ready answers");
    assert_eq!(status, 200, "{body}");

    // Offsets committed up to the end of every input partition.
    let group: BaseConsumer = broker
        .group_consumer_config(GROUP)
        .create()
        .expect("group reader");
    let mut wanted = TopicPartitionList::new();
    for p in 0..4 {
        wanted.add_partition(INPUT, p);
    }
    wait_for("offsets to be committed", Duration::from_secs(20), || {
        let Ok(committed) = group.committed_offsets(wanted.clone(), Duration::from_secs(5)) else {
            return false;
        };
        let total: i64 = committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum();
        total == lines.len() as i64 + 2
    });
    drop(group);

    let (code, stderr) = worker.terminate();
    assert_eq!(code, Some(0), "graceful exit; stderr:\n{stderr}");
    assert!(stderr.contains("draining"), "{stderr}");
}

/// Redis restarted under a running worker (no persistence, so what was
/// buffered is gone and counted): the worker pauses, retries, and recovers
/// without a restart; spans produced after the restart all come out.
#[test]
fn worker_recovers_when_redis_restarts() {
    let mut redis = RedisServer::start();
    let broker = Broker::start();
    topics(&broker);
    let mut worker = Worker::start(&redis, &broker);
    let (first, first_expected) = spans(0);
    produce(&broker, &first);
    let mut output = Output::new(&broker);
    output.read_until(&first_expected, 0, Duration::from_secs(90));

    redis.restart();
    let (second, second_expected) = spans(1000);
    produce(&broker, &second);
    let mut all = first_expected.clone();
    all.extend(second_expected);
    output.read_until(&all, 0, Duration::from_secs(90));
    assert_eq!(output.claimed(), all);
    wait_for("health after recovery", Duration::from_secs(20), || {
        worker
            .get("/ready")
            .is_some_and(|(status, _)| status == 200)
    });
    worker.stop_cleanly();
}

/// Two workers in one group split the partitions; every span comes out
/// once (a duplicate only with the same flush_id), under its root.
#[test]
fn two_workers_split_the_partitions() {
    let redis = RedisServer::start();
    let broker = Broker::start();
    topics(&broker);
    let (mut a, mut b) = two_workers(&redis, &broker);
    let (lines, expected) = spans(0);
    produce(&broker, &lines);
    let mut output = Output::new(&broker);
    output.read_until(&expected, 0, Duration::from_secs(90));
    assert_eq!(output.claimed(), expected);
    let flushed = |w: &Worker| w.metric("spanbuf_spans_flushed_total").unwrap_or(0.0);
    wait_for("metrics to add up", Duration::from_secs(10), || {
        flushed(&a) + flushed(&b) >= 800.0
    });
    assert!(
        flushed(&a) > 0.0 && flushed(&b) > 0.0,
        "both flushed: {} + {}",
        flushed(&a),
        flushed(&b)
    );
    a.stop_cleanly();
    b.stop_cleanly();
}

/// The same end-to-end path against a local 3-master Redis Cluster.
#[test]
fn end_to_end_on_redis_cluster() {
    let cluster = support::RedisCluster::start();
    let broker = Broker::start();
    topics(&broker);
    let mut worker = Worker::start_with(
        &broker,
        &[("SPANBUF_REDIS_CLUSTER_URLS", cluster.urls().join(","))],
    );
    let (lines, expected) = spans(0);
    produce(&broker, &lines);
    let mut output = Output::new(&broker);
    output.read_until(&expected, 0, Duration::from_secs(90));
    assert_eq!(output.claimed(), expected);
    worker.stop_cleanly();
}

/// Redis memory over the limit pauses consumption (flushing goes on); below
/// it again, consumption resumes by itself.
#[test]
fn hard_backpressure_pauses_and_resumes() {
    let redis = RedisServer::start();
    let broker = Broker::start();
    topics(&broker);
    let mut worker = Worker::start_with(
        &broker,
        &[
            ("SPANBUF_REDIS_URL", redis.url()),
            ("SPANBUF_MAX_REDIS_MEMORY_PERCENT", "50".into()),
            // Long enough that batch A is still buffered when the limit drops.
            ("SPANBUF_ROOT_TIMEOUT_SECS", "3".into()),
            ("SPANBUF_TIMEOUT_SECS", "5".into()),
        ],
    );
    let (first, first_expected) = spans(0);
    produce(&broker, &first);
    wait_for("batch A in Redis", Duration::from_secs(60), || {
        worker.metric("spanbuf_spans_consumed_total") == Some(800.0)
    });
    // Make Redis look nearly full: maxmemory just above what it uses now.
    let mut conn = redis.connection();
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query(&mut conn)
        .expect("info");
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used + used / 4)
        .query(&mut conn)
        .expect("config set");
    wait_for("the pause", Duration::from_secs(20), || {
        worker.metric("spanbuf_backpressure_active{reason=\"redis_memory\"}") == Some(1.0)
    });
    assert_eq!(worker.get("/ready").map(|(status, _)| status), Some(503));
    let (second, second_expected) = spans(1000);
    produce(&broker, &second);
    // Flushing goes on while paused: batch A comes out, batch B stays in Kafka.
    let mut output = Output::new(&broker);
    output.read_until(&first_expected, 0, Duration::from_secs(60));
    assert_eq!(
        worker.metric("spanbuf_spans_consumed_total"),
        Some(800.0),
        "nothing consumed while paused"
    );
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(0)
        .query(&mut conn)
        .expect("config set");
    let mut all = first_expected;
    all.extend(second_expected);
    output.read_until(&all, 0, Duration::from_secs(60));
    assert_eq!(output.claimed(), all);
    assert_eq!(
        worker.metric("spanbuf_backpressure_active{reason=\"redis_memory\"}"),
        Some(0.0)
    );
    assert!(
        worker.metric("spanbuf_backpressure_pauses_total{reason=\"redis_memory\"}") >= Some(1.0)
    );
    worker.stop_cleanly();
}

/// Segments that cannot be flushed (their locks held by someone else) build
/// up flush lag; past SPANBUF_MAX_FLUSH_LAG_SECS consumption pauses, and once
/// they flush it resumes by itself.
#[test]
fn soft_backpressure_pauses_on_flush_lag_and_resumes() {
    let redis = RedisServer::start();
    let broker = Broker::start();
    topics(&broker);
    let mut worker = Worker::start_with(
        &broker,
        &[
            ("SPANBUF_REDIS_URL", redis.url()),
            ("SPANBUF_MAX_FLUSH_LAG_SECS", "1".into()),
            // Room to take the locks before batch A is due.
            ("SPANBUF_ROOT_TIMEOUT_SECS", "5".into()),
            ("SPANBUF_TIMEOUT_SECS", "8".into()),
            ("SPANBUF_MAX_SEGMENT_LIFETIME_SECS", "60".into()),
        ],
    );
    let (first, first_expected) = spans(0);
    produce(&broker, &first);
    wait_for("batch A in Redis", Duration::from_secs(60), || {
        worker.metric("spanbuf_spans_consumed_total") == Some(800.0)
    });
    // Another flusher holds every queued segment's lock, as a live one
    // does: set with the hold (SPANBUF_REDIS_TTL_SECS, 3600 by default),
    // so it is not taken over within the lock TTL.
    let mut conn = redis.connection();
    let mut locks = Vec::new();
    for shard in 0..4 {
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(format!("span-buf:q:{shard}"))
            .arg(0)
            .arg(-1)
            .query(&mut conn)
            .expect("zrange");
        for member in members {
            let lock = format!("span-buf:fl:{member}");
            let _: () = redis::cmd("SET")
                .arg(&lock)
                .arg("another-flusher")
                .arg("EX")
                .arg(3600)
                .query(&mut conn)
                .expect("set lock");
            locks.push(lock);
        }
    }
    assert_eq!(
        locks.len(),
        100,
        "batch A is 100 segments, none flushed yet"
    );
    wait_for("the pause", Duration::from_secs(30), || {
        worker.metric("spanbuf_backpressure_active{reason=\"flush_lag\"}") == Some(1.0)
    });
    let (second, second_expected) = spans(1000);
    produce(&broker, &second);
    // Let the flusher run into the held locks for a while (about 2 s of
    // cycles): long enough that batch B would have been consumed.
    let contended = worker
        .metric("spanbuf_flush_lock_contention_total")
        .unwrap_or(0.0);
    wait_for("flush cycles", Duration::from_secs(30), || {
        worker.metric("spanbuf_flush_lock_contention_total") >= Some(contended + 2000.0)
    });
    assert_eq!(
        worker.metric("spanbuf_spans_consumed_total"),
        Some(800.0),
        "nothing consumed while paused"
    );
    let _: i64 = redis::cmd("DEL")
        .arg(&locks)
        .query(&mut conn)
        .expect("release the locks");
    let mut all = first_expected;
    all.extend(second_expected);
    let mut output = Output::new(&broker);
    output.read_until(&all, 0, Duration::from_secs(60));
    assert_eq!(output.claimed(), all);
    assert_eq!(
        worker.metric("spanbuf_backpressure_active{reason=\"flush_lag\"}"),
        Some(0.0)
    );
    assert!(worker.metric("spanbuf_backpressure_pauses_total{reason=\"flush_lag\"}") >= Some(1.0));
    worker.stop_cleanly();
}

/// One of two workers is SIGKILLed mid-stream: the other takes over its
/// partitions and every span is still delivered, a duplicate only with the
/// same flush_id.
#[test]
fn sigkill_one_worker_the_other_takes_over() {
    let redis = RedisServer::start();
    let broker = Broker::start();
    topics(&broker);
    let (mut a, mut b) = two_workers(&redis, &broker);
    let (first, mut expected) = spans(0);
    produce(&broker, &first);
    wait_for("worker a to consume", Duration::from_secs(60), || {
        a.metric("spanbuf_spans_consumed_total").unwrap_or(0.0) > 0.0
    });
    a.kill();
    let (second, second_expected) = spans(1000);
    produce(&broker, &second);
    expected.extend(second_expected);
    let mut output = Output::new(&broker);
    output.read_until(&expected, 0, Duration::from_secs(120));
    assert_eq!(output.claimed(), expected);
    assert_eq!(
        b.metric("spanbuf_assigned_partitions"),
        Some(4.0),
        "b holds every partition"
    );
    b.stop_cleanly();
}

/// SIGTERM while spans keep arriving: the worker commits only what reached
/// Redis. A second worker then delivers everything: nothing committed was
/// left out of Redis.
#[test]
fn sigterm_drain_commits_only_what_redis_holds() {
    let redis = RedisServer::start();
    let broker = Broker::start();
    topics(&broker);
    let mut first = Worker::start(&redis, &broker);
    let (early, mut expected) = spans(0);
    produce(&broker, &early);
    wait_for(
        "the first worker to consume",
        Duration::from_secs(60),
        || first.metric("spanbuf_spans_consumed_total").unwrap_or(0.0) > 0.0,
    );
    // Keep producing while the first worker drains.
    let feeder_broker = broker.bootstrap();
    let feeder = std::thread::spawn(move || {
        let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", feeder_broker)
            .create()
            .expect("producer");
        let mut all = BTreeMap::new();
        for round in 0..10 {
            let (lines, expected) = spans(10_000 + round * 100);
            for (trace, payload) in &lines {
                producer
                    .send(BaseRecord::to(INPUT).key(trace.as_bytes()).payload(payload))
                    .map_err(|(e, _)| e)
                    .expect("produce");
            }
            all.extend(expected);
            std::thread::sleep(Duration::from_millis(30));
        }
        producer.flush(Duration::from_secs(10)).expect("flush");
        all
    });
    first.stop_cleanly();
    expected.extend(feeder.join().expect("feeder"));

    let mut second = Worker::start(&redis, &broker);
    let mut output = Output::new(&broker);
    output.read_until(&expected, 0, Duration::from_secs(120));
    assert_eq!(output.claimed(), expected);
    second.stop_cleanly();
}

/// A drain that cannot finish (Redis gone with a batch in hand) ends at the
/// second signal, at once.
#[test]
fn second_signal_exits_at_once() {
    let redis = RedisServer::start();
    let broker = Broker::start();
    topics(&broker);
    let mut worker = Worker::start(&redis, &broker);
    wait_for(
        "the worker to hold partitions",
        Duration::from_secs(60),
        || worker.metric("spanbuf_assigned_partitions").unwrap_or(0.0) >= 1.0,
    );
    drop(redis);
    let (lines, _) = spans(0);
    produce(&broker, &lines);
    wait_for(
        "the worker to notice redis is gone",
        Duration::from_secs(60),
        || worker.metric("spanbuf_backpressure_active{reason=\"redis_down\"}") == Some(1.0),
    );
    let pid = worker.child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    // The first signal was handled once the HTTP endpoint shut down.
    wait_for("the drain to start", Duration::from_secs(10), || {
        worker.get("/health").is_none()
    });
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let (code, stderr) = worker.terminate();
    assert_eq!(code, Some(130), "{stderr}");
    assert!(stderr.contains("second signal"), "{stderr}");
}
