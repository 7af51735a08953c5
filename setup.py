"""Build script: the package is pure Python; the C++/CUDA extension in ``csrc/`` is optional.

``ADALORA_KERNELS_BUILD_EXT``: ``auto`` (default: build when torch is importable at build time and a C++
compiler is present), ``1`` (build or fail), ``0`` (skip). ``ADALORA_KERNELS_BUILD_CUDA``: ``auto`` (build the
CUDA part where torch is a CUDA build and a CUDA toolkit is found), ``1``, ``0``. ``TORCH_CUDA_ARCH_LIST`` and
``MAX_JOBS`` are honoured (torch.utils.cpp_extension). torch must be importable by the build: use
``pip install --no-build-isolation``, as for other torch extensions; without it the package installs
without the extension and works on its torch/Triton backends.

The sources and flags below are also read by ``scripts/cuda_build_check.py``, which compiles and links the
CUDA build against the CUDA build of torch on a machine without one.
"""

import os
import re
import shutil
import subprocess
import sys
from glob import glob

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# no FMA contraction (results match the reference's rounding); no trapping maths, so the dropout
# select loops vectorise (it changes no result, only lets a multiply run for a masked element)
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"]
NVCC_FLAGS = ["-O3", "--fmad=false"]
LINK_FLAGS = ["-fopenmp"]


def cpu_sources() -> list[str]:
    return ["csrc/adalora_kernels.cpp", "csrc/autograd.cpp", *sorted(glob("csrc/cpu/*.cpp", root_dir=ROOT))]


def cuda_sources() -> list[str]:
    return sorted(glob("csrc/cuda/*.cpp", root_dir=ROOT)) + sorted(glob("csrc/cuda/*.cu", root_dir=ROOT))


DEFAULT_ARCHS = "8.0;9.0"  # where no GPU is visible to read one from: A100/H100-class, as the build check compiles


def _nvcc_version(nvcc: str) -> str | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def find_cuda_home(cuda_version: str) -> str | None:
    """``$CUDA_HOME`` (or ``$CUDA_PATH``), else the toolkit under /usr/local whose nvcc has torch's CUDA major
    version; ``None`` when neither is a toolkit (``bin/nvcc`` and ``include/cuda_runtime_api.h``). torch's own
    guess takes the folder above any ``nvcc`` on PATH, which may be a wrapper script elsewhere."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home:
        major = cuda_version.split(".")[0]
        candidates = [*sorted(glob("/usr/local/cuda-*"), reverse=True), "/usr/local/cuda"]
        home = next((c for c in candidates if (_nvcc_version(f"{c}/bin/nvcc") or "").split(".")[0] == major), None)
    if home and all(os.path.exists(os.path.join(home, need)) for need in ("bin/nvcc", "include/cuda_runtime_api.h")):
        return home
    return None


def _say(message: str) -> None:
    print(f"adalora_kernels: {message}", file=sys.stderr)


def _cuda_config(torch, cuda_mode: str) -> str | None:
    """The CUDA toolkit to build the CUDA part with, or ``None`` to build the CPU part only. In auto mode that is
    where torch is a CUDA build and a toolkit of its CUDA version is found; with no GPU visible and no
    ``TORCH_CUDA_ARCH_LIST``, the arch list defaults to ``DEFAULT_ARCHS`` (torch would fail reading a device)."""
    if cuda_mode == "0" or (cuda_mode == "auto" and torch.version.cuda is None):
        return None
    home = find_cuda_home(torch.version.cuda or "")
    if home is None:
        if cuda_mode == "1":
            raise RuntimeError("ADALORA_KERNELS_BUILD_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME")
        _say(f"no CUDA {torch.version.cuda} toolkit found (set CUDA_HOME); building the CPU part only")
        return None
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        _say(f"no GPU visible and no TORCH_CUDA_ARCH_LIST: building CUDA for {DEFAULT_ARCHS}")
    return home


def _native_build():
    mode = os.environ.get("ADALORA_KERNELS_BUILD_EXT", "auto")
    if mode == "0":
        return [], {}
    try:
        import torch
        import torch.utils.cpp_extension as cpp
    except ImportError:
        if mode == "1":
            raise
        _say("torch not importable at build time; skipping the native extension")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        if mode == "1":
            raise RuntimeError("ADALORA_KERNELS_BUILD_EXT=1 but no C++ compiler was found")
        _say("no C++ compiler; skipping the native extension")
        return [], {}
    cuda_mode = os.environ.get("ADALORA_KERNELS_BUILD_CUDA", "auto")
    cuda_home = _cuda_config(torch, cuda_mode)

    def cpu_extension():
        kwargs = {"extra_compile_args": {"cxx": list(CXX_FLAGS)}, "extra_link_args": list(LINK_FLAGS)}
        return cpp.CppExtension("adalora_kernels._C", cpu_sources(), **kwargs)

    class BuildExtension(cpp.BuildExtension):
        """torch's, with the CPU-only extension built in auto mode when the CUDA part fails to build."""

        def build_extensions(self) -> None:
            try:
                super().build_extensions()
            except Exception as exc:
                if cuda_home is None or cuda_mode != "auto":
                    raise
                _say(f"the CUDA part failed to build ({type(exc).__name__}: {exc}); building the CPU part only")
                self.extensions = [cpu_extension()]
                super().build_extensions()

    if cuda_home is None:
        ext = cpu_extension()
    else:
        cpp.CUDA_HOME = cuda_home  # read by the build from here on (torch's own guess may be a wrapper's folder)
        kwargs = {"extra_compile_args": {"cxx": list(CXX_FLAGS), "nvcc": list(NVCC_FLAGS)},
                  "extra_link_args": list(LINK_FLAGS)}  # fmt: skip
        ext = cpp.CUDAExtension("adalora_kernels._C", cpu_sources() + cuda_sources(), **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


if __name__ == "__main__":  # setuptools runs this file as __main__; the build check imports it for the lists above
    ext_modules, cmdclass = _native_build()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
