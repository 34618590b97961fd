#!/usr/bin/env bash
# Fuzzes the writer's ingest parser (JSON, NDJSON, CSV) for a bounded time.
#
#   scripts/fuzz.sh [SECONDS]     default 300
#
# Installs cargo-fuzz when it is missing. The toolchain here is stable, so
# the target runs without a sanitizer (`-s none`); Rust's own checks (bounds,
# overflow, the target's assertions) still turn a bug into a crash. Prints
# libFuzzer's final statistics (executions, corpus size) and exits non-zero
# with the crashing input saved under fuzz/artifacts/ when one is found.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-300}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi
mkdir -p fuzz/corpus/ingest
cd fuzz
# cargo fuzz passes a few -Z flags of its own even without a sanitizer.
export RUSTC_BOOTSTRAP=1
cargo fuzz run ingest --sanitizer none corpus/ingest seeds/ingest -- \
  -max_total_time="$seconds" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 2>&1 \
  | grep -v '^#[0-9]*.*\(NEW\|REDUCE\|pulse\)'
