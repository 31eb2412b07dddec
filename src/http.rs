//! The HTTP endpoints `/metrics`, `/health` and `/ready`, and the shared
//! [`Health`] state they report.
//!
//! This module must not do Redis or Kafka I/O itself: a scrape or a probe
//! never waits on the data path. The worker's loops push their inputs into
//! [`Health`] instead (a loop finished a cycle, Redis answered, Kafka
//! assigned partitions, consumption was paused), and the handlers only read
//! that state.
//!
//! - `/health` is liveness: the process answers and every registered loop
//!   completed a cycle within the stall limit. Nothing else; a Redis outage
//!   is not a reason to restart the process.
//! - `/ready` means "consuming": Redis and Kafka are reachable, at least one
//!   partition is assigned and no backpressure is active. A paused or
//!   unassigned worker is therefore not ready, so a load balancer or
//!   Kubernetes sees it as such, without it being restarted.
//! - `/metrics` copies the health state into its gauges
//!   (`loop_stall_seconds`, `backpressure_active`, `assigned_partitions`),
//!   which makes [`Health`] the only writer of those three, then renders
//!   every metric as Prometheus text.
//!
//! Both probes answer with the JSON [`HealthReport`], 200 or 503.

use std::collections::{BTreeMap, BTreeSet};
use std::future::IntoFuture;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, BACKPRESSURE_REASONS};

/// Content type of the Prometheus text exposition format.
const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// How long in-flight requests may take to finish once shutdown is
/// requested; a client that keeps a request open longer must not hold up
/// the process's exit.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("http: cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("http: cannot read the local address of the listener: {source}")]
    LocalAddr {
        #[source]
        source: io::Error,
    },
    #[error("http: serving on {addr} stopped: {source}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Shared, cheap-to-update process health. Cloned as `Arc` into every loop.
///
/// Updates take a short std mutex and never await, so they are fine to call
/// from async code.
#[derive(Debug)]
pub struct Health {
    stall_limit: Duration,
    state: Mutex<Inner>,
}

/// The mutable part of [`Health`]. Every update is a single assignment, so
/// the state is consistent even after a panic while the lock was held.
#[derive(Debug, Default)]
struct Inner {
    /// Registered loops and when each last made progress.
    loops: BTreeMap<&'static str, Instant>,
    /// Loops unregistered since the last export, whose stall series must
    /// leave `/metrics`.
    retired: BTreeSet<&'static str>,
    redis_ok: bool,
    kafka_ok: bool,
    /// Sorted, without duplicates.
    assigned_partitions: Vec<i32>,
    /// Every reason ever set, with whether it is active now.
    backpressure: BTreeMap<&'static str, bool>,
}

/// What `/health` and `/ready` answer, as JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthReport {
    /// Registered loops and the seconds since each last completed a cycle.
    pub loops: BTreeMap<&'static str, f64>,
    /// Loops whose last progress is older than `stall_limit_seconds`.
    pub stalled: Vec<&'static str>,
    pub stall_limit_seconds: f64,
    pub redis_ok: bool,
    pub kafka_ok: bool,
    pub assigned_partitions: Vec<i32>,
    /// The active backpressure reasons.
    pub backpressure: Vec<&'static str>,
    /// No registered loop is stalled (`/health`).
    pub healthy: bool,
    /// Redis and Kafka ok, a partition assigned, no backpressure (`/ready`).
    pub ready: bool,
}

impl Health {
    /// A loop that has not progressed for longer than `stall_limit` makes
    /// the process unhealthy.
    pub fn new(stall_limit: Duration) -> Arc<Health> {
        Arc::new(Health {
            stall_limit,
            state: Mutex::new(Inner::default()),
        })
    }

    pub fn stall_limit(&self) -> Duration {
        self.stall_limit
    }

    fn state(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock still holds a consistent state (see `Inner`), and
        // health reporting must keep working after an unrelated panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A loop completed a cycle now. `name` is a closed set: "consume",
    /// "flush". An unregistered loop is registered by its first progress, so
    /// a forgotten [`Health::register_loop`] only loses stall detection
    /// before the first cycle.
    pub fn progress(&self, name: &'static str) {
        self.progress_at(name, Instant::now());
    }

    fn progress_at(&self, name: &'static str, at: Instant) {
        let mut state = self.state();
        state.loops.insert(name, at);
        state.retired.remove(name);
    }

    /// Registers a loop so a stall is detected even before its first cycle
    /// (start counts as progress).
    pub fn register_loop(&self, name: &'static str) {
        self.progress(name);
    }

    /// Stops watching a loop, e.g. once it ended on shutdown.
    pub fn unregister_loop(&self, name: &'static str) {
        let mut state = self.state();
        if state.loops.remove(name).is_some() {
            state.retired.insert(name);
        }
    }

    pub fn set_redis_ok(&self, ok: bool) {
        self.state().redis_ok = ok;
    }

    pub fn set_kafka_ok(&self, ok: bool) {
        self.state().kafka_ok = ok;
    }

    /// The partitions currently assigned to this process (the whole set,
    /// after each rebalance).
    pub fn set_assigned_partitions(&self, mut partitions: Vec<i32>) {
        partitions.sort_unstable();
        partitions.dedup();
        self.state().assigned_partitions = partitions;
    }

    /// Consumption is paused (`active`) or resumed for `reason`, one of
    /// [`BACKPRESSURE_REASONS`]: "flush_lag", "redis_memory", "redis_down".
    pub fn set_backpressure(&self, reason: &'static str, active: bool) {
        self.state().backpressure.insert(reason, active);
    }

    pub fn report(&self) -> HealthReport {
        self.report_at(Instant::now())
    }

    fn report_at(&self, now: Instant) -> HealthReport {
        let state = self.state();
        let mut loops = BTreeMap::new();
        let mut stalled = Vec::new();
        for (&name, &last) in &state.loops {
            let since = now.saturating_duration_since(last);
            if since > self.stall_limit {
                stalled.push(name);
            }
            loops.insert(name, since.as_secs_f64());
        }
        let backpressure: Vec<&'static str> = state
            .backpressure
            .iter()
            .filter(|(_, &active)| active)
            .map(|(&reason, _)| reason)
            .collect();
        let healthy = stalled.is_empty();
        let ready = state.redis_ok
            && state.kafka_ok
            && !state.assigned_partitions.is_empty()
            && backpressure.is_empty();
        HealthReport {
            loops,
            stalled,
            stall_limit_seconds: self.stall_limit.as_secs_f64(),
            redis_ok: state.redis_ok,
            kafka_ok: state.kafka_ok,
            assigned_partitions: state.assigned_partitions.clone(),
            backpressure,
            healthy,
            ready,
        }
    }

    /// Copies the state into the gauges it owns: `loop_stall_seconds` for
    /// every registered loop (unregistered loops' series are removed),
    /// `backpressure_active` for every reason, `assigned_partitions`.
    /// `/metrics` calls this before rendering.
    pub fn export_gauges(&self, metrics: &Metrics) {
        let now = Instant::now();
        let mut state = self.state();
        for (&name, &last) in &state.loops {
            metrics
                .loop_stall_seconds
                .with_label_values(&[name])
                .set(now.saturating_duration_since(last).as_secs_f64());
        }
        for name in std::mem::take(&mut state.retired) {
            // Err only means the series was never exported; nothing to remove.
            let _ = metrics.loop_stall_seconds.remove_label_values(&[name]);
        }
        let reasons = BACKPRESSURE_REASONS
            .iter()
            .copied()
            .chain(state.backpressure.keys().copied())
            .collect::<BTreeSet<_>>();
        for reason in reasons {
            let active = state.backpressure.get(reason).copied().unwrap_or(false);
            metrics
                .backpressure_active
                .with_label_values(&[reason])
                .set(i64::from(active));
        }
        let assigned = i64::try_from(state.assigned_partitions.len()).unwrap_or(i64::MAX);
        metrics.assigned_partitions.set(assigned);
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Binds `addr` and serves until `shutdown` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<(), HttpError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    serve_listener(listener, metrics, health, shutdown).await
}

/// Serves on an already bound listener until `shutdown` is cancelled, then
/// lets in-flight requests finish for at most 5 s (`DRAIN_LIMIT`) and returns
/// `Ok`. Idle keep-alive connections close at once; a connection still open
/// after the limit is left to end with the tokio runtime.
pub async fn serve_listener(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<(), HttpError> {
    let addr = listener
        .local_addr()
        .map_err(|source| HttpError::LocalAddr { source })?;
    let app = router(AppState { metrics, health });
    tracing::info!(%addr, "http: serving /metrics /health /ready");
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .into_future();
    let drain_expired = async {
        shutdown.cancelled().await;
        tokio::time::sleep(DRAIN_LIMIT).await;
    };
    tokio::select! {
        served = server => served.map_err(|source| HttpError::Serve { addr, source })?,
        () = drain_expired => {
            tracing::warn!(%addr, limit = ?DRAIN_LIMIT, "http: requests still open after the drain limit; returning, they end with the runtime");
        }
    }
    tracing::info!(%addr, "http: stopped");
    Ok(())
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/health", get(health_handler))
        .route("/ready", get(ready_handler))
        .fallback(not_found)
        .with_state(state)
}

async fn metrics_handler(State(state): State<AppState>) -> Response {
    state.health.export_gauges(&state.metrics);
    match state.metrics.render() {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "http: cannot render metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot render metrics: {e}\n"),
            )
                .into_response()
        }
    }
}

async fn health_handler(State(state): State<AppState>) -> Response {
    let report = state.health.report();
    let status = if report.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &report)
}

async fn ready_handler(State(state): State<AppState>) -> Response {
    let report = state.health.report();
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &report)
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

fn json_response(status: StatusCode, report: &HealthReport) -> Response {
    match serde_json::to_string(report) {
        Ok(json) => (status, [(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "http: cannot encode the health report");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode the health report: {e}\n"),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(10);

    #[test]
    fn fresh_state_is_healthy_but_not_ready() {
        let health = Health::new(LIMIT);
        let report = health.report();
        assert!(report.healthy);
        assert!(!report.ready);
        assert!(report.loops.is_empty());
        assert!(report.stalled.is_empty());
        assert_eq!(report.stall_limit_seconds, 10.0);
    }

    #[test]
    fn a_loop_stalls_past_the_limit_and_recovers_on_progress() {
        let health = Health::new(LIMIT);
        let start = Instant::now();
        health.progress_at("consume", start);
        health.progress_at("flush", start);

        let report = health.report_at(start + LIMIT);
        assert!(report.healthy, "exactly the limit is not a stall");
        assert_eq!(report.loops.len(), 2);

        let later = start + LIMIT + Duration::from_secs(1);
        let report = health.report_at(later);
        assert!(!report.healthy);
        assert_eq!(report.stalled, vec!["consume", "flush"]);
        assert!(report.loops["consume"] > 10.0);

        health.progress_at("flush", later);
        let report = health.report_at(later);
        assert_eq!(report.stalled, vec!["consume"]);

        health.unregister_loop("consume");
        let report = health.report_at(later);
        assert!(report.healthy);
        assert_eq!(report.loops.keys().copied().collect::<Vec<_>>(), ["flush"]);
    }

    #[test]
    fn progress_registers_an_unknown_loop() {
        let health = Health::new(LIMIT);
        health.progress("flush");
        let report = health.report_at(Instant::now() + LIMIT * 2);
        assert_eq!(report.stalled, vec!["flush"]);
    }

    #[test]
    fn ready_needs_redis_kafka_partitions_and_no_backpressure() {
        let health = Health::new(LIMIT);
        health.set_redis_ok(true);
        health.set_kafka_ok(true);
        assert!(!health.report().ready, "no partitions");
        health.set_assigned_partitions(vec![3, 1, 3]);
        let report = health.report();
        assert!(report.ready);
        assert_eq!(report.assigned_partitions, vec![1, 3]);

        health.set_backpressure("flush_lag", true);
        health.set_backpressure("redis_memory", false);
        let report = health.report();
        assert!(!report.ready);
        assert_eq!(report.backpressure, vec!["flush_lag"]);
        assert!(report.healthy, "backpressure is not a liveness problem");

        health.set_backpressure("flush_lag", false);
        assert!(health.report().ready);
        health.set_kafka_ok(false);
        assert!(!health.report().ready);
    }

    #[test]
    fn report_serializes_with_the_documented_fields() {
        let health = Health::new(LIMIT);
        health.register_loop("consume");
        health.set_backpressure("redis_down", true);
        let json = serde_json::to_value(health.report()).expect("report serializes");
        for field in [
            "loops",
            "stalled",
            "stall_limit_seconds",
            "redis_ok",
            "kafka_ok",
            "assigned_partitions",
            "backpressure",
            "healthy",
            "ready",
        ] {
            assert!(json.get(field).is_some(), "{field} missing in {json}");
        }
        assert!(json["loops"]["consume"].is_number());
        assert_eq!(json["backpressure"], serde_json::json!(["redis_down"]));
    }

    #[test]
    fn export_sets_gauges_and_removes_retired_loops() {
        let metrics = Metrics::new().expect("metrics register");
        let health = Health::new(LIMIT);
        health.register_loop("consume");
        health.set_assigned_partitions(vec![0, 1]);
        health.set_backpressure("redis_memory", true);
        health.export_gauges(&metrics);
        let text = metrics.render().expect("render");
        assert!(text.contains("spanbuf_loop_stall_seconds{loop=\"consume\"}"));
        assert!(text.contains("spanbuf_assigned_partitions 2"));
        assert!(text.contains("spanbuf_backpressure_active{reason=\"redis_memory\"} 1"));
        assert!(text.contains("spanbuf_backpressure_active{reason=\"flush_lag\"} 0"));

        health.unregister_loop("consume");
        health.set_backpressure("redis_memory", false);
        health.export_gauges(&metrics);
        let text = metrics.render().expect("render");
        assert!(!text.contains("loop=\"consume\""), "{text}");
        assert!(text.contains("spanbuf_backpressure_active{reason=\"redis_memory\"} 0"));
    }
}
