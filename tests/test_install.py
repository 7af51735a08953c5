"""setup.py's auto mode where torch is a CUDA build and no GPU is visible (a login node, a container build, CI with
PyPI's default wheel): it builds the CUDA part for a default arch list with the toolkit the build check finds,
and falls back to the CPU-only extension, saying why, when the CUDA part fails to build. The configuration is
dry-run here with torch's CUDA version faked; the real install with a CUDA torch runs in CI's version leg."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_PRELUDE = """
import importlib.util, os, sys, torch
torch.version.cuda = "13.0"  # a CUDA build of torch ...
torch.cuda.is_available = lambda: False  # ... on a machine without a GPU
spec = importlib.util.spec_from_file_location("adalora_setup", {setup!r})
setup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup)
"""


def _run(body: str, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CUDA_PATH")}
    script = _PRELUDE.format(setup=str(ROOT / "setup.py")) + body
    return subprocess.run([sys.executable, "-c", script], env={**environ, **env}, capture_output=True, text=True,
                          cwd=ROOT)  # fmt: skip


def _setup_module():
    spec = importlib.util.spec_from_file_location("adalora_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_auto_mode_with_a_cuda_torch_and_no_gpu_configures_a_cuda_build():
    home = _setup_module().find_cuda_home("13.0")
    done = _run(
        "exts, cmds = setup._native_build()\n"
        "import torch.utils.cpp_extension as cpp\n"
        "cuda = any(s.endswith('.cu') for s in exts[0].sources)\n"
        "print(cuda, os.environ.get('TORCH_CUDA_ARCH_LIST'), cpp.CUDA_HOME)\n"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    if home is None:  # no CUDA 13 toolkit on this machine: the CPU part, said in one line
        assert done.stdout.startswith("False")
        assert "toolkit found (set CUDA_HOME); building the CPU part only" in done.stderr
        return
    assert done.stdout.split() == ["True", "8.0;9.0", home]
    assert "no GPU visible and no TORCH_CUDA_ARCH_LIST: building CUDA for 8.0;9.0" in done.stderr
    kept = _run("setup._native_build()\nprint(os.environ['TORCH_CUDA_ARCH_LIST'])\n", TORCH_CUDA_ARCH_LIST="9.0a")
    assert kept.stdout.strip() == "9.0a"  # the user's list is honoured


def test_a_cuda_toolkit_is_found_as_the_build_check_finds_it(tmp_path):
    setup = _setup_module()
    fake = tmp_path / "cuda"
    (fake / "bin").mkdir(parents=True)
    (fake / "include").mkdir()
    (fake / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.1'\n")
    (fake / "bin" / "nvcc").chmod(0o755)
    (fake / "include" / "cuda_runtime_api.h").write_text("")
    os.environ["CUDA_HOME"] = str(fake)
    try:
        assert setup.find_cuda_home("13.0") == str(fake)
        os.environ["CUDA_HOME"] = str(tmp_path / "wrapper-folder")  # not a toolkit: refused, not guessed
        assert setup.find_cuda_home("13.0") is None
    finally:
        del os.environ["CUDA_HOME"]


def test_auto_mode_falls_back_to_the_cpu_extension_when_the_cuda_part_fails():
    if _setup_module().find_cuda_home("13.0") is None:
        pytest.skip("no CUDA 13 toolkit here: auto mode configures the CPU part only")
    done = _run(
        "import torch.utils.cpp_extension as cpp\n"
        "from setuptools import Distribution\n"
        "built = []\n"
        "def fake_build(self):\n"
        "    if any(s.endswith('.cu') for e in self.extensions for s in e.sources):\n"
        "        raise IndexError('list index out of range')\n"
        "    built.append([s for e in self.extensions for s in e.sources])\n"
        "cpp.BuildExtension.build_extensions = fake_build\n"
        "exts, cmds = setup._native_build()\n"
        "command = cmds['build_ext'](Distribution({'ext_modules': exts}))\n"
        "command.extensions = exts\n"
        "command.build_extensions()\n"
        "print(built == [setup.cpu_sources()])\n"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "True"
    assert "the CUDA part failed to build (IndexError: list index out of range); building the CPU part only" in (
        done.stderr
    )
