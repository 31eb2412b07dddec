#!/usr/bin/env bash
# Container health probe for spanbuf, for images without curl or wget:
#   spanbuf-healthcheck [/health|/ready]      (default /health)
# Sends one HTTP GET through bash's /dev/tcp to the address of
# SPANBUF_HTTP_ADDR (default 0.0.0.0:9102; an unspecified host means
# loopback) and exits 0 only on a 200 status line. The caller bounds the time
# (HEALTHCHECK --timeout).
set -euo pipefail

path=${1:-/health}
addr=${SPANBUF_HTTP_ADDR:-0.0.0.0:9102}
port=${addr##*:}
host=${addr%:*}
host=${host#[}
host=${host%]}
case $host in
    "" | 0.0.0.0) host=127.0.0.1 ;;
    ::) host=::1 ;;
esac

exec 3<>"/dev/tcp/$host/$port"
printf 'GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' "$path" >&3
IFS= read -r status <&3 || true
exec 3<&-
case $status in
    "HTTP/1."?" 200"*) exit 0 ;;
    *)
        echo "spanbuf-healthcheck: GET $path on $host:$port: ${status:-no response}" >&2
        exit 1
        ;;
esac
