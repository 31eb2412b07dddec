//! In-batch grouping (docs/design.md §5 step 2): spans of one batch → subsegments.
//!
//! Follows effective parents inside the batch so that each subsegment is a
//! flat list of spans under its top-most known parent, keyed by
//! `(project_id:trace_id, parent)`. Pure logic: no I/O, no Redis knowledge.
//! A segment root (no parent, or `is_segment`) always heads its own
//! subsegment; spans of different projects never share one, even in one trace.

use std::collections::HashMap;

use blake2::digest::consts::U16;
use blake2::{Blake2b, Digest};

use crate::span::Span;

/// A span with the shard (Kafka partition) it was consumed from.
#[derive(Debug, Clone)]
pub struct ShardedSpan {
    pub shard: u32,
    pub span: Span,
}

/// A flat set of spans under one parent, written to Redis as one payload set.
#[derive(Debug, Clone, PartialEq)]
pub struct Subsegment {
    pub project_id: u64,
    pub trace_id: String,
    /// The top-most parent known inside the batch.
    pub parent: String,
    /// Indexes into the batch, in the order the spans joined.
    pub spans: Vec<usize>,
    /// Shard of the subsegment's first span (its queue).
    pub shard: u32,
}

impl Subsegment {
    /// `project_id:trace_id`.
    pub fn pt(&self) -> String {
        format!("{}:{}", self.project_id, self.trace_id)
    }

    /// 32 hex: BLAKE2b-128 of the span ids in order, so the same subsegment
    /// always lands in the same payload set (idempotent re-ingest).
    pub fn salt(&self, batch: &[ShardedSpan]) -> String {
        let mut hasher = Blake2b::<U16>::new();
        for &i in &self.spans {
            hasher.update(batch[i].span.span_id.as_bytes());
        }
        hex::encode(hasher.finalize())
    }

    /// Whether the subsegment contains its segment's root span.
    pub fn has_segment_span(&self, batch: &[ShardedSpan]) -> bool {
        self.spans.iter().any(|&i| batch[i].span.is_segment_span)
    }
}

type TreeKey = (u64, String, String);

/// Spans per `add_buffer` call at most: a larger subsegment (a hot trace's
/// flood within one window) is written as parts of this many spans under
/// the same parent, so that each script call is short work for Redis, which
/// runs it while every other client waits.
pub const MAX_SUBSEGMENT_SPANS: usize = 1000;

/// Splits every subsegment of more than `max` spans into parts of at most
/// `max`, in order, under the same parent. Deterministic, so a batch read
/// again splits the same way (same salts).
pub fn split_large(subsegments: Vec<Subsegment>, max: usize) -> Vec<Subsegment> {
    let max = max.max(1);
    let mut out = Vec::with_capacity(subsegments.len());
    for sub in subsegments {
        if sub.spans.len() <= max {
            out.push(sub);
            continue;
        }
        for part in sub.spans.chunks(max) {
            out.push(Subsegment {
                spans: part.to_vec(),
                ..sub.clone()
            });
        }
    }
    out
}

/// Groups a batch into subsegments, in first-seen order of their keys.
pub fn group(batch: &[ShardedSpan]) -> Vec<Subsegment> {
    // Trees in insertion order; a tree absorbed into another leaves `None`.
    let mut trees: Vec<Option<Subsegment>> = Vec::new();
    let mut index: HashMap<TreeKey, usize> = HashMap::new();
    // (project, trace, span id) → the parent it was attached to in this batch.
    let mut redirects: HashMap<TreeKey, String> = HashMap::new();

    for (i, item) in batch.iter().enumerate() {
        let span = &item.span;
        let mut parent = span.effective_parent_id().to_string();
        // Redirects only point upwards, so this terminates; the bound guards
        // against a cycle that malformed input might create.
        for _ in 0..batch.len() {
            match redirects.get(&(span.project_id, span.trace_id.clone(), parent.clone())) {
                Some(next) if *next != parent => parent = next.clone(),
                _ => break,
            }
        }
        let key = (span.project_id, span.trace_id.clone(), parent.clone());
        let slot = *index.entry(key).or_insert_with(|| {
            trees.push(Some(Subsegment {
                project_id: span.project_id,
                trace_id: span.trace_id.clone(),
                parent: parent.clone(),
                spans: Vec::new(),
                shard: item.shard,
            }));
            trees.len() - 1
        });
        if parent != span.span_id {
            // Children that arrived earlier in the batch move under the parent.
            let own = (span.project_id, span.trace_id.clone(), span.span_id.clone());
            if let Some(child_slot) = index.remove(&own) {
                if let Some(children) = trees[child_slot].take() {
                    if let Some(tree) = trees[slot].as_mut() {
                        tree.spans.extend(children.spans);
                    }
                }
            }
            redirects.insert(own, parent);
        }
        if let Some(tree) = trees[slot].as_mut() {
            tree.spans.push(i);
        }
    }
    trees.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_subsegment_is_split_in_order_under_its_parent() {
        let ids: Vec<String> = (1..=7).map(|n| format!("{n:016x}")).collect();
        let mut batch = vec![span(&ids[0], None)];
        for id in &ids[1..] {
            batch.push(span(id, Some(&ids[0])));
        }
        let whole = group(&batch);
        assert_eq!(whole.len(), 1);
        let parts = split_large(whole.clone(), 3);
        assert_eq!(
            parts.iter().map(|p| p.spans.clone()).collect::<Vec<_>>(),
            [vec![0, 1, 2], vec![3, 4, 5], vec![6]]
        );
        assert!(parts.iter().all(|p| p.parent == whole[0].parent));
        assert!(parts[0].has_segment_span(&batch) && !parts[1].has_segment_span(&batch));
        assert_eq!(
            split_large(whole.clone(), 7),
            whole,
            "within the bound: as is"
        );
    }

    const TRACE: &str = "0123456789abcdef0123456789abcdef";

    fn span(id: &str, parent: Option<&str>) -> ShardedSpan {
        span_in(1, id, parent)
    }

    fn span_in(project_id: u64, id: &str, parent: Option<&str>) -> ShardedSpan {
        ShardedSpan {
            shard: 0,
            span: Span {
                trace_id: TRACE.into(),
                span_id: id.into(),
                parent_span_id: parent.map(Into::into),
                project_id,
                is_segment_span: parent.is_none(),
                segment_id: None,
                received: None,
                payload: bytes::Bytes::from_static(b"{}"),
            },
        }
    }

    fn ids(batch: &[ShardedSpan], sub: &Subsegment) -> Vec<String> {
        let mut v: Vec<String> = sub
            .spans
            .iter()
            .map(|&i| batch[i].span.span_id.clone())
            .collect();
        v.sort();
        v
    }

    /// Tree a → b → c, b → d, in every arrival order: always one subsegment
    /// under `a` holding all four spans.
    #[test]
    fn every_order_of_a_small_tree_groups_into_one() {
        let all = [
            span("a", None),
            span("b", Some("a")),
            span("c", Some("b")),
            span("d", Some("b")),
        ];
        let mut orders = vec![vec![0, 1, 2, 3]];
        // all 24 permutations
        let mut perms = Vec::new();
        permute(&mut orders[0], 0, &mut perms);
        orders = perms;
        assert_eq!(orders.len(), 24);
        for order in orders {
            let batch: Vec<ShardedSpan> = order.iter().map(|&i| all[i].clone()).collect();
            let subs = group(&batch);
            assert_eq!(subs.len(), 1, "order {order:?}: {subs:?}");
            assert_eq!(subs[0].parent, "a");
            assert_eq!(ids(&batch, &subs[0]), ["a", "b", "c", "d"]);
            assert!(subs[0].has_segment_span(&batch));
        }
    }

    fn permute(v: &mut Vec<usize>, k: usize, out: &mut Vec<Vec<usize>>) {
        if k == v.len() {
            out.push(v.clone());
            return;
        }
        for i in k..v.len() {
            v.swap(k, i);
            permute(v, k + 1, out);
            v.swap(k, i);
        }
    }

    #[test]
    fn missing_parent_keys_the_subsegment_by_the_parent_id() {
        let batch = [span("c", Some("b")), span("d", Some("c"))];
        let subs = group(&batch);
        assert_eq!(subs.len(), 1);
        assert_eq!(subs[0].parent, "b");
        assert!(!subs[0].has_segment_span(&batch));
    }

    #[test]
    fn nested_segment_root_heads_its_own_subsegment() {
        let mut inner = span("s", Some("a"));
        inner.span.is_segment_span = true;
        let batch = [span("a", None), inner, span("x", Some("s"))];
        let subs = group(&batch);
        assert_eq!(subs.len(), 2);
        assert_eq!(ids(&batch, &subs[0]), ["a"]);
        assert_eq!(subs[1].parent, "s");
        assert_eq!(ids(&batch, &subs[1]), ["s", "x"]);
    }

    #[test]
    fn projects_never_share_a_subsegment() {
        let batch = [span_in(1, "a", None), span_in(2, "b", Some("a"))];
        let subs = group(&batch);
        assert_eq!(subs.len(), 2);
        assert_eq!(subs[1].project_id, 2);
        assert_eq!(subs[1].parent, "a");
    }

    #[test]
    fn known_segment_id_is_the_effective_parent() {
        let mut s = span("c", Some("b"));
        s.span.segment_id = Some("a".into());
        let batch = [s, span("a", None)];
        let subs = group(&batch);
        assert_eq!(subs.len(), 1);
        assert_eq!(subs[0].parent, "a");
    }

    #[test]
    fn salt_is_deterministic_and_order_sensitive() {
        let batch = [span("a", None), span("b", Some("a"))];
        let subs = group(&batch);
        let salt = subs[0].salt(&batch);
        assert_eq!(salt.len(), 32);
        assert!(salt.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(salt, group(&batch)[0].salt(&batch));
        let other = [span("b", Some("a")), span("a", None)];
        assert_ne!(salt, group(&other)[0].salt(&other));
    }

    #[test]
    fn shard_is_the_first_span_shard() {
        let mut a = span("a", None);
        a.shard = 3;
        let mut b = span("b", Some("a"));
        b.shard = 5;
        let subs = group(&[b, a]);
        assert_eq!(subs[0].shard, 5);
    }
}
