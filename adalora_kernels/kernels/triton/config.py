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
    return configs if autotune_enabled() else configs[2:3]


def get_rowblock_configs() -> list[triton.Config]:
    """Tiles for the kernels that stream rows (the shrink, the one-pass dt/dP/dλ, dQ)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32})]
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=3)
        for bm, bk, w in [(64, 128, 4), (128, 64, 4), (128, 128, 8), (64, 64, 4)]
    ]
    return configs if autotune_enabled() else configs[:1]
