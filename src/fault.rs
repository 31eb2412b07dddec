//! Test-only fault points in the flush path, for the crash and slow-sink
//! tests: compiled in only with the `fault-points` feature, which
//! the crate's own dev-dependency turns on for `cargo test` and which no
//! release build enables. Without the feature every function here is a
//! constant no-op and the `SPANBUF_FAULT_*` variables are rejected by the
//! configuration like any unknown name.
//!
//! - `SPANBUF_FAULT_POINT=after_load|after_deliver|during_cleanup`: the
//!   process SIGKILLs itself at that point of the first flush cycle that has
//!   loaded at least one segment (`during_cleanup`: after the first half of the
//!   cycle's segments were cleaned up).
//! - `SPANBUF_FAULT_POINT=cleanup_reply_lost`: the first cleanup runs in
//!   Redis, then its reply is dropped as a lost connection would.
//! - `SPANBUF_FAULT_DELIVER_DELAY_MS=N`: every delivery waits N ms first (a
//!   slow broker).
//! - `SPANBUF_FAULT_NO_COMMIT=1`: the worker never commits offsets (as if it
//!   crashed after every write to Redis, before its commit).

/// Where in a flush cycle a fault can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// Segments locked and loaded, nothing delivered.
    AfterLoad,
    /// Records acknowledged by the sink, nothing cleaned up.
    AfterDeliver,
    /// Half of the cycle's segments cleaned up.
    DuringCleanup,
    /// The first cleanup ran in Redis but its reply is lost (a dropped
    /// connection): not a crash; the flusher sees a transient failure.
    CleanupReplyLost,
}

impl Point {
    pub fn name(self) -> &'static str {
        match self {
            Point::AfterLoad => "after_load",
            Point::AfterDeliver => "after_deliver",
            Point::DuringCleanup => "during_cleanup",
            Point::CleanupReplyLost => "cleanup_reply_lost",
        }
    }
}

/// Whether the fault at `point` is armed in this process.
#[cfg(feature = "fault-points")]
pub fn armed(point: Point) -> bool {
    std::env::var("SPANBUF_FAULT_POINT").is_ok_and(|v| v == point.name())
}

#[cfg(not(feature = "fault-points"))]
#[inline(always)]
pub fn armed(_point: Point) -> bool {
    false
}

/// SIGKILLs this process (no destructors, no flushes: a crash) if the fault
/// at `point` is armed.
pub fn hit(point: Point) {
    if armed(point) {
        crash(point);
    }
}

/// SIGKILLs this process.
#[cfg(feature = "fault-points")]
pub fn crash(point: Point) {
    tracing::error!(point = point.name(), "fault point: SIGKILL");
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    std::process::abort();
}

#[cfg(not(feature = "fault-points"))]
#[inline(always)]
pub fn crash(_point: Point) {}

/// Whether the fault at `point` is armed and this is its first hit in the
/// process (for faults that are not crashes: they happen once).
#[cfg(feature = "fault-points")]
pub fn first_hit(point: Point) -> bool {
    static HIT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    armed(point) && !HIT.swap(true, std::sync::atomic::Ordering::SeqCst)
}

#[cfg(not(feature = "fault-points"))]
#[inline(always)]
pub fn first_hit(_point: Point) -> bool {
    false
}

/// The delay before each delivery, if one is armed.
#[cfg(feature = "fault-points")]
pub fn deliver_delay() -> Option<std::time::Duration> {
    std::env::var("SPANBUF_FAULT_DELIVER_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(std::time::Duration::from_millis)
}

#[cfg(not(feature = "fault-points"))]
#[inline(always)]
pub fn deliver_delay() -> Option<std::time::Duration> {
    None
}

/// Whether offset commits are switched off: the worker writes windows to
/// Redis and never commits them, like one that crashes after each write,
/// so its successor reads everything again.
#[cfg(feature = "fault-points")]
pub fn no_commit() -> bool {
    std::env::var("SPANBUF_FAULT_NO_COMMIT").is_ok_and(|v| v == "1")
}

#[cfg(not(feature = "fault-points"))]
#[inline(always)]
pub fn no_commit() -> bool {
    false
}

/// Whether `name` is a fault variable this build understands.
pub fn is_fault_var(name: &str) -> bool {
    cfg!(feature = "fault-points")
        && matches!(
            name,
            "SPANBUF_FAULT_POINT" | "SPANBUF_FAULT_DELIVER_DELAY_MS" | "SPANBUF_FAULT_NO_COMMIT"
        )
}
