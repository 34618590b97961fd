#!/usr/bin/env bash
# Checks both services' OpenAPI documents against the running binaries:
# openapi-spec-validator validates each document, then schemathesis sends a
# bounded number of generated requests (valid and invalid) to every operation
# and checks each answer against the document (status, headers, body schema,
# problem+json content type, 405 for undeclared methods).
#
#   scripts/api-check.sh [EXAMPLES]     default 100 per operation
#
# Uses MONGODB_URL / PUBSUB_EMULATOR_HOST when set, else starts what it needs.
# Exits non-zero when schemathesis reports a failure.
set -euo pipefail
source "$(dirname "$0")/lib/services.sh"
stop_services_on_exit
cd "$ROOT"
examples="${1:-100}"

venv="$CACHE_DIR/api-check-venv"
if ! "$venv/bin/st" --version >/dev/null 2>&1; then
  log "installing schemathesis into $venv"
  python3 -m venv "$venv" || die "python3 -m venv failed"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "schemathesis==4.32.5" "openapi-spec-validator==0.9.0" || die "pip install schemathesis failed"
fi
bin="${OUTBOX_BIN_DIR:-$ROOT/target/debug}"
if [ ! -x "$bin/outbox-writer" ] || [ ! -x "$bin/outbox-relay" ]; then
  cargo build --locked --bin outbox-writer --bin outbox-relay 2>&1 | tail -n 1
fi
start_mongo
start_pubsub

database="api_check_$(date +%s)_$$"
api_key="api-check-key-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"
admin_token="api-check-admin-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"
writer_port=$(free_port 18100)
MONGODB_DATABASE="$database" WRITER_BIND="127.0.0.1:$writer_port" \
  WRITER_API_KEYS="api-check:$api_key" LOG_FORMAT=json \
  "$bin/outbox-writer" >"$RUN_DIR/api-check-writer.log" 2>&1 &
remember_pid $!
relay_port=$(free_port $((writer_port + 1)))
MONGODB_DATABASE="$database" RELAY_ADMIN_BIND="127.0.0.1:$relay_port" ADMIN_TOKEN="$admin_token" \
  PUBSUB_EMULATOR_HOST="$PUBSUB_EMULATOR_HOST" PUBSUB_TOPIC="api-check-$$" \
  OUTBOX_CHANGE_STREAM=false LOG_FORMAT=json \
  "$bin/outbox-relay" >"$RUN_DIR/api-check-relay.log" 2>&1 &
remember_pid $!
ready() { curl -fsS "http://127.0.0.1:$1/health/ready" >/dev/null; }
wait_until 60 "the writer" ready "$writer_port" || die "the writer is not ready; see $RUN_DIR/api-check-writer.log"
wait_until 60 "the relay" ready "$relay_port" || die "the relay is not ready; see $RUN_DIR/api-check-relay.log"

status=0
check() {
  local name=$1 port=$2 token=$3
  local doc="$RUN_DIR/openapi-$name.json"
  curl -fsS "http://127.0.0.1:$port/openapi.json" -o "$doc"
  "$venv/bin/openapi-spec-validator" "$doc" || status=1
  log "schemathesis against the $name ($examples examples per operation)"
  (cd "$ROOT/scripts/api-check" && SCHEMATHESIS_HOOKS=hooks "$venv/bin/st" run \
      "http://127.0.0.1:$port/openapi.json" --checks all --max-examples "$examples" \
      --workers 1 --seed 20261128 --header "Authorization: Bearer $token" \
      --no-color 2>&1 | sed -n '/^=* \(FAILURES\|ERRORS\|SUMMARY\) =*$/,$p') || status=1
}
check writer "$writer_port" "$api_key"
check relay "$relay_port" "$admin_token"
exit "$status"
