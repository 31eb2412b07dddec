//! Proves the real-server helpers in `tests/support` work before other tests lean
//! on them: a standalone redis-server (commands, extra config, restart, cleanup on
//! drop), a three-master Redis Cluster used through the async cluster client, and
//! a tansu broker with an explicitly created topic, produced to and consumed from
//! through a consumer group with committed offsets.
//!
//! These tests check the helpers only; they must not test spanbuf itself.

mod support;

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset, TopicPartitionList};
use redis::AsyncCommands;

use support::{Broker, RedisCluster, RedisServer};

/// Deadline for consuming back what was produced.
const CONSUME_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn redis_server_serves_commands_restarts_and_is_reaped_on_drop() {
    let mut server = RedisServer::start();
    let client = redis::Client::open(server.url()).expect("valid redis url");
    let mut conn = client.get_connection().expect("connect to redis-server");

    let pong: String = redis::cmd("PING").query(&mut conn).expect("PING");
    assert_eq!(pong, "PONG");
    let () = redis::cmd("SET")
        .arg("selftest:key")
        .arg("value")
        .query(&mut conn)
        .expect("SET");
    let value: Option<String> = redis::cmd("GET")
        .arg("selftest:key")
        .query(&mut conn)
        .expect("GET");
    assert_eq!(value.as_deref(), Some("value"));

    let (port, old_pid) = (server.port(), server.pid());
    server.restart();
    assert_eq!(server.port(), port, "restart must keep the port");
    assert_ne!(server.pid(), old_pid, "restart must start a new process");
    assert!(
        !Path::new(&format!("/proc/{old_pid}")).exists(),
        "the killed process must be reaped, not left a zombie"
    );

    let mut conn = client.get_connection().expect("reconnect after restart");
    let pong: String = redis::cmd("PING")
        .query(&mut conn)
        .expect("PING after restart");
    assert_eq!(pong, "PONG");
    let value: Option<String> = redis::cmd("GET")
        .arg("selftest:key")
        .query(&mut conn)
        .expect("GET after restart");
    assert_eq!(value, None, "nothing is persisted across a restart");

    let pid = server.pid();
    drop(conn);
    drop(server);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "dropping the server must kill and reap it"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing may listen on the port after drop"
    );
}

#[test]
fn redis_server_takes_extra_config() {
    let server =
        RedisServer::start_with(&["--maxmemory", "10mb", "--maxmemory-policy", "noeviction"]);
    let mut conn = server.connection();
    let maxmemory: (String, String) = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory")
        .query(&mut conn)
        .expect("CONFIG GET maxmemory");
    assert_eq!(maxmemory.1, (10 * 1024 * 1024).to_string());
    let policy: (String, String) = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query(&mut conn)
        .expect("CONFIG GET maxmemory-policy");
    assert_eq!(policy.1, "noeviction");
}

#[tokio::test]
async fn redis_cluster_spreads_keys_over_all_masters() {
    let cluster = RedisCluster::start();
    assert_eq!(cluster.urls().len(), 3);

    let client = redis::cluster::ClusterClient::new(cluster.urls()).expect("cluster client");
    let mut conn = client
        .get_async_connection()
        .await
        .expect("connect to the cluster");
    for i in 0..100 {
        let () = conn
            .set(format!("selftest:{i}"), i)
            .await
            .expect("SET through the cluster");
    }
    for i in 0..100 {
        let value: i64 = conn
            .get(format!("selftest:{i}"))
            .await
            .expect("GET through the cluster");
        assert_eq!(value, i);
    }

    let sizes: Vec<i64> = cluster
        .nodes()
        .iter()
        .map(|node| {
            redis::cmd("DBSIZE")
                .query(&mut node.connection())
                .expect("DBSIZE")
        })
        .collect();
    assert_eq!(sizes.iter().sum::<i64>(), 100, "per-node sizes {sizes:?}");
    assert!(
        sizes.iter().all(|&n| n > 0),
        "every master must hold some of the keys: {sizes:?}"
    );
}

#[tokio::test]
async fn broker_round_trips_messages_and_commits_through_a_consumer_group() {
    const TOPIC: &str = "selftest";
    const GROUP: &str = "selftest-group";
    const PARTITIONS: i32 = 3;

    let broker = Broker::start();
    broker.create_topic(TOPIC, PARTITIONS);
    let producer: FutureProducer = broker
        .client_config()
        .set("message.timeout.ms", "10000")
        .set("compression.type", "zstd")
        .create()
        .expect("create producer");

    let first = produce(&producer, TOPIC, 0..10, PARTITIONS).await;
    let consumer = subscribe(&broker, GROUP, TOPIC);
    let (consumed, next_offsets) = consume(&consumer, first.len()).await;
    assert_eq!(consumed, first);
    consumer
        .commit(&next_offsets, CommitMode::Sync)
        .expect("commit offsets");
    // The list `committed` returns holds references into the client; it must be
    // gone before the consumer is dropped, or librdkafka's destroy waits forever.
    let committed: BTreeMap<i32, Offset> = consumer
        .committed(Duration::from_secs(10))
        .expect("fetch committed offsets")
        .elements_for_topic(TOPIC)
        .iter()
        .map(|e| (e.partition(), e.offset()))
        .collect();
    let expected: BTreeMap<i32, Offset> = (0..PARTITIONS)
        .map(|p| {
            let count = first
                .values()
                .filter(|(_, partition)| *partition == p)
                .count();
            (p, Offset::Offset(count as i64))
        })
        .collect();
    assert_eq!(committed, expected, "committed offsets per partition");
    drop(consumer);

    // A new member of the same group resumes from the committed offsets: it sees
    // only what was produced after the commit.
    let second = produce(&producer, TOPIC, 10..13, PARTITIONS).await;
    let consumer = subscribe(&broker, GROUP, TOPIC);
    let (consumed, _) = consume(&consumer, second.len()).await;
    assert_eq!(consumed, second);
}

/// Produces `key-i` / `payload-i` to partition `i % partitions` for each `i`,
/// awaiting each delivery; returns key -> (payload, partition).
async fn produce(
    producer: &FutureProducer,
    topic: &str,
    range: std::ops::Range<i32>,
    partitions: i32,
) -> BTreeMap<String, (String, i32)> {
    let mut produced = BTreeMap::new();
    for i in range {
        let key = format!("key-{i}");
        let payload = format!("payload-{i}");
        let record = FutureRecord::to(topic)
            .key(&key)
            .payload(&payload)
            .partition(i % partitions);
        let delivery = producer
            .send(record, Timeout::After(Duration::from_secs(10)))
            .await
            .unwrap_or_else(|(e, _)| panic!("delivering message {i}: {e}"));
        assert_eq!(delivery.partition, i % partitions);
        produced.insert(key, (payload, delivery.partition));
    }
    produced
}

fn subscribe(broker: &Broker, group: &str, topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = broker
        .group_consumer_config(group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("create consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    consumer
}

/// Receives `count` messages (or panics after `CONSUME_TIMEOUT`); returns
/// key -> (payload, partition) and the offsets to commit after them.
async fn consume(
    consumer: &StreamConsumer,
    count: usize,
) -> (BTreeMap<String, (String, i32)>, TopicPartitionList) {
    let mut consumed = BTreeMap::new();
    let mut next_offsets = BTreeMap::new();
    let receive = async {
        while consumed.len() < count {
            let message = consumer.recv().await.expect("receive a message");
            let key = String::from_utf8(message.key().expect("key").to_vec()).expect("utf-8 key");
            let payload = String::from_utf8(message.payload().expect("payload").to_vec())
                .expect("utf-8 payload");
            next_offsets.insert(
                (message.topic().to_string(), message.partition()),
                message.offset() + 1,
            );
            consumed.insert(key, (payload, message.partition()));
        }
    };
    let received = tokio::time::timeout(CONSUME_TIMEOUT, receive).await;
    assert!(
        received.is_ok(),
        "consumed only {consumed:?} of {count} within {CONSUME_TIMEOUT:?}"
    );
    let mut list = TopicPartitionList::new();
    for ((topic, partition), offset) in next_offsets {
        list.add_partition_offset(&topic, partition, Offset::Offset(offset))
            .expect("add offset to list");
    }
    (consumed, list)
}
