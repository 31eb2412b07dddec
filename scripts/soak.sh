#!/usr/bin/env bash
# spanbuf soak run: `spanbuf run` at a sustained input rate for a long time,
# sampling memory and lag, then draining, auditing and summarising.
#
# Installs what is missing (install-deps.sh, plus a venv .tools/soak-venv with
# matplotlib and confluent-kafka), builds the release binary, starts Redis (no
# persistence, no maxmemory) and tansu on free loopback ports, starts
# SOAK_WORKERS workers, then for SOAK_MINUTES keeps the input topic fed at
# SOAK_RATE spans/s: one `spanbuf gen --kafka-topic` chunk of
# SOAK_RATE*SOAK_CHUNK_SECS spans every SOAK_CHUNK_SECS seconds, a distinct seed
# per chunk (so distinct trace ids). Every 10 s it samples worker RSS and CPU,
# Redis used_memory, DBSIZE and CPU, tansu RSS, the workers' counters (input lag
# = spans produced - messages consumed); every 60 s `spanbuf inspect --json`
# totals. Then it stops producing, waits until everything is consumed and
# flushed, records the workers' final counters, scans the output topic, audits,
# plots, prints a summary, and stops everything it started.
#
# The audit loads every span it checks into memory (~3 KB per span), so with
# more than SOAK_AUDIT_MAX_SPANS spans expected it is sampled: only every k-th
# chunk is kept on disk and audited against the records of those chunks' traces
# (taken from the output topic by key). Conservation counters and the span count
# of the whole output topic cover all spans either way.
#
#   bash scripts/soak.sh                          # 30 minutes, defaults below
#   SOAK_MINUTES=3 SOAK_RATE=5000 bash scripts/soak.sh
#
# Settings (environment):
#   SOAK_MINUTES=30          producing time
#   SOAK_RATE=20000          target input rate, spans/s (one worker on the 2-vCPU
#                            development machine kept up with 25000, not with 30000)
#   SOAK_WORKERS=1           `spanbuf run` processes (one consumer group)
#   SOAK_PARTITIONS=4        partitions of the input and output topics
#   SOAK_CHUNK_SECS=2        one gen chunk per this many seconds
#   SOAK_SAMPLE_SECS=10      sampling interval; SOAK_INSPECT_SECS=60 for inspect
#   SOAK_AUDIT=auto          auto | full | sample | off
#   SOAK_AUDIT_MAX_SPANS=1500000   auto: above this many expected spans, sample
#                            (1.5M spans: about 4.5 GiB of audit memory)
#   SOAK_DRAIN_TIMEOUT_SECS=600    longest wait for the buffer to empty at the end
#   SOAK_OUT=soak-out/<timestamp>  output directory
#   SOAK_KEEP_DATA=0         1 = keep the audited NDJSON files after a clean audit
# Other SPANBUF_* variables (timeouts, batch sizes...) pass through to the
# workers; the script sets the Redis URL, brokers, topics, group, HTTP address
# and the JSON output codec itself.
#
# Exit status: 0 when the audit is clean, the buffer drained, every produced
# span was consumed and delivered, none dropped or invalid, and the workers
# exited 0 on SIGTERM; 1 otherwise. Counters that do not balance and WARN/ERROR
# lines in the worker logs are printed as warnings.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
MINUTES=${SOAK_MINUTES:-30}
RATE=${SOAK_RATE:-20000}
WORKERS=${SOAK_WORKERS:-1}
PARTITIONS=${SOAK_PARTITIONS:-4}
CHUNK_SECS=${SOAK_CHUNK_SECS:-2}
SAMPLE_SECS=${SOAK_SAMPLE_SECS:-10}
INSPECT_SECS=${SOAK_INSPECT_SECS:-60}
AUDIT=${SOAK_AUDIT:-auto}
AUDIT_MAX=${SOAK_AUDIT_MAX_SPANS:-1500000}
DRAIN_TIMEOUT=${SOAK_DRAIN_TIMEOUT_SECS:-600}
KEEP_DATA=${SOAK_KEEP_DATA:-0}
OUT=${SOAK_OUT:-soak-out/$(date +%Y%m%d-%H%M%S)}
SPANS_PER_SEGMENT=20
PAYLOAD_BYTES=900

die() {
    echo "soak: $*" >&2
    if [ -s "${OUT:-}/samples.csv" ] && [ -x "${PY:-}" ]; then
        "$PY" scripts/soak_plot.py "$OUT/samples.csv" "$OUT/soak.png" 2>/dev/null \
            && echo "soak: samples so far in $OUT/samples.csv, plot $OUT/soak.png" >&2
    fi
    exit 1
}
for v in MINUTES RATE WORKERS PARTITIONS CHUNK_SECS SAMPLE_SECS INSPECT_SECS AUDIT_MAX DRAIN_TIMEOUT; do
    [[ ${!v} =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "SOAK_$v must be a number, got '${!v}'"
done
[[ $WORKERS =~ ^[0-9]+$ && $WORKERS -ge 1 ]] || die "SOAK_WORKERS must be a positive integer"
case $AUDIT in auto | full | sample | off) ;; *) die "SOAK_AUDIT must be auto, full, sample or off" ;; esac

bash scripts/install-deps.sh
VENV=$ROOT/.tools/soak-venv
PY=$VENV/bin/python
if ! "$PY" -c 'import matplotlib, confluent_kafka' 2>/dev/null; then
    echo "soak: installing matplotlib and confluent-kafka into $VENV..."
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check \
        "matplotlib==3.11.2" "confluent-kafka==2.16.1"
fi
echo "building spanbuf (release)..."
cargo build --release --locked --quiet
TANSU=$ROOT/.tools/bin/tansu

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
[ -z "$(ls -A "$OUT")" ] || die "$OUT is not empty"
# A private copy: a rebuild of target/ during the run must not change what runs.
cp target/release/spanbuf "$OUT/spanbuf"
BIN=$OUT/spanbuf

# Audit plan: every k-th chunk is kept and audited (k = 1: all of them).
chunk_spans=$(python3 -c "import math; print(math.ceil($RATE * $CHUNK_SECS / $SPANS_PER_SEGMENT) * $SPANS_PER_SEGMENT)")
expected=$(python3 -c "print(int($RATE * $MINUTES * 60))")
duration_ms=$(python3 -c "print(int($MINUTES * 60000))")
chunk_ms=$(python3 -c "print(int($CHUNK_SECS * 1000))")
case $AUDIT in
    off) every=0 ;;
    full) every=1 ;;
    sample) every=$(python3 -c "import math; print(max(2, math.ceil($expected / $AUDIT_MAX)))") ;;
    auto) every=$(python3 -c "import math; print(max(1, math.ceil($expected / $AUDIT_MAX)))") ;;
esac

pids=()
producer=""
sampler=""
running() { # pid: alive and not a zombie
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ $state != Z* ]]
}
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    # The producer loop stops its current `gen` itself on TERM.
    for pid in $producer $sampler; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 100); do
        local alive=0
        for pid in $producer $sampler "${pids[@]}"; do
            if running "$pid"; then alive=1; fi
        done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for pid in $producer $sampler "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
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
now_ms() { date +%s%3N; }

REDIS_PORT=$(free_port)
KAFKA_PORT=$(free_port)
HTTP_PORTS=()
for _ in $(seq 1 "$WORKERS"); do HTTP_PORTS+=("$(free_port)"); done
HTTP_CSV=$(IFS=,; echo "${HTTP_PORTS[*]}")
# Sum (or max) of a metric over all workers, every label; 0 if absent.
metric() { # name [sum|max]
    python3 - "$HTTP_CSV" "$1" "${2:-sum}" <<'EOF'
import sys, urllib.request
ports, name, how = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
vals = []
for port in ports:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3).read().decode()
    except Exception:
        continue
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            vals.append(float(line.rsplit(" ", 1)[1]))
print(int(max(vals, default=0) if how == "max" else sum(vals)))
EOF
}

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$OUT" --daemonize no >"$OUT/redis.log" 2>&1 &
REDIS_PID=$!
pids+=("$REDIS_PID")
RUST_LOG=warn "$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine memory://tansu/ >"$OUT/tansu.log" 2>&1 &
TANSU_PID=$!
pids+=("$TANSU_PID")
wait_port redis "$REDIS_PORT"
wait_port tansu "$KAFKA_PORT"
for topic in ingest-spans buffered-segments; do
    "$TANSU" topic create "$topic" --partitions "$PARTITIONS" \
        --broker "tcp://127.0.0.1:$KAFKA_PORT" >/dev/null
done

export SPANBUF_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export SPANBUF_KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT"
export SPANBUF_INPUT_TOPIC=ingest-spans SPANBUF_OUTPUT_TOPIC=buffered-segments
export SPANBUF_CONSUMER_GROUP=spanbuf-soak SPANBUF_OUTPUT_CODEC=json
# tansu holds a group join for about half the session timeout.
export SPANBUF_KAFKA_CONSUMER_PROP_SESSION_TIMEOUT_MS=${SPANBUF_KAFKA_CONSUMER_PROP_SESSION_TIMEOUT_MS:-6000}
export SPANBUF_KAFKA_CONSUMER_PROP_HEARTBEAT_INTERVAL_MS=${SPANBUF_KAFKA_CONSUMER_PROP_HEARTBEAT_INTERVAL_MS:-1000}
"$BIN" config >"$OUT/config.txt"

WORKER_PIDS=()
for i in $(seq 1 "$WORKERS"); do
    SPANBUF_HTTP_ADDR="127.0.0.1:${HTTP_PORTS[$((i - 1))]}" "$BIN" run >"$OUT/worker-$i.log" 2>&1 &
    WORKER_PIDS+=($!)
    pids+=($!)
done
WORKER_CSV=$(IFS=,; echo "${WORKER_PIDS[*]}")
workers_alive() {
    for pid in "${WORKER_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || return 1; done
}
echo "waiting for $WORKERS worker(s) to be assigned the $PARTITIONS partitions..."
deadline=$((SECONDS + 120))
until [ "$(metric spanbuf_assigned_partitions)" -ge "$PARTITIONS" ]; do
    workers_alive || die "a worker exited; see $OUT/worker-*.log"
    [ "$SECONDS" -lt "$deadline" ] || die "partitions not assigned after 120 s; see $OUT/worker-*.log"
    sleep 0.5
done

# --- producer: one gen chunk per CHUNK_SECS, paced on the wall clock ----------
# producer.csv: chunk,seed,audited,scheduled_ms,start_ms,end_ms,spans
produce_loop() {
    local g=""
    trap '[ -n "$g" ] && kill -TERM "$g" 2>/dev/null; exit 143' TERM
    local traces=$((chunk_spans / SPANS_PER_SEGMENT))
    local start end_ms chunk=0 at started finished spans keep output
    start=$(now_ms)
    end_ms=$((start + duration_ms))
    echo "chunk,seed,audited,scheduled_ms,start_ms,end_ms,spans" >"$OUT/producer.csv"
    while :; do
        at=$((start + chunk * chunk_ms))
        [ "$at" -lt "$end_ms" ] || break
        local wait_ms=$((at - $(now_ms)))
        if [ "$wait_ms" -gt 0 ]; then sleep "$((wait_ms / 1000)).$(printf %03d $((wait_ms % 1000)))"; fi
        keep=0
        if [ "$every" -gt 0 ] && [ $((chunk % every)) -eq 0 ]; then keep=1; fi
        output=-
        [ "$keep" = 1 ] && output=$OUT/chunk.tmp
        started=$(now_ms)
        "$BIN" gen --seed $((1000 + chunk)) --traces "$traces" \
            --spans-per-segment "$SPANS_PER_SEGMENT" --payload-bytes "$PAYLOAD_BYTES" \
            --start "$((started / 1000))" --rate "$RATE" \
            --kafka-topic ingest-spans --output "$output" 2>"$OUT/gen.err" &
        g=$!
        if ! wait "$g"; then
            g=""
            echo "soak: gen failed on chunk $chunk:" >&2
            cat "$OUT/gen.err" >&2
            exit 1
        fi
        g=""
        finished=$(now_ms)
        spans=$(tail -n 1 "$OUT/gen.err" | python3 -c 'import json,sys; print(json.load(sys.stdin)["spans"])')
        if [ "$keep" = 1 ]; then cat "$OUT/chunk.tmp" >>"$OUT/input.ndjson" && rm "$OUT/chunk.tmp"; fi
        echo "$chunk,$((1000 + chunk)),$keep,$at,$started,$finished,$spans" >>"$OUT/producer.csv"
        chunk=$((chunk + 1))
    done
}

# --- sampler: a CSV row every SAMPLE_SECS, inspect every INSPECT_SECS ---------
SAMPLER_CFG=$(python3 -c 'import json,sys; print(json.dumps(dict(out=sys.argv[1], bin=sys.argv[2], redis_port=sys.argv[3], ports=sys.argv[4].split(","), pids=sys.argv[5].split(","), redis_pid=sys.argv[6], tansu_pid=sys.argv[7], every=float(sys.argv[8]), inspect_every=float(sys.argv[9]), brokers=sys.argv[10])))' \
    "$OUT" "$BIN" "$REDIS_PORT" "$HTTP_CSV" "$WORKER_CSV" "$REDIS_PID" "$TANSU_PID" "$SAMPLE_SECS" "$INSPECT_SECS" "$SPANBUF_KAFKA_BROKERS")
run_sampler() {
    exec "$PY" -u - "$SAMPLER_CFG" <<'EOF'
import csv, json, os, subprocess, sys, time, urllib.request
cfg = json.loads(sys.argv[1])
out = cfg["out"]
clk = os.sysconf("SC_CLK_TCK")
SUM = ["spanbuf_messages_consumed_total", "spanbuf_spans_consumed_total", "spanbuf_spans_flushed_total",
       "spanbuf_spans_dropped_total", "spanbuf_backpressure_active"]
MAX = ["spanbuf_flush_lag_seconds"]

def proc(pid):
    try:
        rss = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return rss, round((int(fields[11]) + int(fields[12])) / clk, 2)
    except (OSError, IndexError, ValueError):
        return "", ""

def metrics():
    m = {k: 0.0 for k in SUM + MAX}
    for port in cfg["ports"]:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3).read().decode()
        except Exception:
            continue
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in m:
                v = float(line.rsplit(" ", 1)[1])
                m[name] = max(m[name], v) if name in MAX else m[name] + v
    return m

def redis():
    try:
        info = subprocess.run(["redis-cli", "-p", cfg["redis_port"], "INFO"], capture_output=True,
                              text=True, timeout=10).stdout
        keys = subprocess.run(["redis-cli", "-p", cfg["redis_port"], "DBSIZE"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        kv = dict(l.split(":", 1) for l in info.splitlines() if ":" in l)
        return (int(kv["used_memory"]), int(kv["used_memory_rss"]), int(keys),
                round(float(kv["used_cpu_sys"]) + float(kv["used_cpu_user"]), 2))
    except Exception:
        return "", "", "", ""

try:  # the input topic's end offsets: what was produced, exactly
    from confluent_kafka import Consumer, TopicPartition
    kc = Consumer({"bootstrap.servers": cfg["brokers"], "group.id": "soak-sampler"})
    kparts = [TopicPartition("ingest-spans", p)
              for p in sorted(kc.list_topics("ingest-spans", timeout=10).topics["ingest-spans"].partitions)]
except Exception as e:
    print(f"soak sampler: no watermarks ({e}); input lag from producer.csv", flush=True)
    kc = None

def in_topic():
    try:
        return sum(kc.get_watermark_offsets(tp, timeout=5, cached=False)[1] for tp in kparts)
    except Exception:
        return ""

def produced():
    try:
        with open(os.path.join(out, "producer.csv")) as f:
            return sum(int(r["spans"]) for r in csv.DictReader(f))
    except (OSError, ValueError, KeyError):
        return 0

def inspect():
    t = time.time()
    try:
        r = subprocess.run([cfg["bin"], "inspect", "--json"], capture_output=True, timeout=120)
        tot = json.loads(r.stdout)["totals"]
        return [tot["payload_sets"], tot["spans_buffered"], tot["segments_queued"],
                round(tot["max_lag_secs"], 2), round(time.time() - t, 2)]
    except Exception:
        return ["", "", "", "", ""]

n = len(cfg["pids"])
header = (["time", "elapsed_s", "phase", "produced_spans", "input_topic_messages", "consumed_messages", "consumed_spans",
           "flushed_spans", "dropped_spans", "lag_spans", "flush_lag_max_s", "backpressure"]
          + [f"worker{i + 1}_rss_kb" for i in range(n)] + ["workers_cpu_s"]
          + ["redis_used_memory", "redis_used_memory_rss", "redis_keys", "redis_cpu_s",
             "tansu_rss_kb", "tansu_cpu_s", "load1", "insp_payload_sets", "insp_spans_buffered",
             "insp_segments_queued", "insp_max_lag_s", "insp_secs"])
f = open(os.path.join(out, "samples.csv"), "w", newline="")
w = csv.writer(f)
w.writerow(header)
f.flush()
t0 = time.time()
next_inspect = t0
k = 0
while True:
    now = time.time()
    phase = "drain" if os.path.exists(os.path.join(out, "producer.done")) else "produce"
    top = in_topic() if kc else ""  # read together with the counters: the lag is their difference
    m = metrics()
    prod = produced()
    rss, cpu = zip(*(proc(p) for p in cfg["pids"]))
    mem, mem_rss, keys, rcpu = redis()
    trss, tcpu = proc(cfg["tansu_pid"])
    insp = ["", "", "", "", ""]
    if now >= next_inspect:
        insp = inspect()
        next_inspect += cfg["inspect_every"]
    # tansu's end offsets can trail by the last batch: take the larger count.
    lag = max(prod, top or 0) - int(m["spanbuf_messages_consumed_total"])
    row = ([round(now, 1), round(now - t0, 1), phase, prod, top, int(m["spanbuf_messages_consumed_total"]),
            int(m["spanbuf_spans_consumed_total"]), int(m["spanbuf_spans_flushed_total"]),
            int(m["spanbuf_spans_dropped_total"]), lag, round(m["spanbuf_flush_lag_seconds"], 2),
            int(m["spanbuf_backpressure_active"])]
           + list(rss) + [round(sum(c for c in cpu if c != ""), 2)]
           + [mem, mem_rss, keys, rcpu, trss, tcpu, os.getloadavg()[0]] + insp)
    w.writerow(row)
    f.flush()
    if k % max(1, round(60 / cfg["every"])) == 0:
        mib = lambda b: f"{b / 2**20:.0f}" if b != "" else "?"
        rss_s = "/".join(f"{r / 1024:.0f}" if r != "" else "?" for r in rss)
        print(f"[soak {int(now - t0) // 60:3d} min] {phase}: produced {prod:,} consumed "
              f"{int(m['spanbuf_messages_consumed_total']):,} lag {lag:,} | worker RSS {rss_s} MiB | "
              f"redis {mib(mem)} MiB, {keys} keys | tansu {mib(trss * 1024 if trss != '' else '')} MiB"
              f" | load {os.getloadavg()[0]:.1f}", flush=True)
    k += 1
    time.sleep(max(0.0, t0 + k * cfg["every"] - time.time()))
EOF
}

echo "soak: $MINUTES min at $RATE spans/s ($chunk_spans spans every ${CHUNK_SECS}s), $WORKERS worker(s), output in $OUT"
if [ "$every" = 0 ]; then echo "soak: audit off"
elif [ "$every" = 1 ]; then echo "soak: audit of every span (about $expected)"
else echo "soak: audit of 1 chunk in $every (about $((expected / every)) of $expected spans)"; fi
run_sampler &
sampler=$!
produce_started=$(now_ms)
produce_loop &
producer=$!

status=0
while kill -0 "$producer" 2>/dev/null; do
    workers_alive || die "a worker exited during the run; see $OUT/worker-*.log"
    sleep 1
done
wait "$producer" || status=$?
producer=""
[ "$status" = 0 ] || die "the producer failed (exit $status)"
touch "$OUT/producer.done"
produce_finished=$(now_ms)
produced=$(python3 -c 'import csv,sys; print(sum(int(r["spans"]) for r in csv.DictReader(open(sys.argv[1]))))' "$OUT/producer.csv")
echo "soak: producing done: $produced spans; draining..."

# --- drain: everything consumed, then the buffer empty ------------------------
caught_up_ms=""
drained=0
deadline=$((SECONDS + DRAIN_TIMEOUT))
while [ "$SECONDS" -lt "$deadline" ]; do
    workers_alive || die "a worker exited while draining; see $OUT/worker-*.log"
    if [ "$(metric spanbuf_messages_consumed_total)" -ge "$produced" ]; then
        [ -n "$caught_up_ms" ] || caught_up_ms=$(now_ms)
        "$BIN" inspect --json >"$OUT/inspect-final.json" 2>/dev/null || true
        if python3 -c 'import json,sys; t = json.load(open(sys.argv[1]))["totals"]; sys.exit(0 if t["segments_queued"] == 0 and t["spans_buffered"] == 0 else 1)' "$OUT/inspect-final.json" 2>/dev/null; then
            drained=1
            break
        fi
    fi
    sleep 2
done
drained_ms=$(now_ms)
[ -n "$caught_up_ms" ] || caught_up_ms=0
"$BIN" inspect --json >"$OUT/inspect-final.json" 2>/dev/null || true
# What is left in Redis (a leak shows here): up to 100 keys with type and TTL.
redis-cli -p "$REDIS_PORT" --scan 2>/dev/null | head -n 100 | while read -r key; do
    echo "$key $(redis-cli -p "$REDIS_PORT" TYPE "$key" </dev/null) ttl=$(redis-cli -p "$REDIS_PORT" TTL "$key" </dev/null)"
done >"$OUT/redis-leftover.txt" || true
{ echo "# SLOWLOG GET 20"; redis-cli -p "$REDIS_PORT" SLOWLOG GET 20
  echo "# INFO commandstats"; redis-cli -p "$REDIS_PORT" INFO commandstats
  echo "# INFO stats"; redis-cli -p "$REDIS_PORT" INFO stats; } >"$OUT/redis-diag.txt" 2>&1 || true
sleep "$SAMPLE_SECS" # one more sample of the drained state
kill -TERM "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
sampler=""

# --- final counters, then stop the workers ------------------------------------
for i in $(seq 1 "$WORKERS"); do
    curl -fsS "http://127.0.0.1:${HTTP_PORTS[$((i - 1))]}/metrics" >"$OUT/metrics-worker-$i.txt" || true
done
worker_exits=()
for pid in "${WORKER_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
for pid in "${WORKER_PIDS[@]}"; do
    if wait "$pid"; then worker_exits+=(0); else worker_exits+=($?); fi
done
EXITS_CSV=$(IFS=,; echo "${worker_exits[*]}")

# --- the whole output topic: records and spans; the audited traces' records ---
echo "soak: scanning the output topic..."
"$PY" - "127.0.0.1:$KAFKA_PORT" buffered-segments "$OUT" "$every" >"$OUT/scan.json" <<'EOF' || true
import json, os, re, sys, time
from confluent_kafka import Consumer, KafkaError, TopicPartition, OFFSET_BEGINNING
brokers, topic, out, every = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t = time.time()
traces = set()
if every > 1 and os.path.exists(os.path.join(out, "input.ndjson")):
    pat = re.compile(rb'"trace_id":"([0-9a-f]+)"')
    with open(os.path.join(out, "input.ndjson"), "rb") as f:
        for line in f:
            m = pat.search(line)
            if m:
                traces.add(m.group(1))
c = Consumer({"bootstrap.servers": brokers, "group.id": f"soak-scan-{os.getpid()}",
              "enable.auto.commit": False, "enable.partition.eof": True})
parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
eof, records, spans, kept, kept_spans, last = set(), 0, 0, 0, 0, time.time()
sample = open(os.path.join(out, "audit-records.ndjson"), "wb") if traces else None
while len(eof) < len(parts) and time.time() - last < 60:
    for msg in c.consume(1000, 1.0):
        if msg.error():
            if msg.error().code() == KafkaError._PARTITION_EOF:
                eof.add(msg.partition())
            continue
        last = time.time()
        eof.discard(msg.partition())
        n = int(dict(msg.headers() or []).get("span_count", b"0"))
        records += 1
        spans += n
        if sample is not None and msg.key() in traces:
            sample.write(msg.value() + b"\n")
            kept += 1
            kept_spans += n
c.close()
print(json.dumps({"records": records, "spans": spans, "complete": len(eof) == len(parts),
                  "audited_traces": len(traces), "audited_records": kept,
                  "audited_record_spans": kept_spans, "secs": round(time.time() - t, 1)}))
EOF

# --- audit ---------------------------------------------------------------------
if [ "$every" -gt 1 ]; then # the broker and Redis are no longer needed: free their memory
    for pid in "$TANSU_PID" "$REDIS_PID"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait "$TANSU_PID" "$REDIS_PID" 2>/dev/null || true
fi
audit_mode=off
timer=()
[ -x /usr/bin/time ] && timer=(/usr/bin/time -f '%M %e' -o "$OUT/audit.time")
if [ "$every" = 1 ]; then
    audit_mode=full
    echo "soak: auditing every span against the output topic..."
    "${timer[@]}" "$BIN" audit --spans "$OUT/input.ndjson" --records-topic buffered-segments \
        >"$OUT/audit.json" 2>"$OUT/audit.err" || true
elif [ "$every" -gt 1 ]; then
    audit_mode="sample: 1 chunk in $every"
    echo "soak: auditing the sampled chunks against their traces' records..."
    touch "$OUT/audit-records.ndjson"
    "${timer[@]}" "$BIN" audit --spans "$OUT/input.ndjson" --records "$OUT/audit-records.ndjson" \
        >"$OUT/audit.json" 2>"$OUT/audit.err" || true
fi

echo "soak: plotting..."
"$PY" scripts/soak_plot.py "$OUT/samples.csv" "$OUT/soak.png" || echo "soak: the plot failed" >&2

set +e
python3 - "$OUT" "$RATE" "$MINUTES" "$WORKERS" "$produce_started" "$produce_finished" \
    "$caught_up_ms" "$drained_ms" "$drained" "$audit_mode" "$EXITS_CSV" "$KEEP_DATA" "$chunk_spans" <<'EOF'
import csv, glob, json, os, re, sys
out, rate, minutes, workers = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
p0, p1, caught, drained_at = (int(x) / 1000 for x in sys.argv[5:9])
drained, audit_mode, exits, keep = sys.argv[9] == "1", sys.argv[10], sys.argv[11], sys.argv[12] == "1"
chunk_spans = int(sys.argv[13])

def load(name, default=None):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except Exception:
        return default

rows = list(csv.DictReader(open(os.path.join(out, "samples.csv"))))
prod_rows = list(csv.DictReader(open(os.path.join(out, "producer.csv"))))
produced = sum(int(r["spans"]) for r in prod_rows)
behind = [(int(r["start_ms"]) - int(r["scheduled_ms"])) / 1000 for r in prod_rows]

# Final counters summed over the workers (every label).
def counters():
    tot = {}
    for path in glob.glob(os.path.join(out, "metrics-worker-*.txt")):
        for line in open(path):
            if line.startswith("spanbuf_") and not line.startswith("#"):
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if name.endswith("_total"):
                    tot[name] = tot.get(name, 0) + float(line.rsplit(" ", 1)[1])
    return {k.removeprefix("spanbuf_").removesuffix("_total"): int(v) for k, v in tot.items()}
c = counters()
json.dump(c, open(os.path.join(out, "metrics-final.json"), "w"), indent=1, sort_keys=True)
g = lambda k: c.get(k, 0)
insp = (load("inspect-final.json") or {}).get("totals", {})
buffered = insp.get("spans_buffered", -1)
balance = g("spans_consumed") - (g("spans_flushed") + g("spans_duplicate") + g("spans_dropped") + max(buffered, 0))
scan = load("scan.json", {})
audit = load("audit.json")
atime = (open(os.path.join(out, "audit.time")).read().split() if os.path.exists(os.path.join(out, "audit.time")) else [])

def col(name, rows=rows):
    return [float(r[name]) for r in rows if r.get(name) not in ("", None)]
def stats(vals, scale=1.0, fmt="{:,.0f}"):
    if not vals:
        return "n/a"
    v = [x / scale for x in vals]
    return "min " + fmt.format(min(v)) + "  max " + fmt.format(max(v)) + "  first " + fmt.format(v[0]) + "  last " + fmt.format(v[-1])
def slope(name, scale):  # per hour, over the producing phase after its first 2 minutes
    pts = [(float(r["elapsed_s"]), float(r[name]) / scale) for r in rows
           if r["phase"] == "produce" and float(r["elapsed_s"]) >= 120 and r[name] != ""]
    if len(pts) < 3 or pts[-1][0] - pts[0][0] < 300:  # too short to mean anything
        return None
    n = len(pts); mx = sum(x for x, _ in pts) / n; my = sum(y for _, y in pts) / n
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den * 3600 if den else None
fs = lambda s, u: "n/a (under 7 min)" if s is None else f"{s:+,.1f} {u}/h"

produce_secs = p1 - p0
consume_secs = (caught - p0) if caught > 0 else float("nan")
prod_rows_s = [r for r in rows if r["phase"] == "produce"]
lags = col("lag_spans", prod_rows_s)
tail = lags[len(lags) * 2 // 3:] or lags
catch_up = caught - p1 if caught > 0 else float("nan")
# Sustained: the producer kept its pace, the lag stayed within about a chunk
# (it is sampled at a random point of a chunk's burst) and the backlog was
# consumed within seconds once producing stopped.
tail_lag = sum(tail) / max(1, len(tail))
sustained = (caught > 0 and catch_up <= 15 and tail_lag <= 2 * chunk_spans
             and produced >= 0.97 * rate * produce_secs)
problems, warnings = [], []
if audit_mode != "off":
    if audit is None:
        problems.append("audit did not run (see audit.err)")
    elif not all(audit[k] == 0 for k in ("missing", "duplicated_with_other_flush_id", "wrong_root", "unexpected")):
        problems.append("audit not clean")
if not drained:
    problems.append("buffer not drained before the timeout")
if g("messages_consumed") < produced:
    problems.append(f"consumed {g('messages_consumed')} messages < produced {produced}")
if g("spans_dropped") or g("spans_invalid"):
    problems.append("dropped or invalid spans")
if balance != 0:
    # A batch re-sent after a Redis timeout that Redis had executed counts as
    # redelivered, not consumed: the identity is then off by exactly that.
    why = (" = spans_redelivered: a batch retried in-process after a Redis error (worker log)"
           if balance + g("spans_redelivered") == 0 and g("messages_consumed") == produced else "")
    warnings.append(f"counters do not balance ({balance:+,}){why}")
if scan.get("spans") is not None and scan.get("spans") < produced:
    problems.append(f"output topic holds {scan.get('spans')} spans, fewer than the {produced} produced")
if scan.get("spans") is not None and scan.get("spans") < g("spans_flushed"):
    problems.append(f"output topic holds {scan.get('spans')} spans, spans_flushed says {g('spans_flushed')}")
if not scan:
    warnings.append("the output topic scan failed (scan.json)")
elif not scan.get("complete"):
    warnings.append("the output topic scan stopped on its idle timeout before every partition's end")
if any(x != "0" for x in exits.split(",")):
    problems.append(f"worker exit codes {exits} after SIGTERM")

L = []
L.append("spanbuf soak summary")
L.append(f"  output dir          : {out}")
L.append(f"  setting             : {minutes:g} min at {rate:,.0f} spans/s target, {workers} worker(s), default SPANBUF_* timeouts unless overridden")
L.append(f"  produced            : {produced:,} spans in {len(prod_rows)} chunks over {produce_secs:.0f} s = {produced / produce_secs:,.0f} spans/s; chunks started late: {sum(b > 1 for b in behind)} (most {max(behind, default=0):.1f} s)")
L.append(f"  consumed            : {g('messages_consumed'):,} messages in {consume_secs:.0f} s (until the last was consumed) = {g('messages_consumed') / consume_secs:,.0f} spans/s")
L.append(f"  input lag (spans)   : max {max(lags, default=0):,.0f}, mean of the last third {tail_lag:,.0f} (a chunk is {chunk_spans:,}), slope {fs(slope('lag_spans', 1), 'spans')}; caught up {catch_up:.1f} s after producing stopped -> {'SUSTAINED' if sustained else 'NOT sustained'}")
L.append(f"  drain               : {'empty' if drained else 'NOT empty'} {drained_at - p1:.0f} s after producing stopped")
for i in range(workers):
    k = f"worker{i + 1}_rss_kb"
    L.append(f"  worker {i + 1} RSS MiB    : {stats(col(k), 1024)}  slope {fs(slope(k, 1024), 'MiB')}")
L.append(f"  redis used_memory MiB: {stats(col('redis_used_memory'), 2**20)}  slope {fs(slope('redis_used_memory', 2**20), 'MiB')}")
L.append(f"  redis keys          : min {min(col('redis_keys'), default=0):,.0f}  max {max(col('redis_keys'), default=0):,.0f}  last {(col('redis_keys') or [0])[-1]:,.0f}")
L.append(f"  tansu RSS MiB       : {stats(col('tansu_rss_kb'), 1024)}")
L.append(f"  inspect (max)       : spans buffered {max(col('insp_spans_buffered'), default=0):,.0f}, payload sets {max(col('insp_payload_sets'), default=0):,.0f}, segments queued {max(col('insp_segments_queued'), default=0):,.0f}, flush lag {max(col('insp_max_lag_s'), default=0):.1f} s")
L.append(f"  CPU s (workers/redis/tansu): {(col('workers_cpu_s') or [0])[-1]:,.0f} / {(col('redis_cpu_s') or [0])[-1]:,.0f} / {(col('tansu_cpu_s') or [0])[-1]:,.0f}; load1 max {max(col('load1'), default=0):.1f}")
L.append(f"  counters            : consumed {g('spans_consumed'):,} = flushed {g('spans_flushed'):,} + duplicate {g('spans_duplicate'):,} + dropped {g('spans_dropped'):,} + buffered {buffered:,} ({'balanced' if balance == 0 else f'off by {balance:+,}'}); invalid {g('spans_invalid'):,}, redelivered {g('spans_redelivered'):,}")
L.append(f"  output topic        : {scan['records']:,} records, {scan['spans']:,} spans (span_count headers), read in {scan['secs']} s" if scan else "  output topic        : scan failed (see scan.json)")
if audit is None:
    L.append(f"  audit ({audit_mode})  : " + ("not run" if audit_mode == "off" else "FAILED to run, see audit.err"))
else:
    clean = all(audit[k] == 0 for k in ("missing", "duplicated_with_other_flush_id", "wrong_root", "unexpected"))
    L.append(f"  audit ({audit_mode}): {'clean' if clean else 'NOT CLEAN'}: {audit['spans_in']:,} spans in, {audit['spans_out']:,} out in {audit['records']:,} records; missing {audit['missing']}, dup other flush id {audit['duplicated_with_other_flush_id']}, wrong root {audit['wrong_root']}, unexpected {audit['unexpected']}"
             + (f"; audit peak RSS {int(atime[0]) / 1024:,.0f} MiB, {float(atime[1]):.0f} s" if len(atime) == 2 else ""))
logs = re.sub(r"\x1b\[[0-9;]*m", "", "".join(open(p, errors="replace").read()
                                             for p in sorted(glob.glob(os.path.join(out, "worker-*.log")))))
warn_n, err_n = logs.count(" WARN "), logs.count(" ERROR ")
pauses = {}
for path in glob.glob(os.path.join(out, "metrics-worker-*.txt")):
    for line in open(path):
        if line.startswith("spanbuf_backpressure_pauses_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            pauses[reason] = pauses.get(reason, 0) + int(float(line.rsplit(" ", 1)[1]))
if warn_n or err_n:
    warnings.append(f"worker logs: {warn_n} WARN, {err_n} ERROR lines")
L.append(f"  backpressure pauses : " + (", ".join(f"{k} {v}" for k, v in sorted(pauses.items())) or "none"))
L.append(f"  worker exits        : {exits}")
L.append(f"  files               : samples.csv, producer.csv, soak.png, summary.txt/json, audit.json, scan.json, metrics-final.json, redis-leftover.txt, redis-diag.txt, worker-*.log")
for w_ in warnings:
    L.append(f"  WARNING             : {w_}")
L.append("  result              : " + ("OK" if not problems else "FAILED: " + "; ".join(problems)))
text = "\n".join(L)
print("\n" + text)
open(os.path.join(out, "summary.txt"), "w").write(text + "\n")
json.dump({"produced": produced, "produce_secs": produce_secs, "produced_rate": produced / produce_secs,
           "consumed_rate": g("messages_consumed") / consume_secs if caught > 0 else None,
           "catch_up_secs": catch_up if caught > 0 else None, "sustained": sustained, "drained": drained,
           "counters": c, "buffered_at_end": buffered, "scan": scan, "audit": audit, "audit_mode": audit_mode,
           "problems": problems, "warnings": warnings, "backpressure_pauses": pauses}, open(os.path.join(out, "summary.json"), "w"), indent=1)
if not problems and not keep:
    for name in ("input.ndjson", "audit-records.ndjson", "spanbuf"):
        try:
            os.remove(os.path.join(out, name))
        except OSError:
            pass
sys.exit(1 if problems else 0)
EOF
status=$?
exit "$status"
