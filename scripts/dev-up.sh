#!/usr/bin/env bash
# Runs the whole system locally: MongoDB (or its stand-in), the Pub/Sub
# emulator with the topic and an ordered subscription, the writer and two
# relays. Ctrl-C stops everything it started.
set -euo pipefail
source "$(dirname "$0")/lib/services.sh"
stop_services_on_exit
cd "$ROOT"

log "building (cargo's own progress below; the first build takes 10 to 15 minutes on 2 cores)"
cargo build --workspace --locked --bins --examples
start_mongo
start_pubsub
export MONGODB_URL PUBSUB_EMULATOR_HOST
export PUBSUB_PROJECT_ID="${PUBSUB_PROJECT_ID:-local-project}" PUBSUB_TOPIC="${PUBSUB_TOPIC:-batch-outbox}"
export LOG_FORMAT="${LOG_FORMAT:-pretty}"
if [ "${MONGODB_FLAVOR:-}" = standin ]; then
  # The stand-in's change streams are not reliable.
  export OUTBOX_CHANGE_STREAM=false
fi
mkdir -p "$RUN_DIR"
# Items too large for a Pub/Sub message go to a local claim-check store.
export CLAIM_CHECK_URL="${CLAIM_CHECK_URL:-file://$ROOT/.cache/claim-check}"

WRITER_BIND="${WRITER_BIND:-127.0.0.1:8000}" target/debug/outbox-writer >"$RUN_DIR/writer.log" 2>&1 &
remember_pid $!
# Development only: the relays' admin API is open on loopback (no ADMIN_TOKEN;
# docs/OPERATIONS.md "Security" says how to give every replica one).
for n in 1 2; do
  RELAY_ID="relay-$n" RELAY_ADMIN_BIND="127.0.0.1:909$((n - 1))" target/debug/outbox-relay --create-topic \
    --admin-insecure-no-token \
    >"$RUN_DIR/relay-$n.log" 2>&1 &
  remember_pid $!
done
wait_until 60 "the writer" curl -fsS "http://127.0.0.1:8000/health/ready" || die "writer not ready; see $RUN_DIR/writer.log"
wait_until 60 "relay-1" curl -fsS "http://127.0.0.1:9090/health/ready" || die "relay not ready; see $RUN_DIR/relay-1.log"
# The ordered subscription `outboxctl tail` reads, made now so that it holds
# every message from the first batch on (the emulator's REST API).
wait_until 30 "the topic" curl -fsS "http://$PUBSUB_EMULATOR_HOST/v1/projects/$PUBSUB_PROJECT_ID/topics/$PUBSUB_TOPIC" \
  || die "the relays did not create topic $PUBSUB_TOPIC; see $RUN_DIR/relay-1.log"
# batch-outbox-consume is the consumer example's (crates/outbox-consumer).
for subscription in batch-outbox-tail batch-outbox-consume; do
  curl -fsS -X PUT "http://$PUBSUB_EMULATOR_HOST/v1/projects/$PUBSUB_PROJECT_ID/subscriptions/$subscription" \
    -H 'content-type: application/json' \
    -d "{\"topic\": \"projects/$PUBSUB_PROJECT_ID/topics/$PUBSUB_TOPIC\", \"enableMessageOrdering\": true}" >/dev/null 2>&1 \
    || log "subscription $subscription exists already or could not be made"
done

# What a new shell needs to reach what dev-up started: `source` it.
cat >"$RUN_DIR/dev.env" <<ENV
# Written by scripts/dev-up.sh: what it started. In another shell: source .cache/run/dev.env
export MONGODB_URL='$MONGODB_URL'
export PUBSUB_EMULATOR_HOST='$PUBSUB_EMULATOR_HOST'
export PUBSUB_PROJECT_ID='$PUBSUB_PROJECT_ID'
export PUBSUB_TOPIC='$PUBSUB_TOPIC'
export CLAIM_CHECK_URL='$CLAIM_CHECK_URL'
export OUTBOX_WRITER_URL='http://127.0.0.1:8000'
export OUTBOX_ADMIN_URL='http://127.0.0.1:9090,http://127.0.0.1:9091'
ENV

cat <<TXT

batch-outbox is up (logs in $RUN_DIR):
  dashboard       http://127.0.0.1:9090/   (relay-1; relay-2's at http://127.0.0.1:9091/)
  writer          http://127.0.0.1:8000   (POST /api/v1/batch/process, /metrics)
  writer API docs http://127.0.0.1:8000/docs/   (OpenAPI: /openapi.json)
  relay-1 admin   http://127.0.0.1:9090/api/v1/outbox/status   (docs: /docs/)
  relay-2 admin   http://127.0.0.1:9091/api/v1/outbox/status
  MongoDB         $MONGODB_URL ($MONGODB_FLAVOR)
  Pub/Sub         emulator at $PUBSUB_EMULATOR_HOST, topic $PUBSUB_TOPIC

Submit a batch and follow it to Pub/Sub (or curl, below):
  echo '[{"request_id":"r1","vendor_name":"acme"},{"request_id":"r2","vendor_name":"globex"}]' > /tmp/batch.json
  target/debug/outboxctl submit --wait /tmp/batch.json
  target/debug/outboxctl status
  curl -sS -X POST localhost:8000/api/v1/batch/process -H 'content-type: application/json' \\
    -d '[{"request_id":"r1","vendor_name":"acme"},{"request_id":"r2","vendor_name":"globex"}]'
Watch it arrive, in order (in another shell, from this directory):
  source $RUN_DIR/dev.env
  target/debug/outboxctl tail
Press Ctrl-C to stop.
TXT
wait
