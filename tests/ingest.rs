//! Ingest scenarios against real Redis, standalone and a local 3-master
//! cluster: the state Redis holds after each scenario (which segment each
//! span's payload is indexed under, counters, queue members and scores, key
//! names, types and TTLs) is the contract of docs/design.md §4–§5.

mod common;
mod support;

use std::collections::BTreeMap;

use futures::stream::{self, StreamExt};

use common::both;
use common::*;
use spanbuf::span::InvalidReason;

const NOW: f64 = 1_700_000_000.0;

both!(
    tree_every_order_one_batch,
    tree_every_order_single_span_batches,
    chain_every_order,
    parent_in_another_project,
    nested_segment_root,
    same_batch_twice_is_idempotent,
    segment_id_known_upstream,
    detach_on_size,
    detach_on_held_lock,
    merge_of_a_large_index,
    lifetime_cap,
    invalid_spans_are_counted,
    round_trips_do_not_grow,
    shards_and_slices,
    scripts_reload_after_script_flush,
);

/// Asserts one segment `root` holding exactly `spans` for `pt`, its counters,
/// redirects, and that it is the trace's only queue entry.
async fn assert_single_segment(
    env: &mut Env,
    pt: &str,
    root: &str,
    spans: &[&str],
    has_root: bool,
    deadline: f64,
) {
    let segments = env.inspect.segments(pt).await;
    assert_eq!(
        segments,
        BTreeMap::from([(root.to_string(), set(spans))]),
        "segments of {pt}"
    );
    let seg = env.keys().segment(pt, root);
    let ic = env.inspect.get(&env.keys().ingested_count(&seg)).await;
    assert_eq!(
        ic.as_deref(),
        Some(spans.len().to_string().as_str()),
        "ic of {seg}"
    );
    let hrs = env.inspect.get(&env.keys().has_root(&seg)).await;
    assert_eq!(hrs.is_some(), has_root, "hrs of {seg}");
    let ssr = env.keys().redirects(pt);
    // Redirects may chain (no path compression, as in Sentry); each must end at the root.
    for span in spans {
        let mut at = span.to_string();
        for _ in 0..100 {
            match env.inspect.hget(&ssr, &at).await {
                Some(next) if next != at => at = next,
                _ => break,
            }
        }
        assert_eq!(at, root, "redirects of {span}");
    }
    let queue = env.keys().queue(0);
    let entries: BTreeMap<String, f64> = env
        .inspect
        .queue(&queue)
        .await
        .into_iter()
        .filter(|(k, _)| k.contains(&format!("{{{pt}}}")))
        .collect();
    assert_eq!(
        entries,
        BTreeMap::from([(seg, deadline)]),
        "queue entries of {pt}"
    );
}

fn tree(t: &str) -> [TestSpan; 4] {
    let (a, b, c, d) = (id(0xa), id(0xb), id(0xc), id(0xd));
    [
        TestSpan::new(t, &a, None),
        TestSpan::new(t, &b, Some(&a)),
        TestSpan::new(t, &c, Some(&b)),
        TestSpan::new(t, &d, Some(&b)),
    ]
}

async fn tree_every_order_one_batch(backend: Backend) {
    let mut env = Env::start(backend, |_| {}).await;
    for (n, order) in permutations(4).into_iter().enumerate() {
        let t = trace(n as u64 + 1);
        let spans = tree(&t);
        let batch: Vec<TestSpan> = order.iter().map(|&i| spans[i].clone()).collect();
        let out = env.ingest(&batch, NOW).await;
        assert_eq!((out.spans, out.subsegments), (4, 1), "order {order:?}");
        let ids: Vec<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
        assert_single_segment(&mut env, &spans[0].pt(), ids[0], &ids, true, NOW + 10.0).await;
    }
    env.assert_layout().await;
}

async fn tree_every_order_single_span_batches(backend: Backend) {
    let mut env = Env::start(backend, |_| {}).await;
    for (n, order) in permutations(4).into_iter().enumerate() {
        let t = trace(n as u64 + 100);
        let spans = tree(&t);
        for (step, &i) in order.iter().enumerate() {
            env.ingest(&[spans[i].clone()], NOW + step as f64).await;
        }
        // The root arrived at some step; the last batch reset the deadline.
        let ids: Vec<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
        assert_single_segment(
            &mut env,
            &spans[0].pt(),
            ids[0],
            &ids,
            true,
            NOW + 3.0 + 10.0,
        )
        .await;
    }
    env.assert_layout().await;
}

async fn chain_every_order(backend: Backend) {
    let mut env = Env::start(backend, |_| {}).await;
    let ids: Vec<String> = (1..=5).map(id).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    for (n, order) in permutations(5).into_iter().enumerate() {
        for single in [false, true] {
            let t = trace(1000 + 2 * n as u64 + single as u64);
            let spans: Vec<TestSpan> = (0..5)
                .map(|i| TestSpan::new(&t, &ids[i], if i == 0 { None } else { Some(&ids[i - 1]) }))
                .collect();
            let batch: Vec<TestSpan> = order.iter().map(|&i| spans[i].clone()).collect();
            let last_now = if single {
                for (step, span) in batch.iter().enumerate() {
                    env.ingest(std::slice::from_ref(span), NOW + step as f64)
                        .await;
                }
                NOW + 4.0
            } else {
                env.ingest(&batch, NOW).await;
                NOW
            };
            assert_single_segment(
                &mut env,
                &spans[0].pt(),
                &ids[0],
                &id_refs,
                true,
                last_now + 10.0,
            )
            .await;
        }
    }
    env.assert_layout().await;
}

async fn parent_in_another_project(backend: Backend) {
    let mut env = Env::start(backend, |_| {}).await;
    let t = trace(7);
    let (a, b, c) = (id(0xa), id(0xb), id(0xc));
    let root = TestSpan::new(&t, &a, None);
    let child = TestSpan::new(&t, &b, Some(&a)).project(2);
    let grandchild = TestSpan::new(&t, &c, Some(&b)).project(2);
    let out = env
        .ingest(&[child.clone(), root.clone(), grandchild], NOW)
        .await;
    assert_eq!(out.subsegments, 2);
    assert_single_segment(&mut env, &root.pt(), &a, &[&a], true, NOW + 10.0).await;
    // Project 2's part waits for its (never arriving) root: the plain timeout.
    assert_single_segment(&mut env, &child.pt(), &a, &[&b, &c], false, NOW + 60.0).await;
    env.assert_layout().await;
}

async fn nested_segment_root(backend: Backend) {
    let mut env = Env::start(backend, |_| {}).await;
    for (n, single) in [false, true].into_iter().enumerate() {
        let t = trace(20 + n as u64);
        let (a, s, x, y) = (id(0xa), id(0x5), id(0x10), id(0x11));
        let spans = [
            TestSpan::new(&t, &x, Some(&s)),
            TestSpan::new(&t, &s, Some(&a)).segment(),
            TestSpan::new(&t, &y, Some(&a)),
            TestSpan::new(&t, &a, None),
        ];
        if single {
            for (step, span) in spans.iter().enumerate() {
                env.ingest(std::slice::from_ref(span), NOW + step as f64)
                    .await;
            }
        } else {
            env.ingest(&spans, NOW).await;
        }
        let pt = spans[0].pt();
        let segments = env.inspect.segments(&pt).await;
        assert_eq!(
            segments,
            BTreeMap::from([(a.clone(), set(&[&a, &y])), (s.clone(), set(&[&s, &x]))]),
            "single={single}"
        );
        for root in [&a, &s] {
            let seg = env.keys().segment(&pt, root);
            assert_eq!(
                env.inspect.get(&env.keys().has_root(&seg)).await.as_deref(),
                Some("1")
            );
        }
    }
    env.assert_layout().await;
}

async fn same_batch_twice_is_idempotent(backend: Backend) {
    for level in [0, -1] {
        let mut env = Env::start(backend, |c| c.buffer.compression_level = level).await;
        let t = trace(9);
        let spans = tree(&t);
        let first = env.ingest(&spans, NOW).await;
        let second = env.ingest(&spans, NOW + 1.0).await;
        assert_eq!((first.spans, first.spans_redelivered), (4, 0));
        assert_eq!(
            (second.spans, second.spans_redelivered),
            (0, 4),
            "level {level}"
        );
        let pt = spans[0].pt();
        let ids: Vec<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
        assert_single_segment(&mut env, &pt, ids[0], &ids, true, NOW + 1.0 + 10.0).await;
        let seg = env.keys().segment(&pt, ids[0]);
        let mk = env.keys().member_keys(&pt, ids[0]);
        let salts = env.inspect.smembers(&mk).await;
        assert_eq!(salts.len(), 1);
        let salt = String::from_utf8(salts[0].clone()).expect("salt");
        let members = env.inspect.scard(&env.keys().payload(&pt, &salt)).await;
        assert_eq!(
            members,
            if level == -1 { 4 } else { 1 },
            "payload members at level {level}"
        );
        let bytes: u64 = spans.iter().map(|s| s.json().len() as u64).sum();
        assert_eq!(
            env.inspect.get(&env.keys().ingested_bytes(&seg)).await,
            Some(bytes.to_string())
        );
        assert_eq!(env.metrics.spans_consumed_total.get(), 4);
        assert_eq!(env.metrics.spans_redelivered_total.get(), 4);
        env.assert_layout().await;
    }
}

async fn segment_id_known_upstream(backend: Backend) {
    let mut env = Env::start(backend, |_| {}).await;
    let t = trace(11);
    let (a, b, c) = (id(0xa), id(0xb), id(0xc));
    let late_child = TestSpan::new(&t, &c, Some(&b)).known_segment(&a);
    env.ingest(std::slice::from_ref(&late_child), NOW).await;
    // Known segment id: grouped straight under the root, no segment `b`.
    let segments = env.inspect.segments(&late_child.pt()).await;
    assert_eq!(segments, BTreeMap::from([(a.clone(), set(&[&c]))]));
    env.ingest(
        &[TestSpan::new(&t, &b, Some(&a)).known_segment(&a)],
        NOW + 1.0,
    )
    .await;
    env.ingest(&[TestSpan::new(&t, &a, None)], NOW + 2.0).await;
    assert_single_segment(
        &mut env,
        &late_child.pt(),
        &a,
        &[&a, &b, &c],
        true,
        NOW + 12.0,
    )
    .await;
    env.assert_layout().await;
}

async fn detach_on_size(backend: Backend) {
    let mut env = Env::start(backend, |c| {
        c.buffer.max_segment_bytes = 4096;
        c.buffer.max_span_bytes = 4096;
    })
    .await;
    let t = trace(12);
    let ids: Vec<String> = (0xa..0xf).map(id).collect();
    let spans: Vec<TestSpan> = ids
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let parent = match i {
                0 => None,
                4 => Some(ids[3].as_str()), // e hangs under d
                _ => Some(ids[0].as_str()),
            };
            TestSpan::new(&t, s, parent).filler(1000)
        })
        .collect();
    let size = spans[0].json().len() as u64;
    assert!(
        size * 3 <= 4096 && size * 4 > 4096,
        "span size {size} fits 3 per segment"
    );
    let mut detached = Vec::new();
    for (step, span) in spans.iter().enumerate() {
        let out = env
            .ingest(std::slice::from_ref(span), NOW + step as f64)
            .await;
        detached.push(out.detached_too_large);
    }
    // a, b, c fill the segment; d is cut off; e resolves to a (through d's
    // redirect) and is cut off again.
    assert_eq!(detached, [0, 0, 0, 1, 1]);
    let pt = spans[0].pt();
    let segments = env.inspect.segments(&pt).await;
    assert_eq!(segments.len(), 3, "{segments:?}");
    assert_eq!(segments[&ids[0]], set(&[&ids[0], &ids[1], &ids[2]]));
    let cut: Vec<&String> = segments.keys().filter(|k| k.len() == 32).collect();
    assert_eq!(cut.len(), 2);
    let queue = env.inspect.queue(&env.keys().queue(0)).await;
    for salt in cut {
        let seg = env.keys().segment(&pt, salt);
        assert_eq!(segments[salt].len(), 1);
        assert_eq!(
            env.inspect.get(&env.keys().cut_from(&seg)).await.as_deref(),
            Some(ids[0].as_str())
        );
        assert!(queue.contains_key(&seg), "detached segment {seg} is queued");
    }
    let root_seg = env.keys().segment(&pt, &ids[0]);
    let kept: usize = spans[..3].iter().map(|s| s.json().len()).sum();
    assert_eq!(
        env.inspect.get(&env.keys().ingested_bytes(&root_seg)).await,
        Some(kept.to_string())
    );
    assert_eq!(
        env.metrics
            .subsegments_detached_total
            .with_label_values(&["too_large"])
            .get(),
        2
    );
    env.assert_layout().await;
}

async fn detach_on_held_lock(backend: Backend) {
    for lock_ttl in [30, 0] {
        let mut env = Env::start(backend, |c| c.buffer.flush_lock_ttl_secs = lock_ttl).await;
        let t = trace(13);
        let (a, b, c) = (id(0xa), id(0xb), id(0xc));
        let root = TestSpan::new(&t, &a, None);
        env.ingest(&[root.clone(), TestSpan::new(&t, &b, Some(&a))], NOW)
            .await;
        let pt = root.pt();
        let seg = env.keys().segment(&pt, &a);
        env.hold_lock(&seg, "flusher-1").await;
        let out = env
            .ingest(&[TestSpan::new(&t, &c, Some(&b))], NOW + 1.0)
            .await;
        let segments = env.inspect.segments(&pt).await;
        if lock_ttl == 0 {
            // Locks disabled: the lock key means nothing, c joins the segment.
            assert_eq!(out.detached_locked, 0);
            assert_eq!(segments, BTreeMap::from([(a.clone(), set(&[&a, &b, &c]))]));
        } else {
            assert_eq!(out.detached_locked, 1);
            assert_eq!(segments.len(), 2, "{segments:?}");
            assert_eq!(segments[&a], set(&[&a, &b]));
            let salt = segments
                .keys()
                .find(|k| k.len() == 32)
                .expect("a detached segment")
                .clone();
            assert_eq!(segments[&salt], set(&[&c]));
            let detached = env.keys().segment(&pt, &salt);
            assert_eq!(
                env.inspect
                    .get(&env.keys().cut_from(&detached))
                    .await
                    .as_deref(),
                Some(a.as_str())
            );
            // It inherits the root flag for its deadline.
            let queue = env.inspect.queue(&env.keys().queue(0)).await;
            assert_eq!(queue.get(&detached), Some(&(NOW + 1.0 + 10.0)));
        }
        env.assert_layout().await;
    }
}

async fn merge_of_a_large_index(backend: Backend) {
    const CHILDREN: u64 = 9000;
    let mut env = Env::start(backend, |_| {}).await;
    let t = trace(14);
    let (root, parent) = (id(0xa), id(0xb));
    // Every child in its own batch: 9000 salts in the index of segment `b`.
    stream::iter(0..CHILDREN)
        .for_each_concurrent(32, |n| {
            let span = TestSpan::new(&t, &id(0x1000 + n), Some(&parent));
            let env = &env;
            async move {
                env.ingest(&[span], NOW).await;
            }
        })
        .await;
    let pt = TestSpan::new(&t, &parent, None).pt();
    assert_eq!(
        env.inspect
            .scard(&env.keys().member_keys(&pt, &parent))
            .await,
        CHILDREN
    );
    let out = env
        .ingest(&[TestSpan::new(&t, &parent, Some(&root))], NOW + 1.0)
        .await;
    assert_eq!(out.segments_merged, 1);
    let mk = env.keys().member_keys(&pt, &root);
    assert_eq!(env.inspect.scard(&mk).await, CHILDREN + 1);
    assert!(
        !env.inspect
            .exists(&env.keys().member_keys(&pt, &parent))
            .await
    );
    let merged_seg = env.keys().segment(&pt, &parent);
    assert!(
        !env.inspect
            .exists(&env.keys().ingested_count(&merged_seg))
            .await
    );
    let seg = env.keys().segment(&pt, &root);
    assert_eq!(
        env.inspect.get(&env.keys().ingested_count(&seg)).await,
        Some((CHILDREN + 1).to_string())
    );
    let queue = env.inspect.queue(&env.keys().queue(0)).await;
    assert_eq!(
        queue.keys().collect::<Vec<_>>(),
        vec![&seg],
        "the merged segment left the queue"
    );
    // The lifetime cap follows the oldest part: first-seen came from `b`.
    assert_eq!(
        env.inspect.get(&env.keys().first_seen(&seg)).await,
        Some(format!("{NOW:.3}"))
    );
    env.assert_layout().await;
}

async fn lifetime_cap(backend: Backend) {
    let mut env = Env::start(backend, |c| {
        c.buffer.max_segment_lifetime_secs = 100;
        c.buffer.timeout_secs = 60;
        c.buffer.root_timeout_secs = 10;
    })
    .await;
    // Root segment: 10 s after the last activity, but never past first + 100.
    let t1 = trace(31);
    let (a, b, c) = (id(0xa), id(0xb), id(0xc));
    env.ingest(&[TestSpan::new(&t1, &a, None)], NOW).await;
    assert_eq!(deadline(&mut env, &t1, &a).await, Some(NOW + 10.0));
    env.ingest(&[TestSpan::new(&t1, &b, Some(&a))], NOW + 95.0)
        .await;
    assert_eq!(deadline(&mut env, &t1, &a).await, Some(NOW + 100.0));
    // Without root: 60 s, capped the same way.
    let t2 = trace(32);
    env.ingest(&[TestSpan::new(&t2, &b, Some(&a))], NOW).await;
    assert_eq!(deadline(&mut env, &t2, &a).await, Some(NOW + 60.0));
    env.ingest(&[TestSpan::new(&t2, &c, Some(&a))], NOW + 50.0)
        .await;
    assert_eq!(deadline(&mut env, &t2, &a).await, Some(NOW + 100.0));
    // A merge keeps the earliest first-seen: the child's segment started at NOW.
    let t3 = trace(33);
    let r = id(0xf);
    env.ingest(&[TestSpan::new(&t3, &c, Some(&b))], NOW).await;
    env.ingest(&[TestSpan::new(&t3, &b, Some(&r))], NOW + 80.0)
        .await;
    assert_eq!(deadline(&mut env, &t3, &r).await, Some(NOW + 100.0));
    env.assert_layout().await;
}

/// Queue score of segment `root` of project 1's trace `t` on shard 0.
async fn deadline(env: &mut Env, t: &str, root: &str) -> Option<f64> {
    let seg = env.keys().segment(&spanbuf::store::Keys::pt(1, t), root);
    let queue = env.keys().queue(0);
    env.inspect.queue(&queue).await.get(&seg).copied()
}

async fn invalid_spans_are_counted(backend: Backend) {
    let mut env = Env::start(backend, |c| c.buffer.max_span_bytes = 2048).await;
    let t = trace(40);
    let good = TestSpan::new(&t, &id(0xa), None);
    let lines: Vec<Vec<u8>> = vec![
        good.json(),
        b"not json at all".to_vec(),
        br#"{"span_id":"000000000000000b","project_id":1}"#.to_vec(),
        format!(r#"{{"trace_id":"{t}","span_id":"xyz","project_id":1}}"#).into_bytes(),
        format!(r#"{{"trace_id":"{t}","span_id":"000000000000000c","project_id":"one"}}"#)
            .into_bytes(),
        TestSpan::new(&t, &id(0xd), Some(&id(0xa)))
            .filler(4000)
            .json(),
        b"{\"truncated\": ".to_vec(),
    ];
    let out = env.ingest_raw(&lines, NOW).await;
    assert_eq!(out.spans, 1);
    let count = |reason: InvalidReason| {
        env.metrics
            .spans_invalid_total
            .with_label_values(&[reason.as_str()])
            .get()
    };
    assert_eq!(count(InvalidReason::Malformed), 2);
    assert_eq!(count(InvalidReason::MissingField), 1);
    assert_eq!(count(InvalidReason::BadId), 1);
    assert_eq!(count(InvalidReason::BadType), 1);
    assert_eq!(count(InvalidReason::TooLarge), 1);
    assert_eq!(env.metrics.spans_consumed_total.get(), 1);
    let segments = env.inspect.segments(&good.pt()).await;
    assert_eq!(segments, BTreeMap::from([(id(0xa), set(&[&id(0xa)]))]));
    // A batch of nothing but garbage is not an error either.
    let out = env
        .ingest_raw(&[b"\xff\xfe".to_vec(), b"[]".to_vec()], NOW)
        .await;
    assert_eq!(out.spans, 0);
    assert_eq!(count(InvalidReason::Malformed), 4);
    env.assert_layout().await;
}

async fn round_trips_do_not_grow(backend: Backend) {
    let mut env = Env::start(backend, |_| {}).await;
    let mut trips = Vec::new();
    for (n, (traces, per_trace)) in [(1u64, 10u64), (50, 10), (100, 20)].into_iter().enumerate() {
        let mut spans = Vec::new();
        for tr in 0..traces {
            let t = trace(10_000 * (n as u64 + 1) + tr);
            // Half the traces without root, children spread over two parents.
            for s in 0..per_trace {
                let parent = match s {
                    0 if tr % 2 == 0 => None,
                    0 => Some(id(0xffff)),
                    _ => Some(id(1 + s % 2)),
                };
                spans.push(TestSpan::new(&t, &id(1 + s), parent.as_deref()));
            }
        }
        let out = env.ingest(&spans, NOW).await;
        assert_eq!(out.spans as u64, traces * per_trace);
        trips.push(out.round_trips);
    }
    let expected = match backend {
        Backend::Standalone => 2, // payloads + inserts in one pipeline, then the queue
        Backend::Cluster => 3,    // payloads, inserts, queue (each stage fans out per slot)
    };
    assert_eq!(
        trips,
        vec![expected; 3],
        "round trips for batches of 10, 500 and 2000 spans"
    );
    env.assert_layout().await;
}

async fn shards_and_slices(backend: Backend) {
    let mut env = Env::start(backend, |c| c.buffer.slice_id = Some(7)).await;
    let t = trace(50);
    let root = TestSpan::new(&t, &id(0xa), None);
    env.ingest_on(3, std::slice::from_ref(&root), NOW).await;
    let seg = env.keys().segment(&root.pt(), &id(0xa));
    let queue_key = env.keys().queue(3);
    assert_eq!(queue_key, format!("{}:q:7-3", env.config.redis.key_prefix));
    assert_eq!(
        env.inspect.queue(&queue_key).await,
        BTreeMap::from([(seg, NOW + 10.0)])
    );
    env.assert_layout().await;
}

async fn scripts_reload_after_script_flush(backend: Backend) {
    let mut env = Env::start(backend, |_| {}).await;
    let t = trace(60);
    let (a, b) = (id(0xa), id(0xb));
    env.ingest(&[TestSpan::new(&t, &a, None)], NOW).await;
    env.inspect.flush_scripts().await;
    // EVALSHA gets NOSCRIPT; the store reloads the scripts and retries only
    // the calls that failed, so nothing is counted twice.
    let out = env
        .ingest(&[TestSpan::new(&t, &b, Some(&a))], NOW + 1.0)
        .await;
    assert_eq!(out.spans, 1);
    let pt = spanbuf::store::Keys::pt(1, &t);
    assert_single_segment(&mut env, &pt, &a, &[&a, &b], true, NOW + 11.0).await;
    env.assert_layout().await;
}

/// Redis busy for 1.5 s (a long script elsewhere) is slow, not down: new
/// pooled connections and responses are waited for up to
/// SPANBUF_REDIS_TIMEOUT_MS (5 s here), not redis-rs's defaults (1 s to
/// connect, 500 ms per response), and every ingest succeeds at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_redis_is_waited_for_up_to_the_configured_timeout() {
    let env = Env::start(Backend::Standalone, |c| c.redis.timeout_ms = 5000).await;
    let url = env.config.redis.url.clone();
    let started = std::sync::Arc::new(tokio::sync::Notify::new());
    let busy = tokio::task::spawn_blocking({
        let started = started.clone();
        move || {
            let mut conn = redis::Client::open(url)
                .and_then(|c| c.get_connection())
                .expect("connection");
            started.notify_one();
            let script = "local t = redis.call('TIME') local start = t[1] * 1000000 + t[2] \
                          repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start > 1500000 \
                          return 1";
            redis::cmd("EVAL")
                .arg(script)
                .arg(0)
                .query::<i64>(&mut conn)
                .expect("busy script")
        }
    });
    started.notified().await;
    // Let the script start before the ingests are sent.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // Concurrent batches make the pool open new connections while Redis is busy.
    let batches: Vec<[TestSpan; 1]> = (1..=6u64)
        .map(|n| [TestSpan::new(&trace(n), &id(1), None)])
        .collect();
    let outs = futures::future::join_all(batches.iter().map(|b| env.ingest(b, NOW))).await;
    for out in outs {
        assert_eq!(out.spans, 1);
        assert_eq!(out.spans_redelivered, 0, "written once, not retried");
    }
    assert_eq!(busy.await.expect("busy task"), 1);
}
