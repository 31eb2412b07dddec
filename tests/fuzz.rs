//! Property tests of the input boundary: the span decoder (docs/design.md §2) and
//! in-batch grouping (docs/design.md §5 step 2) on arbitrary and near-valid input.
//!
//! - `decode_span` never panics; what it accepts has well-formed ids and a
//!   payload the flusher can parse; valid spans keep their fields; one
//!   mutation of a valid span gets the reason the decoder documents.
//! - `decode_batch` sorts every message into exactly one of spans / invalid
//!   and counts the invalid ones by reason.
//! - `group` never panics on any batch (cycles, self-parents, duplicates,
//!   missing parents), partitions it by (project, trace, parent), and on
//!   well-formed forests puts every span under its top-most in-batch
//!   ancestor, a segment root heading its own subsegment.
//!
//! Every property runs [`CASES`] cases with no failure persistence: a failure
//! prints its shrunk input, and CI runs start from a fresh clone anyway.
//! Generators expand cheap seeds where proptest's per-element trees would
//! be slow in a debug build.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{json, Value};

use spanbuf::ingest::{decode_batch, group, ShardedSpan, Subsegment};
use spanbuf::metrics::Metrics;
use spanbuf::span::{decode_span, InvalidReason, Span};

const CASES: u32 = 10_000;

/// The decoder's nesting limit (the span object is level 1), from its docs.
const MAX_DEPTH: usize = 127;

const RESERVED_KEY: &str = "$serde_json::private::RawValue";

/// Generous limit for tests that are not about size.
const BIG: usize = 1 << 20;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Small deterministic expansion of a seed, for cheap bulk bytes.

struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

// ---------------------------------------------------------------------------
// Checks shared by every decode property.

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// What holds for any input: size first, then either a well-formed span whose
/// payload the flusher can parse (and agrees with it), or a reason with a detail.
fn check_outcome(bytes: &[u8], max: usize) -> Result<Result<Span, InvalidReason>, TestCaseError> {
    let result = decode_span(bytes, max);
    if bytes.len() > max {
        let reason = result.as_ref().err().map(|e| e.reason);
        prop_assert_eq!(
            reason,
            Some(InvalidReason::TooLarge),
            "{} > {}",
            bytes.len(),
            max
        );
    }
    match result {
        Err(e) => {
            prop_assert!(InvalidReason::ALL.contains(&e.reason));
            prop_assert!(!e.detail.is_empty());
            if bytes.len() <= max {
                prop_assert_ne!(e.reason, InvalidReason::TooLarge, "{}", e);
            }
            Ok(Err(e.reason))
        }
        Ok(span) => {
            prop_assert!(is_hex(&span.trace_id, 32), "{:?}", span.trace_id);
            prop_assert!(is_hex(&span.span_id, 16), "{:?}", span.span_id);
            for id in span.parent_span_id.iter().chain(&span.segment_id) {
                prop_assert!(is_hex(id, 16), "{:?}", id);
            }
            if span.parent_span_id.is_none() {
                prop_assert!(span.is_segment_span);
            }
            prop_assert!(!span.payload.contains(&0), "payload holds a NUL byte");
            let stored: Value = match serde_json::from_slice(&span.payload) {
                Ok(v) => v,
                Err(e) => return Err(TestCaseError::fail(format!("payload does not parse: {e}"))),
            };
            prop_assert_eq!(stored["trace_id"].as_str(), Some(span.trace_id.as_str()));
            prop_assert_eq!(stored["span_id"].as_str(), Some(span.span_id.as_str()));
            prop_assert_eq!(stored["project_id"].as_u64(), Some(span.project_id));
            let json_input = bytes.iter().find(|b| !b" \t\r\n".contains(*b)) == Some(&b'{');
            if json_input {
                prop_assert_eq!(&span.payload[..], bytes, "JSON is stored untouched");
            }
            Ok(Ok(span))
        }
    }
}

// ---------------------------------------------------------------------------
// Property 1: arbitrary bytes.

const JSON_TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ":",
    ",",
    " ",
    "\n",
    "\\",
    "\\u",
    "\\ud800",
    "\\u0041",
    "\"trace_id\"",
    "\"span_id\"",
    "\"parent_span_id\"",
    "\"project_id\"",
    "\"is_segment\"",
    "\"received\"",
    "\"start_timestamp\"",
    "\"attributes\"",
    "\"sentry.segment.id\"",
    "\"value\"",
    "\"$serde_json::private::RawValue\"",
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1.5",
    "1e400",
    "18446744073709551616",
    "\"0123456789abcdef\"",
    "\"0123456789abcdef0123456789abcdef\"",
    "\"é\"",
    "\u{FEFF}",
];

const MSGPACK_BYTES: &[u8] = &[
    0x80, 0x81, 0x8f, 0x90, 0x91, 0xa0, 0xa1, 0xa7, 0xa8, 0xb0, 0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xca,
    0xcb, 0xcc, 0xcf, 0xd0, 0xd3, 0xd4, 0xd9, 0xdc, 0xdd, 0xde, 0xdf, 0xe0, 0xff, 0x00, 0x7f, b'a',
    b'0', b'_',
];

/// `mode` picks the flavour of noise: raw bytes, raw bytes after a byte that
/// routes to a parser, JSON token soup, or MessagePack marker soup.
fn noise(mode: u8, seed: u64, len: usize) -> Vec<u8> {
    let mut rng = XorShift::new(seed);
    let mut out = Vec::with_capacity(len + 16);
    match mode {
        0 => out.extend((0..len).map(|_| rng.next() as u8)),
        1 => {
            out.push(*rng.pick(b"{ \x80\x85\x8f\xde\xdf"));
            out.extend((1..len).map(|_| rng.next() as u8));
        }
        2 => {
            out.push(b'{');
            while out.len() < len {
                if rng.below(16) == 0 {
                    out.push(rng.next() as u8);
                } else {
                    out.extend_from_slice(rng.pick(JSON_TOKENS).as_bytes());
                }
            }
        }
        _ => {
            out.push(*rng.pick(&[0x81, 0x83, 0x8f, 0xde, 0xdf]));
            while out.len() < len {
                if rng.below(4) == 0 {
                    out.push(rng.next() as u8);
                } else {
                    out.push(*rng.pick(MSGPACK_BYTES));
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic(
        mode in 0u8..4,
        seed in any::<u64>(),
        len in 0usize..4096,
        max in prop_oneof![Just(4096usize), 64usize..5000],
    ) {
        let bytes = noise(mode, seed, len);
        let _ = check_outcome(&bytes, max)?;
    }
}

// ---------------------------------------------------------------------------
// Generated spans: an ordered list of members, encoded by hand so member
// order, whitespace, duplicate keys and raw tokens can all be controlled.

/// One member value: a JSON value, raw JSON text, or raw MessagePack bytes.
#[derive(Debug, Clone)]
enum Tok {
    V(Value),
    RawJson(String),
    RawMsgpack(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Member {
    /// `None`: an integer key (MessagePack only).
    key: Option<String>,
    /// The key as raw JSON text instead of `key` (e.g. with a lone surrogate).
    raw_key: Option<String>,
    value: Tok,
}

fn member(key: &str, value: Value) -> Member {
    Member {
        key: Some(key.to_owned()),
        raw_key: None,
        value: Tok::V(value),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Enc {
    Json,
    JsonSpaced,
    Msgpack,
    /// MessagePack with a map32 header for the span object.
    Msgpack32,
}

impl Enc {
    fn is_json(self) -> bool {
        matches!(self, Enc::Json | Enc::JsonSpaced)
    }
}

fn encode(members: &[Member], enc: Enc) -> Vec<u8> {
    match enc {
        Enc::Json => encode_json(members, ""),
        Enc::JsonSpaced => [b" \n\t".as_slice(), &encode_json(members, " \n ")].concat(),
        Enc::Msgpack | Enc::Msgpack32 => encode_msgpack(members, enc == Enc::Msgpack32),
    }
}

fn encode_json(members: &[Member], ws: &str) -> Vec<u8> {
    let mut out = String::from("{");
    out.push_str(ws);
    for (i, m) in members.iter().enumerate() {
        if i > 0 {
            out.push_str(ws);
            out.push(',');
            out.push_str(ws);
        }
        match (&m.raw_key, &m.key) {
            (Some(raw), _) => out.push_str(raw),
            (None, Some(key)) => out.push_str(&Value::from(key.as_str()).to_string()),
            (None, None) => out.push('1'),
        }
        out.push_str(ws);
        out.push(':');
        out.push_str(ws);
        match &m.value {
            Tok::V(v) => out.push_str(&v.to_string()),
            Tok::RawJson(raw) => out.push_str(raw),
            Tok::RawMsgpack(_) => out.push_str("null"),
        }
    }
    out.push_str(ws);
    out.push('}');
    out.into_bytes()
}

fn msgpack_str(out: &mut Vec<u8>, s: &str) {
    let n = s.len();
    if n < 32 {
        out.push(0xa0 | n as u8);
    } else if n < 256 {
        out.extend([0xd9, n as u8]);
    } else {
        out.push(0xdb);
        out.extend((n as u32).to_be_bytes());
    }
    out.extend_from_slice(s.as_bytes());
}

fn encode_msgpack(members: &[Member], map32: bool) -> Vec<u8> {
    let n = members.len();
    let mut out = Vec::new();
    if map32 {
        out.push(0xdf);
        out.extend((n as u32).to_be_bytes());
    } else if n < 16 {
        out.push(0x80 | n as u8);
    } else {
        out.push(0xde);
        out.extend((n as u16).to_be_bytes());
    }
    for m in members {
        match &m.key {
            Some(key) => msgpack_str(&mut out, key),
            None => out.push(0x01),
        }
        match &m.value {
            Tok::V(v) => out.extend(rmp_serde::to_vec_named(v).expect("msgpack")),
            Tok::RawMsgpack(raw) => out.extend_from_slice(raw),
            Tok::RawJson(_) => out.push(0xc0),
        }
    }
    out
}

/// A map serialized in the given member order (serde_json's Map sorts).
struct Ordered<'a>(&'a [(String, Value)]);

impl Serialize for Ordered<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

// ---------------------------------------------------------------------------
// Strategies.

fn hex_id(len: usize) -> impl Strategy<Value = String> {
    (any::<u128>(), any::<u32>()).prop_map(move |(bits, upper)| {
        format!("{bits:032x}")[..len]
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if (upper >> (i % 32)) & 1 == 1 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect()
    })
}

/// Characters for generated strings: ASCII, JSON's escapes and control
/// characters, and multi-byte UTF-8 (2, 3 and 4 bytes, BOM, line separator).
const CHARS: &[char] = &[
    'a',
    'Z',
    '0',
    '9',
    ' ',
    '"',
    '\\',
    '/',
    '\u{0}',
    '\u{1}',
    '\n',
    '\t',
    '\u{1f}',
    '\u{7f}',
    'é',
    'ß',
    '０',
    '中',
    '\u{fffd}',
    '\u{feff}',
    '\u{2028}',
    '\u{1F600}',
    '\u{10FFFF}',
];

fn text_from(rng: &mut XorShift, max_len: usize) -> String {
    let len = rng.below(max_len + 1);
    (0..len).map(|_| *rng.pick(CHARS)).collect()
}

fn short_float_from(rng: &mut XorShift) -> f64 {
    const POW10: [f64; 7] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6];
    let m = (rng.next() >> 23) as i64 - (1 << 40);
    m as f64 / POW10[rng.below(7)]
}

/// JSON value kinds, for [`junk_from`].
const NULL: u8 = 0;
const BOOL: u8 = 1;
const INT: u8 = 2;
const UINT: u8 = 3;
const FLOAT: u8 = 4;
const STRING: u8 = 5;
const ARRAY: u8 = 6;
const OBJECT: u8 = 7;
const ANY_KIND: &[u8] = &[NULL, BOOL, INT, UINT, FLOAT, STRING, ARRAY, OBJECT];

/// A JSON value of one of `kinds` at the top, anything below, `depth` levels
/// at most. Expanded from a seed: proptest's recursive value trees are slow
/// in a debug build, and 10,000 cases of them blow the time budget.
fn junk_from(rng: &mut XorShift, kinds: &[u8], depth: usize) -> Value {
    let kinds = if depth == 0 {
        &kinds[..kinds
            .iter()
            .position(|k| *k >= ARRAY)
            .unwrap_or(kinds.len())]
    } else {
        kinds
    };
    match kinds
        .get(rng.below(kinds.len().max(1)))
        .copied()
        .unwrap_or(NULL)
    {
        NULL => Value::Null,
        BOOL => Value::Bool(rng.next() & 1 == 1),
        INT => Value::from(rng.next() as i64 | i64::MIN),
        UINT => Value::from(match rng.below(3) {
            0 => u64::MAX,
            1 => rng.next() >> rng.below(64),
            _ => rng.below(1000) as u64,
        }),
        FLOAT => Value::from(short_float_from(rng)),
        STRING => Value::from(text_from(rng, 10)),
        ARRAY => (0..rng.below(4))
            .map(|_| junk_from(rng, ANY_KIND, depth - 1))
            .collect(),
        _ => Value::Object(
            (0..rng.below(4))
                .map(|_| (text_from(rng, 6), junk_from(rng, ANY_KIND, depth - 1)))
                .collect(),
        ),
    }
}

fn junk_of(kinds: &'static [u8]) -> impl Strategy<Value = Value> {
    any::<u64>().prop_map(move |seed| junk_from(&mut XorShift::new(seed), kinds, 3))
}

/// The fields spanbuf reads, as generated, and the members of the span.
#[derive(Debug, Clone)]
struct Valid {
    trace_id: String,
    span_id: String,
    parent: Option<String>,
    project_id: u64,
    is_segment: Option<bool>,
    segment_id: Option<String>,
    received: Option<f64>,
    members: Vec<Member>,
}

fn attributes(choice: u8, segment: &str, other: Value) -> (Option<Value>, Option<String>) {
    match choice {
        0 => (None, None),
        1 => (
            Some(json!({"sentry.op": {"type": "string", "value": other}})),
            None,
        ),
        2 => (
            Some(json!({"sentry.op": other,
                        "sentry.segment.id": {"type": "string", "value": segment}})),
            Some(segment.to_owned()),
        ),
        3 => (
            Some(json!({"sentry.segment.id": {"type": "string", "value": null}})),
            None,
        ),
        4 => (Some(json!({"sentry.segment.id": segment})), None),
        5 => (Some(json!({"sentry.segment.id": {"type": "string"}})), None),
        6 => (
            Some(json!([segment, {"sentry.segment.id": {"value": 1}}])),
            None,
        ),
        _ => (Some(other), None),
    }
}

/// An optional number member: absent, null, or a number of any JSON kind.
fn number_member() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(Value::Null)),
        any::<u64>().prop_map(|v| Some(v.into())),
        any::<i64>().prop_map(|v| Some(v.into())),
        any::<u64>().prop_map(|seed| Some(short_float_from(&mut XorShift::new(seed)).into())),
    ]
}

/// An optional member by `choice`: 0 absent, 1 null, else `value`.
fn optional<T: Into<Value> + Clone>(
    members: &mut Vec<Member>,
    name: &str,
    choice: u8,
    value: T,
) -> Option<T> {
    match choice {
        0 => None,
        1 => {
            members.push(member(name, Value::Null));
            None
        }
        _ => {
            members.push(member(name, value.clone().into()));
            Some(value)
        }
    }
}

fn valid_span() -> impl Strategy<Value = Valid> {
    let ids = (hex_id(32), hex_id(16), 0u8..3, hex_id(16), any::<u64>());
    let flags = (0u8..3, any::<bool>(), 0u8..8, hex_id(16), junk_of(ANY_KIND));
    let numbers = (number_member(), number_member(), number_member());
    let extras = (0usize..5, any::<u64>()).prop_map(|(n, seed)| {
        let mut rng = XorShift::new(seed);
        (0..n)
            .map(|_| {
                (
                    format!("x{}", text_from(&mut rng, 6)),
                    junk_from(&mut rng, ANY_KIND, 3),
                )
            })
            .collect::<Vec<_>>()
    });
    (ids, flags, numbers, extras, any::<u64>()).prop_map(
        |(
            (trace_id, span_id, parent_choice, parent_id, project_id),
            (seg_choice, seg_flag, attr_choice, segment, other),
            (received, start, end),
            extras,
            order,
        )| {
            let mut members = vec![
                member("trace_id", trace_id.clone().into()),
                member("span_id", span_id.clone().into()),
                member("project_id", project_id.into()),
            ];
            let parent = optional(&mut members, "parent_span_id", parent_choice, parent_id);
            let is_segment = optional(&mut members, "is_segment", seg_choice, seg_flag);
            let (attrs, segment_id) = attributes(attr_choice, &segment, other);
            if let Some(attrs) = attrs {
                members.push(member("attributes", attrs));
            }
            let received_f = received.as_ref().and_then(Value::as_f64);
            for (name, value) in [
                ("received", received),
                ("start_timestamp", start),
                ("end_timestamp", end),
            ] {
                if let Some(value) = value {
                    members.push(member(name, value));
                }
            }
            // Extras keep distinct keys: a duplicate of a key nobody reads is
            // the flusher's business only, and serde_json keeps the last.
            let mut seen = BTreeSet::new();
            for (key, value) in extras {
                if seen.insert(key.clone()) {
                    members.push(member(&key, value));
                }
            }
            shuffle(&mut members, order);
            Valid {
                trace_id,
                span_id,
                parent,
                project_id,
                is_segment,
                segment_id,
                received: received_f,
                members,
            }
        },
    )
}

fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = XorShift::new(seed);
    for i in (1..items.len()).rev() {
        items.swap(i, rng.below(i + 1));
    }
}

fn encoding() -> impl Strategy<Value = Enc> {
    prop::sample::select(vec![
        Enc::Json,
        Enc::JsonSpaced,
        Enc::Msgpack,
        Enc::Msgpack32,
    ])
}

// ---------------------------------------------------------------------------
// Property 2: valid spans decode with their fields; one byte over the limit
// is too large.

proptest! {
    #![proptest_config(config())]

    #[test]
    fn valid_spans_decode_with_their_fields(
        valid in valid_span(),
        enc in encoding(),
        slack in 0usize..64,
    ) {
        let bytes = encode(&valid.members, enc);
        let span = match check_outcome(&bytes, bytes.len() + slack)? {
            Ok(span) => span,
            Err(reason) => {
                return Err(TestCaseError::fail(format!("refused as {reason}: {valid:?}")))
            }
        };
        prop_assert_eq!(&span.trace_id, &valid.trace_id);
        prop_assert_eq!(&span.span_id, &valid.span_id);
        prop_assert_eq!(&span.parent_span_id, &valid.parent);
        prop_assert_eq!(span.project_id, valid.project_id);
        prop_assert_eq!(&span.segment_id, &valid.segment_id);
        prop_assert_eq!(span.received, valid.received);
        prop_assert_eq!(
            span.is_segment_span,
            valid.parent.is_none() || valid.is_segment == Some(true)
        );
        if !enc.is_json() {
            let stored: Value = serde_json::from_slice(&span.payload).expect("checked");
            let fields: Vec<(String, Value)> = valid
                .members
                .iter()
                .filter_map(|m| match &m.value {
                    Tok::V(v) => Some((m.key.clone()?, v.clone())),
                    _ => None,
                })
                .collect();
            let original: Value =
                serde_json::from_slice(&serde_json::to_vec(&Ordered(&fields)).expect("json"))
                    .expect("json");
            prop_assert_eq!(stored, original, "MessagePack is stored as the same JSON");
        }
        let reason = decode_span(&bytes, bytes.len() - 1).err().map(|e| e.reason);
        prop_assert_eq!(reason, Some(InvalidReason::TooLarge));
    }
}

// ---------------------------------------------------------------------------
// Property 3: one mutation of a valid span gets the documented reason.

#[derive(Debug, Clone, Copy)]
enum Id {
    Trace,
    Span,
    Parent,
    Segment,
}

impl Id {
    fn len(self) -> usize {
        match self {
            Id::Trace => 32,
            _ => 16,
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    /// A required member removed (0 trace, 1 span, 2 project).
    Remove(u8),
    /// A required member set to null.
    Null(u8),
    /// An id of a type other than string (or null).
    IdType(Id, Value),
    /// An id string of the wrong length or with a non-hex character.
    IdBad(Id, String),
    /// `project_id` of a type other than unsigned integer, or raw JSON
    /// numbers that parse as floats.
    Project(Tok),
    IsSegment(Value),
    /// `received` / `start_timestamp` / `end_timestamp` of a non-number type.
    Timestamp(u8, Value),
    /// A member spanbuf reads, twice.
    Duplicate(u8),
    /// Nesting to `level` (the span object is level 1) at one of three places.
    Deep(u8, usize, bool),
    /// serde_json's reserved key at one of four places.
    Reserved(u8),
    /// A raw JSON extra member: lone surrogate, number out of range, big
    /// number, invalid UTF-8 in a string, … with whether it is valid.
    RawExtra(String, bool),
    /// A lone surrogate in a key.
    SurrogateKey,
    /// The encoding cut short by this many bytes (at least one).
    Truncate(usize),
    /// Bytes after the span: whitespace (fine for JSON) or anything else.
    Trailing(Vec<u8>),
    /// A MessagePack value spanbuf cannot store as JSON: bin, ext, invalid
    /// UTF-8 string, or an integer key.
    MsgpackOdd(u8),
    /// The map header claims one member more or less than there are.
    MsgpackCount(bool),
    /// Wrong-encoding prefixes: a UTF-8 BOM, UTF-16.
    Prefix(u8),
}

fn bad_id(id: Id) -> impl Strategy<Value = String> {
    let len = id.len();
    let wrong_len = (0usize..40, any::<u128>())
        .prop_filter("the right length", move |(n, _)| *n != len)
        .prop_map(|(n, bits)| format!("{bits:032x}{bits:032x}")[..n].to_owned());
    let bad_char = (
        0..len,
        prop::sample::select(vec![
            "g",
            "z",
            " ",
            "-",
            "é",
            "０",
            "\u{0}",
            "\"",
            "x",
            "\u{1F600}",
        ]),
        any::<u128>(),
    )
        .prop_map(move |(at, c, bits)| {
            let mut s = format!("{bits:032x}")[..len].to_owned();
            s.replace_range(at..at + 1, c);
            s
        });
    prop_oneof![
        wrong_len,
        bad_char,
        Just(format!("0x{}", &"ab".repeat(16)[..len - 2]))
    ]
}

fn id_kind() -> impl Strategy<Value = Id> {
    prop::sample::select(vec![Id::Trace, Id::Span, Id::Parent, Id::Segment])
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // Kinds other than the field's own type and null.
    const NOT_STRING: &[u8] = &[BOOL, INT, UINT, FLOAT, ARRAY, OBJECT];
    const NOT_NUMBER: &[u8] = &[BOOL, STRING, ARRAY, OBJECT];
    const NOT_BOOL: &[u8] = &[INT, UINT, FLOAT, STRING, ARRAY, OBJECT];
    const NOT_UINT: &[u8] = &[BOOL, INT, FLOAT, STRING, ARRAY, OBJECT];
    prop_oneof![
        (0u8..3).prop_map(Mutation::Remove),
        (0u8..3).prop_map(Mutation::Null),
        (id_kind(), junk_of(NOT_STRING)).prop_map(|(id, v)| Mutation::IdType(id, v)),
        id_kind().prop_flat_map(|id| bad_id(id).prop_map(move |s| Mutation::IdBad(id, s))),
        prop_oneof![
            junk_of(NOT_UINT).prop_map(Tok::V),
            prop::sample::select(vec![
                "18446744073709551616",
                "1e30",
                "42.0",
                "1e2",
                "-0",
                "-1",
                "4.2E1"
            ])
            .prop_map(|s| Tok::RawJson(s.to_owned())),
        ]
        .prop_map(Mutation::Project),
        junk_of(NOT_BOOL).prop_map(Mutation::IsSegment),
        (0u8..3, junk_of(NOT_NUMBER)).prop_map(|(w, v)| Mutation::Timestamp(w, v)),
        (0u8..9).prop_map(Mutation::Duplicate),
        (0u8..3, 100usize..200, any::<bool>())
            .prop_map(|(at, level, objects)| Mutation::Deep(at, level, objects)),
        (0u8..4).prop_map(Mutation::Reserved),
        raw_extra().prop_map(|(raw, ok)| Mutation::RawExtra(raw, ok)),
        Just(Mutation::SurrogateKey),
        (1usize..200).prop_map(Mutation::Truncate),
        prop_oneof![
            Just(b" \n".to_vec()),
            Just(b"x".to_vec()),
            Just(b"{}".to_vec()),
            Just(vec![0]),
            Just(vec![0xc0]),
        ]
        .prop_map(Mutation::Trailing),
        (0u8..4).prop_map(Mutation::MsgpackOdd),
        any::<bool>().prop_map(Mutation::MsgpackCount),
        (0u8..3).prop_map(Mutation::Prefix),
    ]
}

/// Raw JSON for an extra member, and whether the span stays valid with it.
fn raw_extra() -> impl Strategy<Value = (String, bool)> {
    prop_oneof![
        Just(("\"\\ud800\"".to_owned(), false)),
        Just(("\"a\\udc00b\"".to_owned(), false)),
        Just(("\"\\ud83d\\ude00\"".to_owned(), true)),
        Just(("[\"\\uDBFF\\uDFFF\", \"\\u0000\"]".to_owned(), true)),
        Just(("123456789012345678901234567890".to_owned(), true)),
        Just(("-123456789012345678901234567890".to_owned(), true)),
        Just(("\"\\x\"".to_owned(), false)),
        Just(("\"tab\there\"".to_owned(), false)),
        Just(("01".to_owned(), false)),
        Just(("NaN".to_owned(), false)),
        Just(("\"\u{FEFF}ok\"".to_owned(), true)),
        // m·10^e: finite up to 1e308, out of f64's range above.
        (1u8..10, 300i32..311, any::<bool>()).prop_map(|(m, e, neg)| {
            let sign = if neg { "-" } else { "" };
            (format!("{sign}{m}e{e}"), e < 308 || (e == 308 && m == 1))
        }),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Reason(InvalidReason),
    Valid,
    /// Only "no panic" and the universal checks.
    Any,
}

/// The members spanbuf reads: required, and optional.
const REQUIRED: [&str; 3] = ["trace_id", "span_id", "project_id"];
const OPTIONAL: [&str; 6] = [
    "parent_span_id",
    "is_segment",
    "attributes",
    "received",
    "start_timestamp",
    "end_timestamp",
];

fn set(members: &mut Vec<Member>, key: &str, value: Tok) {
    members.retain(|m| m.key.as_deref() != Some(key));
    members.push(Member {
        key: Some(key.to_owned()),
        raw_key: None,
        value,
    });
}

fn nested(levels: usize, objects: bool) -> Value {
    let mut v = json!(1);
    for _ in 0..levels {
        v = if objects {
            json!({ "n": v })
        } else {
            json!([v])
        };
    }
    v
}

/// Applies the mutation; returns the encoding actually used (JSON-only
/// mutations force JSON, MessagePack-only ones MessagePack) and the expected
/// outcome.
fn apply(valid: &Valid, mutation: &Mutation, enc: Enc) -> (Vec<u8>, Expect) {
    use InvalidReason::*;
    let mut m = valid.members.clone();
    let json_enc = if enc.is_json() { enc } else { Enc::Json };
    let msgpack_enc = if enc.is_json() { Enc::Msgpack } else { enc };
    let reason = Expect::Reason;
    let (enc, expect) = match mutation {
        Mutation::Remove(i) => {
            m.retain(|x| x.key.as_deref() != Some(REQUIRED[*i as usize]));
            (enc, reason(MissingField))
        }
        Mutation::Null(i) => {
            set(&mut m, REQUIRED[*i as usize], Tok::V(Value::Null));
            (enc, reason(MissingField))
        }
        Mutation::IdType(id, v) => {
            set_id(&mut m, *id, v.clone());
            (enc, reason(BadType))
        }
        Mutation::IdBad(id, s) => {
            set_id(&mut m, *id, s.clone().into());
            (enc, reason(BadId))
        }
        Mutation::Project(tok) => {
            let enc = if matches!(tok, Tok::RawJson(_)) {
                json_enc
            } else {
                enc
            };
            set(&mut m, "project_id", tok.clone());
            (enc, reason(BadType))
        }
        Mutation::IsSegment(v) => {
            set(&mut m, "is_segment", Tok::V(v.clone()));
            (enc, reason(BadType))
        }
        Mutation::Timestamp(w, v) => {
            let name = ["received", "start_timestamp", "end_timestamp"][*w as usize];
            set(&mut m, name, Tok::V(v.clone()));
            (enc, reason(BadType))
        }
        Mutation::Duplicate(i) => {
            let name = REQUIRED
                .iter()
                .chain(&OPTIONAL)
                .nth(usize::from(*i))
                .expect("a member name");
            match m.iter().find(|x| x.key.as_deref() == Some(name)).cloned() {
                Some(copy) => m.push(copy),
                None => m.extend([member(name, Value::Null), member(name, Value::Null)]),
            }
            // MessagePack maps go through serde_json::Value, which keeps the
            // last of duplicate keys: only JSON can tell.
            (json_enc, reason(Malformed))
        }
        Mutation::Deep(at, level, objects) => {
            let objects = *objects;
            match at {
                0 => set(&mut m, "x_deep", Tok::V(nested(level - 1, objects))),
                1 => set(
                    &mut m,
                    "attributes",
                    Tok::V(json!({"deep": nested(level - 2, objects)})),
                ),
                _ => {
                    let mut seg = json!({"deep": nested(level - 3, objects)});
                    if let Some(id) = &valid.segment_id {
                        seg["value"] = id.clone().into();
                    }
                    set(
                        &mut m,
                        "attributes",
                        Tok::V(json!({"sentry.segment.id": seg})),
                    );
                }
            }
            let expect = if *level > MAX_DEPTH {
                reason(Malformed)
            } else {
                Expect::Valid
            };
            (enc, expect)
        }
        Mutation::Reserved(at) => {
            let reserved = json!({ RESERVED_KEY: "[1]" });
            match at {
                0 => m.push(member(RESERVED_KEY, json!(1))),
                1 => set(&mut m, "x_obj", Tok::V(json!({"a": reserved}))),
                2 => set(&mut m, "attributes", Tok::V(reserved)),
                _ => set(
                    &mut m,
                    "attributes",
                    Tok::V(json!({"sentry.segment.id": reserved})),
                ),
            }
            // From MessagePack the key may be consumed by serde_json's Value
            // conversion; the decoder then only has to stay consistent.
            let expect = if enc.is_json() {
                reason(Malformed)
            } else {
                Expect::Any
            };
            (enc, expect)
        }
        Mutation::RawExtra(raw, ok) => {
            set(&mut m, "x_raw", Tok::RawJson(raw.clone()));
            let expect = if *ok {
                Expect::Valid
            } else {
                reason(Malformed)
            };
            (json_enc, expect)
        }
        Mutation::SurrogateKey => {
            m.push(Member {
                key: Some("x".to_owned()),
                raw_key: Some("\"k\\udfff\"".to_owned()),
                value: Tok::V(json!(1)),
            });
            (json_enc, reason(Malformed))
        }
        Mutation::Truncate(_) | Mutation::Trailing(_) | Mutation::Prefix(_) => (enc, Expect::Any),
        Mutation::MsgpackOdd(kind) => {
            let odd = match kind {
                0 => Tok::RawMsgpack(vec![0xc4, 0x02, 0xff, 0x00]),
                1 => Tok::RawMsgpack(vec![0xd4, 0x01, 0x00]),
                2 => Tok::RawMsgpack(vec![0xa2, 0xc3, 0x28]),
                _ => Tok::V(json!(1)),
            };
            m.push(Member {
                key: if *kind == 3 {
                    None
                } else {
                    Some("x_odd".to_owned())
                },
                raw_key: None,
                value: odd,
            });
            (msgpack_enc, reason(Malformed))
        }
        Mutation::MsgpackCount(_) => (msgpack_enc, reason(Malformed)),
    };
    let mut bytes = encode(&m, enc);
    let expect = match mutation {
        Mutation::Truncate(n) => {
            let n = (*n).min(bytes.len());
            // Whitespace after the JSON object can go without harm.
            let body = bytes
                .iter()
                .rposition(|b| !b" \t\r\n".contains(b))
                .map_or(0, |p| p + 1);
            bytes.truncate(bytes.len() - n);
            if bytes.len() >= body {
                Expect::Valid
            } else {
                reason(Malformed)
            }
        }
        Mutation::Trailing(tail) => {
            bytes.extend_from_slice(tail);
            if enc.is_json() && tail.iter().all(|b| b" \t\r\n".contains(b)) {
                Expect::Valid
            } else {
                reason(Malformed)
            }
        }
        Mutation::Prefix(kind) => {
            bytes = match kind {
                0 => [b"\xEF\xBB\xBF".as_slice(), &bytes].concat(),
                1 => utf16(&bytes, true),
                _ => utf16(&bytes, false),
            };
            reason(Malformed)
        }
        Mutation::MsgpackCount(more) => {
            // Rewrite the header; `encode` used a map32 or a fix/map16 one.
            let n = m.len() as u32;
            let claimed = if *more { n + 1 } else { n - 1 };
            let header_len = match bytes[0] {
                0xdf => 5,
                0xde => 3,
                _ => 1,
            };
            let mut header = vec![0xdf];
            header.extend(claimed.to_be_bytes());
            bytes.splice(..header_len, header);
            reason(Malformed)
        }
        _ => expect,
    };
    (bytes, expect)
}

/// UTF-16 of bytes read as Latin-1 (enough for the ASCII of a compact span),
/// little-endian with a BOM or big-endian without.
fn utf16(bytes: &[u8], le_bom: bool) -> Vec<u8> {
    let mut out = Vec::new();
    if le_bom {
        out.extend([0xff, 0xfe]);
    }
    for &b in bytes {
        if le_bom {
            out.extend([b, 0]);
        } else {
            out.extend([0, b]);
        }
    }
    out
}

fn set_id(members: &mut Vec<Member>, id: Id, value: Value) {
    match id {
        Id::Trace => set(members, "trace_id", Tok::V(value)),
        Id::Span => set(members, "span_id", Tok::V(value)),
        Id::Parent => set(members, "parent_span_id", Tok::V(value)),
        Id::Segment => set(
            members,
            "attributes",
            Tok::V(json!({"sentry.segment.id": {"type": "string", "value": value}})),
        ),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn near_valid_spans_get_the_documented_reason(
        valid in valid_span(),
        mutation in mutation(),
        enc in encoding(),
    ) {
        let (bytes, expect) = apply(&valid, &mutation, enc);
        let got = check_outcome(&bytes, BIG)?;
        match (expect, &got) {
            (Expect::Any, _) => {}
            (Expect::Valid, Ok(_)) => {}
            (Expect::Reason(want), Err(reason)) => prop_assert_eq!(*reason, want),
            _ => {
                return Err(TestCaseError::fail(format!(
                    "expected {expect:?}, got {:?} for {:?}",
                    got.map(|s| s.span_id),
                    String::from_utf8_lossy(&bytes)
                )))
            }
        }
    }

    /// Random edits of valid encodings: far more likely than noise to reach
    /// deep into the parsers.
    #[test]
    fn edited_valid_spans_never_panic(
        valid in valid_span(),
        enc in encoding(),
        seed in any::<u64>(),
        edits in 1usize..6,
    ) {
        let mut bytes = encode(&valid.members, enc);
        let mut rng = XorShift::new(seed);
        for _ in 0..edits {
            let at = rng.below(bytes.len() + 1);
            match rng.below(5) {
                0 if at < bytes.len() => bytes[at] = rng.next() as u8,
                1 => bytes.insert(at, *rng.pick(b"{}[]\":,\\ 0e-.\x80\xc0\xff")),
                2 if at < bytes.len() => {
                    bytes.remove(at);
                }
                3 if at < bytes.len() => bytes[at] ^= 1 << rng.below(8),
                _ => bytes.truncate(at),
            }
        }
        let _ = check_outcome(&bytes, BIG)?;
    }
}

// ---------------------------------------------------------------------------
// Batches: decode_batch and group.

fn id16(n: u64) -> String {
    format!("{n:016x}")
}

fn trace(t: u8) -> String {
    format!("{:032x}", 0xfeed_0000_u64 + u64::from(t))
}

fn make_span(
    project_id: u64,
    t: u8,
    id: String,
    parent: Option<String>,
    is_segment: bool,
    segment_id: Option<String>,
) -> Span {
    Span {
        trace_id: trace(t),
        is_segment_span: parent.is_none() || is_segment,
        span_id: id,
        parent_span_id: parent,
        project_id,
        segment_id,
        received: None,
        payload: bytes::Bytes::from_static(b"{}"),
    }
}

/// One span of an arbitrary batch: ids from a small pool, so duplicates,
/// self-parents and cycles are common; 0x100.. are ids no span has.
fn loose_span() -> impl Strategy<Value = ShardedSpan> {
    // One u32 of bit fields per span: cheap to generate and to shrink.
    any::<u32>().prop_map(|bits| {
        let field = |at: u32, width: u32| u64::from((bits >> at) & ((1 << width) - 1));
        let pool = |choice: u64, value: u64| {
            if choice == 0 {
                0x100 + value % 4
            } else {
                value % 10
            }
        };
        let id = field(0, 4) % 10;
        let parent = match field(4, 3) {
            0 => None,
            choice => Some(id16(pool(choice - 1, field(7, 4)))),
        };
        let segment = (field(11, 2) == 0).then(|| id16(pool(field(13, 2), field(15, 4))));
        ShardedSpan {
            shard: field(19, 2) as u32,
            span: make_span(
                1 + field(21, 1),
                (field(22, 2) % 3) as u8,
                id16(id),
                parent,
                field(24, 1) == 1 && id % 3 == 0,
                segment,
            ),
        }
    })
}

type Key = (u64, String, String);

fn key_of(sub: &Subsegment) -> Key {
    (sub.project_id, sub.trace_id.clone(), sub.parent.clone())
}

/// What `group` promises for any batch: a partition into non-empty groups of
/// one (project, trace) each, keyed uniquely, on the shard of a member, with
/// a deterministic 32-hex salt.
fn check_partition(batch: &[ShardedSpan], subs: &[Subsegment]) -> Result<(), TestCaseError> {
    let mut seen = vec![0u32; batch.len()];
    let mut keys = BTreeSet::new();
    for sub in subs {
        prop_assert!(!sub.spans.is_empty(), "empty subsegment {:?}", sub);
        prop_assert!(keys.insert(key_of(sub)), "key twice: {:?}", sub);
        for &i in &sub.spans {
            prop_assert!(i < batch.len());
            seen[i] += 1;
            let span = &batch[i].span;
            prop_assert_eq!(span.project_id, sub.project_id);
            prop_assert_eq!(&span.trace_id, &sub.trace_id);
        }
        prop_assert!(
            sub.spans.iter().any(|&i| batch[i].shard == sub.shard),
            "shard {} of no member",
            sub.shard
        );
        prop_assert_eq!(
            sub.has_segment_span(batch),
            sub.spans.iter().any(|&i| batch[i].span.is_segment_span)
        );
        let salt = sub.salt(batch);
        prop_assert!(
            salt.len() == 32 && salt.bytes().all(|b| b.is_ascii_hexdigit()),
            "{}",
            salt
        );
    }
    prop_assert!(seen.iter().all(|&n| n == 1), "span counts {:?}", seen);
    prop_assert_eq!(group(batch), subs.to_vec(), "group is deterministic");
    Ok(())
}

/// Which subsegment each span landed in.
fn home(batch: &[ShardedSpan], subs: &[Subsegment]) -> Vec<usize> {
    let mut home = vec![usize::MAX; batch.len()];
    for (s, sub) in subs.iter().enumerate() {
        for &i in &sub.spans {
            home[i] = s;
        }
    }
    home
}

/// The salt names the subsegment's own spans, nothing else in the batch:
/// spans of another project interleaved leave every subsegment and its salt
/// unchanged (the same payload set on re-ingest).
fn check_salt_is_local(
    batch: &[ShardedSpan],
    subs: &[Subsegment],
    seed: u64,
) -> Result<(), TestCaseError> {
    let mut rng = XorShift::new(seed);
    let mut mixed = Vec::new();
    let mut position = Vec::with_capacity(batch.len());
    for item in batch {
        while rng.below(3) == 0 {
            let span = make_span(
                99,
                rng.below(3) as u8,
                id16(rng.below(10) as u64),
                None,
                false,
                None,
            );
            mixed.push(ShardedSpan { shard: 0, span });
        }
        position.push(mixed.len());
        mixed.push(item.clone());
    }
    let mixed_subs: HashMap<Key, Subsegment> =
        group(&mixed).into_iter().map(|s| (key_of(&s), s)).collect();
    for sub in subs {
        let other = mixed_subs.get(&key_of(sub));
        let other = match other {
            Some(o) => o,
            None => {
                return Err(TestCaseError::fail(format!(
                    "{:?} gone in the mixed batch",
                    key_of(sub)
                )))
            }
        };
        let moved: Vec<usize> = sub.spans.iter().map(|&i| position[i]).collect();
        prop_assert_eq!(&other.spans, &moved);
        prop_assert_eq!(other.salt(&mixed), sub.salt(batch));
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// Arbitrary links: cycles, self-parents, conflicting duplicates.
    #[test]
    fn group_partitions_any_batch(
        batch in prop::collection::vec(loose_span(), 0..48),
        seed in any::<u64>(),
    ) {
        let subs = group(&batch);
        check_partition(&batch, &subs)?;
        check_salt_is_local(&batch, &subs, seed)?;

        // Where every span id of a (project, trace) is unique, a non-root span
        // and its in-batch effective parent share a subsegment, cycles included.
        let mut count: HashMap<(u64, &str, &str), usize> = HashMap::new();
        for s in &batch {
            *count.entry((s.span.project_id, &s.span.trace_id, &s.span.span_id)).or_default() += 1;
        }
        if count.values().all(|&n| n == 1) {
            let by_id: HashMap<(u64, &str, &str), usize> = batch
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let span = &s.span;
                    ((span.project_id, span.trace_id.as_str(), span.span_id.as_str()), i)
                })
                .collect();
            let home = home(&batch, &subs);
            for (i, s) in batch.iter().enumerate() {
                if s.span.is_segment_span {
                    let parent = &subs[home[i]].parent;
                    prop_assert_eq!(parent, &s.span.span_id, "a root heads its subsegment");
                    continue;
                }
                let span = &s.span;
                let parent = (span.project_id, span.trace_id.as_str(), span.effective_parent_id());
                if let Some(&p) = by_id.get(&parent) {
                    prop_assert_eq!(home[i], home[p], "span {} and its parent {}", i, p);
                }
            }
        }
    }
}

/// How a span of a well-formed forest links to the spans generated before it.
#[derive(Debug, Clone, Copy)]
enum Link {
    Root,
    /// `is_segment: true` with a parent (in the batch or not).
    MarkedRoot(u16),
    Child(u16),
    /// Known segment id = an earlier span; the parent id is anything.
    ViaSegmentId(u16, u16),
    /// Parent not in the batch.
    Orphan(u16),
    /// Known segment id not in the batch, parent an earlier span.
    OrphanViaSegmentId(u16, u16),
}

fn link() -> impl Strategy<Value = Link> {
    any::<u32>().prop_map(|bits| {
        let (a, b) = ((bits >> 8) as u16, (bits >> 16) as u16);
        match bits % 13 {
            0 | 1 => Link::Root,
            2 => Link::MarkedRoot(a),
            3..=8 => Link::Child(a),
            9 | 10 => Link::ViaSegmentId(a, b),
            11 => Link::Orphan(a),
            _ => Link::OrphanViaSegmentId(a, b),
        }
    })
}

/// Builds a forest: per (project, trace), span ids count from 0 (so the same
/// ids recur in other traces and projects), effective parents point only to
/// earlier spans, then exact duplicates are added (at-least-once delivery) and
/// the arrival order is shuffled.
fn forest(
    links: &[(u8, u8, Link)],
    dups: &[u16],
    seed: u64,
    shard_per_trace: bool,
) -> Vec<ShardedSpan> {
    let mut per_group: BTreeMap<(u8, u8), u64> = BTreeMap::new();
    let mut batch = Vec::new();
    let outside = |r: u16| id16(0xf000 + u64::from(r % 16));
    for (k, &(project, t, link)) in links.iter().enumerate() {
        let next = per_group.entry((project, t)).or_default();
        let n = *next;
        *next += 1;
        let earlier = |r: u16| (n > 0).then(|| id16(u64::from(r) % n));
        let (parent, is_segment, segment) = match link {
            Link::Root => (None, k % 2 == 0, None),
            Link::MarkedRoot(r) => (Some(earlier(r).unwrap_or_else(|| outside(r))), true, None),
            Link::Child(r) => match earlier(r) {
                Some(p) => (Some(p), false, None),
                None => (None, false, None),
            },
            Link::ViaSegmentId(r, p) => match earlier(r) {
                // The parent id does not matter then: any id, even a later one.
                Some(segment) => (Some(id16(u64::from(p % 12))), false, Some(segment)),
                None => (Some(outside(p)), false, None),
            },
            Link::Orphan(r) => (Some(outside(r)), false, None),
            Link::OrphanViaSegmentId(r, p) => (
                Some(earlier(p).unwrap_or_else(|| outside(p))),
                false,
                Some(outside(r)),
            ),
        };
        let shard = if shard_per_trace {
            u32::from(t)
        } else {
            (k % 4) as u32
        };
        batch.push(ShardedSpan {
            shard,
            span: make_span(u64::from(project), t, id16(n), parent, is_segment, segment),
        });
    }
    if !batch.is_empty() {
        for &d in dups {
            let copy = batch[usize::from(d) % batch.len()].clone();
            batch.push(copy);
        }
    }
    shuffle(&mut batch, seed);
    batch
}

/// The top-most ancestor inside the batch, following effective parents.
fn top(batch: &[ShardedSpan], by_id: &HashMap<(u64, String, String), usize>, i: usize) -> String {
    let mut span = &batch[i].span;
    for _ in 0..=batch.len() {
        if span.is_segment_span {
            return span.span_id.clone();
        }
        let parent = span.effective_parent_id().to_owned();
        match by_id.get(&(span.project_id, span.trace_id.clone(), parent.clone())) {
            Some(&p) => span = &batch[p].span,
            None => return parent,
        }
    }
    panic!("the generated forest has a cycle through span {i}");
}

proptest! {
    #![proptest_config(config())]

    /// Well-formed forests in any arrival order: the subsegments are exactly
    /// the spans grouped by (project, trace, top-most in-batch ancestor).
    #[test]
    fn group_follows_effective_parents_to_the_top(
        links in prop::collection::vec((1u8..3, 0u8..3, link()), 0..40),
        dups in prop::collection::vec(any::<u16>(), 0..4),
        seed in any::<u64>(),
        shard_per_trace in any::<bool>(),
    ) {
        let batch = forest(&links, &dups, seed, shard_per_trace);
        let subs = group(&batch);
        check_partition(&batch, &subs)?;

        let by_id: HashMap<(u64, String, String), usize> = batch
            .iter()
            .enumerate()
            .map(|(i, s)| ((s.span.project_id, s.span.trace_id.clone(), s.span.span_id.clone()), i))
            .collect();
        let mut expected: BTreeMap<Key, BTreeSet<usize>> = BTreeMap::new();
        for i in 0..batch.len() {
            let s = &batch[i].span;
            expected
                .entry((s.project_id, s.trace_id.clone(), top(&batch, &by_id, i)))
                .or_default()
                .insert(i);
        }
        let got: BTreeMap<Key, BTreeSet<usize>> = subs
            .iter()
            .map(|s| (key_of(s), s.spans.iter().copied().collect()))
            .collect();
        prop_assert_eq!(got, expected);
        for sub in &subs {
            // The root is in the batch exactly when the key names a root span.
            let root = by_id.get(&key_of(sub)).is_some_and(|&i| batch[i].span.is_segment_span);
            prop_assert_eq!(sub.has_segment_span(&batch), root);
            if shard_per_trace {
                prop_assert!(sub.spans.iter().all(|&i| batch[i].shard == sub.shard));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// decode_batch: every message is a span or an invalid entry, in order.

fn span_json(s: &Span) -> Vec<u8> {
    let mut v = json!({"trace_id": s.trace_id, "span_id": s.span_id, "project_id": s.project_id,
                       "parent_span_id": s.parent_span_id});
    if s.is_segment_span && s.parent_span_id.is_some() {
        v["is_segment"] = true.into();
    }
    if let Some(seg) = &s.segment_id {
        v["attributes"] = json!({"sentry.segment.id": {"value": seg}});
    }
    serde_json::to_vec(&v).expect("json")
}

const GARBAGE: &[&[u8]] = &[
    b"",
    b"   ",
    b"not json",
    b"[1,2]",
    b"\"span\"",
    b"null",
    b"{",
    b"{}",
    b"{\"trace_id\":1}",
    b"{\"trace_id\":\"0123456789abcdef0123456789abcdef\",\"span_id\":\"zz\",\"project_id\":1}",
    br#"{"trace_id":"0123456789abcdef0123456789abcdef","span_id":"0123456789abcdef","project_id":-1}"#,
    b"\x81\xa1k",
    b"\xff\xfe{\x00}\x00",
];

proptest! {
    #![proptest_config(config())]

    #[test]
    fn decode_batch_sorts_every_message(
        items in prop::collection::vec(
            (loose_span(), prop::option::weighted(0.3, 0..GARBAGE.len() + 1), any::<u64>()),
            0..24,
        ),
        max in prop_oneof![3 => Just(BIG), 1 => 100usize..300],
    ) {
        let raw: Vec<(u32, Vec<u8>)> = items
            .iter()
            .map(|(s, garbage, seed)| {
                let bytes = match garbage {
                    None => span_json(&s.span),
                    Some(g) if *g < GARBAGE.len() => GARBAGE[*g].to_vec(),
                    Some(_) => noise(1, *seed, (*seed % 64) as usize),
                };
                (s.shard, bytes)
            })
            .collect();
        let metrics = Metrics::new().expect("metrics");
        let messages = raw.iter().map(|(shard, b)| (*shard, b.as_slice()));
        let decoded = decode_batch(messages, max, &metrics);
        prop_assert_eq!(decoded.spans.len() + decoded.invalid.len(), raw.len());

        let mut spans = decoded.spans.iter();
        let mut invalid = decoded.invalid.iter().peekable();
        let mut by_reason: BTreeMap<&str, u64> = BTreeMap::new();
        for (position, (shard, bytes)) in raw.iter().enumerate() {
            match decode_span(bytes, max) {
                Err(e) => {
                    let (at, got) = invalid.next().expect("an invalid entry per refused message");
                    prop_assert_eq!(*at, position);
                    prop_assert_eq!(got, &e);
                    *by_reason.entry(e.reason.as_str()).or_default() += 1;
                }
                Ok(span) => {
                    let got = spans.next().expect("a span per accepted message");
                    prop_assert_eq!(got.shard, *shard);
                    prop_assert_eq!(&got.span, &span);
                }
            }
        }
        for reason in InvalidReason::ALL {
            let counted = metrics.spans_invalid_total.with_label_values(&[reason.as_str()]).get();
            let want = by_reason.get(reason.as_str()).copied().unwrap_or(0);
            prop_assert_eq!(counted, want, "{}", reason);
        }
        let subs = group(&decoded.spans);
        check_partition(&decoded.spans, &subs)?;
    }
}
