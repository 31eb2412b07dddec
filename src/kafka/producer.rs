//! The output side of Kafka: [`KafkaSink`] delivers flushed records to the
//! output topic and, for the worker, single raw messages (dead-letter
//! forwarding) through the same producer.
//!
//! Owns the producer's librdkafka settings ([`producer_config`]): zstd,
//! `acks=all`, idempotence, and a `message.max.bytes` large enough for every
//! record chunking can build. A delivery counts only once the broker
//! acknowledged it; each record that did not go out is reported with whether
//! it ever can (too large, not encodable: never), so the flusher keeps the
//! segments of retryable ones buffered — their records that did get through
//! go out again with the same `flush_id`, which downstream drops — and counts
//! the others as dropped instead of retrying them forever.
//!
//! Must not retry a failed delivery itself (librdkafka already retries
//! within `message.timeout.ms`), log what it returns as an error (the caller
//! handles and logs it), or touch Redis.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::channel::oneshot::Canceled;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use tokio::time::error::Elapsed;

use super::{client_config, KafkaError};
use crate::config::{Config, OutputCodec};
use crate::metrics::Metrics;
use crate::sink::{Delivery, Sink, SinkError, Undelivered};
use crate::span::record::FlushedSegment;

/// `client.id` of the producer, shown in broker logs and quotas.
pub const CLIENT_ID: &str = "spanbuf-flusher";

/// Most deliveries one [`KafkaSink::deliver`] call awaits at a time: bounds
/// the memory of pending delivery futures and keeps a flush cycle from
/// filling librdkafka's queue on its own.
pub const MAX_IN_FLIGHT: usize = 1000;

/// librdkafka's upper bound for `message.max.bytes`.
const LIBRDKAFKA_MAX_MESSAGE_BYTES: u64 = 1_000_000_000;

/// Room for a record's envelope (ids, field names, the spans array) and for
/// the key and headers librdkafka counts against `message.max.bytes`.
const ENVELOPE_HEADROOM_BYTES: u64 = 64 * 1024;

/// librdkafka's default `message.timeout.ms`, used when a passthrough
/// property names it in a form this module cannot read.
const LIBRDKAFKA_DEFAULT_MESSAGE_TIMEOUT_MS: u64 = 300_000;

/// spanbuf's default `message.timeout.ms`: how long librdkafka retries one
/// record before reporting it failed. Well under `SPANBUF_MAX_LOOP_STALL_SECS`
/// (60 s by default) so a broker outage fails a flush cycle, which keeps its
/// segments buffered, instead of stalling the flush loop for librdkafka's
/// default five minutes.
const DEFAULT_MESSAGE_TIMEOUT_MS: u64 = 30_000;

/// How long past `message.timeout.ms` a delivery report may be late before
/// the record counts as failed anyway. librdkafka notices a timed-out
/// message only when its broker thread wakes up, which it may not do before
/// the end of a reconnect backoff (up to `reconnect.backoff.max.ms`, 10 s)
/// or of a connection attempt; this bounds `deliver` regardless. A record
/// given up on here may still reach the broker later: its next flush is
/// then a duplicate with the same `flush_id`.
pub const DELIVERY_REPORT_GRACE: Duration = Duration::from_secs(2);

/// Pause before retrying to enqueue when librdkafka's queue is full and this
/// call has no delivery of its own to wait for (the queue is held by other
/// callers, e.g. dead-letter forwarding).
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(50);

/// Header with the record's deterministic flush id.
pub const HEADER_FLUSH_ID: &str = "flush_id";

/// Header with the record's span count, in decimal.
pub const HEADER_SPAN_COUNT: &str = "span_count";

/// The largest record (uncompressed, plus key and headers) the producer
/// accepts, for chunks of at most `max_chunk_bytes` of serialized JSON spans
/// (the segment limit, or one span alone when spans may be larger).
///
/// JSON: the spans, one `,` between two of them (a valid span has at least
/// 91 bytes — `trace_id`, `span_id`, `project_id` with their keys — so the
/// commas add less than 1/64 of the spans' size), plus the envelope.
/// MessagePack converts those same spans; only floats grow (a 3-byte `1e5`
/// becomes 9 bytes, 4 bytes with its comma in an array), so a record is at
/// most 9/4 of the JSON spans' size plus the envelope. Capped at librdkafka's
/// limit. A larger record is refused as `too_large`: counted, never dropped
/// silently.
pub fn message_max_bytes(max_chunk_bytes: u64, codec: OutputCodec) -> u64 {
    let spans = match codec {
        OutputCodec::Json => max_chunk_bytes.saturating_add(max_chunk_bytes / 64),
        OutputCodec::Msgpack => max_chunk_bytes.saturating_mul(9) / 4,
    };
    spans
        .saturating_add(ENVELOPE_HEADROOM_BYTES)
        .min(LIBRDKAFKA_MAX_MESSAGE_BYTES)
}

/// The most serialized span bytes a record chunk may hold so that its record
/// stays within `message_max_bytes`: the inverse of [`message_max_bytes`]
/// (0 when the limit leaves no room beyond the envelope).
pub fn chunk_bytes(message_max_bytes: u64, codec: OutputCodec) -> u64 {
    let room = message_max_bytes.saturating_sub(ENVELOPE_HEADROOM_BYTES);
    match codec {
        OutputCodec::Json => room.saturating_mul(64) / 65,
        OutputCodec::Msgpack => room.saturating_mul(4) / 9,
    }
}

/// The operator's `message.max.bytes` for the producer, if one was given
/// (`SPANBUF_KAFKA_PRODUCER_PROP_MESSAGE_MAX_BYTES` or the common prefix).
fn configured_message_max_bytes(config: &Config) -> Option<u64> {
    config
        .kafka
        .producer_properties
        .get("message.max.bytes")
        .and_then(|v| v.parse().ok())
}

/// The chunk size flushed records are built with: `SPANBUF_MAX_SEGMENT_BYTES`,
/// or less when the operator lowered the producer's `message.max.bytes` (to
/// match an output topic with a smaller `max.message.bytes`), so that every
/// chunk fits; only a single span larger than that can then not be
/// delivered (counted as dropped, `too_large`).
pub fn record_chunk_bytes(config: &Config) -> u64 {
    let segment = config.buffer.max_segment_bytes;
    match configured_message_max_bytes(config) {
        Some(limit) => segment.min(chunk_bytes(limit, config.buffer.output_codec).max(1)),
        None => segment,
    }
}

/// The smallest `message.max.bytes` accepted: the envelope and a chunk of at
/// least this many span bytes.
const MIN_CHUNK_BYTES: u64 = 1024;

/// A default spanbuf sets unless a passthrough property names it (under any
/// of its librdkafka aliases, since two aliases set at once would race).
struct Setting {
    names: &'static [&'static str],
    value: String,
}

/// The producer's librdkafka configuration: `bootstrap.servers`, spanbuf's
/// defaults, then `SPANBUF_KAFKA_PRODUCER_PROP_*` / `SPANBUF_KAFKA_PROP_*`.
///
/// Defaults an operator may override: `compression.type=zstd`,
/// `enable.idempotence=true` (turn it off for a broker without idempotent
/// producers; duplicates are still recognisable by `flush_id`),
/// `linger.ms=10`, `queue.buffering.max.messages=100000`,
/// `message.timeout.ms=30000`, `client.id=spanbuf-flusher`, and
/// `message.max.bytes` = [`message_max_bytes`] (lower it to the output
/// topic's `max.message.bytes` if that is smaller: records are then chunked
/// to fit).
///
/// Refused, because they would break "delivered = acknowledged by every
/// in-sync replica" or cannot work: `acks` (or `request.required.acks`)
/// other than `all`/`-1`, `message.max.bytes` without room for a 1 KiB chunk
/// beside the envelope, and `transactional.id` (spanbuf does not run
/// transactions). A `message.max.bytes` below what a full
/// `SPANBUF_MAX_SEGMENT_BYTES` chunk needs is accepted: records are chunked
/// smaller ([`record_chunk_bytes`]).
pub fn producer_config(config: &Config) -> Result<ClientConfig, KafkaError> {
    let properties = &config.kafka.producer_properties;
    // A chunk holds at most max_segment_bytes of spans, or one span alone when
    // that span is larger (max_span_bytes may exceed the segment limit).
    let largest_chunk = config
        .buffer
        .max_segment_bytes
        .max(config.buffer.max_span_bytes);
    let max_bytes = message_max_bytes(largest_chunk, config.buffer.output_codec);
    let min_bytes = message_max_bytes(MIN_CHUNK_BYTES, config.buffer.output_codec);
    check_properties(properties, min_bytes)?;

    let defaults = [
        Setting {
            names: &["compression.type", "compression.codec"],
            value: "zstd".to_owned(),
        },
        Setting {
            names: &["acks", "request.required.acks"],
            value: "all".to_owned(),
        },
        Setting {
            names: &["enable.idempotence"],
            value: "true".to_owned(),
        },
        Setting {
            names: &["message.max.bytes"],
            value: max_bytes.to_string(),
        },
        Setting {
            names: &["linger.ms", "queue.buffering.max.ms"],
            value: "10".to_owned(),
        },
        Setting {
            names: &["queue.buffering.max.messages"],
            value: "100000".to_owned(),
        },
        Setting {
            names: &["message.timeout.ms", "delivery.timeout.ms"],
            value: DEFAULT_MESSAGE_TIMEOUT_MS.to_string(),
        },
        Setting {
            names: &["client.id"],
            value: CLIENT_ID.to_owned(),
        },
    ];
    let mut client = client_config(config, properties);
    for default in defaults {
        if !default.names.iter().any(|n| properties.contains_key(*n)) {
            client.set(default.names[0], default.value);
        }
    }
    Ok(client)
}

/// Refuses passthrough properties that would break a delivery guarantee.
fn check_properties(
    properties: &BTreeMap<String, String>,
    min_message_max_bytes: u64,
) -> Result<(), KafkaError> {
    let refuse = |property: &str, value: &str, reason| {
        Err(KafkaError::Property {
            property: property.to_owned(),
            value: value.to_owned(),
            reason,
        })
    };
    for (property, value) in properties {
        match property.as_str() {
            "acks" | "request.required.acks" if !matches!(value.as_str(), "all" | "-1") => {
                return refuse(
                    property,
                    value,
                    "spanbuf deletes buffered spans once their record is acknowledged, so it needs acks=all",
                );
            }
            // A value librdkafka cannot read is left for it to reject.
            "message.max.bytes"
                if value
                    .parse::<u64>()
                    .is_ok_and(|v| v < min_message_max_bytes) =>
            {
                return refuse(
                    property,
                    value,
                    "it leaves no room for spans beside a record's envelope (64 KiB); a record needs at least 66 KiB",
                );
            }
            "transactional.id" => {
                return refuse(
                    property,
                    value,
                    "spanbuf does not use transactions; an uninitialised transactional producer cannot produce",
                );
            }
            _ => {}
        }
    }
    Ok(())
}

/// The effective value of an integer property, `fallback` when unset or
/// unreadable (librdkafka then rejects it at creation anyway).
fn int_property(client: &ClientConfig, names: &[&str], fallback: u64) -> u64 {
    names
        .iter()
        .find_map(|n| client.get(n))
        .and_then(|v| v.parse().ok())
        .unwrap_or(fallback)
}

/// Produces flushed records to the output topic (a [`Sink`]) and raw messages
/// to any topic, through one idempotent, zstd-compressing producer.
pub struct KafkaSink {
    producer: FutureProducer,
    /// The producer's configuration, for an admin client at start.
    client: ClientConfig,
    topic: String,
    brokers: String,
    codec: OutputCodec,
    /// The effective `message.max.bytes`.
    max_message_bytes: u64,
    /// The effective `message.timeout.ms`: also how long a full local queue
    /// is waited for.
    message_timeout: Duration,
    metrics: Arc<Metrics>,
    /// Set when the broker refused a delivery in a way no retry of this
    /// producer instance can fix (see [`unrecoverable`]).
    unrecoverable: std::sync::Mutex<Option<RDKafkaErrorCode>>,
}

/// Delivery errors after which this producer instance can never deliver
/// again: the broker fenced its producer id or epoch. librdkafka does not
/// always raise them as fatal (an idempotent producer bumps its epoch after a
/// timeout, and a broker may answer the bump with a fence), so the worker
/// must restart instead of retrying forever.
fn unrecoverable(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch
    )
}

impl KafkaSink {
    /// Creates the producer (see [`producer_config`]); connects lazily, so
    /// call [`KafkaSink::check_topics`] to know the brokers are reachable.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<KafkaSink, KafkaError> {
        let client = producer_config(config)?;
        let max_message_bytes = int_property(
            &client,
            &["message.max.bytes"],
            LIBRDKAFKA_MAX_MESSAGE_BYTES,
        );
        let message_timeout = Duration::from_millis(int_property(
            &client,
            &["message.timeout.ms", "delivery.timeout.ms"],
            LIBRDKAFKA_DEFAULT_MESSAGE_TIMEOUT_MS,
        ));
        let needed = message_max_bytes(
            config
                .buffer
                .max_segment_bytes
                .max(config.buffer.max_span_bytes),
            config.buffer.output_codec,
        );
        if max_message_bytes < needed {
            tracing::warn!(
                message_max_bytes = max_message_bytes,
                chunk_bytes = record_chunk_bytes(config),
                "the producer's message.max.bytes is below what records of SPANBUF_MAX_SEGMENT_BYTES and SPANBUF_MAX_SPAN_BYTES need: segments are chunked smaller, and a span larger than a chunk cannot be delivered (dropped, counted as too_large); lower SPANBUF_MAX_SPAN_BYTES to dead-letter such spans instead"
            );
        }
        let producer: FutureProducer = client.create().map_err(|source| KafkaError::Client {
            operation: "create the producer",
            source,
        })?;
        Ok(KafkaSink {
            producer,
            client,
            topic: config.kafka.output_topic.clone(),
            brokers: config.kafka.brokers.clone(),
            codec: config.buffer.output_codec,
            max_message_bytes,
            message_timeout,
            metrics,
            unrecoverable: std::sync::Mutex::new(None),
        })
    }

    /// The effective `message.timeout.ms`.
    pub fn message_timeout(&self) -> Duration {
        self.message_timeout
    }

    /// The output topic records go to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Fails unless every topic exists with at least one partition and no
    /// error, naming each bad topic and the brokers. Fetches the metadata of
    /// all topics, so asking never auto-creates one.
    pub async fn check_topics(&self, topics: &[&str], timeout: Duration) -> Result<(), KafkaError> {
        let producer = self.producer.clone();
        let metadata =
            tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, timeout))
                .await
                .map_err(|source| KafkaError::Task {
                    operation: "metadata request",
                    source,
                })?
                .map_err(|source| KafkaError::Metadata {
                    brokers: self.brokers.clone(),
                    source,
                })?;
        let mut problems = Vec::new();
        for &name in topics {
            match metadata.topics().iter().find(|t| t.name() == name) {
                None => problems.push(format!("topic {name} does not exist")),
                Some(topic) => {
                    if let Some(error) = topic.error() {
                        problems.push(format!(
                            "topic {name} is not usable: {}",
                            RDKafkaErrorCode::from(error)
                        ));
                    } else if topic.partitions().is_empty() {
                        problems.push(format!("topic {name} has no partitions"));
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(KafkaError::Topics {
                brokers: self.brokers.clone(),
                problems,
            })
        }
    }

    /// Fails when the output topic's `max.message.bytes` (as the broker
    /// describes it) is below the largest record this producer builds: those
    /// records would be refused for good, every one a dropped segment. A
    /// broker that does not describe topic configurations (tansu) passes;
    /// the limit is then learned per record (`too_large`).
    pub async fn check_output_limit(&self, timeout: Duration) -> Result<(), KafkaError> {
        let Some(limit) = self.output_topic_limit(timeout).await else {
            return Ok(());
        };
        tracing::info!(topic = %self.topic, max_message_bytes = limit, records_up_to = self.max_message_bytes, "output topic's message limit");
        if limit >= self.max_message_bytes {
            return Ok(());
        }
        Err(KafkaError::Topics {
            brokers: self.brokers.clone(),
            problems: vec![format!(
                "topic {} accepts records up to {limit} bytes (max.message.bytes), but spanbuf builds records up to {} bytes: set SPANBUF_KAFKA_PRODUCER_PROP_MESSAGE_MAX_BYTES={limit} (records are then chunked to fit) or raise the topic's max.message.bytes",
                self.topic, self.max_message_bytes
            )],
        })
    }

    /// The output topic's `max.message.bytes`, when the broker tells.
    async fn output_topic_limit(&self, timeout: Duration) -> Option<u64> {
        use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
        use rdkafka::client::DefaultClientContext;
        let admin: AdminClient<DefaultClientContext> = match self.client.create() {
            Ok(admin) => admin,
            Err(err) => {
                tracing::warn!(error = %err, "cannot create an admin client to read the output topic's message limit");
                return None;
            }
        };
        let options = AdminOptions::new().request_timeout(Some(timeout));
        let described = tokio::time::timeout(
            timeout + DELIVERY_REPORT_GRACE,
            admin.describe_configs(&[ResourceSpecifier::Topic(&self.topic)], &options),
        )
        .await;
        let limit = match described {
            Ok(Ok(results)) => results.into_iter().find_map(|r| {
                r.ok()?
                    .get("max.message.bytes")?
                    .value
                    .as_deref()?
                    .parse::<u64>()
                    .ok()
            }),
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "the broker did not describe the output topic");
                None
            }
            Err(_) => None,
        };
        if limit.is_none() {
            tracing::info!(topic = %self.topic, "the broker does not report the output topic's max.message.bytes; records larger than it accepts are counted as dropped (too_large)");
        }
        limit
    }

    /// Produces one message and waits for the broker's acknowledgement, e.g.
    /// an invalid span forwarded to the dead-letter topic with its original
    /// bytes and reason headers. Counts nothing: the caller knows what the
    /// message was (`spanbuf_dlq_records_total`).
    pub async fn produce_raw(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<(), KafkaError> {
        let mut owned = OwnedHeaders::new_with_capacity(headers.len());
        for &(name, value) in headers {
            owned = owned.insert(Header {
                key: name,
                value: Some(value),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(topic)
            .payload(payload)
            .headers(owned);
        if let Some(key) = key {
            record = record.key(key);
        }
        // Queue wait, then delivery: each bounded by the message timeout.
        let bound = self.message_timeout * 2 + DELIVERY_REPORT_GRACE;
        let sent = self
            .producer
            .send(record, Timeout::After(self.message_timeout));
        let source = match tokio::time::timeout(bound, sent).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err((source, _))) => source,
            Err(_) => RdKafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
        };
        if let Some(code) = source.rdkafka_error_code().filter(|c| unrecoverable(*c)) {
            *self
                .unrecoverable
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(code);
        }
        Err(KafkaError::Produce {
            topic: topic.to_owned(),
            source,
        })
    }

    /// Waits until every queued message is delivered or failed, for
    /// shutdown; an error if some are still queued after `timeout`.
    pub async fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|source| KafkaError::Task {
                operation: "producer flush",
                source,
            })?
            .map_err(|source| KafkaError::Client {
                operation: "flush the producer",
                source,
            })
    }

    /// Fails once librdkafka raised a fatal error (with idempotence, e.g. a
    /// sequence the broker cannot accept): every later delivery fails, so the
    /// process should restart rather than retry.
    pub fn check_fatal(&self) -> Result<(), KafkaError> {
        if let Some((source, reason)) = self.producer.client().fatal_error() {
            return Err(KafkaError::Fatal { reason, source });
        }
        let fenced = *self
            .unrecoverable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match fenced {
            None => Ok(()),
            Some(source) => Err(KafkaError::Fatal {
                reason: format!(
                    "the broker answered {source:?}: this producer can no longer deliver"
                ),
                source,
            }),
        }
    }

    /// Encodes one record and checks its size; the payload or why not.
    fn encode(&self, record: &FlushedSegment) -> Result<Vec<u8>, Failure> {
        let payload = record.encode(self.codec).map_err(|e| Failure {
            kind: FailureKind::Encode,
            message: format!("segment {}: {}", record.segment_id, error_chain(&e)),
        })?;
        if payload.len() as u64 > self.max_message_bytes {
            return Err(Failure {
                kind: FailureKind::TooLarge,
                message: format!(
                    "segment {}: record of {} bytes exceeds message.max.bytes {}",
                    record.segment_id,
                    payload.len(),
                    self.max_message_bytes
                ),
            });
        }
        Ok(payload)
    }
}

impl Sink for KafkaSink {
    /// Enqueues the records in order (so records of one trace keep their
    /// order in its partition), at most [`MAX_IN_FLIGHT`] awaiting their
    /// acknowledgement at a time, and awaits every one of them. Reports each
    /// record that did not go out: too large or not encodable can never go
    /// out ([`Undelivered::Rejected`]); anything else may later.
    async fn deliver(&self, records: &[FlushedSegment]) -> Result<Delivery, SinkError> {
        if records.is_empty() {
            return Ok(Delivery::complete());
        }
        let report_timeout = self.message_timeout + DELIVERY_REPORT_GRACE;
        let mut tally = Tally::new(report_timeout);
        let mut pending = FuturesUnordered::new();
        for (index, record) in records.iter().enumerate() {
            let payload = match self.encode(record) {
                Ok(payload) => payload,
                Err(failure) => {
                    tally.fail(index, failure);
                    continue;
                }
            };
            let span_count = record.span_count().to_string();
            let headers = OwnedHeaders::new_with_capacity(2)
                .insert(Header {
                    key: HEADER_FLUSH_ID,
                    value: Some(record.flush_id.as_bytes()),
                })
                .insert(Header {
                    key: HEADER_SPAN_COUNT,
                    value: Some(span_count.as_bytes()),
                });
            let mut future_record = FutureRecord::to(&self.topic)
                .key(record.trace_id.as_bytes())
                .payload(payload.as_slice())
                .headers(headers);
            let queue_deadline = Instant::now() + self.message_timeout;
            loop {
                match self.producer.send_result(future_record) {
                    Ok(delivery) => {
                        let bytes = payload.len() as u64;
                        // The deadline starts now, at enqueue, not at first poll.
                        let bounded = tokio::time::timeout(report_timeout, delivery);
                        pending.push(async move { (index, bounded.await, bytes) });
                        break;
                    }
                    Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                        if Instant::now() < queue_deadline =>
                    {
                        future_record = back;
                        // Our own deliveries free the queue as they settle;
                        // without any, someone else holds it: back off.
                        match pending.next().await {
                            Some((i, result, bytes)) => tally.settle(i, result, bytes, &self.topic),
                            None => tokio::time::sleep(QUEUE_FULL_BACKOFF).await,
                        }
                    }
                    Err((error, _)) => {
                        tally.note(&error);
                        tally.fail(index, Failure::from_kafka(&error, &self.topic));
                        break;
                    }
                }
            }
            while pending.len() >= MAX_IN_FLIGHT {
                if let Some((i, result, bytes)) = pending.next().await {
                    tally.settle(i, result, bytes, &self.topic);
                }
            }
        }
        while let Some((i, result, bytes)) = pending.next().await {
            tally.settle(i, result, bytes, &self.topic);
        }
        if let Some(code) = tally.unrecoverable {
            *self
                .unrecoverable
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(code);
        }

        self.metrics.records_produced_total.inc_by(tally.delivered);
        self.metrics.produced_bytes_total.inc_by(tally.bytes);
        for kind in FailureKind::ALL {
            let count = tally.failed[kind as usize];
            if count > 0 {
                self.metrics
                    .produce_errors_total
                    .with_label_values(&[kind.as_str()])
                    .inc_by(count);
            }
        }
        if tally.undelivered.is_empty() {
            return Ok(Delivery::complete());
        }
        let failed = tally.undelivered.len();
        let fatal = match self.check_fatal() {
            Ok(()) => String::new(),
            Err(e) => format!("; {}", error_chain(&e)),
        };
        // The first failure carries the summary, for the flusher's log line.
        let summary = format!(
            "{failed} of {} records to kafka topic {} were not delivered ({}); first error: ",
            records.len(),
            self.topic,
            tally.by_kind(),
        );
        tally.undelivered.sort_by_key(|(i, _)| *i);
        let mut undelivered = tally.undelivered;
        if let Some((_, first)) = undelivered.first_mut() {
            match first {
                Undelivered::Retry(text) | Undelivered::Rejected { detail: text, .. } => {
                    *text = format!("{summary}{text}{fatal}");
                }
            }
        }
        Ok(Delivery { undelivered })
    }
}

/// Why a record was not delivered: the `kind` label of
/// `spanbuf_produce_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailureKind {
    /// Refused or timed out by librdkafka or the broker.
    Delivery = 0,
    /// The record could not be encoded with the output codec.
    Encode = 1,
    /// Larger than `message.max.bytes` (client side) or the topic's limit.
    TooLarge = 2,
    /// Refused by the broker as invalid for the topic (`INVALID_RECORD`).
    Invalid = 3,
}

impl FailureKind {
    const ALL: [FailureKind; 4] = [
        FailureKind::Delivery,
        FailureKind::Encode,
        FailureKind::TooLarge,
        FailureKind::Invalid,
    ];

    fn as_str(self) -> &'static str {
        match self {
            FailureKind::Delivery => "delivery",
            FailureKind::Encode => "encode",
            FailureKind::TooLarge => "too_large",
            FailureKind::Invalid => "invalid",
        }
    }
}

/// One record that was not delivered.
struct Failure {
    kind: FailureKind,
    message: String,
}

impl Failure {
    /// What the flusher makes of it: too large or not encodable can never go
    /// out; anything else may, later.
    fn undelivered(self) -> Undelivered {
        match self.kind {
            FailureKind::Delivery => Undelivered::Retry(self.message),
            FailureKind::TooLarge => Undelivered::Rejected {
                reason: "too_large",
                detail: self.message,
            },
            FailureKind::Encode => Undelivered::Rejected {
                reason: "unencodable",
                detail: self.message,
            },
            // Not for good: a broker refuses the whole produce batch the
            // invalid record came in (seen with tansu's schema validation),
            // and its batch-mates must not be dropped with it.
            FailureKind::Invalid => Undelivered::Retry(self.message),
        }
    }

    fn from_kafka(error: &RdKafkaError, topic: &str) -> Failure {
        let kind = match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::MessageSizeTooLarge) => FailureKind::TooLarge,
            Some(RDKafkaErrorCode::InvalidRecord) => FailureKind::Invalid,
            _ => FailureKind::Delivery,
        };
        let produce = KafkaError::Produce {
            topic: topic.to_owned(),
            source: error.clone(),
        };
        Failure {
            kind,
            message: error_chain(&produce),
        }
    }
}

/// Outcome of one `deliver` call, counted as deliveries settle.
struct Tally {
    /// How long a delivery report was waited for.
    report_timeout: Duration,
    delivered: u64,
    bytes: u64,
    /// Indexed by `FailureKind as usize`.
    failed: [u64; 4],
    /// Records that did not go out, in the order they settled.
    undelivered: Vec<(usize, Undelivered)>,
    /// An error code no retry of this producer can fix, if one was seen.
    unrecoverable: Option<RDKafkaErrorCode>,
}

/// A delivery as awaited: the report, lost, or not in time.
type Settled = Result<Result<OwnedDeliveryResult, Canceled>, Elapsed>;

impl Tally {
    fn new(report_timeout: Duration) -> Tally {
        Tally {
            report_timeout,
            delivered: 0,
            bytes: 0,
            failed: [0; 4],
            undelivered: Vec::new(),
            unrecoverable: None,
        }
    }

    fn note(&mut self, error: &RdKafkaError) {
        if let Some(code) = error.rdkafka_error_code().filter(|c| unrecoverable(*c)) {
            self.unrecoverable = Some(code);
        }
    }

    fn fail(&mut self, index: usize, failure: Failure) {
        self.failed[failure.kind as usize] += 1;
        self.undelivered.push((index, failure.undelivered()));
    }

    fn settle(&mut self, index: usize, result: Settled, bytes: u64, topic: &str) {
        match result {
            Ok(Ok(Ok(_))) => {
                self.delivered += 1;
                self.bytes += bytes;
            }
            Ok(Ok(Err((error, _)))) => {
                self.note(&error);
                self.fail(index, Failure::from_kafka(&error, topic));
            }
            Err(_) => {
                let timed_out = KafkaError::Produce {
                    topic: topic.to_owned(),
                    source: RdKafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
                };
                self.fail(
                    index,
                    Failure {
                    kind: FailureKind::Delivery,
                    message: format!(
                        "{}: no delivery report within {:?}",
                        error_chain(&timed_out),
                        self.report_timeout
                    ),
                },
                );
            }
            // librdkafka dropped the delivery report: only when the producer
            // is torn down, which cannot happen while `self` holds it.
            Ok(Err(_)) => self.fail(
                index,
                Failure {
                    kind: FailureKind::Delivery,
                    message: format!(
                        "producing a message to kafka topic {topic} failed: the delivery report was lost"
                    ),
                },
            ),
        }
    }

    /// `delivery=1, too_large=2` for the kinds that occurred.
    fn by_kind(&self) -> String {
        FailureKind::ALL
            .iter()
            .filter(|k| self.failed[**k as usize] > 0)
            .map(|k| format!("{}={}", k.as_str(), self.failed[*k as usize]))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `error` and its chain of sources as one line, for messages that carry the
/// whole cause as text ([`SinkError::Delivery`]).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        // rdkafka's errors print their code and then return it as the source.
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with(properties: &[(&str, &str)]) -> Config {
        let mut config = Config::default();
        config.kafka.brokers = "127.0.0.1:1".to_owned();
        config.kafka.producer_properties = properties
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        config
    }

    #[test]
    fn message_max_bytes_leaves_room_for_the_envelope_and_the_codec() {
        let ten_mib = 10 * 1024 * 1024;
        assert_eq!(
            message_max_bytes(ten_mib, OutputCodec::Json),
            ten_mib + ten_mib / 64 + 64 * 1024
        );
        assert_eq!(
            message_max_bytes(ten_mib, OutputCodec::Msgpack),
            ten_mib * 9 / 4 + 64 * 1024
        );
        assert_eq!(
            message_max_bytes(u64::MAX, OutputCodec::Json),
            LIBRDKAFKA_MAX_MESSAGE_BYTES
        );
        assert_eq!(
            message_max_bytes(900_000_000, OutputCodec::Msgpack),
            LIBRDKAFKA_MAX_MESSAGE_BYTES
        );
    }

    #[test]
    fn a_lower_message_limit_chunks_records_to_fit() {
        for codec in [OutputCodec::Json, OutputCodec::Msgpack] {
            for limit in [66_560u64, 100_000, 1_000_000, 10_000_000, 900_000_000] {
                let chunk = chunk_bytes(limit, codec);
                assert!(chunk > 0, "{limit}");
                assert!(
                    message_max_bytes(chunk, codec) <= limit,
                    "{codec:?} {limit}"
                );
                assert!(
                    message_max_bytes(chunk + 100, codec) > limit,
                    "{codec:?} {limit}"
                );
            }
        }
        let mut config = config_with(&[]);
        assert_eq!(record_chunk_bytes(&config), 10 * 1024 * 1024);
        let mut config_1mb = config_with(&[("message.max.bytes", "1000000")]);
        assert_eq!(
            record_chunk_bytes(&config_1mb),
            chunk_bytes(1_000_000, OutputCodec::Json)
        );
        config_1mb.buffer.max_segment_bytes = 4096;
        assert_eq!(
            record_chunk_bytes(&config_1mb),
            4096,
            "the smaller limit wins"
        );
        config.buffer.output_codec = OutputCodec::Msgpack;
        assert_eq!(record_chunk_bytes(&config), 10 * 1024 * 1024);
        assert!(producer_config(&config_with(&[("message.max.bytes", "1000000")])).is_ok());
    }

    #[test]
    fn defaults_are_set_and_passthrough_overrides_them() {
        let client = producer_config(&config_with(&[])).unwrap();
        for (name, value) in [
            ("bootstrap.servers", "127.0.0.1:1"),
            ("compression.type", "zstd"),
            ("acks", "all"),
            ("enable.idempotence", "true"),
            ("linger.ms", "10"),
            ("queue.buffering.max.messages", "100000"),
            ("message.timeout.ms", "30000"),
            ("client.id", CLIENT_ID),
        ] {
            assert_eq!(client.get(name), Some(value), "{name}");
        }
        let expected = message_max_bytes(10 * 1024 * 1024, OutputCodec::Json).to_string();
        assert_eq!(client.get("message.max.bytes"), Some(expected.as_str()));

        let client = producer_config(&config_with(&[
            ("compression.codec", "lz4"),
            ("enable.idempotence", "false"),
            ("delivery.timeout.ms", "5000"),
            ("message.max.bytes", "1000000000"),
            ("acks", "-1"),
        ]))
        .unwrap();
        // The alias given wins alone: the canonical name is not set beside it.
        assert_eq!(client.get("compression.type"), None);
        assert_eq!(client.get("compression.codec"), Some("lz4"));
        assert_eq!(client.get("message.timeout.ms"), None);
        assert_eq!(client.get("delivery.timeout.ms"), Some("5000"));
        assert_eq!(client.get("enable.idempotence"), Some("false"));
        assert_eq!(client.get("message.max.bytes"), Some("1000000000"));
        assert_eq!(client.get("acks"), Some("-1"));
    }

    #[test]
    fn properties_that_break_guarantees_are_refused() {
        for (name, value, needle) in [
            ("acks", "1", "acks=all"),
            ("request.required.acks", "0", "acks=all"),
            ("message.max.bytes", "60000", "envelope"),
            ("transactional.id", "x", "transactions"),
        ] {
            let err = producer_config(&config_with(&[(name, value)])).unwrap_err();
            let text = err.to_string();
            assert!(
                text.starts_with(&format!(
                    "kafka producer property {name}={value} is refused: "
                )),
                "{text}"
            );
            assert!(text.contains(needle), "{text}");
        }
    }

    #[test]
    fn effective_limits_are_read_back() {
        let mut config = config_with(&[("delivery.timeout.ms", "1234")]);
        config.buffer.max_segment_bytes = 2048;
        config.buffer.max_span_bytes = 1024;
        let sink = KafkaSink::new(&config, Arc::new(Metrics::new().unwrap())).unwrap();
        assert_eq!(sink.message_timeout, Duration::from_millis(1234));
        assert_eq!(
            sink.max_message_bytes,
            message_max_bytes(2048, OutputCodec::Json)
        );
        // A span larger than the segment limit is a record alone: the
        // producer must accept it.
        config.buffer.max_span_bytes = 65536;
        let sink = KafkaSink::new(&config, Arc::new(Metrics::new().unwrap())).unwrap();
        assert_eq!(
            sink.max_message_bytes,
            message_max_bytes(65536, OutputCodec::Json)
        );
        assert_eq!(sink.topic(), "buffered-segments");
    }

    #[tokio::test]
    async fn a_late_delivery_report_counts_as_a_delivery_timeout() {
        let elapsed = tokio::time::timeout(Duration::ZERO, std::future::pending::<()>())
            .await
            .unwrap_err();
        let mut tally = Tally::new(Duration::from_secs(7));
        tally.settle(3, Err(elapsed), 10, "out");
        tally.settle(5, Ok(Err(Canceled)), 10, "out");
        assert_eq!((tally.delivered, tally.bytes), (0, 0));
        assert_eq!(tally.failed, [2, 0, 0, 0]);
        assert_eq!(tally.by_kind(), "delivery=2");
        let indices: Vec<usize> = tally.undelivered.iter().map(|(i, _)| *i).collect();
        assert_eq!(indices, [3, 5]);
        let Some((_, Undelivered::Retry(first))) = tally.undelivered.first().cloned() else {
            panic!("a timeout may succeed later: {:?}", tally.undelivered);
        };
        assert!(
            first.starts_with("producing a message to kafka topic out failed: "),
            "{first}"
        );
        assert!(first.ends_with("no delivery report within 7s"), "{first}");
    }

    #[test]
    fn error_chain_joins_sources() {
        let error = KafkaError::Produce {
            topic: "dlq".to_owned(),
            source: RdKafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
        };
        let text = error_chain(&error);
        let head = "producing a message to kafka topic dlq failed: ";
        assert!(text.starts_with(head), "{text}");
        assert!(text.len() > head.len(), "{text}");
    }
}
