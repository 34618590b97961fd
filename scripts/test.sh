#!/usr/bin/env bash
# Runs every test: starts MongoDB (or its stand-in) and the Pub/Sub emulator,
# runs the workspace's tests, stops what it started. Extra arguments go to the
# test runner (cargo nextest when installed, cargo test otherwise).
set -euo pipefail
source "$(dirname "$0")/lib/services.sh"
stop_services_on_exit
cd "$ROOT"

log "building the tests"
cargo build --workspace --all-targets --locked 2>&1 | tail -n 3
log "checking docker-compose.yml and deploy/ against the binaries"
"$(yaml_python)" scripts/check-deploy.py "$ROOT" "$ROOT/target/debug"
start_mongo
start_pubsub
ensure_browser
export MONGODB_URL MONGODB_FLAVOR PUBSUB_EMULATOR_HOST
export OUTBOX_BIN_DIR="$ROOT/target/debug"
# The stand-in's own tests: its transaction gate, and the reads outside
# transactions that do not wait for it, against a stand-in of their own.
standin_check=0
if [ "$MONGODB_FLAVOR" = standin ]; then
  log "testing the MongoDB stand-in (scripts/mongo-standin/test_standin.py)"
  ensure_standin
  timeout 300 "$(standin_python)" scripts/mongo-standin/test_standin.py \
    || { standin_check=1; log "error: the stand-in's tests failed (above)"; }
fi
log "checking both OpenAPI documents against the binaries (schemathesis)"
api_check=0
bash scripts/api-check.sh 50 || { api_check=1; log "error: the OpenAPI check failed (above)"; }

tests=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast --test-threads 2 "$@" || tests=$?
else
  cargo test --workspace --all-targets --locked --no-fail-fast "$@" || tests=$?
fi
[ "$api_check" -eq 0 ] || exit 1
[ "$standin_check" -eq 0 ] || exit 1
exit "$tests"
