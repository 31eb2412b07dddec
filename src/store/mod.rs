//! The Redis store: the only code that talks to Redis.
//!
//! One interface over a standalone pool and a Redis Cluster pool (chosen by
//! `SPANBUF_REDIS_CLUSTER_URLS`), both from deadpool-redis. Callers hand over
//! *stages* of operations; each stage is one pipelined round trip, and the
//! stages of one call run in order. In standalone mode consecutive stages share
//! one pipeline (a single server executes a pipeline in order); in cluster
//! mode a stage is split by hash slot (redis-rs sends an async pipeline to a
//! single slot) and the per-slot pipelines of one stage run concurrently over
//! the multiplexed cluster connection, so a stage costs one round trip of
//! latency whatever the number of slots it touches.
//!
//! Must not contain ingest or flush policy: the operation modules
//! (`ingest_ops`, `flush_ops`) translate domain requests into commands and
//! replies back.

mod flush_ops;
mod ingest_ops;
mod inspect_ops;
pub mod keys;
pub mod scripts;

pub use flush_ops::{
    DeliveredSalt, DoneReply, DoneRequest, LoadRequest, Loaded, LockTimes, PayloadSet,
    QueueSnapshot,
};
pub use ingest_ops::{Detach, InsertParams, InsertReply, QueueUpdate, SubsegmentWrite};
pub use inspect_ops::{scan_pattern, KeyFamily, Primary, PrimaryStats, QueueStats, ScanPage};
pub use keys::{Keys, SegmentRef};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_redis::{cluster, Runtime};
use futures::stream::{self, StreamExt, TryStreamExt};
use redis::cluster_routing::Slot;
use redis::{Cmd, Value};

use crate::config::RedisConfig;
use scripts::Scripts;

/// Per-slot pipelines of one stage in flight at once (cluster mode).
const MAX_CONCURRENT_PIPELINES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: cannot build the connection pool for {target}: {source}")]
    Pool {
        target: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("redis: cannot get a connection from the pool: {0}")]
    Connection(String),
    /// Redis refused the credentials or their rights: a retry cannot cure
    /// it, the configuration must change.
    #[error("redis: refused the credentials: {0}")]
    Refused(String),
    #[error("redis: {operation} failed: {source}")]
    Redis {
        operation: &'static str,
        #[source]
        source: redis::RedisError,
    },
    #[error("redis: {operation} timed out after {timeout_ms} ms")]
    Timeout {
        operation: &'static str,
        timeout_ms: u64,
    },
    #[error("redis: {operation} returned an error: {message}")]
    Command {
        operation: &'static str,
        message: String,
    },
    #[error("redis: cannot load lua script {script}: {message}")]
    ScriptLoad {
        script: &'static str,
        message: String,
    },
    #[error("redis: unexpected reply to {operation}: {detail}")]
    UnexpectedReply {
        operation: &'static str,
        detail: String,
    },
}

impl StoreError {
    /// Redis refused a write because used memory is over `maxmemory`
    /// (`maxmemory-policy noeviction`).
    pub fn is_oom(&self) -> bool {
        match self {
            StoreError::Command { message, .. } => message.starts_with("OOM"),
            StoreError::Redis { source, .. } => source.code() == Some("OOM"),
            _ => false,
        }
    }

    /// Errors that a retry may cure (network, timeouts, a busy or restarting
    /// server). Script load failures and malformed replies are not transient.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Connection(_) | StoreError::Timeout { .. } => true,
            StoreError::Redis { source, .. } => {
                source.is_io_error()
                    || source.is_timeout()
                    || source.is_connection_dropped()
                    || source.is_connection_refusal()
                    || source.is_cluster_error()
            }
            StoreError::Command { message, .. } => [
                "LOADING",
                "BUSY",
                "TRYAGAIN",
                "CLUSTERDOWN",
                "MASTERDOWN",
                "OOM",
            ]
            .iter()
            .any(|code| message.starts_with(code)),
            StoreError::Pool { .. }
            | StoreError::Refused(_)
            | StoreError::ScriptLoad { .. }
            | StoreError::UnexpectedReply { .. } => false,
        }
    }
}

/// A failure to get a pooled connection: refused credentials are not
/// transient (a wrong password or a missing ACL right), anything else is.
pub(crate) fn pool_error(e: deadpool_redis::PoolError) -> StoreError {
    if let deadpool_redis::PoolError::Backend(source) = &e {
        let refused = matches!(source.kind(), redis::ErrorKind::AuthenticationFailed)
            || matches!(source.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"));
        if refused {
            return StoreError::Refused(e.to_string());
        }
    }
    StoreError::Connection(e.to_string())
}

/// One command plus a key naming the hash slot it runs in.
pub(crate) struct Op {
    slot_key: String,
    cmd: Cmd,
}

impl Op {
    pub(crate) fn new(slot_key: impl Into<String>, cmd: Cmd) -> Self {
        Self {
            slot_key: slot_key.into(),
            cmd,
        }
    }
}

/// Keys per multi-key command (`UNLINK k1 k2 …`): a page of payload sets
/// takes Redis a few hundred microseconds, not milliseconds.
const MULTI_KEY_PAGE: usize = 200;

enum Backend {
    Standalone(deadpool_redis::Pool),
    Cluster(cluster::Pool),
}

/// Handle to the Redis buffer. Cheap to share behind an `Arc`.
pub struct Store {
    backend: Backend,
    keys: Keys,
    scripts: Scripts,
    timeout: Duration,
    round_trips: AtomicU64,
}

impl Store {
    /// Builds the pool for the configured mode, checks Redis answers, and
    /// loads every Lua script. The caller decides whether a failure here is
    /// fatal (at start) or worth a retry ([`StoreError::is_transient`]).
    pub async fn connect(config: &RedisConfig, slice_id: Option<u32>) -> Result<Store, StoreError> {
        let pool_config = deadpool_redis::PoolConfig::new(config.pool_size);
        let backend = if config.cluster_urls.is_empty() {
            // redis-rs times a response out after 500 ms by default, far
            // below SPANBUF_REDIS_TIMEOUT_MS: a slow Lua call would fail as
            // "timed out" although Redis ran it. Use the configured timeout.
            let timeout = Some(Duration::from_millis(config.timeout_ms));
            let connection = redis::AsyncConnectionConfig::new()
                .set_response_timeout(timeout)
                .set_connection_timeout(timeout);
            let pool_err = |e: Box<dyn std::error::Error + Send + Sync>| StoreError::Pool {
                target: "standalone redis".into(),
                source: e,
            };
            let manager = deadpool_redis::Manager::new_with_config(config.url.as_str(), connection)
                .map_err(|e| pool_err(Box::new(e)))?;
            let pool = deadpool_redis::Pool::builder(manager)
                .config(pool_config)
                .runtime(Runtime::Tokio1)
                .build()
                .map_err(|e| pool_err(Box::new(e)))?;
            Backend::Standalone(pool)
        } else {
            let mut cfg = cluster::Config::from_urls(config.cluster_urls.clone());
            cfg.pool = Some(pool_config);
            let pool = cfg
                .create_pool(Some(Runtime::Tokio1))
                .map_err(|e| StoreError::Pool {
                    target: "redis cluster".into(),
                    source: Box::new(e),
                })?;
            Backend::Cluster(pool)
        };
        let store = Store {
            backend,
            keys: Keys::new(config.key_prefix.clone(), slice_id),
            scripts: Scripts::new(),
            timeout: Duration::from_millis(config.timeout_ms),
            round_trips: AtomicU64::new(0),
        };
        store.ping().await?;
        store.load_scripts().await?;
        Ok(store)
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster(_))
    }

    /// Pipelined round trips sent so far (a cluster stage counts once: its
    /// per-slot pipelines run concurrently). For diagnostics and tests.
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// `PING` (cluster: every primary answers).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let replies = self.exec_unrouted("ping", redis::cmd("PING")).await?;
        match replies {
            Value::SimpleString(s) if s == "PONG" => Ok(()),
            Value::Okay => Ok(()),
            other => Err(StoreError::UnexpectedReply {
                operation: "ping",
                detail: format!("{other:?}"),
            }),
        }
    }

    /// The text of `INFO <section>` from every primary (one entry in
    /// standalone mode), in no particular order.
    pub async fn info(&self, section: &str) -> Result<Vec<String>, StoreError> {
        let mut info = redis::cmd("INFO");
        info.arg(section);
        let reply = self.exec_unrouted("info", info).await?;
        let texts: Vec<String> = match reply {
            Value::Map(nodes) => nodes
                .into_iter()
                .filter_map(|(_, v)| value_text(v))
                .collect(),
            other => value_text(other).into_iter().collect(),
        };
        if texts.is_empty() {
            return Err(StoreError::UnexpectedReply {
                operation: "info",
                detail: format!("no INFO {section} text in the reply"),
            });
        }
        Ok(texts)
    }

    /// Memory use of every primary as `(used_memory, maxmemory)` from `INFO
    /// memory`; `maxmemory` 0 means no limit.
    pub async fn memory(&self) -> Result<Vec<(u64, u64)>, StoreError> {
        Ok(self
            .info("memory")
            .await?
            .iter()
            .map(|t| (info_field(t, "used_memory"), info_field(t, "maxmemory")))
            .collect())
    }

    /// `maxmemory` and `maxmemory_policy` of every primary, from `INFO memory`
    /// (readable by the least-privilege user, unlike `CONFIG GET`).
    pub async fn memory_settings(&self) -> Result<Vec<MemorySettings>, StoreError> {
        Ok(self
            .info("memory")
            .await?
            .iter()
            .map(|t| MemorySettings {
                maxmemory: info_field(t, "maxmemory"),
                policy: info_text(t, "maxmemory_policy").unwrap_or_default(),
            })
            .collect())
    }

    /// Keeps the data-loss marker (docs/design.md §6, spanbuf's own): sets it to
    /// `token` if it is missing, refreshes its TTL, and returns whether it was
    /// created now and the value it holds. One round trip.
    pub async fn touch_marker(
        &self,
        token: &str,
        ttl_secs: u64,
    ) -> Result<(bool, String), StoreError> {
        let key = self.keys.marker();
        let mut set = redis::cmd("SET");
        set.arg(&key).arg(token).arg("NX").arg("EX").arg(ttl_secs);
        let mut get = redis::cmd("GETEX");
        get.arg(&key).arg("EX").arg(ttl_secs);
        let replies = self
            .exec(
                "data-loss marker",
                &[Op::new(key.clone(), set), Op::new(key, get)],
            )
            .await?;
        let created = matches!(replies.first(), Some(Value::Okay));
        let value = replies
            .get(1)
            .cloned()
            .and_then(value_text)
            .ok_or_else(|| StoreError::UnexpectedReply {
                operation: "data-loss marker",
                detail: format!("{replies:?}"),
            })?;
        Ok((created, value))
    }

    /// `SCRIPT LOAD` of every script; checks the returned SHA matches ours.
    pub async fn load_scripts(&self) -> Result<(), StoreError> {
        for script in self.scripts.all() {
            let reply = self
                .exec_unrouted("script load", script.load_command())
                .await
                .map_err(|e| StoreError::ScriptLoad {
                    script: script.name,
                    message: e.to_string(),
                })?;
            let sha = match reply {
                Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                Value::SimpleString(s) => s,
                other => format!("{other:?}"),
            };
            if sha != script.sha() {
                return Err(StoreError::ScriptLoad {
                    script: script.name,
                    message: format!("server returned sha {sha}, expected {}", script.sha()),
                });
            }
        }
        Ok(())
    }

    /// `UNLINK`s `keys` in one round trip (pages on a standalone server, one
    /// command per slot on a cluster); `operation` names it in errors.
    pub async fn unlink(
        &self,
        operation: &'static str,
        keys: Vec<String>,
    ) -> Result<(), StoreError> {
        let ops = self.multi_key_ops("UNLINK", keys);
        self.exec(operation, &ops).await?;
        Ok(())
    }

    /// `command key…` over `keys` as few commands as the mode allows: pages of
    /// keys on a standalone server, one command per hash slot (and page) on a
    /// cluster, where a multi-key command must stay in one slot.
    pub(crate) fn multi_key_ops(&self, command: &str, keys: Vec<String>) -> Vec<Op> {
        let groups: Vec<Vec<String>> = if self.is_cluster() {
            let mut by_slot: HashMap<Slot, Vec<String>> = HashMap::new();
            for key in keys {
                by_slot.entry(Slot::for_key(&key)).or_default().push(key);
            }
            by_slot.into_values().collect()
        } else {
            vec![keys]
        };
        groups
            .iter()
            .flat_map(|group| group.chunks(MULTI_KEY_PAGE))
            .filter(|page| !page.is_empty())
            .map(|page| {
                let mut cmd = redis::cmd(command);
                cmd.arg(page);
                Op::new(page[0].clone(), cmd)
            })
            .collect()
    }

    /// Runs one command that is not tied to a key (cluster: routed by
    /// redis-rs, e.g. to every primary).
    async fn exec_unrouted(&self, operation: &'static str, cmd: Cmd) -> Result<Value, StoreError> {
        let fut = async {
            match &self.backend {
                Backend::Standalone(pool) => {
                    let mut conn = pool.get().await.map_err(pool_error)?;
                    cmd.query_async::<Value>(&mut conn).await
                }
                Backend::Cluster(pool) => {
                    let mut conn = pool.get().await.map_err(pool_error)?;
                    cmd.query_async::<Value>(&mut conn).await
                }
            }
            .map_err(|source| StoreError::Redis { operation, source })
        };
        self.with_timeout(operation, fut).await
    }

    async fn with_timeout<T>(
        &self,
        operation: &'static str,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| StoreError::Timeout {
                operation,
                timeout_ms: self.timeout.as_millis() as u64,
            })?
    }

    /// Runs the stages in order and returns each stage's replies in op order.
    /// A server error reply on any op fails the call (after one reload-and-
    /// retry of ops that got NOSCRIPT).
    pub(crate) async fn exec_stages(
        &self,
        operation: &'static str,
        stages: Vec<Vec<Op>>,
    ) -> Result<Vec<Vec<Value>>, StoreError> {
        let sizes: Vec<usize> = stages.iter().map(Vec::len).collect();
        let replies = match &self.backend {
            Backend::Standalone(_) => {
                // One server runs a pipeline in order: all stages, one trip.
                let ops: Vec<Op> = stages.into_iter().flatten().collect();
                self.exec(operation, &ops).await?
            }
            Backend::Cluster(_) => {
                let mut all = Vec::with_capacity(sizes.iter().sum());
                for stage in stages {
                    all.extend(self.exec(operation, &stage).await?);
                }
                all
            }
        };
        let mut replies = replies.into_iter();
        Ok(sizes
            .into_iter()
            .map(|n| replies.by_ref().take(n).collect())
            .collect())
    }

    /// One stage: pipelined, NOSCRIPT handled, server errors surfaced.
    pub(crate) async fn exec(
        &self,
        operation: &'static str,
        ops: &[Op],
    ) -> Result<Vec<Value>, StoreError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let mut replies = self.exec_raw(operation, ops.iter().collect()).await?;
        let missing: Vec<usize> = replies
            .iter()
            .enumerate()
            .filter(|(_, v)| is_noscript(v))
            .map(|(i, _)| i)
            .collect();
        if !missing.is_empty() {
            tracing::warn!(
                operation,
                calls = missing.len(),
                "redis lost its scripts (NOSCRIPT); reloading them"
            );
            self.load_scripts().await?;
            let retried = self
                .exec_raw(operation, missing.iter().map(|&i| &ops[i]).collect())
                .await?;
            for (i, value) in missing.into_iter().zip(retried) {
                replies[i] = value;
            }
        }
        if let Some(Value::ServerError(err)) =
            replies.iter().find(|v| matches!(v, Value::ServerError(_)))
        {
            return Err(StoreError::Command {
                operation,
                message: format!("{} {}", err.code(), err.details().unwrap_or_default()),
            });
        }
        Ok(replies)
    }

    /// Sends ops pipelined; replies (including per-op server errors) in op order.
    async fn exec_raw(
        &self,
        operation: &'static str,
        ops: Vec<&Op>,
    ) -> Result<Vec<Value>, StoreError> {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let fut = async {
            match &self.backend {
                Backend::Standalone(pool) => {
                    let mut conn = pool.get().await.map_err(pool_error)?;
                    let mut pipe = redis::pipe();
                    pipe.ignore_errors();
                    for op in &ops {
                        pipe.add_command(op.cmd.clone());
                    }
                    pipe.query_async::<Vec<Value>>(&mut conn)
                        .await
                        .map_err(|source| StoreError::Redis { operation, source })
                }
                Backend::Cluster(pool) => {
                    let conn = pool.get().await.map_err(pool_error)?;
                    let mut by_slot: HashMap<Slot, Vec<usize>> = HashMap::new();
                    for (i, op) in ops.iter().enumerate() {
                        by_slot
                            .entry(Slot::for_key(&op.slot_key))
                            .or_default()
                            .push(i);
                    }
                    let groups: Vec<Vec<usize>> = by_slot.into_values().collect();
                    let results: Vec<(Vec<usize>, Vec<Value>)> = stream::iter(groups)
                        .map(|indices| {
                            let mut conn = (*conn).clone();
                            let mut pipe = redis::pipe();
                            pipe.ignore_errors();
                            for &i in &indices {
                                pipe.add_command(ops[i].cmd.clone());
                            }
                            async move {
                                let values = pipe
                                    .query_async::<Vec<Value>>(&mut conn)
                                    .await
                                    .map_err(|source| StoreError::Redis { operation, source })?;
                                Ok::<_, StoreError>((indices, values))
                            }
                        })
                        .buffer_unordered(MAX_CONCURRENT_PIPELINES)
                        .try_collect()
                        .await?;
                    let mut replies = vec![Value::Nil; ops.len()];
                    for (indices, values) in results {
                        if indices.len() != values.len() {
                            return Err(StoreError::UnexpectedReply {
                                operation,
                                detail: format!(
                                    "{} replies for {} commands",
                                    values.len(),
                                    indices.len()
                                ),
                            });
                        }
                        for (i, v) in indices.into_iter().zip(values) {
                            replies[i] = v;
                        }
                    }
                    Ok(replies)
                }
            }
        };
        let replies = self.with_timeout(operation, fut).await?;
        if replies.len() != ops.len() {
            return Err(StoreError::UnexpectedReply {
                operation,
                detail: format!("{} replies for {} commands", replies.len(), ops.len()),
            });
        }
        Ok(replies)
    }
}

fn value_text(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

/// One primary's memory limit and eviction policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemorySettings {
    /// Bytes; 0 = no limit.
    pub maxmemory: u64,
    /// e.g. `noeviction`, `allkeys-lru`.
    pub policy: String,
}

impl MemorySettings {
    /// Whether Redis would evict keys (buffered spans) when full.
    pub fn evicts(&self) -> bool {
        self.maxmemory > 0 && self.policy != "noeviction"
    }
}

/// A text field of `INFO` text; `None` when absent.
fn info_text(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

/// A numeric field of `INFO` text (`name:value` lines); 0 when absent.
pub fn info_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn is_noscript(value: &Value) -> bool {
    matches!(value, Value::ServerError(err) if err.code() == "NOSCRIPT")
}
