#!/usr/bin/env bash
# Installs adalora_kernels (editable) with the given extras, e.g. `bash scripts/install.sh test`.
# Where no torch is installed yet, the CPU build is installed first so that a CPU-only machine never
# pulls a multi-GB CUDA build of torch; an existing torch (CUDA or not) is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip --version >/dev/null
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.4"
  else
    python -m pip install -q torch==2.13.0
  fi
fi
extras="${1:-}"
spec="."
[ -n "$extras" ] && spec=".[$extras]"
# the native extension (csrc/) builds against the installed torch: no build isolation, as for other torch
# extensions; where there is no compiler it is skipped and the package still works (torch/Triton backends)
python -m pip install -q "setuptools>=64" wheel
python -m pip install -q --no-build-isolation -e "$spec"
