//! Real server processes for integration tests (docs/design.md §10): a standalone
//! `redis-server`, a three-master Redis Cluster and a tansu Kafka-protocol broker.
//!
//! Every server runs on free 127.0.0.1 ports in its own temporary directory, and is
//! killed and reaped when its handle is dropped. Start-up polls for readiness under a
//! deadline and panics with the server's log tail when the server does not come up;
//! a missing binary panics with the install command, it never skips the test. The
//! API is synchronous (plain `std::process`), so it works from `#[test]` and from
//! `#[tokio::test]` alike.
//!
//! Binaries: `redis-server` and `redis-cli` from PATH; tansu from
//! `$SPANBUF_TANSU_BIN`, else `.tools/bin/tansu` (where `scripts/install-deps.sh`
//! puts it), else PATH. tansu logs at `warn` unless `TANSU_RUST_LOG` says otherwise.
//!
//! Kafka quirks a test must allow for: on tansu a consumer-group join takes about
//! half the session timeout (use `Broker::group_consumer_config`); and a
//! `TopicPartitionList` returned by `committed()` that is still alive when its
//! consumer is dropped makes the drop hang forever (seen with tansu, likely any
//! broker, as librdkafka waits for the references the list holds).
//!
//! This module must not share a server between tests, use fixed ports, or wipe a
//! server's data to reuse it: each test starts what it needs.

// Each integration test binary compiles this module on its own (`mod support;`) and
// uses a different subset of it, so any item is unused in some binary. Allowing dead
// code here, and only here, keeps those binaries free of noise without hiding dead
// code in `src/`.
#![allow(dead_code)]

use std::env;
use std::fs::{self, File, OpenOptions};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use tempfile::TempDir;

/// What to tell a developer whose machine lacks a server binary.
const INSTALL_HINT: &str = "install the test dependencies with `bash scripts/install-deps.sh` \
     (run from the repo root; `bash scripts/test.sh` does it for you)";

/// How many times a server start is retried on fresh ports. Picking a free port
/// (bind to :0, read it, release it) races with parallel tests doing the same.
const START_ATTEMPTS: u32 = 5;

/// Interval between readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Deadline for one redis-server to answer PING after being spawned.
const REDIS_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Deadline for a freshly created cluster to report every slot served on every node.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Deadline for tansu to answer a Kafka metadata request after being spawned.
const BROKER_START_TIMEOUT: Duration = Duration::from_secs(20);

/// Deadline for a created topic to show up in metadata with all its partitions.
const TOPIC_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How many log lines a start-up failure quotes.
const LOG_TAIL_LINES: usize = 30;

/// Consumer-group session timeout for test consumers. tansu 0.6 holds a member's
/// JoinGroup for about half the session timeout before answering (measured:
/// 45 s -> 23 s, 6 s -> 3 s, 3 s -> 2 s, 2 s -> 1 s), so librdkafka's 45 s default
/// would make every subscribe in a test take ~23 s.
const GROUP_SESSION_TIMEOUT_MS: &str = "3000";

/// Heartbeat interval for test consumers, well inside the session timeout so a
/// busy machine does not get members evicted.
const GROUP_HEARTBEAT_INTERVAL_MS: &str = "500";

/// Slots in a Redis Cluster.
const CLUSTER_SLOTS: i64 = 16384;

/// Masters in the test cluster.
const CLUSTER_MASTERS: usize = 3;

/// Slot migration by hand, the steps `redis-cli --cluster reshard` takes
/// for each slot, with the pauses in between that a test needs: open the
/// slot (`CLUSTER SETSLOT … IMPORTING` on the target, `… MIGRATING` on the
/// source), move keys with `MIGRATE`, assign the slot (`… NODE`) everywhere.
/// Nodes are named by their index in `RedisCluster::nodes()`.
#[derive(Clone, Debug)]
pub struct ClusterAdmin {
    ports: Vec<u16>,
    ids: Vec<String>,
}

impl ClusterAdmin {
    fn conn(&self, node: usize) -> redis::Connection {
        connect_sync(self.ports[node]).expect("cluster node answers")
    }

    /// Node ids, as `CLUSTER MYID` gives them (for `redis-cli --cluster`).
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// The slot `key` hashes to.
    pub fn keyslot(&self, key: &str) -> i64 {
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut self.conn(0))
            .expect("CLUSTER KEYSLOT")
    }

    /// The node serving `slot`.
    pub fn owner(&self, slot: i64) -> usize {
        let slots: redis::Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut self.conn(0))
            .expect("CLUSTER SLOTS");
        let map = slot_map(&slots).expect("CLUSTER SLOTS reply");
        let (_, _, port) = map
            .into_iter()
            .find(|&(start, end, _)| (start..=end).contains(&slot))
            .unwrap_or_else(|| panic!("no primary serves slot {slot}"));
        self.ports
            .iter()
            .position(|&p| i64::from(p) == port)
            .expect("a node of this cluster")
    }

    /// Opens `slot` for migration from node `from` to node `to`.
    pub fn open(&self, slot: i64, from: usize, to: usize) {
        for (node, state, peer) in [(to, "IMPORTING", from), (from, "MIGRATING", to)] {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(state)
                .arg(&self.ids[peer])
                .query::<()>(&mut self.conn(node))
                .unwrap_or_else(|e| panic!("CLUSTER SETSLOT {slot} {state}: {e}"));
        }
    }

    /// Moves the keys of `slot` still on `from` that `pick` chooses to `to`
    /// with one `MIGRATE` (no REPLACE: a key that already exists on the
    /// target fails it with BUSYKEY, as it fails a reshard); how many.
    pub fn migrate(
        &self,
        slot: i64,
        from: usize,
        to: usize,
        mut pick: impl FnMut(&str) -> bool,
    ) -> usize {
        let mut source = self.conn(from);
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100_000)
            .query(&mut source)
            .expect("CLUSTER GETKEYSINSLOT");
        let keys: Vec<&String> = keys.iter().filter(|k| pick(k)).collect();
        if keys.is_empty() {
            return 0;
        }
        let reply: redis::RedisResult<String> = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(self.ports[to])
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query(&mut source);
        if let Err(e) = reply {
            panic!("MIGRATE of {} keys of slot {slot} failed: {e}", keys.len());
        }
        keys.len()
    }

    /// Moves what is left of `slot` to `to` and assigns it there on every node.
    pub fn finish(&self, slot: i64, from: usize, to: usize) {
        self.migrate(slot, from, to, |_| true);
        let others = (0..self.ports.len()).filter(|&n| n != to && n != from);
        for node in [to, from].into_iter().chain(others) {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg("NODE")
                .arg(&self.ids[to])
                .query::<()>(&mut self.conn(node))
                .unwrap_or_else(|e| panic!("CLUSTER SETSLOT {slot} NODE: {e}"));
        }
    }

    /// ASK, TRYAGAIN and MOVED replies the nodes have sent so far (`INFO
    /// errorstats` counts error replies by code): how many calls met a
    /// migrating or moved slot.
    pub fn redirect_replies(&self) -> u64 {
        (0..self.ports.len())
            .map(|node| {
                let info: String = redis::cmd("INFO")
                    .arg("errorstats")
                    .query(&mut self.conn(node))
                    .expect("INFO errorstats");
                ["ASK", "TRYAGAIN", "MOVED"]
                    .iter()
                    .filter_map(|code| info_field(&info, &format!("errorstat_{code}")))
                    .filter_map(|v| {
                        v.strip_prefix("count=")?
                            .split(',')
                            .next()?
                            .parse::<u64>()
                            .ok()
                    })
                    .sum::<u64>()
            })
            .sum()
    }
}

// ---------------------------------------------------------------------------
// Standalone redis-server
// ---------------------------------------------------------------------------

/// A `redis-server` process of its own, on a free port, persisting nothing.
pub struct RedisServer {
    // Declared before `dir` so the process is killed before its directory goes.
    process: ServerProcess,
    port: u16,
    /// Cluster bus port, for cluster nodes; kept so `restart` reuses it.
    bus_port: Option<u16>,
    /// Arguments beyond the fixed ones, kept so `restart` reuses them.
    extra_args: Vec<String>,
    dir: TempDir,
}

impl RedisServer {
    /// Starts a standalone server with the default test configuration.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Starts a standalone server with extra configuration, given as command-line
    /// pairs such as `["--maxmemory", "10mb"]`.
    pub fn start_with(extra_args: &[&str]) -> RedisServer {
        let extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        RedisServer::launch(extra_args, false)
    }

    /// Starts a cluster-enabled node (not yet part of any cluster).
    fn start_cluster_node(extra: &[&str]) -> RedisServer {
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "5000",
        ];
        RedisServer::launch(
            args.iter().chain(extra).map(|s| s.to_string()).collect(),
            true,
        )
    }

    fn launch(extra_args: Vec<String>, cluster_node: bool) -> RedisServer {
        let binary = require_binary("redis-server");
        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            // The cluster bus port is given explicitly: the default (port + 10000)
            // overflows 65535 for ports from the ephemeral range.
            let ports = free_ports(if cluster_node { 2 } else { 1 });
            let (port, bus_port) = (ports[0], ports.get(1).copied());
            let dir = temp_dir("spanbuf-redis-");
            match spawn_redis(&binary, port, bus_port, &extra_args, dir.path()) {
                Ok(process) => {
                    return RedisServer {
                        process,
                        port,
                        bus_port,
                        extra_args,
                        dir,
                    }
                }
                Err(reason) => failures.push(format!("attempt {attempt} (port {port}): {reason}")),
            }
        }
        panic!(
            "redis-server did not start after {START_ATTEMPTS} attempts:\n{}",
            failures.join("\n")
        );
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// OS process id of the running server.
    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// The server's data directory (also holds `redis.log` and, for cluster nodes,
    /// `nodes.conf`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server (SIGKILL, as a crash would) and starts it again on the same
    /// port, directory and configuration. Data is lost (nothing is persisted); a
    /// cluster node keeps its identity and slots through `nodes.conf`.
    pub fn restart(&mut self) {
        self.process.stop();
        let binary = require_binary("redis-server");
        // The port was ours a moment ago; retry briefly in case the kernel has not
        // released it yet, but another process taking it is a hard failure.
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        loop {
            match spawn_redis(
                &binary,
                self.port,
                self.bus_port,
                &self.extra_args,
                self.dir.path(),
            ) {
                Ok(process) => {
                    self.process = process;
                    return;
                }
                Err(reason) if Instant::now() >= deadline => panic!(
                    "redis-server did not restart on port {}: {reason}",
                    self.port
                ),
                Err(_) => thread::sleep(POLL_INTERVAL),
            }
        }
    }

    /// The last lines of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.process.log)
    }

    /// A synchronous connection, for setup and inspection in tests.
    pub fn connection(&self) -> redis::Connection {
        connect_sync(self.port)
            .unwrap_or_else(|e| panic!("connecting to redis-server at {}: {e}", self.url()))
    }
}

/// Spawns redis-server and waits until it answers as the process we spawned.
fn spawn_redis(
    binary: &Path,
    port: u16,
    bus_port: Option<u16>,
    extra_args: &[String],
    dir: &Path,
) -> Result<ServerProcess, String> {
    let mut args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir.display().to_string(),
        "--daemonize",
        "no",
        "--protected-mode",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(bus_port) = bus_port {
        args.extend(["--cluster-port".to_string(), bus_port.to_string()]);
    }
    args.extend(extra_args.iter().cloned());

    let mut command = Command::new(binary);
    command.args(&args);
    let mut process = ServerProcess::spawn(command, dir, "redis.log");
    let pid = process.child.id();
    let ready = wait_for(REDIS_START_TIMEOUT, || {
        if let Some(status) = process.exited() {
            return Check::Failed(format!("redis-server exited with {status}"));
        }
        let mut conn = match connect_sync(port) {
            Ok(conn) => conn,
            Err(e) => return Check::NotYet(format!("connect: {e}")),
        };
        // A parallel test may own this port if ours failed to bind; only the
        // process we spawned counts as ready.
        match redis::cmd("INFO").arg("server").query::<String>(&mut conn) {
            Ok(info) => match info_field(&info, "process_id") {
                Some(p) if p == pid.to_string() => Check::Ready(()),
                other => Check::Failed(format!(
                    "port {port} is served by another redis-server (process_id {other:?})"
                )),
            },
            // LOADING and similar transient states.
            Err(e) => Check::NotYet(format!("INFO server: {e}")),
        }
    });
    match ready {
        Ok(()) => Ok(process),
        Err(reason) => {
            let tail = process.stop_and_tail();
            Err(format!("{reason}\n--- redis.log (tail) ---\n{tail}"))
        }
    }
}

/// Opens a synchronous connection with short timeouts, so a probe never hangs.
fn connect_sync(port: u16) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let conn = client.get_connection_with_timeout(Duration::from_secs(1))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(conn)
}

/// Value of `field:value` in INFO / CLUSTER INFO output.
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.trim_end()
            .strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
    })
}

// ---------------------------------------------------------------------------
// Redis Cluster
// ---------------------------------------------------------------------------

/// A Redis Cluster of three masters and no replicas, each a `RedisServer`.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three cluster-enabled nodes, joins them with `redis-cli --cluster
    /// create`, and waits until every node reports all slots served and agrees on
    /// the slot map.
    pub fn start() -> RedisCluster {
        RedisCluster::start_with(&[])
    }

    /// [`RedisCluster::start`] with extra `redis-server` arguments on every
    /// node (e.g. `--appendonly yes`).
    pub fn start_with(extra: &[&str]) -> RedisCluster {
        let redis_cli = require_binary("redis-cli");
        let nodes: Vec<RedisServer> = (0..CLUSTER_MASTERS)
            .map(|_| RedisServer::start_cluster_node(extra))
            .collect();
        let cluster = RedisCluster { nodes };

        let mut args = vec!["--cluster".to_string(), "create".to_string()];
        args.extend(
            cluster
                .nodes
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.port)),
        );
        args.extend(["--cluster-replicas", "0", "--cluster-yes"].map(String::from));
        let output = Command::new(&redis_cli)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", redis_cli.display()));
        if !output.status.success() {
            panic!(
                "`redis-cli {}` failed with {}:\n{}{}\n{}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                cluster.log_tails()
            );
        }
        cluster.wait_ready(CLUSTER_READY_TIMEOUT);
        cluster
    }

    /// `redis://127.0.0.1:PORT` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes, in creation order (node 0 got the lowest slots).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The nodes, mutably, e.g. to `restart` one in a fault test (then call
    /// `wait_ready`).
    pub fn nodes_mut(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }

    /// A handle for moving slots between the nodes by hand (Send, so a test
    /// can finish a migration from another thread).
    pub fn admin(&self) -> ClusterAdmin {
        let ports: Vec<u16> = self.nodes.iter().map(|n| n.port).collect();
        let ids = ports
            .iter()
            .map(|&port| {
                let mut conn = connect_sync(port).expect("cluster node answers");
                redis::cmd("CLUSTER")
                    .arg("MYID")
                    .query::<String>(&mut conn)
                    .expect("CLUSTER MYID")
            })
            .collect();
        ClusterAdmin { ports, ids }
    }

    /// Waits until every node reports `cluster_state:ok` with all slots assigned
    /// and all nodes known, and every node's `CLUSTER SLOTS` shows the same map,
    /// covering all slots with our nodes as masters. Panics with the node logs on
    /// timeout.
    pub fn wait_ready(&self, timeout: Duration) {
        let ready = wait_for(timeout, || match self.check_ready() {
            Ok(()) => Check::Ready(()),
            Err(reason) => Check::NotYet(reason),
        });
        if let Err(reason) = ready {
            panic!(
                "redis cluster on ports {:?} not ready: {reason}\n{}",
                self.nodes.iter().map(|n| n.port).collect::<Vec<_>>(),
                self.log_tails()
            );
        }
    }

    fn check_ready(&self) -> Result<(), String> {
        let our_ports: Vec<i64> = self.nodes.iter().map(|n| i64::from(n.port)).collect();
        let mut first_map: Option<Vec<(i64, i64, i64)>> = None;
        for node in &self.nodes {
            let mut conn = connect_sync(node.port).map_err(|e| format!("{}: {e}", node.url()))?;
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(&mut conn)
                .map_err(|e| format!("{}: CLUSTER INFO: {e}", node.url()))?;
            let expect = [
                ("cluster_state", "ok".to_string()),
                ("cluster_slots_assigned", CLUSTER_SLOTS.to_string()),
                ("cluster_slots_ok", CLUSTER_SLOTS.to_string()),
                ("cluster_known_nodes", CLUSTER_MASTERS.to_string()),
            ];
            for (field, want) in expect {
                let got = info_field(&info, field);
                if got != Some(want.as_str()) {
                    return Err(format!("{}: {field} is {got:?}, want {want}", node.url()));
                }
            }

            let slots: redis::Value = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query(&mut conn)
                .map_err(|e| format!("{}: CLUSTER SLOTS: {e}", node.url()))?;
            let mut map = slot_map(&slots).ok_or_else(|| {
                format!("{}: unexpected CLUSTER SLOTS reply {slots:?}", node.url())
            })?;
            map.sort_unstable();
            let covered: i64 = map.iter().map(|(start, end, _)| end - start + 1).sum();
            if covered != CLUSTER_SLOTS {
                return Err(format!(
                    "{}: CLUSTER SLOTS covers {covered} slots",
                    node.url()
                ));
            }
            let mut masters: Vec<i64> = map.iter().map(|&(_, _, port)| port).collect();
            masters.sort_unstable();
            masters.dedup();
            let mut want_masters = our_ports.clone();
            want_masters.sort_unstable();
            if masters != want_masters {
                return Err(format!(
                    "{}: slot masters are ports {masters:?}, want {want_masters:?}",
                    node.url()
                ));
            }
            match &first_map {
                None => first_map = Some(map),
                Some(first) if *first != map => {
                    return Err(format!(
                        "{}: CLUSTER SLOTS {map:?} differs from {}'s {first:?}",
                        node.url(),
                        self.nodes[0].url()
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn log_tails(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "--- node {} redis.log (tail) ---\n{}",
                    n.port,
                    log_tail(&n.dir().join("redis.log"))
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `(first slot, last slot, master port)` per range of a CLUSTER SLOTS reply.
fn slot_map(reply: &redis::Value) -> Option<Vec<(i64, i64, i64)>> {
    let redis::Value::Array(ranges) = reply else {
        return None;
    };
    ranges
        .iter()
        .map(|range| {
            let redis::Value::Array(fields) = range else {
                return None;
            };
            let (redis::Value::Int(start), redis::Value::Int(end), redis::Value::Array(master)) =
                (fields.first()?, fields.get(1)?, fields.get(2)?)
            else {
                return None;
            };
            let redis::Value::Int(port) = master.get(1)? else {
                return None;
            };
            Some((*start, *end, *port))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Kafka-protocol broker (tansu)
// ---------------------------------------------------------------------------

/// Distinguishes the brokers a test binary starts, so readiness can tell ours
/// from another test's broker that grabbed the same port.
static BROKER_SEQ: AtomicU32 = AtomicU32::new(0);

/// A tansu broker of its own, on a free port, with in-memory storage.
pub struct Broker {
    // Declared before `dir` so the process is killed before its directory goes.
    process: ServerProcess,
    port: u16,
    dir: TempDir,
}

impl Broker {
    /// Starts tansu (see `tansu_binary` for where it is looked up) and waits until
    /// it answers a metadata request as the broker we started.
    pub fn start() -> Broker {
        Broker::start_with_schemas(&[])
    }

    /// Starts tansu with its schema registry holding a JSON schema per
    /// `(topic, schema)`: the broker refuses a message to such a topic that
    /// does not match (`INVALID_RECORD`) — a real, permanent produce error.
    /// The schema describes `{"key": …, "value": …}` of each message.
    pub fn start_with_schemas(schemas: &[(&str, serde_json::Value)]) -> Broker {
        let binary = tansu_binary();
        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            let port = free_ports(1)[0];
            let dir = temp_dir("spanbuf-tansu-");
            let cluster_id = format!(
                "spanbuf-test-{}-{}",
                std::process::id(),
                BROKER_SEQ.fetch_add(1, Ordering::Relaxed)
            );
            let url = format!("tcp://127.0.0.1:{port}");
            let args: Vec<String> = [
                "broker",
                "--cluster-id",
                &cluster_id,
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ]
            .map(String::from)
            .to_vec();
            let mut args = args;
            if !schemas.is_empty() {
                let registry = dir.path().join("schemas");
                fs::create_dir_all(&registry).expect("schema registry dir");
                for (topic, schema) in schemas {
                    fs::write(registry.join(format!("{topic}.json")), schema.to_string())
                        .expect("write schema");
                }
                // tansu resolves a file URL against its working directory,
                // which is `dir`.
                args.push("--schema-registry".into());
                args.push("file://./schemas".into());
            }
            let mut command = Command::new(&binary);
            command
                .args(&args)
                // Plain-text log lines for failure messages, at a level that does
                // not flood the disk when the caller runs with RUST_LOG=debug.
                .env("NO_COLOR", "1")
                .env(
                    "RUST_LOG",
                    env::var("TANSU_RUST_LOG").unwrap_or_else(|_| "warn".to_string()),
                )
                // tansu reads these from the environment; a developer's setting
                // must not change the test broker.
                .env_remove("SCHEMA_REGISTRY")
                .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
            let mut process = ServerProcess::spawn(command, dir.path(), "tansu.log");
            match wait_broker_ready(&mut process, port, &cluster_id) {
                Ok(()) => return Broker { process, port, dir },
                Err(reason) => {
                    let tail = process.stop_and_tail();
                    failures.push(format!(
                        "attempt {attempt} (port {port}): {reason}\n--- tansu.log (tail) ---\n{tail}"
                    ));
                }
            }
        }
        panic!(
            "tansu broker ({}) did not start after {START_ATTEMPTS} attempts:\n{}",
            binary.display(),
            failures.join("\n")
        );
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's process id (e.g. to SIGSTOP it: an unresponsive broker).
    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// The port the broker listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The last lines of the broker's log, for failure messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.process.log)
    }

    /// A client config with `bootstrap.servers` pointing at this broker.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", self.bootstrap());
        config
    }

    /// A client config for a consumer in group `group_id`, with the session
    /// timeout lowered so joining the group takes ~2 s on tansu instead of ~23 s.
    /// Offsets policy (`auto.offset.reset`, `enable.auto.commit`) is left to the
    /// caller.
    pub fn group_consumer_config(&self, group_id: &str) -> ClientConfig {
        let mut config = self.client_config();
        config
            .set("group.id", group_id)
            .set("session.timeout.ms", GROUP_SESSION_TIMEOUT_MS)
            .set("heartbeat.interval.ms", GROUP_HEARTBEAT_INTERVAL_MS);
        config
    }

    /// Creates a topic (replication factor 1) and waits until metadata shows it
    /// with `partitions` partitions, each with a leader. Panics on any error,
    /// including the topic already existing.
    pub fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = self
            .client_config()
            .create()
            .unwrap_or_else(|e| panic!("creating admin client for {}: {e}", self.bootstrap()));
        let new_topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let options = AdminOptions::new().operation_timeout(Some(TOPIC_READY_TIMEOUT));
        // The admin future needs an executor; a private runtime on a scoped thread
        // works whether or not the caller is itself inside a tokio runtime.
        let results = thread::scope(|scope| {
            scope
                .spawn(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("building a current-thread tokio runtime")
                        .block_on(admin.create_topics([&new_topic], &options))
                })
                .join()
                .expect("create_topics thread panicked")
        })
        .unwrap_or_else(|e| panic!("creating topic {name:?} on {}: {e}", self.bootstrap()));
        for result in results {
            if let Err((topic, code)) = result {
                panic!(
                    "creating topic {topic:?} on {}: {code}\n--- tansu.log (tail) ---\n{}",
                    self.bootstrap(),
                    log_tail(&self.process.log)
                );
            }
        }

        let ready = wait_for(TOPIC_READY_TIMEOUT, || {
            let metadata = match admin
                .inner()
                .fetch_metadata(Some(name), Duration::from_secs(2))
            {
                Ok(metadata) => metadata,
                Err(e) => return Check::NotYet(format!("metadata: {e}")),
            };
            let Some(topic) = metadata.topics().iter().find(|t| t.name() == name) else {
                return Check::NotYet("topic not in metadata".to_string());
            };
            if let Some(err) = topic.error() {
                return Check::NotYet(format!("topic error {err:?}"));
            }
            let shown = topic.partitions().len();
            if shown != partitions as usize {
                return Check::NotYet(format!("{shown} of {partitions} partitions"));
            }
            match topic
                .partitions()
                .iter()
                .find(|p| p.leader() < 0 || p.error().is_some())
            {
                Some(p) => Check::NotYet(format!(
                    "partition {} leader {} error {:?}",
                    p.id(),
                    p.leader(),
                    p.error()
                )),
                None => Check::Ready(()),
            }
        });
        if let Err(reason) = ready {
            panic!(
                "topic {name:?} on {} not ready: {reason}\n--- tansu.log (tail) ---\n{}",
                self.bootstrap(),
                log_tail(&self.process.log)
            );
        }
    }
}

/// Waits until the broker accepts TCP and answers metadata with our port and
/// cluster id (so a broker of a parallel test on a recycled port does not count).
fn wait_broker_ready(
    process: &mut ServerProcess,
    port: u16,
    cluster_id: &str,
) -> Result<(), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // Created once the port accepts connections: librdkafka starts threads and
    // reconnects with backoff, so one client is reused across probes.
    let mut client: Option<BaseConsumer> = None;
    wait_for(BROKER_START_TIMEOUT, || {
        if let Some(status) = process.exited() {
            return Check::Failed(format!("tansu exited with {status}"));
        }
        if client.is_none() {
            if let Err(e) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                return Check::NotYet(format!("connect: {e}"));
            }
            match ClientConfig::new()
                .set("bootstrap.servers", format!("127.0.0.1:{port}"))
                .create::<BaseConsumer>()
            {
                Ok(c) => client = Some(c),
                Err(e) => return Check::Failed(format!("creating probe client: {e}")),
            }
        }
        let client = client.as_ref().expect("set above");
        let metadata = match client.fetch_metadata(None, Duration::from_millis(500)) {
            Ok(metadata) => metadata,
            Err(e) => return Check::NotYet(format!("metadata: {e}")),
        };
        if !metadata
            .brokers()
            .iter()
            .any(|b| b.port() == i32::from(port))
        {
            return Check::NotYet(format!(
                "metadata lists no broker on port {port}: {:?}",
                metadata
                    .brokers()
                    .iter()
                    .map(|b| format!("{}:{}", b.host(), b.port()))
                    .collect::<Vec<_>>()
            ));
        }
        match client.client().fetch_cluster_id(Duration::from_millis(500)) {
            Some(id) if id == cluster_id => Check::Ready(()),
            Some(id) => Check::Failed(format!(
                "port {port} is served by another broker (cluster id {id:?}, want {cluster_id:?})"
            )),
            None => Check::NotYet("no cluster id in metadata".to_string()),
        }
    })
}

/// Where tansu is taken from: `$SPANBUF_TANSU_BIN`, else the copy that
/// `scripts/install-deps.sh` puts in `.tools/bin/`, else `tansu` on PATH.
fn tansu_binary() -> PathBuf {
    if let Some(path) = env::var_os("SPANBUF_TANSU_BIN") {
        let path = PathBuf::from(path);
        if is_executable(&path) {
            return path;
        }
        panic!(
            "SPANBUF_TANSU_BIN={} is not an executable file; {INSTALL_HINT}",
            path.display()
        );
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/tansu");
    if is_executable(&local) {
        return local;
    }
    find_on_path("tansu").unwrap_or_else(|| {
        panic!(
            "tansu (the Kafka-protocol test broker) not found: SPANBUF_TANSU_BIN is unset, \
             {} does not exist and there is no `tansu` on PATH; {INSTALL_HINT}",
            local.display()
        )
    })
}

// ---------------------------------------------------------------------------
// Processes, ports, polling
// ---------------------------------------------------------------------------

/// A child process with stdout and stderr appended to a log file; killed (SIGKILL)
/// and reaped on drop, so neither processes nor zombies outlive the test.
struct ServerProcess {
    child: Child,
    log: PathBuf,
    /// Set once the child has been reaped.
    status: Option<ExitStatus>,
}

impl ServerProcess {
    /// Spawns `command` (program, arguments and environment already set) in
    /// `dir`, with its output appended to `dir/log_name`; panics if the program
    /// cannot be executed at all.
    fn spawn(mut command: Command, dir: &Path, log_name: &str) -> ServerProcess {
        let log = dir.join(log_name);
        let open_log = || {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()))
        };
        let (stdout, stderr): (File, File) = (open_log(), open_log());
        let child = command
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "spawning {}: {e}; {INSTALL_HINT}",
                    command.get_program().to_string_lossy()
                )
            });
        ServerProcess {
            child,
            log,
            status: None,
        }
    }

    /// The exit status if the process has already exited (reaping it).
    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Kills and reaps the process; a no-op once reaped.
    fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        // Kill fails only if the process is already gone; wait reaps either way.
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
    }

    fn stop_and_tail(&mut self) -> String {
        self.stop();
        log_tail(&self.log)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Outcome of one readiness probe.
enum Check<T> {
    Ready(T),
    /// Not ready yet, with what was observed (reported if the deadline passes).
    NotYet(String),
    /// Will never become ready; stop polling.
    Failed(String),
}

/// Probes every `POLL_INTERVAL` until ready, failed, or `timeout` has passed.
fn wait_for<T>(timeout: Duration, mut probe: impl FnMut() -> Check<T>) -> Result<T, String> {
    let started = Instant::now();
    loop {
        match probe() {
            Check::Ready(value) => return Ok(value),
            Check::Failed(reason) => return Err(reason),
            Check::NotYet(reason) if started.elapsed() >= timeout => {
                return Err(format!("not ready after {timeout:?}; last probe: {reason}"))
            }
            Check::NotYet(_) => thread::sleep(POLL_INTERVAL),
        }
    }
}

/// `n` distinct ports that were free a moment ago (all held until all are picked).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| {
            TcpListener::bind("127.0.0.1:0")
                .unwrap_or_else(|e| panic!("binding 127.0.0.1:0 to find a free port: {e}"))
        })
        .collect();
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .expect("local address of a bound listener")
                .port()
        })
        .collect()
}

fn temp_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .unwrap_or_else(|e| panic!("creating a temporary directory: {e}"))
}

/// The last `LOG_TAIL_LINES` lines of a log file, or why it could not be read.
fn log_tail(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Finds `name` on PATH or panics saying how to install it.
fn require_binary(name: &str) -> PathBuf {
    find_on_path(name).unwrap_or_else(|| panic!("`{name}` not found on PATH; {INSTALL_HINT}"))
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------
// The spanbuf binary
// ---------------------------------------------------------------------------

/// Runs the `spanbuf` binary under test with `args` and only `vars` (plus
/// `PATH`) in its environment, and waits for it.
pub fn spanbuf(args: &[&str], vars: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spanbuf"));
    cmd.args(args).env_clear();
    if let Ok(path) = env::var("PATH") {
        cmd.env("PATH", path);
    }
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().expect("spanbuf runs")
}

/// Process output as text (lossy).
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
