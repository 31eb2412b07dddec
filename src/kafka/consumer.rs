//! The input side of Kafka: the consumer-group member, its rebalance
//! bookkeeping and batching.
//!
//! Owns which partitions (= queue shards) this process holds right now: the
//! rebalance callbacks update [`Assignment`], which the flusher reads to know
//! its shards and the committer reads to commit only partitions still held.
//! Offsets are stored and committed manually, never automatically. Must not
//! touch Redis.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::{client_config, KafkaError};
use crate::config::Config;

/// The partitions this process holds, each with the epoch it was assigned
/// in (a counter that grows with every rebalance), so a partition revoked and
/// assigned again is told apart from one held all along; and whether this
/// process has caught up with the partition since (docs/design.md §7): its
/// shard is flushed only then.
#[derive(Debug, Default)]
pub struct Assignment {
    inner: Mutex<(BTreeMap<i32, Held>, u64)>,
}

/// One held partition.
#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: u64,
    assigned_at: Instant,
    /// The consumer reached the end of the partition (librdkafka's
    /// partition EOF, from the fetch responses' high watermark) since the
    /// assignment.
    reached_end: bool,
    caught_up: bool,
}

impl Assignment {
    /// The partitions held now and caught up with, as queue shards: the
    /// shards this process may flush. A partition just assigned holds
    /// spans the previous owner did not commit (and maybe a backlog); its
    /// segments in Redis must not be flushed before those are in.
    pub fn shards(&self) -> Vec<u32> {
        self.lock()
            .0
            .iter()
            .filter(|(_, h)| h.caught_up)
            .filter_map(|(&p, _)| u32::try_from(p).ok())
            .collect()
    }

    pub fn partitions(&self) -> Vec<i32> {
        self.lock().0.keys().copied().collect()
    }

    pub fn holds(&self, partition: i32) -> bool {
        self.lock().0.contains_key(&partition)
    }

    /// The epoch `partition` was assigned in, `None` when it is not held.
    pub fn epoch(&self, partition: i32) -> Option<u64> {
        self.lock().0.get(&partition).map(|h| h.epoch)
    }

    /// How many held partitions are not caught up with yet.
    pub fn catching_up(&self) -> usize {
        self.lock().0.values().filter(|h| !h.caught_up).count()
    }

    /// The consumer reached the end of `partition`.
    fn reached_end(&self, partition: i32) {
        if let Some(h) = self.lock().0.get_mut(&partition) {
            h.reached_end = true;
        }
    }

    /// Marks caught up every held partition whose end the consumer reached
    /// and of which nothing read is still outside Redis (`in_flight`: staged
    /// or carried to the next window): everything up to its end is then in
    /// Redis. One held for `give_up_after` without that is marked caught up
    /// anyway, with a warning: from then on only the live clock (held at the
    /// backlog's timestamps while it is staged) keeps its segments from
    /// flushing early, but a shard never flushed could not free Redis while
    /// hard backpressure holds consumption.
    pub fn promote(&self, in_flight: impl Fn(i32) -> bool, give_up_after: Duration) {
        let mut guard = self.lock();
        for (&partition, held) in guard.0.iter_mut().filter(|(_, h)| !h.caught_up) {
            if held.reached_end && !in_flight(partition) {
                tracing::info!(
                    partition,
                    "caught up with the partition; flushing its shard"
                );
                held.caught_up = true;
            } else if held.assigned_at.elapsed() >= give_up_after {
                tracing::warn!(partition, held_for = ?held.assigned_at.elapsed(),
                    "not caught up with the partition in time; flushing its shard anyway (segments the rest of its backlog extends may flush early)");
                held.caught_up = true;
            }
        }
    }

    /// Marks every held partition caught up at once: Redis is full, the
    /// backlog cannot come in before flushing frees memory, so waiting for
    /// it would only stall (issue 12 item 1). Whether any was still waiting.
    pub fn give_up_catching_up(&self) -> bool {
        let mut guard = self.lock();
        let mut any = false;
        for (&partition, held) in guard.0.iter_mut().filter(|(_, h)| !h.caught_up) {
            tracing::warn!(
                partition,
                "redis is full: flushing the partition's shard before catching up with it"
            );
            held.caught_up = true;
            any = true;
        }
        any
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (BTreeMap<i32, Held>, u64)> {
        // A poisoned lock only means a callback panicked mid-update; the map
        // itself is still a valid set of partitions.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn assign(&self, partitions: &[i32]) {
        let mut guard = self.lock();
        guard.1 += 1;
        let epoch = guard.1;
        for &p in partitions {
            guard.0.entry(p).or_insert(Held {
                epoch,
                assigned_at: Instant::now(),
                reached_end: false,
                caught_up: false,
            });
        }
    }

    fn revoke(&self, partitions: &[i32]) {
        let mut guard = self.lock();
        guard.1 += 1;
        for p in partitions {
            guard.0.remove(p);
        }
    }
}

/// Rebalance callbacks: keep [`Assignment`] in step with the group.
pub struct SpanbufContext {
    topic: String,
    assignment: Arc<Assignment>,
}

impl ClientContext for SpanbufContext {
    /// librdkafka's error events, logged as rdkafka does by default, except
    /// the end-of-partition events `enable.partition.eof` asks for: they are
    /// the catch-up signal (`Assignment`), not errors, and came by the
    /// thousand in a soak.
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if matches!(error, rdkafka::error::KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        {
            tracing::debug!(%reason, "librdkafka: reached the end of a partition");
            return;
        }
        tracing::error!("librdkafka: {error}: {reason}");
    }
}

impl ConsumerContext for SpanbufContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            // Before the partitions go: from now on nothing of theirs is
            // committed or flushed by this process.
            let gone: Vec<i32> = partitions_of(list, &self.topic);
            tracing::info!(partitions = ?gone, "partitions revoked");
            self.assignment.revoke(&gone);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let new: Vec<i32> = partitions_of(list, &self.topic);
                tracing::info!(partitions = ?new, "partitions assigned");
                self.assignment.assign(&new);
                // librdkafka keeps a partition's pause across rebalances: one
                // paused under backpressure, revoked, and assigned back after
                // the backpressure ended (the resume reached only what was
                // held then) would stay paused for good, its spans waiting
                // in Kafka. Every assignment starts resumed; while
                // backpressure lasts, the consume loop pauses it again.
                if let Err(err) = consumer.resume(list) {
                    tracing::warn!(error = %err, "resuming newly assigned partitions");
                }
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
    /// The message's bytes, handed to the decoder without another copy.
    pub payload: bytes::Bytes,
}

impl Consumed {
    fn from_message(message: &BorrowedMessage<'_>) -> Self {
        Self {
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
            payload: message
                .payload()
                .map(bytes::Bytes::copy_from_slice)
                .unwrap_or_default(),
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
        // Partition EOF events tell when a new partition's backlog is read
        // ([`Assignment::shards`]).
        client
            .set("enable.partition.eof", "true")
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

    /// Collects up to `max` messages or `max_bytes` of payload (starting with
    /// `carried`), waiting at most `max_wait` after the first one (and at
    /// most `idle` for the first one). Returns early, with what it has, when
    /// `stop` resolves.
    pub async fn next_batch(
        &self,
        carried: Vec<Consumed>,
        max: usize,
        max_bytes: usize,
        max_wait: Duration,
        idle: Duration,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<Vec<Consumed>, KafkaError> {
        let mut batch = carried;
        let mut bytes: usize = batch.iter().map(|m| m.payload.len()).sum();
        batch.reserve(max.saturating_sub(batch.len()));
        let started = Instant::now();
        while batch.len() < max && bytes < max_bytes {
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
                    Ok(message) => {
                        let message = Consumed::from_message(&message);
                        bytes += message.payload.len();
                        batch.push(message);
                    }
                    Err(rdkafka::error::KafkaError::PartitionEOF(partition)) => {
                        self.assignment.reached_end(partition);
                    }
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

    /// Commits `(partition, next offset, epoch)` for every partition still
    /// held in the same epoch it was consumed in. Partitions revoked meanwhile
    /// are left alone: their new owner consumes them again from the last
    /// commit. Returns how many partitions were committed.
    pub fn commit(
        &self,
        offsets: impl IntoIterator<Item = (i32, i64, u64)>,
        mode: CommitMode,
    ) -> Result<usize, KafkaError> {
        let mut list = TopicPartitionList::new();
        for (partition, offset, epoch) in offsets {
            if self.assignment.epoch(partition) == Some(epoch) {
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
                Err(rdkafka::error::KafkaError::PartitionEOF(partition)) => {
                    self.assignment.reached_end(partition);
                    None
                }
                Err(err) => {
                    tracing::warn!(error = %err, "consumer error while paused");
                    None
                }
            },
        }
    }
}
