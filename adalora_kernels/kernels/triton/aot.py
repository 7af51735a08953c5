"""Compile the Triton kernels for a GPU architecture on a machine without a GPU (or a driver).

Inside ``compile_only(arch)``, every launch of a Triton kernel compiles, for ``sm_<arch>``, each autotune config
that the kernel's prune keeps (with that architecture's shared memory), records the compiled kernel and
launches nothing. Registers and spills are read from the cubin with the ``cuobjdump`` of the Triton wheel,
shared memory from the compiled metadata: measured, not estimated. Used by the compile tests and
``benchmarks/triton_compile_sweep.py``; the launchers run unchanged, on CPU tensors whose contents are unused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler.compiler import CompiledKernel
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

# shared memory a block may opt in to, per compute capability (CUDA programming guide, table of limits)
SHARED_MEMORY = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
META = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "GROUP_M")


@dataclasses.dataclass
class CompiledVariant:
    kernel: str
    arch: int
    constants: dict  # the constexpr arguments (tiles and feature flags)
    num_warps: int
    num_stages: int
    shared: int  # bytes of shared memory per block, from the compiled metadata
    registers: int  # per thread, from the cubin
    local: int  # bytes of register spill stores per thread (ptxas)
    seconds: float  # compile time (0 for a kernel already in Triton's cache)
    hash: str  # Triton's hash of the compiled kernel: equal hashes, one compile
    fits: bool  # shared <= the architecture's per-block limit

    @property
    def spills(self) -> bool:
        return self.local > 0


class _CompileOnlyDriver:
    """What Triton's launch path asks of the active driver, for a GPU that is not there."""

    def __init__(self, arch: int):
        self.arch = arch
        self.utils = self  # utils.get_device_properties, read by the shared-memory prune

    def get_device_properties(self, device):
        return {"max_shared_mem": SHARED_MEMORY[self.arch], "multiprocessor_count": 132 if self.arch >= 90 else 108}

    def get_current_device(self):
        return f"compile-only-sm_{self.arch}"  # keys Triton's per-device kernel cache

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_benchmarker(self):
        raise RuntimeError("compile_only: nothing is timed without a GPU")


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resource_usage(kernel, arch: int) -> tuple[int, int]:
    """(registers per thread, bytes of register spill stores per thread) of a compiled kernel: registers
    from its cubin (cuobjdump); where the cubin has local memory or a stack frame, whether that is spilling
    from ptxas -v on its PTX (a stack frame alone is no spill)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True)
        match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out.stdout)
        if match is None:
            raise RuntimeError(f"cuobjdump printed no resource usage:\n{out.stdout}{out.stderr}")
        registers, stack, local = (int(v) for v in match.groups())
        if stack == 0 and local == 0:
            return registers, 0
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        gpu = sm_arch_from_capability(arch)
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", ptx, "-o", os.path.join(tmp, "o.cubin")],
                             capture_output=True, text=True)  # fmt: skip
        spill = re.search(r"(\d+) bytes spill stores", log.stdout + log.stderr)
        if spill is None:
            raise RuntimeError(f"ptxas -v printed no spill count:\n{log.stdout}{log.stderr}")
        return registers, int(spill.group(1))


@contextlib.contextmanager
def compile_only(arch: int) -> Iterator[list[CompiledVariant]]:
    """Within the block, Triton launches compile for ``sm_<arch>`` and are recorded in the yielded list."""
    if arch not in SHARED_MEMORY:
        raise ValueError(f"arch: expected one of {sorted(SHARED_MEMORY)}, got {arch!r}")
    records: list[CompiledVariant] = []
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def run_jit(self, *args, grid, warmup, **kwargs):
        start = time.perf_counter()
        kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        seconds = time.perf_counter() - start
        kernel._init_handles = lambda: None  # never loaded: there is no driver
        registers, local = resource_usage(kernel, arch)
        constants = {name: value for name, value in kwargs.items() if name.isupper()}
        meta = kernel.metadata
        records.append(
            CompiledVariant(
                self.__name__, arch, constants, meta.num_warps, meta.num_stages, meta.shared, registers, local,
                seconds, kernel.hash, meta.shared <= SHARED_MEMORY[arch],
            )
        )  # fmt: skip
        return kernel

    def run_tuner(self, *args, **kwargs):
        kwargs.pop("warmup", None)
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)
        self.nargs = None
        for config in configs:
            self.fn.run(*args, warmup=True, **kwargs, **config.all_kwargs())

    previous = triton.runtime.driver._active  # None where no GPU driver was ever made active
    triton.runtime.driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run, Autotuner.run = run_jit, run_tuner
    try:
        yield records
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        triton.runtime.driver.set_active(previous)


@contextlib.contextmanager
def launches_stubbed(arch: int = 90) -> Iterator[None]:
    """Within the block, Triton launches go through Triton's whole host path (autotuner, JIT dispatch,
    argument binding, launch metadata) for ``sm_<arch>``, compiling where needed, but the launch itself does
    nothing and autotuning takes the first config that the prune keeps: what the launchers cost the host,
    measured without a GPU."""
    if arch not in SHARED_MEMORY:
        raise ValueError(f"arch: expected one of {sorted(SHARED_MEMORY)}, got {arch!r}")
    init_handles, bench = CompiledKernel._init_handles, Autotuner._bench

    def no_launch(self):
        self._run = lambda *args: None

    def first_config(self, *args, config, **meta):
        return [float(self.configs.index(config) if config in self.configs else 0)] * 3

    previous = triton.runtime.driver._active
    triton.runtime.driver.set_active(_CompileOnlyDriver(arch))
    CompiledKernel._init_handles, Autotuner._bench = no_launch, first_config
    try:
        yield
    finally:
        CompiledKernel._init_handles, Autotuner._bench = init_handles, bench
        triton.runtime.driver.set_active(previous)
