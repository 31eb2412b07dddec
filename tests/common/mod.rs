//! Shared set-up for the Redis-state tests: a real Redis (standalone or a
//! local 3-master cluster), a Store and Ingestor on it, span builders, and an
//! inspector that reads the buffer's keys back the way docs/design.md §4 lays them out.
//!
//! Each test binary compiles this module separately and uses a subset of it.
#![allow(dead_code)]

/// Runs each named scenario `async fn name(Backend)` as two tests: on
/// standalone Redis and on the local cluster.
macro_rules! both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn standalone() {
                super::$name(Backend::Standalone).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cluster() {
                super::$name(Backend::Cluster).await
            }
        }
    )*};
}
pub(crate) use both;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use redis::aio::ConnectionLike;
use redis::{FromRedisValue, Value};
use serde_json::json;

use spanbuf::config::Config;
use spanbuf::ingest::{decode_batch, IngestOutcome, IngestSettings, Ingestor, ShardedSpan};
use spanbuf::metrics::Metrics;
use spanbuf::span::compress::decode_member;
use spanbuf::span::decode_span;
use spanbuf::store::{Keys, Store};

use crate::support::{RedisCluster, RedisServer};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Backend {
    Standalone,
    Cluster,
}

enum Servers {
    Standalone(RedisServer),
    Cluster(RedisCluster),
}

/// One test's world: its own Redis, a store, an ingestor, an inspector.
pub struct Env {
    _servers: Servers,
    pub config: Config,
    pub store: Arc<Store>,
    pub ingestor: Ingestor,
    pub metrics: Arc<Metrics>,
    pub inspect: Inspect,
}

pub const TTL: u64 = 3600;

impl Env {
    pub async fn start(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Env {
        let mut config = Config::default();
        let servers = match backend {
            Backend::Standalone => {
                let server = RedisServer::start();
                config.redis.url = server.url();
                Servers::Standalone(server)
            }
            Backend::Cluster => {
                let cluster = RedisCluster::start();
                config.redis.cluster_urls = cluster.urls();
                Servers::Cluster(cluster)
            }
        };
        config.redis.ttl_secs = TTL;
        tweak(&mut config);
        config.validate().expect("test configuration is valid");
        let store = Arc::new(
            Store::connect(&config.redis, config.buffer.slice_id)
                .await
                .expect("store connects"),
        );
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let ingestor = Ingestor::new(
            store.clone(),
            IngestSettings::from_config(&config.redis, &config.buffer),
            metrics.clone(),
        );
        let urls = match &servers {
            Servers::Standalone(s) => vec![s.url()],
            Servers::Cluster(c) => c.urls(),
        };
        let inspect = Inspect::connect(backend, urls, config.redis.key_prefix.clone()).await;
        Env {
            _servers: servers,
            config,
            store,
            ingestor,
            metrics,
            inspect,
        }
    }

    /// The cluster, for a test that moves slots (`None` when standalone).
    pub fn cluster(&self) -> Option<&RedisCluster> {
        match &self._servers {
            Servers::Cluster(cluster) => Some(cluster),
            Servers::Standalone(_) => None,
        }
    }

    pub fn keys(&self) -> &Keys {
        self.store.keys()
    }

    /// A flusher on this env's store and metrics (its own lock token).
    pub fn flusher(&self) -> spanbuf::flush::Flusher {
        spanbuf::flush::Flusher::new(
            self.store.clone(),
            spanbuf::flush::FlushSettings::from_config(&self.config),
            self.metrics.clone(),
        )
    }

    /// `spanbuf_spans_dropped_total{reason}`.
    pub fn dropped(&self, reason: &str) -> u64 {
        self.metrics
            .spans_dropped_total
            .with_label_values(&[reason])
            .get()
    }

    /// Takes the flush lock of `segment_key` as another flusher would.
    pub async fn hold_lock(&mut self, segment_key: &str, owner: &str) -> String {
        let lock = self.keys().flush_lock(segment_key);
        // As a live flusher holds it: just taken, so its hold is whole
        // (docs/design.md §6 step 2; a lock silent for the lock TTL would
        // be taken over).
        let hold_ms = spanbuf::flush::FlushSettings::from_config(&self.config).lock_hold_ms;
        let _: () = self
            .inspect
            .query(
                redis::cmd("SET")
                    .arg(&lock)
                    .arg(owner)
                    .arg("PX")
                    .arg(hold_ms),
            )
            .await;
        lock
    }

    /// A second, independent inspector (e.g. for a sink that watches Redis).
    pub async fn new_inspect(&self) -> Inspect {
        let (backend, urls) = if self.config.redis.cluster_urls.is_empty() {
            (Backend::Standalone, vec![self.config.redis.url.clone()])
        } else {
            (Backend::Cluster, self.config.redis.cluster_urls.clone())
        };
        Inspect::connect(backend, urls, self.config.redis.key_prefix.clone()).await
    }

    /// Decodes and ingests raw JSON lines on shard 0 at clock `now`.
    pub async fn ingest_raw(&self, lines: &[Vec<u8>], now: f64) -> IngestOutcome {
        let batch = decode_batch(
            lines.iter().map(|l| (0u32, l.as_slice())),
            self.config.buffer.max_span_bytes as usize,
            &self.metrics,
        );
        self.ingestor
            .ingest(&batch.spans, now)
            .await
            .expect("ingest succeeds")
    }

    pub async fn ingest(&self, spans: &[TestSpan], now: f64) -> IngestOutcome {
        let lines: Vec<Vec<u8>> = spans.iter().map(TestSpan::json).collect();
        self.ingest_raw(&lines, now).await
    }

    pub async fn ingest_on(&self, shard: u32, spans: &[TestSpan], now: f64) -> IngestOutcome {
        let batch: Vec<ShardedSpan> = spans
            .iter()
            .map(|s| ShardedSpan {
                shard,
                span: decode_span(&s.json(), usize::MAX).expect("valid span"),
            })
            .collect();
        self.ingestor
            .ingest(&batch, now)
            .await
            .expect("ingest succeeds")
    }

    /// Only redirect maps and delivered records are left (with their TTL):
    /// what a segment leaves behind when spans it knew of were not delivered
    /// with it, and the span ids a trace delivered.
    pub async fn assert_only_redirects_left(&mut self) {
        self.assert_layout().await;
        let left = self.inspect.all_keys().await;
        assert!(
            left.iter()
                .all(|k| k.contains(":ssr:") || k.contains(":dl:")),
            "{left:?}"
        );
    }

    /// The span ids of the trace's delivered record (`P:dl:{pt}`).
    pub async fn delivered(&mut self, pt: &str) -> Vec<String> {
        let key = self.keys().delivered(pt);
        let text: Option<String> = self.inspect.query(redis::cmd("GET").arg(&key)).await;
        text.unwrap_or_default()
            .split(',')
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Every key under the prefix has a TTL within (0, TTL] (the span
    /// counters and the queues (0, 2 TTL]: they outlive the data to count
    /// its loss) and the type docs/design.md §4 gives its family; no other
    /// key family exists.
    pub async fn assert_layout(&mut self) {
        let prefix = self.config.redis.key_prefix.clone();
        let ttl = self.config.redis.ttl_secs as i64;
        for key in self.inspect.all_keys().await {
            let rest = key
                .strip_prefix(&format!("{prefix}:"))
                .unwrap_or_else(|| panic!("key outside the prefix: {key}"));
            let family = rest.split(':').next().unwrap_or_default();
            let expected = match family {
                "s" | "mk" => "set",
                "ssr" => "hash",
                "q" => "zset",
                "hrs" | "ic" | "ibc" | "fl" | "fs" | "cut" | "dl" => "string",
                other => panic!("unknown key family {other:?} in {key}"),
            };
            let ty: String = self.inspect.query(redis::cmd("TYPE").arg(&key)).await;
            assert_eq!(ty, expected, "type of {key}");
            let left: i64 = self.inspect.query(redis::cmd("TTL").arg(&key)).await;
            let max = if matches!(family, "ic" | "q") {
                2 * ttl
            } else {
                ttl
            };
            assert!(
                left > 0 && left <= max,
                "{key} has TTL {left}, want 1..={max}"
            );
        }
    }
}

/// A span to feed in, built as Sentry's ingest-spans JSON.
#[derive(Clone, Debug)]
pub struct TestSpan {
    pub project_id: u64,
    pub trace_id: String,
    pub span_id: String,
    pub parent: Option<String>,
    pub is_segment: Option<bool>,
    pub segment_id: Option<String>,
    pub filler: usize,
}

pub fn trace(n: u64) -> String {
    format!("{n:032x}")
}

pub fn id(n: u64) -> String {
    format!("{n:016x}")
}

impl TestSpan {
    pub fn new(trace_id: &str, span_id: &str, parent: Option<&str>) -> TestSpan {
        TestSpan {
            project_id: 1,
            trace_id: trace_id.into(),
            span_id: span_id.into(),
            parent: parent.map(Into::into),
            is_segment: None,
            segment_id: None,
            filler: 0,
        }
    }

    pub fn project(mut self, project_id: u64) -> TestSpan {
        self.project_id = project_id;
        self
    }

    pub fn segment(mut self) -> TestSpan {
        self.is_segment = Some(true);
        self
    }

    pub fn known_segment(mut self, segment_id: &str) -> TestSpan {
        self.segment_id = Some(segment_id.into());
        self
    }

    pub fn filler(mut self, bytes: usize) -> TestSpan {
        self.filler = bytes;
        self
    }

    pub fn json(&self) -> Vec<u8> {
        let mut v = json!({
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent,
            "project_id": self.project_id,
            "start_timestamp": 1700000000.0,
            "end_timestamp": 1700000001.5,
            "description": "x".repeat(self.filler),
        });
        if let Some(seg) = self.is_segment {
            v["is_segment"] = json!(seg);
        }
        if let Some(sid) = &self.segment_id {
            v["attributes"] = json!({"sentry.segment.id": {"type": "string", "value": sid}});
        }
        serde_json::to_vec(&v).expect("json")
    }

    pub fn pt(&self) -> String {
        Keys::pt(self.project_id, &self.trace_id)
    }
}

enum Conn {
    Standalone(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// Reads Redis directly, independent of the code under test.
pub struct Inspect {
    conn: Conn,
    nodes: Vec<redis::aio::MultiplexedConnection>,
    prefix: String,
}

impl Inspect {
    async fn connect(backend: Backend, urls: Vec<String>, prefix: String) -> Inspect {
        let mut nodes = Vec::new();
        for url in &urls {
            let client = redis::Client::open(url.as_str()).expect("url");
            nodes.push(
                client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("node connects"),
            );
        }
        let conn = match backend {
            Backend::Standalone => Conn::Standalone(nodes[0].clone()),
            Backend::Cluster => Conn::Cluster(
                redis::cluster::ClusterClient::new(urls)
                    .expect("cluster client")
                    .get_async_connection()
                    .await
                    .expect("cluster connects"),
            ),
        };
        Inspect {
            conn,
            nodes,
            prefix,
        }
    }

    /// A connection to each server (every primary of a cluster).
    pub fn node_connections(&self) -> Vec<redis::aio::MultiplexedConnection> {
        self.nodes.clone()
    }

    pub async fn query<T: FromRedisValue>(&mut self, cmd: &redis::Cmd) -> T {
        let value = match &mut self.conn {
            Conn::Standalone(c) => c.req_packed_command(cmd).await,
            Conn::Cluster(c) => c.req_packed_command(cmd).await,
        }
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        T::from_redis_value(value).unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
    }

    /// Every key under the prefix, over all nodes (primaries hold them all).
    pub async fn all_keys(&mut self) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        for node in &mut self.nodes {
            let mut cursor: u64 = 0;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{}:*", self.prefix))
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(node)
                    .await
                    .expect("scan");
                keys.extend(batch);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        keys
    }

    /// `SCRIPT FLUSH` on every node, as a restart or failover would.
    pub async fn flush_scripts(&mut self) {
        for node in &mut self.nodes {
            let _: () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(node)
                .await
                .expect("script flush");
        }
    }

    pub async fn get(&mut self, key: &str) -> Option<String> {
        self.query(redis::cmd("GET").arg(key)).await
    }

    pub async fn smembers(&mut self, key: &str) -> Vec<Vec<u8>> {
        self.query(redis::cmd("SMEMBERS").arg(key)).await
    }

    pub async fn scard(&mut self, key: &str) -> u64 {
        self.query(redis::cmd("SCARD").arg(key)).await
    }

    pub async fn exists(&mut self, key: &str) -> bool {
        let n: i64 = self.query(redis::cmd("EXISTS").arg(key)).await;
        n == 1
    }

    pub async fn hget(&mut self, key: &str, field: &str) -> Option<String> {
        self.query(redis::cmd("HGET").arg(key).arg(field)).await
    }

    /// Queue members with scores.
    pub async fn queue(&mut self, queue_key: &str) -> BTreeMap<String, f64> {
        let pairs: Vec<(String, f64)> = self
            .query(
                redis::cmd("ZRANGE")
                    .arg(queue_key)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES"),
            )
            .await;
        pairs.into_iter().collect()
    }

    /// Segments of one `project:trace` as Redis holds them: root (or salt)
    /// → the span ids found in the payload sets its index lists.
    pub async fn segments(&mut self, pt: &str) -> BTreeMap<String, BTreeSet<String>> {
        let mk_prefix = format!("{}:mk:{{{pt}}}:", self.prefix);
        let mut out = BTreeMap::new();
        let index_keys: Vec<String> = self
            .all_keys()
            .await
            .into_iter()
            .filter(|k| k.starts_with(&mk_prefix))
            .collect();
        for mk in index_keys {
            let root = mk[mk_prefix.len()..].to_string();
            let mut spans = BTreeSet::new();
            for salt in self.smembers(&mk).await {
                let salt = String::from_utf8(salt).expect("salt is text");
                let payload_key = format!("{}:s:{{{pt}:{salt}}}:{salt}", self.prefix);
                let members = self.smembers(&payload_key).await;
                assert!(
                    !members.is_empty(),
                    "payload set {payload_key} of index {mk} is missing"
                );
                for member in members {
                    let mut payloads = Vec::new();
                    decode_member(&member, 1 << 30, &mut payloads).expect("member decodes");
                    for p in payloads {
                        let v: serde_json::Value =
                            serde_json::from_slice(&p).expect("payload is json");
                        spans.insert(v["span_id"].as_str().expect("span_id").to_string());
                    }
                }
            }
            out.insert(root, spans);
        }
        out
    }

    /// Raw reply, for debugging failures.
    pub async fn raw(&mut self, cmd: &redis::Cmd) -> Value {
        self.query(cmd).await
    }
}

pub fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

/// All permutations of `0..n`.
pub fn permutations(n: usize) -> Vec<Vec<usize>> {
    fn go(v: &mut Vec<usize>, k: usize, out: &mut Vec<Vec<usize>>) {
        if k == v.len() {
            out.push(v.clone());
            return;
        }
        for i in k..v.len() {
            v.swap(k, i);
            go(v, k + 1, out);
            v.swap(k, i);
        }
    }
    let mut out = Vec::new();
    go(&mut (0..n).collect(), 0, &mut out);
    out
}
