//! Security basics against real servers: Redis passwords and the README's
//! least-privilege ACL user (its line taken verbatim from the README), `rediss://`
//! with a verified server certificate, and secrets never shown — not by
//! `spanbuf config`, a failing command, the worker's logs at debug level, nor its
//! HTTP endpoints.
//!
//! Every secret is distinctive (`s3cr3t-PW-…`) so that finding it anywhere in the
//! captured output is a leak, not a coincidence.

mod e2e;
mod support;

use support::spanbuf;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use e2e::Worker;
use support::{Broker, RedisCluster, RedisServer};

/// The ACL user's password in these tests.
const ACL_PASSWORD: &str = "s3cr3t-PW-4242";
/// A wrong password, also never to be shown.
const WRONG_PASSWORD: &str = "s3cr3t-PW-9999";
/// A Kafka SASL password passed through to librdkafka.
const KAFKA_PASSWORD: &str = "s3cr3t-PW-kafka-7777";

/// `(name, value)` pairs as `spanbuf` takes them.
fn borrowed<'a>(vars: &'a [(&'a str, String)]) -> Vec<(&'a str, &'a str)> {
    vars.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// stdout and stderr of a finished command, as one text.
fn all_output(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_no_secret(what: &str, text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(!text.contains(secret), "{secret} leaked in {what}:\n{text}");
    }
}

/// A command that must fail at Redis login: exit 1 and an error naming redis and
/// the authentication failure, without any password in it.
fn assert_auth_refused(out: &Output, secrets: &[&str]) {
    let text = all_output(out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let lower = text.to_lowercase();
    assert!(
        lower.contains("redis") && lower.contains("authentication"),
        "the error should name redis and authentication: {text}"
    );
    assert_no_secret("a refused login", &text, secrets);
}

/// The README's ACL line (`user spanbuf on >CHANGE-ME …`) as the rules after the
/// user name, with the placeholder password replaced by `password`.
fn readme_acl_rules(password: &str) -> Vec<String> {
    let readme = include_str!("../README.md");
    let line = readme
        .lines()
        .find(|l| l.starts_with("user spanbuf on "))
        .expect("README has the `user spanbuf on …` ACL line");
    line.split_whitespace()
        .skip(2)
        .map(|rule| match rule.strip_prefix('>') {
            Some(_) => format!(">{password}"),
            None => rule.to_string(),
        })
        .collect()
}

/// `redis-server` arguments creating the README's ACL user with `ACL_PASSWORD`.
fn acl_user_args() -> Vec<String> {
    let mut args = vec!["--user".to_string(), "spanbuf".to_string()];
    args.extend(readme_acl_rules(ACL_PASSWORD));
    args
}

fn start_redis(args: &[String]) -> RedisServer {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    RedisServer::start_with(&args)
}

/// Asserts nothing was refused by ACL on this server: every command spanbuf and its
/// client libraries sent was allowed, including ones whose errors they ignore.
/// Failed logins (reason `auth`) are the tests' own wrong passwords.
fn assert_acl_log_empty(server: &RedisServer) {
    let mut admin = server.connection();
    let log: Vec<HashMap<String, String>> = redis::cmd("ACL")
        .arg("LOG")
        .query(&mut admin)
        .expect("ACL LOG");
    let refused: Vec<_> = log
        .iter()
        .filter(|entry| entry.get("reason").map(String::as_str) != Some("auth"))
        .collect();
    assert!(
        refused.is_empty(),
        "port {}: ACL refused something spanbuf sent: {refused:?}",
        server.port()
    );
}

/// A generated workload of `traces` traces; returns its path.
fn workload(dir: &Path, traces: usize) -> PathBuf {
    let path = dir.join("spans.ndjson");
    let out = spanbuf(
        &[
            "gen",
            "--traces",
            &traces.to_string(),
            "--spans-per-segment",
            "5",
            "--output",
            path.to_str().expect("utf-8 path"),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", all_output(&out));
    path
}

/// Replays `input` with `vars` and checks every span came out once: the summary
/// line, and as many records in the output file as it reports.
fn replay_delivers_everything(input: &Path, vars: &[(&str, &str)], secrets: &[&str]) {
    let output = input.with_file_name("segments.ndjson");
    let out = spanbuf(
        &[
            "replay",
            "--input",
            input.to_str().expect("utf-8 path"),
            "--output",
            output.to_str().expect("utf-8 path"),
            "--batch-size",
            "100",
        ],
        vars,
    );
    let text = all_output(&out);
    assert!(out.status.success(), "{text}");
    assert_no_secret("replay output", &text, secrets);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary: Value = serde_json::from_str(stderr.lines().last().expect("a summary line"))
        .expect("the summary is JSON");
    let spans_in = summary["spans_in"].as_u64().expect("spans_in");
    assert!(spans_in > 0, "{summary}");
    assert_eq!(summary["spans_out"].as_u64(), Some(spans_in), "{summary}");
    assert_eq!(summary["spans_invalid"].as_u64(), Some(0), "{summary}");
    assert_eq!(summary["spans_dropped"].as_u64(), Some(0), "{summary}");
    let records = std::fs::read_to_string(&output).expect("records written");
    assert_eq!(
        Some(records.lines().count() as u64),
        summary["records_out"].as_u64(),
        "{summary}"
    );
}

// ---------------------------------------------------------------------------
// Redis AUTH
// ---------------------------------------------------------------------------

#[test]
fn requirepass_logs_in_with_the_password_and_refuses_a_wrong_one() {
    let server = RedisServer::start();
    // Set after start: the harness's readiness probe logs in without a password.
    // The password holds URL-reserved characters, percent-encoded in the URL.
    let password = "s3cr3t@PW/42:x";
    let encoded = "s3cr3t%40PW%2F42%3Ax";
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(password)
        .query(&mut server.connection())
        .expect("CONFIG SET requirepass");
    let port = server.port();
    let secrets = [password, encoded, WRONG_PASSWORD];

    let url = format!("redis://:{encoded}@127.0.0.1:{port}");
    let out = spanbuf(&["check"], &[("SPANBUF_REDIS_URL", &url)]);
    assert!(out.status.success(), "{}", all_output(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("redis ok (standalone)"));
    assert_no_secret("check", &all_output(&out), &secrets);

    let wrong = format!("redis://:{WRONG_PASSWORD}@127.0.0.1:{port}");
    assert_auth_refused(
        &spanbuf(&["check"], &[("SPANBUF_REDIS_URL", &wrong)]),
        &secrets,
    );

    let none = format!("redis://127.0.0.1:{port}");
    let out = spanbuf(&["check"], &[("SPANBUF_REDIS_URL", &none)]);
    assert_auth_refused(&out, &secrets);
    assert!(all_output(&out).contains("NOAUTH"), "{}", all_output(&out));
}

#[test]
fn readme_acl_user_runs_check_replay_and_inspect_and_nothing_more() {
    let server = start_redis(&acl_user_args());
    let port = server.port();
    let url = format!("redis://spanbuf:{ACL_PASSWORD}@127.0.0.1:{port}");
    let secrets = [ACL_PASSWORD, WRONG_PASSWORD];

    let out = spanbuf(&["check"], &[("SPANBUF_REDIS_URL", &url)]);
    assert!(out.status.success(), "{}", all_output(&out));
    assert_no_secret("check", &all_output(&out), &secrets);

    let wrong = format!("redis://spanbuf:{WRONG_PASSWORD}@127.0.0.1:{port}");
    assert_auth_refused(
        &spanbuf(&["check"], &[("SPANBUF_REDIS_URL", &wrong)]),
        &secrets,
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let input = workload(dir.path(), 40);
    replay_delivers_everything(&input, &[("SPANBUF_REDIS_URL", &url)], &secrets);

    // Leave the spans buffered, so inspect has something to read.
    let out = spanbuf(
        &[
            "replay",
            "--input",
            input.to_str().expect("utf-8 path"),
            "--output",
            dir.path().join("none.ndjson").to_str().expect("utf-8 path"),
            "--no-drain",
        ],
        &[("SPANBUF_REDIS_URL", &url)],
    );
    assert!(out.status.success(), "{}", all_output(&out));
    let out = spanbuf(&["inspect", "--json"], &[("SPANBUF_REDIS_URL", &url)]);
    assert!(out.status.success(), "{}", all_output(&out));
    assert_no_secret("inspect", &all_output(&out), &secrets);
    let report: Value = serde_json::from_slice(&out.stdout).expect("inspect --json is JSON");
    assert!(
        report["totals"]["spans_buffered"].as_u64() > Some(0),
        "{report}"
    );

    assert_acl_log_empty(&server);

    // What the user must not do. The server keeps the buffered data throughout.
    let client = redis::Client::open(url.as_str()).expect("client");
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .expect("the ACL user logs in");
    let refused: [&[&str]; 11] = [
        &["FLUSHALL"],
        &["FLUSHDB"],
        &["KEYS", "*"],
        &["CONFIG", "GET", "requirepass"],
        &["SCRIPT", "FLUSH"],
        &["EVAL", "return 1", "0"],
        &["ACL", "SETUSER", "spanbuf", "+@all"],
        &["CLIENT", "LIST"],
        &["PUBLISH", "channel", "x"],
        &["SHUTDOWN", "NOSAVE"],
        &["SET", "other-app:key", "x"],
    ];
    for command in refused {
        let mut cmd = redis::cmd(command[0]);
        for arg in &command[1..] {
            cmd.arg(*arg);
        }
        let result = cmd.query::<redis::Value>(&mut conn);
        match result {
            Err(err) => assert!(
                err.to_string().to_lowercase().contains("no permissions"),
                "{command:?} should be refused by ACL, got {err}"
            ),
            Ok(reply) => panic!("{command:?} was allowed: {reply:?}"),
        }
    }
    let keys: u64 = redis::cmd("DBSIZE")
        .query(&mut server.connection())
        .expect("DBSIZE");
    assert!(keys > 0, "the buffered keys are still there");
}

#[test]
fn readme_acl_user_replays_through_a_cluster() {
    let cluster = RedisCluster::start();
    let mut setuser = redis::cmd("ACL");
    setuser.arg("SETUSER").arg("spanbuf");
    for rule in readme_acl_rules(ACL_PASSWORD) {
        setuser.arg(rule);
    }
    for node in cluster.nodes() {
        let _: () = setuser
            .query(&mut node.connection())
            .expect("ACL SETUSER on a cluster node");
    }
    let urls: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| format!("redis://spanbuf:{ACL_PASSWORD}@127.0.0.1:{}", n.port()))
        .collect();
    let urls = urls.join(",");
    let vars = [("SPANBUF_REDIS_CLUSTER_URLS", urls.as_str())];

    let out = spanbuf(&["check"], &vars);
    assert!(out.status.success(), "{}", all_output(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("redis ok (cluster)"));
    let dir = tempfile::tempdir().expect("tempdir");
    replay_delivers_everything(&workload(dir.path(), 40), &vars, &[ACL_PASSWORD]);
    let out = spanbuf(&["inspect", "--json"], &vars);
    assert!(out.status.success(), "{}", all_output(&out));
    for node in cluster.nodes() {
        assert_acl_log_empty(node);
    }
}

// ---------------------------------------------------------------------------
// rediss://
// ---------------------------------------------------------------------------

/// A throwaway CA and a server certificate it signed, for `localhost` only.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn generate() -> Certs {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("server.ext"),
            "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write server.ext");
        for command in [
            "req -x509 -newkey rsa:2048 -nodes -days 2 -keyout ca.key -out ca.pem -subj /CN=spanbuf-test-CA",
            "req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost",
            "x509 -req -days 2 -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -extfile server.ext",
        ] {
            let out = Command::new("openssl")
                .args(command.split_whitespace())
                .current_dir(dir.path())
                .output()
                .unwrap_or_else(|e| panic!("running openssl (apt-get install openssl): {e}"));
            assert!(
                out.status.success(),
                "openssl {command}: {}",
                all_output(&out)
            );
        }
        Certs { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

#[test]
fn rediss_verifies_the_server_certificate_and_replays() {
    let certs = Certs::generate();
    // The harness keeps its plain port for the readiness probe; spanbuf is only
    // ever given the TLS port, which speaks nothing but TLS.
    let tls_port = e2e::free_port().to_string();
    let mut args: Vec<String> = vec![
        "--tls-port".into(),
        tls_port.clone(),
        "--tls-cert-file".into(),
        certs.path("server.pem"),
        "--tls-key-file".into(),
        certs.path("server.key"),
        "--tls-ca-cert-file".into(),
        certs.path("ca.pem"),
        "--tls-auth-clients".into(),
        "no".into(),
    ];
    args.extend(acl_user_args());
    let server = start_redis(&args);
    let ca = certs.path("ca.pem");
    let url = format!("rediss://spanbuf:{ACL_PASSWORD}@localhost:{tls_port}");
    let env = |url: &str, trust_ca: bool| {
        let mut vars = vec![
            ("SPANBUF_REDIS_URL", url.to_string()),
            ("SPANBUF_REDIS_TIMEOUT_MS", "3000".to_string()),
        ];
        if trust_ca {
            // rustls-native-certs: this file replaces the system trust store.
            vars.push(("SSL_CERT_FILE", ca.clone()));
        }
        vars
    };

    let trusted = env(&url, true);
    let out = spanbuf(&["check"], &borrowed(&trusted));
    assert!(out.status.success(), "{}", all_output(&out));
    assert_no_secret("check over TLS", &all_output(&out), &[ACL_PASSWORD]);

    let dir = tempfile::tempdir().expect("tempdir");
    replay_delivers_everything(
        &workload(dir.path(), 40),
        &borrowed(&trusted),
        &[ACL_PASSWORD],
    );
    assert_acl_log_empty(&server);

    // Verification is real: an unknown CA, a name the certificate does not carry,
    // and asking to skip verification all fail; plain text on the TLS port too.
    let by_ip = format!("rediss://spanbuf:{ACL_PASSWORD}@127.0.0.1:{tls_port}");
    let insecure = format!("{url}/#insecure");
    let plain = format!("redis://spanbuf:{ACL_PASSWORD}@localhost:{tls_port}");
    let failures = [
        (env(&url, false), "UnknownIssuer"),
        (env(&by_ip, true), "not valid for name"),
        (env(&insecure, true), "insecure"),
        (env(&plain, true), "redis"),
    ];
    for (vars, expected) in failures {
        let out = spanbuf(&["check"], &borrowed(&vars));
        let text = all_output(&out);
        let url = &vars[0].1;
        assert_eq!(out.status.code(), Some(1), "{url}: {text}");
        assert!(
            text.contains(expected),
            "{url}: expected {expected:?} in {text}"
        );
        assert_no_secret("a refused TLS connection", &text, &[ACL_PASSWORD]);
    }
}

// ---------------------------------------------------------------------------
// Secrets never shown
// ---------------------------------------------------------------------------

#[test]
fn config_never_prints_secrets() {
    let secrets = [
        "s3cr3t-PW-url",
        "s3cr3t-PW-node1",
        "s3cr3t-PW-node2",
        "s3cr3t-PW-query",
        "s3cr3t-PW-sasl",
        "s3cr3t-PW-sslkey",
        "s3cr3t-PW-oauth",
    ];
    let good = [
        ("SPANBUF_REDIS_URL", "rediss://spanbuf:s3cr3t-PW-url@redis.internal:6380/0"),
        (
            "SPANBUF_REDIS_CLUSTER_URLS",
            "redis://spanbuf:s3cr3t-PW-node1@a:7000, rediss://:s3cr3t-PW-node2@b:7001,redis://c:7002?password=s3cr3t-PW-query",
        ),
        ("SPANBUF_KAFKA_PROP_SECURITY_PROTOCOL", "SASL_PLAINTEXT"),
        ("SPANBUF_KAFKA_PROP_SASL_USERNAME", "spanbuf-user"),
        ("SPANBUF_KAFKA_PROP_SASL_PASSWORD", "s3cr3t-PW-sasl"),
        ("SPANBUF_KAFKA_CONSUMER_PROP_SSL_KEY_PASSWORD", "s3cr3t-PW-sslkey"),
        (
            "SPANBUF_KAFKA_PRODUCER_PROP_SASL_OAUTHBEARER_CLIENT_SECRET",
            "s3cr3t-PW-oauth",
        ),
    ];
    let out = spanbuf(&["config"], &good);
    let text = all_output(&out);
    assert!(out.status.success(), "{text}");
    assert_no_secret("spanbuf config", &text, &secrets);
    // What is not secret is still shown, and the secrets show as ***.
    for shown in [
        "spanbuf:***@redis.internal:6380/0",
        "spanbuf:***@a:7000",
        ":***@b:7001",
        "password=***",
        "spanbuf-user",
        "SASL_PLAINTEXT",
    ] {
        assert!(text.contains(shown), "{shown} not in {text}");
    }

    // Rejected values are quoted in the errors, still without their secrets.
    let bad = [
        (
            "SPANBUF_REDIS_URL",
            "redis://spanbuf:s3cr3t-PW-url@redis.internal:99999",
        ),
        // An unencoded @ in a password: everything before the last @ is hidden.
        (
            "SPANBUF_REDIS_CLUSTER_URLS",
            "redis://:s3cr3t-PW-node1@a:7000,redis://u:s3cr3t-PW-node2@x@b:99999",
        ),
        ("SPANBUF_KAFKA_PROP_SASL_PASSWORD", "s3cr3t-PW-sasl"),
        ("SPANBUF_TIMEOUT_SECS", "soon"),
    ];
    let out = spanbuf(&["config"], &bad);
    let text = all_output(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    for var in ["SPANBUF_REDIS_URL", "SPANBUF_REDIS_CLUSTER_URLS"] {
        assert!(text.contains(var), "{var} not named in {text}");
    }
    assert_no_secret("config errors", &text, &secrets);
}

/// The stderr of a child, read as it comes so a chatty child never blocks on a
/// full pipe.
struct Captured {
    bytes: Arc<Mutex<Vec<u8>>>,
    reader: JoinHandle<()>,
}

impl Captured {
    fn stderr_of(worker: &mut Worker) -> Captured {
        let mut stderr = worker.child.stderr.take().expect("stderr is piped");
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&bytes);
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n @ 1..) = stderr.read(&mut buf) {
                sink.lock()
                    .expect("stderr buffer")
                    .extend_from_slice(&buf[..n]);
            }
        });
        Captured { bytes, reader }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().expect("stderr buffer")).into_owned()
    }

    fn contains(&self, needle: &str) -> bool {
        self.text().contains(needle)
    }

    /// Everything, once the child has exited and the pipe is closed.
    fn finish(self) -> String {
        let Captured { bytes, reader } = self;
        reader.join().expect("stderr reader");
        let bytes = bytes.lock().expect("stderr buffer");
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// `/metrics`, `/health` and `/ready` bodies (status line included).
fn endpoints(worker: &Worker) -> String {
    ["/metrics", "/health", "/ready"]
        .iter()
        .map(|path| match worker.get(path) {
            Some((status, body)) => format!("{path} {status}\n{body}\n"),
            None => format!("{path} unreachable\n"),
        })
        .collect()
}

#[test]
fn worker_logs_and_http_endpoints_never_show_secrets() {
    let broker = Broker::start();
    e2e::topics(&broker);
    let server = start_redis(&acl_user_args());
    let port = server.port();
    let secrets = [ACL_PASSWORD, WRONG_PASSWORD, KAFKA_PASSWORD];
    let common = |redis_url: String| {
        vec![
            ("SPANBUF_REDIS_URL", redis_url),
            ("SPANBUF_LOG_LEVEL", "debug".to_string()),
            ("SPANBUF_KAFKA_PROP_SASL_USERNAME", "spanbuf".to_string()),
            (
                "SPANBUF_KAFKA_PROP_SASL_PASSWORD",
                KAFKA_PASSWORD.to_string(),
            ),
            // librdkafka's own debug output, its configuration dump included.
            ("SPANBUF_KAFKA_PROP_DEBUG", "all".to_string()),
        ]
    };

    // 1. A wrong Redis password: no retry can cure it, so the worker exits at
    // once (exit 1) saying why, and shows no password.
    let mut worker = Worker::start_with(
        &broker,
        &common(format!("redis://spanbuf:{WRONG_PASSWORD}@127.0.0.1:{port}")),
    );
    let stderr = Captured::stderr_of(&mut worker);
    let status = worker.wait_exit(Duration::from_secs(30));
    let log = stderr.finish();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("refused the credentials"), "{log}");
    assert!(log.contains("authentication failed"), "{log}");
    assert_no_secret("the log of a refused login", &log, &secrets);

    // 2. The ACL user, spans flowing end to end, a SASL password configured.
    let mut worker = Worker::start_with(
        &broker,
        &common(format!("redis://spanbuf:{ACL_PASSWORD}@127.0.0.1:{port}")),
    );
    let stderr = Captured::stderr_of(&mut worker);
    let mut output = e2e::Output::new(&broker);
    let (lines, expected) = e2e::spans(0);
    e2e::produce(&broker, &lines);
    output.read_until(&expected, 0, Duration::from_secs(90));
    assert_eq!(output.claimed(), expected);
    let http = endpoints(&worker);
    assert!(http.contains("/ready 200"), "{http}");
    assert!(http.contains("spanbuf_assigned_partitions"), "{http}");
    let (code, _) = worker.terminate();
    let log = stderr.finish();
    assert_eq!(code, Some(0), "{log}");
    // Debug logging was on, librdkafka's configuration dump included.
    assert!(log.contains("sasl.password = [redacted]"), "{log}");
    assert_no_secret("/metrics, /health, /ready", &http, &secrets);
    assert_no_secret("the worker's log", &log, &secrets);
    assert_acl_log_empty(&server);

    // 3. SASL/PLAIN to a broker that is not there: librdkafka's errors are logged.
    let mut vars = common(format!("redis://spanbuf:{ACL_PASSWORD}@127.0.0.1:{port}"));
    vars.extend([
        (
            "SPANBUF_KAFKA_BROKERS",
            format!("127.0.0.1:{}", e2e::free_port()),
        ),
        (
            "SPANBUF_KAFKA_PROP_SECURITY_PROTOCOL",
            "SASL_PLAINTEXT".to_string(),
        ),
        ("SPANBUF_KAFKA_PROP_SASL_MECHANISM", "PLAIN".to_string()),
    ]);
    let mut worker = Worker::start_with(&broker, &vars);
    let stderr = Captured::stderr_of(&mut worker);
    e2e::wait_for(
        "librdkafka's connection errors",
        Duration::from_secs(30),
        || stderr.contains("librdkafka"),
    );
    let http = endpoints(&worker);
    let (code, _) = worker.terminate();
    let log = stderr.finish();
    assert!(code.is_some(), "{log}");
    assert_no_secret("/metrics, /health, /ready", &http, &secrets);
    assert_no_secret("the log of an unreachable broker", &log, &secrets);

    // 4. SASL_SSL with SCRAM (this build has OpenSSL): the client is created
    // and tries to connect; the configuration is not refused.
    let mut vars = common(format!("redis://spanbuf:{ACL_PASSWORD}@127.0.0.1:{port}"));
    vars.extend([
        (
            "SPANBUF_KAFKA_BROKERS",
            format!("127.0.0.1:{}", e2e::free_port()),
        ),
        (
            "SPANBUF_KAFKA_PROP_SECURITY_PROTOCOL",
            "SASL_SSL".to_string(),
        ),
        (
            "SPANBUF_KAFKA_PROP_SASL_MECHANISM",
            "SCRAM-SHA-512".to_string(),
        ),
    ]);
    let mut worker = Worker::start_with(&broker, &vars);
    let stderr = Captured::stderr_of(&mut worker);
    e2e::wait_for("a TLS connection attempt", Duration::from_secs(30), || {
        stderr.contains("sasl_ssl://")
    });
    let (code, _) = worker.terminate();
    let log = stderr.finish();
    assert!(code.is_some(), "{log}");
    for refusal in [
        "not available at build time",
        "No provider for SASL mechanism",
    ] {
        assert!(!log.contains(refusal), "{refusal}: {log}");
    }
    assert_no_secret("the log of a SASL_SSL client", &log, &secrets);
}
