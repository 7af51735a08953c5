"""Triton kernels of the fused AdaLoRA linear layer (DESIGN §4) and their launchers.

Forward:  (1) shrink ``t = drop(x) Qᵀ``;  (2) ``y = x Wᵀ + b + (t · λeff) Pᵀ``, adapter in the epilogue.
Backward: (3) one pass over g: ``u = (g P) · λeff`` and ``dλeff = Σ_rows (g P) ⊙ t`` (a partial per row block);
          (4) ``dx = g W + drop'(u Q)`` with the adapter in the epilogue;
          (5) the rank-r reductions over rows ``dQ = uᵀ drop(x)`` and ``dPᵀ = (t · λeff)ᵀ g``.

From sm_90 on, (2) and (4) run as ``hopper.py``'s persistent TMA GEMMs (same operands, epilogues and mask bits)
wherever the layouts allow TMA; these portable kernels everywhere else.

No atomics: a reduction over rows that is split across programs (for parallelism at small token counts)
writes one partial per split, summed in a fixed order, so every result is bitwise reproducible
(``torch.use_deterministic_algorithms`` holds by construction). Offsets are int64 (``_offsets``).

Dropout: element (row, col) of the M×in input is kept when a uniform drawn from
``philox(seed, col // 4, row)`` (word ``col % 4``) is ``>= p``, so the mask depends only on the seed and the
element's position and is regenerated bit-for-bit in backward: it is never stored. ``seed`` is always an
int64 argument and ``keep_scale`` a float64 one, so neither value makes a new compile, and float64 kernels
scale by the exact ``1 / (1 - p)``.

Autotuning keys name every shape argument and feature flag; the token count enters through its power-of-two
bucket ``M_BUCKET`` (``M`` itself is not specialised), so a new batch length reuses the tuned config.
"""

from __future__ import annotations

import functools
import json
import os

import torch
import triton
import triton.language as tl

from .. import grids
from .config import INTERPRET, get_autotune_configs, get_rowblock_configs, prune_by_shared_memory

_PRUNE = {"early_config_prune": prune_by_shared_memory}
_UNSPECIALISED = ["M", "M_BUCKET", "seed"]
_ROW_KEY = ["M_BUCKET", "K", "BLOCK_R"]

# ----------------------------------------------------------------------------------------------- helpers


@triton.jit
def _keep_mask(seed, rows, col0, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Keep-mask of the tile ``rows × [col0, col0 + BLOCK_K)``; col0 is a multiple of 4 (4 words per call)."""
    c0 = (col0 // 4 + tl.arange(0, BLOCK_K // 4)).to(tl.uint32)
    c0 = tl.zeros([BLOCK_M, BLOCK_K // 4], dtype=tl.uint32) + c0[None, :]
    c1 = tl.zeros([BLOCK_M, BLOCK_K // 4], dtype=tl.uint32) + rows.to(tl.uint32)[:, None]
    zero = tl.zeros([BLOCK_M, BLOCK_K // 4], dtype=tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    # column 4j + w takes word w of call j
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK_M, BLOCK_K])
    return tl.uint_to_uniform_float(words) >= p


@triton.jit
def _scaled(acc, keep_scale, IS_FP64: tl.constexpr):
    """``acc · keep_scale``; keep_scale is a float64 argument, rounded to float32 for the other dtypes."""
    if IS_FP64:
        return acc * keep_scale
    else:
        return acc * tl.cast(keep_scale, tl.float32)


@triton.jit
def _offsets(rows, cols, stride_rows, stride_cols):
    """Element offsets of a ``rows × cols`` tile, in int64 whatever the index types (M·in passes 2³¹)."""
    return rows.to(tl.int64)[:, None] * stride_rows + cols.to(tl.int64)[None, :] * stride_cols


@triton.jit
def _load_tile(ptr, rows, cols, stride_rows, stride_cols, n_rows, n_cols):
    """The ``rows × cols`` tile at ``ptr`` (a transposed one by swapping rows/cols and their strides), zero
    outside ``n_rows × n_cols``."""
    return tl.load(
        ptr + _offsets(rows, cols, stride_rows, stride_cols),
        mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols),
        other=0.0,
    )


@triton.jit
def _store_tile(ptr, rows, cols, stride_rows, stride_cols, n_rows, n_cols, value):
    tl.store(
        ptr + _offsets(rows, cols, stride_rows, stride_cols),
        value,
        mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols),
    )


@triton.jit
def _swizzle(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped program order (row blocks in groups of GROUP_M) for L2 reuse."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    return pid_m, pid_n


@triton.jit
def _forward_epilogue(acc, b_ptr, t_ptr, p_ptr, lam_ptr, rows, rn, M, N, R, stride_tm, stride_tr, stride_pn,
                      stride_pr, in_dtype: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADAPTER: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """The forward GEMMs' epilogue on the ``rows × rn`` tile: ``+ (t · λeff) Pᵀ`` (an r-wide product, u rounded to
    the input dtype as PEFT's) and the bias."""
    if HAS_ADAPTER:
        rr = tl.arange(0, BLOCK_R)
        t = _load_tile(t_ptr, rows, rr, stride_tm, stride_tr, M, R)
        lam = tl.load(lam_ptr + rr, mask=rr < R, other=0.0).to(acc.dtype)
        u = (t.to(acc.dtype) * lam[None, :]).to(in_dtype)
        pt = _load_tile(p_ptr, rr, rn, stride_pr, stride_pn, R, N)
        acc += tl.dot(u, pt, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(acc.dtype)[None, :]
    return acc


@triton.jit
def _dx_adapter(u_ptr, q_ptr, rows, cols, col0, M, K, R, stride_qr, stride_qk, seed, p, keep_scale,
                HAS_DROPOUT: tl.constexpr, IS_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """The adapter's share of the dx GEMMs' ``rows × cols`` tile (columns from ``col0``): ``drop'(u Q)``, the mask
    regenerated from the seed."""
    rr = tl.arange(0, BLOCK_R)
    u = _load_tile(u_ptr, rows, rr, R, 1, M, R)
    q = _load_tile(q_ptr, rr, cols, stride_qr, stride_qk, R, K)
    adapter = tl.dot(u.to(q.dtype), q, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep = _keep_mask(seed, rows, col0, p, BLOCK_M, BLOCK_N)
        adapter = tl.where(keep, _scaled(adapter, keep_scale, IS_FP64), 0.0)
    return adapter


# ----------------------------------------------------------------------------------------------- kernels


@triton.autotune(
    configs=get_rowblock_configs(), key=[*_ROW_KEY, "SPLITS", "HAS_DROPOUT", "DOT_PRECISION"], prune_configs_by=_PRUNE
)
@triton.jit(do_not_specialize=_UNSPECIALISED)
def _shrink_fwd_kernel(
    # pointers: x (M, K), Q (R, K), out (SPLITS, M, R): t itself where SPLITS = 1, else fp32 partials over K
    x_ptr, q_ptr, out_ptr,
    # sizes
    M, K, R, M_BUCKET, SPLITS,
    # strides
    stride_xm, stride_xk, stride_qr, stride_qk, stride_os, stride_om, stride_or,
    # dropout
    seed: tl.int64, p, keep_scale: tl.float64,
    # meta
    HAS_DROPOUT: tl.constexpr, IS_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=acc_dtype)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLITS), BLOCK_K) * BLOCK_K
    for k0 in range(split * k_per_split, min(K, (split + 1) * k_per_split), BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = _load_tile(x_ptr, rows, cols, stride_xm, stride_xk, M, K)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, rows, k0, p, BLOCK_M, BLOCK_K), x, 0.0)
        q = _load_tile(q_ptr, cols, rr, stride_qk, stride_qr, K, R)
        acc += tl.dot(x, q, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        acc = _scaled(acc, keep_scale, IS_FP64)
    out = out_ptr + split.to(tl.int64) * stride_os
    _store_tile(out, rows, rr, stride_om, stride_or, M, R, acc.to(out_ptr.dtype.element_ty))


@triton.autotune(
    configs=get_autotune_configs(),
    key=["M_BUCKET", "N", "K", "BLOCK_R", "HAS_BIAS", "HAS_ADAPTER", "DOT_PRECISION"],
    prune_configs_by=_PRUNE,
)
@triton.jit(do_not_specialize=_UNSPECIALISED)
def _fused_fwd_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, t_ptr, p_ptr, lam_ptr, y_ptr,
    # sizes: x (M, K), W (N, K), t (M, R), P (N, R), y (M, N)
    M, N, K, R, M_BUCKET,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_tm, stride_tr, stride_pn, stride_pr,
    stride_ym, stride_yn,
    # meta
    HAS_BIAS: tl.constexpr, HAS_ADAPTER: tl.constexpr, IS_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _swizzle(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = _load_tile(x_ptr, rows, cols, stride_xm, stride_xk, M, K)
        w = _load_tile(w_ptr, cols, rn, stride_wk, stride_wn, K, N)
        acc += tl.dot(x, w, input_precision=DOT_PRECISION)
    acc = _forward_epilogue(acc, b_ptr, t_ptr, p_ptr, lam_ptr, rows, rn, M, N, R,
                            stride_tm, stride_tr, stride_pn, stride_pr, x_ptr.dtype.element_ty,
                            HAS_BIAS, HAS_ADAPTER, DOT_PRECISION, BLOCK_R)  # fmt: skip
    _store_tile(y_ptr, rows, rn, stride_ym, stride_yn, M, N, acc.to(y_ptr.dtype.element_ty))


@triton.autotune(
    configs=get_rowblock_configs(), key=["M_BUCKET", "N", "BLOCK_R", "NEED_ADAPTER", "DOT_PRECISION"],
    prune_configs_by=_PRUNE,
)  # fmt: skip
@triton.jit(do_not_specialize=_UNSPECIALISED)
def _dt_bwd_kernel(
    # pointers: g (M, N), P (N, R), t (M, R), λeff (R); outputs u (M, R) and dλ partials (one row per row block)
    g_ptr, p_ptr, t_ptr, lam_ptr, u_ptr, dlam_ptr,
    # sizes
    M, N, R, M_BUCKET,
    # strides (u, dλ partials contiguous)
    stride_gm, stride_gn, stride_pn, stride_pr, stride_tm, stride_tr,
    # meta
    NEED_ADAPTER: tl.constexpr, IS_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # BLOCK_K tiles the out dimension N here: one pass over g's row block for dt and dλ
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    dt = tl.zeros([BLOCK_M, BLOCK_R], dtype=acc_dtype)
    for n0 in range(0, N, BLOCK_K):
        rn = n0 + tl.arange(0, BLOCK_K)
        g = _load_tile(g_ptr, rows, rn, stride_gm, stride_gn, M, N)
        p = _load_tile(p_ptr, rn, rr, stride_pn, stride_pr, N, R)
        dt += tl.dot(g, p, input_precision=DOT_PRECISION)
    lam = tl.load(lam_ptr + rr, mask=rr < R, other=0.0).to(acc_dtype)
    if NEED_ADAPTER:
        t = _load_tile(t_ptr, rows, rr, stride_tm, stride_tr, M, R).to(acc_dtype)
        tl.store(dlam_ptr + pid * R + rr, tl.sum(dt * t, axis=0), mask=rr < R)
    _store_tile(u_ptr, rows, rr, R, 1, M, R, dt * lam[None, :])


@triton.autotune(
    configs=get_autotune_configs(),
    key=["M_BUCKET", "N", "K", "BLOCK_R", "HAS_DROPOUT", "HAS_ADAPTER", "DOT_PRECISION"],
    prune_configs_by=_PRUNE,
)
@triton.jit(do_not_specialize=_UNSPECIALISED)
def _fused_dx_bwd_kernel(
    # pointers: g (M, N), W (N, K), u (M, R), Q (R, K), dx (M, K)
    g_ptr, w_ptr, u_ptr, q_ptr, dx_ptr,
    # sizes
    M, N, K, R, M_BUCKET,
    # strides (u contiguous)
    stride_gm, stride_gn, stride_wn, stride_wk, stride_qr, stride_qk, stride_dxm, stride_dxk,
    # dropout
    seed: tl.int64, p, keep_scale: tl.float64,
    # meta
    HAS_DROPOUT: tl.constexpr, HAS_ADAPTER: tl.constexpr, IS_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # output tile (rows × BLOCK_N columns of in); BLOCK_K tiles the reduction over out
    pid_m, pid_k = _swizzle(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
    for n0 in range(0, N, BLOCK_K):
        rn = n0 + tl.arange(0, BLOCK_K)
        g = _load_tile(g_ptr, rows, rn, stride_gm, stride_gn, M, N)
        w = _load_tile(w_ptr, rn, cols, stride_wn, stride_wk, N, K)
        acc += tl.dot(g, w, input_precision=DOT_PRECISION)
    if HAS_ADAPTER:
        col0 = pid_k * BLOCK_N
        acc += _dx_adapter(u_ptr, q_ptr, rows, cols, col0, M, K, R, stride_qr, stride_qk, seed, p, keep_scale,
                           HAS_DROPOUT, IS_FP64, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)  # fmt: skip
    _store_tile(dx_ptr, rows, cols, stride_dxm, stride_dxk, M, K, acc.to(dx_ptr.dtype.element_ty))


@triton.autotune(
    configs=get_rowblock_configs(),
    key=[*_ROW_KEY, "SPLITS", "HAS_DROPOUT", "HAS_LAM", "DOT_PRECISION"],
    prune_configs_by=_PRUNE,
)
@triton.jit(do_not_specialize=_UNSPECIALISED)
def _rank_reduce_bwd_kernel(
    # pointers: a (M, R), λeff (R, used where HAS_LAM), b (M, K), out (SPLITS, R, K): the result where
    # SPLITS = 1, else partials over row ranges. dQ = uᵀ drop(b = x); dPᵀ = (t · λeff)ᵀ (b = g)
    a_ptr, lam_ptr, b_ptr, out_ptr,
    # sizes
    M, K, R, M_BUCKET, SPLITS,
    # strides
    stride_am, stride_ar, stride_bm, stride_bk, stride_os, stride_or, stride_ok,
    # dropout (of b)
    seed: tl.int64, p, keep_scale: tl.float64,
    # meta
    HAS_DROPOUT: tl.constexpr, HAS_LAM: tl.constexpr, IS_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=acc_dtype)
    if HAS_LAM:
        lam = tl.load(lam_ptr + rr, mask=rr < R, other=0.0).to(acc_dtype)
    m_per_split = tl.cdiv(tl.cdiv(M, SPLITS), BLOCK_M) * BLOCK_M
    for m0 in range(split * m_per_split, min(M, (split + 1) * m_per_split), BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        b = _load_tile(b_ptr, rows, cols, stride_bm, stride_bk, M, K)
        if HAS_DROPOUT:
            b = tl.where(_keep_mask(seed, rows, pid * BLOCK_K, p, BLOCK_M, BLOCK_K), b, 0.0)
        a = _load_tile(a_ptr, rows, rr, stride_am, stride_ar, M, R)
        if HAS_LAM:
            a = a.to(acc_dtype) * lam[None, :]
        acc += tl.dot(tl.trans(a.to(b.dtype)), b, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        acc = _scaled(acc, keep_scale, IS_FP64)
    out = out_ptr + split.to(tl.int64) * stride_os
    _store_tile(out, rr, cols, stride_or, stride_ok, R, K, acc.to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["seed"])
def _keep_mask_kernel(out_ptr, M, K, seed: tl.int64, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1).to(tl.int64) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    keep = _keep_mask(seed, rows, col0, p, BLOCK_M, BLOCK_K)
    _store_tile(out_ptr, rows, cols, K, 1, M, K, keep.to(tl.int8))


# ----------------------------------------------------------------------------------------------- launchers

_ROW_TILE = grids.ROW_TILE


# the launchers' integer helpers in plain Python: Triton's cdiv and next_power_of_2 are constexpr functions
# whose calls cost microseconds each from the host, about 80 µs of every fwd+bwd call (Triton 3.9)
_cdiv = grids.cdiv


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def m_bucket(M: int) -> int:
    """The autotuning bucket of a token count: the next power of two (at least 16)."""
    return max(16, _next_pow2(M))


def dot_precision(dtype: torch.dtype) -> str:
    """``tf32`` for float32 where torch allows TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32`` or
    ``torch.set_float32_matmul_precision("high")``), else ``ieee``; 16-bit dots ignore it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _meta(dtype: torch.dtype, R: int) -> dict:
    return {
        "IS_FP64": dtype == torch.float64,
        "DOT_PRECISION": dot_precision(dtype),
        "BLOCK_R": max(16, _next_pow2(R)),
    }


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so the split paths run in the CPU tests
    return torch.cuda.get_device_properties(device).multi_processor_count


def splits_for(programs: int, length: int, device: torch.device) -> int:
    """``grids.splits_for`` on ``device``'s SM count."""
    return grids.splits_for(programs, length, _sm_count(device))


class _Launch:
    """Launches of one autotuned kernel: the first of each tuning key through Triton's autotuner (which tunes
    and compiles), the later ones straight to the tuned config's JIT dispatch. The autotuner rebuilds its key
    from every argument on every launch, about a third of the host time of a launch; here the key is read from
    the same arguments by position, with the dtype of every tensor argument, as the autotuner forms it."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.name = kernel.fn.__name__
        self.positional = [kernel.arg_names.index(k) for k in kernel.keys]  # constexpr keys come as keywords
        self.tuned: dict[tuple, object] = {}
        self.timings: dict[tuple, dict] = {}  # key -> each config's [p50, p20, p80] ms, where the autotuner timed
        _LAUNCHES[self.name] = self

    def __call__(self, grid, *args, **meta) -> None:
        key = tuple(args[i] if i < len(args) else meta[self.kernel.arg_names[i]] for i in self.positional)
        key += tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
        config = self.tuned.get(key)
        if config is None:
            self.kernel.best_config = None  # set again by the autotuner's run (not by aot's compile-only one)
            self.kernel.configs_timings = None
            self.kernel[grid](*args, **meta)
            if self.kernel.best_config is not None:
                self.tuned[key] = self.kernel.best_config
                if isinstance(getattr(self.kernel, "configs_timings", None), dict):  # (not from Triton's disk cache)
                    self.timings[key] = self.kernel.configs_timings
        else:
            self.kernel.fn.run(*args, grid=grid, warmup=False, **meta, **config.all_kwargs())


_LAUNCHES: dict[str, _Launch] = {}


def _config_record(config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def _key_record(key: tuple) -> list:
    return [str(k) if isinstance(k, torch.dtype) else k for k in key]


def tuned_records() -> list[dict]:
    """Every tuned launch so far: kernel, key, the winning config and, where the autotuner timed them, every
    config's p50/p20/p80 ms (JSON-ready; ``preseed`` reads the same records back)."""
    out = []
    for name, launch in _LAUNCHES.items():
        for key, config in launch.tuned.items():
            timings = [{**_config_record(c), "ms_p50_p20_p80": list(t) if isinstance(t, (list, tuple)) else [t]}
                       for c, t in (launch.timings.get(key) or {}).items()]  # fmt: skip
            out.append({"kernel": name, "key": _key_record(key), "winner": _config_record(config),
                        "timings": timings})  # fmt: skip
    return out


def preseed(records: list[dict]) -> int:
    """Take the winners of earlier tuning (``tuned_records()`` of another run, as ``ADALORA_KERNELS_TUNED=<file>``
    names) as this process's tuned launches: those keys compile only their winner and time nothing. Returns how
    many were taken."""
    taken = 0
    for record in records:
        launch = _LAUNCHES.get(record["kernel"])
        if launch is None:
            continue
        key = tuple(getattr(torch, k.removeprefix("torch.")) if isinstance(k, str) and k.startswith("torch.") else k
                    for k in record["key"])  # fmt: skip
        w = record["winner"]
        launch.tuned[key] = triton.Config(w["kwargs"], num_warps=w["num_warps"], num_stages=w["num_stages"])
        taken += 1
    return taken


def _dropout_args(dropout_p: float, seed: int) -> tuple:
    return (seed, dropout_p, 1.0 / (1.0 - dropout_p))


def _split_buffer(out: torch.Tensor, splits: int, acc_dtype: torch.dtype) -> torch.Tensor:
    """``out`` viewed as one split, or a buffer of float partials for ``splits`` of them."""
    if splits == 1:
        return out.unsqueeze(0)
    return torch.empty(splits, *out.shape, dtype=acc_dtype, device=out.device)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_launch_rank_reduce_bwd = _Launch(_rank_reduce_bwd_kernel)
_launch_shrink_fwd = _Launch(_shrink_fwd_kernel)
_launch_fused_fwd = _Launch(_fused_fwd_kernel)
_launch_dt_bwd = _Launch(_dt_bwd_kernel)
_launch_fused_dx_bwd = _Launch(_fused_dx_bwd_kernel)
if os.environ.get("ADALORA_KERNELS_TUNED"):  # a later lease compiles only the winners of an earlier one
    with open(os.environ["ADALORA_KERNELS_TUNED"]) as _f:
        preseed(json.load(_f))


def dropout_keep_mask(shape: tuple[int, int], dropout_p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The mask these kernels apply for ``seed`` to an input of ``shape`` (rows, in)."""
    M, K = shape
    out = torch.empty(M, K, dtype=torch.bool, device=device)
    grid = (_cdiv(M, 32), _cdiv(K, 32))
    _keep_mask_kernel[grid](out.view(torch.int8), M, K, seed, dropout_p, BLOCK_M=32, BLOCK_K=32)  # 0/1 bytes
    return out


def _rank_reduce(a, lam, b, out, dropout_p, seed, meta):
    """``out (R, K) = (a · λ)ᵀ drop(b)`` over all rows, split over row ranges where columns are few."""
    M, K = b.shape
    R = a.shape[1]
    splits = splits_for(_cdiv(K, _ROW_TILE), M, b.device)
    part = _split_buffer(out, splits, _acc_dtype(b.dtype))
    _launch_rank_reduce_bwd(lambda c: (_cdiv(K, c["BLOCK_K"]), splits),
        a, lam if lam is not None else a, b, part, M, K, R, m_bucket(M), splits,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), part.stride(0), part.stride(1), part.stride(2),
        *_dropout_args(dropout_p, seed), HAS_DROPOUT=dropout_p > 0.0, HAS_LAM=lam is not None, **meta,
    )  # fmt: skip
    if splits > 1:
        out.copy_(part.sum(0))


def _refuse_interpreted_bfloat16(dtype: torch.dtype) -> None:
    if INTERPRET and dtype == torch.bfloat16:
        raise TypeError(
            "x: bfloat16 on the Triton interpreter (TRITON_INTERPRET=1) is refused: the interpreter computes "
            "bfloat16 tl.dot wrongly without an error; use float16/float32 there, or another backend"
        )


@functools.cache
def _hopper():
    """The Hopper GEMMs (``hopper.py``), which import from this module: imported on first use."""
    from . import hopper

    return hopper


def linear_forward(x2, weight, bias, P, lam_eff, Q, dropout_p, seed):
    _refuse_interpreted_bfloat16(x2.dtype)
    M, K = x2.shape
    N, R = P.shape
    meta = _meta(x2.dtype, R)
    y = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    t = torch.empty(M, R, dtype=x2.dtype, device=x2.device)
    if R > 0 and M > 0:
        splits = splits_for(_cdiv(M, _ROW_TILE), K, x2.device)
        part = _split_buffer(t, splits, _acc_dtype(x2.dtype))
        _launch_shrink_fwd(lambda c: (_cdiv(M, c["BLOCK_M"]), splits),
            x2, Q, part, M, K, R, m_bucket(M), splits,
            x2.stride(0), x2.stride(1), Q.stride(0), Q.stride(1), part.stride(0), part.stride(1), part.stride(2),
            *_dropout_args(dropout_p, seed), HAS_DROPOUT=dropout_p > 0.0, **meta,
        )  # fmt: skip
        if splits > 1:
            t.copy_(part.sum(0))
    if M > 0 and _hopper().usable(x2.dtype, x2, weight, y):
        _hopper().forward_gemm(x2, weight, bias, t, P, lam_eff, y, meta)
    elif M > 0:
        _launch_fused_fwd(lambda c: (_cdiv(M, c["BLOCK_M"]) * _cdiv(N, c["BLOCK_N"]),),
            x2, weight, bias if bias is not None else y, t, P, lam_eff, y, M, N, K, R, m_bucket(M),
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), t.stride(0), t.stride(1),
            P.stride(0), P.stride(1), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, HAS_ADAPTER=R > 0, **meta,
        )  # fmt: skip
    return y, t


def linear_backward(g2, x2, weight, P, lam_eff, Q, t, dropout_p, seed, need_dx, need_adapter):
    _refuse_interpreted_bfloat16(x2.dtype)
    M, K = x2.shape
    N, R = P.shape
    meta = _meta(x2.dtype, R)
    acc_dtype = _acc_dtype(x2.dtype)
    u = torch.empty(M, R, dtype=acc_dtype, device=x2.device)
    # one row of dλ partials per row block of the smallest tile any config uses
    dlam_part = torch.zeros(_cdiv(M, 16), R, dtype=acc_dtype, device=x2.device)
    has_adapter = R > 0 and M > 0
    if has_adapter:
        _launch_dt_bwd(lambda c: (_cdiv(M, c["BLOCK_M"]),),
            g2, P, t, lam_eff, u, dlam_part, M, N, R, m_bucket(M),
            g2.stride(0), g2.stride(1), P.stride(0), P.stride(1), t.stride(0), t.stride(1),
            NEED_ADAPTER=need_adapter, **meta,
        )  # fmt: skip
    dx = None
    if need_dx:
        dx = torch.empty(M, K, dtype=x2.dtype, device=x2.device)
        if M > 0 and _hopper().usable(x2.dtype, g2, weight, dx):
            _hopper().dx_gemm(g2, weight, u, Q, dx, _dropout_args(dropout_p, seed), dropout_p > 0.0, has_adapter, meta)
        elif M > 0:
            _launch_fused_dx_bwd(lambda c: (_cdiv(M, c["BLOCK_M"]) * _cdiv(K, c["BLOCK_N"]),),
                g2, weight, u, Q, dx, M, N, K, R, m_bucket(M),
                g2.stride(0), g2.stride(1), weight.stride(0), weight.stride(1), Q.stride(0), Q.stride(1),
                dx.stride(0), dx.stride(1), *_dropout_args(dropout_p, seed),
                HAS_DROPOUT=dropout_p > 0.0, HAS_ADAPTER=has_adapter, **meta,
            )  # fmt: skip
    if not need_adapter:
        return dx, None, None, None
    new = torch.empty if has_adapter else torch.zeros  # the reductions write every element (no memset launch)
    dQ = new(R, K, dtype=x2.dtype, device=x2.device)
    dP = new(N, R, dtype=P.dtype, device=x2.device)
    if has_adapter:
        _rank_reduce(u, None, x2, dQ, dropout_p, seed, meta)
        _rank_reduce(t, lam_eff, g2, dP.t(), 0.0, 0, meta)  # dPᵀ (R, N), written through dP's strides
    return dx, dP, dlam_part.sum(0).to(lam_eff.dtype), dQ
