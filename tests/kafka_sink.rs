//! `KafkaSink` against a real tansu broker: what lands on the topic (one
//! message per record, key, headers, payload in both codecs, zstd), the topic
//! check at start, failure and its metrics when the broker is gone or a record
//! is too large, and raw (dead-letter) messages. Each test starts its own
//! broker; messages are read back with an assigned consumer from the start of
//! each partition up to an end marker written after the code under test,
//! so nothing else can have been written unseen.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use spanbuf::config::{Config, OutputCodec};
use spanbuf::kafka::producer::{KafkaSink, HEADER_FLUSH_ID, HEADER_SPAN_COUNT};
use spanbuf::kafka::KafkaError;
use spanbuf::metrics::Metrics;
use spanbuf::sink::{Sink, Undelivered};
use spanbuf::span::record::{build_records, from_json, from_msgpack};
use spanbuf::span::{FlushedSegment, SegmentPayloads};
use support::Broker;

/// Deadline for metadata, deliveries and reading messages back.
const TIMEOUT: Duration = Duration::from_secs(20);

fn config(broker: &Broker, topic: &str) -> Config {
    let mut config = Config::default();
    config.kafka.brokers = broker.bootstrap();
    config.kafka.output_topic = topic.to_owned();
    config
}

fn sink(config: &Config) -> (KafkaSink, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new().expect("metrics register"));
    let sink = KafkaSink::new(config, metrics.clone()).expect("producer is created");
    (sink, metrics)
}

fn produce_errors(metrics: &Metrics, kind: &str) -> u64 {
    metrics
        .produce_errors_total
        .with_label_values(&[kind])
        .get()
}

/// A span of trace `trace` with id `span`, padded with `filler` bytes.
fn span(trace: u64, span: u64, parent: Option<u64>, filler: usize) -> Bytes {
    let value = serde_json::json!({
        "trace_id": format!("{trace:032x}"),
        "span_id": format!("{span:016x}"),
        "parent_span_id": parent.map(|p| format!("{p:016x}")),
        "project_id": 7,
        "start_timestamp": 1700000000.25,
        "description": "d".repeat(filler),
    });
    Bytes::from(serde_json::to_vec(&value).expect("span serializes"))
}

/// The records of a segment rooted at span 1 of `trace` with `spans` spans.
fn segment(trace: u64, spans: u64, filler: usize, max_segment_bytes: usize) -> Vec<FlushedSegment> {
    let payloads: Vec<Bytes> = (1..=spans)
        .map(|i| span(trace, i, (i > 1).then_some(1), filler))
        .collect();
    let trace_id = format!("{trace:032x}");
    let seed = format!("seed-{trace}");
    let built = build_records(
        &SegmentPayloads {
            segment_id: &format!("{:016x}", 1),
            project_id: 7,
            trace_id: &trace_id,
            payloads: &payloads,
            flush_seed: seed.as_bytes(),
            delivered: "",
        },
        max_segment_bytes,
    );
    assert_eq!(built.spans as u64, spans);
    built.records
}

/// Payload of the end marker `read_back` writes to every partition.
const END_MARKER: &[u8] = b"end-of-test-marker";

/// Every message on `topic`, read from the start of each partition up to an
/// end marker this function first writes there (after the code under test
/// has produced everything), so a stray extra message cannot go unseen.
/// (tansu's high watermarks are not usable for this: they report the last
/// batch's base offset + 1.)
async fn read_back(broker: &Broker, topic: &str, partitions: i32) -> Vec<OwnedMessage> {
    let producer: FutureProducer = broker
        .client_config()
        .create()
        .expect("marker producer is created");
    for partition in 0..partitions {
        producer
            .send(
                FutureRecord::<[u8], [u8]>::to(topic)
                    .partition(partition)
                    .payload(END_MARKER),
                TIMEOUT,
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("end marker to {topic}/{partition}: {e}"));
    }

    let consumer: StreamConsumer = broker
        .client_config()
        .set("group.id", "kafka-sink-test-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .expect("consumer is created");
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .expect("partition offset");
    }
    consumer.assign(&assignment).expect("assign");

    let deadline = Instant::now() + TIMEOUT;
    let mut messages = Vec::new();
    let mut ended = BTreeSet::new();
    while ended.len() < partitions as usize {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, consumer.recv()).await {
            Ok(Ok(message)) if message.payload() == Some(END_MARKER) => {
                ended.insert(message.partition());
            }
            Ok(Ok(message)) => messages.push(message.detach()),
            Ok(Err(e)) => panic!("reading {topic}: {e}\n{}", broker.log_tail()),
            Err(_) => panic!(
                "end marker of {} of {partitions} partitions of {topic} not read within {TIMEOUT:?} ({} messages before)\n{}",
                ended.len(),
                messages.len(),
                broker.log_tail()
            ),
        }
    }
    messages
}

fn header<'a>(message: &'a OwnedMessage, name: &str) -> Option<&'a [u8]> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
}

/// Checks one message per record, matched by flush id: key, headers and the
/// decoded payload; records of one trace keep their order in its partition.
fn assert_delivered(
    records: &[FlushedSegment],
    messages: &[OwnedMessage],
    decode: fn(&[u8]) -> FlushedSegment,
) {
    assert_eq!(messages.len(), records.len());
    let by_flush_id: BTreeMap<&[u8], &OwnedMessage> = messages
        .iter()
        .map(|m| (header(m, HEADER_FLUSH_ID).expect("flush_id header"), m))
        .collect();
    assert_eq!(by_flush_id.len(), records.len(), "flush ids are distinct");
    let mut last_offset: BTreeMap<&str, (i32, i64)> = BTreeMap::new();
    for record in records {
        let message = by_flush_id
            .get(record.flush_id.as_bytes())
            .unwrap_or_else(|| panic!("no message for flush id {}", record.flush_id));
        assert_eq!(message.key(), Some(record.trace_id.as_bytes()));
        assert_eq!(
            header(message, HEADER_SPAN_COUNT),
            Some(record.span_count().to_string().as_bytes())
        );
        assert_eq!(
            decode(message.payload().expect("payload")),
            *record,
            "payload of {}",
            record.flush_id
        );
        let here = (message.partition(), message.offset());
        if let Some(before) = last_offset.insert(&record.trace_id, here) {
            assert_eq!(before.0, here.0, "one trace, one partition");
            assert!(before.1 < here.1, "records of a trace keep their order");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn json_records_round_trip_with_key_headers_and_zstd() {
    let broker = Broker::start();
    let topic = "buffered-segments";
    broker.create_topic(topic, 3);
    let config = config(&broker, topic);
    let (sink, metrics) = sink(&config);
    sink.check_topics(&[topic], TIMEOUT)
        .await
        .expect("output topic exists");

    let max = config.buffer.max_segment_bytes as usize;
    let mut records = Vec::new();
    for trace in 1..=12 {
        records.extend(segment(trace, 3, 50, max));
    }
    // A segment chunked for size: records of one trace that must stay in order.
    let chunked = segment(100, 6, 400, 1000);
    assert!(chunked.len() > 2 && chunked.iter().all(|r| r.skip_enrichment));
    records.extend(chunked);
    // Larger than librdkafka's default message.max.bytes (1 MB).
    records.extend(segment(200, 3, 700_000, max));

    let delivery = sink.deliver(&records).await.expect("delivery");
    assert!(delivery.is_complete(), "{delivery:?}");
    let encoded: u64 = records
        .iter()
        .map(|r| r.to_json().expect("encodes").len() as u64)
        .sum();
    assert_eq!(metrics.records_produced_total.get(), records.len() as u64);
    assert_eq!(metrics.produced_bytes_total.get(), encoded);
    for kind in ["delivery", "encode", "too_large"] {
        assert_eq!(produce_errors(&metrics, kind), 0, "{kind}");
    }

    let messages = read_back(&broker, topic, 3).await;
    assert_delivered(&records, &messages, |b| from_json(b).expect("json record"));
    let partitions: BTreeSet<i32> = messages.iter().map(|m| m.partition()).collect();
    assert!(
        partitions.len() > 1,
        "keys spread over partitions: {partitions:?}"
    );

    // Empty calls are free; shutdown flush has nothing left to wait for.
    assert!(sink
        .deliver(&[])
        .await
        .expect("nothing to deliver")
        .is_complete());
    sink.flush(TIMEOUT).await.expect("producer flushes");
    sink.check_fatal()
        .expect("no fatal error with idempotence on");
}

#[tokio::test(flavor = "multi_thread")]
async fn msgpack_records_round_trip() {
    let broker = Broker::start();
    let topic = "segments-msgpack";
    broker.create_topic(topic, 3);
    let mut config = config(&broker, topic);
    config.buffer.output_codec = OutputCodec::Msgpack;
    let (sink, metrics) = sink(&config);

    let records: Vec<FlushedSegment> = (1..=5)
        .flat_map(|trace| segment(trace, 4, 20, 10 * 1024 * 1024))
        .collect();
    let delivery = sink.deliver(&records).await.expect("delivery");
    assert!(delivery.is_complete(), "{delivery:?}");
    assert_eq!(metrics.records_produced_total.get(), records.len() as u64);
    let encoded: u64 = records
        .iter()
        .map(|r| r.to_msgpack().expect("encodes").len() as u64)
        .sum();
    assert_eq!(metrics.produced_bytes_total.get(), encoded);

    let messages = read_back(&broker, topic, 3).await;
    assert_delivered(&records, &messages, |b| {
        from_msgpack(b).expect("msgpack record")
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn check_topics_names_every_missing_topic_and_the_brokers() {
    let broker = Broker::start();
    broker.create_topic("present", 1);
    let config = config(&broker, "present");
    let (sink, _) = sink(&config);

    sink.check_topics(&["present"], TIMEOUT)
        .await
        .expect("existing topic passes");
    let err = sink
        .check_topics(&["present", "missing-one", "missing-two"], TIMEOUT)
        .await
        .expect_err("missing topics fail the check");
    assert!(matches!(err, KafkaError::Topics { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&broker.bootstrap()), "{text}");
    assert!(text.contains("topic missing-one does not exist"), "{text}");
    assert!(text.contains("topic missing-two does not exist"), "{text}");
    assert!(!text.contains("topic present"), "{text}");

    // Asking did not create them.
    let err = sink
        .check_topics(&["missing-one"], TIMEOUT)
        .await
        .expect_err("still missing");
    assert!(err.to_string().contains("missing-one"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn delivery_to_a_stopped_broker_fails_within_the_message_timeout() {
    let broker = Broker::start();
    let topic = "buffered-segments";
    broker.create_topic(topic, 3);
    let mut config = config(&broker, topic);
    let message_timeout = Duration::from_millis(2000);
    config.kafka.producer_properties.insert(
        "message.timeout.ms".to_owned(),
        message_timeout.as_millis().to_string(),
    );
    let (sink, metrics) = sink(&config);
    assert!(sink
        .deliver(&segment(1, 2, 10, 1 << 20))
        .await
        .expect("delivered while the broker is up")
        .is_complete());
    assert_eq!(metrics.records_produced_total.get(), 1);

    drop(broker);
    let records: Vec<FlushedSegment> = (2..=4).flat_map(|t| segment(t, 2, 10, 1 << 20)).collect();
    // The deadline guards against a hang; it is not a speed assertion.
    let delivery = tokio::time::timeout(TIMEOUT, sink.deliver(&records))
        .await
        .expect("deliver returns within the deadline")
        .expect("an outcome per record");
    let indices: Vec<usize> = delivery.undelivered.iter().map(|(i, _)| *i).collect();
    assert_eq!(indices, [0, 1, 2]);
    assert!(
        delivery
            .undelivered
            .iter()
            .all(|(_, u)| matches!(u, Undelivered::Retry(_))),
        "a stopped broker may come back: {delivery:?}"
    );
    let text = delivery.first_error().expect("an error");
    assert!(
        text.starts_with("3 of 3 records to kafka topic buffered-segments were not delivered (delivery=3); first error: producing a message to kafka topic buffered-segments failed: "),
        "{text}"
    );
    assert_eq!(produce_errors(&metrics, "delivery"), 3);
    assert_eq!(metrics.records_produced_total.get(), 1);

    // Shutdown does not hang on a dead broker: the flush returns within its
    // own timeout. (Its result depends on timing: librdkafka may still count
    // its own idempotence requests to the dead broker as outstanding.)
    let flushed = tokio::time::timeout(TIMEOUT, sink.flush(Duration::from_secs(5))).await;
    assert!(flushed.is_ok(), "flush is bounded by its timeout");
    assert_eq!(
        metrics.records_produced_total.get(),
        1,
        "nothing more delivered"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_above_message_max_bytes_is_rejected_for_good_and_the_rest_is_delivered() {
    let broker = Broker::start();
    let topic = "buffered-segments";
    broker.create_topic(topic, 1);
    let mut config = config(&broker, topic);
    config.buffer.max_segment_bytes = 1024;
    config.buffer.max_span_bytes = 1024;
    let (sink, metrics) = sink(&config);

    let mut records = segment(1, 2, 10, 1024);
    // Hand-made: far beyond what chunking at 1 KiB can build.
    let mut huge = segment(2, 1, 200_000, usize::MAX);
    records.append(&mut huge);
    let delivery = sink.deliver(&records).await.expect("an outcome per record");
    let [(1, Undelivered::Rejected { reason, detail })] = delivery.undelivered.as_slice() else {
        panic!("only the oversized record, rejected for good: {delivery:?}");
    };
    assert_eq!(*reason, "too_large");
    let text = detail.clone();
    assert!(text.contains("1 of 2 records"), "{text}");
    assert!(text.contains("(too_large=1)"), "{text}");
    assert!(text.contains("exceeds message.max.bytes"), "{text}");
    assert_eq!(produce_errors(&metrics, "too_large"), 1);
    assert_eq!(produce_errors(&metrics, "delivery"), 0);
    assert_eq!(metrics.records_produced_total.get(), 1);

    let messages = read_back(&broker, topic, 1).await;
    assert_delivered(&records[..1], &messages, |b| from_json(b).expect("json"));
}

#[tokio::test(flavor = "multi_thread")]
async fn produce_raw_round_trips_key_payload_and_headers() {
    let broker = Broker::start();
    broker.create_topic("dead-letters", 1);
    let config = config(&broker, "unused-output");
    let (sink, metrics) = sink(&config);

    let original = b"{\"span_id\": not json".as_slice();
    sink.produce_raw(
        "dead-letters",
        Some(b"partition-key"),
        original,
        &[
            ("reason", b"malformed_json"),
            ("partition", b"2"),
            ("offset", b"41"),
        ],
    )
    .await
    .expect("raw message is delivered");
    sink.produce_raw("dead-letters", None, b"\x00\xffbinary", &[])
        .await
        .expect("raw message without key or headers is delivered");
    // Raw messages are the caller's to count.
    assert_eq!(metrics.records_produced_total.get(), 0);

    let messages = read_back(&broker, "dead-letters", 1).await;
    let first = &messages[0];
    assert_eq!(first.key(), Some(b"partition-key".as_slice()));
    assert_eq!(first.payload(), Some(original));
    let headers: Vec<(String, Vec<u8>)> = first
        .headers()
        .expect("headers")
        .iter()
        .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
        .collect();
    assert_eq!(
        headers,
        [
            ("reason".to_owned(), b"malformed_json".to_vec()),
            ("partition".to_owned(), b"2".to_vec()),
            ("offset".to_owned(), b"41".to_vec()),
        ]
    );
    let second = &messages[1];
    assert_eq!(second.key(), None);
    assert_eq!(second.payload(), Some(b"\x00\xffbinary".as_slice()));
    assert!(second.headers().is_none_or(|h| h.count() == 0));
}
