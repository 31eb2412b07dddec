//! The end-to-end harness shared by the worker and fault tests: the
//! `spanbuf run` binary as a child process (with its /metrics), the topics, a
//! producer of span lines, and an output reader that audits what comes out
//! (every span once under its root; a duplicate only with the same flush_id).
//! Each test binary uses a subset of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};

use crate::support::{Broker, RedisServer};

pub const INPUT: &str = "ingest-spans";
pub const OUTPUT: &str = "buffered-segments";
pub const DLQ: &str = "spans-dlq";
pub const GROUP: &str = "spanbuf-e2e";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The worker as a child process; killed on drop if still running.
pub struct Worker {
    pub child: Child,
    pub http_port: u16,
}

impl Worker {
    pub fn start(redis: &RedisServer, broker: &Broker) -> Worker {
        Worker::start_with(broker, &[("SPANBUF_REDIS_URL", redis.url())])
    }

    pub fn start_with(broker: &Broker, vars: &[(&str, String)]) -> Worker {
        let http_port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_spanbuf"));
        command
            .arg("run")
            .env_clear()
            .env("SPANBUF_KAFKA_BROKERS", broker.bootstrap())
            .env("SPANBUF_CONSUMER_GROUP", GROUP)
            .env("SPANBUF_DLQ_TOPIC", DLQ)
            .env("SPANBUF_HTTP_ADDR", format!("127.0.0.1:{http_port}"))
            .env("SPANBUF_TIMEOUT_SECS", "2")
            .env("SPANBUF_ROOT_TIMEOUT_SECS", "1")
            .env("SPANBUF_MAX_SEGMENT_LIFETIME_SECS", "10")
            .env("SPANBUF_FLUSH_INTERVAL_MS", "100")
            .env("SPANBUF_BATCH_MAX_MS", "200")
            // tansu holds a group join for about half the session timeout.
            .env("SPANBUF_KAFKA_CONSUMER_PROP_SESSION_TIMEOUT_MS", "3000")
            .env("SPANBUF_KAFKA_CONSUMER_PROP_HEARTBEAT_INTERVAL_MS", "500")
            .env("SPANBUF_LOG_LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, value) in vars {
            command.env(name, value);
        }
        let child = command.spawn().expect("spanbuf run starts");
        Worker { child, http_port }
    }

    /// SIGTERM, and the drain must end in exit 0; the worker's log.
    pub fn stop_cleanly(&mut self) -> String {
        let (code, stderr) = self.terminate();
        assert_eq!(code, Some(0), "{stderr}");
        stderr
    }

    /// Waits for the process to exit by itself (e.g. at a fault point).
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "worker did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::Write;
        let mut stream = TcpStream::connect(("127.0.0.1", self.http_port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    }

    /// A counter's value from /metrics (labels included in `series`).
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics")?;
        body.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    pub fn terminate(&mut self) -> (Option<i32>, String) {
        // SAFETY-free: plain kill(2) through the `kill` command.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut err) = self.child.stderr.take() {
                    let _ = err.read_to_string(&mut stderr);
                }
                return (status.code(), stderr);
            }
            assert!(
                Instant::now() < deadline,
                "worker did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// 100 traces of 8 spans (a root, 3 children, 4 grandchildren), trace ids
/// starting at `first`: the lines (key = trace id) and span id → expected
/// segment id.
/// `(key, payload)` messages for the input topic.
pub type Lines = Vec<(String, Vec<u8>)>;

pub fn spans(first: u64) -> (Lines, BTreeMap<String, String>) {
    let mut lines = Vec::new();
    let mut expected = BTreeMap::new();
    for t in first..first + 100 {
        let trace = format!("{:032x}", 0xabc0_0000 + t);
        let id = |n: u64| format!("{:016x}", (t << 8) + n + 1);
        for n in 0..8u64 {
            let parent = match n {
                0 => Value::Null,
                1..=3 => id(0).into(),
                _ => id(n - 3).into(),
            };
            let span = json!({"trace_id": trace, "span_id": id(n), "parent_span_id": parent,
                              "project_id": 1, "start_timestamp": 1.0, "end_timestamp": 2.0,
                              "description": "select 1"});
            lines.push((trace.clone(), serde_json::to_vec(&span).expect("json")));
            expected.insert(id(n), id(0));
        }
    }
    (lines, expected)
}

/// Reads the output and dead-letter topics from the beginning.
pub struct Output {
    reader: BaseConsumer,
    /// span id → (segment id, flush id)
    pub spans: BTreeMap<String, (String, String)>,
    /// The `spanbuf-invalid-reason` header of each dead letter.
    pub dlq: Vec<Option<Vec<u8>>>,
    pub records: usize,
    /// Spans in all records read, duplicates included.
    pub deliveries: usize,
}

impl Output {
    pub fn new(broker: &Broker) -> Output {
        let reader: BaseConsumer = broker
            .group_consumer_config("e2e-reader")
            .create()
            .expect("reader");
        let mut assignment = TopicPartitionList::new();
        for p in 0..2 {
            assignment
                .add_partition_offset(OUTPUT, p, Offset::Beginning)
                .expect("tpl");
        }
        assignment
            .add_partition_offset(DLQ, 0, Offset::Beginning)
            .expect("tpl");
        reader.assign(&assignment).expect("assign");
        Output {
            reader,
            spans: BTreeMap::new(),
            dlq: Vec::new(),
            records: 0,
            deliveries: 0,
        }
    }

    /// Reads until every expected span and `dlq_records` dead letters came.
    /// A span delivered twice must carry the same flush_id both times.
    pub fn read_until(
        &mut self,
        expected: &BTreeMap<String, String>,
        dlq_records: usize,
        timeout: Duration,
    ) {
        let deadline = Instant::now() + timeout;
        while self.spans.len() < expected.len() || self.dlq.len() < dlq_records {
            assert!(
                Instant::now() < deadline,
                "got {} of {} spans and {} dlq records",
                self.spans.len(),
                expected.len(),
                self.dlq.len()
            );
            if let Some(message) = self.reader.poll(Duration::from_millis(200)) {
                let message = message.expect("read").detach();
                self.take(&message);
            }
        }
    }

    /// Reads until nothing new came for `quiet` (bounded by `timeout`).
    pub fn read_quiet(&mut self, quiet: Duration, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = Instant::now();
        while last.elapsed() < quiet {
            assert!(Instant::now() < deadline, "output never went quiet");
            if let Some(message) = self.reader.poll(Duration::from_millis(200)) {
                let message = message.expect("read").detach();
                self.take(&message);
                last = Instant::now();
            }
        }
    }

    /// Records one output or dead-letter message; a span seen before must
    /// carry the same flush_id.
    fn take(&mut self, message: &rdkafka::message::OwnedMessage) {
        if message.topic() == DLQ {
            let reason = message.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == "spanbuf-invalid-reason")
                    .and_then(|h| h.value.map(<[u8]>::to_vec))
            });
            self.dlq.push(reason);
            return;
        }
        let record =
            spanbuf::span::record::from_json(message.payload().expect("payload")).expect("record");
        assert_eq!(
            message.key(),
            Some(record.trace_id.as_bytes()),
            "key = trace id"
        );
        self.records += 1;
        self.deliveries += record.spans.len();
        for raw in &record.spans {
            let v: Value = serde_json::from_str(raw.get()).expect("span");
            let id = v["span_id"].as_str().expect("id").to_string();
            let prev = self.spans.insert(
                id.clone(),
                (record.segment_id.clone(), record.flush_id.clone()),
            );
            if let Some((_, flush_id)) = prev {
                assert_eq!(
                    flush_id, record.flush_id,
                    "a duplicate of {id} must carry the same flush_id"
                );
            }
        }
    }

    pub fn claimed(&self) -> BTreeMap<String, String> {
        self.spans
            .iter()
            .map(|(k, (seg, _))| (k.clone(), seg.clone()))
            .collect()
    }
}

pub fn produce(broker: &Broker, lines: &[(String, Vec<u8>)]) {
    let producer: ThreadedProducer<DefaultProducerContext> =
        broker.client_config().create().expect("producer");
    for (trace, payload) in lines {
        producer
            .send(BaseRecord::to(INPUT).key(trace.as_bytes()).payload(payload))
            .map_err(|(e, _)| e)
            .expect("produce");
    }
    producer.flush(Duration::from_secs(10)).expect("flush");
}

pub fn topics(broker: &Broker) {
    broker.create_topic(INPUT, 4);
    broker.create_topic(OUTPUT, 2);
    broker.create_topic(DLQ, 1);
}

/// Waits until `a` and `b` both hold partitions and, with `all`, hold all
/// four between them.
pub fn wait_sharing(a: &Worker, b: &Worker, all: bool) {
    let held = |w: &Worker| w.metric("spanbuf_assigned_partitions").unwrap_or(0.0);
    wait_for(
        "two workers sharing the partitions",
        Duration::from_secs(60),
        || held(a) >= 1.0 && held(b) >= 1.0 && (!all || held(a) + held(b) == 4.0),
    );
}

/// Two workers in one group, once the four partitions are split between them.
pub fn two_workers(redis: &RedisServer, broker: &Broker) -> (Worker, Worker) {
    let a = Worker::start(redis, broker);
    let b = Worker::start(redis, broker);
    wait_sharing(&a, &b, true);
    (a, b)
}
