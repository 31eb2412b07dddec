//! Everything that talks to Kafka: the producer that delivers flushed records
//! (and dead-letter messages) in [`producer`], and the input consumer.
//!
//! Owns the librdkafka client configuration shared by both clients
//! ([`client_config`]) and the error type of this module boundary
//! ([`KafkaError`]). Must not touch Redis, and must not decide what is
//! retried: a failed operation is returned to the caller (the flusher leaves
//! its segments buffered, the worker pauses or stops).

use std::collections::BTreeMap;

use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::ClientConfig;

use crate::config::Config;

pub mod consumer;
pub mod producer;
pub mod tools;

/// A failed Kafka operation.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// librdkafka refused an operation on a client (create, subscribe, commit,
    /// flush, …).
    #[error("kafka client could not {operation}")]
    Client {
        /// What was attempted, e.g. "create the producer".
        operation: &'static str,
        #[source]
        source: RdKafkaError,
    },
    /// A librdkafka property spanbuf relies on was overridden with a value
    /// that would break a delivery guarantee.
    #[error("kafka producer property {property}={value} is refused: {reason}")]
    Property {
        property: String,
        value: String,
        reason: &'static str,
    },
    /// Cluster metadata could not be fetched (brokers unreachable, timeout).
    #[error("fetching kafka metadata from {brokers} failed")]
    Metadata {
        brokers: String,
        #[source]
        source: RdKafkaError,
    },
    /// Topics the process needs do not exist (or have no usable partition).
    #[error("checking kafka topics on {brokers} failed: {}", .problems.join("; "))]
    Topics {
        brokers: String,
        /// One line per bad topic, naming it (`topic x does not exist`).
        problems: Vec<String>,
    },
    /// One message was not produced or its delivery was not acknowledged.
    #[error("producing a message to kafka topic {topic} failed: {source}")]
    Produce {
        topic: String,
        #[source]
        source: RdKafkaError,
    },
    /// Deliveries of a batch of messages failed (counted by the delivery
    /// callback, so no single source error is at hand).
    #[error("{failed} of {sent} messages to kafka topic {topic} were not delivered")]
    Undelivered {
        topic: String,
        failed: u64,
        sent: u64,
    },
    /// The client hit a fatal error (e.g. an idempotence violation) and cannot
    /// be used any more: the process must restart.
    #[error("kafka producer is in a fatal state and must be recreated: {reason}")]
    Fatal {
        reason: String,
        #[source]
        source: RDKafkaErrorCode,
    },
    /// The blocking thread that ran a librdkafka call panicked or was
    /// cancelled.
    #[error("running kafka {operation} on a blocking thread failed")]
    Task {
        operation: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl KafkaError {
    /// True when the message exceeds `message.max.bytes` (client side) or the
    /// topic's limit: retrying the same message can never succeed.
    pub fn is_message_too_large(&self) -> bool {
        self.code() == Some(RDKafkaErrorCode::MessageSizeTooLarge)
    }

    /// True when the broker refused the message as invalid for its topic
    /// (`INVALID_RECORD`: e.g. a schema it does not match, or no key on a
    /// compacted topic): retrying the same message can never succeed.
    pub fn is_invalid_record(&self) -> bool {
        self.code() == Some(RDKafkaErrorCode::InvalidRecord)
    }

    fn code(&self) -> Option<RDKafkaErrorCode> {
        match self {
            KafkaError::Client { source, .. }
            | KafkaError::Metadata { source, .. }
            | KafkaError::Produce { source, .. } => source.rdkafka_error_code(),
            _ => None,
        }
    }
}

/// A librdkafka configuration with `bootstrap.servers` from
/// `SPANBUF_KAFKA_BROKERS`, then every passthrough property applied as given
/// (`config` validated them and refused the names spanbuf controls). The
/// caller sets its own defaults only where `properties` has no entry, and its
/// guarantees after this.
pub fn client_config(config: &Config, properties: &BTreeMap<String, String>) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.kafka.brokers);
    for (name, value) in properties {
        client.set(name, value);
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_config_sets_brokers_then_passthrough() {
        let mut config = Config::default();
        config.kafka.brokers = "10.0.0.1:9092,10.0.0.2:9092".to_owned();
        let properties = BTreeMap::from([
            ("security.protocol".to_owned(), "SASL_SSL".to_owned()),
            ("linger.ms".to_owned(), "50".to_owned()),
        ]);
        let client = client_config(&config, &properties);
        assert_eq!(
            client.get("bootstrap.servers"),
            Some("10.0.0.1:9092,10.0.0.2:9092")
        );
        assert_eq!(client.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(client.get("linger.ms"), Some("50"));
    }

    #[test]
    fn message_too_large_is_recognised() {
        let too_large = KafkaError::Produce {
            topic: "dlq".to_owned(),
            source: RdKafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
        };
        assert!(too_large.is_message_too_large());
        let timed_out = KafkaError::Produce {
            topic: "dlq".to_owned(),
            source: RdKafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
        };
        assert!(!timed_out.is_message_too_large());
    }
}
