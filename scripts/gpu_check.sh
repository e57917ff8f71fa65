#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go, inside a time budget: for a GPU machine that is lent for
# minutes, where each check must leave its results even if a later one runs out of time.
#
#   bash scripts/gpu_check.sh [BUDGET_S]   (default 540 s; results under $OUT, default outputs/gpu-check)
#
# 1. the tests that behave differently on CUDA, verbosely (every test's name and outcome is in the log
#    as it happens, so a run cut short still says which failed);
# 2. the default `nrexp train` (trainer.device=auto picks the GPU), with its peak RSS;
# 3. `nrexp bench --device cuda`: the arms (h, the hand-written statistics, among them) and the start-up,
#    then the fused sweeps;
# 4. the whole suite on the GPU, with the time that is left (pytest-xdist's -n when it is installed).
# nrexp's dependencies must be importable; this checkout's nrexp is used (PYTHONPATH is set here).
set -u
[ -n "${OUT:-}" ] && OUT=$(realpath -m "$OUT")  # as given from where it was run, before the cd below
cd "$(dirname "$0")/.."
BUDGET=${1:-540}
OUT=${OUT:-outputs/gpu-check}
PY=${PYTHON:-python3}
T0=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - T0))); }
step() { echo; echo "=== $1 (at $(($(date +%s) - T0)) s, $(left) s left)"; }
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU is visible to PyTorch here. Fix: run it on a machine with one" >&2
    exit 2
fi
mkdir -p "$OUT"
parallel=$("$PY" -c "import xdist" 2>/dev/null && echo "-n $(( $(nproc) > 14 ? 14 : $(nproc) ))")
{
step "machine"
nvidia-smi -L 2>/dev/null
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"

step "tests that behave differently on CUDA"
timeout 150 "$PY" -m pytest -p no:cacheprovider -v --tb=short $parallel \
    tests/test_bench.py tests/test_fused.py tests/test_faults.py tests/test_layers.py tests/test_monitor.py tests/test_optim.py \
    -k "cuda or sync or reads_nothing or fused or divergence or diverging or dropout or members or resume or monitor or capture or dynamo" \
    > "$OUT/tests_cuda.log" 2>&1
grep -E "(PASSED|FAILED|ERROR)|passed|failed" "$OUT/tests_cuda.log" | grep -v PASSED | tail -20

step "default nrexp train"
mkdir -p "$OUT/train" && (cd "$OUT/train" && timeout 90 /usr/bin/time -v "$PY" -m nrexp train trainer.progress=false \
    > train.log 2>&1; grep -E "device|Maximum resident|Elapsed|test/acc" train.log | head -8)

step "bench arms on the GPU"
# --samples 8192 (the CPU default is 32768): the naive arms a0/a2 run on the CPU whatever the device and
# take most of the time; 8192 fitted 180 s on the H200 of 2026-11-30
timeout $(( $(left) > 400 ? 180 : $(left) / 3 )) "$PY" -m nrexp bench --device cuda --samples 8192 --startup-repeats 3 \
    --json "$OUT/bench_arms.json" \
    --markdown "$OUT/bench_arms.md" 2>&1 | tail -12

step "fused sweeps on the GPU"
timeout $(( $(left) > 250 ? 140 : $(left) / 2 )) "$PY" -m nrexp bench --device cuda --no-arms --fused --fused-data bundled --fused-repeats 2 \
    --json "$OUT/bench_fused.json" 2>&1 | tail -6

step "the whole suite on the GPU"
timeout $(( $(left) - 5 )) "$PY" -m pytest -p no:cacheprovider -v --tb=short $parallel > "$OUT/suite.log" 2>&1
grep -E "FAILED|ERROR" "$OUT/suite.log" | sort -u | tail -30; tail -1 "$OUT/suite.log"
step "done"
} 2>&1 | tee "$OUT/gpu_check.log"
