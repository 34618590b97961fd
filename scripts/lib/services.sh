# Shared by scripts/dev-up.sh, test.sh and bench.sh: start what batch-outbox
# needs, record what we started, stop it again. Source it; don't run it.
#
#   start_mongo      exports MONGODB_URL and MONGODB_FLAVOR (mongod|external|standin)
#   start_pubsub     exports PUBSUB_EMULATOR_HOST
#   ensure_browser   exports CHROMEDRIVER (installing Debian's chromium when
#                    missing), or BROWSER_UNAVAILABLE with the reason
#   stop_services    stops everything started here
#   stop_services_on_exit  installs the traps that call it
#
# MongoDB, in order of preference:
#   1. MONGODB_URL already set: used as it is (it must be a replica set).
#   2. `mongod` on PATH: a single-node replica set rs0 in a temporary directory.
#   3. The nx-27017 stand-in, installed into a venv under the cache directory
#      and started through scripts/mongo-standin/standin.py.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE_DIR="${BATCH_OUTBOX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/batch-outbox}"
RUN_DIR="${BATCH_OUTBOX_RUN:-$ROOT/.cache/run}"
STANDIN_VERSION="0.8.1"
# MongoDB's transactionLifetimeLimitSeconds for the servers started here (the
# default is 60): how long a process killed inside a transaction can block
# the others. docs/OPERATIONS.md explains the choice.
TRANSACTION_LIFETIME_SECONDS="${TRANSACTION_LIFETIME_SECONDS:-15}"
PUBSUB_EMULATOR="${PUBSUB_EMULATOR_BIN:-/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator}"
STARTED_PIDS=()

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Is something listening on 127.0.0.1:PORT?
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# First free port at or above $1.
free_port() {
  local port=$1
  while port_busy "$port"; do port=$((port + 1)); done
  echo "$port"
}

# wait_until SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.1 s.
wait_until() {
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || { log "timed out after ${limit}s waiting for $what"; return 1; }
    sleep 0.1
  done
}

remember_pid() { STARTED_PIDS+=("$1"); }

# Stop what was started however the script ends: normally, on error, on
# Ctrl-C or on SIGTERM. Call once, right after sourcing this file.
stop_services_on_exit() {
  trap stop_services EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# Chromium and chromedriver for the dashboard's browser test: Debian's
# packages, installed when missing and apt-get may. Exports CHROMEDRIVER, or
# BROWSER_UNAVAILABLE with the reason (the test then says SKIPPED).
ensure_browser() {
  local sudo="" apt_log="$RUN_DIR/apt-chromium.log"
  mkdir -p "$RUN_DIR"
  if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then sudo -n true 2>/dev/null && sudo="sudo -n"; fi
    if [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; then
      log "installing Debian's chromium and chromium-driver for the dashboard test"
      { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
          || { $sudo apt-get update -qq \
               && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }
      } >"$apt_log" 2>&1 || log "could not install chromium; see $apt_log"
    fi
  fi
  if command -v chromedriver >/dev/null 2>&1; then
    CHROMEDRIVER="$(command -v chromedriver)"
    export CHROMEDRIVER
    log "browser: $(chromedriver --version 2>/dev/null | cut -d' ' -f1-2)"
  else
    export BROWSER_UNAVAILABLE="no chromedriver, and apt-get could not install Debian's chromium-driver here (not root, no apt-get, or no package source)"
    log "browser: none ($BROWSER_UNAVAILABLE)"
  fi
}

stop_services() {
  local pid
  for pid in "${STARTED_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${STARTED_PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  STARTED_PIDS=()
}

standin_python() { echo "$CACHE_DIR/standin-venv-$STANDIN_VERSION/bin/python"; }

ensure_standin() {
  local venv="$CACHE_DIR/standin-venv-$STANDIN_VERSION"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import nx_27017' 2>/dev/null; then
    return
  fi
  log "installing the MongoDB stand-in (nx-27017 $STANDIN_VERSION) into $venv"
  mkdir -p "$CACHE_DIR"
  rm -rf "$venv"
  python3 -m venv "$venv" || die "python3 -m venv failed"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "nx-27017==$STANDIN_VERSION" \
    || die "pip install nx-27017 failed"
}

mongo_answers() {
  "$(standin_python)" - "$1" <<'PY'
import sys
from pymongo import MongoClient
MongoClient(sys.argv[1], serverSelectionTimeoutMS=500).admin.command("ping")
PY
}

start_mongo() {
  mkdir -p "$RUN_DIR"
  if [ -n "${MONGODB_URL:-}" ]; then
    export MONGODB_FLAVOR="${MONGODB_FLAVOR:-external}"
    log "using MongoDB at MONGODB_URL"
    return
  fi
  local port; port=$(free_port "${MONGODB_PORT:-27017}")
  if command -v mongod >/dev/null 2>&1; then
    local dbpath="$RUN_DIR/mongod-$port"
    rm -rf "$dbpath"; mkdir -p "$dbpath"
    log "starting mongod (replica set rs0) on 127.0.0.1:$port"
    # Test commands give the tests MongoDB's fail points; a short
    # transaction lifetime bounds how long a killed writer blocks the others.
    mongod --replSet rs0 --bind_ip 127.0.0.1 --port "$port" --dbpath "$dbpath" \
      --setParameter enableTestCommands=1 \
      --setParameter "transactionLifetimeLimitSeconds=$TRANSACTION_LIFETIME_SECONDS" \
      --quiet >"$RUN_DIR/mongod-$port.log" 2>&1 &
    remember_pid $!
    wait_until 30 "mongod" port_busy "$port" || die "mongod did not start; see $RUN_DIR/mongod-$port.log"
    if command -v mongosh >/dev/null 2>&1; then
      mongosh --quiet --port "$port" --eval \
        "rs.initiate({_id:'rs0',members:[{_id:0,host:'127.0.0.1:$port'}]})" >/dev/null
    else
      ensure_standin
      "$(standin_python)" - "$port" <<'PY'
import sys
from pymongo import MongoClient
port = sys.argv[1]
MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true").admin.command(
    "replSetInitiate", {"_id": "rs0", "members": [{"_id": 0, "host": f"127.0.0.1:{port}"}]})
PY
    fi
    export MONGODB_URL="mongodb://127.0.0.1:$port/?replicaSet=rs0"
    export MONGODB_FLAVOR=mongod
  else
    ensure_standin
    local data="${STANDIN_DATA_DIR:-memory}"
    log "no mongod on PATH: starting the nx-27017 stand-in as replica set rs0 on 127.0.0.1:$port (data: $data)"
    "$(standin_python)" "$ROOT/scripts/mongo-standin/standin.py" --port "$port" --data-dir "$data" \
      --setParameter "transactionLifetimeLimitSeconds=$TRANSACTION_LIFETIME_SECONDS" \
      >"$RUN_DIR/standin-$port.log" 2>&1 &
    remember_pid $!
    export MONGODB_URL="mongodb://127.0.0.1:$port/?replicaSet=rs0"
    export MONGODB_FLAVOR=standin
  fi
  # Tests start private stand-ins of their own for fault injection.
  if [ -x "$(standin_python)" ]; then
    STANDIN_PYTHON="$(standin_python)"
    STANDIN_SCRIPT="$ROOT/scripts/mongo-standin/standin.py"
    export STANDIN_PYTHON STANDIN_SCRIPT
  fi
  wait_until 60 "MongoDB to answer" mongo_answers "$MONGODB_URL" \
    || die "MongoDB did not answer; see $RUN_DIR"
  log "MongoDB ready at $MONGODB_URL ($MONGODB_FLAVOR)"
}

emulator_answers() { curl -fsS "http://$1/" 2>/dev/null | grep -q Ok; }

start_pubsub() {
  if [ -n "${PUBSUB_EMULATOR_HOST:-}" ]; then
    log "using the Pub/Sub emulator at PUBSUB_EMULATOR_HOST=$PUBSUB_EMULATOR_HOST"
    return
  fi
  [ -x "$PUBSUB_EMULATOR" ] || die "Pub/Sub emulator not found at $PUBSUB_EMULATOR (set PUBSUB_EMULATOR_HOST or PUBSUB_EMULATOR_BIN)"
  mkdir -p "$RUN_DIR"
  local port; port=$(free_port "${PUBSUB_PORT:-8085}")
  log "starting the Pub/Sub emulator on 127.0.0.1:$port"
  JAVA_OPTS="${JAVA_OPTS:--Xmx256m}" "$PUBSUB_EMULATOR" --host=127.0.0.1 --port="$port" \
    >"$RUN_DIR/pubsub-$port.log" 2>&1 &
  remember_pid $!
  export PUBSUB_EMULATOR_HOST="127.0.0.1:$port"
  wait_until 60 "the Pub/Sub emulator" emulator_answers "$PUBSUB_EMULATOR_HOST" \
    || die "the Pub/Sub emulator did not start; see $RUN_DIR/pubsub-$port.log"
  log "Pub/Sub emulator ready at $PUBSUB_EMULATOR_HOST"
}

# A python3 with PyYAML for scripts/check-deploy.py: the system one when it
# has it, else a small venv under the cache directory.
yaml_python() {
  if python3 -c 'import yaml' 2>/dev/null; then
    echo python3
    return
  fi
  local venv="$CACHE_DIR/tools-venv"
  if ! "$venv/bin/python" -c 'import yaml' 2>/dev/null; then
    log "installing PyYAML into $venv"
    python3 -m venv "$venv" >&2 || die "python3 -m venv failed"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "PyYAML==6.0.2" >&2 \
      || die "pip install PyYAML failed"
  fi
  echo "$venv/bin/python"
}
