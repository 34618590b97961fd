#!/usr/bin/env bash
# The chaos suite (docs/RELIABILITY.md): every scenario starts its own
# MongoDB stand-in (or uses MONGODB_URL) and its own Pub/Sub emulator, the
# writers and relays, injects its faults and prints one table.
#   scripts/chaos.sh                        every scenario, full length
#   scripts/chaos.sh leader-kills           one
#   scripts/chaos.sh --length short         the forms scripts/test.sh runs
set -euo pipefail
source "$(dirname "$0")/lib/services.sh"
stop_services_on_exit
cd "$ROOT"

log "building the binaries"
cargo build --locked --bin outbox-writer --bin outbox-relay --bin outbox-chaos 2>&1 | tail -n 1
if [ -z "${MONGODB_URL:-}" ] && ! command -v mongod >/dev/null 2>&1; then
  # The scenarios start stand-ins of their own; only the launcher is needed.
  ensure_standin
  STANDIN_PYTHON="$(standin_python)"
  STANDIN_SCRIPT="$ROOT/scripts/mongo-standin/standin.py"
  MONGODB_FLAVOR=standin
  export STANDIN_PYTHON STANDIN_SCRIPT MONGODB_FLAVOR
else
  start_mongo
  export MONGODB_URL MONGODB_FLAVOR
fi
export OUTBOX_BIN_DIR="$ROOT/target/debug"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; MongoDB: ${MONGODB_FLAVOR:-external}; $(date -u +%F)"
target/debug/outbox-chaos "$@"
