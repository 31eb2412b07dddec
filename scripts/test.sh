#!/usr/bin/env bash
# The project's test command: installs missing test dependencies (idempotent),
# then runs the whole suite against real redis-server and tansu processes.
#
# Extra arguments go to `cargo test`. Target selectors among them (`--test NAME`,
# `--lib`, `--bench NAME`, ...) replace the default `--all-targets`, because cargo
# adds selected targets together: `--all-targets --test x` would still run all.
#   scripts/test.sh                          # everything
#   scripts/test.sh --test support_selftest  # one integration test binary
#
# tests/support finds tansu at .tools/bin/tansu, where install-deps.sh puts it.
# SPANBUF_TANSU_BIN overrides that, but is deliberately not exported here: the
# spanbuf config rejects unknown SPANBUF_* variables, so exporting it would break
# anything in the suite that reads its configuration from the environment.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh

targets=(--all-targets)
for arg in "$@"; do
    case "$arg" in
        --) break ;;
        --lib | --bins | --bin | --bin=* | --examples | --example | --example=* | \
            --tests | --test | --test=* | --benches | --bench | --bench=* | \
            --all-targets | --doc)
            targets=()
            break
            ;;
    esac
done

exec cargo test "${targets[@]}" --locked "$@"
