"""Where a measurement was taken: device, versions, commit (and whether the tree was dirty), the host; and the
free memory a case must fit in.

On the CPU, glibc gives the pages of a freed large block back to the system and the next allocation of that
size faults them in again, so whichever variant runs after a memory-hungry one (PEFT's dropout) paid for its
frees: up to 8 % of a step at 2048×1024×1024. ``steady_cpu_heap`` keeps freed memory in the heap for the
whole benchmark (what a training loop reaches by itself after a few steps), which makes CPU timings
repeatable; ``environment`` records that it did.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import os
import platform
import subprocess
from datetime import date

import torch


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout


def git_commit() -> str:
    out = _git("rev-parse", "HEAD")
    return out.strip() if out else "unknown"


def git_state() -> dict:
    """The commit measured, whether the tree differed from it (tracked changes), and a hash of that diff: a
    results file names exactly the code that produced it."""
    diff = _git("diff", "HEAD")
    return {
        "commit": git_commit(),
        "dirty": bool(diff) if diff is not None else None,
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({os.cpu_count()} cores)"


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


@functools.cache
def steady_cpu_heap() -> str | None:
    """Keep freed memory in the process heap (glibc only): a description of what was set, or ``None``."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mmap_max = 32 << 20  # glibc's ceiling for the mmap threshold on 64-bit machines
        if not (libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) and libc.mallopt(_M_MMAP_THRESHOLD, mmap_max)):
            return None
    except (OSError, AttributeError):
        return None
    return "glibc mallopt: M_TRIM_THRESHOLD=1GiB, M_MMAP_THRESHOLD=32MiB"


def environment(device: torch.device) -> dict:
    """Device, versions, the code (commit, dirty flag, diff hash) and the host (kernel, CPU) of a measurement."""
    env = {
        "device": device_name(device),
        "torch": torch.__version__.split("+")[0],
        **git_state(),
        "date": date.today().isoformat(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
    }
    if device.type == "cpu":
        env["cpu_heap"] = steady_cpu_heap()
    for name in ("triton", "peft", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    return env


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(tokens: int, in_f: int, out_f: int, r: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before allocating, a case whose tensors cannot fit in the device's free memory."""
    size = torch.empty((), dtype=dtype).element_size()
    # x, dx, PEFT's dropped copy of x and its mask; y and g; W; adapters: a generous upper bound
    need = size * (4 * tokens * in_f + 3 * tokens * out_f + in_f * out_f + 8 * r * (tokens + in_f + out_f))
    free = available_bytes(device)
    if need > 0.8 * free:
        raise MemoryError(
            f"shape tokens={tokens}, in={in_f}, out={out_f} ({dtype}) needs about {need / 2**30:.1f} GiB but "
            f"{device} has {free / 2**30:.1f} GiB free; choose a smaller --tokens or preset"
        )
