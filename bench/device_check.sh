#!/usr/bin/env bash
# One command for a lent GPU machine (no network): the kernel tests compiled for real, the loss
# benchmark at GPU sizes (B up to 65,536 and the 1,048,576 point) against issue 12's targets, the
# chunk/tile sweep, logs + CSV + PNG under $OUT, and a short table last (bench/device_summary.py).
# The loss phases keep to ~7 minutes; the training step gets what is left of the budget. Runs in
# the repository root of a copy of the working tree:
#
#   OUT=/some/dir bash bench/device_check.sh        # (the device tool sets OUT)
#
# Wheels the machine lacks (inf-cl, deepspeed, datasets, ...) come from ./.whl, made on the dev box
# by ../shared/tools/device-wheels.sh and carried along; nothing is downloaded. Every phase has a
# time cap and the whole run keeps to DEVICE_CHECK_BUDGET_S (default 480 s) so that it fits in one
# device call; a failing phase is logged and the next one runs. Copy $OUT's results to
# bench/results/<gpu>/ and commit them.
#   DEVICE_CHECK_BUDGET_S=600   raise the overall budget
#   VLM2VEC_COMMIT=abc123       commit recorded in the CSV (the device's copy has no .git)
#   DEVICE_CHECK_DRY=1          plumbing check on a CPU box: interpreter tests, tiny CPU benchmark
#   DEVICE_CHECK_MODE=tune      shorter run for tile tuning: bf16 engine tests, the engine sweep with
#                               the tile candidates, then fused/eager at B=1024..65536 and the 1M point
#                               with the fastest tiles (VLM2VEC_TRITON_CONFIG, printed in the summary)
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/bench/out/device}
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${DEVICE_CHECK_BUDGET_S:-480}
DRY=${DEVICE_CHECK_DRY:-0}

# carried wheels (lazy imports everywhere: a wheel that does not fit this image only loses its provider)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >"$OUT/pip.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
    || echo "carried wheels did not install (see pip.log); going on without them"
fi
# import names without installing: kernels/ holds the package vlm2vec_kernels, the root holds vlm2vec
export PYTHONPATH=$REPO/kernels:$REPO${PYTHONPATH:+:$PYTHONPATH}
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 VLM2VEC_TEST_DEVICE=cpu
else
  export TRITON_INTERPRET=0 VLM2VEC_TEST_DEVICE=cuda
fi
PY=python3

# phase NAME CAP_SECONDS CMD... : runs CMD under min(CAP, budget left - 20 s), log in $OUT/NAME.log
phase() {
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) - 20 ))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 15 ]; then
    echo "[$name] skipped: budget spent" | tee -a "$OUT/phases.txt"; return
  fi
  local t0; t0=$(date +%s)
  echo "[$name] start (cap ${cap}s)"
  timeout --signal=INT --kill-after=15 "$cap" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "[$name] rc=$rc ($(( $(date +%s) - t0 ))s)" | tee -a "$OUT/phases.txt"
  tail -n 4 "$OUT/$name.log" | sed "s/^/    /"
}

{
  date -Is; uname -a; nvidia-smi -L 2>&1 || true
  $PY -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
  $PY -c "import inf_cl; print('inf-cl importable')" 2>&1 | tail -1
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

LOSS_TESTS=$(ls tests/test_contrastive*.py tests/test_loss*.py 2>/dev/null | tr '\n' ' ')
ENGINE_TESTS="$PY -m pytest -q -p no:cacheprovider tests/test_triton_engine.py tests/test_loss_torch.py
  tests/test_loss_overhead.py -k triton --junitxml $OUT/junit_triton_engine.xml"
LOSS_BENCH="$PY bench/loss_kernel.py --out $OUT"

run_full() {
  # 1. the Triton engine and the public loss on it, compiled for real, against float64; launches and
  #    FLOPs per call on CUDA tensors
  phase tests_engine 120 $ENGINE_TESTS
  # 2. provider grid: v2 (fused), v1 (fused-v1), eager, inf-cl (torch.compile separately: it
  #    recompiles per shape)
  phase bench_grid 120 $LOSS_BENCH --sizes 1024,4096,16384,65536 --dims 1536 \
    --providers fused,fused-v1,eager,inf-cl --rep-ms 50 --no-plots
  # 3. torch.compile where the targets compare with it
  phase bench_compile 70 $LOSS_BENCH --providers compile --sizes 1024,16384,65536 --dims 1536 --rep-ms 40 \
    --no-plots
  # 4. the 1,048,576 point (fused fwd+bwd once)
  phase bench_big 45 $LOSS_BENCH --no-grid --big --no-plots
  # 4b. Matryoshka (issue 24): prefixes 64..512 and 1536 at D=1536, ours vs a loop over the prefixes vs
  #     sentence-transformers' MatryoshkaLoss over its cached InfoNCE (mrl-* rows; ratios last in the log)
  phase bench_matryoshka 75 $LOSS_BENCH --matryoshka --sizes 4096,16384 --dims 1536 --rep-ms 40 --no-plots
  # 5. chunk / row-kernel / recompute-tile variants (for tuning the defaults)
  phase bench_sweep 45 $LOSS_BENCH --sweep --sizes 16384,65536 --dims 1536 --rep-ms 30
  # 6. the other loss tests (orchestration, distributed, memory; mostly CPU tests)
  [ -n "$LOSS_TESTS" ] && phase tests_loss 60 $PY -m pytest -q -p no:cacheprovider $LOSS_TESTS \
    -k "not triton" --junitxml "$OUT/junit_loss.xml"
}

run_tune() {
  phase bench_sweep 70 $LOSS_BENCH --sweep --sizes 1024,16384,65536 --dims 1536 --rep-ms 30
  VLM2VEC_TRITON_CONFIG=$($PY bench/loss_kernel.py --pick-configs "$OUT/engine_sweep.csv" 2>/dev/null)
  export VLM2VEC_TRITON_CONFIG
  echo "picked VLM2VEC_TRITON_CONFIG=$VLM2VEC_TRITON_CONFIG" | tee -a "$OUT/phases.txt"
  phase bench_big 60 $LOSS_BENCH --no-grid --big --no-plots
  phase bench_grid 60 $LOSS_BENCH --sizes 1024,16384,65536 --dims 1536 --providers fused,eager --rep-ms 40 \
    --no-plots
  phase tests_engine 60 $ENGINE_TESTS -k bfloat16
}

run_dry() {
  phase tests_engine 150 $ENGINE_TESTS
  phase bench_grid 120 $LOSS_BENCH --device cpu --quick --sizes 256,512 --dims 64
  phase bench_matryoshka 60 $LOSS_BENCH --device cpu --matryoshka --sizes 128 --dims 96 --cpu-budget-s 0
  [ -n "$LOSS_TESTS" ] && phase tests_loss 180 $PY -m pytest -q -p no:cacheprovider $LOSS_TESTS \
    --junitxml "$OUT/junit_loss.xml"
}

if [ "$DRY" = 1 ]; then
  run_dry
elif [ "${DEVICE_CHECK_MODE:-full}" = tune ]; then
  run_tune
else
  run_full
fi

# 7. one training step on a real backbone size (random Qwen2-VL-2B-shaped model) + CUDA-dropout exactness
if [ "$DRY" = 1 ]; then
  phase train_step 240 $PY bench/train_step_device.py --out "$OUT" --dry
else
  phase train_step 240 $PY bench/train_step_device.py --out "$OUT"
fi

# ---- sentence-transformers loads the Qwen exports (issue 22): needs torchvision, which GPU boxes have --
if $PY -c "import torchvision, sentence_transformers" >/dev/null 2>&1; then
  phase tests_export_st 150 $PY -m pytest -q -p no:cacheprovider tests/test_export.py \
    -k "hf_family_exports or reference_layout or native_layout"
else
  echo "tests_export_st: skipped (torchvision or sentence-transformers does not import here)" | tee -a "$OUT/phases.txt"
fi

# ---- vLLM serves an exported tiny model (issue 22; bench/export_vllm.py): only where vllm imports ------
if $PY -c "import vllm" >/dev/null 2>&1; then
  phase export_vllm 300 env PYTHONPATH="$PWD:${PYTHONPATH:-}" $PY bench/export_vllm.py
else
  echo "export_vllm: skipped (vllm does not import here)" | tee -a "$OUT/phases.txt"
fi

# ---- HOOK: extra device checks (e.g. the lead's training-step benchmark) ---------------------------
# Put commands in bench/device_extra.sh (run with the same environment; $OUT and phase() available)
# or pass DEVICE_CHECK_EXTRA="command". Each runs as a capped phase after the loss checks.
if [ -f bench/device_extra.sh ]; then
  # shellcheck disable=SC1091
  source bench/device_extra.sh
fi
if [ -n "${DEVICE_CHECK_EXTRA:-}" ]; then
  phase extra 120 bash -c "$DEVICE_CHECK_EXTRA"
fi
# ---- end of hook ------------------------------------------------------------------------------------

$PY -c "
import sys; sys.path.insert(0, 'bench')
import loss_kernel as lk, csv, pathlib
p = pathlib.Path('$OUT') / 'loss_kernel.csv'
rows = [r | {'B': int(r['B']), 'D': int(r['D'])} for r in csv.DictReader(open(p))] if p.exists() else []
if rows:
    for path in lk.plot(rows, pathlib.Path('$OUT'), rows[-1]['device'] + ', ' + rows[-1]['dtype']): print('plot:', path)
" >"$OUT/plots.log" 2>&1
echo "total $(( $(date +%s) - START ))s" | tee -a "$OUT/phases.txt"
$PY bench/device_summary.py "$OUT" >"$OUT/summary.txt" 2>&1

# the device tool returns at most 8 files from $OUT: keep the results, pack every log into one archive
(
  cd "$OUT" || exit
  keep=$(printf '%s\n' summary.txt loss_kernel.csv engine_sweep.csv; ls loss_kernel_*.png 2>/dev/null | head -n 4)
  others=$(ls -A | grep -v -x -F -e logs.tar.gz $(printf -- '-e %s ' $keep))
  if [ -n "$others" ]; then
    # shellcheck disable=SC2086
    tar czf logs.tar.gz $others && rm -rf $others
  fi
)
cat "$OUT/summary.txt"
