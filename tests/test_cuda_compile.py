"""Every CUDA source of csrc/ compiles with plain nvcc (no torch headers) for sm_80 and sm_90, warning-free, and no
kernel spills registers (ptxas warns on a spill, and a warning fails the test)."""

import shutil
import subprocess
from pathlib import Path

import pytest

NVCC = shutil.which("nvcc")
SOURCES = sorted((Path(__file__).resolve().parent.parent / "csrc" / "cuda").glob("*.cu"))


def test_there_are_cuda_sources():
    assert {p.name for p in SOURCES} >= {"linear_kernels.cu", "sensitivity_kernels.cu"}


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_compiles_without_warnings(source, arch, tmp_path):
    cmd = [
        NVCC, "-c", str(source), "-o", str(tmp_path / "out.o"), "-std=c++17", "-O3", "--fmad=false",
        f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Werror", "all-warnings",
        "-Xcompiler", "-Wall,-Wextra,-Werror", "-Xptxas", "--warn-on-spills",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "warning" not in (result.stdout + result.stderr).lower(), result.stderr
