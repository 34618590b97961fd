#!/usr/bin/env bash
# Proof of the simulator's power: each patch in scripts/sim-mutants/ brings
# back a defect this project had. Each is applied to a scratch copy of the
# tree, the simulator is built from it and run seed after seed until a
# promise breaks; the table says how many seeds that took. A patch that no
# longer applies is reported as such, not as caught.
#
#   scripts/sim-mutants.sh [--seeds N]    give up on a mutant after N seeds (default 200)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
seeds=200
[ "${1:-}" = "--seeds" ] && seeds=$2
scratch="$root/.cache/sim-mutants"
tree="$scratch/tree"
export CARGO_TARGET_DIR="$scratch/target"
results=()
for patch in scripts/sim-mutants/*.patch; do
  name=$(basename "$patch" .patch)
  what=$(sed -n 's/^# //p;/^$/q' "$patch" | head -n 1)
  # A clean copy (mtimes kept, so only what the patch touches rebuilds).
  rm -rf "$tree" && mkdir -p "$tree"
  git ls-files -z --cached --others --exclude-standard | xargs -0 cp -a --parents -t "$tree"
  # Copies keep their times, older than what an earlier mutant built from
  # the same files: touched, they are rebuilt, not taken as fresh.
  sed -n 's|^+++ b/||p' scripts/sim-mutants/*.patch | sort -u | (cd "$tree" && xargs touch)
  if ! (cd "$tree" && patch -p1 --quiet --forward --dry-run < "$root/$patch" >/dev/null 2>&1); then
    results+=("| $name | $what | patch no longer applies |")
    continue
  fi
  (cd "$tree" && patch -p1 --quiet --forward < "$root/$patch")
  echo "== $name: building" >&2
  if ! (cd "$tree" && cargo build --locked -p outbox-sim --bin outbox-sim 2>&1 | tail -n 2 >&2); then
    results+=("| $name | $what | does not build |")
    continue
  fi
  echo "== $name: running up to $seeds seeds" >&2
  started=$(date +%s)
  output=$("$CARGO_TARGET_DIR/debug/outbox-sim" --seeds "$seeds" --stop-at-failure 2>/dev/null || true)
  took=$(( $(date +%s) - started ))
  # Seeds run two at a time: the lowest failing one is the count.
  caught=$(printf '%s\n' "$output" | sed -n 's/^seed \([0-9]*\) FAILED: \(.*\)/\1|\2/p' | sort -t'|' -k1,1n | head -n 1)
  if [ -n "$caught" ]; then
    seed=${caught%%|*}
    why=${caught#*|}
    results+=("| $name | $what | caught at seed $seed ($seed seeds, ${took} s): ${why:0:160} |")
  else
    results+=("| $name | $what | NOT caught in $seeds seeds |")
  fi
done
echo
echo "| mutant | defect brought back | result |"
echo "|---|---|---|"
printf '%s\n' "${results[@]}"
