#!/usr/bin/env bash
# Runs the benchmarks behind docs/BENCHMARKS.md: builds the release binaries,
# starts MongoDB (or its stand-in) and the Pub/Sub emulator like test.sh,
# runs every part of `outbox-bench`, records each measurement in
# $BENCH_RESULTS, and writes the tables into docs/BENCHMARKS.md and the charts
# into docs/images (`outbox-bench report`); stops what it started.
#   scripts/bench.sh                 every part at its default size
#   scripts/bench.sh --long          the same with every round trip and batch size,
#                                    then the long runs: a 300,000-item
#                                    backlog, and the relay's memory over 5,000
#                                    batches of a key each (docs/BENCHMARKS.md, "Memory")
#   scripts/bench.sh writer --sizes 100 --clients 4   one part, with options (see outbox-bench --help)
set -euo pipefail
source "$(dirname "$0")/lib/services.sh"
stop_services_on_exit
cd "$ROOT"

log "building the release binaries"
cargo build --release --locked --bin outbox-writer --bin outbox-relay --bin outbox-bench 2>&1 | tail -n 1
start_mongo
# The raw-publish ceiling hands the emulator 300,000 messages at once.
export JAVA_OPTS="${JAVA_OPTS:--Xmx3g}"
start_pubsub
export MONGODB_URL MONGODB_FLAVOR PUBSUB_EMULATOR_HOST
export OUTBOX_BIN_DIR="$ROOT/target/release"

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; MongoDB: $MONGODB_FLAVOR; Pub/Sub: emulator"
export BENCH_RESULTS="${BENCH_RESULTS:-$ROOT/target/bench-results.jsonl}"
long=0
if [ "${1:-}" = "--long" ]; then
  long=1
  shift
fi
if [ $# -gt 0 ]; then
  target/release/outbox-bench "$@"
else
  : >"$BENCH_RESULTS"
  target/release/outbox-bench conflicts
  target/release/outbox-bench writer
  # 20,000 and 100,000 items in each ordering mode, beside the raw ceilings.
  target/release/outbox-bench relay --items 20000,100000
  target/release/outbox-bench latency
  # A batch at the writer's limits beside small ones (issue 16).
  target/release/outbox-bench big-batch
  # Items of 1, 10 and 50 MiB by reference on the file store (issue 28).
  target/release/outbox-bench claim-check
  # The backlog over 1-8 streams and 1-3 relays; the writer on 1 or 4 streams.
  target/release/outbox-bench streams
  # Round trips: the drain against added RTT, the writer's latency, the
  # seed's algorithm beside ours; then the command budget.
  # (The 1,000- and 100-item batches at 0, 5 and 20 ms, what the goals are
  # about, within the default run's 15 minutes; --long adds 1 and 50 ms and
  # 10-item batches.)
  if [ "$long" = 1 ]; then
    target/release/outbox-bench rtt
  else
    target/release/outbox-bench rtt --rtt-ms 0,5,20 --sizes 100,1000
  fi
  target/release/outbox-bench budget
  if [ "$long" = 1 ]; then
    # The backlog at 300,000 items: the relay reads pages by primary key, so
    # its cost per item does not grow with the backlog (docs/BENCHMARKS.md).
    target/release/outbox-bench relay --items 20000,300000 --ordering global
    target/release/outbox-bench relay --items 50000 --batch-size 10 --ordering batch
  fi
fi
target/release/outbox-bench report --results "$BENCH_RESULTS" --doc docs/BENCHMARKS.md --charts docs/images
