//! The input side of Kafka: the consumer-group member, its rebalance
//! bookkeeping and batching.
//!
//! Owns which partitions (= queue shards) this process holds right now: the
//! rebalance callbacks update [`Assignment`], which the flusher reads to know
//! its shards and the committer reads to commit only partitions still held.
//! Offsets are stored and committed manually, never automatically. Must not
//! touch Redis.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::{client_config, KafkaError};
use crate::config::Config;

/// The partitions this process holds, with a generation that changes on every
/// rebalance.
#[derive(Debug, Default)]
pub struct Assignment {
    inner: Mutex<(BTreeSet<i32>, u64)>,
}

impl Assignment {
    /// The partitions held now, as queue shards.
    pub fn shards(&self) -> Vec<u32> {
        self.lock()
            .0
            .iter()
            .filter_map(|&p| u32::try_from(p).ok())
            .collect()
    }

    pub fn partitions(&self) -> Vec<i32> {
        self.lock().0.iter().copied().collect()
    }

    pub fn holds(&self, partition: i32) -> bool {
        self.lock().0.contains(&partition)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (BTreeSet<i32>, u64)> {
        // A poisoned lock only means a callback panicked mid-update; the set
        // itself is still a valid set of partitions.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn update(&self, change: impl FnOnce(&mut BTreeSet<i32>)) {
        let mut guard = self.lock();
        change(&mut guard.0);
        guard.1 += 1;
    }
}

/// Rebalance callbacks: keep [`Assignment`] in step with the group.
pub struct SpanbufContext {
    topic: String,
    assignment: Arc<Assignment>,
}

impl ClientContext for SpanbufContext {}

impl ConsumerContext for SpanbufContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            // Before the partitions go: from now on nothing of theirs is
            // committed or flushed by this process.
            let gone: Vec<i32> = partitions_of(list, &self.topic);
            tracing::info!(partitions = ?gone, "partitions revoked");
            self.assignment.update(|held| {
                gone.iter().for_each(|p| {
                    held.remove(p);
                })
            });
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let new: Vec<i32> = partitions_of(list, &self.topic);
                tracing::info!(partitions = ?new, "partitions assigned");
                self.assignment
                    .update(|held| held.extend(new.iter().copied()));
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(err) => tracing::warn!(error = %err, "rebalance error"),
        }
    }
}

fn partitions_of(list: &TopicPartitionList, topic: &str) -> Vec<i32> {
    list.elements()
        .iter()
        .filter(|e| e.topic() == topic)
        .map(|e| e.partition())
        .collect()
}

/// One consumed message, owned (the batch outlives the consumer borrow).
#[derive(Debug, Clone)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    /// Broker or producer timestamp, epoch milliseconds, if any.
    pub timestamp_ms: Option<i64>,
    pub payload: Vec<u8>,
}

impl Consumed {
    fn from_message(message: &BorrowedMessage<'_>) -> Self {
        Self {
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
            payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        }
    }
}

/// The consumer-group member of one worker.
pub struct InputConsumer {
    consumer: StreamConsumer<SpanbufContext>,
    topic: String,
    assignment: Arc<Assignment>,
}

impl InputConsumer {
    /// Joins `SPANBUF_CONSUMER_GROUP` on `SPANBUF_INPUT_TOPIC` with manual
    /// commits only.
    pub fn new(config: &Config) -> Result<Self, KafkaError> {
        let mut client = client_config(config, &BTreeMap::new());
        // spanbuf's defaults; passthrough properties below may tune them.
        client
            .set("auto.offset.reset", "earliest")
            .set("client.id", "spanbuf-consumer");
        for (key, value) in &config.kafka.consumer_properties {
            client.set(key, value);
        }
        // Guarantees, never overridable (config refuses these names anyway).
        client
            .set("group.id", &config.kafka.consumer_group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        let assignment = Arc::new(Assignment::default());
        let context = SpanbufContext {
            topic: config.kafka.input_topic.clone(),
            assignment: assignment.clone(),
        };
        let consumer: StreamConsumer<SpanbufContext> = client
            .create_with_context(context)
            .map_err(|source| KafkaError::Client {
                operation: "create the consumer",
                source,
            })?;
        consumer
            .subscribe(&[&config.kafka.input_topic])
            .map_err(|source| KafkaError::Client {
                operation: "subscribe to the input topic",
                source,
            })?;
        Ok(Self {
            consumer,
            topic: config.kafka.input_topic.clone(),
            assignment,
        })
    }

    pub fn assignment(&self) -> &Arc<Assignment> {
        &self.assignment
    }

    /// Collects up to `max` messages (starting with `carried`), waiting at
    /// most `max_wait` after the first one (and at most `idle` for the first
    /// one). Returns early, with what it has, when `stop` resolves.
    pub async fn next_batch(
        &self,
        carried: Vec<Consumed>,
        max: usize,
        max_wait: Duration,
        idle: Duration,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<Vec<Consumed>, KafkaError> {
        let mut batch = carried;
        batch.reserve(max.saturating_sub(batch.len()));
        let started = Instant::now();
        while batch.len() < max {
            let limit = if batch.is_empty() {
                idle
            } else {
                max_wait.saturating_sub(started.elapsed())
            };
            if !batch.is_empty() && limit.is_zero() {
                break;
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                () = tokio::time::sleep(limit) => break,
                received = self.consumer.recv() => match received {
                    Ok(message) => batch.push(Consumed::from_message(&message)),
                    Err(source) => {
                        if batch.is_empty() {
                            return Err(KafkaError::Client { operation: "consume", source });
                        }
                        tracing::warn!(error = %source, "consume error; processing the batch in hand");
                        break;
                    }
                },
            }
        }
        Ok(batch)
    }

    /// Commits, for every partition of `batch` still held, the offset after
    /// its last message. Partitions revoked meanwhile are left alone: their new
    /// owner consumes them again (ingest is idempotent).
    pub fn commit(&self, batch: &[Consumed], mode: CommitMode) -> Result<usize, KafkaError> {
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        for message in batch {
            let entry = next.entry(message.partition).or_insert(message.offset + 1);
            *entry = (*entry).max(message.offset + 1);
        }
        let mut list = TopicPartitionList::new();
        for (partition, offset) in next {
            if self.assignment.holds(partition) {
                list.add_partition_offset(&self.topic, partition, Offset::Offset(offset))
                    .map_err(|source| KafkaError::Client {
                        operation: "build the commit list",
                        source,
                    })?;
            }
        }
        if list.count() == 0 {
            return Ok(0);
        }
        self.consumer
            .commit(&list, mode)
            .map_err(|source| KafkaError::Client {
                operation: "commit offsets",
                source,
            })?;
        Ok(list.count())
    }

    /// Pauses (or resumes) every partition held now.
    pub fn set_paused(&self, paused: bool) -> Result<(), KafkaError> {
        let mut list = TopicPartitionList::new();
        for partition in self.assignment.partitions() {
            list.add_partition(&self.topic, partition);
        }
        if list.count() == 0 {
            return Ok(());
        }
        let result = if paused {
            self.consumer.pause(&list)
        } else {
            self.consumer.resume(&list)
        };
        result.map_err(|source| KafkaError::Client {
            operation: if paused {
                "pause partitions"
            } else {
                "resume partitions"
            },
            source,
        })
    }

    /// Serves rebalance events and errors for at most `wait` while the
    /// partitions are paused. A message can still arrive (from a partition
    /// assigned during the pause): it is returned, never dropped, and the
    /// caller keeps it for its next batch.
    pub async fn idle_poll(&self, wait: Duration) -> Option<Consumed> {
        tokio::select! {
            () = tokio::time::sleep(wait) => None,
            received = self.consumer.recv() => match received {
                Ok(message) => Some(Consumed::from_message(&message)),
                Err(err) => {
                    tracing::warn!(error = %err, "consumer error while paused");
                    None
                }
            },
        }
    }
}
