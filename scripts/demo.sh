#!/usr/bin/env bash
# spanbuf demo: the whole data path on this machine, then a summary.
#
# Installs what is missing (Debian's redis-server, the tansu broker), builds
# spanbuf, starts Redis and tansu on free loopback ports, creates the topics,
# produces a synthetic workload (DEMO_SPANS spans, default 100000) to the input
# topic, runs `spanbuf run` until every span is flushed, audits the output
# topic against the input, prints a summary, and stops everything it started.
#
#   bash scripts/demo.sh
#   DEMO_SPANS=20000 bash scripts/demo.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
SPANS=${DEMO_SPANS:-100000}
TIMEOUT=${DEMO_TIMEOUT_SECS:-300}

bash scripts/install-deps.sh
echo "building spanbuf (release)..."
cargo build --release --locked --quiet
BIN=$PWD/target/release/spanbuf
TANSU=$PWD/.tools/bin/tansu

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_port() { # name port
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "demo: $1 did not start on port $2" >&2
    exit 1
}
metric() { # name → value on the worker's /metrics, 0 if absent
    python3 - "$HTTP_PORT" "$1" <<'EOF'
import sys, urllib.request
port, name = sys.argv[1], sys.argv[2]
try:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
except Exception:
    print(0); sys.exit()
for line in text.splitlines():
    if line.startswith(name + " "):
        print(line.split()[1]); break
else:
    print(0)
EOF
}

REDIS_PORT=$(free_port)
KAFKA_PORT=$(free_port)
HTTP_PORT=$(free_port)

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$work" --daemonize no >"$work/redis.log" 2>&1 &
pids+=($!)
RUST_LOG=warn "$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine memory://tansu/ >"$work/tansu.log" 2>&1 &
pids+=($!)
wait_port redis "$REDIS_PORT"
wait_port tansu "$KAFKA_PORT"

for topic in ingest-spans:4 buffered-segments:4 spans-dlq:1; do
    "$TANSU" topic create "${topic%%:*}" --partitions "${topic##*:}" \
        --broker "tcp://127.0.0.1:$KAFKA_PORT" >/dev/null
done

export SPANBUF_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export SPANBUF_KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT"
export SPANBUF_HTTP_ADDR="127.0.0.1:$HTTP_PORT"
export SPANBUF_DLQ_TOPIC=spans-dlq
# Short timeouts so the demo does not wait a minute for its last segments.
export SPANBUF_ROOT_TIMEOUT_SECS=2 SPANBUF_TIMEOUT_SECS=5 SPANBUF_MAX_SEGMENT_LIFETIME_SECS=30
# tansu holds a group join for about half the session timeout.
export SPANBUF_KAFKA_CONSUMER_PROP_SESSION_TIMEOUT_MS=6000
export SPANBUF_KAFKA_CONSUMER_PROP_HEARTBEAT_INTERVAL_MS=1000

echo "producing $SPANS spans to ingest-spans..."
"$BIN" gen --traces $(((SPANS + 19) / 20)) --spans-per-segment 20 --payload-bytes 900 \
    --output "$work/spans.ndjson" --kafka-topic ingest-spans 2>"$work/gen.json"
produced=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["spans"])' "$work/gen.json")

echo "running spanbuf run until every span is flushed..."
started=$(date +%s.%N)
"$BIN" run >"$work/worker.log" 2>&1 &
worker=$!
pids+=("$worker")
deadline=$((SECONDS + TIMEOUT))
while :; do
    flushed=$(metric spanbuf_spans_flushed_total)
    if [ "${flushed%.*}" -ge "$produced" ]; then break; fi
    if ! kill -0 "$worker" 2>/dev/null; then
        echo "demo: the worker exited early; its log:" >&2
        tail -n 30 "$work/worker.log" >&2
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "demo: only $flushed of $produced spans flushed after ${TIMEOUT}s" >&2
        exit 1
    fi
    sleep 0.5
done
finished=$(date +%s.%N)

consumed=$(metric spanbuf_spans_consumed_total)
segments=$(metric spanbuf_segments_flushed_total)
records=$(metric spanbuf_records_flushed_total)
dropped=$(python3 - "$HTTP_PORT" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=2).read().decode()
print(int(sum(float(l.split()[1]) for l in text.splitlines() if l.startswith("spanbuf_spans_dropped_total{"))))
EOF
)
"$BIN" audit --spans "$work/spans.ndjson" --records-topic buffered-segments >"$work/audit.json" || true

kill -TERM "$worker"
wait "$worker" && exit_code=0 || exit_code=$?

python3 - "$work/audit.json" "$produced" "$consumed" "$segments" "$records" "$dropped" \
    "$started" "$finished" "$HTTP_PORT" "$exit_code" <<'EOF'
import json, sys
audit = json.load(open(sys.argv[1]))
produced, consumed, segments, records, dropped = (int(float(x)) for x in sys.argv[2:7])
started, finished = float(sys.argv[7]), float(sys.argv[8])
secs = finished - started
print()
print("spanbuf demo summary")
print(f"  spans produced to ingest-spans : {produced}")
print(f"  spans consumed into Redis      : {consumed}")
print(f"  spans delivered (audit)        : {audit['spans_out']} in {audit['records']} records, {audit['segments']} segments")
print(f"  segments / records (metrics)   : {segments} / {records}")
print(f"  missing / wrong root / dup ids : {audit['missing']} / {audit['wrong_root']} / {audit['duplicated_with_other_flush_id']}")
print(f"  dropped (metrics)              : {dropped}")
print(f"  wall time to flush everything  : {secs:.1f} s  ({produced / secs:,.0f} spans/s, incl. the {2} s root timeout)")
print(f"  metrics endpoint used          : http://127.0.0.1:{sys.argv[9]}/metrics")
print(f"  worker exit code after SIGTERM : {sys.argv[10]}")
clean = audit["missing"] == 0 and audit["wrong_root"] == 0 and audit["duplicated_with_other_flush_id"] == 0
print("  audit                          :", "clean" if clean else "PROBLEMS: " + json.dumps(audit["examples"]))
sys.exit(0 if clean and sys.argv[10] == "0" else 1)
EOF
