#!/usr/bin/env bash
# Runs the deterministic simulator (crates/outbox-sim) over many seeds: the
# real relay, ingest and consumer code on virtual time against models of a
# MongoDB replica set and of Pub/Sub, under seeded faults. Nothing to start:
# it needs no MongoDB and no emulator.
#
#   scripts/sim.sh --seeds 500           seeds 1..=500 (--first N to move)
#   scripts/sim.sh --minutes 30          as many seeds as fit in 30 minutes
#   scripts/sim.sh --seed 1234 --trace   one seed, with its whole trace
#
# Ends with a summary: seeds run, faults injected by kind, checks passed. A
# failing seed prints the command that replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p outbox-sim --bin outbox-sim 2>&1 | tail -n 1 >&2
exec target/release/outbox-sim "$@"
