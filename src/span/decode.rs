//! Decoding one input span (docs/design.md §2): bytes in, a [`Span`] or an
//! [`InvalidSpan`] out.
//!
//! This is the ingest hot path. JSON input is parsed once, in place, into a
//! borrowed view of the few fields spanbuf reads; every other member is walked
//! without being built, and the stored payload is the input bytes untouched.
//! MessagePack input is converted to a `serde_json::Value`, validated the same
//! way, and stored as JSON: payloads are joined with `\x00` in Redis, which only
//! JSON guarantees never to contain.
//!
//! Contract with the flusher: a payload accepted here parses with
//! `serde_json::from_slice::<serde_json::Value>` (default settings). The walk
//! therefore rejects what that parse rejects even in fields spanbuf does not
//! read: invalid UTF-8, lone surrogate escapes, numbers out of `f64` range,
//! nesting deeper than serde_json's recursion limit, and serde_json's reserved
//! raw-value key.
//!
//! This module must not log or count: the caller records outcomes per batch
//! (metrics, dead-letter topic).

use std::borrow::Cow;
use std::fmt;
use std::io::Cursor;

use bytes::Bytes;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::Span;

/// Why a span is invalid: the closed set of `reason` label values of
/// `spanbuf_spans_invalid_total` and of the dead-letter header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidReason {
    /// Not a JSON object or MessagePack map: syntax error, invalid UTF-8,
    /// trailing data, duplicate field, empty input, another top-level type.
    Malformed,
    /// A required field (`trace_id`, `span_id`, `project_id`) is absent or null.
    MissingField,
    /// An id field is a string of the wrong length or with non-hex characters.
    BadId,
    /// A field has the wrong type (e.g. a numeric `span_id`, a float `project_id`).
    BadType,
    /// The encoded span is larger than `SPANBUF_MAX_SPAN_BYTES`.
    TooLarge,
}

impl InvalidReason {
    /// Every reason, for pre-registering metric label values.
    pub const ALL: [InvalidReason; 5] = [
        InvalidReason::Malformed,
        InvalidReason::MissingField,
        InvalidReason::BadId,
        InvalidReason::BadType,
        InvalidReason::TooLarge,
    ];

    /// The metric label / header value.
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidReason::Malformed => "malformed",
            InvalidReason::MissingField => "missing_field",
            InvalidReason::BadId => "bad_id",
            InvalidReason::BadType => "bad_type",
            InvalidReason::TooLarge => "too_large",
        }
    }
}

impl fmt::Display for InvalidReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A span that spanbuf refuses, with the reason and a detail naming the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct InvalidSpan {
    /// The closed-set reason.
    pub reason: InvalidReason,
    /// Human-readable detail, e.g. `span_id: expected 16 hex characters, got 15`.
    pub detail: String,
}

impl InvalidSpan {
    fn new(reason: InvalidReason, detail: impl Into<String>) -> Self {
        InvalidSpan {
            reason,
            detail: detail.into(),
        }
    }

    fn malformed(detail: impl Into<String>) -> Self {
        Self::new(InvalidReason::Malformed, detail)
    }
}

/// Decodes one span. `max_span_bytes` bounds the encoded size and is checked
/// before anything is parsed. The payload is a copy of `bytes`; a caller that
/// owns them already uses [`decode_span_bytes`].
pub fn decode_span(bytes: &[u8], max_span_bytes: usize) -> Result<Span, InvalidSpan> {
    decode(bytes, max_span_bytes, || Bytes::copy_from_slice(bytes))
}

/// [`decode_span`] of bytes the caller hands over: a JSON span keeps them as
/// its payload, without a copy (the consumer's buffer becomes the payload).
pub fn decode_span_bytes(bytes: Bytes, max_span_bytes: usize) -> Result<Span, InvalidSpan> {
    decode(&bytes, max_span_bytes, || bytes.clone())
}

fn decode(
    bytes: &[u8],
    max_span_bytes: usize,
    payload: impl FnOnce() -> Bytes,
) -> Result<Span, InvalidSpan> {
    if bytes.len() > max_span_bytes {
        return Err(InvalidSpan::new(
            InvalidReason::TooLarge,
            format!(
                "span is {} bytes, the limit is {max_span_bytes} bytes",
                bytes.len()
            ),
        ));
    }
    match bytes.iter().copied().find(|b| !is_json_whitespace(*b)) {
        None if bytes.is_empty() => Err(InvalidSpan::malformed("empty input")),
        None => Err(InvalidSpan::malformed("input is only whitespace")),
        Some(b'{') => decode_json(bytes, payload),
        Some(0x80..=0x8f | 0xde | 0xdf) => decode_msgpack(bytes),
        Some(other) => Err(InvalidSpan::malformed(format!(
            "expected a JSON object or a MessagePack map, input starts with byte 0x{other:02x}"
        ))),
    }
}

fn is_json_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn decode_json(bytes: &[u8], payload: impl FnOnce() -> Bytes) -> Result<Span, InvalidSpan> {
    // Validating the whole input up front is what makes the untouched bytes a
    // safe payload: serde_json checks UTF-8 only in strings it decodes. It also
    // lets `from_str` skip its own per-string check.
    let text = std::str::from_utf8(bytes)
        .map_err(|e| InvalidSpan::malformed(format!("invalid UTF-8: {e}")))?;
    let fields: SpanFields<'_> = serde_json::from_str(text)
        .map_err(|e| InvalidSpan::malformed(format!("invalid JSON: {e}")))?;
    fields.into_span(payload())
}

fn decode_msgpack(bytes: &[u8]) -> Result<Span, InvalidSpan> {
    let mut de = rmp_serde::Deserializer::new(Cursor::new(bytes));
    // rmp-serde counts nesting like serde_json does, so this is exactly the
    // depth the flusher can parse back; it also bounds stack use here.
    de.set_max_depth(MAX_DEPTH + 1);
    let value = <serde_json::Value as Deserialize>::deserialize(&mut de)
        .map_err(|e| InvalidSpan::malformed(format!("invalid MessagePack: {e}")))?;
    let consumed = de.position();
    if consumed != bytes.len() as u64 {
        return Err(InvalidSpan::malformed(format!(
            "trailing data after MessagePack map: {} bytes",
            (bytes.len() as u64).saturating_sub(consumed)
        )));
    }
    if !value.is_object() {
        return Err(InvalidSpan::malformed("MessagePack input is not a map"));
    }
    // The same walk as for JSON: the depth and reserved-key checks apply to the
    // converted value too (serde_json's raw-value key can expand it).
    let fields = SpanFields::deserialize(&value)
        .map_err(|e| InvalidSpan::malformed(format!("invalid MessagePack: {e}")))?;
    let payload = serde_json::to_vec(&value)
        .map_err(|e| InvalidSpan::malformed(format!("cannot re-encode as JSON: {e}")))?;
    fields.into_span(Bytes::from(payload))
}

/// Deepest nesting of objects and arrays (the span object itself counts as 1)
/// that `serde_json::from_slice` accepts with its default recursion limit.
const MAX_DEPTH: usize = 127;

/// A map key with this value makes serde_json's `Value` parser (with the
/// `raw_value` feature, which this crate enables) reinterpret the object, and
/// fail on most values; such a payload would not survive the flush.
const RESERVED_KEY: &str = "$serde_json::private::RawValue";

fn reserved_key_error<E: de::Error>() -> E {
    E::custom(format_args!("reserved object key {RESERVED_KEY:?}"))
}

fn too_deep_error<E: de::Error>() -> E {
    E::custom(format_args!("nesting deeper than {MAX_DEPTH} levels"))
}

/// The members spanbuf reads, as found. `None` = absent.
#[derive(Default)]
struct SpanFields<'a> {
    trace_id: Option<Field<'a>>,
    span_id: Option<Field<'a>>,
    parent_span_id: Option<Field<'a>>,
    project_id: Option<Field<'a>>,
    is_segment: Option<Field<'a>>,
    received: Option<Field<'a>>,
    start_timestamp: Option<Field<'a>>,
    end_timestamp: Option<Field<'a>>,
    /// `attributes["sentry.segment.id"].value` where that path exists.
    segment_id: Option<Field<'a>>,
    /// Whether `attributes` was seen, to refuse a duplicate.
    has_attributes: bool,
}

impl SpanFields<'_> {
    fn into_span(self, payload: Bytes) -> Result<Span, InvalidSpan> {
        let trace_id = required_hex("trace_id", self.trace_id, 32)?;
        let span_id = required_hex("span_id", self.span_id, 16)?;
        let project_id = match required("project_id", self.project_id)? {
            Field::UInt(v) => v,
            other => return Err(bad_type("project_id", "an unsigned integer", &other)),
        };
        let parent_span_id = optional_hex("parent_span_id", self.parent_span_id, 16)?;
        let is_segment = match self.is_segment {
            None | Some(Field::Null) => None,
            Some(Field::Bool(b)) => Some(b),
            Some(other) => return Err(bad_type("is_segment", "a boolean", &other)),
        };
        let segment_id = optional_hex(
            "attributes[\"sentry.segment.id\"].value",
            self.segment_id,
            16,
        )?;
        let received = optional_number("received", self.received)?;
        optional_number("start_timestamp", self.start_timestamp)?;
        optional_number("end_timestamp", self.end_timestamp)?;
        Ok(Span {
            trace_id,
            span_id,
            is_segment_span: parent_span_id.is_none() || is_segment == Some(true),
            parent_span_id,
            project_id,
            segment_id,
            received,
            payload,
        })
    }
}

fn required<'a>(name: &str, field: Option<Field<'a>>) -> Result<Field<'a>, InvalidSpan> {
    match field {
        None => Err(InvalidSpan::new(
            InvalidReason::MissingField,
            format!("{name}: required field is missing"),
        )),
        Some(Field::Null) => Err(InvalidSpan::new(
            InvalidReason::MissingField,
            format!("{name}: required field is null"),
        )),
        Some(field) => Ok(field),
    }
}

fn required_hex(name: &str, field: Option<Field<'_>>, len: usize) -> Result<String, InvalidSpan> {
    match required(name, field)? {
        Field::Str(s) => {
            check_hex(name, &s, len)?;
            Ok(s.into_owned())
        }
        other => Err(bad_type(name, "a string", &other)),
    }
}

fn optional_hex(
    name: &str,
    field: Option<Field<'_>>,
    len: usize,
) -> Result<Option<String>, InvalidSpan> {
    match field {
        None | Some(Field::Null) => Ok(None),
        Some(Field::Str(s)) => {
            check_hex(name, &s, len)?;
            Ok(Some(s.into_owned()))
        }
        Some(other) => Err(bad_type(name, "a string or null", &other)),
    }
}

fn optional_number(name: &str, field: Option<Field<'_>>) -> Result<Option<f64>, InvalidSpan> {
    match field {
        None | Some(Field::Null) => Ok(None),
        // Seconds since the epoch: far inside f64's exact integer range.
        Some(Field::UInt(v)) => Ok(Some(v as f64)),
        Some(Field::NegInt(v)) => Ok(Some(v as f64)),
        Some(Field::Float(v)) => Ok(Some(v)),
        Some(other) => Err(bad_type(name, "a number or null", &other)),
    }
}

fn check_hex(name: &str, s: &str, len: usize) -> Result<(), InvalidSpan> {
    if s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(());
    }
    let chars = s.chars().count();
    let detail = match s.chars().find(|c| !c.is_ascii_hexdigit()) {
        Some(c) if chars == len => {
            format!("{name}: expected {len} hex characters, found {c:?}")
        }
        _ => format!("{name}: expected {len} hex characters, got {chars}"),
    };
    Err(InvalidSpan::new(InvalidReason::BadId, detail))
}

fn bad_type(name: &str, expected: &str, got: &Field<'_>) -> InvalidSpan {
    InvalidSpan::new(
        InvalidReason::BadType,
        format!("{name}: expected {expected}, got {}", got.kind()),
    )
}

/// The type and, for the types spanbuf uses, the value of one member.
/// Containers are walked (to validate them) but not kept.
enum Field<'a> {
    Null,
    Bool(bool),
    Str(Cow<'a, str>),
    UInt(u64),
    NegInt(i64),
    Float(f64),
    Array,
    Object,
}

impl Field<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Field::Null => "null",
            Field::Bool(_) => "a boolean",
            Field::Str(_) => "a string",
            Field::UInt(_) => "an integer",
            Field::NegInt(_) => "a negative integer",
            Field::Float(_) => "a float",
            Field::Array => "an array",
            Field::Object => "an object",
        }
    }
}

/// Reads a [`Field`] whose enclosing container is at `depth`.
#[derive(Clone, Copy)]
struct FieldSeed {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for FieldSeed {
    type Value = Field<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Field<'de>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed {
    type Value = Field<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Field<'de>, E> {
        Ok(Field::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Field<'de>, E> {
        Ok(Field::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Field<'de>, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Field<'de>, E> {
        Ok(Field::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Field<'de>, E> {
        Ok(match u64::try_from(v) {
            Ok(v) => Field::UInt(v),
            Err(_) => Field::NegInt(v),
        })
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Field<'de>, E> {
        Ok(Field::UInt(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Field<'de>, E> {
        Ok(Field::Float(v))
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Owned(v)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Field<'de>, A::Error> {
        Skip::below(self.depth).visit_seq(seq)?;
        Ok(Field::Array)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Field<'de>, A::Error> {
        Skip::below(self.depth).visit_map(map)?;
        Ok(Field::Object)
    }
}

/// Walks and discards one value whose enclosing container is at `parent`
/// depth, rejecting what serde_json's `Value` parser would reject.
///
/// Not `serde::de::IgnoredAny`: serde_json skips ignored values with a fast
/// scanner that accepts out-of-range numbers, lone surrogates and unlimited
/// nesting, all of which would make the payload unparseable at flush.
#[derive(Clone, Copy)]
struct Skip {
    /// Depth of the value if it is a container.
    depth: usize,
}

impl Skip {
    /// A visitor for a value inside a container at depth `parent`.
    fn below(parent: usize) -> Self {
        Skip { depth: parent + 1 }
    }
}

impl<'de> DeserializeSeed<'de> for Skip {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Skip {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth > MAX_DEPTH {
            return Err(too_deep_error());
        }
        while seq.next_element_seed(Skip::below(self.depth))?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if self.depth > MAX_DEPTH {
            return Err(too_deep_error());
        }
        while map.next_key_seed(KeyIs(None))?.is_some() {
            map.next_value_seed(Skip::below(self.depth))?;
        }
        Ok(())
    }
}

/// Reads an object key: `true` if it equals the wanted name. Refuses
/// [`RESERVED_KEY`] anywhere.
struct KeyIs(Option<&'static str>);

impl<'de> DeserializeSeed<'de> for KeyIs {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_identifier(self)
    }
}

impl<'de> Visitor<'de> for KeyIs {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        if v == RESERVED_KEY {
            return Err(reserved_key_error());
        }
        Ok(self.0 == Some(v))
    }
}

/// Top-level member names spanbuf reads.
enum Key {
    TraceId,
    SpanId,
    ParentSpanId,
    ProjectId,
    IsSegment,
    Received,
    StartTimestamp,
    EndTimestamp,
    Attributes,
    Other,
}

impl Key {
    fn name(&self) -> &'static str {
        match self {
            Key::TraceId => "trace_id",
            Key::SpanId => "span_id",
            Key::ParentSpanId => "parent_span_id",
            Key::ProjectId => "project_id",
            Key::IsSegment => "is_segment",
            Key::Received => "received",
            Key::StartTimestamp => "start_timestamp",
            Key::EndTimestamp => "end_timestamp",
            Key::Attributes => "attributes",
            Key::Other => "",
        }
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Key, D::Error> {
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

struct KeyVisitor;

impl Visitor<'_> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
        Ok(match v {
            "trace_id" => Key::TraceId,
            "span_id" => Key::SpanId,
            "parent_span_id" => Key::ParentSpanId,
            "project_id" => Key::ProjectId,
            "is_segment" => Key::IsSegment,
            "received" => Key::Received,
            "start_timestamp" => Key::StartTimestamp,
            "end_timestamp" => Key::EndTimestamp,
            "attributes" => Key::Attributes,
            RESERVED_KEY => return Err(reserved_key_error()),
            _ => Key::Other,
        })
    }
}

impl<'de> Deserialize<'de> for SpanFields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(SpanVisitor)
    }
}

/// Depth of the span object itself.
const SPAN_DEPTH: usize = 1;

struct SpanVisitor;

impl<'de> Visitor<'de> for SpanVisitor {
    type Value = SpanFields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a span object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SpanFields<'de>, A::Error> {
        let mut fields = SpanFields::default();
        while let Some(key) = map.next_key::<Key>()? {
            let slot = match key {
                Key::TraceId => &mut fields.trace_id,
                Key::SpanId => &mut fields.span_id,
                Key::ParentSpanId => &mut fields.parent_span_id,
                Key::ProjectId => &mut fields.project_id,
                Key::IsSegment => &mut fields.is_segment,
                Key::Received => &mut fields.received,
                Key::StartTimestamp => &mut fields.start_timestamp,
                Key::EndTimestamp => &mut fields.end_timestamp,
                Key::Attributes => {
                    if std::mem::replace(&mut fields.has_attributes, true) {
                        return Err(de::Error::duplicate_field("attributes"));
                    }
                    fields.segment_id = map.next_value_seed(Lookup {
                        key: "sentry.segment.id",
                        depth: SPAN_DEPTH + 1,
                        inner: Lookup {
                            key: "value",
                            depth: SPAN_DEPTH + 2,
                            inner: OptionalField(SPAN_DEPTH + 2),
                        },
                    })?;
                    continue;
                }
                Key::Other => {
                    map.next_value_seed(Skip::below(SPAN_DEPTH))?;
                    continue;
                }
            };
            // A duplicate of a member spanbuf reads is ambiguous: the flusher's
            // parse keeps the last one, which may not be what was validated.
            if slot.is_some() {
                return Err(de::Error::duplicate_field(key.name()));
            }
            *slot = Some(map.next_value_seed(FieldSeed { depth: SPAN_DEPTH })?);
        }
        Ok(fields)
    }
}

/// Reads `object[key]` with `inner` from a value at `depth`; a value that is not
/// an object, or lacks the key, reads as `None`. Other members are skipped.
#[derive(Clone, Copy)]
struct Lookup<S> {
    key: &'static str,
    depth: usize,
    inner: S,
}

impl<'de, S, T> DeserializeSeed<'de> for Lookup<S>
where
    S: DeserializeSeed<'de, Value = Option<T>> + Copy,
{
    type Value = Option<T>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Option<T>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, S, T> Visitor<'de> for Lookup<S>
where
    S: DeserializeSeed<'de, Value = Option<T>> + Copy,
{
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<T>, A::Error> {
        if self.depth > MAX_DEPTH {
            return Err(too_deep_error());
        }
        let mut found = None;
        let mut seen = false;
        while let Some(is_key) = map.next_key_seed(KeyIs(Some(self.key)))? {
            if !is_key {
                map.next_value_seed(Skip::below(self.depth))?;
                continue;
            }
            if std::mem::replace(&mut seen, true) {
                return Err(de::Error::duplicate_field(self.key));
            }
            found = map.next_value_seed(self.inner)?;
        }
        Ok(found)
    }

    // Anything but an object: not the path spanbuf reads, but still walked so
    // the payload is validated like any other member.

    fn visit_unit<E: de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Option<T>, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Option<T>, A::Error> {
        if self.depth > MAX_DEPTH {
            return Err(too_deep_error());
        }
        Skip { depth: self.depth }.visit_seq(seq)?;
        Ok(None)
    }
}

/// [`FieldSeed`] as the innermost step of a [`Lookup`] path: the value's
/// enclosing object is at the given depth.
#[derive(Clone, Copy)]
struct OptionalField(usize);

impl<'de> DeserializeSeed<'de> for OptionalField {
    type Value = Option<Field<'de>>;

    fn deserialize<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Option<Field<'de>>, D::Error> {
        FieldSeed { depth: self.0 }
            .deserialize(deserializer)
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::{json, Value};

    use super::*;

    const TRACE: &str = "0123456789abcdef0123456789ABCDEF";
    const SPAN: &str = "a1b2c3d4e5f60718";
    const PARENT: &str = "b1b2c3d4e5f60718";
    const SEGMENT: &str = "c1b2c3d4e5f60718";
    const MAX: usize = 1 << 20;

    fn base() -> Value {
        json!({
            "trace_id": TRACE,
            "span_id": SPAN,
            "parent_span_id": PARENT,
            "project_id": 42,
            "organization_id": 1,
            "received": 1_700_000_000.25,
            "start_timestamp": 1_699_999_999.5,
            "end_timestamp": 1_700_000_000,
            "description": "GET /api/0/ — ünïcode",
            "attributes": {
                "sentry.op": {"type": "string", "value": "http.client"},
                "sentry.segment.id": {"type": "string", "value": SEGMENT},
            },
        })
    }

    fn with(mut v: Value, key: &str, field: Value) -> Value {
        v[key] = field;
        v
    }

    fn without(mut v: Value, key: &str) -> Value {
        if let Value::Object(map) = &mut v {
            map.remove(key);
        }
        v
    }

    fn json_bytes(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    fn decode_value(v: &Value) -> Result<Span, InvalidSpan> {
        decode_span(&json_bytes(v), MAX)
    }

    fn reason_of(bytes: &[u8]) -> InvalidReason {
        match decode_span(bytes, MAX) {
            Ok(span) => panic!("accepted {:?}: {span:?}", String::from_utf8_lossy(bytes)),
            Err(e) => e.reason,
        }
    }

    #[test]
    fn child_span_with_known_segment() {
        let input = json_bytes(&base());
        let span = decode_span(&input, MAX).unwrap();
        assert_eq!(
            span,
            Span {
                trace_id: TRACE.to_owned(),
                span_id: SPAN.to_owned(),
                parent_span_id: Some(PARENT.to_owned()),
                project_id: 42,
                is_segment_span: false,
                segment_id: Some(SEGMENT.to_owned()),
                received: Some(1_700_000_000.25),
                payload: Bytes::from(input.clone()),
            }
        );
        assert_eq!(span.effective_parent_id(), SEGMENT);
    }

    #[test]
    fn child_span_without_segment_id_points_at_parent() {
        let span = decode_value(&without(base(), "attributes")).unwrap();
        assert!(!span.is_segment_span);
        assert_eq!(span.segment_id, None);
        assert_eq!(span.effective_parent_id(), PARENT);
    }

    #[test]
    fn absent_or_null_parent_is_a_root() {
        for v in [
            without(base(), "parent_span_id"),
            with(base(), "parent_span_id", Value::Null),
        ] {
            let span = decode_value(&v).unwrap();
            assert_eq!(span.parent_span_id, None);
            assert!(span.is_segment_span);
            assert_eq!(span.effective_parent_id(), SPAN);
        }
    }

    #[test]
    fn is_segment_marks_a_root_despite_a_parent() {
        let span = decode_value(&with(base(), "is_segment", json!(true))).unwrap();
        assert_eq!(span.parent_span_id.as_deref(), Some(PARENT));
        assert!(span.is_segment_span);
        assert_eq!(span.effective_parent_id(), SPAN);

        for flag in [json!(false), Value::Null] {
            let span = decode_value(&with(base(), "is_segment", flag)).unwrap();
            assert!(!span.is_segment_span);
        }
    }

    #[test]
    fn segment_id_absent_paths_read_as_none() {
        for attributes in [
            Value::Null,
            json!("not an object"),
            json!([1, 2]),
            json!({}),
            json!({"sentry.segment.id": null}),
            json!({"sentry.segment.id": "c1b2c3d4e5f60718"}),
            json!({"sentry.segment.id": {"type": "string"}}),
            json!({"sentry.segment.id": {"type": "string", "value": null}}),
            json!({"sentry.segment.id.other": {"value": "zz"}}),
        ] {
            let span = decode_value(&with(base(), "attributes", attributes.clone()))
                .unwrap_or_else(|e| panic!("{attributes}: {e}"));
            assert_eq!(span.segment_id, None, "{attributes}");
        }
    }

    #[test]
    fn optional_numbers_accept_ints_floats_and_null() {
        for (value, received) in [
            (json!(5), Some(5.0)),
            (json!(-5), Some(-5.0)),
            (json!(1.5e9), Some(1.5e9)),
            (Value::Null, None),
        ] {
            let v = with(base(), "received", value.clone());
            let v = with(v, "start_timestamp", value.clone());
            let v = with(v, "end_timestamp", value);
            assert_eq!(decode_value(&v).unwrap().received, received);
        }
        assert_eq!(
            decode_value(&without(base(), "received")).unwrap().received,
            None
        );
    }

    #[test]
    fn project_id_takes_the_whole_u64_range() {
        for id in [0, u64::MAX] {
            let span = decode_value(&with(base(), "project_id", json!(id))).unwrap();
            assert_eq!(span.project_id, id);
        }
    }

    #[test]
    fn escaped_ids_are_unescaped() {
        let input = br#"{"trace_id":"0123456789abcdef0123456789ABCDEF","span_id":"\u0061\u0031b2c3d4e5f60718","project_id":1}"#;
        let span = decode_span(input, MAX).unwrap();
        assert_eq!(span.span_id, SPAN);
        assert_eq!(&span.payload[..], &input[..]);
    }

    #[test]
    fn payload_is_the_input_untouched() {
        let input = b" \n{ \"span_id\" : \"a1b2c3d4e5f60718\",\"trace_id\":\"0123456789abcdef0123456789ABCDEF\",\
            \"project_id\":7,\"z\":1.50, \"a\":[{},[]],\"z\":\"dup unknown keys are fine\"}\r\n\t";
        let span = decode_span(input, MAX).unwrap();
        assert_eq!(&span.payload[..], &input[..]);
        assert_eq!(span.project_id, 7);
    }

    #[test]
    fn too_large_is_checked_first_and_names_both_sizes() {
        let input = json_bytes(&base());
        let err = decode_span(&input, input.len() - 1).unwrap_err();
        assert_eq!(err.reason, InvalidReason::TooLarge);
        assert!(err.detail.contains(&input.len().to_string()), "{err}");
        assert!(err.detail.contains(&(input.len() - 1).to_string()), "{err}");
        assert!(decode_span(&input, input.len()).is_ok());
        // Not even looked at when too large.
        assert_eq!(
            decode_span(b"garbage", 3).unwrap_err().reason,
            InvalidReason::TooLarge
        );
    }

    #[test]
    fn bad_inputs_get_the_right_reason() {
        use InvalidReason::*;
        let mut cases: Vec<(String, Vec<u8>, InvalidReason)> = Vec::new();
        let mut case =
            |name: &str, bytes: Vec<u8>, reason| cases.push((name.to_owned(), bytes, reason));

        for field in ["trace_id", "span_id", "project_id"] {
            case(
                &format!("missing {field}"),
                json_bytes(&without(base(), field)),
                MissingField,
            );
            case(
                &format!("null {field}"),
                json_bytes(&with(base(), field, Value::Null)),
                MissingField,
            );
        }
        for (field, len) in [("trace_id", 32), ("span_id", 16), ("parent_span_id", 16)] {
            for wrong in [
                json!(12),
                json!(1.5),
                json!(true),
                json!([]),
                json!({}),
                json!(-1),
            ] {
                case(
                    &format!("{field} = {wrong}"),
                    json_bytes(&with(base(), field, wrong)),
                    BadType,
                );
            }
            for bad in [
                "a".repeat(len - 1),
                "a".repeat(len + 1),
                String::new(),
                format!("{}g", "a".repeat(len - 1)),
                format!("{}-", "a".repeat(len - 1)),
                format!("{}é", "a".repeat(len - 1)),
                format!(" {}", "a".repeat(len - 1)),
            ] {
                case(
                    &format!("{field} = {bad:?}"),
                    json_bytes(&with(base(), field, json!(bad))),
                    BadId,
                );
            }
        }
        for wrong in [
            json!(1.0),
            json!(-1),
            json!("1"),
            json!(true),
            json!([1]),
            json!({}),
            json!(1e30),
        ] {
            case(
                &format!("project_id = {wrong}"),
                json_bytes(&with(base(), "project_id", wrong)),
                BadType,
            );
        }
        case(
            "project_id over u64",
            br#"{"trace_id":"0123456789abcdef0123456789ABCDEF","span_id":"a1b2c3d4e5f60718","project_id":18446744073709551616}"#.to_vec(),
            BadType,
        );
        for wrong in [json!("true"), json!(1), json!([]), json!({})] {
            case(
                &format!("is_segment = {wrong}"),
                json_bytes(&with(base(), "is_segment", wrong)),
                BadType,
            );
        }
        for field in ["received", "start_timestamp", "end_timestamp"] {
            for wrong in [
                json!("1700000000"),
                json!(true),
                json!([1]),
                json!({"s": 1}),
            ] {
                case(
                    &format!("{field} = {wrong}"),
                    json_bytes(&with(base(), field, wrong)),
                    BadType,
                );
            }
        }
        for wrong in [json!(1), json!(true), json!([]), json!({})] {
            let attributes = json!({"sentry.segment.id": {"type": "string", "value": wrong}});
            case(
                &format!("segment id = {wrong}"),
                json_bytes(&with(base(), "attributes", attributes)),
                BadType,
            );
        }
        for bad in ["c1b2", "c1b2c3d4e5f6071x", "c1b2c3d4e5f607181"] {
            let attributes = json!({"x": 1, "sentry.segment.id": {"value": bad, "type": "string"}});
            case(
                &format!("segment id = {bad}"),
                json_bytes(&with(base(), "attributes", attributes)),
                BadId,
            );
        }

        let valid = json_bytes(&base());
        case("empty", Vec::new(), Malformed);
        case("whitespace only", b" \n\t".to_vec(), Malformed);
        case("not JSON", b"hello".to_vec(), Malformed);
        case("JSON array", b"[1,2,3]".to_vec(), Malformed);
        case("JSON string", b"\"span\"".to_vec(), Malformed);
        case("JSON null", b"null".to_vec(), Malformed);
        case("JSON number", b"17".to_vec(), Malformed);
        case("truncated", valid[..valid.len() - 1].to_vec(), Malformed);
        case(
            "truncated mid-way",
            valid[..valid.len() / 2].to_vec(),
            Malformed,
        );
        case("only a brace", b"{".to_vec(), Malformed);
        case("trailing garbage", [&valid[..], b"x"].concat(), Malformed);
        case("two objects", [&valid[..], &valid[..]].concat(), Malformed);
        case(
            "trailing comma",
            [&valid[..valid.len() - 1], b",}"].concat(),
            Malformed,
        );
        let mut invalid_utf8 = valid.clone();
        let at = invalid_utf8.windows(4).position(|w| w == b"GET ").unwrap();
        invalid_utf8[at] = 0xff;
        case("invalid UTF-8 in an unknown field", invalid_utf8, Malformed);
        case(
            "invalid UTF-8 in a key",
            [b"{\"\xc3\x28\":1,", &valid[1..]].concat(),
            Malformed,
        );
        case(
            "NUL byte",
            [&valid[..valid.len() - 1], b",\"k\":\"a\x00b\"}"].concat(),
            Malformed,
        );
        let with_flag = json_bytes(&with(base(), "is_segment", json!(false)));
        for field in [
            "trace_id",
            "span_id",
            "project_id",
            "parent_span_id",
            "is_segment",
            "received",
            "attributes",
        ] {
            let dup = format!(",\"{field}\":null}}");
            case(
                &format!("duplicate {field}"),
                [&with_flag[..with_flag.len() - 1], dup.as_bytes()].concat(),
                Malformed,
            );
        }
        case(
            "duplicate segment id attribute",
            format!(
                r#"{{"trace_id":"{TRACE}","span_id":"{SPAN}","project_id":1,"attributes":{{
                    "sentry.segment.id":{{"value":"{SEGMENT}"}},"sentry.segment.id":{{"value":null}}}}}}"#
            )
            .into_bytes(),
            Malformed,
        );
        case(
            "duplicate segment id value",
            format!(
                r#"{{"trace_id":"{TRACE}","span_id":"{SPAN}","project_id":1,"attributes":{{
                    "sentry.segment.id":{{"value":"{SEGMENT}","value":"{SEGMENT}"}}}}}}"#
            )
            .into_bytes(),
            Malformed,
        );
        // What serde_json's Value parser (the flusher) would refuse, in fields
        // spanbuf does not read.
        case(
            "lone surrogate",
            [&valid[..valid.len() - 1], br#","k":"\ud800"}"#].concat(),
            Malformed,
        );
        case(
            "number out of range",
            [&valid[..valid.len() - 1], br#","k":[1e400]}"#].concat(),
            Malformed,
        );
        case(
            "reserved raw-value key",
            [
                &valid[..valid.len() - 1],
                br#","k":{"$serde_json::private::RawValue":1}}"#,
            ]
            .concat(),
            Malformed,
        );
        case(
            "msgpack: a fixmap of nothing but garbage",
            vec![0x81, 0xc1],
            Malformed,
        );
        case("msgpack: truncated map", vec![0x82, 0xa1, b'a'], Malformed);

        for (name, bytes, reason) in cases {
            let got = decode_span(&bytes, MAX);
            match got {
                Ok(span) => panic!("{name}: accepted as {span:?}"),
                Err(e) => {
                    assert_eq!(e.reason, reason, "{name}: {e}");
                    assert!(!e.detail.is_empty(), "{name}");
                }
            }
        }
    }

    #[test]
    fn details_name_the_field() {
        let err = decode_value(&with(base(), "span_id", json!("a".repeat(15)))).unwrap_err();
        assert_eq!(err.detail, "span_id: expected 16 hex characters, got 15");
        assert_eq!(
            err.to_string(),
            "bad_id: span_id: expected 16 hex characters, got 15"
        );

        let err = decode_value(&with(
            base(),
            "trace_id",
            json!(format!("{}z", "a".repeat(31))),
        ))
        .unwrap_err();
        assert_eq!(
            err.detail,
            "trace_id: expected 32 hex characters, found 'z'"
        );

        let err = decode_value(&with(base(), "project_id", json!(1.0))).unwrap_err();
        assert_eq!(
            err.detail,
            "project_id: expected an unsigned integer, got a float"
        );

        let err = decode_value(&without(base(), "trace_id")).unwrap_err();
        assert_eq!(err.detail, "trace_id: required field is missing");
    }

    #[test]
    fn reasons_have_stable_names() {
        let names: Vec<&str> = InvalidReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names,
            [
                "malformed",
                "missing_field",
                "bad_id",
                "bad_type",
                "too_large"
            ]
        );
        for reason in InvalidReason::ALL {
            assert_eq!(reason.to_string(), reason.as_str());
        }
    }

    fn nested(depth: usize) -> Value {
        let mut v = json!(1);
        for _ in 0..depth {
            v = json!([v]);
        }
        v
    }

    #[test]
    fn nesting_limit_matches_serde_json() {
        // The span object is level 1, so `depth` arrays under one key reach
        // level depth + 1.
        for depth in [MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 5] {
            let v = with(base(), "deep", nested(depth));
            let mut attributes_path = base();
            attributes_path["attributes"]["deep"] = nested(depth - 1);
            for v in [v, attributes_path] {
                let bytes = json_bytes(&v);
                let parsed = serde_json::from_slice::<Value>(&bytes);
                let json = decode_span(&bytes, MAX);
                let msgpack = decode_span(&rmp_serde::to_vec_named(&v).unwrap(), MAX);
                assert_eq!(json.is_ok(), parsed.is_ok(), "depth {depth}: {json:?}");
                assert_eq!(
                    msgpack.is_ok(),
                    parsed.is_ok(),
                    "depth {depth}: {msgpack:?}"
                );
                assert_eq!(json.is_ok(), depth < MAX_DEPTH, "depth {depth}");
            }
        }
    }

    #[test]
    fn messagepack_decodes_like_json_and_stores_json() {
        let variants = [
            base(),
            without(base(), "parent_span_id"),
            with(base(), "is_segment", json!(true)),
            without(base(), "attributes"),
            with(
                base(),
                "nested",
                json!({"a": [1, -2, 3.5, null, true, "x"], "b": {}}),
            ),
        ];
        for v in variants {
            let packed = rmp_serde::to_vec_named(&v).unwrap();
            let from_json = decode_value(&v).unwrap();
            let from_msgpack = decode_span(&packed, MAX).unwrap();
            assert_eq!(
                Span {
                    payload: from_json.payload.clone(),
                    ..from_msgpack.clone()
                },
                from_json
            );
            let stored: Value = serde_json::from_slice(&from_msgpack.payload).unwrap();
            assert_eq!(stored, v);
            assert!(!from_msgpack.payload.contains(&0));
        }
    }

    #[test]
    fn messagepack_map16_and_map32_markers_are_accepted() {
        let mut v = base();
        for i in 0..20 {
            v[format!("extra{i}")] = json!(i);
        }
        let packed = rmp_serde::to_vec_named(&v).unwrap();
        assert_eq!(packed[0], 0xde);
        assert_eq!(decode_span(&packed, MAX).unwrap().span_id, SPAN);

        // The same map with a map32 header.
        let len = u32::from(u16::from_be_bytes([packed[1], packed[2]]));
        let mut map32 = vec![0xdf];
        map32.extend_from_slice(&len.to_be_bytes());
        map32.extend_from_slice(&packed[3..]);
        assert_eq!(decode_span(&map32, MAX).unwrap().span_id, SPAN);
    }

    #[test]
    fn messagepack_validates_the_same_fields() {
        for (v, reason) in [
            (without(base(), "span_id"), InvalidReason::MissingField),
            (with(base(), "span_id", json!("abc")), InvalidReason::BadId),
            (
                with(base(), "project_id", json!(1.0)),
                InvalidReason::BadType,
            ),
            (
                with(base(), "project_id", json!(-3)),
                InvalidReason::BadType,
            ),
            (
                with(base(), "received", json!("now")),
                InvalidReason::BadType,
            ),
        ] {
            let packed = rmp_serde::to_vec_named(&v).unwrap();
            assert_eq!(decode_span(&packed, MAX).unwrap_err().reason, reason, "{v}");
        }
    }

    #[test]
    fn messagepack_anomalies_are_malformed() {
        let packed = rmp_serde::to_vec_named(&base()).unwrap();
        // Trailing data.
        assert_eq!(
            reason_of(&[&packed[..], &[0xc0]].concat()),
            InvalidReason::Malformed
        );
        // Truncated.
        assert_eq!(
            reason_of(&packed[..packed.len() - 3]),
            InvalidReason::Malformed
        );
        // Whitespace before a map is not MessagePack.
        assert_eq!(
            reason_of(&[b" ", &packed[..]].concat()),
            InvalidReason::Malformed
        );
        // Integer key.
        assert_eq!(reason_of(&[0x81, 0x01, 0x02]), InvalidReason::Malformed);
        // Binary value, invalid UTF-8 string, extension type.
        assert_eq!(
            reason_of(&[0x81, 0xa1, b'k', 0xc4, 0x01, 0x00]),
            InvalidReason::Malformed
        );
        assert_eq!(
            reason_of(&[0x81, 0xa1, b'k', 0xa1, 0xff]),
            InvalidReason::Malformed
        );
        assert_eq!(
            reason_of(&[0x81, 0xa1, b'k', 0xd4, 0x01, 0x00]),
            InvalidReason::Malformed
        );
        // A map claiming 2^32-1 entries must fail fast, not allocate.
        assert_eq!(
            reason_of(&[0xdf, 0xff, 0xff, 0xff, 0xff]),
            InvalidReason::Malformed
        );
        // serde_json's reserved key, in any position.
        for key_first in [true, false] {
            let mut map = serde_json::Map::new();
            if key_first {
                map.insert(RESERVED_KEY.to_owned(), json!("[1]"));
            }
            map.insert("zzz".to_owned(), json!(1));
            if !key_first {
                map.insert(RESERVED_KEY.to_owned(), json!(5));
            }
            let v = with(base(), "k", Value::Object(map));
            let packed = rmp_serde::to_vec_named(&v).unwrap();
            let result = decode_span(&packed, MAX);
            if let Ok(span) = &result {
                serde_json::from_slice::<Value>(&span.payload).unwrap();
            }
            if !key_first {
                assert_eq!(result.unwrap_err().reason, InvalidReason::Malformed);
            }
        }
    }

    /// Bytes derived from a valid span by random edits: far more likely than
    /// uniform noise to get past the first byte and into the parsers.
    fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
        let mut bytes = seed.to_vec();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..=bytes.len());
            match rng.random_range(0..4) {
                0 if at < bytes.len() => bytes[at] = rng.random(),
                1 => bytes.insert(at, rng.random()),
                2 if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ => bytes.truncate(at),
            }
        }
        bytes
    }

    #[test]
    fn random_input_never_panics() {
        let mut rng = StdRng::seed_from_u64(0x5eed_5ba9);
        let json_seed = json_bytes(&base());
        let msgpack_seed = rmp_serde::to_vec_named(&base()).unwrap();
        let mut accepted = 0;
        for i in 0..10_000 {
            let bytes = match i % 4 {
                0 => {
                    let len = rng.random_range(0..64);
                    (0..len).map(|_| rng.random()).collect()
                }
                1 => {
                    let len = rng.random_range(1..64);
                    let mut b: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                    b[0] = [b'{', 0x85, 0xde, 0xdf][rng.random_range(0..4)];
                    b
                }
                2 => mutate(&mut rng, &json_seed),
                _ => mutate(&mut rng, &msgpack_seed),
            };
            if let Ok(span) = decode_span(&bytes, 4096) {
                accepted += 1;
                serde_json::from_slice::<Value>(&span.payload).unwrap_or_else(|e| {
                    panic!("accepted {bytes:?} but the payload does not parse: {e}")
                });
                assert!(!span.payload.contains(&0));
            }
        }
        // The mutations keep a fair share valid; the test exercises both paths.
        assert!(accepted > 100, "only {accepted} accepted");
    }
}
