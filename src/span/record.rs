//! The output record (docs/design.md §3) and how one segment's buffered payloads
//! become records.
//!
//! [`build_records`] turns the decompressed payloads of one segment (or of a
//! part detached from it) into [`FlushedSegment`]s: it drops duplicates and
//! foreign data, edits each span (`is_segment`, the `sentry.segment.id`
//! attribute), splits an oversized segment into chunks and gives every record a
//! deterministic `flush_id`. [`FlushedSegment`] encodes itself as JSON or
//! MessagePack and decodes back (for tests and the audit tool).
//!
//! Spans are never parsed into a `serde_json::Value`: the top level of a span is
//! read as an ordered list of raw `(key, value)` pairs, so key order is kept and
//! every value spanbuf does not edit is re-emitted byte for byte. Only
//! `attributes` is looked into, and rebuilt only when the segment id must be
//! filled in.
//!
//! This module must not do I/O, log or count: the flusher records the returned
//! counts per batch.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;

use blake2::digest::consts::U16;
use blake2::{Blake2b, Digest};
use bytes::Bytes;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{self, SerializeMap, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::OutputCodec;

/// The deepest nesting of containers (the span object itself being level 1)
/// that serde_json's default recursion limit accepts, as in `decode`: ingest
/// accepts nothing deeper, and every codec here handles it without risking the
/// stack.
const MAX_DEPTH: usize = 127;

/// Domain separation of the flush id hash, versioned so a change of the
/// framing can never collide with ids of an older build.
const FLUSH_ID_DOMAIN: &[u8] = b"spanbuf.flush_id.v1";

/// The attribute that names a span's segment.
const SEGMENT_ID_ATTRIBUTE: &str = "sentry.segment.id";

/// One output record (docs/design.md §3). Field names are the contract for both codecs.
///
/// Equality compares spans by their JSON text.
#[derive(Debug, Clone)]
pub struct FlushedSegment {
    /// 32 hex, deterministic (see [`build_records`]).
    pub flush_id: String,
    /// 16 hex: the id every span of the record claims.
    pub segment_id: String,
    /// The project of every span.
    pub project_id: u64,
    /// The trace of every span (also the Kafka key).
    pub trace_id: String,
    /// Each span as JSON, already edited.
    pub spans: Vec<Box<RawValue>>,
    /// True on the chunks of a segment split for size; serialized only when true.
    pub skip_enrichment: bool,
}

impl PartialEq for FlushedSegment {
    fn eq(&self, other: &Self) -> bool {
        self.flush_id == other.flush_id
            && self.segment_id == other.segment_id
            && self.project_id == other.project_id
            && self.trace_id == other.trace_id
            && self.skip_enrichment == other.skip_enrichment
            && self.spans.len() == other.spans.len()
            && self
                .spans
                .iter()
                .zip(&other.spans)
                .all(|(a, b)| a.get() == b.get())
    }
}

impl Eq for FlushedSegment {}

/// Failure to encode or decode a [`FlushedSegment`].
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// serde_json refused the record (not expected for records built here).
    #[error("encoding a flushed segment as json failed")]
    EncodeJson(#[source] serde_json::Error),
    /// A span could not be converted to MessagePack, e.g. nested deeper than
    /// 127 levels in a hand-built record.
    #[error("encoding a flushed segment as msgpack failed")]
    EncodeMsgpack(#[source] rmp_serde::encode::Error),
    /// The bytes are not a JSON flushed segment.
    #[error("decoding a flushed segment from json failed")]
    DecodeJson(#[source] serde_json::Error),
    /// The bytes are not a MessagePack flushed segment, or a span in it has no
    /// JSON equivalent (binary data, a non-string key, a non-finite float).
    #[error("decoding a flushed segment from msgpack failed")]
    DecodeMsgpack(#[source] rmp_serde::decode::Error),
}

impl FlushedSegment {
    /// Number of spans in the record.
    pub fn span_count(&self) -> usize {
        self.spans.len()
    }

    /// `{"flush_id":..,"segment_id":..,"project_id":..,"trace_id":..,"spans":[..]}`,
    /// plus `"skip_enrichment":true` when set; spans embedded verbatim.
    pub fn to_json(&self) -> Result<Vec<u8>, RecordError> {
        let span_bytes: usize = self.spans.iter().map(|s| s.get().len() + 1).sum();
        let mut out = Vec::with_capacity(span_bytes + 192);
        serde_json::to_writer(&mut out, &JsonRecordOut::from(self))
            .map_err(RecordError::EncodeJson)?;
        Ok(out)
    }

    /// The same record as a MessagePack map with the same field names; each
    /// span is converted from its JSON into a map, keeping key order.
    ///
    /// Numbers convert as serde_json reads them: an integer that fits `u64` or
    /// `i64` stays an integer, anything else becomes an `f64`.
    pub fn to_msgpack(&self) -> Result<Vec<u8>, RecordError> {
        let record = MsgpackRecordOut {
            flush_id: &self.flush_id,
            segment_id: &self.segment_id,
            project_id: self.project_id,
            trace_id: &self.trace_id,
            spans: SpansAsMsgpack(&self.spans),
            skip_enrichment: self.skip_enrichment,
        };
        rmp_serde::to_vec_named(&record).map_err(RecordError::EncodeMsgpack)
    }

    /// Encodes with the configured output codec.
    pub fn encode(&self, codec: OutputCodec) -> Result<Vec<u8>, RecordError> {
        match codec {
            OutputCodec::Json => self.to_json(),
            OutputCodec::Msgpack => self.to_msgpack(),
        }
    }
}

/// Decodes a JSON record (unknown fields are refused: this checks the contract).
pub fn from_json(bytes: &[u8]) -> Result<FlushedSegment, RecordError> {
    let record: JsonRecordIn = serde_json::from_slice(bytes).map_err(RecordError::DecodeJson)?;
    Ok(FlushedSegment {
        flush_id: record.flush_id,
        segment_id: record.segment_id,
        project_id: record.project_id,
        trace_id: record.trace_id,
        spans: record.spans,
        skip_enrichment: record.skip_enrichment,
    })
}

/// Decodes a MessagePack record; each span map is converted back to JSON text
/// in its key order (unknown record fields are refused).
pub fn from_msgpack(bytes: &[u8]) -> Result<FlushedSegment, RecordError> {
    let record: MsgpackRecordIn =
        rmp_serde::from_slice(bytes).map_err(RecordError::DecodeMsgpack)?;
    Ok(FlushedSegment {
        flush_id: record.flush_id,
        segment_id: record.segment_id,
        project_id: record.project_id,
        trace_id: record.trace_id,
        spans: record.spans.into_iter().map(|s| s.0).collect(),
        skip_enrichment: record.skip_enrichment,
    })
}

/// The buffered data of one segment, as the flusher loaded it.
#[derive(Debug, Clone, Copy)]
pub struct SegmentPayloads<'a> {
    /// The id spans must claim (for a detached part: the id of the segment it
    /// was cut from).
    pub segment_id: &'a str,
    /// The project of the segment.
    pub project_id: u64,
    /// The trace of the segment.
    pub trace_id: &'a str,
    /// Decompressed span payloads in load order (JSON objects).
    pub payloads: &'a [Bytes],
    /// Deterministic identity of the buffered data being flushed (the flusher
    /// passes segment key + sorted salts).
    pub flush_seed: &'a [u8],
    /// Span ids the trace delivered in earlier flushes, each followed by a
    /// comma (the delivered record, docs/design.md §6); `""` for none.
    pub delivered: &'a str,
}

/// The records of one segment and what was left out of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltSegment {
    /// The records, in order; empty when no payload held a usable span.
    pub records: Vec<FlushedSegment>,
    /// Spans in the records.
    pub spans: usize,
    /// Payloads removed because their span_id was already in this segment,
    /// or was delivered by an earlier flush of the trace (`delivered`).
    pub duplicates: usize,
    /// Payloads that are not a JSON object with a string `span_id` (foreign or
    /// corrupt data), or nested deeper than serde_json's limit: skipped.
    pub unparseable: usize,
    /// Serialized span bytes in the records.
    pub bytes: usize,
    /// Ids of the spans in the records, in record order (cleanup deletes
    /// their redirects).
    pub span_ids: Vec<String>,
}

/// Builds the records of one segment (docs/design.md §3).
///
/// - A payload that is not a JSON object with a string `span_id` is counted in
///   `unparseable`; a `span_id` seen earlier in the segment is counted in
///   `duplicates` (the first one is kept), as is one the trace already
///   delivered (`delivered`: read again from Kafka after its flush).
/// - Each span gets `is_segment` = (`span_id` == segment id), in place or
///   appended, and `attributes["sentry.segment.id"]` =
///   `{"type":"string","value":<segment id>}` unless it already holds a
///   non-empty string value. Everything else is kept byte for byte, in order.
/// - If the spans' serialized sizes sum to at most `max_segment_bytes`, one
///   record; otherwise greedy chunks in order, each within the limit (a larger
///   span alone), all with `skip_enrichment`.
/// - `flush_id` = BLAKE2b-128 over the seed, the chunk index, the number of
///   chunks and the chunk's sorted span ids, each length-prefixed. The span ids
///   make the id name the chunk's content: should a reload return the payloads
///   in another order and cut the chunks differently, a chunk with other spans
///   can never carry the id of one already delivered (which downstream would
///   drop as a duplicate).
///
/// In foreign data with duplicate keys, the last occurrence counts (as for
/// serde_json and orjson), and an edited key is written once, at its first
/// position.
pub fn build_records(input: &SegmentPayloads<'_>, max_segment_bytes: usize) -> BuiltSegment {
    let segment_attr = segment_attribute(input.segment_id);
    let mut built = BuiltSegment {
        records: Vec::new(),
        spans: 0,
        duplicates: 0,
        unparseable: 0,
        bytes: 0,
        span_ids: Vec::new(),
    };
    let mut seen: HashSet<Cow<'_, str>> = HashSet::with_capacity(input.payloads.len());
    seen.extend(
        input
            .delivered
            .split(',')
            .filter(|id| !id.is_empty())
            .map(Cow::Borrowed),
    );
    let mut ids: Vec<Cow<'_, str>> = Vec::with_capacity(input.payloads.len());
    let mut spans: Vec<Box<RawValue>> = Vec::with_capacity(input.payloads.len());

    for payload in input.payloads {
        let Some(pairs) = parse_span(payload) else {
            built.unparseable += 1;
            continue;
        };
        let Some(span_id) = last_value(&pairs, "span_id").and_then(json_str) else {
            built.unparseable += 1;
            continue;
        };
        if seen.contains(&span_id) {
            built.duplicates += 1;
            continue;
        }
        let is_segment = span_id == input.segment_id;
        let Some(edited) = edit_span(&pairs, is_segment, &segment_attr, payload.len()) else {
            // Unreachable for text that serde_json just parsed; counted rather
            // than trusted.
            built.unparseable += 1;
            continue;
        };
        seen.insert(span_id.clone());
        ids.push(span_id);
        spans.push(edited);
    }

    let sizes: Vec<usize> = spans.iter().map(|s| s.get().len()).collect();
    built.spans = spans.len();
    built.bytes = sizes.iter().sum();
    if spans.is_empty() {
        return built;
    }
    // Within the limit the greedy split yields the one chunk of everything.
    let oversized = built.bytes > max_segment_bytes;
    let chunks = chunk_ranges(&sizes, max_segment_bytes);

    let count = chunks.len();
    let mut spans = spans.into_iter();
    built.records = chunks
        .into_iter()
        .enumerate()
        .map(|(index, range)| FlushedSegment {
            flush_id: flush_id(input.flush_seed, index, count, &ids[range.clone()]),
            segment_id: input.segment_id.to_owned(),
            project_id: input.project_id,
            trace_id: input.trace_id.to_owned(),
            spans: spans.by_ref().take(range.len()).collect(),
            skip_enrichment: oversized,
        })
        .collect();
    built.span_ids = ids.into_iter().map(Cow::into_owned).collect();
    built
}

/// Greedy split in order: a new chunk starts when the current one is not empty
/// and the next span would push it over the limit.
fn chunk_ranges(sizes: &[usize], max_bytes: usize) -> Vec<Range<usize>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut current = 0usize;
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && current.saturating_add(size) > max_bytes {
            chunks.push(start..i);
            start = i;
            current = 0;
        }
        current = current.saturating_add(size);
    }
    chunks.push(start..sizes.len());
    chunks
}

fn flush_id(seed: &[u8], index: usize, count: usize, span_ids: &[Cow<'_, str>]) -> String {
    let mut sorted: Vec<&str> = span_ids.iter().map(|id| id.as_ref()).collect();
    sorted.sort_unstable();
    let mut hasher = Blake2b::<U16>::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    field(FLUSH_ID_DOMAIN);
    field(seed);
    field(&(index as u64).to_le_bytes());
    field(&(count as u64).to_le_bytes());
    field(&(sorted.len() as u64).to_le_bytes());
    for id in sorted {
        field(id.as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// `{"type":"string","value":<segment id>}` as JSON text.
fn segment_attribute(segment_id: &str) -> String {
    // Display of a Value is infallible and escapes the string.
    let value = serde_json::Value::String(segment_id.to_owned());
    format!(r#"{{"type":"string","value":{value}}}"#)
}

// ---------------------------------------------------------------------------
// Reading a span: the top level as raw pairs.

/// The members of one JSON object in order, keys and values as raw text.
/// Keys keep their quotes and escapes.
struct ObjectPairs<'a>(Vec<(&'a RawValue, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for ObjectPairs<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(PairsVisitor(PhantomData))
    }
}

struct PairsVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for PairsVisitor<'a> {
    type Value = ObjectPairs<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(16));
        while let Some(key) = map.next_key::<&'de RawValue>()? {
            let value = map.next_value::<&'de RawValue>()?;
            pairs.push((key, value));
        }
        Ok(ObjectPairs(pairs))
    }
}

/// The members of an array in order, as raw text.
struct ArrayItems<'a>(Vec<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for ArrayItems<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(ItemsVisitor(PhantomData))
    }
}

struct ItemsVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for ItemsVisitor<'a> {
    type Value = ArrayItems<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(8));
        while let Some(item) = seq.next_element::<&'de RawValue>()? {
            items.push(item);
        }
        Ok(ArrayItems(items))
    }
}

/// The top-level members of a payload, or `None` when it is not a JSON object
/// that serde_json's default parser accepts.
fn parse_span(payload: &[u8]) -> Option<Vec<(&RawValue, &RawValue)>> {
    if nested_too_deep(payload) {
        return None;
    }
    serde_json::from_slice::<ObjectPairs<'_>>(payload)
        .ok()
        .map(|p| p.0)
}

fn parse_object(raw: &RawValue) -> Option<Vec<(&RawValue, &RawValue)>> {
    if !raw.get().starts_with('{') {
        return None;
    }
    serde_json::from_str::<ObjectPairs<'_>>(raw.get())
        .ok()
        .map(|p| p.0)
}

/// Whether JSON text nests containers deeper than [`MAX_DEPTH`]. Skipping raw
/// values has no depth limit in serde_json, so without this check foreign data
/// could pass here and then overflow the stack of a recursive codec.
fn nested_too_deep(json: &[u8]) -> bool {
    // Fast path: fewer opening brackets than the limit cannot nest deeper
    // (brackets inside strings only over-count).
    let opens = json.iter().filter(|&&b| b == b'{' || b == b'[').count();
    if opens <= MAX_DEPTH {
        return false;
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Whether a raw key names `name` (after unescaping).
fn key_is(key: &RawValue, name: &str) -> bool {
    let text = key.get();
    if text.len() == name.len() + 2 && text.get(1..text.len() - 1) == Some(name) {
        return true;
    }
    text.contains('\\') && json_str(key).is_some_and(|k| k == name)
}

fn last_value<'a>(pairs: &[(&'a RawValue, &'a RawValue)], name: &str) -> Option<&'a RawValue> {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| key_is(k, name))
        .map(|&(_, v)| v)
}

/// The string a raw JSON value holds; `None` if it is not a string.
fn json_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    if !text.starts_with('"') {
        return None;
    }
    if !text.contains('\\') {
        return text.get(1..text.len() - 1).map(Cow::Borrowed);
    }
    serde_json::from_str::<String>(text).ok().map(Cow::Owned)
}

// ---------------------------------------------------------------------------
// Editing a span.

/// The edited span as JSON text; `None` only if the result does not validate.
fn edit_span(
    pairs: &[(&RawValue, &RawValue)],
    is_segment: bool,
    segment_attr: &str,
    size_hint: usize,
) -> Option<Box<RawValue>> {
    let is_segment_text = if is_segment { "true" } else { "false" };
    let attributes = edit_attributes(last_value(pairs, "attributes"), segment_attr)?;

    let mut out = String::with_capacity(size_hint + segment_attr.len() + 64);
    let mut wrote_is_segment = false;
    let mut wrote_attributes = false;
    out.push('{');
    for &(key, value) in pairs {
        let value = if key_is(key, "is_segment") {
            if std::mem::replace(&mut wrote_is_segment, true) {
                continue;
            }
            is_segment_text
        } else if key_is(key, "attributes") {
            if std::mem::replace(&mut wrote_attributes, true) {
                continue;
            }
            &attributes
        } else {
            value.get()
        };
        if out.len() > 1 {
            out.push(',');
        }
        out.push_str(key.get());
        out.push(':');
        out.push_str(value);
    }
    // Appended in the order Sentry's flusher adds them.
    if !wrote_attributes {
        if out.len() > 1 {
            out.push(',');
        }
        out.push_str(r#""attributes":"#);
        out.push_str(&attributes);
    }
    if !wrote_is_segment {
        out.push_str(r#","is_segment":"#);
        out.push_str(is_segment_text);
    }
    out.push('}');
    RawValue::from_string(out).ok()
}

/// `attributes` with the segment id filled in when needed: the input text
/// untouched when it already names a segment, else rebuilt (or created when
/// absent or not an object). `None` only if serde_json refuses text it parsed.
fn edit_attributes<'a>(
    attributes: Option<&'a RawValue>,
    segment_attr: &str,
) -> Option<Cow<'a, str>> {
    let Some(pairs) = attributes.and_then(parse_object) else {
        return Some(Cow::Owned(format!(
            r#"{{"{SEGMENT_ID_ATTRIBUTE}":{segment_attr}}}"#
        )));
    };
    let current = last_value(&pairs, SEGMENT_ID_ATTRIBUTE);
    if current.is_some_and(names_segment) {
        return attributes.map(|a| Cow::Borrowed(a.get()));
    }
    let len = attributes.map_or(0, |a| a.get().len());
    let mut out = String::with_capacity(len + segment_attr.len() + 24);
    let mut wrote = false;
    out.push('{');
    for &(key, value) in &pairs {
        let value = if key_is(key, SEGMENT_ID_ATTRIBUTE) {
            if std::mem::replace(&mut wrote, true) {
                continue;
            }
            segment_attr
        } else {
            value.get()
        };
        if out.len() > 1 {
            out.push(',');
        }
        out.push_str(key.get());
        out.push(':');
        out.push_str(value);
    }
    if !wrote {
        if out.len() > 1 {
            out.push(',');
        }
        out.push('"');
        out.push_str(SEGMENT_ID_ATTRIBUTE);
        out.push_str("\":");
        out.push_str(segment_attr);
    }
    out.push('}');
    Some(Cow::Owned(out))
}

/// Whether a `sentry.segment.id` attribute holds a segment id: an object whose
/// `value` is a non-empty string. Missing, null, empty or any other value
/// (possible only in foreign data: ingest refuses non-strings) is replaced.
fn names_segment(attribute: &RawValue) -> bool {
    parse_object(attribute)
        .and_then(|pairs| last_value(&pairs, "value"))
        .is_some_and(|value| value.get().starts_with('"') && value.get() != r#""""#)
}

// ---------------------------------------------------------------------------
// Codecs.

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Serialize)]
struct JsonRecordOut<'a> {
    flush_id: &'a str,
    segment_id: &'a str,
    project_id: u64,
    trace_id: &'a str,
    spans: &'a [Box<RawValue>],
    #[serde(skip_serializing_if = "is_false")]
    skip_enrichment: bool,
}

impl<'a> From<&'a FlushedSegment> for JsonRecordOut<'a> {
    fn from(r: &'a FlushedSegment) -> Self {
        JsonRecordOut {
            flush_id: &r.flush_id,
            segment_id: &r.segment_id,
            project_id: r.project_id,
            trace_id: &r.trace_id,
            spans: &r.spans,
            skip_enrichment: r.skip_enrichment,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRecordIn {
    flush_id: String,
    segment_id: String,
    project_id: u64,
    trace_id: String,
    spans: Vec<Box<RawValue>>,
    #[serde(default)]
    skip_enrichment: bool,
}

#[derive(Serialize)]
struct MsgpackRecordOut<'a> {
    flush_id: &'a str,
    segment_id: &'a str,
    project_id: u64,
    trace_id: &'a str,
    spans: SpansAsMsgpack<'a>,
    #[serde(skip_serializing_if = "is_false")]
    skip_enrichment: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MsgpackRecordIn {
    flush_id: String,
    segment_id: String,
    project_id: u64,
    trace_id: String,
    spans: Vec<SpanFromMsgpack>,
    #[serde(default)]
    skip_enrichment: bool,
}

struct SpansAsMsgpack<'a>(&'a [Box<RawValue>]);

impl Serialize for SpansAsMsgpack<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for span in self.0 {
            seq.serialize_element(&JsonAsValue {
                raw: span,
                depth: 1,
            })?;
        }
        seq.end()
    }
}

/// Serializes JSON text as the value it denotes (maps in key order), for
/// non-JSON serializers.
struct JsonAsValue<'a> {
    raw: &'a RawValue,
    /// Nesting level of `raw` if it is a container (the span object is 1).
    depth: usize,
}

impl Serialize for JsonAsValue<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = self.raw.get();
        match text.as_bytes().first() {
            Some(b'{') | Some(b'[') if self.depth > MAX_DEPTH => Err(ser::Error::custom(
                format_args!("span nested deeper than {MAX_DEPTH} levels"),
            )),
            Some(b'{') => {
                let pairs = serde_json::from_str::<ObjectPairs<'_>>(text)
                    .map_err(ser::Error::custom)?
                    .0;
                let mut map = serializer.serialize_map(Some(pairs.len()))?;
                for (key, value) in pairs {
                    let key = json_str(key)
                        .ok_or_else(|| ser::Error::custom("json object key is not a string"))?;
                    map.serialize_entry(
                        key.as_ref(),
                        &JsonAsValue {
                            raw: value,
                            depth: self.depth + 1,
                        },
                    )?;
                }
                map.end()
            }
            Some(b'[') => {
                let items = serde_json::from_str::<ArrayItems<'_>>(text)
                    .map_err(ser::Error::custom)?
                    .0;
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&JsonAsValue {
                        raw: item,
                        depth: self.depth + 1,
                    })?;
                }
                seq.end()
            }
            Some(b'"') => {
                let s =
                    json_str(self.raw).ok_or_else(|| ser::Error::custom("invalid json string"))?;
                serializer.serialize_str(&s)
            }
            Some(b't') => serializer.serialize_bool(true),
            Some(b'f') => serializer.serialize_bool(false),
            Some(b'n') => serializer.serialize_unit(),
            _ => serialize_number(text, serializer),
        }
    }
}

/// A JSON number as serde_json reads it into a `Value`: `u64`, else `i64`,
/// else `f64`.
fn serialize_number<S: Serializer>(text: &str, serializer: S) -> Result<S::Ok, S::Error> {
    let integral = !text.contains(['.', 'e', 'E']);
    if integral {
        if let Ok(v) = text.parse::<u64>() {
            return serializer.serialize_u64(v);
        }
        if let Ok(v) = text.parse::<i64>() {
            return serializer.serialize_i64(v);
        }
    }
    match text.parse::<f64>() {
        Ok(v) => serializer.serialize_f64(v),
        Err(_) => Err(ser::Error::custom(format_args!(
            "invalid json number {text:?}"
        ))),
    }
}

/// One span decoded from MessagePack and re-encoded as JSON text in key order.
struct SpanFromMsgpack(Box<RawValue>);

impl<'de> Deserialize<'de> for SpanFromMsgpack {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut out = Vec::with_capacity(1024);
        JsonText {
            out: &mut out,
            depth: 1,
        }
        .deserialize(deserializer)?;
        if out.first() != Some(&b'{') {
            return Err(de::Error::custom("span is not a map"));
        }
        let text = String::from_utf8(out).map_err(de::Error::custom)?;
        RawValue::from_string(text)
            .map(SpanFromMsgpack)
            .map_err(de::Error::custom)
    }
}

/// Writes any self-describing value as JSON text.
struct JsonText<'o> {
    out: &'o mut Vec<u8>,
    /// Nesting level of the value if it is a container (the span map is 1).
    depth: usize,
}

impl JsonText<'_> {
    fn scalar<T: Serialize + ?Sized, E: de::Error>(self, value: &T) -> Result<(), E> {
        serde_json::to_writer(&mut *self.out, value).map_err(E::custom)
    }

    fn enter<E: de::Error>(&self) -> Result<(), E> {
        if self.depth > MAX_DEPTH {
            return Err(E::custom(format_args!(
                "span nested deeper than {MAX_DEPTH} levels"
            )));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for JsonText<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JsonText<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a value with a JSON equivalent")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.scalar(&v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.scalar(&v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.scalar(&v)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        if !v.is_finite() {
            return Err(E::custom("non-finite float has no json equivalent"));
        }
        self.scalar(&v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.scalar(v)
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.enter()?;
        self.out.push(b'[');
        let mut first = true;
        loop {
            // The comma goes before an element whose presence is only known
            // once it is read; undone at the end.
            let mark = self.out.len();
            if !first {
                self.out.push(b',');
            }
            let seed = JsonText {
                out: &mut *self.out,
                depth: self.depth + 1,
            };
            if seq.next_element_seed(seed)?.is_none() {
                self.out.truncate(mark);
                break;
            }
            first = false;
        }
        self.out.push(b']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.enter()?;
        self.out.push(b'{');
        let mut first = true;
        while let Some(key) = map.next_key::<Cow<'_, str>>()? {
            if !first {
                self.out.push(b',');
            }
            first = false;
            serde_json::to_writer(&mut *self.out, key.as_ref()).map_err(de::Error::custom)?;
            self.out.push(b':');
            map.next_value_seed(JsonText {
                out: &mut *self.out,
                depth: self.depth + 1,
            })?;
        }
        self.out.push(b'}');
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const SEGMENT: &str = "a1b2c3d4e5f60718";
    const TRACE: &str = "0123456789abcdef0123456789abcdef";
    const SEED: &[u8] = b"span-buf:s:{1:0123456789abcdef0123456789abcdef}:a1b2c3d4e5f60718";
    const NO_LIMIT: usize = usize::MAX;

    fn payloads(texts: &[&str]) -> Vec<Bytes> {
        texts
            .iter()
            .map(|t| Bytes::copy_from_slice(t.as_bytes()))
            .collect()
    }

    fn input<'a>(payloads: &'a [Bytes], seed: &'a [u8]) -> SegmentPayloads<'a> {
        SegmentPayloads {
            segment_id: SEGMENT,
            project_id: 1,
            trace_id: TRACE,
            payloads,
            flush_seed: seed,
            delivered: "",
        }
    }

    fn build(texts: &[&str], max_bytes: usize) -> BuiltSegment {
        let payloads = payloads(texts);
        build_records(&input(&payloads, SEED), max_bytes)
    }

    /// The edited text of the only span of the only record.
    fn edit_one(text: &str) -> String {
        let built = build(&[text], NO_LIMIT);
        assert_eq!(built.records.len(), 1, "{text}");
        assert_eq!(built.records[0].spans.len(), 1, "{text}");
        built.records[0].spans[0].get().to_owned()
    }

    fn span_text(span_id: &str, filler: usize) -> String {
        json!({"span_id": span_id, "description": "x".repeat(filler)}).to_string()
    }

    fn attr(value: &str) -> String {
        format!(r#"{{"type":"string","value":"{value}"}}"#)
    }

    #[test]
    fn is_segment_is_true_only_for_the_segment_span_and_overwrites_input() {
        let built = build(
            &[
                r#"{"span_id":"a1b2c3d4e5f60718","is_segment":false}"#,
                r#"{"span_id":"1111111111111111","is_segment":true}"#,
                r#"{"span_id":"2222222222222222","is_segment":null}"#,
                r#"{"span_id":"3333333333333333"}"#,
            ],
            NO_LIMIT,
        );
        let spans: Vec<Value> = built.records[0]
            .spans
            .iter()
            .map(|s| serde_json::from_str(s.get()).unwrap())
            .collect();
        let flags: Vec<&Value> = spans.iter().map(|s| &s["is_segment"]).collect();
        assert_eq!(
            flags,
            [&json!(true), &json!(false), &json!(false), &json!(false)]
        );
    }

    #[test]
    fn is_segment_keeps_its_position_or_is_appended_last() {
        let a = attr(SEGMENT);
        assert_eq!(
            edit_one(&format!(
                r#"{{"is_segment":true,"span_id":"1111111111111111","attributes":{{"sentry.segment.id":{a}}}}}"#
            )),
            format!(
                r#"{{"is_segment":false,"span_id":"1111111111111111","attributes":{{"sentry.segment.id":{a}}}}}"#
            )
        );
        assert_eq!(
            edit_one(&format!(
                r#"{{"span_id":"a1b2c3d4e5f60718","attributes":{{"sentry.segment.id":{a}}},"z":1}}"#
            )),
            format!(
                r#"{{"span_id":"a1b2c3d4e5f60718","attributes":{{"sentry.segment.id":{a}}},"z":1,"is_segment":true}}"#
            )
        );
    }

    #[test]
    fn attributes_absent_are_appended_before_is_segment() {
        assert_eq!(
            edit_one(r#"{"span_id":"1111111111111111","op":"db"}"#),
            format!(
                r#"{{"span_id":"1111111111111111","op":"db","attributes":{{"sentry.segment.id":{}}},"is_segment":false}}"#,
                attr(SEGMENT)
            )
        );
    }

    #[test]
    fn null_or_non_object_attributes_become_an_object_in_place() {
        for attributes in ["null", r#""text""#, "[1,2]", "7", "true"] {
            let text =
                format!(r#"{{"span_id":"1111111111111111","attributes":{attributes},"op":"db"}}"#);
            assert_eq!(
                edit_one(&text),
                format!(
                    r#"{{"span_id":"1111111111111111","attributes":{{"sentry.segment.id":{}}},"op":"db","is_segment":false}}"#,
                    attr(SEGMENT)
                ),
                "{attributes}"
            );
        }
    }

    #[test]
    fn segment_attribute_with_a_value_is_kept_byte_for_byte() {
        // Another segment's id, odd spacing: the attributes text is untouched.
        let attributes = r#"{ "b" : 1 , "sentry.segment.id" : { "value" : "ffffffffffffffff" , "type":"string"}, "a":[1, 2] }"#;
        let text = format!(r#"{{"span_id":"1111111111111111","attributes":{attributes}}}"#);
        assert_eq!(
            edit_one(&text),
            format!(
                r#"{{"span_id":"1111111111111111","attributes":{attributes},"is_segment":false}}"#
            )
        );
    }

    #[test]
    fn segment_attribute_without_a_usable_value_is_filled_in_place() {
        for entry in [
            r#"{"type":"string","value":null}"#,
            r#"{"type":"string"}"#,
            r#"{"type":"string","value":""}"#,
            r#"{"type":"string","value":12}"#,
            "null",
            r#""a1b2c3d4e5f60718""#,
        ] {
            let text = format!(
                r#"{{"span_id":"1111111111111111","attributes":{{"b": 1,"sentry.segment.id":{entry},"a" :{{"x" : [1.50]}}}}}}"#
            );
            assert_eq!(
                edit_one(&text),
                format!(
                    r#"{{"span_id":"1111111111111111","attributes":{{"b":1,"sentry.segment.id":{},"a":{{"x" : [1.50]}}}},"is_segment":false}}"#,
                    attr(SEGMENT)
                ),
                "{entry}"
            );
        }
    }

    #[test]
    fn segment_attribute_absent_from_an_object_is_appended_to_it() {
        let text = r#"{"span_id":"1111111111111111","attributes":{"z":{"type":"int","value":3}}}"#;
        assert_eq!(
            edit_one(text),
            format!(
                r#"{{"span_id":"1111111111111111","attributes":{{"z":{{"type":"int","value":3}},"sentry.segment.id":{}}},"is_segment":false}}"#,
                attr(SEGMENT)
            )
        );
        let empty = r#"{"span_id":"1111111111111111","attributes":{}}"#;
        assert_eq!(
            edit_one(empty),
            format!(
                r#"{{"span_id":"1111111111111111","attributes":{{"sentry.segment.id":{}}},"is_segment":false}}"#,
                attr(SEGMENT)
            )
        );
    }

    #[test]
    fn other_members_are_byte_identical_and_in_order() {
        let members = r#""zeta":1.50,"alpha":1e3,"name":"caf\u00e9 \"q\"","data":{ "z" : [ 1 , {"b":2,"a":1} ], "a":null },"big":123456789012345678901234567890,"neg":-0.0"#;
        let attributes = format!(r#"{{ "sentry.segment.id" : {} }}"#, attr(SEGMENT));
        // Whitespace between top-level members is not kept; values are.
        let text = format!(
            "  {{ \"span_id\" : \"1111111111111111\",\n {members} , \"attributes\" :\t{attributes} }}  "
        );
        assert_eq!(
            edit_one(&text),
            format!(
                r#"{{"span_id":"1111111111111111",{members},"attributes":{attributes},"is_segment":false}}"#
            )
        );
    }

    #[test]
    fn escaped_keys_are_recognised() {
        let text =
            r#"{"span\u005fid":"a1b2c3d4e5f60718","is_s\u0065gment":false,"attr\u0069butes":null}"#;
        assert_eq!(
            edit_one(text),
            format!(
                r#"{{"span\u005fid":"a1b2c3d4e5f60718","is_s\u0065gment":true,"attr\u0069butes":{{"sentry.segment.id":{}}}}}"#,
                attr(SEGMENT)
            )
        );
    }

    #[test]
    fn duplicate_edited_keys_are_written_once_and_the_last_value_counts() {
        let a = attr(SEGMENT);
        let text = format!(
            r#"{{"is_segment":true,"span_id":"0000000000000000","attributes":null,"x":1,"is_segment":true,"span_id":"1111111111111111","attributes":{{"sentry.segment.id":{a}}}}}"#
        );
        assert_eq!(
            edit_one(&text),
            format!(
                r#"{{"is_segment":false,"span_id":"0000000000000000","attributes":{{"sentry.segment.id":{a}}},"x":1,"span_id":"1111111111111111"}}"#
            )
        );
    }

    #[test]
    fn duplicates_are_removed_keeping_the_first() {
        let built = build(
            &[
                r#"{"span_id":"1111111111111111","n":1}"#,
                r#"{"span_id":"2222222222222222","n":2}"#,
                r#"{"span_id":"1111111111111111","n":3}"#,
                r#"{"n":4,"span_id":"1111111111111111"}"#,
            ],
            NO_LIMIT,
        );
        assert_eq!(
            (built.spans, built.duplicates, built.unparseable),
            (2, 2, 0)
        );
        let ns: Vec<Value> = built.records[0]
            .spans
            .iter()
            .map(|s| serde_json::from_str::<Value>(s.get()).unwrap()["n"].clone())
            .collect();
        assert_eq!(ns, [json!(1), json!(2)]);
    }

    #[test]
    fn unparseable_payloads_are_skipped_and_counted() {
        let deep = format!(
            r#"{{"span_id":"3333333333333333","x":{}{}}}"#,
            "[".repeat(MAX_DEPTH),
            "]".repeat(MAX_DEPTH)
        );
        let bad = [
            "not json",
            "",
            "[1,2]",
            r#""1111111111111111""#,
            r#"{"a":1}"#,
            r#"{"span_id":1111111111111111}"#,
            r#"{"span_id":null}"#,
            r#"{"span_id":"1111111111111111"} trailing"#,
            r#"{"span_id":"1111111111111111""#,
            deep.as_str(),
        ];
        let mut texts: Vec<&str> = bad.to_vec();
        texts.push(r#"{"span_id":"2222222222222222"}"#);
        let mut payloads = payloads(&texts);
        payloads.push(Bytes::from_static(
            b"{\"span_id\":\"4444444444444444\",\"x\":\"\xff\"}",
        ));
        let built = build_records(&input(&payloads, SEED), NO_LIMIT);
        assert_eq!(
            (built.spans, built.unparseable, built.duplicates),
            (1, bad.len() + 1, 0)
        );
        assert_eq!(built.records.len(), 1);
    }

    #[test]
    fn depth_check_agrees_with_serde_json() {
        for n in [MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1] {
            // The span object is one level; `n` more inside it, some in strings.
            let nested = "[".repeat(n);
            let text = format!(
                r#"{{"s":"[[[[{{{{","span_id":"1111111111111111","x":{nested}{}}}"#,
                "]".repeat(n)
            );
            let serde_ok = serde_json::from_str::<Value>(&text).is_ok();
            assert_eq!(!nested_too_deep(text.as_bytes()), serde_ok, "{n}");
            assert_eq!(build(&[&text], NO_LIMIT).spans == 1, serde_ok, "{n}");
        }
    }

    #[test]
    fn a_segment_within_the_limit_is_one_record_without_the_flag() {
        let texts: Vec<String> = (0..5)
            .map(|i| span_text(&format!("{i:016x}"), 50))
            .collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let unlimited = build(&refs, NO_LIMIT);
        // Exactly at the limit still fits.
        let built = build(&refs, unlimited.bytes);
        assert_eq!(built.records.len(), 1);
        assert!(!built.records[0].skip_enrichment);
        assert_eq!(built.records[0].span_count(), 5);
        let json = String::from_utf8(built.records[0].to_json().unwrap()).unwrap();
        assert!(!json.contains("skip_enrichment"), "{json}");
        assert_eq!(
            built.bytes,
            built.records[0]
                .spans
                .iter()
                .map(|s| s.get().len())
                .sum::<usize>()
        );
    }

    #[test]
    fn an_oversized_segment_is_split_in_order_into_flagged_chunks() {
        let fillers = [100, 100, 100, 400, 50, 50, 100, 10];
        let texts: Vec<String> = fillers
            .iter()
            .enumerate()
            .map(|(i, &f)| span_text(&format!("{i:016x}"), f))
            .collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let all = build(&refs, NO_LIMIT);
        let limit = 500;
        let built = build(&refs, limit);
        assert_eq!((built.spans, built.bytes), (all.spans, all.bytes));
        assert!(built.records.len() > 2, "{}", built.records.len());

        let mut flattened = Vec::new();
        for record in &built.records {
            assert!(record.skip_enrichment);
            let size: usize = record.spans.iter().map(|s| s.get().len()).sum();
            assert!(size <= limit || record.spans.len() == 1, "{size}");
            let json = String::from_utf8(record.to_json().unwrap()).unwrap();
            assert!(json.ends_with(r#","skip_enrichment":true}"#), "{json}");
            flattened.extend(record.spans.iter().map(|s| s.get().to_owned()));
        }
        let expected: Vec<String> = all.records[0]
            .spans
            .iter()
            .map(|s| s.get().to_owned())
            .collect();
        assert_eq!(flattened, expected);

        // Greedy: no chunk could have taken the next chunk's first span.
        for pair in built.records.windows(2) {
            let size: usize = pair[0].spans.iter().map(|s| s.get().len()).sum();
            assert!(size + pair[1].spans[0].get().len() > limit);
        }
        let ids: HashSet<&str> = built.records.iter().map(|r| r.flush_id.as_str()).collect();
        assert_eq!(ids.len(), built.records.len());
    }

    #[test]
    fn a_span_larger_than_the_limit_is_a_chunk_alone() {
        let texts = [
            span_text("0000000000000000", 10),
            span_text("1111111111111111", 500),
            span_text("2222222222222222", 10),
        ];
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let built = build(&refs, 200);
        let counts: Vec<usize> = built.records.iter().map(|r| r.span_count()).collect();
        assert_eq!(counts, [1, 1, 1]);

        let lone = build(&refs[1..2], 200);
        assert_eq!(lone.records.len(), 1);
        assert!(lone.records[0].skip_enrichment);
    }

    #[test]
    fn nothing_to_flush_gives_no_records() {
        let empty = build(&[], NO_LIMIT);
        assert_eq!(
            empty,
            BuiltSegment {
                records: vec![],
                spans: 0,
                duplicates: 0,
                unparseable: 0,
                bytes: 0,
                span_ids: vec![],
            }
        );
        let junk = build(&["junk", "[]"], NO_LIMIT);
        assert!(junk.records.is_empty());
        assert_eq!(junk.unparseable, 2);
    }

    #[test]
    fn flush_ids_are_deterministic_hex_and_depend_on_seed_and_chunk() {
        let texts: Vec<String> = (0..6)
            .map(|i| span_text(&format!("{i:016x}"), 100))
            .collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let payloads = payloads(&refs);

        let once = build_records(&input(&payloads, SEED), NO_LIMIT);
        let twice = build_records(&input(&payloads, SEED), NO_LIMIT);
        assert_eq!(once, twice);
        let id = &once.records[0].flush_id;
        assert_eq!(id.len(), 32);
        assert!(
            id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "{id}"
        );

        let other_seed = build_records(&input(&payloads, b"another seed"), NO_LIMIT);
        assert_ne!(other_seed.records[0].flush_id, *id);

        // Same spans in another load order: same content, same id.
        let reversed: Vec<Bytes> = payloads.iter().rev().cloned().collect();
        let reordered = build_records(&input(&reversed, SEED), NO_LIMIT);
        assert_eq!(reordered.records[0].flush_id, *id);

        // Chunked two spans each: a chunk's id depends on its content.
        let limit = once.bytes / 6 * 5 / 2;
        let chunked = build_records(&input(&payloads, SEED), limit);
        assert_eq!(chunked.records.len(), 3);
        assert!(chunked.records.len() > 1);
        assert!(chunked.records.iter().all(|r| r.flush_id != *id));
        let again = build_records(&input(&payloads, SEED), limit);
        assert_eq!(chunked, again);
        let chunked_reversed = build_records(&input(&reversed, SEED), limit);
        let mut same = 0;
        for (a, b) in chunked.records.iter().zip(&chunked_reversed.records) {
            let same_content = {
                let ids = |r: &FlushedSegment| {
                    let mut v: Vec<String> = r.spans.iter().map(|s| s.get().to_owned()).collect();
                    v.sort();
                    v
                };
                ids(a) == ids(b)
            };
            assert_eq!(a.flush_id == b.flush_id, same_content);
            same += usize::from(same_content);
        }
        // The middle chunk holds the same two spans either way; the others not.
        assert_eq!(same, 1);
    }

    #[test]
    fn flush_id_framing_is_unambiguous() {
        let ids: Vec<Cow<'_, str>> = vec![Cow::Borrowed("ab"), Cow::Borrowed("c")];
        let joined: Vec<Cow<'_, str>> = vec![Cow::Borrowed("a"), Cow::Borrowed("bc")];
        assert_ne!(flush_id(b"s", 0, 1, &ids), flush_id(b"s", 0, 1, &joined));
        assert_ne!(flush_id(b"s", 0, 2, &ids), flush_id(b"s", 1, 2, &ids));
        assert_ne!(flush_id(b"s", 0, 1, &ids), flush_id(b"s", 0, 2, &ids));
        assert_ne!(flush_id(b"s1", 0, 1, &[]), flush_id(b"s", 1, 1, &[]));
    }

    fn sample_record(skip_enrichment: bool) -> FlushedSegment {
        let texts = [
            r#"{"span_id":"a1b2c3d4e5f60718","zeta":1.5,"alpha":-3,"big":18446744073709551615,"name":"café \"q\" \\ \n \u0001","list":[1,2.25,null,true,{"b":1,"a":[]}],"attributes":{"sentry.segment.id":{"type":"string","value":"a1b2c3d4e5f60718"}},"is_segment":true}"#,
            r#"{"span_id":"1111111111111111","start_timestamp":1700000000.0137,"empty":{},"is_segment":false,"attributes":{}}"#,
        ];
        let payloads = payloads(&texts);
        let built = build_records(&input(&payloads, SEED), NO_LIMIT);
        let mut record = built.records.into_iter().next().unwrap();
        record.skip_enrichment = skip_enrichment;
        record
    }

    #[test]
    fn json_round_trip_and_field_layout() {
        for skip in [false, true] {
            let record = sample_record(skip);
            let bytes = record.to_json().unwrap();
            assert_eq!(from_json(&bytes).unwrap(), record);
            assert_eq!(record.encode(OutputCodec::Json).unwrap(), bytes);
            let text = String::from_utf8(bytes).unwrap();
            let prefix = format!(
                r#"{{"flush_id":"{}","segment_id":"{SEGMENT}","project_id":1,"trace_id":"{TRACE}","spans":[{}]"#,
                record.flush_id,
                record
                    .spans
                    .iter()
                    .map(|s| s.get())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            assert!(text.starts_with(&prefix), "{text}");
            assert_eq!(text.contains(r#""skip_enrichment":true"#), skip);
        }
    }

    #[test]
    fn msgpack_round_trip_keeps_names_types_and_key_order() {
        for skip in [false, true] {
            let record = sample_record(skip);
            let bytes = record.to_msgpack().unwrap();
            assert_eq!(record.encode(OutputCodec::Msgpack).unwrap(), bytes);
            assert_eq!(from_msgpack(&bytes).unwrap(), record);

            let value: Value = rmp_serde::from_slice(&bytes).unwrap();
            let mut expected = json!({
                "flush_id": record.flush_id,
                "segment_id": SEGMENT,
                "project_id": 1,
                "trace_id": TRACE,
                "spans": record.spans.iter().map(|s| serde_json::from_str::<Value>(s.get()).unwrap()).collect::<Vec<_>>(),
            });
            if skip {
                expected["skip_enrichment"] = json!(true);
            }
            assert_eq!(value, expected);
            assert!(value["spans"][0]["big"].is_u64());
            assert!(value["spans"][0]["alpha"].is_i64());
        }
    }

    #[test]
    fn msgpack_spans_are_maps_not_strings() {
        let record = sample_record(false);
        let bytes = record.to_msgpack().unwrap();
        // fixmap of 5 entries, first key "flush_id".
        assert_eq!(bytes[0], 0x85);
        assert_eq!(&bytes[1..10], b"\xa8flush_id");
        let value: Value = rmp_serde::from_slice(&bytes).unwrap();
        assert!(value["spans"][0].is_object());
    }

    #[test]
    fn hand_built_deep_span_fails_msgpack_encoding_without_overflow() {
        let deep = format!(r#"{{"x":{}{}}}"#, "[".repeat(500), "]".repeat(500));
        let record = FlushedSegment {
            flush_id: "0".repeat(32),
            segment_id: SEGMENT.to_owned(),
            project_id: 1,
            trace_id: TRACE.to_owned(),
            spans: vec![RawValue::from_string(deep).unwrap()],
            skip_enrichment: false,
        };
        let err = record.to_msgpack().unwrap_err();
        assert!(matches!(err, RecordError::EncodeMsgpack(_)), "{err}");
        assert!(record.to_json().is_ok());
    }

    #[test]
    fn decoding_refuses_wrong_input_with_a_source() {
        let err = from_json(b"{\"flush_id\":1}").unwrap_err();
        assert!(matches!(err, RecordError::DecodeJson(_)));
        assert!(std::error::Error::source(&err).is_some());
        assert_eq!(
            err.to_string(),
            "decoding a flushed segment from json failed"
        );

        let mut extra: Value =
            serde_json::from_slice(&sample_record(false).to_json().unwrap()).unwrap();
        extra["unknown"] = json!(1);
        assert!(from_json(extra.to_string().as_bytes()).is_err());

        let err = from_msgpack(b"\xc1").unwrap_err();
        assert!(matches!(err, RecordError::DecodeMsgpack(_)));
        assert!(std::error::Error::source(&err).is_some());

        // A span that is not a map, and a span holding binary data.
        let not_a_map = rmp_serde::to_vec_named(&json!({
            "flush_id": "0", "segment_id": SEGMENT, "project_id": 1, "trace_id": TRACE, "spans": ["x"],
        }))
        .unwrap();
        assert!(from_msgpack(&not_a_map).is_err());
    }
}
