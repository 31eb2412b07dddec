//! The one typed [`Config`] of a spanbuf process, read from `SPANBUF_*` environment
//! variables (docs/design.md §8).
//!
//! Owns: the name, default and meaning of every variable ([`VARIABLES`], the table the
//! README is checked against), the typed sections with their defaults (`impl Default`
//! next to the fields), parsing, validation that reports every problem at once
//! ([`ConfigError`]), and the redacted rendering printed by `spanbuf config` and by
//! `{:?}`.
//!
//! Must not: read the process environment anywhere but [`Config::from_env`] (tests pass
//! pairs to [`Config::from_vars`] and never touch the environment); silently replace a
//! bad value or ignore an unknown `SPANBUF_*` name — both are reported problems, never
//! a fallback to the default; show a password in any rendering, error or debug output.
//!
//! Syntax rules, beyond the per-variable ones in [`VARIABLES`]:
//! - Values are taken as written: no trimming (except around the entries of
//!   `SPANBUF_REDIS_CLUSTER_URLS`), so `"60 "` is an error, not 60.
//! - For the variables that are unset by default (`SPANBUF_REDIS_CLUSTER_URLS`,
//!   `SPANBUF_DLQ_TOPIC`, `SPANBUF_SLICE_ID`) an empty value means unset; for every
//!   other variable an empty value is an error. This makes the output of
//!   [`Config::render`] valid input again.
//! - librdkafka properties pass through as `SPANBUF_KAFKA_PROP_<NAME>` (consumer and
//!   producer), `SPANBUF_KAFKA_CONSUMER_PROP_<NAME>` or `SPANBUF_KAFKA_PRODUCER_PROP_<NAME>`
//!   (one client only; overrides the common one). `<NAME>` is the property name in
//!   upper case with `_` for `.`: `SPANBUF_KAFKA_PROP_SECURITY_PROTOCOL=SASL_SSL` sets
//!   `security.protocol=SASL_SSL`. Properties spanbuf controls itself are refused.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// Prefix of every variable this module reads; other names are ignored.
const PREFIX: &str = "SPANBUF_";

/// The largest `SPANBUF_REDIS_TTL_SECS`: Redis refuses an `EXPIRE` whose
/// expiry time in milliseconds since 1970 does not fit in 63 bits (about
/// 9.2e15 s); a round bound well inside it.
const MAX_REDIS_TTL_SECS: u64 = 1_000_000_000_000_000;

/// librdkafka property for both the consumer and the producer.
pub const KAFKA_PROP_PREFIX: &str = "SPANBUF_KAFKA_PROP_";
/// librdkafka property for the consumer only (overrides [`KAFKA_PROP_PREFIX`]).
pub const KAFKA_CONSUMER_PROP_PREFIX: &str = "SPANBUF_KAFKA_CONSUMER_PROP_";
/// librdkafka property for the producer only (overrides [`KAFKA_PROP_PREFIX`]).
pub const KAFKA_PRODUCER_PROP_PREFIX: &str = "SPANBUF_KAFKA_PRODUCER_PROP_";

/// What a redacted secret is replaced with.
const REDACTED: &str = "***";

/// The fixed variable names, spelled once.
mod var {
    pub const REDIS_URL: &str = "SPANBUF_REDIS_URL";
    pub const REDIS_CLUSTER_URLS: &str = "SPANBUF_REDIS_CLUSTER_URLS";
    pub const KEY_PREFIX: &str = "SPANBUF_KEY_PREFIX";
    pub const REDIS_TTL_SECS: &str = "SPANBUF_REDIS_TTL_SECS";
    pub const REDIS_POOL_SIZE: &str = "SPANBUF_REDIS_POOL_SIZE";
    pub const REDIS_TIMEOUT_MS: &str = "SPANBUF_REDIS_TIMEOUT_MS";
    pub const KAFKA_BROKERS: &str = "SPANBUF_KAFKA_BROKERS";
    pub const INPUT_TOPIC: &str = "SPANBUF_INPUT_TOPIC";
    pub const OUTPUT_TOPIC: &str = "SPANBUF_OUTPUT_TOPIC";
    pub const CONSUMER_GROUP: &str = "SPANBUF_CONSUMER_GROUP";
    pub const DLQ_TOPIC: &str = "SPANBUF_DLQ_TOPIC";
    pub const BATCH_MAX_SPANS: &str = "SPANBUF_BATCH_MAX_SPANS";
    pub const BATCH_MAX_MS: &str = "SPANBUF_BATCH_MAX_MS";
    pub const TIMEOUT_SECS: &str = "SPANBUF_TIMEOUT_SECS";
    pub const ROOT_TIMEOUT_SECS: &str = "SPANBUF_ROOT_TIMEOUT_SECS";
    pub const MAX_SEGMENT_LIFETIME_SECS: &str = "SPANBUF_MAX_SEGMENT_LIFETIME_SECS";
    pub const MAX_SEGMENT_BYTES: &str = "SPANBUF_MAX_SEGMENT_BYTES";
    pub const MAX_SPAN_BYTES: &str = "SPANBUF_MAX_SPAN_BYTES";
    pub const MAX_FLUSH_SEGMENTS: &str = "SPANBUF_MAX_FLUSH_SEGMENTS";
    pub const MAX_FLUSH_BYTES: &str = "SPANBUF_MAX_FLUSH_BYTES";
    pub const DELIVERED_TTL_SECS: &str = "SPANBUF_DELIVERED_TTL_SECS";
    pub const MAX_TRACE_SPANS: &str = "SPANBUF_MAX_TRACE_SPANS";
    pub const COMPRESSION_LEVEL: &str = "SPANBUF_COMPRESSION_LEVEL";
    pub const FLUSH_LOCK_TTL_SECS: &str = "SPANBUF_FLUSH_LOCK_TTL_SECS";
    pub const OUTPUT_CODEC: &str = "SPANBUF_OUTPUT_CODEC";
    pub const SLICE_ID: &str = "SPANBUF_SLICE_ID";
    pub const SEGMENT_PAGE_SIZE: &str = "SPANBUF_SEGMENT_PAGE_SIZE";
    pub const FLUSH_INTERVAL_MS: &str = "SPANBUF_FLUSH_INTERVAL_MS";
    pub const MAX_FLUSH_LAG_SECS: &str = "SPANBUF_MAX_FLUSH_LAG_SECS";
    pub const WINDOW_MAX_SPANS: &str = "SPANBUF_WINDOW_MAX_SPANS";
    pub const WINDOW_MAX_BYTES: &str = "SPANBUF_WINDOW_MAX_BYTES";
    pub const WINDOW_MAX_MS: &str = "SPANBUF_WINDOW_MAX_MS";
    pub const MAX_REDIS_MEMORY_PERCENT: &str = "SPANBUF_MAX_REDIS_MEMORY_PERCENT";
    pub const MAX_LOOP_STALL_SECS: &str = "SPANBUF_MAX_LOOP_STALL_SECS";
    pub const SHUTDOWN_TIMEOUT_SECS: &str = "SPANBUF_SHUTDOWN_TIMEOUT_SECS";
    pub const HTTP_ADDR: &str = "SPANBUF_HTTP_ADDR";
    pub const LOG_FORMAT: &str = "SPANBUF_LOG_FORMAT";
    pub const LOG_LEVEL: &str = "SPANBUF_LOG_LEVEL";
}

/// One fixed variable: its name, its default and what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VarDoc {
    pub name: &'static str,
    /// The default exactly as [`Config::render`] prints it; empty means unset.
    pub default: &'static str,
    /// One line, lowercase, for the README and `--help` texts.
    pub meaning: &'static str,
}

impl VarDoc {
    /// The default for a human reader: `unset` when the variable has no default value.
    pub fn display_default(&self) -> &'static str {
        if self.default.is_empty() {
            "unset"
        } else {
            self.default
        }
    }
}

/// Every fixed variable, in the order [`Config::render`] prints them. The passthrough
/// prefixes ([`KAFKA_PROP_PREFIX`] and the two per-client ones) are not listed.
pub const VARIABLES: &[VarDoc] = &[
    VarDoc {
        name: var::REDIS_URL,
        default: "redis://127.0.0.1:6379",
        meaning: "standalone Redis (redis://, rediss://, unix:// or redis+unix:// URL); not used when SPANBUF_REDIS_CLUSTER_URLS is set",
    },
    VarDoc {
        name: var::REDIS_CLUSTER_URLS,
        default: "",
        meaning: "comma-separated redis:// or rediss:// seed nodes; when set, Redis Cluster mode",
    },
    VarDoc {
        name: var::KEY_PREFIX,
        default: "span-buf",
        meaning: "prefix of every Redis key; no whitespace, { or }",
    },
    VarDoc {
        name: var::REDIS_TTL_SECS,
        default: "3600",
        meaning: "TTL of every Redis key, in seconds (at most 10^15); must exceed SPANBUF_MAX_SEGMENT_LIFETIME_SECS and SPANBUF_FLUSH_LOCK_TTL_SECS",
    },
    VarDoc {
        name: var::REDIS_POOL_SIZE,
        default: "16",
        meaning: "Redis connections per process (1 to 1024)",
    },
    VarDoc {
        name: var::REDIS_TIMEOUT_MS,
        default: "5000",
        meaning: "response timeout of one Redis command, in milliseconds",
    },
    VarDoc {
        name: var::KAFKA_BROKERS,
        default: "127.0.0.1:9092",
        meaning: "Kafka bootstrap servers, comma-separated host:port",
    },
    VarDoc {
        name: var::INPUT_TOPIC,
        default: "ingest-spans",
        meaning: "topic the spans are consumed from",
    },
    VarDoc {
        name: var::OUTPUT_TOPIC,
        default: "buffered-segments",
        meaning: "topic the flushed segments are produced to; must differ from the input topic",
    },
    VarDoc {
        name: var::CONSUMER_GROUP,
        default: "spanbuf",
        meaning: "Kafka consumer group id",
    },
    VarDoc {
        name: var::DLQ_TOPIC,
        default: "",
        meaning: "dead-letter topic for invalid spans; unset = invalid spans are only counted",
    },
    VarDoc {
        name: var::BATCH_MAX_SPANS,
        default: "500",
        meaning: "most spans in one ingest batch (1 to 100000)",
    },
    VarDoc {
        name: var::BATCH_MAX_MS,
        default: "1000",
        meaning: "longest wait to fill an ingest batch, in milliseconds (1 to 60000)",
    },
    VarDoc {
        name: var::TIMEOUT_SECS,
        default: "60",
        meaning: "inactivity before flushing a segment without its root, in seconds",
    },
    VarDoc {
        name: var::ROOT_TIMEOUT_SECS,
        default: "10",
        meaning: "inactivity before flushing a segment with its root, in seconds",
    },
    VarDoc {
        name: var::MAX_SEGMENT_LIFETIME_SECS,
        default: "600",
        meaning: "hard cap from a segment's first span to its flush, in seconds; below SPANBUF_REDIS_TTL_SECS (below the timeouts, the cap decides)",
    },
    VarDoc {
        name: var::MAX_SEGMENT_BYTES,
        default: "10485760",
        meaning: "detach threshold and output chunk size, in bytes (at least 1024)",
    },
    VarDoc {
        name: var::MAX_SPAN_BYTES,
        default: "1048576",
        meaning: "larger spans are invalid, in bytes (at least 64; a span above SPANBUF_MAX_SEGMENT_BYTES is an output chunk alone)",
    },
    VarDoc {
        name: var::MAX_FLUSH_SEGMENTS,
        default: "500",
        meaning: "segments per flush cycle, split over the owned shards",
    },
    VarDoc {
        name: var::COMPRESSION_LEVEL,
        default: "0",
        meaning: "zstd level of buffered payloads: 1 to 22, 0 = zstd's default, -1 = store raw",
    },
    VarDoc {
        name: var::FLUSH_LOCK_TTL_SECS,
        default: "30",
        meaning: "how long a flush lock protects a holder that stopped refreshing it (a crashed flusher); then another flusher takes the segment over. In seconds; 0 disables locks; below SPANBUF_REDIS_TTL_SECS (how long the lock key itself stays)",
    },
    VarDoc {
        name: var::OUTPUT_CODEC,
        default: "json",
        meaning: "encoding of output records: json or msgpack",
    },
    VarDoc {
        name: var::SLICE_ID,
        default: "",
        meaning: "queue keys become P:q:<slice>-<shard> instead of P:q:<shard>",
    },
    VarDoc {
        name: var::MAX_FLUSH_BYTES,
        default: "67108864",
        meaning: "byte budget of one flush cycle: segments (by ingested bytes) loaded at once, at least one (at least 1024)",
    },
    VarDoc {
        name: var::MAX_TRACE_SPANS,
        default: "100000",
        meaning: "spans one trace may hold in the buffer (entries of its redirect map); more are refused and counted in spanbuf_spans_dropped_total (reason trace_too_large), so one hot trace cannot stall Redis for every shard; 0 = no cap",
    },
    VarDoc {
        name: var::DELIVERED_TTL_SECS,
        default: "120",
        meaning: "how long a trace remembers the span ids it delivered, so that spans read again from Kafka after their segment was flushed (a worker crash before its commit) count as duplicates instead of going out again under another flush_id; 0 disables",
    },
    VarDoc {
        name: var::SEGMENT_PAGE_SIZE,
        default: "100",
        meaning: "SSCAN COUNT when loading a segment's payload sets (1 to 100000)",
    },
    VarDoc {
        name: var::WINDOW_MAX_SPANS,
        default: "20000",
        meaning: "coalescing window: consumed spans staged in memory before one write to Redis (1 to 1000000)",
    },
    VarDoc {
        name: var::WINDOW_MAX_BYTES,
        default: "33554432",
        meaning: "coalescing window: staged payload bytes that make a window due (at least 1024)",
    },
    VarDoc {
        name: var::WINDOW_MAX_MS,
        default: "250",
        meaning: "coalescing window: the longest a consumed span waits in memory before its window is written, in milliseconds (0 to 60000; 0 = every poll batch is its own window)",
    },
    VarDoc {
        name: var::FLUSH_INTERVAL_MS,
        default: "500",
        meaning: "pause between flush cycles when nothing more is due, in milliseconds (10 to 60000)",
    },
    VarDoc {
        name: var::MAX_FLUSH_LAG_SECS,
        default: "30",
        meaning: "soft backpressure: consumption pauses while the flush lag of an owned shard exceeds this many seconds; 0 disables",
    },
    VarDoc {
        name: var::MAX_REDIS_MEMORY_PERCENT,
        default: "90",
        meaning: "hard backpressure: consumption pauses before Redis used_memory could pass this percentage of maxmemory, keeping room for one coalescing window (flushing goes on); 0 disables",
    },
    VarDoc {
        name: var::MAX_LOOP_STALL_SECS,
        default: "60",
        meaning: "/health fails when the consume or flush loop has not completed a cycle for this many seconds",
    },
    VarDoc {
        name: var::SHUTDOWN_TIMEOUT_SECS,
        default: "30",
        meaning: "on SIGTERM, the longest wait for the batch in hand, the flush cycle and the producer before exiting",
    },
    VarDoc {
        name: var::HTTP_ADDR,
        default: "0.0.0.0:9102",
        meaning: "listen address of /metrics, /health and /ready",
    },
    VarDoc {
        name: var::LOG_FORMAT,
        default: "text",
        meaning: "log format: text or json",
    },
    VarDoc {
        name: var::LOG_LEVEL,
        default: "info",
        meaning: "log filter, a tracing EnvFilter directive (e.g. info,spanbuf=debug)",
    },
];

/// What a variable accepts, as the tail of a problem line. One text per variable, so a
/// syntax error and a range error on the same variable read the same.
fn expected(name: &str) -> &'static str {
    match name {
        var::REDIS_URL => {
            "expected a redis://, rediss://, unix:// or redis+unix:// URL (e.g. redis://127.0.0.1:6379)"
        }
        var::REDIS_CLUSTER_URLS => {
            "expected comma-separated redis:// or rediss:// URLs (e.g. redis://10.0.0.1:7000,redis://10.0.0.2:7000), or empty for standalone mode"
        }
        var::KEY_PREFIX => "expected a non-empty prefix without whitespace, { or } (e.g. span-buf)",
        var::REDIS_TTL_SECS => {
            "expected a whole number of seconds from 1 to 1000000000000000 (Redis keeps expiry times in milliseconds; e.g. 3600)"
        }
        var::REDIS_POOL_SIZE => "expected a whole number from 1 to 1024 (e.g. 16)",
        var::REDIS_TIMEOUT_MS => "expected a whole number of milliseconds greater than 0 (e.g. 5000)",
        var::KAFKA_BROKERS => "expected comma-separated bootstrap servers (e.g. 127.0.0.1:9092)",
        var::INPUT_TOPIC | var::OUTPUT_TOPIC => {
            "expected a Kafka topic name of 1 to 249 characters from A-Z a-z 0-9 . _ - (e.g. ingest-spans)"
        }
        var::DLQ_TOPIC => {
            "expected a Kafka topic name of 1 to 249 characters from A-Z a-z 0-9 . _ -, or empty for none"
        }
        var::CONSUMER_GROUP => "expected a non-empty consumer group id (e.g. spanbuf)",
        var::BATCH_MAX_SPANS => "expected a whole number from 1 to 100000 (e.g. 500)",
        var::BATCH_MAX_MS => "expected a whole number of milliseconds from 1 to 60000 (e.g. 1000)",
        var::TIMEOUT_SECS => "expected a whole number of seconds greater than 0 (e.g. 60)",
        var::ROOT_TIMEOUT_SECS => "expected a whole number of seconds greater than 0 (e.g. 10)",
        var::MAX_SEGMENT_LIFETIME_SECS => {
            "expected a whole number of seconds greater than 0 (e.g. 600)"
        }
        var::MAX_SEGMENT_BYTES => "expected a whole number of bytes, at least 1024 (e.g. 10485760)",
        var::MAX_SPAN_BYTES => "expected a whole number of bytes, at least 64 (e.g. 1048576)",
        var::MAX_FLUSH_SEGMENTS => "expected a whole number greater than 0 (e.g. 500)",
        var::COMPRESSION_LEVEL => {
            "expected -1 (store raw), 0 (zstd's default) or a zstd level from 1 to 22"
        }
        var::FLUSH_LOCK_TTL_SECS => {
            "expected a whole number of seconds, 0 to disable flush locks (e.g. 30)"
        }
        var::OUTPUT_CODEC => "expected json or msgpack",
        var::SLICE_ID => "expected a whole number from 0 to 4294967295, or empty for none",
        var::SEGMENT_PAGE_SIZE => "expected a whole number from 1 to 100000 (e.g. 100)",
        var::MAX_FLUSH_BYTES => "expected a whole number of bytes, at least 1024 (e.g. 67108864)",
        var::DELIVERED_TTL_SECS => "expected a whole number of seconds, 0 (off) or more (e.g. 120)",
        var::MAX_TRACE_SPANS => "expected a whole number of spans, 0 (no cap) or more (e.g. 100000)",
        var::FLUSH_INTERVAL_MS => "expected a whole number of milliseconds from 10 to 60000 (e.g. 500)",
        var::MAX_FLUSH_LAG_SECS => "expected a whole number of seconds, 0 to disable (e.g. 30)",
        var::WINDOW_MAX_SPANS => "expected a whole number from 1 to 1000000 (e.g. 20000)",
        var::WINDOW_MAX_BYTES => "expected a whole number of bytes, at least 1024 (e.g. 33554432)",
        var::WINDOW_MAX_MS => "expected a whole number of milliseconds from 0 to 60000 (e.g. 250)",
        var::MAX_REDIS_MEMORY_PERCENT => "expected a whole number from 0 (disabled) to 100 (e.g. 90)",
        var::MAX_LOOP_STALL_SECS => "expected a whole number of seconds from 1 to 86400 (e.g. 60)",
        var::SHUTDOWN_TIMEOUT_SECS => "expected a whole number of seconds from 1 to 3600 (e.g. 30)",
        var::HTTP_ADDR => "expected an ip:port socket address (e.g. 0.0.0.0:9102 or [::]:9102)",
        var::LOG_FORMAT => "expected text or json",
        var::LOG_LEVEL => {
            "expected a non-empty tracing filter directive (e.g. info or info,spanbuf=debug)"
        }
        // Only reached for names that are not fixed variables, which `set` rejects
        // before anything asks what they expect.
        _ => "expected a known variable",
    }
}

/// The whole configuration of one process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub redis: RedisConfig,
    pub kafka: KafkaConfig,
    pub buffer: BufferConfig,
    pub worker: WorkerConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
}

/// How the `spanbuf run` worker paces, protects and stops itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    /// `SPANBUF_WINDOW_MAX_SPANS`: a coalescing window (docs/design.md §5) is
    /// written once it stages this many spans, 1..=1000000; 20000 by default
    /// (chosen by the bench sweep in the README).
    pub window_max_spans: usize,
    /// `SPANBUF_WINDOW_MAX_BYTES`: ... or this many payload bytes, ≥ 1024; 32 MiB
    /// by default (with the span bound, what a worker holds in memory).
    pub window_max_bytes: usize,
    /// `SPANBUF_WINDOW_MAX_MS`: ... or once its oldest batch is this old,
    /// milliseconds, 0..=60000 (0: each poll batch is a window); 250 by default.
    pub window_max_ms: u64,
    /// `SPANBUF_FLUSH_INTERVAL_MS`: pause between flush cycles when nothing more is
    /// due, milliseconds, 10..=60000; 500 by default.
    pub flush_interval_ms: u64,
    /// `SPANBUF_MAX_FLUSH_LAG_SECS`: soft backpressure threshold, seconds; consumption
    /// pauses while an owned shard's flush lag exceeds it; 0 disables; 30 by default.
    pub max_flush_lag_secs: u64,
    /// `SPANBUF_MAX_REDIS_MEMORY_PERCENT`: hard backpressure threshold, percent of
    /// Redis `maxmemory` (every node in a cluster); consumption pauses above it while
    /// flushing continues, so it clears by itself; 0 disables (also when Redis has no
    /// `maxmemory`); 90 by default.
    pub max_redis_memory_percent: u8,
    /// `SPANBUF_MAX_LOOP_STALL_SECS`: `/health` fails when a loop has not completed a
    /// cycle for this long, seconds, 1..=86400; 60 by default.
    pub max_loop_stall_secs: u64,
    /// `SPANBUF_SHUTDOWN_TIMEOUT_SECS`: the longest graceful drain on SIGTERM,
    /// seconds, 1..=3600; 30 by default.
    pub shutdown_timeout_secs: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            window_max_spans: 20_000,
            window_max_bytes: 32 * 1024 * 1024,
            window_max_ms: 250,
            flush_interval_ms: 500,
            max_flush_lag_secs: 30,
            max_redis_memory_percent: 90,
            max_loop_stall_secs: 60,
            shutdown_timeout_secs: 30,
        }
    }
}

/// Where the buffer lives. `Debug` redacts URL passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `SPANBUF_REDIS_URL`: standalone server, `redis://127.0.0.1:6379` by default.
    /// Validated even in cluster mode, where it is not used.
    pub url: String,
    /// `SPANBUF_REDIS_CLUSTER_URLS`: Redis Cluster seed nodes (redis:// or rediss://);
    /// empty (the default) = standalone mode.
    pub cluster_urls: Vec<String>,
    /// `SPANBUF_KEY_PREFIX`: prefix of every key, `span-buf` by default (Sentry's).
    pub key_prefix: String,
    /// `SPANBUF_REDIS_TTL_SECS`: TTL of every key, seconds; 3600 by default.
    pub ttl_secs: u64,
    /// `SPANBUF_REDIS_POOL_SIZE`: connections per process, 1..=1024; 16 by default.
    pub pool_size: usize,
    /// `SPANBUF_REDIS_TIMEOUT_MS`: response timeout of one command, milliseconds;
    /// 5000 by default.
    pub timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".to_owned(),
            cluster_urls: Vec::new(),
            key_prefix: "span-buf".to_owned(),
            ttl_secs: 3600,
            pool_size: 16,
            timeout_ms: 5000,
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cluster_urls: Vec<String> = self.cluster_urls.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("cluster_urls", &cluster_urls)
            .field("key_prefix", &self.key_prefix)
            .field("ttl_secs", &self.ttl_secs)
            .field("pool_size", &self.pool_size)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// Kafka topics, group, batching and passthrough properties. `Debug` redacts secret
/// property values.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `SPANBUF_KAFKA_BROKERS`: bootstrap servers, `127.0.0.1:9092` by default.
    pub brokers: String,
    /// `SPANBUF_INPUT_TOPIC`: spans in, `ingest-spans` by default.
    pub input_topic: String,
    /// `SPANBUF_OUTPUT_TOPIC`: segments out, `buffered-segments` by default; differs
    /// from the input topic.
    pub output_topic: String,
    /// `SPANBUF_CONSUMER_GROUP`: consumer group id, `spanbuf` by default.
    pub consumer_group: String,
    /// `SPANBUF_DLQ_TOPIC`: dead-letter topic for invalid spans; none by default.
    /// Differs from the input and output topics.
    pub dlq_topic: Option<String>,
    /// `SPANBUF_BATCH_MAX_SPANS`: most spans per ingest batch, 1..=100000; 500 by default.
    pub batch_max_spans: usize,
    /// `SPANBUF_BATCH_MAX_MS`: longest wait to fill a batch, milliseconds, 1..=60000;
    /// 1000 by default.
    pub batch_max_ms: u64,
    /// librdkafka properties for the consumer: `SPANBUF_KAFKA_PROP_*` overridden by
    /// `SPANBUF_KAFKA_CONSUMER_PROP_*`. Never holds the properties spanbuf sets itself.
    pub consumer_properties: BTreeMap<String, String>,
    /// librdkafka properties for the producer: `SPANBUF_KAFKA_PROP_*` overridden by
    /// `SPANBUF_KAFKA_PRODUCER_PROP_*`. Never holds the properties spanbuf sets itself.
    pub producer_properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".to_owned(),
            input_topic: "ingest-spans".to_owned(),
            output_topic: "buffered-segments".to_owned(),
            consumer_group: "spanbuf".to_owned(),
            dlq_topic: None,
            batch_max_spans: 500,
            batch_max_ms: 1000,
            consumer_properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
        }
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("input_topic", &self.input_topic)
            .field("output_topic", &self.output_topic)
            .field("consumer_group", &self.consumer_group)
            .field("dlq_topic", &self.dlq_topic)
            .field("batch_max_spans", &self.batch_max_spans)
            .field("batch_max_ms", &self.batch_max_ms)
            .field(
                "consumer_properties",
                &RedactedProperties(&self.consumer_properties),
            )
            .field(
                "producer_properties",
                &RedactedProperties(&self.producer_properties),
            )
            .finish()
    }
}

/// Debug view of a property map with secret values replaced.
struct RedactedProperties<'a>(&'a BTreeMap<String, String>);

impl fmt::Debug for RedactedProperties<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(name, value)| {
                let shown = if is_secret_property(name) {
                    REDACTED
                } else {
                    value.as_str()
                };
                (name, shown)
            }))
            .finish()
    }
}

/// Timing, size and encoding rules of the buffer itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferConfig {
    /// `SPANBUF_TIMEOUT_SECS`: inactivity before flushing a segment without its root,
    /// seconds, > 0; 60 by default (Sentry's).
    pub timeout_secs: u64,
    /// `SPANBUF_ROOT_TIMEOUT_SECS`: inactivity before flushing a segment with its root,
    /// seconds, > 0; 10 by default (Sentry's). Above `timeout_secs` is accepted with a
    /// warning.
    pub root_timeout_secs: u64,
    /// `SPANBUF_MAX_SEGMENT_LIFETIME_SECS`: hard cap from a segment's first span to its
    /// flush deadline, seconds, ≥ 1; 600 by default, so a segment kept alive by a
    /// steady trickle of spans is still flushed within ten minutes. Below the
    /// timeouts the cap simply decides (a warning says so).
    ///
    /// Must be below `redis.ttl_secs`: a payload set is written once and expires
    /// `ttl_secs` after it was written, while its segment may be due up to
    /// `max_segment_lifetime_secs` after its first span. Less than a timeout of
    /// margin between the two is accepted with a warning: a flush that runs late
    /// (consumer backlog, delivery retried, a lock held by a crashed flusher) could
    /// then find the oldest spans of a long-lived segment expired.
    pub max_segment_lifetime_secs: u64,
    /// `SPANBUF_MAX_SEGMENT_BYTES`: detach threshold at ingest and chunk size of output
    /// records, bytes, ≥ 1024; 10485760 (10 MiB, Sentry's) by default.
    pub max_segment_bytes: u64,
    /// `SPANBUF_MAX_SPAN_BYTES`: larger spans are invalid, bytes, ≥ 64; 1048576 (1 MiB)
    /// by default. May exceed `max_segment_bytes`: such a span is an output chunk alone.
    pub max_span_bytes: u64,
    /// `SPANBUF_MAX_FLUSH_SEGMENTS`: segments per flush cycle, split over the owned
    /// shards, ≥ 1; 500 by default (Sentry's).
    pub max_flush_segments: usize,
    /// `SPANBUF_COMPRESSION_LEVEL`: zstd level of payload blobs, -1 = store raw,
    /// 0 = zstd's default, 1..=22; 0 by default.
    pub compression_level: i32,
    /// `SPANBUF_FLUSH_LOCK_TTL_SECS`: flush lock TTL, seconds, 0 disables locks; 30 by
    /// default.
    pub flush_lock_ttl_secs: u64,
    /// `SPANBUF_OUTPUT_CODEC`: encoding of output records, JSON by default.
    pub output_codec: OutputCodec,
    /// `SPANBUF_SLICE_ID`: when set, queue keys are `P:q:<slice>-<shard>`; unset by
    /// default.
    pub slice_id: Option<u32>,
    /// `SPANBUF_SEGMENT_PAGE_SIZE`: SSCAN COUNT when loading payload sets,
    /// 1..=100000; 100 by default.
    pub segment_page_size: usize,
    /// `SPANBUF_MAX_FLUSH_BYTES`: a flush cycle loads segments (by their
    /// ingested bytes) up to this budget, and at least one; 64 MiB by
    /// default, so the flusher's memory stays bounded whatever the segment
    /// sizes.
    pub max_flush_bytes: u64,
    /// `SPANBUF_DELIVERED_TTL_SECS`: lifetime of a trace's record of
    /// delivered span ids (`P:dl:{pt}`), seconds, 0 = no record; 120 by
    /// default. Spans read again within it after their segment was flushed
    /// are counted as duplicates at flush.
    pub delivered_ttl_secs: u64,
    /// `SPANBUF_MAX_TRACE_SPANS`: spans one trace may buffer (its redirect
    /// map's entries), 0 = no cap; 100000 by default. More are refused at
    /// ingest and counted as dropped (`trace_too_large`).
    pub max_trace_spans: u64,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            timeout_secs: 60,
            root_timeout_secs: 10,
            max_segment_lifetime_secs: 600,
            max_segment_bytes: 10 * 1024 * 1024,
            max_span_bytes: 1024 * 1024,
            max_flush_segments: 500,
            compression_level: 0,
            flush_lock_ttl_secs: 30,
            output_codec: OutputCodec::Json,
            slice_id: None,
            segment_page_size: 100,
            max_flush_bytes: 64 * 1024 * 1024,
            delivered_ttl_secs: 120,
            max_trace_spans: 100_000,
        }
    }
}

/// Encoding of the records produced to the output topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutputCodec {
    #[default]
    Json,
    Msgpack,
}

impl OutputCodec {
    /// The name used in `SPANBUF_OUTPUT_CODEC`.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputCodec::Json => "json",
            OutputCodec::Msgpack => "msgpack",
        }
    }
}

/// The metrics and health endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// `SPANBUF_HTTP_ADDR`: listen address, `0.0.0.0:9102` by default (port 0 picks a
    /// free port).
    pub addr: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 9102)),
        }
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// `SPANBUF_LOG_FORMAT`: text by default.
    pub format: LogFormat,
    /// `SPANBUF_LOG_LEVEL`: a tracing `EnvFilter` directive, `info` by default. Only
    /// checked for being non-blank here; the subscriber parses it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

/// Format of log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    /// The name used in `SPANBUF_LOG_FORMAT`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Every problem found in a configuration; the process must not start with any.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    /// One line per problem, no trailing newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// One bad variable (or a bad combination, reported on the variable to change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The variable, e.g. `SPANBUF_TIMEOUT_SECS`.
    pub var: String,
    /// The value received, with secrets redacted. `None` for cross-field problems and
    /// where the value is not shown: unknown names, malformed passthrough names (the
    /// value may be a secret) and values that are not UTF-8.
    pub value: Option<String>,
    /// The rest of the line: what was expected, lowercase, usually starting with
    /// `expected`.
    pub expected: String,
}

impl fmt::Display for ConfigProblem {
    /// `SPANBUF_TIMEOUT_SECS="abc": expected a whole number of seconds ...`, or without
    /// `="..."` when there is no value to show.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(value) => write!(f, "{}={:?}: {}", self.var, value, self.expected),
            None => write!(f, "{}: {}", self.var, self.expected),
        }
    }
}

/// Why [`Config::set`] did not take a pair.
enum SetError {
    Unknown,
    Invalid,
}

/// A problem from [`Config::checks`] with the variables it depends on, so a check
/// whose input already failed elsewhere can be left out instead of reported twice.
struct Check {
    problem: ConfigProblem,
    involves: Vec<&'static str>,
}

#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    /// A single-variable rule with the variable's usual expectation.
    fn require(&mut self, var: &'static str, ok: bool, value: impl fmt::Display) {
        if !ok {
            self.field(var, value.to_string(), expected(var).to_owned());
        }
    }

    /// A single-variable problem with its own text.
    fn field(&mut self, var: &'static str, value: String, expected: String) {
        self.0.push(Check {
            problem: ConfigProblem {
                var: var.to_owned(),
                value: Some(shown_value(var, &value)),
                expected,
            },
            involves: vec![var],
        });
    }

    /// A rule over several variables, reported on `var` (the one to change) without a
    /// value; the text names the others.
    fn cross(&mut self, var: &'static str, others: &[&'static str], expected: String) {
        let mut involves = vec![var];
        involves.extend_from_slice(others);
        self.0.push(Check {
            problem: ConfigProblem {
                var: var.to_owned(),
                value: None,
                expected,
            },
            involves,
        });
    }

    /// A rule over two variables with a text for each side: reported on `b` when
    /// the operator set `b` but not `a`, else on `a`. A default is never blamed
    /// for a combination the operator made.
    fn cross_either(
        &mut self,
        set: Option<&BTreeSet<String>>,
        a: (&'static str, String),
        b: (&'static str, String),
    ) {
        let only_b = set.is_some_and(|set| set.contains(b.0) && !set.contains(a.0));
        let ((var, text), other) = if only_b { (b, a.0) } else { (a, b.0) };
        self.cross(var, &[other], text);
    }

    /// Drops cross-field problems about a variable that is already reported on its
    /// own: its value is wrong anyway, comparing it to others only adds noise.
    fn finish(self) -> Vec<Check> {
        let single: BTreeSet<&str> = self
            .0
            .iter()
            .filter(|c| c.problem.value.is_some())
            .map(|c| c.involves[0])
            .collect();
        self.0
            .into_iter()
            .filter(|c| c.problem.value.is_some() || !c.involves.iter().any(|v| single.contains(v)))
            .collect()
    }
}

impl Config {
    /// Reads every `SPANBUF_*` variable of the process. A name or value that is not
    /// UTF-8 is a problem naming the variable; other names are ignored.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_os_vars(std::env::vars_os())
    }

    /// Builds the configuration from `(name, value)` pairs, ignoring names without the
    /// `SPANBUF_` prefix. Every parse problem and every [`validate`](Self::validate)
    /// problem is reported in one error.
    pub fn from_vars<I, K, V>(vars: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        Self::parse(
            vars.into_iter()
                .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned())),
            Vec::new(),
        )
    }

    /// Checks every rule on the typed values, single-field and cross-field; for a
    /// configuration built in code. [`from_vars`](Self::from_vars) runs it already.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems: Vec<ConfigProblem> = self
            .checks(None)
            .into_iter()
            .map(|check| check.problem)
            .collect();
        sort_problems(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    /// True when Redis Cluster seed nodes are configured.
    pub fn redis_cluster_mode(&self) -> bool {
        !self.redis.cluster_urls.is_empty()
    }

    /// The effective configuration for `spanbuf config`: one `SPANBUF_NAME=value` line
    /// per variable of [`VARIABLES`] in that order, then one per passthrough property,
    /// each line ending in `\n`. Passwords and secret properties show as `***`; apart
    /// from them the output is valid input for [`from_vars`](Self::from_vars).
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, value) in self.entries() {
            push_line(&mut out, name, &shown_value(name, &value));
        }
        for (name, value) in self.passthrough_entries() {
            push_line(&mut out, &name, &shown_value(&name, &value));
        }
        out
    }

    fn from_os_vars(
        vars: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<Config, ConfigError> {
        let mut text = Vec::new();
        let mut problems = Vec::new();
        for (name, value) in vars {
            match (name.into_string(), value.into_string()) {
                (Ok(name), Ok(value)) => text.push((name, value)),
                (Ok(name), Err(_)) => {
                    if name.starts_with(PREFIX) {
                        problems.push(ConfigProblem {
                            var: name,
                            value: None,
                            expected: "expected a UTF-8 value, got bytes that are not UTF-8"
                                .to_owned(),
                        });
                    }
                }
                (Err(name), _) => {
                    let name = name.to_string_lossy().into_owned();
                    if name.starts_with(PREFIX) {
                        problems.push(ConfigProblem {
                            var: name,
                            value: None,
                            expected:
                                "expected a UTF-8 variable name, got bytes that are not UTF-8"
                                    .to_owned(),
                        });
                    }
                }
            }
        }
        Self::parse(text, problems)
    }

    /// The one parser behind [`from_env`](Self::from_env) and
    /// [`from_vars`](Self::from_vars); `problems` holds what the caller already found.
    fn parse(
        vars: impl IntoIterator<Item = (String, String)>,
        mut problems: Vec<ConfigProblem>,
    ) -> Result<Config, ConfigError> {
        // Variables whose value did not parse: their field keeps its default, so a
        // cross-field check involving them would compare against a value nobody set.
        let mut failed: BTreeSet<String> = problems.iter().map(|p| p.var.clone()).collect();

        let mut raw: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in vars {
            // Test-only fault variables, known only to builds with the
            // `fault-points` feature (see `crate::fault`).
            if !name.starts_with(PREFIX) || crate::fault::is_fault_var(&name) {
                continue;
            }
            if raw.contains_key(&name) {
                problems.push(ConfigProblem {
                    var: name.clone(),
                    value: None,
                    expected: "expected to be set once, but it is set more than once".to_owned(),
                });
                failed.insert(name);
                continue;
            }
            raw.insert(name, value);
        }

        let mut config = Config::default();
        let mut common = BTreeMap::new();
        let mut consumer = BTreeMap::new();
        let mut producer = BTreeMap::new();
        for (name, value) in &raw {
            let passthrough = [
                (KAFKA_CONSUMER_PROP_PREFIX, &mut consumer),
                (KAFKA_PRODUCER_PROP_PREFIX, &mut producer),
                (KAFKA_PROP_PREFIX, &mut common),
            ]
            .into_iter()
            .find_map(|(prefix, map)| name.strip_prefix(prefix).map(|rest| (prefix, rest, map)));
            if let Some((prefix, rest, map)) = passthrough {
                match property_name(rest) {
                    None => problems.push(ConfigProblem {
                        var: name.clone(),
                        value: None,
                        expected: format!(
                            "expected a librdkafka property name after {prefix}, in upper case with _ for . (e.g. {KAFKA_PROP_PREFIX}SECURITY_PROTOCOL)"
                        ),
                    }),
                    Some(property) => match controlled_property(&property) {
                        Some(why) => problems.push(ConfigProblem {
                            var: name.clone(),
                            value: Some(shown_value(name, value)),
                            expected: format!("{property} {why}"),
                        }),
                        None => {
                            map.insert(property, value.clone());
                        }
                    },
                }
                continue;
            }
            match config.set(name, value) {
                Ok(()) => {}
                Err(SetError::Invalid) => {
                    problems.push(ConfigProblem {
                        var: name.clone(),
                        value: Some(shown_value(name, value)),
                        expected: expected(name).to_owned(),
                    });
                    failed.insert(name.clone());
                }
                Err(SetError::Unknown) => problems.push(ConfigProblem {
                    var: name.clone(),
                    value: None,
                    expected: unknown_variable(name),
                }),
            }
        }

        let mut consumer_properties = common.clone();
        consumer_properties.extend(consumer);
        let mut producer_properties = common;
        producer_properties.extend(producer);
        config.kafka.consumer_properties = consumer_properties;
        config.kafka.producer_properties = producer_properties;

        let set: BTreeSet<String> = raw.keys().cloned().collect();
        for check in config.checks(Some(&set)) {
            if check.involves.iter().any(|v| failed.contains(*v)) {
                continue;
            }
            let mut problem = check.problem;
            // Show the value as written ("007"), not as re-rendered from the field ("7").
            if problem.value.is_some() {
                if let Some(value) = raw.get(&problem.var) {
                    problem.value = Some(shown_value(&problem.var, value));
                }
            }
            problems.push(problem);
        }

        if problems.is_empty() {
            return Ok(config);
        }
        sort_problems(&mut problems);
        Err(ConfigError { problems })
    }

    /// Stores one fixed variable's value; syntax only, ranges are [`Self::checks`]'.
    fn set(&mut self, name: &str, value: &str) -> Result<(), SetError> {
        fn num<T: FromStr>(value: &str) -> Result<T, SetError> {
            value.parse().map_err(|_| SetError::Invalid)
        }
        let (r, k, b) = (&mut self.redis, &mut self.kafka, &mut self.buffer);
        match name {
            var::REDIS_URL => r.url = value.to_owned(),
            var::REDIS_CLUSTER_URLS => {
                r.cluster_urls = if value.is_empty() {
                    Vec::new()
                } else {
                    value.split(',').map(|url| url.trim().to_owned()).collect()
                }
            }
            var::KEY_PREFIX => r.key_prefix = value.to_owned(),
            var::REDIS_TTL_SECS => r.ttl_secs = num(value)?,
            var::REDIS_POOL_SIZE => r.pool_size = num(value)?,
            var::REDIS_TIMEOUT_MS => r.timeout_ms = num(value)?,
            var::KAFKA_BROKERS => k.brokers = value.to_owned(),
            var::INPUT_TOPIC => k.input_topic = value.to_owned(),
            var::OUTPUT_TOPIC => k.output_topic = value.to_owned(),
            var::CONSUMER_GROUP => k.consumer_group = value.to_owned(),
            var::DLQ_TOPIC => {
                k.dlq_topic = (!value.is_empty()).then(|| value.to_owned());
            }
            var::BATCH_MAX_SPANS => k.batch_max_spans = num(value)?,
            var::BATCH_MAX_MS => k.batch_max_ms = num(value)?,
            var::TIMEOUT_SECS => b.timeout_secs = num(value)?,
            var::ROOT_TIMEOUT_SECS => b.root_timeout_secs = num(value)?,
            var::MAX_SEGMENT_LIFETIME_SECS => b.max_segment_lifetime_secs = num(value)?,
            var::MAX_SEGMENT_BYTES => b.max_segment_bytes = num(value)?,
            var::MAX_SPAN_BYTES => b.max_span_bytes = num(value)?,
            var::MAX_FLUSH_SEGMENTS => b.max_flush_segments = num(value)?,
            var::COMPRESSION_LEVEL => b.compression_level = num(value)?,
            var::FLUSH_LOCK_TTL_SECS => b.flush_lock_ttl_secs = num(value)?,
            var::OUTPUT_CODEC => {
                b.output_codec = match value.to_ascii_lowercase().as_str() {
                    "json" => OutputCodec::Json,
                    "msgpack" => OutputCodec::Msgpack,
                    _ => return Err(SetError::Invalid),
                }
            }
            var::SLICE_ID => {
                b.slice_id = if value.is_empty() {
                    None
                } else {
                    Some(num(value)?)
                }
            }
            var::SEGMENT_PAGE_SIZE => b.segment_page_size = num(value)?,
            var::MAX_FLUSH_BYTES => b.max_flush_bytes = num(value)?,
            var::DELIVERED_TTL_SECS => b.delivered_ttl_secs = num(value)?,
            var::MAX_TRACE_SPANS => b.max_trace_spans = num(value)?,
            var::FLUSH_INTERVAL_MS => self.worker.flush_interval_ms = num(value)?,
            var::MAX_FLUSH_LAG_SECS => self.worker.max_flush_lag_secs = num(value)?,
            var::WINDOW_MAX_SPANS => self.worker.window_max_spans = num(value)?,
            var::WINDOW_MAX_BYTES => self.worker.window_max_bytes = num(value)?,
            var::WINDOW_MAX_MS => self.worker.window_max_ms = num(value)?,
            var::MAX_REDIS_MEMORY_PERCENT => self.worker.max_redis_memory_percent = num(value)?,
            var::MAX_LOOP_STALL_SECS => self.worker.max_loop_stall_secs = num(value)?,
            var::SHUTDOWN_TIMEOUT_SECS => self.worker.shutdown_timeout_secs = num(value)?,
            var::HTTP_ADDR => self.http.addr = num(value)?,
            var::LOG_FORMAT => {
                self.log.format = match value.to_ascii_lowercase().as_str() {
                    "text" => LogFormat::Text,
                    "json" => LogFormat::Json,
                    _ => return Err(SetError::Invalid),
                }
            }
            var::LOG_LEVEL => self.log.level = value.to_owned(),
            _ => return Err(SetError::Unknown),
        }
        Ok(())
    }

    /// Every rule on the typed values.
    /// Settings that work but are unusual enough to say so at start (logged as
    /// warnings by the commands that run the buffer; `spanbuf config` prints
    /// them on stderr). Never a reason to refuse a start.
    pub fn warnings(&self) -> Vec<String> {
        let (r, b) = (&self.redis, &self.buffer);
        let mut warnings = Vec::new();
        if b.root_timeout_secs > b.timeout_secs {
            warnings.push(format!(
                "SPANBUF_ROOT_TIMEOUT_SECS ({}) is above SPANBUF_TIMEOUT_SECS ({}): a segment that has its root waits longer than one without",
                b.root_timeout_secs, b.timeout_secs
            ));
        }
        let longest_timeout = b.timeout_secs.max(b.root_timeout_secs);
        if b.max_segment_lifetime_secs < longest_timeout {
            warnings.push(format!(
                "SPANBUF_MAX_SEGMENT_LIFETIME_SECS ({}) is below the inactivity timeouts (SPANBUF_TIMEOUT_SECS {}, SPANBUF_ROOT_TIMEOUT_SECS {}): the cap decides when such segments flush, {} s after their first span",
                b.max_segment_lifetime_secs, b.timeout_secs, b.root_timeout_secs, b.max_segment_lifetime_secs
            ));
        }
        let latest_due = b.max_segment_lifetime_secs.saturating_add(longest_timeout);
        if r.ttl_secs > b.max_segment_lifetime_secs && r.ttl_secs < latest_due {
            warnings.push(format!(
                "SPANBUF_REDIS_TTL_SECS ({}) leaves less than a timeout ({} s) of margin over SPANBUF_MAX_SEGMENT_LIFETIME_SECS ({}): a flush that runs late (backlog, broker outage) may find a long-lived segment's first spans expired",
                r.ttl_secs, longest_timeout, b.max_segment_lifetime_secs
            ));
        }
        if self.worker.max_redis_memory_percent == 100 {
            warnings.push(
                "SPANBUF_MAX_REDIS_MEMORY_PERCENT is 100: hard backpressure starts only when Redis is full, when a maxmemory-policy of noeviction already refuses writes".to_owned(),
            );
        }
        warnings
    }

    /// Every rule on the typed values. `set` names the variables the operator
    /// set (`None` for a configuration built in code): a cross-field problem is
    /// reported on one of those.
    fn checks(&self, set: Option<&BTreeSet<String>>) -> Vec<Check> {
        let mut c = Checks::default();
        let (r, k, b) = (&self.redis, &self.kafka, &self.buffer);

        if let Err(why) = check_redis_url(&r.url, true) {
            let text = format!("{}, but {why}", expected(var::REDIS_URL));
            c.field(var::REDIS_URL, r.url.clone(), text);
        }
        let bad_nodes: Vec<String> = r
            .cluster_urls
            .iter()
            .enumerate()
            .filter_map(|(i, url)| {
                check_redis_url(url, false)
                    .err()
                    .map(|why| format!("entry {}: {why}", i + 1))
            })
            .collect();
        if !bad_nodes.is_empty() {
            let text = format!(
                "{}, but {}",
                expected(var::REDIS_CLUSTER_URLS),
                bad_nodes.join("; ")
            );
            c.field(var::REDIS_CLUSTER_URLS, r.cluster_urls.join(","), text);
        }
        c.require(
            var::KEY_PREFIX,
            !r.key_prefix.is_empty()
                && !r
                    .key_prefix
                    .chars()
                    .any(|ch| ch.is_whitespace() || ch.is_control() || ch == '{' || ch == '}'),
            &r.key_prefix,
        );
        c.require(
            var::REDIS_TTL_SECS,
            (1..=MAX_REDIS_TTL_SECS).contains(&r.ttl_secs),
            r.ttl_secs,
        );
        c.require(
            var::REDIS_POOL_SIZE,
            (1..=1024).contains(&r.pool_size),
            r.pool_size,
        );
        c.require(var::REDIS_TIMEOUT_MS, r.timeout_ms > 0, r.timeout_ms);

        c.require(
            var::KAFKA_BROKERS,
            !k.brokers.trim().is_empty() && k.brokers.split(',').all(|b| !b.trim().is_empty()),
            &k.brokers,
        );
        for (name, topic) in [
            (var::INPUT_TOPIC, Some(&k.input_topic)),
            (var::OUTPUT_TOPIC, Some(&k.output_topic)),
            (var::DLQ_TOPIC, k.dlq_topic.as_ref()),
        ] {
            if let Some(topic) = topic {
                if let Err(why) = check_topic(topic) {
                    c.field(
                        name,
                        topic.clone(),
                        format!("{}, but {why}", expected(name)),
                    );
                }
            }
        }
        c.require(
            var::CONSUMER_GROUP,
            !k.consumer_group.trim().is_empty(),
            &k.consumer_group,
        );
        c.require(
            var::BATCH_MAX_SPANS,
            (1..=100_000).contains(&k.batch_max_spans),
            k.batch_max_spans,
        );
        c.require(
            var::BATCH_MAX_MS,
            (1..=60_000).contains(&k.batch_max_ms),
            k.batch_max_ms,
        );

        c.require(var::TIMEOUT_SECS, b.timeout_secs > 0, b.timeout_secs);
        c.require(
            var::ROOT_TIMEOUT_SECS,
            b.root_timeout_secs > 0,
            b.root_timeout_secs,
        );
        c.require(
            var::MAX_SEGMENT_LIFETIME_SECS,
            b.max_segment_lifetime_secs > 0,
            b.max_segment_lifetime_secs,
        );
        c.require(
            var::MAX_SEGMENT_BYTES,
            b.max_segment_bytes >= 1024,
            b.max_segment_bytes,
        );
        c.require(
            var::MAX_SPAN_BYTES,
            b.max_span_bytes >= 64,
            b.max_span_bytes,
        );
        c.require(
            var::MAX_FLUSH_SEGMENTS,
            b.max_flush_segments >= 1,
            b.max_flush_segments,
        );
        c.require(
            var::COMPRESSION_LEVEL,
            (-1..=22).contains(&b.compression_level),
            b.compression_level,
        );
        c.require(
            var::SEGMENT_PAGE_SIZE,
            (1..=100_000).contains(&b.segment_page_size),
            b.segment_page_size,
        );
        c.require(
            var::MAX_FLUSH_BYTES,
            b.max_flush_bytes >= 1024,
            b.max_flush_bytes,
        );
        c.require(
            var::DELIVERED_TTL_SECS,
            b.delivered_ttl_secs <= MAX_REDIS_TTL_SECS,
            b.delivered_ttl_secs,
        );
        let w = &self.worker;
        c.require(
            var::FLUSH_INTERVAL_MS,
            (10..=60_000).contains(&w.flush_interval_ms),
            w.flush_interval_ms,
        );
        c.require(
            var::WINDOW_MAX_SPANS,
            (1..=1_000_000).contains(&w.window_max_spans),
            w.window_max_spans,
        );
        c.require(
            var::WINDOW_MAX_BYTES,
            w.window_max_bytes >= 1024,
            w.window_max_bytes,
        );
        c.require(
            var::WINDOW_MAX_MS,
            w.window_max_ms <= 60_000,
            w.window_max_ms,
        );
        c.require(
            var::MAX_REDIS_MEMORY_PERCENT,
            w.max_redis_memory_percent <= 100,
            w.max_redis_memory_percent,
        );
        c.require(
            var::MAX_LOOP_STALL_SECS,
            (1..=86_400).contains(&w.max_loop_stall_secs),
            w.max_loop_stall_secs,
        );
        c.require(
            var::SHUTDOWN_TIMEOUT_SECS,
            (1..=3_600).contains(&w.shutdown_timeout_secs),
            w.shutdown_timeout_secs,
        );
        c.require(
            var::LOG_LEVEL,
            !self.log.level.trim().is_empty()
                && tracing_subscriber::EnvFilter::try_new(&self.log.level).is_ok(),
            &self.log.level,
        );

        // Cross-field rules: only combinations that cannot work or would lose
        // data (docs/design.md §8). Merely unusual ones are `warnings()`. Each is
        // reported on a variable the operator set, so defaults never fail a start.
        if k.output_topic == k.input_topic {
            c.cross_either(
                set,
                (
                    var::OUTPUT_TOPIC,
                    format!(
                        "expected a topic other than SPANBUF_INPUT_TOPIC ({:?}): spanbuf would consume its own output",
                        k.input_topic
                    ),
                ),
                (
                    var::INPUT_TOPIC,
                    format!(
                        "expected a topic other than SPANBUF_OUTPUT_TOPIC ({:?}): spanbuf would consume its own output",
                        k.output_topic
                    ),
                ),
            );
        }
        if let Some(dlq) = &k.dlq_topic {
            for (other, topic) in [
                (var::INPUT_TOPIC, &k.input_topic),
                (var::OUTPUT_TOPIC, &k.output_topic),
            ] {
                if dlq == topic {
                    c.cross(
                        var::DLQ_TOPIC,
                        &[other],
                        format!("expected a topic other than {other} ({topic:?}): invalid spans must not mix with valid data"),
                    );
                }
            }
        }
        // A payload set is written once and lives `ttl_secs`; a segment kept
        // alive by a trickle of spans is due up to the lifetime cap after its
        // first span. A TTL that does not outlast the cap loses those spans.
        if r.ttl_secs <= b.max_segment_lifetime_secs {
            c.cross_either(
                set,
                (
                    var::MAX_SEGMENT_LIFETIME_SECS,
                    format!(
                        "expected less than SPANBUF_REDIS_TTL_SECS ({}), got {}: a segment's first spans would expire before the cap flushes it",
                        r.ttl_secs, b.max_segment_lifetime_secs
                    ),
                ),
                (
                    var::REDIS_TTL_SECS,
                    format!(
                        "expected more than SPANBUF_MAX_SEGMENT_LIFETIME_SECS ({}), got {}: a segment's first spans would expire before the cap flushes it",
                        b.max_segment_lifetime_secs, r.ttl_secs
                    ),
                ),
            );
        }
        // A lock that outlives the data: a flusher that crashed holding it
        // keeps its segments from every other flusher until their keys expire.
        if b.flush_lock_ttl_secs >= r.ttl_secs {
            c.cross_either(
                set,
                (
                    var::FLUSH_LOCK_TTL_SECS,
                    format!(
                        "expected less than SPANBUF_REDIS_TTL_SECS ({}), got {}: a crashed flusher's lock would hold its segments until their spans expire",
                        r.ttl_secs, b.flush_lock_ttl_secs
                    ),
                ),
                (
                    var::REDIS_TTL_SECS,
                    format!(
                        "expected more than SPANBUF_FLUSH_LOCK_TTL_SECS ({}), got {}: a crashed flusher's lock would hold its segments until their spans expire",
                        b.flush_lock_ttl_secs, r.ttl_secs
                    ),
                ),
            );
        }
        c.finish()
    }

    /// `(name, value)` for every fixed variable in [`VARIABLES`] order, unredacted.
    fn entries(&self) -> Vec<(&'static str, String)> {
        let (r, k, b) = (&self.redis, &self.kafka, &self.buffer);
        vec![
            (var::REDIS_URL, r.url.clone()),
            (var::REDIS_CLUSTER_URLS, r.cluster_urls.join(",")),
            (var::KEY_PREFIX, r.key_prefix.clone()),
            (var::REDIS_TTL_SECS, r.ttl_secs.to_string()),
            (var::REDIS_POOL_SIZE, r.pool_size.to_string()),
            (var::REDIS_TIMEOUT_MS, r.timeout_ms.to_string()),
            (var::KAFKA_BROKERS, k.brokers.clone()),
            (var::INPUT_TOPIC, k.input_topic.clone()),
            (var::OUTPUT_TOPIC, k.output_topic.clone()),
            (var::CONSUMER_GROUP, k.consumer_group.clone()),
            (var::DLQ_TOPIC, k.dlq_topic.clone().unwrap_or_default()),
            (var::BATCH_MAX_SPANS, k.batch_max_spans.to_string()),
            (var::BATCH_MAX_MS, k.batch_max_ms.to_string()),
            (var::TIMEOUT_SECS, b.timeout_secs.to_string()),
            (var::ROOT_TIMEOUT_SECS, b.root_timeout_secs.to_string()),
            (
                var::MAX_SEGMENT_LIFETIME_SECS,
                b.max_segment_lifetime_secs.to_string(),
            ),
            (var::MAX_SEGMENT_BYTES, b.max_segment_bytes.to_string()),
            (var::MAX_SPAN_BYTES, b.max_span_bytes.to_string()),
            (var::MAX_FLUSH_SEGMENTS, b.max_flush_segments.to_string()),
            (var::COMPRESSION_LEVEL, b.compression_level.to_string()),
            (var::FLUSH_LOCK_TTL_SECS, b.flush_lock_ttl_secs.to_string()),
            (var::OUTPUT_CODEC, b.output_codec.as_str().to_owned()),
            (
                var::SLICE_ID,
                b.slice_id.map(|id| id.to_string()).unwrap_or_default(),
            ),
            (var::MAX_FLUSH_BYTES, b.max_flush_bytes.to_string()),
            (var::MAX_TRACE_SPANS, b.max_trace_spans.to_string()),
            (var::DELIVERED_TTL_SECS, b.delivered_ttl_secs.to_string()),
            (var::SEGMENT_PAGE_SIZE, b.segment_page_size.to_string()),
            (
                var::WINDOW_MAX_SPANS,
                self.worker.window_max_spans.to_string(),
            ),
            (
                var::WINDOW_MAX_BYTES,
                self.worker.window_max_bytes.to_string(),
            ),
            (var::WINDOW_MAX_MS, self.worker.window_max_ms.to_string()),
            (
                var::FLUSH_INTERVAL_MS,
                self.worker.flush_interval_ms.to_string(),
            ),
            (
                var::MAX_FLUSH_LAG_SECS,
                self.worker.max_flush_lag_secs.to_string(),
            ),
            (
                var::MAX_REDIS_MEMORY_PERCENT,
                self.worker.max_redis_memory_percent.to_string(),
            ),
            (
                var::MAX_LOOP_STALL_SECS,
                self.worker.max_loop_stall_secs.to_string(),
            ),
            (
                var::SHUTDOWN_TIMEOUT_SECS,
                self.worker.shutdown_timeout_secs.to_string(),
            ),
            (var::HTTP_ADDR, self.http.addr.to_string()),
            (var::LOG_FORMAT, self.log.format.as_str().to_owned()),
            (var::LOG_LEVEL, self.log.level.clone()),
        ]
    }

    /// `(name, value)` for every passthrough property, unredacted: a property with the
    /// same value on both clients as `SPANBUF_KAFKA_PROP_*`, the others per client.
    fn passthrough_entries(&self) -> Vec<(String, String)> {
        let consumer = &self.kafka.consumer_properties;
        let producer = &self.kafka.producer_properties;
        let mut common = Vec::new();
        let mut only = Vec::new();
        for (property, value) in consumer {
            let prefix = if producer.get(property) == Some(value) {
                KAFKA_PROP_PREFIX
            } else {
                KAFKA_CONSUMER_PROP_PREFIX
            };
            let entry = (
                format!("{prefix}{}", property_var_suffix(property)),
                value.clone(),
            );
            if prefix == KAFKA_PROP_PREFIX {
                common.push(entry);
            } else {
                only.push(entry);
            }
        }
        for (property, value) in producer {
            if consumer.get(property) != Some(value) {
                only.push((
                    format!(
                        "{KAFKA_PRODUCER_PROP_PREFIX}{}",
                        property_var_suffix(property)
                    ),
                    value.clone(),
                ));
            }
        }
        common.extend(only);
        common
    }
}

/// Table order, then passthrough and unknown names alphabetically, so the same input
/// always gives the same message whatever the environment's order. Stable: problems
/// of one variable keep their order.
fn sort_problems(problems: &mut [ConfigProblem]) {
    let rank = |p: &ConfigProblem| {
        VARIABLES
            .iter()
            .position(|v| v.name == p.var)
            .unwrap_or(VARIABLES.len())
    };
    problems.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.var.cmp(&b.var)));
}

fn push_line(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push('=');
    out.push_str(value);
    out.push('\n');
}

/// A value as it may be shown to a person: URL passwords and secret properties
/// redacted, everything else as is.
fn shown_value(var: &str, value: &str) -> String {
    match var {
        var::REDIS_URL => redact_url(value),
        var::REDIS_CLUSTER_URLS => value
            .split(',')
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(","),
        _ => match passthrough_property(var) {
            Some(property) if is_secret_property(&property) => REDACTED.to_owned(),
            _ => value.to_owned(),
        },
    }
}

/// The property a passthrough variable sets, if `var` is a well-formed one.
fn passthrough_property(var: &str) -> Option<String> {
    [
        KAFKA_CONSUMER_PROP_PREFIX,
        KAFKA_PRODUCER_PROP_PREFIX,
        KAFKA_PROP_PREFIX,
    ]
    .into_iter()
    .find_map(|prefix| var.strip_prefix(prefix))
    .and_then(property_name)
}

/// `SECURITY_PROTOCOL` → `security.protocol`; `None` unless the suffix is upper-case
/// letters and digits in `_`-separated non-empty parts.
fn property_name(suffix: &str) -> Option<String> {
    let well_formed = !suffix.is_empty()
        && suffix.split('_').all(|part| !part.is_empty())
        && suffix
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    well_formed.then(|| suffix.to_ascii_lowercase().replace('_', "."))
}

/// `security.protocol` → `SECURITY_PROTOCOL`.
fn property_var_suffix(property: &str) -> String {
    property.to_ascii_uppercase().replace('.', "_")
}

/// Why a property may not be passed through, for the properties spanbuf sets itself.
fn controlled_property(property: &str) -> Option<&'static str> {
    match property {
        "bootstrap.servers" | "metadata.broker.list" => {
            Some("is set by spanbuf from SPANBUF_KAFKA_BROKERS; set that instead")
        }
        "group.id" => Some("is set by spanbuf from SPANBUF_CONSUMER_GROUP; set that instead"),
        "enable.auto.commit" | "enable.auto.offset.store" => Some(
            "is controlled by spanbuf, which commits offsets only after Redis acknowledged their spans; it cannot be overridden",
        ),
        _ => None,
    }
}

/// Whether a librdkafka property's value must never be shown.
fn is_secret_property(property: &str) -> bool {
    let p = property.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "sasl.jaas",
        "sasl.oauthbearer.config",
    ]
    .iter()
    .any(|word| p.contains(word))
        || p.ends_with(".key")
        || p.ends_with("key.pem")
}

/// Replaces the password of a URL (`user:secret@` or `:secret@`) and any `pass=` /
/// `password=` query parameter by `***`. Errs on the side of hiding too much: the
/// userinfo ends at the last `@`, so an unencoded `@` or `/` in a password is hidden
/// too. Also applied to values that are not valid URLs, since those are shown in
/// error messages.
fn redact_url(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let (head, rest) = url.split_at(start);
    let (userinfo, after) = match rest.rfind('@') {
        Some(at) => rest.split_at(at),
        None => ("", rest),
    };
    let userinfo = match userinfo.find(':') {
        Some(colon) => format!("{}:{REDACTED}", &userinfo[..colon]),
        None => userinfo.to_owned(),
    };
    let after = match after.split_once('?') {
        Some((before, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((key, _))
                        if key.eq_ignore_ascii_case("pass")
                            || key.eq_ignore_ascii_case("password") =>
                    {
                        format!("{key}={REDACTED}")
                    }
                    _ => param.to_owned(),
                })
                .collect();
            format!("{before}?{}", params.join("&"))
        }
        None => after.to_owned(),
    };
    format!("{head}{userinfo}{after}")
}

/// Checks the shape of a Redis URL without a URL crate: scheme, host, port, database
/// path. `allow_unix` is false for cluster nodes, which are always reached over TCP.
/// The error is a clause that never repeats part of the URL (it may hold a password).
fn check_redis_url(url: &str, allow_unix: bool) -> Result<(), String> {
    if url.is_empty() {
        return Err("it is empty".to_owned());
    }
    if url.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
        return Err("it contains whitespace".to_owned());
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("the scheme is missing".to_owned());
    };
    match scheme.to_ascii_lowercase().as_str() {
        "redis" | "rediss" => check_tcp_target(rest),
        "unix" | "redis+unix" if allow_unix => {
            let path = rest.split(['?', '#']).next().unwrap_or_default();
            if path.len() > 1 && path.starts_with('/') {
                Ok(())
            } else {
                Err("the socket path is missing (e.g. unix:///run/redis.sock)".to_owned())
            }
        }
        "unix" | "redis+unix" => {
            Err("a cluster node must be a redis:// or rediss:// URL".to_owned())
        }
        // Echo the scheme only when it looks like one: a mangled URL could put a
        // password before `://`.
        _ if scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b)) =>
        {
            Err(format!("the scheme {scheme:?} is not supported"))
        }
        _ => Err("the scheme is not supported".to_owned()),
    }
}

/// The part of a redis:// URL after `://`: `[userinfo@]host[:port][/db][?query]`.
fn check_tcp_target(rest: &str) -> Result<(), String> {
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let host_port = authority
        .rfind('@')
        .map_or(authority, |at| &authority[at + 1..]);
    let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
        let Some((host, after)) = bracketed.split_once(']') else {
            return Err("the IPv6 host has no closing ]".to_owned());
        };
        if host.parse::<Ipv6Addr>().is_err() {
            return Err("the host in [ ] is not an IPv6 address".to_owned());
        }
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return Err("unexpected text after the IPv6 host".to_owned()),
            },
        };
        (host, port)
    } else {
        match host_port.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return Err("the host is missing".to_owned());
    }
    if !host_port.starts_with('[') && host.contains(':') {
        return Err("an IPv6 host must be in brackets (e.g. redis://[::1]:6379)".to_owned());
    }
    if let Some(port) = port {
        if !matches!(port.parse::<u16>(), Ok(p) if p > 0) {
            return Err("the port is not a number from 1 to 65535".to_owned());
        }
    }
    let path = tail.split(['?', '#']).next().unwrap_or_default();
    match path.strip_prefix('/') {
        None | Some("") => Ok(()),
        Some(db) if db.bytes().all(|b| b.is_ascii_digit()) && db.parse::<u32>().is_ok() => Ok(()),
        Some(_) => Err("the path must be empty or a database number (e.g. /0)".to_owned()),
    }
}

/// Kafka's own rule for topic names.
fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        Err("the name is empty".to_owned())
    } else if topic.len() > 249 {
        Err("the name is longer than 249 characters".to_owned())
    } else if topic == "." || topic == ".." {
        Err("\".\" and \"..\" are not allowed".to_owned())
    } else if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        Err("the name has a character outside A-Z a-z 0-9 . _ -".to_owned())
    } else {
        Ok(())
    }
}

/// The text for an unknown `SPANBUF_*` name, with the closest known name when one is
/// near (a typo or a missing unit suffix), else a hint for Kafka-looking names.
fn unknown_variable(name: &str) -> String {
    let upper = name.to_ascii_uppercase();
    let with_suffix = VARIABLES.iter().map(|v| v.name).find(|known| {
        known
            .strip_prefix(upper.as_str())
            .is_some_and(|rest| rest.starts_with('_'))
    });
    let near = || {
        VARIABLES
            .iter()
            .map(|v| (levenshtein(&upper, v.name), v.name))
            .filter(|(distance, _)| *distance <= 3)
            .min_by_key(|(distance, _)| *distance)
            .map(|(_, known)| known)
    };
    match with_suffix.or_else(near) {
        Some(known) => format!("unknown variable; did you mean {known}?"),
        None if upper.starts_with("SPANBUF_KAFKA_") => format!(
            "unknown variable; librdkafka properties are set as {KAFKA_PROP_PREFIX}<NAME>, {KAFKA_CONSUMER_PROP_PREFIX}<NAME> or {KAFKA_PRODUCER_PROP_PREFIX}<NAME>"
        ),
        None => "unknown variable".to_owned(),
    }
}

/// Edit distance over bytes (names are ASCII).
fn levenshtein(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut current = Vec::with_capacity(b.len() + 1);
        current.push(i + 1);
        for (j, &cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != cb);
            current.push(substitute.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(vars.iter().copied())
    }

    fn problems(vars: &[(&str, &str)]) -> Vec<ConfigProblem> {
        match parse(vars) {
            Ok(config) => panic!("expected an error for {vars:?}, got {config:?}"),
            Err(err) => err.problems,
        }
    }

    fn only_problem(vars: &[(&str, &str)]) -> ConfigProblem {
        let mut found = problems(vars);
        assert_eq!(found.len(), 1, "{found:#?}");
        found.remove(0)
    }

    /// `NAME=value` lines back into pairs.
    fn lines(rendered: &str) -> Vec<(String, String)> {
        rendered
            .lines()
            .map(|line| {
                let (name, value) = line.split_once('=').expect("every line has =");
                (name.to_owned(), value.to_owned())
            })
            .collect()
    }

    #[test]
    fn no_variables_give_the_documented_defaults() {
        let config = Config::from_vars(std::iter::empty::<(&str, &str)>()).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.redis.url, "redis://127.0.0.1:6379");
        assert!(config.redis.cluster_urls.is_empty());
        assert!(!config.redis_cluster_mode());
        assert_eq!(config.redis.key_prefix, "span-buf");
        assert_eq!(config.redis.ttl_secs, 3600);
        assert_eq!(config.redis.pool_size, 16);
        assert_eq!(config.redis.timeout_ms, 5000);
        assert_eq!(config.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(config.kafka.input_topic, "ingest-spans");
        assert_eq!(config.kafka.output_topic, "buffered-segments");
        assert_eq!(config.kafka.consumer_group, "spanbuf");
        assert_eq!(config.kafka.dlq_topic, None);
        assert_eq!(config.kafka.batch_max_spans, 500);
        assert_eq!(config.kafka.batch_max_ms, 1000);
        assert!(config.kafka.consumer_properties.is_empty());
        assert!(config.kafka.producer_properties.is_empty());
        assert_eq!(config.buffer.timeout_secs, 60);
        assert_eq!(config.buffer.root_timeout_secs, 10);
        assert_eq!(config.buffer.max_segment_lifetime_secs, 600);
        assert_eq!(config.buffer.max_segment_bytes, 10_485_760);
        assert_eq!(config.buffer.max_span_bytes, 1_048_576);
        assert_eq!(config.buffer.max_flush_segments, 500);
        assert_eq!(config.buffer.compression_level, 0);
        assert_eq!(config.buffer.flush_lock_ttl_secs, 30);
        assert_eq!(config.buffer.output_codec, OutputCodec::Json);
        assert_eq!(config.buffer.slice_id, None);
        assert_eq!(config.buffer.segment_page_size, 100);
        assert_eq!(config.http.addr, "0.0.0.0:9102".parse().unwrap());
        assert_eq!(config.log.format, LogFormat::Text);
        assert_eq!(config.log.level, "info");
        assert!(Config::default().validate().is_ok());
    }

    #[test]
    fn names_without_the_prefix_are_ignored() {
        let config = parse(&[
            ("PATH", "/usr/bin"),
            ("REDIS_URL", "not a url"),
            ("spanbuf_timeout_secs", "abc"),
            ("XSPANBUF_TIMEOUT_SECS", "abc"),
        ])
        .unwrap();
        assert_eq!(config, Config::default());
    }

    #[test]
    fn every_variable_is_parsed() {
        let config = parse(&[
            (
                "SPANBUF_REDIS_URL",
                "rediss://user:pw@redis.internal:6380/2",
            ),
            (
                "SPANBUF_REDIS_CLUSTER_URLS",
                "redis://10.0.0.1:7000, redis://10.0.0.2:7000 ,redis://[::1]:7002",
            ),
            ("SPANBUF_KEY_PREFIX", "sb"),
            ("SPANBUF_REDIS_TTL_SECS", "7200"),
            ("SPANBUF_REDIS_POOL_SIZE", "32"),
            ("SPANBUF_REDIS_TIMEOUT_MS", "250"),
            ("SPANBUF_KAFKA_BROKERS", "k1:9092,k2:9092"),
            ("SPANBUF_INPUT_TOPIC", "spans.in"),
            ("SPANBUF_OUTPUT_TOPIC", "segments_out"),
            ("SPANBUF_CONSUMER_GROUP", "group-7"),
            ("SPANBUF_DLQ_TOPIC", "spans-dlq"),
            ("SPANBUF_BATCH_MAX_SPANS", "1000"),
            ("SPANBUF_BATCH_MAX_MS", "250"),
            ("SPANBUF_TIMEOUT_SECS", "120"),
            ("SPANBUF_ROOT_TIMEOUT_SECS", "5"),
            ("SPANBUF_MAX_SEGMENT_LIFETIME_SECS", "1800"),
            ("SPANBUF_MAX_SEGMENT_BYTES", "2048"),
            ("SPANBUF_MAX_SPAN_BYTES", "1024"),
            ("SPANBUF_MAX_FLUSH_SEGMENTS", "50"),
            ("SPANBUF_COMPRESSION_LEVEL", "-1"),
            ("SPANBUF_FLUSH_LOCK_TTL_SECS", "0"),
            ("SPANBUF_OUTPUT_CODEC", "msgpack"),
            ("SPANBUF_SLICE_ID", "3"),
            ("SPANBUF_SEGMENT_PAGE_SIZE", "1000"),
            ("SPANBUF_HTTP_ADDR", "[::1]:0"),
            ("SPANBUF_LOG_FORMAT", "json"),
            ("SPANBUF_LOG_LEVEL", "info,spanbuf=debug"),
        ])
        .unwrap();
        let r = &config.redis;
        assert_eq!(r.url, "rediss://user:pw@redis.internal:6380/2");
        assert_eq!(
            r.cluster_urls,
            [
                "redis://10.0.0.1:7000",
                "redis://10.0.0.2:7000",
                "redis://[::1]:7002"
            ]
        );
        assert!(config.redis_cluster_mode());
        assert_eq!(
            (r.key_prefix.as_str(), r.ttl_secs, r.pool_size, r.timeout_ms),
            ("sb", 7200, 32, 250)
        );
        let k = &config.kafka;
        assert_eq!(k.brokers, "k1:9092,k2:9092");
        assert_eq!(k.input_topic, "spans.in");
        assert_eq!(k.output_topic, "segments_out");
        assert_eq!(k.consumer_group, "group-7");
        assert_eq!(k.dlq_topic.as_deref(), Some("spans-dlq"));
        assert_eq!((k.batch_max_spans, k.batch_max_ms), (1000, 250));
        let b = &config.buffer;
        assert_eq!(
            (
                b.timeout_secs,
                b.root_timeout_secs,
                b.max_segment_lifetime_secs
            ),
            (120, 5, 1800)
        );
        assert_eq!((b.max_segment_bytes, b.max_span_bytes), (2048, 1024));
        assert_eq!(b.max_flush_segments, 50);
        assert_eq!(b.compression_level, -1);
        assert_eq!(b.flush_lock_ttl_secs, 0);
        assert_eq!(b.output_codec, OutputCodec::Msgpack);
        assert_eq!(b.slice_id, Some(3));
        assert_eq!(b.segment_page_size, 1000);
        assert_eq!(config.http.addr, "[::1]:0".parse().unwrap());
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(config.log.level, "info,spanbuf=debug");
    }

    #[test]
    fn other_accepted_forms() {
        let config = parse(&[
            ("SPANBUF_REDIS_URL", "unix:///run/redis.sock"),
            ("SPANBUF_OUTPUT_CODEC", "JSON"),
            ("SPANBUF_COMPRESSION_LEVEL", "22"),
            ("SPANBUF_LOG_FORMAT", "Text"),
        ])
        .unwrap();
        assert_eq!(config.redis.url, "unix:///run/redis.sock");
        assert_eq!(config.buffer.output_codec, OutputCodec::Json);
        assert_eq!(config.buffer.compression_level, 22);
        for url in [
            "redis://localhost",
            "redis://h:1/0",
            "redis://:pw@h:6379",
            "redis://u:p@ss@h:6379/",
            "rediss://h?protocol=resp3",
            "redis+unix:///tmp/r.sock?db=1",
            "redis://[::1]",
        ] {
            assert_eq!(check_redis_url(url, true), Ok(()), "{url}");
        }
    }

    #[test]
    fn empty_means_unset_only_for_variables_unset_by_default() {
        let config = parse(&[
            ("SPANBUF_REDIS_CLUSTER_URLS", ""),
            ("SPANBUF_DLQ_TOPIC", ""),
            ("SPANBUF_SLICE_ID", ""),
        ])
        .unwrap();
        assert_eq!(config, Config::default());

        let found = problems(&[
            ("SPANBUF_TIMEOUT_SECS", ""),
            ("SPANBUF_KEY_PREFIX", ""),
            ("SPANBUF_REDIS_URL", ""),
            ("SPANBUF_LOG_LEVEL", " "),
        ]);
        let names: Vec<&str> = found.iter().map(|p| p.var.as_str()).collect();
        assert_eq!(
            names,
            [
                "SPANBUF_REDIS_URL",
                "SPANBUF_KEY_PREFIX",
                "SPANBUF_TIMEOUT_SECS",
                "SPANBUF_LOG_LEVEL"
            ]
        );
    }

    #[test]
    fn problem_line_names_variable_value_and_expectation() {
        let problem = only_problem(&[("SPANBUF_TIMEOUT_SECS", "abc")]);
        assert_eq!(problem.var, "SPANBUF_TIMEOUT_SECS");
        assert_eq!(problem.value.as_deref(), Some("abc"));
        assert_eq!(
            problem.to_string(),
            "SPANBUF_TIMEOUT_SECS=\"abc\": expected a whole number of seconds greater than 0 (e.g. 60)"
        );
        // The value is quoted with escapes, so stray whitespace is visible.
        let problem = only_problem(&[("SPANBUF_TIMEOUT_SECS", "60 ")]);
        assert!(problem
            .to_string()
            .starts_with("SPANBUF_TIMEOUT_SECS=\"60 \": "));
    }

    #[test]
    fn each_kind_of_bad_value_is_reported_with_its_value() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "SPANBUF_REDIS_URL",
                "http://h:6379",
                "scheme \"http\" is not supported",
            ),
            (
                "SPANBUF_REDIS_URL",
                "127.0.0.1:6379",
                "the scheme is missing",
            ),
            ("SPANBUF_REDIS_URL", "redis://", "the host is missing"),
            ("SPANBUF_REDIS_URL", "redis://:6379", "the host is missing"),
            (
                "SPANBUF_REDIS_URL",
                "redis://h:port",
                "the port is not a number",
            ),
            (
                "SPANBUF_REDIS_URL",
                "redis://h:0",
                "the port is not a number",
            ),
            ("SPANBUF_REDIS_URL", "redis://h:6379/db", "database number"),
            (
                "SPANBUF_REDIS_URL",
                "redis://::1:6379",
                "must be in brackets",
            ),
            (
                "SPANBUF_REDIS_URL",
                "redis://[nope]:1",
                "not an IPv6 address",
            ),
            ("SPANBUF_REDIS_URL", "unix://", "socket path is missing"),
            ("SPANBUF_REDIS_URL", "redis://h 1", "whitespace"),
            (
                "SPANBUF_REDIS_CLUSTER_URLS",
                "redis://a:1,,redis://b:2",
                "entry 2: it is empty",
            ),
            (
                "SPANBUF_REDIS_CLUSTER_URLS",
                "redis://a:1,",
                "entry 2: it is empty",
            ),
            (
                "SPANBUF_REDIS_CLUSTER_URLS",
                "unix:///s.sock",
                "entry 1: a cluster node must be",
            ),
            ("SPANBUF_KEY_PREFIX", "span buf", "without whitespace"),
            ("SPANBUF_KEY_PREFIX", "{sb}", "without whitespace, { or }"),
            ("SPANBUF_REDIS_TTL_SECS", "0", "from 1 to 1000000000000000"),
            ("SPANBUF_REDIS_TTL_SECS", "-5", "whole number of seconds"),
            ("SPANBUF_REDIS_POOL_SIZE", "0", "from 1 to 1024"),
            ("SPANBUF_REDIS_POOL_SIZE", "1025", "from 1 to 1024"),
            (
                "SPANBUF_REDIS_TIMEOUT_MS",
                "0",
                "milliseconds greater than 0",
            ),
            ("SPANBUF_KAFKA_BROKERS", " ", "bootstrap servers"),
            ("SPANBUF_KAFKA_BROKERS", "a:1,,b:2", "bootstrap servers"),
            ("SPANBUF_INPUT_TOPIC", "", "the name is empty"),
            ("SPANBUF_INPUT_TOPIC", "spans/in", "character outside"),
            ("SPANBUF_OUTPUT_TOPIC", "..", "are not allowed"),
            ("SPANBUF_DLQ_TOPIC", "dlq topic", "character outside"),
            ("SPANBUF_CONSUMER_GROUP", "", "non-empty consumer group"),
            ("SPANBUF_BATCH_MAX_SPANS", "0", "from 1 to 100000"),
            ("SPANBUF_BATCH_MAX_SPANS", "100001", "from 1 to 100000"),
            ("SPANBUF_BATCH_MAX_MS", "60001", "from 1 to 60000"),
            ("SPANBUF_TIMEOUT_SECS", "1.5", "whole number of seconds"),
            ("SPANBUF_ROOT_TIMEOUT_SECS", "0", "greater than 0"),
            ("SPANBUF_MAX_SEGMENT_BYTES", "1023", "at least 1024"),
            ("SPANBUF_MAX_SPAN_BYTES", "63", "at least 64"),
            ("SPANBUF_MAX_FLUSH_SEGMENTS", "0", "greater than 0"),
            ("SPANBUF_COMPRESSION_LEVEL", "23", "from 1 to 22"),
            ("SPANBUF_COMPRESSION_LEVEL", "-2", "from 1 to 22"),
            ("SPANBUF_FLUSH_LOCK_TTL_SECS", "-1", "0 to disable"),
            ("SPANBUF_OUTPUT_CODEC", "avro", "json or msgpack"),
            ("SPANBUF_SLICE_ID", "4294967296", "from 0 to 4294967295"),
            ("SPANBUF_SEGMENT_PAGE_SIZE", "0", "from 1 to 100000"),
            ("SPANBUF_HTTP_ADDR", "localhost:9102", "socket address"),
            ("SPANBUF_HTTP_ADDR", "9102", "socket address"),
            ("SPANBUF_LOG_FORMAT", "logfmt", "text or json"),
            ("SPANBUF_LOG_LEVEL", "", "non-empty tracing filter"),
        ];
        for &(name, value, needle) in cases {
            let problem = only_problem(&[(name, value)]);
            assert_eq!(problem.var, name, "{name}={value:?}");
            assert_eq!(problem.value.as_deref(), Some(value), "{name}={value:?}");
            let line = problem.to_string();
            assert!(line.contains(needle), "{name}={value:?}: {line}");
            assert!(line.contains(": expected "), "{line}");
            assert_eq!(line.lines().count(), 1, "{line}");
        }
    }

    #[test]
    fn range_problems_show_the_value_as_written() {
        let problem = only_problem(&[("SPANBUF_REDIS_POOL_SIZE", "+0000")]);
        assert_eq!(problem.value.as_deref(), Some("+0000"));
    }

    #[test]
    fn several_bad_variables_are_reported_together() {
        let err = parse(&[
            ("SPANBUF_TIMEOUT_SECS", "abc"),
            ("SPANBUF_OUTPUT_CODEC", "xml"),
            ("SPANBUF_REDIS_POOL_SIZE", "0"),
            ("SPANBUF_INPUT_TOPIC", "a b"),
            ("SPANBUF_TIMOUT_SECS", "60"),
            ("SPANBUF_KAFKA_PROP_GROUP_ID", "g"),
            ("SPANBUF_MAX_SPAN_BYTES", "10"),
        ])
        .unwrap_err();
        let names: Vec<&str> = err.problems.iter().map(|p| p.var.as_str()).collect();
        // Table order first, then the other names alphabetically.
        assert_eq!(
            names,
            [
                "SPANBUF_REDIS_POOL_SIZE",
                "SPANBUF_INPUT_TOPIC",
                "SPANBUF_TIMEOUT_SECS",
                "SPANBUF_MAX_SPAN_BYTES",
                "SPANBUF_OUTPUT_CODEC",
                "SPANBUF_KAFKA_PROP_GROUP_ID",
                "SPANBUF_TIMOUT_SECS",
            ]
        );
        let text = err.to_string();
        assert_eq!(text.lines().count(), 7, "{text}");
        assert!(text.contains("SPANBUF_OUTPUT_CODEC=\"xml\": expected json or msgpack"));
    }

    #[test]
    fn unknown_names_are_errors_with_a_suggestion() {
        let problem = only_problem(&[("SPANBUF_TIMOUT_SECS", "60")]);
        assert_eq!(problem.value, None);
        assert_eq!(
            problem.to_string(),
            "SPANBUF_TIMOUT_SECS: unknown variable; did you mean SPANBUF_TIMEOUT_SECS?"
        );
        let problem = only_problem(&[("SPANBUF_ROOT_TIMEOUT", "10")]);
        assert!(problem
            .expected
            .ends_with("did you mean SPANBUF_ROOT_TIMEOUT_SECS?"));
        let problem = only_problem(&[("SPANBUF_redis_url", "redis://h")]);
        assert!(problem
            .expected
            .ends_with("did you mean SPANBUF_REDIS_URL?"));
        let problem = only_problem(&[("SPANBUF_KAFKA_SECURITY_PROTOCOL", "SSL")]);
        assert!(
            problem.expected.contains("SPANBUF_KAFKA_PROP_<NAME>"),
            "{problem}"
        );
        let problem = only_problem(&[("SPANBUF_COLOUR", "blue")]);
        assert_eq!(problem.to_string(), "SPANBUF_COLOUR: unknown variable");
    }

    #[test]
    fn a_variable_set_twice_is_an_error() {
        let problem = only_problem(&[
            ("SPANBUF_TIMEOUT_SECS", "60"),
            ("SPANBUF_TIMEOUT_SECS", "30"),
        ]);
        assert_eq!(problem.var, "SPANBUF_TIMEOUT_SECS");
        assert!(problem.expected.contains("more than once"));
    }

    #[test]
    fn passthrough_properties_map_names_and_override_per_client() {
        let config = parse(&[
            ("SPANBUF_KAFKA_PROP_SECURITY_PROTOCOL", "SASL_SSL"),
            ("SPANBUF_KAFKA_PROP_COMPRESSION_TYPE", "zstd"),
            ("SPANBUF_KAFKA_CONSUMER_PROP_COMPRESSION_TYPE", "none"),
            ("SPANBUF_KAFKA_CONSUMER_PROP_FETCH_MAX_BYTES", "1000000"),
            ("SPANBUF_KAFKA_PRODUCER_PROP_LINGER_MS", "5"),
            ("SPANBUF_KAFKA_PRODUCER_PROP_SECURITY_PROTOCOL", "SSL"),
        ])
        .unwrap();
        let expect = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            config.kafka.consumer_properties,
            expect(&[
                ("compression.type", "none"),
                ("fetch.max.bytes", "1000000"),
                ("security.protocol", "SASL_SSL"),
            ])
        );
        assert_eq!(
            config.kafka.producer_properties,
            expect(&[
                ("compression.type", "zstd"),
                ("linger.ms", "5"),
                ("security.protocol", "SSL"),
            ])
        );
    }

    #[test]
    fn malformed_passthrough_names_are_errors_without_their_value() {
        for name in [
            "SPANBUF_KAFKA_PROP_",
            "SPANBUF_KAFKA_CONSUMER_PROP_",
            "SPANBUF_KAFKA_PROP_security_protocol",
            "SPANBUF_KAFKA_PROP_SASL__PASSWORD",
            "SPANBUF_KAFKA_PRODUCER_PROP__LINGER_MS",
            "SPANBUF_KAFKA_PROP_LINGER_MS_",
        ] {
            let problem = only_problem(&[(name, "hunter2")]);
            assert_eq!(problem.var, name);
            assert_eq!(problem.value, None);
            assert!(
                problem.expected.contains("librdkafka property name"),
                "{problem}"
            );
            assert!(!problem.to_string().contains("hunter2"));
        }
    }

    #[test]
    fn properties_spanbuf_controls_are_refused() {
        let cases = [
            (
                "SPANBUF_KAFKA_PROP_BOOTSTRAP_SERVERS",
                "SPANBUF_KAFKA_BROKERS",
            ),
            (
                "SPANBUF_KAFKA_PROP_METADATA_BROKER_LIST",
                "SPANBUF_KAFKA_BROKERS",
            ),
            (
                "SPANBUF_KAFKA_CONSUMER_PROP_GROUP_ID",
                "SPANBUF_CONSUMER_GROUP",
            ),
            (
                "SPANBUF_KAFKA_CONSUMER_PROP_ENABLE_AUTO_COMMIT",
                "commits offsets only after",
            ),
            (
                "SPANBUF_KAFKA_PROP_ENABLE_AUTO_OFFSET_STORE",
                "commits offsets only after",
            ),
        ];
        for (name, needle) in cases {
            let problem = only_problem(&[(name, "x")]);
            assert_eq!(problem.var, name);
            assert_eq!(problem.value.as_deref(), Some("x"));
            assert!(problem.expected.contains(needle), "{problem}");
        }
        let found = problems(&[
            ("SPANBUF_KAFKA_PROP_GROUP_ID", "g"),
            ("SPANBUF_KAFKA_PRODUCER_PROP_BOOTSTRAP_SERVERS", "b:1"),
        ]);
        assert_eq!(found.len(), 2);
        // Sorted by name: PRODUCER_PROP_ comes before PROP_.
        assert!(found[0]
            .expected
            .starts_with("bootstrap.servers is set by spanbuf"));
        assert!(found[1].expected.starts_with("group.id is set by spanbuf"));
    }

    #[test]
    fn unusual_timeouts_and_lifetimes_are_accepted_with_a_warning() {
        // A root timeout above the timeout, and a lifetime cap below the
        // timeouts, work: they are unusual, not wrong (docs/design.md §8).
        let config = parse(&[
            ("SPANBUF_TIMEOUT_SECS", "30"),
            ("SPANBUF_ROOT_TIMEOUT_SECS", "31"),
        ])
        .unwrap();
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("SPANBUF_ROOT_TIMEOUT_SECS (31)"));

        let config = parse(&[("SPANBUF_MAX_SEGMENT_LIFETIME_SECS", "30")]).unwrap();
        assert_eq!(config.buffer.max_segment_lifetime_secs, 30);
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("the cap decides"), "{warnings:?}");
        assert!(parse(&[("SPANBUF_MAX_SEGMENT_LIFETIME_SECS", "1")]).is_ok());

        assert!(Config::default().warnings().is_empty());
    }

    #[test]
    fn segment_lifetime_must_stay_below_the_ttl() {
        // The operator set the lifetime: the problem is reported on it.
        let problem = only_problem(&[("SPANBUF_MAX_SEGMENT_LIFETIME_SECS", "3600")]);
        assert_eq!(problem.var, "SPANBUF_MAX_SEGMENT_LIFETIME_SECS");
        assert!(
            problem
                .expected
                .contains("less than SPANBUF_REDIS_TTL_SECS (3600), got 3600"),
            "{problem}"
        );
        // Below the TTL but with less than a timeout of margin: accepted, warned.
        let config = parse(&[("SPANBUF_MAX_SEGMENT_LIFETIME_SECS", "3599")]).unwrap();
        assert!(
            config.warnings()[0].contains("margin"),
            "{:?}",
            config.warnings()
        );

        // The operator set only the TTL: reported on the TTL, not on the
        // lifetime default they never touched.
        let problem = only_problem(&[("SPANBUF_REDIS_TTL_SECS", "600")]);
        assert_eq!(problem.var, "SPANBUF_REDIS_TTL_SECS");
        assert!(
            problem
                .expected
                .contains("more than SPANBUF_MAX_SEGMENT_LIFETIME_SECS (600), got 600"),
            "{problem}"
        );
        assert!(parse(&[
            ("SPANBUF_REDIS_TTL_SECS", "600"),
            ("SPANBUF_MAX_SEGMENT_LIFETIME_SECS", "300"),
        ])
        .is_ok());

        // No overflow at the extremes: a TTL beyond what Redis can expire is
        // refused on its own, and the largest accepted one works.
        let max = u64::MAX.to_string();
        let found = problems(&[
            ("SPANBUF_MAX_SEGMENT_LIFETIME_SECS", max.as_str()),
            ("SPANBUF_REDIS_TTL_SECS", max.as_str()),
        ]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].var, "SPANBUF_REDIS_TTL_SECS");
        assert!(
            found[0].expected.contains("1000000000000000"),
            "{}",
            found[0]
        );
        let config = parse(&[
            ("SPANBUF_REDIS_TTL_SECS", "1000000000000000"),
            ("SPANBUF_MAX_SEGMENT_LIFETIME_SECS", max.as_str()),
        ]);
        assert!(config.is_err(), "the lifetime must stay below the TTL");
        assert!(parse(&[("SPANBUF_REDIS_TTL_SECS", "1000000000000000")])
            .unwrap()
            .warnings()
            .is_empty());
    }

    #[test]
    fn a_flush_lock_must_not_outlive_the_data() {
        let problem = only_problem(&[("SPANBUF_FLUSH_LOCK_TTL_SECS", "3600")]);
        assert_eq!(problem.var, "SPANBUF_FLUSH_LOCK_TTL_SECS");
        assert!(
            problem.expected.contains("SPANBUF_REDIS_TTL_SECS (3600)"),
            "{problem}"
        );
        // Huge values no longer overflow into milliseconds: they are refused.
        let problem = only_problem(&[("SPANBUF_FLUSH_LOCK_TTL_SECS", &u64::MAX.to_string())]);
        assert_eq!(problem.var, "SPANBUF_FLUSH_LOCK_TTL_SECS");
        // Only the TTL set: reported on the TTL.
        let problem = only_problem(&[
            ("SPANBUF_REDIS_TTL_SECS", "700"),
            ("SPANBUF_MAX_SEGMENT_LIFETIME_SECS", "100"),
            ("SPANBUF_FLUSH_LOCK_TTL_SECS", "700"),
        ]);
        assert_eq!(problem.var, "SPANBUF_FLUSH_LOCK_TTL_SECS");
        assert!(parse(&[("SPANBUF_FLUSH_LOCK_TTL_SECS", "0")]).is_ok());
        assert!(parse(&[("SPANBUF_FLUSH_LOCK_TTL_SECS", "3599")]).is_ok());
    }

    #[test]
    fn a_memory_limit_of_100_percent_is_accepted_with_a_warning() {
        let config = parse(&[("SPANBUF_MAX_REDIS_MEMORY_PERCENT", "100")]).unwrap();
        assert!(
            config
                .warnings()
                .iter()
                .any(|w| w.contains("SPANBUF_MAX_REDIS_MEMORY_PERCENT")),
            "{:?}",
            config.warnings()
        );
    }

    #[test]
    fn span_bytes_may_exceed_segment_bytes() {
        let config = parse(&[("SPANBUF_MAX_SEGMENT_BYTES", "1400")]).unwrap();
        assert_eq!(config.buffer.max_segment_bytes, 1400);
        assert_eq!(config.buffer.max_span_bytes, 1024 * 1024);
        let config = parse(&[
            ("SPANBUF_MAX_SEGMENT_BYTES", "1400"),
            ("SPANBUF_MAX_SPAN_BYTES", "65536"),
        ])
        .unwrap();
        assert_eq!(config.buffer.max_span_bytes, 65536);
        assert!(config.warnings().is_empty());
    }

    #[test]
    fn every_combination_of_defaults_and_one_variable_blames_that_variable() {
        // A variable the operator did not set never makes a start fail: each
        // problem below names the variable that was set.
        for (name, value) in [
            ("SPANBUF_INPUT_TOPIC", "buffered-segments"),
            ("SPANBUF_OUTPUT_TOPIC", "ingest-spans"),
            ("SPANBUF_REDIS_TTL_SECS", "10"),
            ("SPANBUF_MAX_SEGMENT_LIFETIME_SECS", "100000"),
            ("SPANBUF_DLQ_TOPIC", "ingest-spans"),
        ] {
            for problem in problems(&[(name, value)]) {
                assert_eq!(problem.var, name, "{problem}");
            }
        }
    }

    #[test]
    fn topics_must_differ() {
        let problem = only_problem(&[("SPANBUF_DLQ_TOPIC", "ingest-spans")]);
        assert_eq!(problem.var, "SPANBUF_DLQ_TOPIC");
        assert!(problem
            .expected
            .contains("other than SPANBUF_INPUT_TOPIC (\"ingest-spans\")"));
        let problem = only_problem(&[("SPANBUF_DLQ_TOPIC", "buffered-segments")]);
        assert!(problem.expected.contains("other than SPANBUF_OUTPUT_TOPIC"));
        let problem = only_problem(&[("SPANBUF_OUTPUT_TOPIC", "ingest-spans")]);
        assert_eq!(problem.var, "SPANBUF_OUTPUT_TOPIC");
        assert!(problem.expected.contains("consume its own output"));
    }

    #[test]
    fn cross_checks_skip_variables_that_are_already_bad() {
        // TIMEOUT did not parse: comparing ROOT_TIMEOUT with the default 60 would
        // report a problem the operator did not make.
        let problem = only_problem(&[
            ("SPANBUF_TIMEOUT_SECS", "ninety"),
            ("SPANBUF_ROOT_TIMEOUT_SECS", "90"),
        ]);
        assert_eq!(problem.var, "SPANBUF_TIMEOUT_SECS");
        // TIMEOUT parsed but is out of range: only the range problem.
        let problem = only_problem(&[("SPANBUF_TIMEOUT_SECS", "0")]);
        assert_eq!(problem.var, "SPANBUF_TIMEOUT_SECS");
        assert_eq!(problem.value.as_deref(), Some("0"));
    }

    #[test]
    fn validate_checks_a_config_built_in_code() {
        let mut config = Config::default();
        config.buffer.max_segment_lifetime_secs = config.redis.ttl_secs;
        config.kafka.dlq_topic = Some(config.kafka.input_topic.clone());
        config.redis.pool_size = 0;
        let err = config.validate().unwrap_err();
        let names: Vec<&str> = err.problems.iter().map(|p| p.var.as_str()).collect();
        assert_eq!(
            names,
            [
                "SPANBUF_REDIS_POOL_SIZE",
                "SPANBUF_DLQ_TOPIC",
                "SPANBUF_MAX_SEGMENT_LIFETIME_SECS"
            ]
        );
        assert_eq!(err.problems[0].value.as_deref(), Some("0"));
    }

    #[test]
    fn url_passwords_are_redacted_everywhere() {
        let config = parse(&[
            ("SPANBUF_REDIS_URL", "redis://user:s3cret@redis:6379/0"),
            (
                "SPANBUF_REDIS_CLUSTER_URLS",
                "redis://:hunter2@n1:7000,rediss://admin:pa55@n2:7001,redis://n3:7002",
            ),
        ])
        .unwrap();
        let rendered = config.render();
        let debug = format!("{config:?}");
        for text in [&rendered, &debug] {
            for secret in ["s3cret", "hunter2", "pa55"] {
                assert!(!text.contains(secret), "{secret} leaked in {text}");
            }
        }
        assert!(rendered.contains("SPANBUF_REDIS_URL=redis://user:***@redis:6379/0\n"));
        assert!(rendered.contains(
            "SPANBUF_REDIS_CLUSTER_URLS=redis://:***@n1:7000,rediss://admin:***@n2:7001,redis://n3:7002\n"
        ));
        assert!(debug.contains("redis://user:***@redis:6379/0"));

        // A bad URL is shown in the error, still without its password.
        let problem = only_problem(&[("SPANBUF_REDIS_URL", "http://u:topsecret@h")]);
        assert_eq!(problem.value.as_deref(), Some("http://u:***@h"));
        let problem = only_problem(&[("SPANBUF_REDIS_CLUSTER_URLS", "redis://:topsecret@,x")]);
        assert!(!problem.to_string().contains("topsecret"), "{problem}");
    }

    #[test]
    fn redact_url_cases() {
        let cases = [
            (
                "redis://user:secret@host:6379",
                "redis://user:***@host:6379",
            ),
            ("redis://:secret@host", "redis://:***@host"),
            ("redis://user@host", "redis://user@host"),
            ("redis://host:6379/0", "redis://host:6379/0"),
            ("redis://u:p@ss/w@host/1", "redis://u:***@host/1"),
            (
                "redis+unix:///s.sock?db=1&pass=secret",
                "redis+unix:///s.sock?db=1&pass=***",
            ),
            ("rediss://h?password=secret", "rediss://h?password=***"),
            (":secret@host:6379", ":***@host:6379"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn secret_properties_are_redacted_in_render_and_debug() {
        let config = parse(&[
            ("SPANBUF_KAFKA_PROP_SASL_PASSWORD", "pw-1"),
            ("SPANBUF_KAFKA_PROP_SASL_USERNAME", "spanbuf"),
            ("SPANBUF_KAFKA_CONSUMER_PROP_SSL_KEY_PASSWORD", "pw-2"),
            (
                "SPANBUF_KAFKA_PRODUCER_PROP_SASL_OAUTHBEARER_CLIENT_SECRET",
                "pw-3",
            ),
            ("SPANBUF_KAFKA_PROP_SSL_KEY_PEM", "pw-4"),
            ("SPANBUF_KAFKA_PROP_SASL_JAAS_CONFIG", "pw-5"),
            ("SPANBUF_KAFKA_PROP_SOME_TOKEN", "pw-6"),
            ("SPANBUF_KAFKA_PROP_PRIVATE_KEY", "pw-7"),
        ])
        .unwrap();
        let rendered = config.render();
        let debug = format!("{config:?}");
        for text in [&rendered, &debug] {
            for i in 1..=7 {
                assert!(
                    !text.contains(&format!("pw-{i}")),
                    "pw-{i} leaked in {text}"
                );
            }
        }
        assert!(debug.contains("\"sasl.username\": \"spanbuf\""));
        assert!(rendered.contains("SPANBUF_KAFKA_PROP_SASL_PASSWORD=***\n"));
        assert!(rendered.contains("SPANBUF_KAFKA_PROP_SASL_USERNAME=spanbuf\n"));
        assert!(rendered.contains("SPANBUF_KAFKA_CONSUMER_PROP_SSL_KEY_PASSWORD=***\n"));
        assert!(
            rendered.contains("SPANBUF_KAFKA_PRODUCER_PROP_SASL_OAUTHBEARER_CLIENT_SECRET=***\n")
        );
        assert!(debug.contains("\"sasl.password\": \"***\""));
        // A problem on a secret property hides its value too.
        let problem = shown_value("SPANBUF_KAFKA_PROP_SASL_PASSWORD", "pw");
        assert_eq!(problem, "***");
    }

    #[test]
    fn variables_table_matches_render() {
        let rendered = lines(&Config::default().render());
        let names: Vec<&str> = rendered.iter().map(|(n, _)| n.as_str()).collect();
        let documented: Vec<&str> = VARIABLES.iter().map(|v| v.name).collect();
        assert_eq!(
            names, documented,
            "render() and VARIABLES list different names"
        );
        for (doc, (_, value)) in VARIABLES.iter().zip(&rendered) {
            assert_eq!(
                doc.default,
                value.as_str(),
                "default of {} drifted",
                doc.name
            );
            assert!(!doc.meaning.is_empty(), "{} has no meaning", doc.name);
            assert_ne!(
                expected(doc.name),
                expected("SPANBUF_NOPE"),
                "{} has no expectation",
                doc.name
            );
        }
        let unique: BTreeSet<&str> = documented.iter().copied().collect();
        assert_eq!(unique.len(), documented.len());
        for name in documented {
            assert!(name.starts_with(PREFIX));
            assert!(passthrough_property(name).is_none());
        }
        assert_eq!(VARIABLES[1].display_default(), "unset");
        assert_eq!(VARIABLES[0].display_default(), "redis://127.0.0.1:6379");
    }

    #[test]
    fn render_output_parses_back_to_the_same_config() {
        let original = parse(&[
            ("SPANBUF_REDIS_CLUSTER_URLS", "redis://a:1,redis://b:2"),
            ("SPANBUF_DLQ_TOPIC", "dlq"),
            ("SPANBUF_SLICE_ID", "7"),
            ("SPANBUF_OUTPUT_CODEC", "msgpack"),
            ("SPANBUF_LOG_FORMAT", "json"),
            ("SPANBUF_HTTP_ADDR", "[::]:9200"),
            ("SPANBUF_KAFKA_PROP_SECURITY_PROTOCOL", "SSL"),
            ("SPANBUF_KAFKA_CONSUMER_PROP_FETCH_MIN_BYTES", "1"),
            ("SPANBUF_KAFKA_PRODUCER_PROP_SECURITY_PROTOCOL", "PLAINTEXT"),
        ])
        .unwrap();
        for config in [Config::default(), original] {
            let rendered = config.render();
            assert!(rendered.ends_with('\n'));
            let again = Config::from_vars(lines(&rendered)).unwrap();
            assert_eq!(again, config, "{rendered}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_values_are_errors_naming_the_variable() {
        use std::os::unix::ffi::OsStringExt;
        let bad = OsString::from_vec(vec![0x66, 0xff, 0x6f]);
        let err = Config::from_os_vars([
            (OsString::from("SPANBUF_KEY_PREFIX"), bad.clone()),
            (OsString::from("OTHER"), bad.clone()),
            (
                OsString::from_vec(b"SPANBUF_\xffX".to_vec()),
                OsString::from("1"),
            ),
            (
                OsString::from_vec(b"NOT_OURS_\xff".to_vec()),
                OsString::from("1"),
            ),
            (OsString::from("SPANBUF_TIMEOUT_SECS"), OsString::from("30")),
        ])
        .unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
        assert_eq!(err.problems[0].var, "SPANBUF_KEY_PREFIX");
        assert!(err.problems[0].expected.contains("not UTF-8"));
        assert!(err.problems[1].var.starts_with("SPANBUF_"));
        assert!(err.problems[1].expected.contains("variable name"));
    }

    #[test]
    fn levenshtein_distances() {
        assert_eq!(levenshtein("", "abc"), 3);
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(
            levenshtein("SPANBUF_TIMOUT_SECS", "SPANBUF_TIMEOUT_SECS"),
            1
        );
    }
}
