#!/usr/bin/env bash
# The one prepared command for a lent GPU (DESIGN §6): GPU tests, then the quick benchmark of the Triton
# issue's shapes, the per-call cost, the allocator and memory; JSON under $OUT, a short table printed last.
# Installs nothing: runs from the source tree. Each stage has its own time limit (cut to a 9-minute deadline, BUDGET_S)
# so a slow one cannot take the others' results with it. At most 8 files land in $OUT (the device tool
# returns no more): log.txt (every stage's output), one JSON per benchmark stage and the merged results file.
#   OUT=/some/dir bash benchmarks/gpu_check.sh          # on the GPU machine
#   DRY_RUN=1 bash benchmarks/gpu_check.sh              # the same stages on the CPU, tiny shapes
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/latest}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
CLI="$PY -m adalora_kernels"
EXT_BUILD="${TMPDIR:-/tmp}/adalora_kernels_ext"

if [ "${DRY_RUN:-0}" = 1 ]; then
  DEV="--device cpu --dtype float32"; MAIN="--shape 256,128,128"; OTHERS="--shape 256,128,64 --shape 256,64,128"
  TESTS="tests/test_triton_kernels.py"; ALLOC="--quick"
else
  DEV="--device cuda --dtype bfloat16"; MAIN="--shape 8192,4096,4096"
  OTHERS="--shape 8192,4096,1024 --shape 8192,4096,14336 --shape 8192,14336,4096"
  TESTS="tests"; ALLOC=""
fi
# pytest-xdist spreads the tests' compiles over the cores where it is installed
PARALLEL=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
TIMEOUT=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout 90")

stage() { echo "== $*" | tee -a "$LOG"; }
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-540} ))  # every stage ends by then, so the results are always merged
# run LIMIT CMD...: the command's whole output into the log, its last lines on the screen, its exit status noted;
# LIMIT is cut to what is left before the deadline
run() {
  local limit=$1; shift
  local left=$(( DEADLINE - $(date +%s) - 15 ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 5 ]; then echo "skipped (no time left): $*" | tee -a "$LOG"; return; fi
  timeout "$limit" "$@" > "$OUT/.stage" 2>&1
  local rc=$?
  cat "$OUT/.stage" >> "$LOG"; tail -4 "$OUT/.stage"; rm -f "$OUT/.stage"
  echo "exit $rc" | tee -a "$LOG"
}

$PY - <<'PY' 2>&1 | tee -a "$LOG"
import os, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "cpus", os.cpu_count())
for name in ("triton", "peft", "transformers"):
    try:
        print(name, __import__(name).__version__)
    except Exception as exc:
        print(name, "missing:", exc)
PY

stage "0. native extension (csrc, CUDA part for this GPU) building in the background into $EXT_BUILD"
ARCH=$($PY -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0); print(f'{c[0]}.{c[1]}')")
rm -f adalora_kernels/_C*.so  # a stale build must not stand in for this one; the tests below run without it
( TORCH_CUDA_ARCH_LIST="$ARCH" ADALORA_KERNELS_BUILD_EXT=1 MAX_JOBS=8 timeout 240 $PY setup.py build_ext \
    --build-lib "$EXT_BUILD" --build-temp "$EXT_BUILD/tmp" > "$OUT/.build" 2>&1; echo "build exit $?" >> "$OUT/.build" ) &
BUILD_PID=$!

# each failing test's id and traceback as it happens (tests/conftest.py), into the log after each test stage
export ADALORA_KERNELS_FAILURES="$OUT/.failures"
failures() { [ -f "$OUT/.failures" ] && { echo "-- failures:"; cat "$OUT/.failures"; } >> "$LOG"; rm -f "$OUT/.failures"; }

stage "1. tests (GPU tier included, autotuning off) without csrc while it builds"
ADALORA_KERNELS_AUTOTUNE=0 run 150 $PY -m pytest -q -p no:cacheprovider $PARALLEL $TIMEOUT -rfE $TESTS \
  -k "not autotuned and not csrc"
[ "${DRY_RUN:-0}" = 1 ] || run 30 $PY -m pytest -q -p no:cacheprovider -rfE tests/test_triton_kernels.py -k autotuned
failures

stage "1b. csrc build and tests (CUDA extension; xdist outlives a crashing test)"
wait "$BUILD_PID"; grep -E "error|warning: |build exit" "$OUT/.build" | tail -20 | tee -a "$LOG"; rm -f "$OUT/.build"
cp "$EXT_BUILD"/adalora_kernels/_C*.so adalora_kernels/ 2>/dev/null && echo "extension copied" | tee -a "$LOG"
run 60 $PY -m pytest -q -p no:cacheprovider $PARALLEL $TIMEOUT -rfE tests -k "csrc"
failures

stage "2. main shape, r = 16: fwd, bwd, fwd+bwd, every variant; the per-call cost at a tiny shape"
# one dropout rate a run: PEFT's compile takes most of each, and a run out of time writes no JSON
# --graphs: fwd+bwd also as a CUDA-graph replay, so the table shows what the host costs of each step
for p in 0 0.1; do
  run 90 $CLI bench $DEV $MAIN --rank 16 --dropout $p --no-allocator --graphs --json "$OUT/bench_main_p$p.json"
done

stage "3. main shape, r = 64: fwd+bwd"
run 60 $CLI bench $DEV $MAIN --rank 64 --dropout 0 0.1 --modes fwd_bwd --no-allocator \
  --variants linear peft torch triton csrc --json "$OUT/bench_r64.json"

stage "4. other shapes, r = 16: fwd+bwd"
run 60 $CLI bench $DEV $OTHERS --rank 16 --dropout 0.1 --modes fwd_bwd --no-allocator --graphs \
  --variants linear peft torch triton csrc --json "$OUT/bench_others.json"

stage "5. allocator step, orthogonal regulariser, memory"
run 50 $CLI bench $DEV $MAIN --rank 16 --dropout 0 --modes fwd --variants linear $ALLOC --json "$OUT/bench_alloc.json"
run 40 $CLI memory $DEV $MAIN --rank 16 64 --dropout 0 0.1 --no-block --json "$OUT/memory.json"

stage "6. results"
$PY benchmarks/merge_results.py "$OUT" bench_main_p0.json bench_main_p0.1.json bench_r64.json bench_others.json bench_alloc.json memory.json \
  2>&1 | tee -a "$LOG"
