//! Key builders for the Redis layout of docs/design.md §4 (Sentry-compatible).
//!
//! Owns every key name spanbuf reads or writes; no other module formats a key.
//! Must not talk to Redis. Everything a segment owns shares the `{pt}` hash tag
//! (`pt` = `project_id:trace_id`) so one Lua call can change it atomically in
//! standalone Redis and Redis Cluster alike; payload sets use `{pt:salt}` so a
//! big trace spreads over the cluster.

/// Builds key names under one prefix (`SPANBUF_KEY_PREFIX`).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    slice_id: Option<u32>,
}

/// The parts of a segment key `P:s:{project:trace}:root`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentRef {
    pub project_id: u64,
    pub trace_id: String,
    /// The segment's root span id, or the salt of a detached segment.
    pub root: String,
}

/// The keys of one segment and of its trace that the flush scripts touch
/// (all in the `{pt}` slot).
#[derive(Debug, Clone)]
pub struct SegmentKeys {
    pub member_keys: String,
    pub ingested_count: String,
    pub ingested_bytes: String,
    pub has_root: String,
    pub first_seen: String,
    pub cut_from: String,
    pub flush_lock: String,
    pub redirects: String,
    pub delivered: String,
}

impl SegmentKeys {
    /// The `KEYS` of `flush_load` and `flush_done`, in their headers' order.
    pub fn all(&self) -> [&str; 9] {
        [
            &self.member_keys,
            &self.ingested_count,
            &self.ingested_bytes,
            &self.has_root,
            &self.first_seen,
            &self.cut_from,
            &self.flush_lock,
            &self.redirects,
            &self.delivered,
        ]
    }
}

impl Keys {
    pub fn new(prefix: impl Into<String>, slice_id: Option<u32>) -> Self {
        Self {
            prefix: prefix.into(),
            slice_id,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `project_id:trace_id`, the hash tag of a trace's segment keys.
    pub fn pt(project_id: u64, trace_id: &str) -> String {
        format!("{project_id}:{trace_id}")
    }

    /// Payload set of one subsegment: `P:s:{pt:salt}:salt`.
    pub fn payload(&self, pt: &str, salt: &str) -> String {
        format!("{}:s:{{{pt}:{salt}}}:{salt}", self.prefix)
    }

    /// Member-keys index of a segment: `P:mk:{pt}:root`.
    pub fn member_keys(&self, pt: &str, root: &str) -> String {
        format!("{}:mk:{{{pt}}}:{root}", self.prefix)
    }

    /// Redirect map span id → segment root: `P:ssr:{pt}`.
    pub fn redirects(&self, pt: &str) -> String {
        format!("{}:ssr:{{{pt}}}", self.prefix)
    }

    /// spanbuf's own: span ids the trace delivered recently, each followed by
    /// a comma: `P:dl:{pt}` (docs/design.md §6, the delivered record).
    pub fn delivered(&self, pt: &str) -> String {
        format!("{}:dl:{{{pt}}}", self.prefix)
    }

    /// spanbuf's own: a key in the trace's slot that nothing ever writes,
    /// `P:guard:{pt}`. `add_buffer` declares it beside the redirect map: a
    /// call that declares a missing key is refused while its slot migrates
    /// (ASK, then TRYAGAIN on the importing node), so the script never runs
    /// against a trace whose keys are half moved (docs/design.md §4).
    pub fn guard(&self, pt: &str) -> String {
        format!("{}:guard:{{{pt}}}", self.prefix)
    }

    /// Every key the per-segment flush scripts touch, for their `KEYS`.
    pub fn segment_keys(&self, pt: &str, root: &str) -> SegmentKeys {
        let segment = self.segment(pt, root);
        SegmentKeys {
            member_keys: self.member_keys(pt, root),
            ingested_count: self.ingested_count(&segment),
            ingested_bytes: self.ingested_bytes(&segment),
            has_root: self.has_root(&segment),
            first_seen: self.first_seen(&segment),
            cut_from: self.cut_from(&segment),
            flush_lock: self.flush_lock(&segment),
            redirects: self.redirects(pt),
            delivered: self.delivered(pt),
        }
    }

    /// Segment key `P:s:{pt}:root`: queue member and suffix of the metadata keys.
    pub fn segment(&self, pt: &str, root: &str) -> String {
        format!("{}:s:{{{pt}}}:{root}", self.prefix)
    }

    /// A per-segment key `P:<kind>:<segment key>`.
    fn meta(&self, kind: &str, segment_key: &str) -> String {
        format!("{}:{kind}:{segment_key}", self.prefix)
    }

    /// `"1"` once the segment has seen its root span.
    pub fn has_root(&self, segment_key: &str) -> String {
        self.meta("hrs", segment_key)
    }

    /// Spans ingested into the segment.
    pub fn ingested_count(&self, segment_key: &str) -> String {
        self.meta("ic", segment_key)
    }

    /// Payload bytes ingested into the segment.
    pub fn ingested_bytes(&self, segment_key: &str) -> String {
        self.meta("ibc", segment_key)
    }

    /// Flush lock; value = the flusher's token.
    pub fn flush_lock(&self, segment_key: &str) -> String {
        self.meta("fl", segment_key)
    }

    /// spanbuf's own: first-seen time of the segment (lifetime cap).
    pub fn first_seen(&self, segment_key: &str) -> String {
        self.meta("fs", segment_key)
    }

    /// spanbuf's own: on a detached segment, the root id it was cut from.
    pub fn cut_from(&self, segment_key: &str) -> String {
        self.meta("cut", segment_key)
    }

    /// spanbuf's own: the marker whose disappearance tells that Redis lost
    /// its data (restarted without persistence, flushed, or evicting).
    pub fn marker(&self) -> String {
        format!("{}:marker", self.prefix)
    }

    /// Flush queue of one shard: `P:q:shard`, or `P:q:slice-shard` with a slice id.
    pub fn queue(&self, shard: u32) -> String {
        match self.slice_id {
            Some(slice) => format!("{}:q:{slice}-{shard}", self.prefix),
            None => format!("{}:q:{shard}", self.prefix),
        }
    }

    /// Parses a segment key built by [`Keys::segment`]; `None` for anything else.
    pub fn parse_segment(&self, segment_key: &str) -> Option<SegmentRef> {
        let rest = segment_key
            .strip_prefix(&self.prefix)?
            .strip_prefix(":s:{")?;
        let (tag, root) = rest.split_once("}:")?;
        let (project, trace_id) = tag.split_once(':')?;
        if root.is_empty() || trace_id.is_empty() || root.contains(':') {
            return None;
        }
        Some(SegmentRef {
            project_id: project.parse().ok()?,
            trace_id: trace_id.to_string(),
            root: root.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn layout_matches_design() {
        let keys = Keys::new("span-buf", None);
        let pt = Keys::pt(7, TRACE);
        assert_eq!(pt, format!("7:{TRACE}"));
        assert_eq!(
            keys.payload(&pt, "ab"),
            format!("span-buf:s:{{7:{TRACE}:ab}}:ab")
        );
        assert_eq!(
            keys.member_keys(&pt, "r"),
            format!("span-buf:mk:{{7:{TRACE}}}:r")
        );
        assert_eq!(keys.redirects(&pt), format!("span-buf:ssr:{{7:{TRACE}}}"));
        let seg = keys.segment(&pt, "r");
        assert_eq!(seg, format!("span-buf:s:{{7:{TRACE}}}:r"));
        assert_eq!(keys.has_root(&seg), format!("span-buf:hrs:{seg}"));
        assert_eq!(keys.ingested_count(&seg), format!("span-buf:ic:{seg}"));
        assert_eq!(keys.ingested_bytes(&seg), format!("span-buf:ibc:{seg}"));
        assert_eq!(keys.flush_lock(&seg), format!("span-buf:fl:{seg}"));
        assert_eq!(keys.queue(3), "span-buf:q:3");
        assert_eq!(Keys::new("x", Some(2)).queue(3), "x:q:2-3");
    }

    #[test]
    fn same_slot_for_segment_keys() {
        use redis::cluster_routing::Slot;
        let keys = Keys::new("span-buf", None);
        let pt = Keys::pt(1, TRACE);
        let seg = keys.segment(&pt, "aaaaaaaaaaaaaaaa");
        let slot = Slot::for_key(&pt);
        for key in [
            keys.member_keys(&pt, "aaaaaaaaaaaaaaaa"),
            keys.redirects(&pt),
            seg.clone(),
            keys.ingested_count(&seg),
            keys.flush_lock(&seg),
            keys.first_seen(&seg),
            keys.guard(&pt),
            keys.segment_keys(&pt, "aaaaaaaaaaaaaaaa").delivered,
        ] {
            assert_eq!(Slot::for_key(&key), slot, "{key}");
        }
    }

    #[test]
    fn parse_round_trip() {
        let keys = Keys::new("span-buf", None);
        let seg = keys.segment(&Keys::pt(42, TRACE), "00000000000000aa");
        assert_eq!(
            keys.parse_segment(&seg),
            Some(SegmentRef {
                project_id: 42,
                trace_id: TRACE.into(),
                root: "00000000000000aa".into()
            })
        );
        assert_eq!(keys.parse_segment("other:s:{1:t}:r"), None);
        assert_eq!(keys.parse_segment("span-buf:s:{x:t}:r"), None);
        assert_eq!(keys.parse_segment("span-buf:s:{1:t}:"), None);
    }
}
