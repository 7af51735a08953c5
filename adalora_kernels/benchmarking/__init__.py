"""The measurements behind ``adalora-kernels bench|memory|ledger`` and ``benchmarks/``, one concern per module:

- ``cases``: the one setup factory (variants around one frozen layer, on the same inputs), the allocator's
  adapter sets and a LLaMA block;
- ``timers``: CPU interleaved, CUDA graph (the GPU's time), eager (the host's step), per-call cost, the
  profiler's kernel table;
- ``memory``: bytes saved for backward, CUDA peaks;
- ``ledger``: the traffic ledger, each launch's bytes and FLOPs and its predicted time, from the shapes alone;
- ``report``: results rows with their ratios;
- ``environment``: where it ran.
"""

from .cases import (
    BASELINES,
    BASES,
    DEFAULT_TOKENS,
    DTYPES,
    MODES,
    MODULE_NAMES,
    PRESETS,
    Case,
    all_variants,
    allocator_pair,
    clear_grads,
    llama_block,
    make_case,
    measurable_backends,
    measurable_reason,
    peft_svd_linear,
    step_fn,
)
from .environment import available_bytes, check_fits, device_name, environment, git_commit, steady_cpu_heap
from .memory import block_memory_rows, memory_rows, peak_bytes, saved_bytes
from .report import auto_choice, timing_rows
from .timers import (
    OVERHEAD_SHAPE,
    graph_timings,
    host_overhead_rows,
    kernel_table,
    per_call_work,
    spread,
    time_allocator_step,
    time_calls,
    time_cpu_interleaved,
    time_gpu_eager,
    time_orth_reg,
    triton_launch_host_row,
)

__all__ = [
    "BASELINES",
    "BASES",
    "DEFAULT_TOKENS",
    "DTYPES",
    "MODES",
    "MODULE_NAMES",
    "OVERHEAD_SHAPE",
    "PRESETS",
    "Case",
    "all_variants",
    "allocator_pair",
    "auto_choice",
    "available_bytes",
    "block_memory_rows",
    "check_fits",
    "clear_grads",
    "device_name",
    "environment",
    "git_commit",
    "graph_timings",
    "host_overhead_rows",
    "kernel_table",
    "llama_block",
    "make_case",
    "measurable_backends",
    "measurable_reason",
    "memory_rows",
    "peak_bytes",
    "peft_svd_linear",
    "per_call_work",
    "saved_bytes",
    "spread",
    "steady_cpu_heap",
    "step_fn",
    "time_allocator_step",
    "time_calls",
    "time_cpu_interleaved",
    "time_gpu_eager",
    "time_orth_reg",
    "timing_rows",
    "triton_launch_host_row",
]
