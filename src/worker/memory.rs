//! Hard backpressure: whether the next coalescing window could push a Redis
//! primary over `SPANBUF_MAX_REDIS_MEMORY_PERCENT` of its `maxmemory`.
//!
//! A sample of `INFO memory` alone is not enough: between two samples the
//! worker may write several windows of up to `SPANBUF_WINDOW_MAX_BYTES` each,
//! and a Redis with `maxmemory-policy noeviction` refuses the write that
//! crosses the limit (an OOM error, the window retried until flushing frees
//! memory). So the check projects: the last sample, plus what this worker
//! wrote since, plus what one more window can add ([`window_cost`]). Near the
//! limit the sample is refreshed more often, so the pause lifts soon after
//! flushing frees memory.
//!
//! What other workers of the fleet write between two samples is not known
//! here; each keeps room for its own window.

use std::time::{Duration, Instant};

use crate::ingest::window::WindowBounds;

/// How often Redis memory is read.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);
/// How often it is read while the projection is over the threshold.
const CHECK_EVERY_NEAR: Duration = Duration::from_millis(200);
/// Redis memory a buffered span costs beside its payload: its redirect
/// entry, its payload set member and its share of the segment's keys, with
/// the allocator's rounding (measured well below this on the bench workload).
pub const SPAN_OVERHEAD_BYTES: u64 = 256;

/// The most one window can add to Redis memory while it is written: its
/// payloads stored (compressed, at most their raw size) and in transit (the
/// request sits in the client's query buffer), and the per-span keys.
pub fn window_cost(bounds: &WindowBounds) -> u64 {
    2 * bounds.max_bytes as u64 + bounds.max_spans as u64 * SPAN_OVERHEAD_BYTES
}

/// What a window just written adds at most.
pub fn written_cost(spans: usize, payload_bytes: usize) -> u64 {
    payload_bytes as u64 + spans as u64 * SPAN_OVERHEAD_BYTES
}

/// The last memory sample and what was written since.
#[derive(Debug)]
pub struct MemoryWatch {
    /// `(used_memory, maxmemory)` per primary; `maxmemory` 0 = no limit.
    nodes: Vec<(u64, u64)>,
    written_since: u64,
    checked: Option<Instant>,
    percent: u8,
    reserve: u64,
}

impl MemoryWatch {
    /// Pauses above `percent` % of maxmemory (0 = never), keeping `reserve`
    /// bytes of room for the next window.
    pub fn new(percent: u8, reserve: u64) -> Self {
        Self {
            nodes: Vec::new(),
            written_since: 0,
            checked: None,
            percent,
            reserve,
        }
    }

    /// Whether Redis memory should be read again now.
    pub fn check_due(&self, now: Instant) -> bool {
        let every = if self.over() {
            CHECK_EVERY_NEAR
        } else {
            CHECK_EVERY
        };
        self.checked
            .is_none_or(|at| now.saturating_duration_since(at) >= every)
    }

    /// A new sample (`INFO memory` of every primary).
    pub fn sampled(&mut self, nodes: Vec<(u64, u64)>, now: Instant) {
        self.nodes = nodes;
        self.written_since = 0;
        self.checked = Some(now);
    }

    /// A failed sample: the old one stands, read again at the normal pace.
    pub fn sample_failed(&mut self, now: Instant) {
        self.checked = Some(now);
    }

    /// A window was written: it counts until the next sample.
    pub fn wrote(&mut self, bytes: u64) {
        self.written_since = self.written_since.saturating_add(bytes);
    }

    /// Whether one more window could take a primary with a limit over the
    /// threshold.
    pub fn over(&self) -> bool {
        if self.percent == 0 {
            return false;
        }
        self.nodes.iter().any(|&(used, max)| {
            max > 0 && {
                let projected = used
                    .saturating_add(self.written_since)
                    .saturating_add(self.reserve);
                projected as f64 > max as f64 * f64::from(self.percent) / 100.0
            }
        })
    }

    /// The threshold of the tightest primary less the window reserve: where
    /// consumption pauses, in used_memory bytes (None without a limit).
    pub fn pause_at(percent: u8, reserve: u64, maxmemory: u64) -> Option<u64> {
        (maxmemory > 0 && percent > 0)
            .then(|| (maxmemory as f64 * f64::from(percent) / 100.0) as u64)
            .map(|limit| limit.saturating_sub(reserve))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    #[test]
    fn the_next_window_must_fit_under_the_threshold() {
        let mut watch = MemoryWatch::new(90, 10 * MB);
        let t = Instant::now();
        watch.sampled(vec![(70 * MB, 100 * MB)], t);
        assert!(!watch.over(), "70 + 10 < 90");
        watch.sampled(vec![(81 * MB, 100 * MB)], t);
        assert!(watch.over(), "81 + 10 > 90: the window could cross");
    }

    #[test]
    fn windows_written_since_the_sample_count() {
        let mut watch = MemoryWatch::new(90, 10 * MB);
        let t = Instant::now();
        watch.sampled(vec![(50 * MB, 100 * MB)], t);
        watch.wrote(20 * MB);
        assert!(!watch.over());
        watch.wrote(20 * MB);
        assert!(watch.over(), "50 + 40 + 10 > 90 before any new sample");
        watch.sampled(vec![(60 * MB, 100 * MB)], t);
        assert!(!watch.over(), "a new sample replaces the estimate");
    }

    #[test]
    fn any_primary_with_a_limit_decides_and_zero_disables() {
        let t = Instant::now();
        let mut watch = MemoryWatch::new(90, MB);
        watch.sampled(vec![(10 * MB, 0), (95 * MB, 100 * MB)], t);
        assert!(watch.over());
        watch.sampled(vec![(500 * MB, 0)], t);
        assert!(!watch.over(), "no maxmemory: nothing to project against");
        let mut off = MemoryWatch::new(0, MB);
        off.sampled(vec![(99 * MB, 100 * MB)], t);
        assert!(!off.over());
    }

    #[test]
    fn near_the_limit_memory_is_read_more_often() {
        let t = Instant::now();
        let mut watch = MemoryWatch::new(90, MB);
        assert!(watch.check_due(t), "never read");
        watch.sampled(vec![(10 * MB, 100 * MB)], t);
        assert!(!watch.check_due(t + Duration::from_millis(500)));
        assert!(watch.check_due(t + CHECK_EVERY));
        watch.sampled(vec![(95 * MB, 100 * MB)], t);
        assert!(watch.check_due(t + Duration::from_millis(500)));
    }

    #[test]
    fn a_window_costs_its_bytes_twice_and_its_spans() {
        let bounds = WindowBounds {
            max_spans: 1000,
            max_bytes: MB as usize,
            max_age: Duration::from_millis(250),
        };
        assert_eq!(window_cost(&bounds), 2 * MB + 1000 * SPAN_OVERHEAD_BYTES);
        assert_eq!(MemoryWatch::pause_at(90, 10, 1000), Some(890));
        assert_eq!(MemoryWatch::pause_at(90, 10, 0), None);
    }
}
