//! spanbuf: assembles tracing spans into segments in Redis and flushes them to
//! Kafka.
//!
//! # Data path
//! ```text
//! Kafka input ──▶ span::decode ──▶ ingest (group → compress → store) ──▶ commit offsets
//!                                          │
//!              Redis: payload sets, segment indexes, per-shard flush queues
//!                                          │
//! Kafka output ◀── flush (candidates → lock → load → build → produce → cleanup)
//! ```
//!
//! # Parts
//! - [`config`]: the one typed configuration, from `SPANBUF_*` variables only.
//! - [`span`]: what a span is to spanbuf: decoding (JSON / MessagePack), the
//!   invalid-input reasons, and the payload compression format in Redis.
//! - [`engine`]: the one pipeline `run`, `replay` and `bench` drive (decode →
//!   coalesce → ingest → flush → sink); the drivers differ only in source,
//!   sink and clock ([`clock`]).
//! - [`ingest`]: one coalescing window of spans → subsegments → Redis
//!   (docs/design.md §5); [`ingest::window`] stages poll batches into windows.
//! - [`flush`]: due segments → lock → load → records → [`sink`] → precise
//!   cleanup (docs/design.md §6).
//! - [`replay`]: recorded spans through ingest and flush without Kafka (§7).
//! - [`store`]: the only code that talks to Redis: key layout (Sentry
//!   compatible), Lua scripts, pipelined stages over standalone or cluster.
//! - [`metrics`]: every exported metric, declared once.
//! - [`process`]: what this process used (peak RSS), for bench and replay.
//! - [`kafka`]: the producer that delivers records (a [`sink::Sink`]) and
//!   dead-letter messages, awaiting every acknowledgement; the input consumer.
//! - [`http`]: `/metrics`, `/health` (loops progressing) and `/ready`
//!   (consuming), from a [`http::Health`] state the loops push into; no
//!   Redis or Kafka I/O of its own.
//!
//! # Ownership and guarantees
//! Ingest writes a batch in a fixed number of round trips and returns only
//! once Redis acknowledged all of it; the caller commits offsets after that
//! and not before. Every key is written with `SPANBUF_REDIS_TTL_SECS`.
//! Re-ingesting a batch is idempotent: payload sets are keyed by a hash of
//! their span ids and the insert script does not count a salt twice.

pub mod audit;
pub mod bench;
pub mod clock;
pub mod config;
pub mod engine;
pub mod fault;
pub mod flush;
pub mod gen;
pub mod http;
pub mod ingest;
pub mod inspect;
pub mod kafka;
pub mod metrics;
pub mod process;
pub mod replay;
pub mod sink;
pub mod span;
pub mod store;
pub mod worker;
