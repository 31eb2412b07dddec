//! Kafka helpers for the operator commands (`spanbuf gen --kafka-topic`,
//! `spanbuf audit --records-topic`): produce lines, read a topic back.
//!
//! Synchronous (a `BaseProducer` / `BaseConsumer` polled in place): these run
//! from the command line, not inside the worker. Must not be used on the
//! worker's path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::{client_config, KafkaError};
use crate::config::Config;

/// Counts deliveries that failed.
#[derive(Default)]
struct Counting {
    failed: AtomicU64,
}

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _opaque: ()) {
        if result.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Produces `(key, payload)` lines to `topic`, then waits for every delivery.
pub struct LineProducer {
    producer: BaseProducer<Counting>,
    topic: String,
    sent: u64,
}

impl LineProducer {
    pub fn new(config: &Config, topic: &str) -> Result<Self, KafkaError> {
        let mut client = client_config(config, &config.kafka.producer_properties);
        client
            .set("compression.type", "zstd")
            .set("linger.ms", "20");
        let producer = client
            .create_with_context(Counting::default())
            .map_err(|source| KafkaError::Client {
                operation: "create the producer",
                source,
            })?;
        Ok(Self {
            producer,
            topic: topic.to_string(),
            sent: 0,
        })
    }

    pub fn send(&mut self, key: Option<&[u8]>, payload: &[u8]) -> Result<(), KafkaError> {
        loop {
            let mut record = BaseRecord::<[u8], [u8]>::to(&self.topic).payload(payload);
            if let Some(key) = key {
                record = record.key(key);
            }
            match self.producer.send(record) {
                Ok(()) => {
                    self.sent += 1;
                    return Ok(());
                }
                // The local queue is full: serve deliveries, then try again.
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    self.producer.poll(Duration::from_millis(50));
                }
                Err((source, _)) => {
                    return Err(KafkaError::Client {
                        operation: "produce a line",
                        source,
                    })
                }
            }
        }
    }

    /// Waits for every delivery; returns how many were delivered.
    pub fn finish(self, timeout: Duration) -> Result<u64, KafkaError> {
        self.producer
            .flush(timeout)
            .map_err(|source| KafkaError::Client {
                operation: "flush the producer",
                source,
            })?;
        let failed = self.producer.context().failed.load(Ordering::Relaxed);
        if failed > 0 {
            return Err(KafkaError::Undelivered {
                topic: self.topic.clone(),
                failed,
                sent: self.sent,
            });
        }
        Ok(self.sent)
    }
}

/// Reads every message of `topic` from the beginning until `stop` says so or
/// nothing new arrived for `idle`. Returns the payloads.
pub fn read_topic(
    config: &Config,
    topic: &str,
    idle: Duration,
    mut stop: impl FnMut(&[u8]) -> bool,
) -> Result<Vec<Vec<u8>>, KafkaError> {
    let mut client = client_config(config, &config.kafka.consumer_properties);
    client
        .set("group.id", format!("spanbuf-reader-{}", std::process::id()))
        .set("enable.auto.commit", "false");
    let consumer: BaseConsumer = client.create().map_err(|source| KafkaError::Client {
        operation: "create the reader",
        source,
    })?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|source| KafkaError::Metadata {
            brokers: config.kafka.brokers.clone(),
            source,
        })?;
    let mut list = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            list.add_partition_offset(topic, p.id(), Offset::Beginning)
                .map_err(|source| KafkaError::Client {
                    operation: "build the assignment",
                    source,
                })?;
        }
    }
    consumer
        .assign(&list)
        .map_err(|source| KafkaError::Client {
            operation: "assign the topic",
            source,
        })?;
    let mut out = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < idle {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                last = Instant::now();
                let payload = message.payload().unwrap_or_default().to_vec();
                let done = stop(&payload);
                out.push(payload);
                if done {
                    break;
                }
            }
            Some(Err(err)) => tracing::warn!(error = %err, "reading {topic}"),
            None => {}
        }
    }
    Ok(out)
}
