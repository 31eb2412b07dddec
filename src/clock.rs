//! The clocks deadlines are set and compared in (docs/design.md §7), one
//! place for all of them: wall time, the live clock of `spanbuf run` and
//! `spanbuf bench`, and the deterministic clock of `spanbuf replay`.
//!
//! Owns only time arithmetic: no I/O, no Redis or Kafka knowledge.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Wall time, epoch milliseconds (0 before 1970, which no machine reports).
pub fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Wall time, epoch seconds.
pub fn wall_secs() -> f64 {
    wall_ms() as f64 / 1000.0
}

/// The live clock: the timestamp of the input being written, carried forward
/// in wall time, so a consumer backlog does not flush segments early and an
/// idle worker still moves on. While a window is staged (not yet in Redis)
/// the clock stays at the window's oldest timestamp: a segment those spans
/// extend must not fall due and flush without them.
#[derive(Debug)]
pub struct LiveClock {
    /// Input timestamp minus wall time when it was taken, milliseconds.
    drift_ms: AtomicI64,
    /// The oldest timestamp of the window in hand, ms; `i64::MAX` when none.
    hold_ms: AtomicI64,
}

impl Default for LiveClock {
    fn default() -> Self {
        Self {
            drift_ms: AtomicI64::new(0),
            hold_ms: AtomicI64::new(i64::MAX),
        }
    }
}

impl LiveClock {
    /// Now, epoch seconds.
    pub fn now(&self) -> f64 {
        self.now_ms() as f64 / 1000.0
    }

    fn now_ms(&self) -> i64 {
        let carried = wall_ms().saturating_add(self.drift_ms.load(Ordering::Relaxed));
        carried.min(self.hold_ms.load(Ordering::Relaxed))
    }

    /// Input with this oldest timestamp is staged: the clock moves to it (or
    /// stays at an older staged one) until [`release`](Self::release).
    pub fn hold(&self, oldest_ms: i64) {
        // Never ahead of wall time: a producer whose clock runs fast must not
        // make every segment fall due at once (docs/design.md §7).
        let oldest_ms = oldest_ms.min(wall_ms());
        let held = self
            .hold_ms
            .fetch_min(oldest_ms, Ordering::Relaxed)
            .min(oldest_ms);
        self.drift_ms.store(held - wall_ms(), Ordering::Relaxed);
    }

    /// The staged input is in Redis (or was dropped, or cannot be written
    /// yet): carry on from its timestamp in wall time, not from the end of
    /// its handling. Whether the clock was held.
    pub fn release(&self) -> bool {
        let held = self.hold_ms.swap(i64::MAX, Ordering::Relaxed);
        if held != i64::MAX {
            self.drift_ms
                .store((held - wall_ms()).min(0), Ordering::Relaxed);
        }
        held != i64::MAX
    }

    /// The clock a window whose oldest input timestamp is `oldest_ms` is
    /// written at: that timestamp, but never ahead of wall time.
    pub fn window_clock(oldest_ms: i64) -> f64 {
        oldest_ms.min(wall_ms()) as f64 / 1000.0
    }
}

/// The replay clock (docs/design.md §7): a line without `received` takes the
/// clock of the line before it; a batch runs at its oldest line clock; the
/// clock never goes backwards. Before any `received` is seen, wall time.
#[derive(Debug, Default)]
pub struct ReplayClock {
    last_line: Option<f64>,
    now: Option<f64>,
}

impl ReplayClock {
    /// The clock of one line.
    pub fn line(&mut self, received: Option<f64>) -> f64 {
        let c = received.or(self.last_line).unwrap_or_else(wall_secs);
        self.last_line = Some(c);
        c
    }

    /// The clock of a batch whose oldest line clock is `batch_min`.
    pub fn batch(&mut self, batch_min: f64) -> f64 {
        let now = self.now.map_or(batch_min, |prev| prev.max(batch_min));
        self.now = Some(now);
        now
    }

    pub fn current(&self) -> f64 {
        self.now.unwrap_or_else(wall_secs)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_live_clock_stays_at_the_window_in_hand_then_carries_on() {
        let clock = LiveClock::default();
        let staged_ms = wall_ms() - 60_000;
        clock.hold(staged_ms);
        assert_eq!(clock.now(), staged_ms as f64 / 1000.0);
        std::thread::sleep(Duration::from_millis(30));
        // A slow window does not move the clock past its own timestamp, and a
        // newer batch joining the window does not either.
        clock.hold(staged_ms + 5_000);
        assert_eq!(clock.now(), staged_ms as f64 / 1000.0);
        clock.release();
        // Released: carried forward in wall time from the window's timestamp.
        let now = clock.now();
        assert!(now >= staged_ms as f64 / 1000.0, "{now}");
        assert!(now < staged_ms as f64 / 1000.0 + 0.025, "{now}");
        std::thread::sleep(Duration::from_millis(30));
        assert!(clock.now() >= now + 0.025);
    }

    #[test]
    fn the_live_clock_is_never_ahead_of_wall_time() {
        let clock = LiveClock::default();
        let future_ms = wall_ms() + 2 * 3600 * 1000;
        clock.hold(future_ms);
        assert!(
            clock.now() <= wall_secs() + 0.001,
            "held at most at wall time"
        );
        clock.release();
        assert!(
            clock.now() <= wall_secs() + 0.001,
            "carried on from wall time"
        );
        assert!(LiveClock::window_clock(future_ms) <= wall_secs() + 0.001);
        let past_ms = wall_ms() - 60_000;
        assert_eq!(LiveClock::window_clock(past_ms), past_ms as f64 / 1000.0);
    }

    #[test]
    fn replay_clock_follows_received_never_backwards() {
        let mut c = ReplayClock::default();
        assert_eq!(c.line(Some(100.0)), 100.0);
        assert_eq!(c.line(None), 100.0);
        assert_eq!(c.line(Some(90.0)), 90.0);
        assert_eq!(c.batch(90.0), 90.0);
        assert_eq!(c.line(Some(80.0)), 80.0);
        assert_eq!(c.batch(80.0), 90.0, "never backwards");
        assert_eq!(c.batch(120.0), 120.0);
        assert_eq!(c.current(), 120.0);
    }
}
