//! `spanbuf run` fed a topic of mixed garbage (docs/design.md §2, "invalid input never
//! crashes the worker and never blocks a partition"): a few thousand invalid
//! messages of every kind, interleaved with valid spans, against a real
//! redis-server, the tansu broker and the spanbuf binary.
//!
//! The expected count per `reason` comes from the decoder itself
//! (`decode_span` on each message), so the test cannot drift from it; it does
//! check that every reason was exercised. The worker must deliver every valid
//! span, count every invalid message under its reason, forward each to the
//! dead-letter topic once, stay healthy throughout and exit 0 on SIGTERM.

mod e2e;
mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde_json::{json, Value};

use e2e::*;
use spanbuf::span::{decode_span, InvalidReason};
use support::{Broker, RedisServer};

/// `SPANBUF_MAX_SPAN_BYTES` for the worker: low, so "too large" is cheap.
const MAX_SPAN_BYTES: usize = 4096;

/// Size of the one message far above the limit: over librdkafka's default
/// `message.max.bytes` (1,000,000), so the test producer raises its own.
const HUGE_BYTES: usize = 1_100_000;

/// One input message: key and payload, either of which may be null.
struct Message {
    key: Option<String>,
    payload: Option<Vec<u8>>,
}

fn trace_id(rng: &mut StdRng) -> String {
    format!("{:032x}", rng.random::<u128>())
}

fn span_id(rng: &mut StdRng) -> String {
    format!("{:016x}", rng.random::<u64>())
}

/// A valid span object, the starting point of most garbage.
fn span_object(rng: &mut StdRng) -> Value {
    json!({
        "trace_id": trace_id(rng),
        "span_id": span_id(rng),
        "parent_span_id": span_id(rng),
        "project_id": rng.random_range(1..100u64),
        "received": 1_700_000_000.5,
        "start_timestamp": 1_699_999_999.0,
        "end_timestamp": 1_700_000_000.0,
        "description": "garbage — ünïcode",
        "attributes": {"sentry.segment.id": {"type": "string", "value": span_id(rng)}},
    })
}

fn to_json(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("json")
}

fn to_msgpack(v: &Value) -> Vec<u8> {
    rmp_serde::to_vec_named(v).expect("msgpack")
}

fn encoded(v: &Value, msgpack: bool) -> Vec<u8> {
    if msgpack {
        to_msgpack(v)
    } else {
        to_json(v)
    }
}

/// Sets `attributes["sentry.segment.id"].value` or a top-level field.
fn with_field(mut v: Value, field: &str, value: Value) -> Value {
    if field == "segment_id" {
        v["attributes"]["sentry.segment.id"]["value"] = value;
    } else {
        v[field] = value;
    }
    v
}

const FIELDS: [&str; 9] = [
    "trace_id",
    "span_id",
    "project_id",
    "parent_span_id",
    "is_segment",
    "segment_id",
    "received",
    "start_timestamp",
    "end_timestamp",
];

/// A value of the wrong type for `field`.
fn wrong_type(rng: &mut StdRng, field: &str) -> Value {
    let candidates: Vec<Value> = match field {
        "trace_id" | "span_id" | "parent_span_id" | "segment_id" => vec![
            json!(12345),
            json!(true),
            json!(["0123456789abcdef"]),
            json!({"id": "0123456789abcdef"}),
            json!(1.5),
        ],
        "project_id" => vec![
            json!("42"),
            json!(-1),
            json!(4.2),
            json!(true),
            json!([1]),
            json!({"id": 1}),
            json!(1e300),
        ],
        "is_segment" => vec![json!("true"), json!(1), json!([true]), json!({})],
        _ => vec![
            json!("1700000000"),
            json!(true),
            json!([1.0]),
            json!({"s": 1}),
        ],
    };
    candidates[rng.random_range(0..candidates.len())].clone()
}

/// An id string of the wrong length or with a non-hex character.
fn bad_hex(rng: &mut StdRng, len: usize) -> Value {
    let hex = format!("{:032x}{:032x}", rng.random::<u128>(), rng.random::<u128>());
    let s = match rng.random_range(0..6) {
        0 => hex[..len - 1].to_owned(),
        1 => hex[..len + 1].to_owned(),
        2 => String::new(),
        3 => format!("{}g", &hex[..len - 1]),
        4 => format!("{}é", &hex[..len - 2]),
        _ => format!("0x{}", &hex[..len - 2]),
    };
    Value::from(s)
}

/// UTF-16 of ASCII text: little-endian with a BOM, little-endian without,
/// or big-endian.
fn utf16(text: &[u8], kind: u32) -> Vec<u8> {
    let mut out = match kind {
        0 => vec![0xff, 0xfe],
        _ => Vec::new(),
    };
    for &b in text {
        if kind == 2 {
            out.extend([0, b]);
        } else {
            out.extend([b, 0]);
        }
    }
    out
}

fn nested(levels: usize) -> String {
    format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
}

/// `v` padded through its description to exactly `size` bytes, in JSON or
/// MessagePack.
fn padded(mut v: Value, size: usize, msgpack: bool) -> Vec<u8> {
    v["description"] = Value::from("");
    let mut pad = size
        .checked_sub(encoded(&v, msgpack).len())
        .expect("the span alone fits");
    // A MessagePack string header grows with the string: a few rounds at most.
    for _ in 0..4 {
        v["description"] = Value::from("x".repeat(pad));
        let bytes = encoded(&v, msgpack);
        if bytes.len() == size {
            return bytes;
        }
        pad = (pad + size).checked_sub(bytes.len()).expect("padding");
    }
    panic!("cannot pad a span to {size} bytes");
}

/// A few thousand invalid messages of every kind, deterministic.
fn garbage(rng: &mut StdRng) -> Vec<Message> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut push = |bytes: Vec<u8>| out.push(bytes);

    // Text that is not JSON.
    let words = [
        "not json",
        "hello world",
        "<html><body>500</body></html>",
        "key=value&span_id=1",
        "SELECT 1;",
        "{{template}}",
        "{trace_id: 1}",
        "NaN",
        "undefined",
    ];
    for i in 0..200 {
        push(words[i % words.len()].as_bytes().to_vec());
    }
    // Binary noise, some of it behind a byte that routes to a parser.
    for _ in 0..300 {
        let len = rng.random_range(1..300);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if rng.random_bool(0.5) {
            bytes[0] = [b'{', 0x81, 0x8f, 0xde, 0xdf][rng.random_range(0..5)];
        }
        push(bytes);
    }
    // Invalid UTF-8 inside a string of an otherwise valid span.
    for i in 0..150 {
        let json = to_json(&span_object(rng));
        let at = json
            .windows(10)
            .position(|w| w == b"\"garbage \xe2")
            .expect("description")
            + 1;
        let bad: &[u8] = [
            &[0xff][..],
            &[0xc0, 0xaf],
            &[0xed, 0xa0, 0x80],
            &[0xe2, 0x82],
        ][i % 4];
        push([&json[..at], bad, &json[at..]].concat());
    }
    // UTF-16 encoded JSON of valid spans.
    for i in 0..150 {
        push(utf16(&to_json(&span_object(rng)), i % 3));
    }
    // JSON that is not an object.
    for i in 0..200 {
        let v = match i % 8 {
            0 => json!([span_object(rng)]),
            1 => json!("a string"),
            2 => json!(42),
            3 => json!(-1.5e10),
            4 => Value::Null,
            5 => json!(true),
            6 => json!([]),
            _ => Value::from(span_object(rng).to_string()),
        };
        push(to_json(&v));
    }
    // Wrong types, in JSON and in MessagePack.
    for i in 0..450 {
        let field = FIELDS[i % FIELDS.len()];
        let value = wrong_type(rng, field);
        let v = with_field(span_object(rng), field, value);
        push(encoded(&v, i % 5 == 0));
    }
    // Required fields missing or null.
    for i in 0..150 {
        let mut v = span_object(rng);
        let field = ["trace_id", "span_id", "project_id"][i % 3];
        if i % 2 == 0 {
            v[field] = Value::Null;
        } else if let Value::Object(map) = &mut v {
            map.remove(field);
        }
        push(encoded(&v, i % 7 == 0));
    }
    // Bad hex ids.
    for i in 0..300 {
        let field = ["trace_id", "span_id", "parent_span_id", "segment_id"][i % 4];
        let len = if field == "trace_id" { 32 } else { 16 };
        let value = bad_hex(rng, len);
        let v = with_field(span_object(rng), field, value);
        push(encoded(&v, i % 6 == 0));
    }
    // Empty and whitespace-only messages (null payloads are added below).
    for i in 0..80 {
        push([&b""[..], b" ", b"\n\t  \r\n"][i % 3].to_vec());
    }
    // Just above the limit: valid spans one to a hundred bytes too large.
    for i in 0..120 {
        let size = MAX_SPAN_BYTES + 1 + rng.random_range(0..100);
        push(padded(span_object(rng), size, i % 4 == 0));
    }
    // Truncated MessagePack of valid spans (and of a map header alone).
    for _ in 0..200 {
        let bytes = to_msgpack(&span_object(rng));
        let cut = rng.random_range(1..bytes.len());
        push(bytes[..cut].to_vec());
    }
    // Deep nesting: past serde_json's limit inside a span, and bare.
    for i in 0..100 {
        let mut v = span_object(rng);
        if let Value::Object(map) = &mut v {
            // Case 2 brings its own attributes; a second one would be a duplicate.
            map.remove("attributes");
        }
        let mut json = to_json(&v);
        json.pop();
        // Sized to stay under the limit: the depth is what is wrong.
        let deep = match i % 3 {
            0 => format!(",\"deep\":{}}}", nested(rng.random_range(127..1600))),
            1 => {
                let levels = rng.random_range(127..550);
                format!(
                    ",\"deep\":{}1{}}}",
                    "{\"a\":".repeat(levels),
                    "}".repeat(levels)
                )
            }
            _ => format!(
                ",\"attributes\":{{\"x\":{}}}}}",
                nested(rng.random_range(126..1600))
            ),
        };
        json.extend_from_slice(deep.as_bytes());
        push(json);
    }
    // What only a strict parser refuses: lone surrogates, numbers out of
    // range, duplicate members, serde_json's reserved key, trailing data,
    // a byte-order mark.
    for i in 0..150 {
        let json = to_json(&span_object(rng));
        let body = &json[..json.len() - 1];
        let bytes = match i % 8 {
            0 => [body, br#","x":"\ud800"}"#].concat(),
            1 => [body, br#","x":[1e400]}"#].concat(),
            2 => [body, br#","span_id":"0123456789abcdef"}"#].concat(),
            3 => [body, br#","x":{"$serde_json::private::RawValue":1}}"#].concat(),
            4 => [&json[..], b"{}"].concat(),
            5 => [&b"\xef\xbb\xbf"[..], &json].concat(),
            6 => [&to_msgpack(&span_object(rng))[..], &[0xc0]].concat(),
            _ => [body, br#","received":1e999}"#].concat(),
        };
        push(bytes);
    }
    // One message far above the limit.
    push(vec![b'x'; HUGE_BYTES]);

    let mut messages: Vec<Message> = out
        .into_iter()
        .enumerate()
        .map(|(i, payload)| Message {
            key: (i % 5 != 0).then(|| format!("garbage-{i}")),
            payload: Some(payload),
        })
        .collect();
    // Null payloads (tombstones) read as empty input.
    for i in 0..40 {
        messages.push(Message {
            key: Some(format!("tombstone-{i}")),
            payload: None,
        });
    }
    messages
}

/// Valid spans exactly at the limit, JSON and MessagePack: each a root of its
/// own trace, so its segment id is its own span id.
fn at_the_limit(rng: &mut StdRng) -> (Vec<Message>, BTreeMap<String, String>) {
    let mut messages = Vec::new();
    let mut expected = BTreeMap::new();
    for i in 0..8 {
        let mut v = span_object(rng);
        v["parent_span_id"] = Value::Null;
        let id = v["span_id"].as_str().expect("id").to_owned();
        expected.insert(id.clone(), id);
        messages.push(Message {
            key: v["trace_id"].as_str().map(str::to_owned),
            payload: Some(padded(v, MAX_SPAN_BYTES, i % 2 == 1)),
        });
    }
    (messages, expected)
}

/// Produces everything in order, with `message.max.bytes` raised for the
/// one huge message.
fn produce_all(broker: &Broker, messages: &[Message]) {
    let producer: ThreadedProducer<DefaultProducerContext> = broker
        .client_config()
        .set("message.max.bytes", (2 * HUGE_BYTES).to_string())
        .create()
        .expect("producer");
    for m in messages {
        let mut record = BaseRecord::<str, [u8]>::to(INPUT);
        if let Some(key) = &m.key {
            record = record.key(key.as_str());
        }
        if let Some(payload) = &m.payload {
            record = record.payload(payload.as_slice());
        }
        producer.send(record).map_err(|(e, _)| e).expect("produce");
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

#[test]
fn worker_counts_and_dead_letters_garbage_and_keeps_delivering() {
    let mut rng = StdRng::seed_from_u64(0x6a7b_a6e5);

    let (lines, mut expected) = spans(0);
    let valid: Vec<Message> = lines
        .into_iter()
        .map(|(key, payload)| Message {
            key: Some(key),
            payload: Some(payload),
        })
        .collect();
    let (limit, limit_expected) = at_the_limit(&mut rng);
    expected.extend(limit_expected);
    let garbage = garbage(&mut rng);

    // The decoder's own verdict on each garbage message is the expectation.
    let mut want: BTreeMap<&'static str, u64> = BTreeMap::new();
    for m in &garbage {
        let bytes = m.payload.as_deref().unwrap_or_default();
        match decode_span(bytes, MAX_SPAN_BYTES) {
            Ok(span) => panic!(
                "garbage accepted as span {}: {:?}",
                span.span_id,
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ),
            Err(e) => *want.entry(e.reason.as_str()).or_default() += 1,
        }
    }
    for m in valid.iter().chain(&limit) {
        let bytes = m.payload.as_deref().expect("payload");
        assert!(decode_span(bytes, MAX_SPAN_BYTES).is_ok());
    }
    assert_eq!(
        want.len(),
        InvalidReason::ALL.len(),
        "every reason exercised: {want:?}"
    );
    let invalid_total: u64 = want.values().sum();
    assert!(invalid_total >= 2000, "{invalid_total} garbage messages");

    // Interleave, keeping each list's own order.
    let valid_total = valid.len() + limit.len();
    let mut messages = Vec::with_capacity(valid_total + garbage.len());
    let mut valid_iter = valid.into_iter().chain(limit).peekable();
    let mut garbage_iter = garbage.into_iter().peekable();
    while valid_iter.peek().is_some() || garbage_iter.peek().is_some() {
        let take_valid = match (valid_iter.peek(), garbage_iter.peek()) {
            (Some(_), Some(_)) => rng.random_ratio(1, 4),
            (Some(_), None) => true,
            _ => false,
        };
        let next = if take_valid {
            valid_iter.next()
        } else {
            garbage_iter.next()
        };
        messages.extend(next);
    }

    let redis = RedisServer::start();
    // The harness's short timeouts (1 s root, 2 s) on purpose: a batch of
    // garbage takes a while (each dead letter is awaited), and the flusher's
    // clock must stay at the batch in hand meanwhile, or segments flush before
    // the rest of their spans is ingested and come out split.
    let settings = [
        ("SPANBUF_REDIS_URL", redis.url()),
        ("SPANBUF_MAX_SPAN_BYTES", MAX_SPAN_BYTES.to_string()),
    ];
    let broker = Broker::start();
    topics(&broker);
    let mut worker = Worker::start_with(&broker, &settings);
    wait_for("the worker's /health", Duration::from_secs(30), || {
        worker
            .get("/health")
            .is_some_and(|(status, _)| status == 200)
    });

    // /health is polled for the whole run; every answer must be 200.
    let stop = AtomicBool::new(false);
    let unhealthy: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut polls = 0u64;
    let mut output = Output::new(&broker);
    std::thread::scope(|scope| {
        let monitor = scope.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match worker.get("/health") {
                    Some((200, _)) => {}
                    other => unhealthy.lock().expect("lock").push(format!("{other:?}")),
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            n
        });

        produce_all(&broker, &messages);
        output.read_until(&expected, invalid_total as usize, Duration::from_secs(240));

        // Counters settle once the last batch is through.
        wait_for(
            "every message to be counted",
            Duration::from_secs(30),
            || {
                worker.metric("spanbuf_messages_consumed_total") == Some(messages.len() as f64)
                    && worker.metric("spanbuf_dlq_records_total") == Some(invalid_total as f64)
            },
        );
        stop.store(true, Ordering::Relaxed);
        polls = monitor.join().expect("health monitor");
    });

    // Every valid span came out, under its root.
    let claimed = output.claimed();
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(span, root)| claimed.get(*span) != Some(*root))
        .map(|(span, root)| format!("{span}: want {root}, got {:?}", claimed.get(span)))
        .collect();
    assert!(
        wrong.is_empty() && claimed.len() == expected.len(),
        "{} of {} spans not under their root, {} claimed; first: {:?}",
        wrong.len(),
        expected.len(),
        claimed.len(),
        &wrong[..wrong.len().min(10)]
    );

    // Every invalid message counted under the decoder's reason.
    for reason in InvalidReason::ALL {
        let series = format!(
            "spanbuf_spans_invalid_total{{reason=\"{}\"}}",
            reason.as_str()
        );
        let want = want.get(reason.as_str()).copied().unwrap_or(0);
        assert_eq!(worker.metric(&series), Some(want as f64), "{series}");
    }
    assert_eq!(
        worker.metric("spanbuf_spans_consumed_total"),
        Some(valid_total as f64),
        "valid spans written to Redis"
    );
    assert_eq!(
        worker.metric("spanbuf_messages_consumed_total"),
        Some((valid_total as u64 + invalid_total) as f64),
        "messages = valid spans + invalid ones"
    );

    // One dead letter per invalid message, with the decoder's reason, and
    // none twice: everything that came is read before counting.
    output.read_quiet(Duration::from_secs(2), Duration::from_secs(30));
    let mut dlq: BTreeMap<String, u64> = BTreeMap::new();
    for reason in &output.dlq {
        let reason = reason.as_deref().map(String::from_utf8_lossy);
        *dlq.entry(reason.map_or("<none>".into(), |r| r.into_owned()))
            .or_default() += 1;
    }
    let want_dlq: BTreeMap<String, u64> = want.iter().map(|(r, n)| (r.to_string(), *n)).collect();
    assert_eq!(dlq, want_dlq, "dead letters by reason");

    assert!(polls > 0, "health was polled");
    let unhealthy = unhealthy.into_inner().expect("lock");
    assert!(
        unhealthy.is_empty(),
        "/health not 200 in {} of {polls} polls: {unhealthy:?}",
        unhealthy.len()
    );

    let (code, stderr) = worker.terminate();
    assert_eq!(code, Some(0), "graceful exit; stderr:\n{stderr}");
}
