"""Compile and link the CUDA build of the csrc extension against the CUDA build of torch, without a GPU.

The installed torch may be a CPU build (as in CI). The CUDA build of the same torch version is fetched once
into a cache outside the repository (``$ADALORA_KERNELS_CACHE``, else ``~/.cache/adalora_kernels``), only its
headers and libraries are unpacked, and every source that ``setup.py`` builds with CUDA is compiled with the
flags that ``setup.py`` and ``torch.utils.cpp_extension`` use, for sm_80 and sm_90, then linked into a shared
library against ``libtorch_cuda``, ``libc10_cuda`` and ``cudart`` with ``--no-undefined``, so a symbol that no
library defines is an error here rather than an import error on the first GPU. Nothing is imported or run.

    python scripts/cuda_build_check.py                 # fetch (once), build, link; exit 1 on any failure
    CUDA_HOME=/usr/local/cuda-13.0 python scripts/cuda_build_check.py --jobs 2

``CUDA_HOME`` must be the toolkit's own folder (``bin/nvcc``, ``include/cuda_runtime_api.h``); where it is unset,
the toolkit whose ``nvcc`` matches the CUDA version of the torch wheel is looked for under ``/usr/local``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("80", "90")
TORCH_LIBS = ("c10", "c10_cuda", "torch", "torch_cpu", "torch_cuda", "torch_python")


def _setup_module():
    spec = importlib.util.spec_from_file_location("adalora_kernels_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the lists; setup() runs only as __main__
    return module


def _torch_version() -> str:
    from importlib.metadata import version

    return version("torch").split("+")[0]


def _cache_dir() -> Path:
    return Path(os.environ.get("ADALORA_KERNELS_CACHE") or Path.home() / ".cache" / "adalora_kernels")


def fetch_cuda_torch(version: str, cache: Path) -> Path:
    """The unpacked headers and libraries of torch ``version``'s CUDA wheel (downloaded once)."""
    root = cache / f"torch-{version}-cuda"
    if (root / ".complete").exists():
        return root
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(f"torch-{version}-*.whl"))
    if not found:
        tag = f"{sys.version_info.major}{sys.version_info.minor}"
        # --isolated: PyPI itself, not a local find-links folder that may hold the CPU build of the same version
        cmd = [sys.executable, "-m", "pip", "download", "--isolated", "--no-deps", "--only-binary=:all:",
               "--python-version", tag, "--platform", "manylinux_2_28_x86_64", "--progress-bar", "off",
               "-d", str(wheels), f"torch=={version}"]  # fmt: skip
        print("fetching the CUDA build of torch", version, "into", wheels, flush=True)
        subprocess.run(cmd, check=True)
        found = sorted(wheels.glob(f"torch-{version}-*.whl"))
    with zipfile.ZipFile(found[-1]) as wheel:
        info = wheel.read("torch/version.py").decode()
        if not re.search(r"^cuda\s*(: [^=]*)?=\s*'[0-9.]+'", info, re.M):
            raise SystemExit(f"{found[-1].name} is not a CUDA build of torch:\n{info}")
        wanted = [n for n in wheel.namelist() if n.startswith("torch/include/") or n == "torch/version.py"]
        wanted += [f"torch/lib/lib{lib}.so" for lib in TORCH_LIBS]
        tmp = root.with_name(root.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        wheel.extractall(tmp, members=wanted)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    (root / ".complete").write_text(found[-1].name + "\n")
    return root


def torch_cuda_version(root: Path) -> str:
    return re.search(r"^cuda\s*(: [^=]*)?=\s*'([0-9.]+)'", (root / "torch/version.py").read_text(), re.M).group(2)


def find_cuda_home(cuda_version: str) -> Path:
    """The toolkit ``setup.py`` builds with (``$CUDA_HOME``, else the one under /usr/local of torch's CUDA major
    version), or exit saying what to set."""
    home = _setup_module().find_cuda_home(cuda_version)
    if home is None:
        given = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        if given:
            raise SystemExit(f"CUDA_HOME={given}: no bin/nvcc and include/cuda_runtime_api.h there; point CUDA_HOME "
                             "at the toolkit's own folder")  # fmt: skip
        raise SystemExit(f"no CUDA {cuda_version.split('.')[0]} toolkit under /usr/local (torch is built for CUDA "
                         f"{cuda_version}); set CUDA_HOME to the toolkit's folder")  # fmt: skip
    return Path(home)


def build_commands(torch_root: Path, cuda_home: Path, build: Path) -> tuple[list[list[str]], list[str]]:
    """The compile commands of every source (CUDA build) and the link command, as torch's BuildExtension
    would issue them for ``setup.py``'s extension."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    setup = _setup_module()
    inc = torch_root / "torch/include"
    includes = [f"-I{inc}", f"-I{inc}/torch/csrc/api/include", f"-I{cuda_home}/include",
                f"-I{sysconfig.get_paths()['include']}"]  # fmt: skip
    defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-D_GLIBCXX_USE_CXX11_ABI=1",
               "-DWITH_CUDA"]  # fmt: skip
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    compiles, objects = [], []
    for src in setup.cpu_sources() + setup.cuda_sources():
        obj = build / (src.replace("/", "_") + ".o")
        objects.append(str(obj))
        if src.endswith(".cu"):
            cmd = [str(cuda_home / "bin/nvcc"), "-c", src, "-o", str(obj), *includes, *defines, *COMMON_NVCC_FLAGS,
                   "--compiler-options", "-fPIC", "-std=c++17", *gencode, *setup.NVCC_FLAGS]  # fmt: skip
        else:
            cmd = [os.environ.get("CXX", "c++"), "-c", src, "-o", str(obj), "-fPIC", "-std=c++17", *includes,
                   *defines, *setup.CXX_FLAGS]  # fmt: skip
        compiles.append(cmd)
    lib = torch_root / "torch/lib"
    link = [os.environ.get("CXX", "c++"), "-shared", "-o", str(build / "_C.so"), *objects,
            f"-L{lib}", *(f"-l{name}" for name in TORCH_LIBS), f"-L{cuda_home}/lib64", "-lcudart",
            *setup.LINK_FLAGS, "-Wl,--no-undefined", "-Wl,--allow-shlib-undefined",
            f"-L{sysconfig.get_config_var('LIBDIR')}", f"-lpython{sysconfig.get_config_var('LDVERSION')}"]  # fmt: skip
    return compiles, link


def _run(cmd: list[str]) -> tuple[list[str], int, str, float]:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return cmd, result.returncode, result.stdout + result.stderr, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))
    parser.add_argument("--build-dir", type=Path, default=None, help="where objects go (default: a cache folder)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs: expected a positive integer, got {args.jobs}")
    version = _torch_version()
    torch_root = fetch_cuda_torch(version, _cache_dir())
    cuda = torch_cuda_version(torch_root)
    cuda_home = find_cuda_home(cuda)
    build = args.build_dir or _cache_dir() / "build-cuda-check"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    print(f"torch {version} (CUDA {cuda}) headers from {torch_root}; CUDA_HOME={cuda_home}; sm_{', sm_'.join(ARCHS)}")
    compiles, link = build_commands(torch_root, cuda_home, build)
    failed = 0
    with ThreadPoolExecutor(args.jobs) as pool:
        for cmd, rc, out, secs in pool.map(_run, compiles):
            print(f"  {'ok  ' if rc == 0 else 'FAIL'} {cmd[2]} ({secs:.0f} s)")
            if rc != 0:
                failed += 1
                print(out[-6000:])
    if failed:
        print(f"{failed} of {len(compiles)} sources failed to compile against the CUDA build of torch")
        return 1
    _, rc, out, secs = _run(link)
    if rc != 0:
        print(out[-6000:])
        print("linking the CUDA extension failed")
        return 1
    print(f"linked {build / '_C.so'} ({secs:.0f} s): {len(compiles)} sources, CUDA build of torch {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
