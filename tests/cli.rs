//! The `spanbuf` binary as an operator runs it: `spanbuf config` with good and
//! bad environments, and `spanbuf check` against a real Redis.

mod support;

use std::process::{Command, Output};

fn spanbuf(args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spanbuf"));
    cmd.args(args).env_clear();
    if let Ok(path) = std::env::var("PATH") {
        cmd.env("PATH", path);
    }
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().expect("spanbuf runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn config_prints_the_effective_configuration() {
    let out = spanbuf(
        &["config"],
        &[
            (
                "SPANBUF_REDIS_URL",
                "redis://spanbuf:hunter2@redis.internal:6380/0",
            ),
            ("SPANBUF_TIMEOUT_SECS", "90"),
            ("SPANBUF_KAFKA_PROP_SASL_PASSWORD", "kafka-secret"),
            ("SPANBUF_KAFKA_PROP_SECURITY_PROTOCOL", "SASL_SSL"),
        ],
    );
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}, stderr {}",
        out.status,
        text(&out.stderr)
    );
    assert!(stdout.contains("SPANBUF_TIMEOUT_SECS=90\n"), "{stdout}");
    assert!(
        stdout.contains("SPANBUF_ROOT_TIMEOUT_SECS=10\n"),
        "defaults are shown: {stdout}"
    );
    assert!(
        stdout.contains("SPANBUF_REDIS_URL=redis://spanbuf:***@redis.internal:6380/0\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("security.protocol=SASL_SSL")
            || stdout.contains("SECURITY_PROTOCOL=SASL_SSL"),
        "{stdout}"
    );
    for secret in ["hunter2", "kafka-secret"] {
        assert!(!stdout.contains(secret), "{secret} leaked: {stdout}");
        assert!(!text(&out.stderr).contains(secret));
    }
}

#[test]
fn bad_configuration_exits_2_naming_every_bad_variable() {
    let out = spanbuf(
        &["config"],
        &[
            ("SPANBUF_TIMEOUT_SECS", "soon"),
            ("SPANBUF_COMPRESSION_LEVEL", "99"),
            ("SPANBUF_OUTPUT_CODEC", "xml"),
            ("SPANBUF_ROOT_TIMOUT_SECS", "5"),
            ("SPANBUF_REDIS_URL", "http://user:hunter2@host"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let stderr = text(&out.stderr);
    for var in [
        "SPANBUF_TIMEOUT_SECS=\"soon\"",
        "SPANBUF_COMPRESSION_LEVEL=\"99\"",
        "SPANBUF_OUTPUT_CODEC=\"xml\"",
        "SPANBUF_ROOT_TIMOUT_SECS",
        "SPANBUF_REDIS_URL",
    ] {
        assert!(stderr.contains(var), "{var} not named in: {stderr}");
    }
    assert!(
        stderr.contains("SPANBUF_ROOT_TIMEOUT_SECS"),
        "suggests the right name: {stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
    // One line per problem after the heading.
    assert_eq!(
        stderr.lines().filter(|l| l.contains("SPANBUF_")).count(),
        5,
        "{stderr}"
    );
}

#[test]
fn check_reports_redis_and_fails_cleanly_without_it() {
    let server = support::RedisServer::start();
    let out = spanbuf(&["check"], &[("SPANBUF_REDIS_URL", &server.url())]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("redis ok (standalone)"));

    let port = server.port();
    drop(server);
    let out = spanbuf(
        &["check"],
        &[
            ("SPANBUF_REDIS_URL", &format!("redis://127.0.0.1:{port}")),
            ("SPANBUF_REDIS_TIMEOUT_MS", "2000"),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("redis"), "{stderr}");
}
