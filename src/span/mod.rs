//! Span model: what a span is to spanbuf.
//!
//! A span arrives as one JSON object (or the same object in MessagePack) in the
//! `ingest-spans` schema (docs/design.md §2). spanbuf reads only the handful of fields it
//! needs to place the span in a segment and keeps everything else as an opaque
//! JSON payload that it stores in Redis and re-emits at flush.
//!
//! - [`decode`] turns input bytes into a [`Span`] or an [`InvalidSpan`] with a
//!   closed-set reason (the `reason` label of `spanbuf_spans_invalid_total`).
//! - [`compress`] packs payloads into Redis set members and back, in the layout
//!   Sentry's span buffer uses (one zstd frame of `\x00`-joined payloads, or raw
//!   members).
//!
//! This module does no I/O and knows nothing of Redis keys, Kafka or segments
//! beyond a span's effective parent.

pub mod compress;
pub mod decode;
pub mod record;

pub use decode::{decode_span, decode_span_bytes, InvalidReason, InvalidSpan};
pub use record::{build_records, BuiltSegment, FlushedSegment, RecordError, SegmentPayloads};

/// One valid input span: the fields spanbuf reads, plus the payload it stores.
///
/// Ids are kept exactly as received (no case folding), as Sentry does: they end
/// up in Redis keys and in the output unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// `trace_id`: 32 hex characters.
    pub trace_id: String,
    /// `span_id`: 16 hex characters.
    pub span_id: String,
    /// `parent_span_id`: 16 hex characters; `None` when absent or null (a root).
    pub parent_span_id: Option<String>,
    /// `project_id`.
    pub project_id: u64,
    /// True when the span roots a segment: no parent, or `is_segment: true`.
    pub is_segment_span: bool,
    /// `attributes["sentry.segment.id"].value` (16 hex) when known upstream.
    pub segment_id: Option<String>,
    /// `received`: the replay clock, in seconds since the epoch.
    pub received: Option<f64>,
    /// The span as JSON bytes, as stored in Redis. For JSON input these are the
    /// input bytes untouched; MessagePack input is re-encoded as JSON. Never
    /// contains a NUL byte (the separator of compressed members).
    pub payload: bytes::Bytes,
}

impl Span {
    /// docs/design.md §2: own id if a root, else the known segment id, else the parent id.
    pub fn effective_parent_id(&self) -> &str {
        if self.is_segment_span {
            return &self.span_id;
        }
        self.segment_id
            .as_deref()
            .or(self.parent_span_id.as_deref())
            .unwrap_or(&self.span_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(parent: Option<&str>, segment: Option<&str>, is_segment_span: bool) -> Span {
        Span {
            trace_id: "a".repeat(32),
            span_id: "1111111111111111".to_owned(),
            parent_span_id: parent.map(str::to_owned),
            project_id: 1,
            is_segment_span,
            segment_id: segment.map(str::to_owned),
            received: None,
            payload: bytes::Bytes::new(),
        }
    }

    #[test]
    fn effective_parent_of_root_is_own_id() {
        assert_eq!(
            span(None, None, true).effective_parent_id(),
            "1111111111111111"
        );
    }

    #[test]
    fn effective_parent_of_marked_segment_is_own_id_despite_parent_and_segment_id() {
        let s = span(Some("2222222222222222"), Some("3333333333333333"), true);
        assert_eq!(s.effective_parent_id(), "1111111111111111");
    }

    #[test]
    fn effective_parent_prefers_known_segment_id_over_parent() {
        let s = span(Some("2222222222222222"), Some("3333333333333333"), false);
        assert_eq!(s.effective_parent_id(), "3333333333333333");
    }

    #[test]
    fn effective_parent_falls_back_to_parent_id() {
        let s = span(Some("2222222222222222"), None, false);
        assert_eq!(s.effective_parent_id(), "2222222222222222");
    }

    #[test]
    fn effective_parent_without_parent_or_segment_is_own_id() {
        // Not produced by decode_span (no parent implies a root), but the method
        // must still answer something sensible for a hand-built span.
        assert_eq!(
            span(None, None, false).effective_parent_id(),
            "1111111111111111"
        );
    }
}
