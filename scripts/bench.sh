#!/usr/bin/env bash
# Runs the benchmarks behind docs/BENCHMARKS.md: builds the release binaries,
# starts MongoDB (or its stand-in) and the Pub/Sub emulator like test.sh,
# runs `outbox-bench writer`, `relay` and `latency`, stops what it started.
#   scripts/bench.sh                 all three
#   scripts/bench.sh writer --sizes 100 --clients 4   one, with options (see outbox-bench --help)
set -euo pipefail
source "$(dirname "$0")/lib/services.sh"
stop_services_on_exit
cd "$ROOT"

log "building the release binaries"
cargo build --release --locked --bin outbox-writer --bin outbox-relay --bin outbox-bench 2>&1 | tail -n 1
start_mongo
start_pubsub
export MONGODB_URL MONGODB_FLAVOR PUBSUB_EMULATOR_HOST
export OUTBOX_BIN_DIR="$ROOT/target/release"

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; MongoDB: $MONGODB_FLAVOR; Pub/Sub: emulator"
if [ $# -gt 0 ]; then
  target/release/outbox-bench "$@"
else
  target/release/outbox-bench writer
  # 100,000 items, on the stand-in too: the relay reads pages by primary key,
  # so its cost per item does not grow with the backlog (docs/BENCHMARKS.md).
  target/release/outbox-bench relay
  target/release/outbox-bench latency
fi
