"""Autotune configurations for the Triton kernels, and the switch that collapses them to one.

``ADALORA_KERNELS_AUTOTUNE=0`` (set by the tests on the CPU) keeps a single config: the interpreter needs
one, and it makes runs deterministic in their choice of tiles.
"""

from __future__ import annotations

import os

import triton
from torch.torch_version import TorchVersion

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


_STREAMED = ("x_ptr", "g_ptr", "b_ptr")  # the operand each kernel streams through its main loop


def shared_memory_need(config, element_size: int, r_block: int, tma: str | None = None) -> int:
    """Bytes of shared memory a config stages: the pipelined dot operands of the main loop, and for the GEMM
    kernels the r-wide adapter operands of the epilogue (one buffer each). ``tma`` (``"fwd"`` or ``"dx"``, the
    Hopper GEMMs of hopper.py) adds what the compile sweep saw those take beside: the output tile staged for the TMA
    store (half a tile where stored in halves), dx's u in float32, and barriers and scratch (4 KiB; 8 KiB in dx,
    whose dropout mask takes some)."""
    m, k = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"]
    if "BLOCK_N" in config.kwargs:  # GEMMs: m×k and k×n per stage, the epilogue's m×r and r×n once
        n = config.kwargs["BLOCK_N"]
        need = ((m * k + k * n) * max(config.num_stages, 1) + (m + n) * r_block) * element_size
        if tma is not None:
            u_extra = m * r_block * max(4 - element_size, 0) if tma == "dx" else 0
            need += m * (n // 2 if n >= 128 else n) * element_size + u_extra + (8192 if tma == "dx" else 4096)
        return need
    return (m * k + (m + k) * r_block) * element_size * max(config.num_stages, 1)  # row kernels: m×k, m×r | k×r


def prune_by_shared_memory(configs, named_args, tma: str | None = None, **kwargs):
    """Drop the tiles whose staged operands overflow shared memory for the streamed operand's dtype and this
    rank (fp64 and r = 128 need smaller ones), and those that spill registers (``spills``); with autotuning
    off, keep only the first that fits. ``tma``: the Hopper GEMM being pruned (``shared_memory_need``)."""
    streamed = next((named_args[n] for n in _STREAMED if n in named_args), None)
    size = streamed.element_size() if streamed is not None else 4
    r_block = kwargs.get("BLOCK_R", named_args.get("BLOCK_R", 16))
    limit, arch = shared_memory_bytes(), target_arch()
    fitting = [
        c
        for c in configs
        if shared_memory_need(c, size, r_block, tma) <= limit and not spills(c, size, r_block, kwargs, arch)
    ] or [min(configs, key=lambda c: shared_memory_need(c, size, r_block, tma))]
    return fitting if autotune_enabled() else fitting[:1]


def target_arch() -> int:
    """The compute capability Triton compiles for (80 for sm_80), 0 where none can be read (no GPU, the
    interpreter); the compile sweep's fake driver answers for the arch it compiles."""
    try:
        return int(triton.runtime.driver.active.get_current_target().arch)
    except Exception:
        return 0


# Triton before 3.9 (the GPU machine runs 3.6) allocates registers less tightly on sm_80 than 3.9 does, and a few
# narrow split-pass tiles spill with it on sm_90: the compile sweep under each version found what follows.
OLDER_TRITON = TorchVersion(triton.__version__) < "3.9"


def register_pressure(config, element_size: int, r_block: int, flags: dict, arch: int = 0) -> float:
    """Registers per thread the live tiles take: the accumulator (one per element, two in float64; a GEMM's
    more where the dropout mask is drawn beside it), the streamed tile (thrice with the mask) and the r-wide
    operands (the epilogue's for the GEMMs, a rank tile for the rows); operand elements take ``element_size / 2``
    registers each (16-bit values pack two to a register)."""
    threads = 32 * config.num_warps
    acc, op = (2 if element_size == 8 else 1), element_size / 2
    m, k = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"]
    dropout = 2 if flags.get("HAS_DROPOUT") else 0
    if "BLOCK_N" in config.kwargs:  # GEMM: acc m×n (and the dropout mask of dx); t/u (m×r) and P/Q (r×n)
        n = config.kwargs["BLOCK_N"]
        # the mask beside a GEMM's accumulator costs half that with Triton 3.9 on either arch and with 3.6 on
        # sm_90 (dx at r = 64 with dropout keeps 128x128x64 without spills); Triton 3.6 on sm_80 spilled 44 bytes
        # per thread there, so it keeps the full cost
        mask = dropout if OLDER_TRITON and arch in (0, 80) else dropout / 2
        return (m * n * (acc + mask) + r_block * (m + n) * op) / threads
    # row kernels: acc m×r (shrink, dt) or r×k (reductions), streamed tile m×k, a rank tile m×r
    extra = m * r_block * op if flags.get("NEED_ADAPTER") or "HAS_LAM" in flags else 0
    return (max(m, k) * r_block * acc + m * k * (op + dropout) + extra) / threads


_MAX_PRESSURE = 208  # above it, kept 16-bit configs spilled in the compile sweep on sm_80 or sm_90


def spills(config, element_size: int, r_block: int, flags: dict, arch: int | None = None) -> bool:
    """Whether a config is expected to spill registers on ``arch`` (the target's where not given), from the
    compile sweep (the sweep checks it)."""
    arch = target_arch() if arch is None else arch
    return register_pressure(config, element_size, r_block, flags, arch) > _MAX_PRESSURE


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


def _without(configs, banned: set, tile) -> list:
    """``configs`` less those whose ``tile(config)`` the compile sweep banned; the last (smallest) where none is
    left."""
    return [c for c in configs if tile(c) not in banned] or configs[-1:]


def get_hopper_configs() -> list[triton.Config]:
    """Tiles for the Hopper GEMMs (hopper.py): the GEMM kernels' on a GPU; under the interpreter one 128 wide, so
    the CPU tests run the epilogue's two-halves store too."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 4})]
    return get_autotune_configs()


# Tiles (BLOCK_M, BLOCK_N, BLOCK_K) of the Hopper GEMMs that the compile sweep (sm_90, 16-bit) found over the shared
# memory (at r <= 128 more than even shared_memory_need's TMA terms count) or spilling, per GEMM, rank bucket and
# dropout: never kept.
_HOPPER_FAILS = {
    ("fwd", 128, False): {(128, 128, 64)},  # 246528 bytes of shared memory
    ("dx", 128, False): {(128, 128, 64)},  # 344064 bytes
    ("dx", 128, True): {(128, 128, 64)},
    ("dx", 64, True): {(128, 128, 64)},  # 40 bytes of spill per thread
}


def hopper_prune(gemm: str):
    """The prune of one Hopper GEMM (``fwd`` or ``dx``): the tiles the compile sweep saw fail for this rank bucket,
    then shared memory and register pressure as for the other kernels."""

    def prune(configs, named_args, **kwargs):
        r_block = kwargs.get("BLOCK_R", named_args.get("BLOCK_R", 16))
        bucket = 16 if r_block <= 16 else 64 if r_block <= 64 else 128
        banned = _HOPPER_FAILS.get((gemm, bucket, bool(kwargs.get("HAS_DROPOUT", False))), set())
        kept = _without(configs, banned, lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]))
        return prune_by_shared_memory(kept, named_args, tma=gemm, **kwargs)

    return prune


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


def get_split_configs() -> list[triton.Config]:
    """Tiles for the split route's streaming passes (BLOCK_M rows × BLOCK_K columns of the streamed tensor): narrow
    row blocks, so that the passes have about two programs per SM at any token count."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 32})]
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bk, w, s in [
            (32, 128, 4, 3),
            (64, 128, 4, 3),
            (32, 256, 8, 3),
            (16, 256, 4, 3),
            (64, 64, 4, 4),
            (32, 64, 8, 3),
            (16, 64, 8, 3),
            (16, 32, 4, 3),
        ]  # (the last three for large ranks)
    ]
    small = triton.Config({"BLOCK_M": 16, "BLOCK_K": 64}, num_warps=4, num_stages=2)
    # without autotuning the first that the prune keeps: the narrowest tile before small, which spills in the
    # atomic x pass at r <= 64 on sm_80
    return [*configs, small] if autotune_enabled() else [configs[0], configs[-1], small]


SPLIT_MAX_R = 64  # the split route's rank limit: above it no pass tile compiled without 16-bit spills on sm_80

# Tiles (BLOCK_M, BLOCK_K, warps) that spilled registers in the compile sweep (benchmarks/triton_compile_sweep.py,
# sm_80 or sm_90, 16-bit, Triton 3.9), per split pass and rank bucket (BLOCK_R 16, or 32 and 64): never kept.
_SPLIT_SPILLS = {
    ("fwd", 16): {(16, 256, 4)},
    ("fwd", 64): set(),
    ("g", 16): set(),
    ("g", 64): {(16, 256, 4), (32, 128, 4), (64, 64, 4), (64, 128, 4)},
    ("x", 16): {(64, 128, 4)},
    ("x", 64): {(16, 256, 4), (32, 128, 4), (32, 256, 8), (64, 64, 4), (64, 128, 4)},
}
# and those that spilled with Triton 3.6 only (4 to 16 bytes per thread on sm_90), kept with 3.9
_SPLIT_SPILLS_OLDER_TRITON = {("g", 16): {(32, 64, 8)}, ("x", 16): {(32, 128, 4)}}
# and those that spilled only in the atomic form of the backward passes (ATOMIC, deterministic algorithms off;
# 8 to 620 bytes per thread on sm_80; g's 16×256 at r <= 16 24 bytes on sm_90 with Triton 3.6 only), kept in the
# fixed-order form
_SPLIT_SPILLS_ATOMIC = {("g", 16): {(16, 256, 4)}, ("g", 64): {(32, 256, 8)}, ("x", 64): {(16, 64, 4), (32, 64, 8)}}


def split_prune(family: str):
    """The prune of one split pass (``fwd``, ``g`` or ``x``): shared memory as for the other kernels, and the tiles
    the compile sweep saw spill for this rank bucket with the installed Triton."""

    def prune(configs, named_args, **kwargs):
        r_block = kwargs.get("BLOCK_R", named_args.get("BLOCK_R", 16))
        key = (family, 16 if r_block <= 16 else 64)
        banned = _SPLIT_SPILLS[key] | (_SPLIT_SPILLS_OLDER_TRITON.get(key, set()) if OLDER_TRITON else set())
        if kwargs.get("ATOMIC", named_args.get("ATOMIC", False)):
            banned = banned | _SPLIT_SPILLS_ATOMIC.get(key, set())
        kept = _without(configs, banned, lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps))
        return prune_by_shared_memory(kept, named_args, **kwargs)

    return prune
