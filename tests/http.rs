//! The HTTP endpoints against a real server on `127.0.0.1:0`: status codes,
//! bodies and content types of `/metrics`, `/health`, `/ready`, and shutdown
//! on the cancellation token. Requests are plain HTTP/1.1 over a TcpStream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use spanbuf::http::{serve, serve_listener, Health, HttpError};
use spanbuf::metrics::Metrics;

/// Long enough that no loop stalls during a test that is not about stalls.
const NO_STALL: Duration = Duration::from_secs(600);
const DEADLINE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

struct Server {
    addr: SocketAddr,
    health: Arc<Health>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), HttpError>>,
}

async fn start(stall_limit: Duration) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let metrics = Arc::new(Metrics::new().expect("metrics register"));
    let health = Health::new(stall_limit);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve_listener(
        listener,
        metrics,
        Arc::clone(&health),
        shutdown.clone(),
    ));
    Server {
        addr,
        health,
        shutdown,
        task,
    }
}

impl Server {
    /// Cancels the token and expects the server to return Ok in time.
    async fn stop(self) {
        self.shutdown.cancel();
        let served = tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("server stops within the deadline")
            .expect("server task does not panic");
        assert!(served.is_ok(), "{served:?}");
    }
}

struct Reply {
    status: u16,
    content_type: Option<String>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One GET on a fresh connection (`Connection: close`, body read to EOF).
async fn get(addr: SocketAddr, path: &str) -> Reply {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    let mut raw = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut raw))
        .await
        .expect("response within the deadline")
        .expect("read response");
    parse(&String::from_utf8(raw).expect("utf-8 response"))
}

fn parse(raw: &str) -> Reply {
    let (head, body) = raw.split_once("\r\n\r\n").expect("header end");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let content_type = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-type")
            .then(|| value.trim().to_owned())
    });
    Reply {
        status,
        content_type,
        body: body.to_owned(),
    }
}

/// GETs `path` until `done` holds for the reply, or panics at the deadline.
async fn poll_until(addr: SocketAddr, path: &str, done: impl Fn(&Reply) -> bool) -> Reply {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reply = get(addr, path).await;
        if done(&reply) {
            return reply;
        }
        assert!(
            Instant::now() < deadline,
            "{path} still {} after {DEADLINE:?}: {}",
            reply.status,
            reply.body
        );
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test]
async fn metrics_render_with_health_gauges() {
    let server = start(NO_STALL).await;
    server.health.register_loop("consume");
    server.health.set_assigned_partitions(vec![0, 1, 2]);
    server.health.set_backpressure("flush_lag", true);

    let reply = get(server.addr, "/metrics").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.content_type.as_deref(),
        Some("text/plain; version=0.0.4")
    );
    for expected in [
        "spanbuf_spans_consumed_total 0",
        "spanbuf_loop_stall_seconds{loop=\"consume\"}",
        "spanbuf_assigned_partitions 3",
        "spanbuf_backpressure_active{reason=\"flush_lag\"} 1",
        "spanbuf_backpressure_active{reason=\"redis_memory\"} 0",
    ] {
        assert!(reply.body.contains(expected), "{expected}\n{}", reply.body);
    }

    server.health.unregister_loop("consume");
    server.health.set_backpressure("flush_lag", false);
    let reply = get(server.addr, "/metrics").await;
    assert!(!reply.body.contains("loop=\"consume\""), "{}", reply.body);
    assert!(reply
        .body
        .contains("spanbuf_backpressure_active{reason=\"flush_lag\"} 0"));
    server.stop().await;
}

#[tokio::test]
async fn health_is_ok_right_after_registering() {
    let server = start(NO_STALL).await;
    server.health.register_loop("consume");
    server.health.register_loop("flush");

    let reply = get(server.addr, "/health").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.content_type.as_deref(), Some("application/json"));
    let report = reply.json();
    assert_eq!(report["healthy"], true);
    assert_eq!(report["stalled"], serde_json::json!([]));
    assert!(report["loops"]["consume"].is_number(), "{report}");
    assert!(report["loops"]["flush"].is_number(), "{report}");
    server.stop().await;
}

#[tokio::test]
async fn health_turns_503_on_a_stall_and_back_on_progress() {
    let server = start(Duration::from_millis(200)).await;
    server.health.register_loop("consume");
    server.health.register_loop("flush");

    // Only "consume" stalls; "flush" keeps making progress.
    let reply = poll_until(server.addr, "/health", |reply| {
        server.health.progress("flush");
        reply.status == 503
    })
    .await;
    let report = reply.json();
    assert_eq!(report["healthy"], false);
    assert_eq!(
        report["stalled"],
        serde_json::json!(["consume"]),
        "{report}"
    );

    // Progress and probe together, so a slow machine cannot stall the loop
    // again between the two.
    let reply = poll_until(server.addr, "/health", |reply| {
        server.health.progress("consume");
        server.health.progress("flush");
        reply.status == 200
    })
    .await;
    assert_eq!(reply.json()["stalled"], serde_json::json!([]));
    server.stop().await;
}

#[tokio::test]
async fn ready_follows_redis_kafka_partitions_and_backpressure() {
    let server = start(NO_STALL).await;
    let ready = |server: &Server| {
        let addr = server.addr;
        async move { get(addr, "/ready").await }
    };

    let reply = ready(&server).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.json()["ready"], false);

    server.health.set_redis_ok(true);
    assert_eq!(ready(&server).await.status, 503, "kafka not ok yet");
    server.health.set_kafka_ok(true);
    assert_eq!(ready(&server).await.status, 503, "no partitions yet");
    server.health.set_assigned_partitions(vec![4]);
    let reply = ready(&server).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["assigned_partitions"], serde_json::json!([4]));

    server.health.set_backpressure("redis_memory", true);
    let reply = ready(&server).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    let report = reply.json();
    assert_eq!(report["backpressure"], serde_json::json!(["redis_memory"]));
    assert_eq!(report["healthy"], true, "a paused worker is still alive");
    assert_eq!(get(server.addr, "/health").await.status, 200);

    server.health.set_backpressure("redis_memory", false);
    assert_eq!(ready(&server).await.status, 200);
    server.health.set_assigned_partitions(Vec::new());
    assert_eq!(ready(&server).await.status, 503, "all partitions revoked");
    server.stop().await;
}

#[tokio::test]
async fn unknown_path_is_404() {
    let server = start(NO_STALL).await;
    assert_eq!(get(server.addr, "/nope").await.status, 404);
    assert_eq!(get(server.addr, "/").await.status, 404);
    server.stop().await;
}

#[tokio::test]
async fn cancel_stops_the_server() {
    let server = start(NO_STALL).await;
    assert_eq!(get(server.addr, "/health").await.status, 200);
    let addr = server.addr;
    server.stop().await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "listener still accepts after shutdown"
    );
}

#[tokio::test]
async fn idle_keep_alive_connection_does_not_block_shutdown() {
    let server = start(NO_STALL).await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    let request = format!("GET /health HTTP/1.1\r\nHost: {}\r\n\r\n", server.addr);
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(DEADLINE, stream.read(&mut buf))
        .await
        .expect("response within the deadline")
        .expect("read response");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // The connection stays open (keep-alive) while the server shuts down.
    server.stop().await;
    drop(stream);
}

#[tokio::test]
async fn half_sent_request_does_not_block_shutdown() {
    let server = start(NO_STALL).await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write partial request");
    // Connections are accepted in order, so once a second one is answered
    // the server holds the half-sent request. Hyper waits for it to
    // complete; the drain limit (5 s) ends the wait.
    assert_eq!(get(server.addr, "/health").await.status, 200);
    server.stop().await;
    drop(stream);
}

#[tokio::test]
async fn serve_names_the_address_it_cannot_bind() {
    let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = taken.local_addr().expect("local addr");
    let metrics = Arc::new(Metrics::new().expect("metrics register"));
    let error = serve(
        addr,
        metrics,
        Health::new(NO_STALL),
        CancellationToken::new(),
    )
    .await
    .expect_err("address in use");
    assert!(matches!(error, HttpError::Bind { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains(&addr.to_string()), "{message}");
    assert!(std::error::Error::source(&error).is_some());
}
