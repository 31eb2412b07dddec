#!/usr/bin/env bash
# spanbuf chaos run (issue 12 item 14): crashes under real traffic, seeded and
# repeatable, checked against the output topic.
#
# Three `spanbuf run` workers in one consumer group share one Redis (AOF,
# appendfsync always) and tansu. While 400k spans (10k traces x 2 segments x
# 20 spans, shuffled within 1,000 lines) plus 1 % invalid lines are produced
# over CHAOS_SECS, a random worker is SIGKILLed and restarted every 3-6 s, and
# Redis is SIGKILLed and restarted once, halfway. Short timeouts (root 2 s,
# no root 5 s) make segments flush while their traces are still arriving.
# Then the script waits until every queue is empty, and `spanbuf audit` reads
# the output topic back on its own: every valid span delivered, none twice
# under different flush_ids, each under its segment root.
#
#   bash scripts/chaos.sh                     # seed 1
#   CHAOS_SEED=7 CHAOS_OUT=/tmp/chaos bash scripts/chaos.sh
#
# Settings (environment):
#   CHAOS_SEED=1          seeds the workload, the kill schedule and its victims
#   CHAOS_SECS=60         producing (and killing) time
#   CHAOS_CHUNKS=20       the workload is produced in this many chunks, evenly
#                         over CHAOS_SECS (10k traces in all)
#   CHAOS_WORKERS=3       `spanbuf run` processes
#   CHAOS_PARTITIONS=6    partitions of the input and output topics
#   CHAOS_OUT=chaos-out/<timestamp>  output directory (logs, spans, report)
#   CHAOS_BIN=            run the workers with this spanbuf binary (an older
#                         build, to compare before and after); gen and audit
#                         always come from the tree
#
# The kill schedule (kills.csv: second, victim) depends on the seed alone, the
# workload on the seed and the chunk number; timing on the machine does not
# change which spans are produced, only when things happen.
#
# Exit status: 0 when the audit finds nothing missing, nothing delivered twice
# under different flush_ids and no wrong segment id; 1 otherwise.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
SEED=${CHAOS_SEED:-1}
SECS=${CHAOS_SECS:-60}
CHUNKS=${CHAOS_CHUNKS:-20}
WORKERS=${CHAOS_WORKERS:-3}
PARTITIONS=${CHAOS_PARTITIONS:-6}
OUT=${CHAOS_OUT:-chaos-out/$(date +%Y%m%d-%H%M%S)}
TRACES_PER_CHUNK=$((10000 / CHUNKS))

die() {
    echo "chaos: $*" >&2
    exit 1
}
for v in SEED SECS CHUNKS WORKERS PARTITIONS; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -ge 1 ]] || die "CHAOS_$v must be a positive integer, got '${!v}'"
done

bash scripts/install-deps.sh >/dev/null
echo "chaos: building spanbuf (release)..."
cargo build --release --locked --quiet
CHAOS_BIN=${CHAOS_BIN:-target/release/spanbuf}
[ -x "$CHAOS_BIN" ] || die "CHAOS_BIN $CHAOS_BIN is not an executable"
TANSU=$ROOT/.tools/bin/tansu
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
[ -z "$(ls -A "$OUT")" ] || die "$OUT is not empty"
# A private copy: a rebuild of target/ during the run must not change what runs.
cp "$CHAOS_BIN" "$OUT/spanbuf"
cp target/release/spanbuf "$OUT/spanbuf-tools"
BIN=$OUT/spanbuf
TOOLS=$OUT/spanbuf-tools

pids=()
worker_pids=()
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    for pid in "${worker_pids[@]}" "${pids[@]}" "${REDIS_PID:-}"; do
        [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_port() { # name port
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    die "$1 did not start on port $2"
}

REDIS_PORT=$(free_port)
KAFKA_PORT=$(free_port)
start_redis() {
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" \
        --appendonly yes --appendfsync always --dir "$OUT" \
        --daemonize no >>"$OUT/redis.log" 2>&1 &
    REDIS_PID=$!
    wait_port redis "$REDIS_PORT"
    # AOF replay: the port answers before the data is loaded.
    until [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; do sleep 0.05; done
}
start_redis
RUST_LOG=warn "$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine memory://tansu/ >"$OUT/tansu.log" 2>&1 &
pids+=($!)
wait_port tansu "$KAFKA_PORT"
for topic in ingest-spans buffered-segments; do
    "$TANSU" topic create "$topic" --partitions "$PARTITIONS" \
        --broker "tcp://127.0.0.1:$KAFKA_PORT" >/dev/null
done
"$TANSU" topic create spanbuf-dlq --partitions 1 --broker "tcp://127.0.0.1:$KAFKA_PORT" >/dev/null

export SPANBUF_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export SPANBUF_KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT"
export SPANBUF_INPUT_TOPIC=ingest-spans SPANBUF_OUTPUT_TOPIC=buffered-segments
export SPANBUF_DLQ_TOPIC=spanbuf-dlq SPANBUF_CONSUMER_GROUP=spanbuf-chaos
export SPANBUF_OUTPUT_CODEC=json SPANBUF_ROOT_TIMEOUT_SECS=2 SPANBUF_TIMEOUT_SECS=5
export SPANBUF_FLUSH_LOCK_TTL_SECS=5
# tansu holds a group join for about half the session timeout.
export SPANBUF_KAFKA_CONSUMER_PROP_SESSION_TIMEOUT_MS=6000
export SPANBUF_KAFKA_CONSUMER_PROP_HEARTBEAT_INTERVAL_MS=1000

HTTP_PORTS=()
for i in $(seq 0 $((WORKERS - 1))); do
    HTTP_PORTS+=("$(free_port)")
    worker_pids+=("")
done
start_worker() { # index
    SPANBUF_HTTP_ADDR="127.0.0.1:${HTTP_PORTS[$1]}" "$BIN" run >>"$OUT/worker-$1.log" 2>&1 &
    worker_pids[$1]=$!
}
for i in $(seq 0 $((WORKERS - 1))); do start_worker "$i"; done

# The kill schedule, from the seed alone.
RANDOM=$SEED
: >"$OUT/kills.csv"
at=0
while :; do
    at=$((at + 3 + RANDOM % 4))
    [ "$at" -lt "$SECS" ] || break
    echo "$at,worker-$((RANDOM % WORKERS))" >>"$OUT/kills.csv"
done
echo "$((SECS / 2)),redis" >>"$OUT/kills.csv"
sort -t, -k1,1n -o "$OUT/kills.csv" "$OUT/kills.csv"
echo "chaos: seed $SEED, $(grep -c worker "$OUT/kills.csv") worker kills and 1 Redis kill over ${SECS}s, output in $OUT"

# Producer: CHUNKS gen chunks evenly over SECS, a seed per chunk.
produce() {
    for c in $(seq 1 "$CHUNKS"); do
        "$TOOLS" gen --seed $((SEED * 1000 + c)) --traces "$TRACES_PER_CHUNK" \
            --segments-per-trace 2 --spans-per-segment 20 --shuffle-window 1000 \
            --invalid-fraction 0.01 --start "$(date +%s)" \
            --kafka-topic ingest-spans --output "$OUT/chunk-$c.ndjson" 2>>"$OUT/gen.err" \
            || { echo "chaos: gen failed on chunk $c" >&2; exit 1; }
        sleep "$(python3 -c "print($SECS / $CHUNKS)")"
    done
}
produce &
PRODUCER=$!
pids+=("$PRODUCER")

started=$(date +%s)
while IFS=, read -r second victim; do
    now=$(($(date +%s) - started))
    [ "$second" -gt "$now" ] && sleep $((second - now))
    if [ "$victim" = redis ]; then
        echo "chaos: t=${second}s SIGKILL redis"
        kill -KILL "$REDIS_PID"
        wait "$REDIS_PID" 2>/dev/null || true
        start_redis
    else
        i=${victim#worker-}
        echo "chaos: t=${second}s SIGKILL $victim"
        kill -KILL "${worker_pids[$i]}" 2>/dev/null || true
        wait "${worker_pids[$i]}" 2>/dev/null || true
        start_worker "$i"
    fi
done <"$OUT/kills.csv"
wait "$PRODUCER" || die "producing failed"

# Drain: every queue empty for 10 s in a row (a worker rejoining can still
# find spans in Kafka), at most 5 minutes.
queued() {
    local total=0 key n
    for key in $(redis-cli -p "$REDIS_PORT" --scan --pattern 'span-buf:q:*'); do
        n=$(redis-cli -p "$REDIS_PORT" zcard "$key")
        total=$((total + n))
    done
    echo "$total"
}
quiet=0
deadline=$(($(date +%s) + 300))
while [ "$quiet" -lt 10 ]; do
    [ "$(date +%s)" -lt "$deadline" ] || die "the buffer did not drain in 5 minutes ($(queued) segments queued)"
    if [ "$(queued)" = 0 ]; then quiet=$((quiet + 1)); else quiet=0; fi
    sleep 1
done

cat "$OUT"/chunk-*.ndjson >"$OUT/spans.ndjson"
# Empty queues do not prove everything was consumed (a partition whose owner
# was just killed waits for the rebalance): the audit is repeated while spans
# are missing, 10 s apart, for up to 5 minutes; what is missing then is lost.
audit() {
    set +e
    "$TOOLS" audit --spans "$OUT/spans.ndjson" --records-topic buffered-segments \
        --idle-secs 10 >"$OUT/audit.json" 2>"$OUT/audit.err"
    set -e
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("missing", -1))' "$OUT/audit.json"
}
echo "chaos: auditing $(wc -l <"$OUT/spans.ndjson") input lines against the output topic..."
deadline=$(($(date +%s) + 300))
while :; do
    missing=$(audit)
    [ "$missing" = 0 ] && break
    [ "$(date +%s)" -lt "$deadline" ] || break
    echo "chaos: $missing spans not delivered yet; auditing again in 10 s"
    sleep 10
done
python3 - "$OUT/audit.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
shown = ["spans_in", "spans_out", "records", "missing", "duplicated_with_other_flush_id",
         "duplicated_same_flush_id", "wrong_root", "unexpected"]
print("chaos: " + ", ".join(f"{k} {report.get(k)}" for k in shown))
bad = [k for k in ["missing", "duplicated_with_other_flush_id", "wrong_root", "unexpected"]
       if report.get(k, 0)]
for k in bad:
    print(f"chaos: {k}, e.g. {report.get('examples', {}).get(k, [])[:3]}")
sys.exit(1 if bad else 0)
EOF
