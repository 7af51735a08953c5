#!/usr/bin/env bash
# The one prepared command for a lent GPU (DESIGN §6): GPU tests, then the quick benchmark of the Triton
# issue's shapes, then memory; JSON under $OUT, a short table printed last. Installs nothing: runs from the
# source tree. Each stage has its own time limit so a slow one cannot take the others' results with it.
#   OUT=/some/dir bash benchmarks/gpu_check.sh          # on the GPU machine
#   DRY_RUN=1 bash benchmarks/gpu_check.sh              # the same stages on the CPU, tiny shapes
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/latest}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
CLI="$PY -m adalora_kernels"

if [ "${DRY_RUN:-0}" = 1 ]; then
  DEV="--device cpu --dtype float32"; MAIN="--shape 256,128,128"; OTHERS="--shape 256,128,64 --shape 256,64,128"
  RANKS="4 8"; TESTS="tests/test_triton_kernels.py"; T_TESTS=120; T_MAIN=120; T_OTHERS=120
  ALLOC="--quick"
else
  DEV="--device cuda --dtype bfloat16"; MAIN="--shape 8192,4096,4096"
  OTHERS="--shape 8192,4096,1024 --shape 8192,4096,14336 --shape 8192,14336,4096"
  RANKS="16 64"; TESTS="tests"; T_TESTS=150; T_MAIN=110; T_OTHERS=100; ALLOC=""
fi

$PY - <<'PY' | tee "$OUT/env.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
for name in ("triton", "peft", "transformers"):
    try:
        print(name, __import__(name).__version__)
    except Exception as exc:
        print(name, "missing:", exc)
PY

echo "== 0. native extension (csrc, CUDA part for this GPU) building in the background"
ARCH=$($PY -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0); print(f'{c[0]}.{c[1]}')")
( TORCH_CUDA_ARCH_LIST="$ARCH" ADALORA_KERNELS_BUILD_EXT=1 MAX_JOBS=8 timeout 200 $PY setup.py build_ext --inplace \
    > "$OUT/build.log" 2>&1; echo "exit $?" >> "$OUT/build.log" ) &
BUILD_PID=$!

echo "== 1. tests (GPU tier included) without csrc while it builds"
ADALORA_KERNELS_AUTOTUNE=0 timeout "$T_TESTS" $PY -m pytest -q -x -p no:cacheprovider $TESTS -k "not autotuned and not csrc" \
  2>&1 | tail -25 | tee "$OUT/tests.log"
[ "${DRY_RUN:-0}" = 1 ] || timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k autotuned 2>&1 \
  | tail -5 | tee -a "$OUT/tests.log"
wait "$BUILD_PID"; tail -2 "$OUT/build.log"
echo "== 1b. csrc tests (CUDA extension)"
timeout 60 $PY -m pytest -q -x -p no:cacheprovider tests -k "csrc" 2>&1 | tail -8 | tee -a "$OUT/tests.log"

echo "== 2. main shape: fwd, bwd, fwd+bwd, every variant"
timeout "$T_MAIN" $CLI bench $DEV $MAIN --rank $RANKS --dropout 0 0.1 --no-allocator --json "$OUT/bench_main.json" \
  > "$OUT/bench_main.log" 2>&1; echo "exit $?" >> "$OUT/bench_main.log"; tail -3 "$OUT/bench_main.log"

echo "== 3. other shapes: fwd+bwd"
timeout "$T_OTHERS" $CLI bench $DEV $OTHERS --rank $RANKS --dropout 0 0.1 --modes fwd_bwd --no-allocator \
  --json "$OUT/bench_others.json" > "$OUT/bench_others.log" 2>&1; echo "exit $?" >> "$OUT/bench_others.log"
tail -3 "$OUT/bench_others.log"

echo "== 4. allocator step, orthogonal regulariser, memory"
timeout 90 $CLI bench $DEV $MAIN --rank 16 --dropout 0 --modes fwd --variants linear $ALLOC --json "$OUT/bench_alloc.json" \
  > "$OUT/bench_alloc.log" 2>&1; echo "exit $?" >> "$OUT/bench_alloc.log"
timeout 60 $CLI memory $DEV $MAIN --rank $RANKS --dropout 0 0.1 --no-block --json "$OUT/memory.json" \
  > "$OUT/memory.log" 2>&1; echo "exit $?" >> "$OUT/memory.log"

echo "== 5. results"
$PY benchmarks/merge_results.py "$OUT" bench_main.json bench_others.json bench_alloc.json memory.json
