#!/usr/bin/env bash
# The one prepared command for a lent GPU (DESIGN §6). Installs nothing; runs from the source tree.
#
#   PROFILE=smoke OUT=dir bash benchmarks/gpu_check.sh   # <= 3 min: environment, build, sentinels, the main shape at
#                                                        # both dropout rates (graphs, eager, kernel table)
#   PROFILE=bench ...                                    # + fwd/bwd alone, r = 64, other shapes, per-call cost,
#                                                        #   allocator, memory
#   PROFILE=model ...                                    # whole-model training steps: a 4-layer LLaMA (hidden 4096),
#                                                        #   8192 tokens, frozen / PEFT eager / compiled / ours
#   PROFILE=tests ...                                    # csrc tests alone (faulthandler), then the rest (-n 4)
#   DRY_RUN=1 PROFILE=... bash benchmarks/gpu_check.sh   # the same stages and files on the CPU, tiny shapes
#
# Timing comes first, on a clean machine, in one process for every case (benchmarks/gpu_timing.py), each row in
# $OUT/rows.jsonl the moment it exists; no build, test or compile runs beside it. Every stage runs in a session
# of its own (setsid) under a limit cut to a deadline (BUDGET_S, default 540 s) and is killed with SIGKILL when
# it ends or times out; survivors are logged. Before a timing stage the log gets the machine's state (load, top
# processes, the GPU's compute processes, clocks, temperature, throttle reasons: queries only, never a setting).
# Files in $OUT (at most 8): log.txt, stages.tsv, rows.jsonl, autotune.json, junit-csrc.xml, junit.xml and the
# merged results file <gpu>-<date>.json. ADALORA_KERNELS_TUNED=<an earlier autotune.json> compiles only its winners.
# The nf4 case needs bitsandbytes there: here, `echo /.whl/ >> .git/info/exclude` and
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# then name .whl in the run's carry; without it the case writes an "unavailable" row.
set -uo pipefail
cd "$(dirname "$0")/.."
PROFILE="${PROFILE:-smoke}"
DRY="${DRY_RUN:-0}"
case "$PROFILE" in smoke|bench|model|tests) ;; *) echo "PROFILE: expected smoke, bench, model or tests, got '$PROFILE'" >&2; exit 2;; esac
OUT="${OUT:-benchmarks/results/latest}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"; : > "$OUT/stages.tsv"; rm -f "$OUT/rows.jsonl"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
# wheels carried in .whl (bitsandbytes for the nf4 case: nothing can be downloaded there), installed aside
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site" && log "wheels: $(ls .whl | tr '\n' ' ')"
fi
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-540} ))
if [ "$DRY" = 1 ]; then DRYFLAG="--dry-run"; else DRYFLAG=""; fi

log() { echo "$*" | tee -a "$LOG"; }

machine_state() {  # queries only
  {
    echo "-- machine state $(date -u +%FT%TZ): load $(cut -d' ' -f1-3 /proc/loadavg)"
    ps -eo pid,pcpu,pmem,etimes,comm --sort=-pcpu | head -8
    if command -v nvidia-smi >/dev/null; then
      apps=$(nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>&1)
      [ -n "$apps" ] && echo "WARNING: GPU compute processes before timing: $apps" || echo "GPU compute processes: none"
      nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active \
        --format=csv 2>&1
    fi
  } >> "$LOG"
}

# stage NAME LIMIT CMD...: in a session of its own, killed (SIGKILL) at LIMIT or the deadline, survivors logged and
# killed; its output into the log (the last lines on the screen), its seconds and exit status into stages.tsv
stage() {
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) - 10 ))
  [ "$left" -lt "$limit" ] && limit=$left
  log "== $name (limit ${limit} s)"
  if [ "$limit" -le 5 ]; then log "skipped: no time left"; printf '%s\t0\tskipped\n' "$name" >> "$OUT/stages.tsv"; return; fi
  local start; start=$(date +%s)
  setsid bash -c 'echo $$ > "$0"; exec timeout -s KILL "$@"' "$OUT/.sid" "$limit" "$@" > "$OUT/.stage" 2>&1
  local rc=$?
  local sid; sid=$(cat "$OUT/.sid" 2>/dev/null)
  if [ -n "$sid" ] && pgrep -s "$sid" >/dev/null 2>&1; then
    log "survivors of $name: $(pgrep -s "$sid" -a | tr '\n' ';')"
    pkill -KILL -s "$sid" 2>/dev/null
  fi
  cat "$OUT/.stage" >> "$LOG"; tail -n 4 "$OUT/.stage"; rm -f "$OUT/.stage" "$OUT/.sid"
  [ "$rc" = 137 ] && log "$name: killed at its limit"
  log "$name: exit $rc, $(( $(date +%s) - start )) s"
  printf '%s\t%d\t%s\n' "$name" "$(( $(date +%s) - start ))" "$rc" >> "$OUT/stages.tsv"
}

stage environment 30 $PY -c "
import os, platform, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device',
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', 'cpus', os.cpu_count(), 'kernel', platform.release())
for name in ('triton', 'peft', 'transformers', 'numpy'):
    try:
        print(name, __import__(name).__version__)
    except Exception as exc:
        print(name, 'missing:', exc)
"
git rev-parse HEAD >> "$LOG" 2>&1; git status --short >> "$LOG" 2>&1

# the native extension, in the foreground before anything is timed; a build of these sources made earlier in the
# same lease is kept (the stamp is a hash of csrc/ and setup.py)
STAMP=$(cat setup.py csrc/*.* csrc/*/* 2>/dev/null | sha256sum | cut -c1-16)
if [ -f adalora_kernels/_C.so ] && [ "$(cat adalora_kernels/.C.stamp 2>/dev/null)" = "$STAMP" ]; then
  log "== build: the extension of these sources is already built (stamp $STAMP)"
else
  ARCH=$($PY -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0); print(f'{c[0]}.{c[1]}')")
  rm -f adalora_kernels/_C*.so adalora_kernels/.C.stamp
  stage build 300 env TORCH_CUDA_ARCH_LIST="$ARCH" ADALORA_KERNELS_BUILD_EXT=1 MAX_JOBS=16 $PY setup.py build_ext --inplace
  [ -f adalora_kernels/_C.so ] && echo "$STAMP" > adalora_kernels/.C.stamp
fi
stage import 60 $PY -c "
import torch, adalora_kernels.kernels.csrc
has = torch._C._dispatch_has_kernel_for_dispatch_key
print('extension parts:', [k for k in ('CPU', 'CUDA') if has('adalora_kernels::csrc_linear_fwd', k)])
"

if [ "$PROFILE" != tests ]; then
  machine_state
  [ "$PROFILE" = smoke ] && LIMIT=150 || LIMIT=420
  stage "timing ($PROFILE)" "$LIMIT" $PY benchmarks/gpu_timing.py --profile "$PROFILE" --out "$OUT" $DRYFLAG
  machine_state
fi

if [ "$PROFILE" = tests ]; then
  export ADALORA_KERNELS_FAILURES="$OUT/.failures"  # each failure's traceback as it happens (tests/conftest.py)
  [ "$DRY" = 1 ] && REST="tests/test_triton_kernels.py tests/test_gpu_hazards.py" || REST="tests"
  PARALLEL=$($PY -c "import xdist" 2>/dev/null && echo "-n 4")
  stage "tests: csrc alone" 120 $PY -X faulthandler -m pytest -q -p no:cacheprovider -rfE -o faulthandler_timeout=60 \
    --junitxml="$OUT/junit-csrc.xml" tests/test_csrc.py
  stage "tests: the rest" 360 $PY -m pytest -q -p no:cacheprovider -rfE $PARALLEL --junitxml="$OUT/junit.xml" $REST \
    --deselect tests/test_csrc.py
  [ -f "$OUT/.failures" ] && { echo "-- failures:"; cat "$OUT/.failures"; } >> "$LOG"; rm -f "$OUT/.failures"
fi

log "== results"
$PY benchmarks/merge_results.py "$OUT" 2>&1 | tee -a "$LOG"
ls "$OUT" | tee -a "$LOG"
