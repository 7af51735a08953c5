"""Autotune configurations for the Triton kernels, and the switch that collapses them to one.

``ADALORA_KERNELS_AUTOTUNE=0`` (set by the tests on the CPU) keeps a single config: the interpreter needs
one, and it makes runs deterministic in their choice of tiles.
"""

from __future__ import annotations

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    return os.environ.get("ADALORA_KERNELS_AUTOTUNE", "1") != "0" and not INTERPRET


_SMALL = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}  # fits any dtype and r <= 128: the last resort


def shared_memory_bytes() -> int:
    """Shared memory per block on the current GPU (a conservative 160 KiB where it cannot be read)."""
    try:
        import torch

        device = torch.cuda.current_device() if torch.cuda.is_available() else 0
        props = triton.runtime.driver.active.utils.get_device_properties(device)
        return int(props["max_shared_mem"])
    except Exception:
        return 160 * 1024


def prune_by_shared_memory(configs, named_args, **kwargs):
    """Drop the tiles whose pipelined operands overflow shared memory for these dtypes and this rank (fp64 and
    r = 128 need smaller ones); with autotuning off, keep only the first that fits."""
    size = max((a.element_size() for a in named_args.values() if hasattr(a, "element_size")), default=4)
    r_block = kwargs.get("BLOCK_R", named_args.get("BLOCK_R", 16))
    limit = shared_memory_bytes()

    def need(c):
        m, k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
        n = max(c.kwargs.get("BLOCK_N", k), r_block)
        return (m * k + k * n) * size * max(c.num_stages, 1)

    fitting = [c for c in configs if need(c) <= limit] or [min(configs, key=need)]
    return fitting if autotune_enabled() else fitting[:1]


def get_autotune_configs() -> list[triton.Config]:
    """Tiles for the GEMM kernels (BLOCK_M, BLOCK_N, BLOCK_K): Hopper- then Ampere-friendly shapes."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    shapes = [  # BM, BN, BK, warps, stages
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
    ]
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]
    small = triton.Config({**_SMALL, "GROUP_M": 8}, num_warps=4, num_stages=2)
    # with autotuning off: the preferred tile, or the small one where it does not fit (pruned per call)
    return [*configs, small] if autotune_enabled() else [configs[2], small]


def get_rowblock_configs() -> list[triton.Config]:
    """Tiles for the kernels that stream rows (the shrink, the one-pass dt/dP/dλ, dQ)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32})]
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=3)
        for bm, bk, w in [(64, 128, 4), (128, 64, 4), (128, 128, 8), (64, 64, 4)]
    ]
    small = triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2)
    return [*configs, small] if autotune_enabled() else [configs[0], small]
