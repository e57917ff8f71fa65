#!/usr/bin/env bash
# Compare nrexp's loop before and after a change, in alternating bench runs on one machine:
#   bash scripts/bench_before_after.sh <git revision of "before"> [rounds]
#   BENCH_ARGS="--models mlp-3x256 --batches 128" bash scripts/bench_before_after.sh <rev> 3   # fewer configs
# Each round runs `nrexp bench --quick --arms b c d` on the old tree, then on this one (same process
# settings), and prints c/b and d/c per model and batch; compare medians across rounds, not single runs.
# SAME_STATS=1: this tree's arm d computes act_norm but not act_cos (logged as NaN), i.e. the statistics
# the trees before it computed, so d/c compares the loops doing the same work (act_cos came later, with its own cost).
set -euo pipefail
before=${1:?usage: bash scripts/bench_before_after.sh <git revision> [rounds]}
rounds=${2:-2}
repo=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$tmp/before" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
git -C "$repo" worktree add -q --detach "$tmp/before" "$before"
without_act_cos='
import sys, torch
import nrexp.monitor as monitor
def norms_only(activations):
    norms = monitor.activation_norms(activations)
    return norms, torch.full_like(norms, float("nan"))
monitor.activation_norms_and_cosines = norms_only
from nrexp.bench import main
sys.exit(main(sys.argv[1:]))'
for round in $(seq "$rounds"); do
  for side in before after; do
    tree=$repo; [ "$side" = before ] && tree=$tmp/before
    bench=(-m nrexp bench)
    [ "$side" = after ] && [ "${SAME_STATS:-0}" = 1 ] && bench=(-c "$without_act_cos")
    (cd "$tree" && PYTHONPATH=$tree python "${bench[@]}" --quick --arms b c d ${BENCH_ARGS:-} \
      --json "$tmp/$side-$round.json" >/dev/null)
    python - "$tmp/$side-$round.json" "$side" "$round" <<'PY'
import json, sys
path, side, rnd = sys.argv[1:]
for c in json.load(open(path))["configs"]:
    m = c["median"]
    print(f"round {rnd} {side:6s} {c['model']:10s} batch {c['batch']:5d}  c/b {m['c'] / m['b']:.3f}  d/c {m['d'] / m['c']:.3f}")
PY
  done
done
