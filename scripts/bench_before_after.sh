#!/usr/bin/env bash
# Compare nrexp's loop before and after a change, in alternating bench runs on one machine:
#   bash scripts/bench_before_after.sh <git revision of "before"> [rounds]
#   BENCH_ARGS="--models mlp-3x256 --batches 128" bash scripts/bench_before_after.sh <rev> 3   # fewer configs
# Each round runs `nrexp bench --quick --arms b c d` on the old tree, then on this one (same process
# settings), and prints c/b and d/c per model and batch; compare medians across rounds, not single runs.
set -euo pipefail
before=${1:?usage: bash scripts/bench_before_after.sh <git revision> [rounds]}
rounds=${2:-2}
repo=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$tmp/before" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
git -C "$repo" worktree add -q --detach "$tmp/before" "$before"
for round in $(seq "$rounds"); do
  for side in before after; do
    tree=$repo; [ "$side" = before ] && tree=$tmp/before
    (cd "$tree" && PYTHONPATH=$tree python -m nrexp bench --quick --arms b c d ${BENCH_ARGS:-} --json "$tmp/$side-$round.json" >/dev/null)
    python - "$tmp/$side-$round.json" "$side" "$round" <<'PY'
import json, sys
path, side, rnd = sys.argv[1:]
for c in json.load(open(path))["configs"]:
    m = c["median"]
    print(f"round {rnd} {side:6s} {c['model']:10s} batch {c['batch']:5d}  c/b {m['c'] / m['b']:.3f}  d/c {m['d'] / m['c']:.3f}")
PY
  done
done
