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
import shutil
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


def _native_build():
    mode = os.environ.get("ADALORA_KERNELS_BUILD_EXT", "auto")
    if mode == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        if mode == "1":
            raise
        print("adalora_kernels: torch not importable at build time; skipping the native extension", file=sys.stderr)
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        if mode == "1":
            raise RuntimeError("ADALORA_KERNELS_BUILD_EXT=1 but no C++ compiler was found")
        print("adalora_kernels: no C++ compiler; skipping the native extension", file=sys.stderr)
        return [], {}
    cuda_mode = os.environ.get("ADALORA_KERNELS_BUILD_CUDA", "auto")
    with_cuda = cuda_mode == "1" or (cuda_mode == "auto" and torch.version.cuda is not None and CUDA_HOME is not None)
    kwargs = {"extra_compile_args": {"cxx": list(CXX_FLAGS)}, "extra_link_args": list(LINK_FLAGS)}
    if with_cuda:
        kwargs["extra_compile_args"]["nvcc"] = list(NVCC_FLAGS)
        ext = CUDAExtension("adalora_kernels._C", cpu_sources() + cuda_sources(), **kwargs)
    else:
        ext = CppExtension("adalora_kernels._C", cpu_sources(), **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


if __name__ == "__main__":  # setuptools runs this file as __main__; the build check imports it for the lists above
    ext_modules, cmdclass = _native_build()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
