"""CI's leg on the GPU machine's library versions, on the CPU: the install and the tests those versions touch.

The GPU machine runs torch 2.11 (PyPI's CUDA 13.0 build), Triton 3.6, PEFT 0.21.0 and transformers 5.17, CI the
newest of each. This script makes a venv with those versions once (cached under ``$ADALORA_KERNELS_CACHE`` or
``~/.cache/adalora_kernels``; torch from PyPI is its CUDA build, so the install below is also the install with a
CUDA torch and no GPU), copies the working tree beside it, installs it there with the README's command (setup.py
in auto mode: the CUDA part for the default archs, or the CPU part with the reason), checks which parts of the
extension load, runs the test suite (dynamo, fake tensors, opcheck, the Triton interpreter tier, PEFT parity),
then the Triton compile sweep with that Triton. Exit 1 on any failure.

    python scripts/version_leg.py [--tests PYTEST_ARGS...] [--no-sweep]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_MACHINE = ["torch==2.11.0", "triton==3.6.0", "peft==0.21.0", "transformers==5.17.0", "numpy>=2.4"]
TEST_DEPS = ["pytest>=8", "safetensors>=0.4", "rich>=13", "matplotlib>=3.7", "bitsandbytes>=0.45",
             "setuptools>=64", "wheel"]  # fmt: skip


def _cache() -> Path:
    return Path(os.environ.get("ADALORA_KERNELS_CACHE") or Path.home() / ".cache" / "adalora_kernels")


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _run(cmd: list, **kw) -> int:
    return subprocess.run([str(c) for c in cmd], **kw).returncode


def make_venv(pins: list[str]) -> Path:
    """A venv holding ``pins`` and the test dependencies, made once per pin list and interpreter."""
    key = hashlib.sha256("|".join([sys.version, sys.base_prefix, *pins, *TEST_DEPS]).encode()).hexdigest()[:12]
    venv = _cache() / f"version-leg-venv-{key}"
    python = venv / "bin" / "python"
    if (venv / ".complete").exists() and _run([python, "-c", "import torch, triton, peft"]) == 0:
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PIP_CONSTRAINT"}
    subprocess.run([python, "-m", "pip", "install", "-q", "--progress-bar", "off", *pins, *TEST_DEPS], check=True,
                   env=env)  # fmt: skip
    (venv / ".complete").touch()
    return venv


def copy_tree(dst: Path) -> None:
    """The working tree's files (tracked, and untracked ones git does not ignore) into ``dst``, afresh."""
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")  # fmt: skip
    shutil.rmtree(dst, ignore_errors=True)
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", nargs=argparse.REMAINDER, default=[], help="pytest arguments (default: all)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the Triton compile sweep")
    args = parser.parse_args(argv)
    timings, failed = {}, []

    start = _step(f"venv with {' '.join(GPU_MACHINE)}")
    venv = make_venv(GPU_MACHINE)
    python = venv / "bin" / "python"
    timings["venv"] = time.perf_counter() - start

    start = _step("install (the README's command; a CUDA torch, no GPU: setup.py's auto mode)")
    src = _cache() / "version-leg-src"
    copy_tree(src)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADALORA_KERNELS_BUILD")}
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    build = subprocess.run(
        [python, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", src],
        env=env,
        capture_output=True,
        text=True,
    )  # fmt: skip (-v: setup.py's own lines)
    lines = [line.strip() for line in (build.stdout + build.stderr).splitlines()]
    said = dict.fromkeys(line for line in lines if line.startswith("adalora_kernels: "))  # pip runs setup.py twice
    print("\n".join(said) or "(setup.py said nothing)")
    if build.returncode != 0:
        print((build.stdout + build.stderr)[-6000:])
        failed.append("install")
    parts = subprocess.run([python, "-c", (
        "import torch, adalora_kernels.kernels.csrc\n"
        "has = torch._C._dispatch_has_kernel_for_dispatch_key\n"
        "print('extension parts:', 'CPU' if has('adalora_kernels::csrc_linear_fwd', 'CPU') else '-',"
        " 'CUDA' if has('adalora_kernels::csrc_linear_fwd', 'CUDA') else '-', '| torch', torch.__version__)\n"
    )], cwd=src, capture_output=True, text=True)  # fmt: skip
    print(parts.stdout.strip() or parts.stderr[-3000:])
    if "extension parts: CPU" not in parts.stdout:
        failed.append("extension load")
    timings["install"] = time.perf_counter() - start

    start = _step("tests")
    test_env = {**os.environ, "PYTHONPATH": ""}
    test_env.pop("TRITON_INTERPRET", None)  # tests/conftest.py sets it before any kernel import
    if _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.tests], cwd=src, env=test_env) != 0:
        failed.append("tests")
    timings["tests"] = time.perf_counter() - start

    if not args.no_sweep:
        start = _step("Triton compile sweep (--quick) with the GPU machine's Triton")
        sweep_env = {**test_env, "TRITON_DEFAULT_FP_FUSION": "1"}
        if _run([python, "benchmarks/triton_compile_sweep.py", "--quick"], cwd=src, env=sweep_env) != 0:
            failed.append("sweep")
        timings["sweep"] = time.perf_counter() - start

    print("\nversion leg:", ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    if failed:
        print("version leg FAILED:", ", ".join(failed))
        return 1
    print("version leg passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
