//! Coalescing windows (docs/design.md §5): consumed spans staged in memory
//! and written to Redis as one unit when the window is full (spans, bytes) or
//! old enough.
//!
//! Input is keyed by trace, so a window that spans several poll batches holds
//! most of a segment's spans and writes them as one subsegment instead of
//! many: fewer script calls, payload sets and commands per span. The window
//! also carries what its writer must do afterwards: the offset to commit per
//! partition (for the Kafka worker) and the oldest timestamp it holds (the
//! clock). Pure bookkeeping: no I/O; the caller writes, commits and drops.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::ShardedSpan;

/// When a window is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowBounds {
    /// Write once this many spans are staged.
    pub max_spans: usize,
    /// Write once this many payload bytes are staged.
    pub max_bytes: usize,
    /// Write once the oldest staged batch is this old.
    pub max_age: Duration,
}

/// What one partition contributed to a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionMark {
    /// The offset to commit once the window is in Redis: one past the last
    /// message staged (valid or not).
    pub next_offset: i64,
    /// The assignment epoch the messages were consumed under: a partition
    /// revoked and assigned again has another, and its staged spans are
    /// dropped (the consumer reads them again from the committed offset).
    pub epoch: u64,
}

/// Spans staged for one write.
#[derive(Debug, Default)]
pub struct Window {
    spans: Vec<ShardedSpan>,
    bytes: usize,
    /// Messages staged, valid or not (invalid ones only move offsets).
    messages: usize,
    opened: Option<Instant>,
    oldest_ms: Option<i64>,
    partitions: BTreeMap<i32, PartitionMark>,
}

impl Window {
    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    pub fn spans(&self) -> &[ShardedSpan] {
        &self.spans
    }

    pub fn span_count(&self) -> usize {
        self.spans.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The oldest input timestamp staged, epoch ms.
    pub fn oldest_ms(&self) -> Option<i64> {
        self.oldest_ms
    }

    /// Per partition, what to commit after the write.
    pub fn partitions(&self) -> &BTreeMap<i32, PartitionMark> {
        &self.partitions
    }

    /// Stages a batch: its valid spans, its oldest timestamp, and for each
    /// partition the offset after its last message (valid or invalid). A
    /// partition staged before under another epoch was revoked and assigned
    /// again meanwhile: what was staged of it is dropped first (the consumer
    /// reads it again from the committed offset). Returns the spans dropped.
    pub fn stage(
        &mut self,
        spans: Vec<ShardedSpan>,
        messages: usize,
        oldest_ms: i64,
        offsets: impl IntoIterator<Item = (i32, PartitionMark)>,
    ) -> usize {
        if messages == 0 {
            return 0;
        }
        let offsets: Vec<(i32, PartitionMark)> = offsets.into_iter().collect();
        let stale: Vec<i32> = offsets
            .iter()
            .filter(|(p, mark)| {
                self.partitions
                    .get(p)
                    .is_some_and(|m| m.epoch != mark.epoch)
            })
            .map(|(p, _)| *p)
            .collect();
        let dropped = self.drop_partitions(&stale);
        self.opened.get_or_insert_with(Instant::now);
        self.oldest_ms = Some(self.oldest_ms.map_or(oldest_ms, |o| o.min(oldest_ms)));
        self.messages += messages;
        self.bytes += spans.iter().map(|s| s.span.payload.len()).sum::<usize>();
        self.spans.extend(spans);
        for (partition, mark) in offsets {
            let entry = self.partitions.entry(partition).or_insert(mark);
            entry.next_offset = entry.next_offset.max(mark.next_offset);
        }
        dropped
    }

    /// Room left before the byte bound.
    pub fn byte_room(&self, bounds: &WindowBounds) -> usize {
        bounds.max_bytes.saturating_sub(self.bytes)
    }

    /// Whether the window is due for writing at `now`.
    pub fn is_due(&self, bounds: &WindowBounds, now: Instant) -> bool {
        !self.is_empty()
            && (self.spans.len() >= bounds.max_spans
                || self.bytes >= bounds.max_bytes
                || self.age(now) >= bounds.max_age)
    }

    /// How long until the age bound makes the window due (zero when it is).
    pub fn due_in(&self, bounds: &WindowBounds, now: Instant) -> Option<Duration> {
        self.opened?;
        Some(bounds.max_age.saturating_sub(self.age(now)))
    }

    /// Room left before the span bound.
    pub fn room(&self, bounds: &WindowBounds) -> usize {
        bounds.max_spans.saturating_sub(self.spans.len())
    }

    fn age(&self, now: Instant) -> Duration {
        self.opened
            .map_or(Duration::ZERO, |o| now.saturating_duration_since(o))
    }

    /// Drops what was staged from partitions this process no longer holds
    /// under the same epoch (`epoch_of` gives the current epoch of a held
    /// partition, `None` when it is not held; a span's shard is its
    /// partition). Returns the spans dropped.
    pub fn drop_revoked(&mut self, epoch_of: impl Fn(i32) -> Option<u64>) -> usize {
        let gone: Vec<i32> = self
            .partitions
            .iter()
            .filter(|(p, mark)| epoch_of(**p) != Some(mark.epoch))
            .map(|(p, _)| *p)
            .collect();
        self.drop_partitions(&gone)
    }

    /// Drops the staged spans and offsets of `gone`; returns the spans dropped.
    fn drop_partitions(&mut self, gone: &[i32]) -> usize {
        if gone.is_empty() {
            return 0;
        }
        let before = self.spans.len();
        if self.partitions.keys().all(|p| gone.contains(p)) {
            self.clear();
            return before;
        }
        for p in gone {
            self.partitions.remove(p);
        }
        self.spans
            .retain(|s| i32::try_from(s.shard).map_or(true, |p| !gone.contains(&p)));
        self.bytes = self.spans.iter().map(|s| s.span.payload.len()).sum();
        before - self.spans.len()
    }

    /// Empties the window for the next one.
    pub fn clear(&mut self) {
        *self = Window::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::Span;

    fn span(shard: u32, id: &str, bytes: usize) -> ShardedSpan {
        ShardedSpan {
            shard,
            span: Span {
                trace_id: "0123456789abcdef0123456789abcdef".into(),
                span_id: id.into(),
                parent_span_id: None,
                project_id: 1,
                is_segment_span: true,
                segment_id: None,
                received: None,
                payload: bytes::Bytes::from(vec![b' '; bytes]),
            },
        }
    }

    const BOUNDS: WindowBounds = WindowBounds {
        max_spans: 3,
        max_bytes: 1000,
        max_age: Duration::from_secs(60),
    };

    fn mark(next_offset: i64, epoch: u64) -> PartitionMark {
        PartitionMark { next_offset, epoch }
    }

    #[test]
    fn due_by_spans_bytes_or_age() {
        let now = Instant::now();
        let mut w = Window::default();
        assert!(!w.is_due(&BOUNDS, now));
        assert_eq!(w.due_in(&BOUNDS, now), None);
        w.stage(
            vec![span(0, "a", 10), span(0, "b", 10)],
            2,
            100,
            [(0, mark(2, 1))],
        );
        assert!(!w.is_due(&BOUNDS, Instant::now()));
        assert_eq!(w.room(&BOUNDS), 1);
        w.stage(vec![span(0, "c", 10)], 1, 50, [(0, mark(3, 1))]);
        assert!(w.is_due(&BOUNDS, Instant::now()), "span bound");
        assert_eq!(w.oldest_ms(), Some(50));
        assert_eq!(w.partitions()[&0], mark(3, 1));

        let mut w = Window::default();
        w.stage(vec![span(0, "a", 1000)], 1, 0, [(0, mark(1, 1))]);
        assert!(w.is_due(&BOUNDS, Instant::now()), "byte bound");

        let mut w = Window::default();
        w.stage(vec![span(0, "a", 1)], 1, 0, [(0, mark(1, 1))]);
        assert!(
            w.is_due(&BOUNDS, Instant::now() + Duration::from_secs(61)),
            "age bound"
        );
        w.clear();
        assert!(w.is_empty());
    }

    #[test]
    fn a_partition_staged_again_under_a_new_epoch_drops_what_it_had() {
        let mut w = Window::default();
        w.stage(
            vec![span(0, "a", 5), span(1, "b", 7)],
            2,
            0,
            [(0, mark(1, 1)), (1, mark(1, 1))],
        );
        // Partition 1 was revoked and assigned again: its old copy goes.
        let dropped = w.stage(vec![span(1, "b", 7)], 1, 0, [(1, mark(1, 2))]);
        assert_eq!(dropped, 1);
        assert_eq!(w.span_count(), 2);
        assert_eq!(w.partitions()[&1], mark(1, 2));
        assert_eq!(w.partitions()[&0], mark(1, 1));
    }

    #[test]
    fn invalid_messages_alone_still_move_offsets() {
        let mut w = Window::default();
        w.stage(Vec::new(), 4, 7, [(2, mark(10, 1))]);
        assert!(!w.is_empty());
        assert_eq!(w.span_count(), 0);
        assert_eq!(w.partitions()[&2].next_offset, 10);
    }

    #[test]
    fn revoked_partitions_are_dropped_uncommitted() {
        let mut w = Window::default();
        w.stage(
            vec![span(0, "a", 5), span(1, "b", 7), span(2, "c", 9)],
            3,
            0,
            [(0, mark(1, 1)), (1, mark(1, 1)), (2, mark(1, 1))],
        );
        // Partition 1 revoked; partition 2 revoked and assigned again.
        let epoch = |p: i32| match p {
            0 => Some(1),
            2 => Some(2),
            _ => None,
        };
        let dropped = w.drop_revoked(epoch);
        assert_eq!(dropped, 2);
        assert_eq!(w.span_count(), 1);
        assert_eq!(w.bytes(), 5);
        assert_eq!(w.partitions().keys().copied().collect::<Vec<_>>(), [0]);
        // Nothing held any more: the window is empty.
        assert_eq!(w.drop_revoked(|_| None), 1);
        assert!(w.is_empty());
    }
}
