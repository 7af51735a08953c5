"""Triton kernels of the fused AdaLoRA linear layer (DESIGN §4) and their launchers.

Forward:  (1) shrink ``t = drop(x) Qᵀ``;  (2) ``y = x Wᵀ + b + (t · λeff) Pᵀ``, adapter in the epilogue.
Backward: (3) one pass over g: ``u = (g P) · λeff``, ``dP = gᵀ (t · λeff)``, ``dλeff = Σ_rows (g P) ⊙ t``;
          (4) ``dx = g W + drop'(u Q)`` with the adapter in the epilogue;  (5) ``dQ = uᵀ drop(x)``.

Dropout: element (row, col) of the M×in input is kept when a uniform drawn from
``philox(seed, col // 4, row)`` (word ``col % 4``) is ``>= p``, so the mask depends only on the seed and the
element's position and is regenerated bit-for-bit in backward: it is never stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import get_autotune_configs, get_rowblock_configs, prune_by_shared_memory

_PRUNE = {"early_config_prune": prune_by_shared_memory}

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
def _load_tile(ptr, rows, cols, stride_rows, stride_cols, n_rows, n_cols):
    """The ``rows × cols`` tile at ``ptr`` (a transposed one by swapping rows/cols and their strides), zero
    outside ``n_rows × n_cols``."""
    return tl.load(
        ptr + rows[:, None] * stride_rows + cols[None, :] * stride_cols,
        mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols),
        other=0.0,
    )


@triton.jit
def _store_tile(ptr, rows, cols, stride_rows, stride_cols, n_rows, n_cols, value):
    tl.store(
        ptr + rows[:, None] * stride_rows + cols[None, :] * stride_cols,
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


# ----------------------------------------------------------------------------------------------- kernels


@triton.autotune(configs=get_rowblock_configs(), key=["M", "K", "BLOCK_R", "HAS_DROPOUT"], prune_configs_by=_PRUNE)
@triton.jit
def _shrink_fwd_kernel(
    # pointers
    x_ptr, q_ptr, t_ptr,
    # sizes
    M, K, R,
    # strides
    stride_xm, stride_xk, stride_qr, stride_qk, stride_tm, stride_tr,
    # dropout
    seed, p, keep_scale,
    # meta
    HAS_DROPOUT: tl.constexpr, IS_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float64 if IS_FP64 else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = _load_tile(x_ptr, rows, cols, stride_xm, stride_xk, M, K)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, rows, k0, p, BLOCK_M, BLOCK_K), x, 0.0)
        q = _load_tile(q_ptr, cols, rr, stride_qk, stride_qr, K, R)
        acc += tl.dot(x, q, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        acc = acc * keep_scale
    _store_tile(t_ptr, rows, rr, stride_tm, stride_tr, M, R, acc.to(t_ptr.dtype.element_ty))


@triton.autotune(
    configs=get_autotune_configs(), key=["M", "N", "K", "BLOCK_R", "HAS_BIAS", "HAS_ADAPTER"], prune_configs_by=_PRUNE
)
@triton.jit
def _fused_fwd_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, t_ptr, p_ptr, lam_ptr, y_ptr,
    # sizes: x (M, K), W (N, K), t (M, R), P (N, R), y (M, N)
    M, N, K, R,
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
    if HAS_ADAPTER:  # epilogue: + (t · λeff) Pᵀ, an r-wide product in the same tile
        rr = tl.arange(0, BLOCK_R)
        t = _load_tile(t_ptr, rows, rr, stride_tm, stride_tr, M, R)
        lam = tl.load(lam_ptr + rr, mask=rr < R, other=0.0).to(acc_dtype)
        u = (t.to(acc_dtype) * lam[None, :]).to(x_ptr.dtype.element_ty)
        pt = _load_tile(p_ptr, rr, rn, stride_pr, stride_pn, R, N)
        acc += tl.dot(u, pt, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(acc_dtype)[None, :]
    _store_tile(y_ptr, rows, rn, stride_ym, stride_yn, M, N, acc.to(y_ptr.dtype.element_ty))


@triton.autotune(
    configs=get_rowblock_configs(),
    key=["M", "N", "BLOCK_R"],
    reset_to_zero=["dp_ptr", "dlam_ptr"],
    prune_configs_by=_PRUNE,
)
@triton.jit
def _dt_dp_bwd_kernel(
    # pointers: g (M, N), P (N, R), t (M, R), λeff (R); outputs u (M, R), dP (N, R), dλeff (R), accumulated
    g_ptr, p_ptr, t_ptr, lam_ptr, u_ptr, dp_ptr, dlam_ptr,
    # sizes
    M, N, R,
    # strides (u, dP contiguous)
    stride_gm, stride_gn, stride_pn, stride_pr, stride_tm, stride_tr,
    # meta
    NEED_ADAPTER: tl.constexpr, IS_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # BLOCK_K tiles the out dimension N here: one pass over g's row block for dt, dP and dλ
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    t = _load_tile(t_ptr, rows, rr, stride_tm, stride_tr, M, R).to(acc_dtype)
    lam = tl.load(lam_ptr + rr, mask=rr < R, other=0.0).to(acc_dtype)
    t_lam = (t * lam[None, :]).to(g_ptr.dtype.element_ty)
    dt = tl.zeros([BLOCK_M, BLOCK_R], dtype=acc_dtype)
    for n0 in range(0, N, BLOCK_K):
        rn = n0 + tl.arange(0, BLOCK_K)
        g = _load_tile(g_ptr, rows, rn, stride_gm, stride_gn, M, N)
        p = _load_tile(p_ptr, rn, rr, stride_pn, stride_pr, N, R)
        dt += tl.dot(g, p, input_precision=DOT_PRECISION)
        if NEED_ADAPTER:
            dp = tl.dot(tl.trans(g), t_lam, input_precision=DOT_PRECISION)
            tl.atomic_add(
                dp_ptr + rn[:, None] * R + rr[None, :],
                dp,
                mask=(rn[:, None] < N) & (rr[None, :] < R),
                sem="relaxed",
            )
    if NEED_ADAPTER:
        tl.atomic_add(dlam_ptr + rr, tl.sum(dt * t, axis=0), mask=rr < R, sem="relaxed")
    _store_tile(u_ptr, rows, rr, R, 1, M, R, dt * lam[None, :])


@triton.autotune(configs=get_autotune_configs(), key=["M", "N", "K", "BLOCK_R", "HAS_DROPOUT"], prune_configs_by=_PRUNE)
@triton.jit
def _fused_dx_bwd_kernel(
    # pointers: g (M, N), W (N, K), u (M, R), Q (R, K), dx (M, K)
    g_ptr, w_ptr, u_ptr, q_ptr, dx_ptr,
    # sizes
    M, N, K, R,
    # strides (u contiguous)
    stride_gm, stride_gn, stride_wn, stride_wk, stride_qr, stride_qk, stride_dxm, stride_dxk,
    # dropout
    seed, p, keep_scale,
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
    if HAS_ADAPTER:  # epilogue: + drop'(u Q)
        rr = tl.arange(0, BLOCK_R)
        u = _load_tile(u_ptr, rows, rr, R, 1, M, R)
        q = _load_tile(q_ptr, rr, cols, stride_qr, stride_qk, R, K)
        adapter = tl.dot(u.to(q.dtype), q, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _keep_mask(seed, rows, pid_k * BLOCK_N, p, BLOCK_M, BLOCK_N)
            adapter = tl.where(keep, adapter * keep_scale, 0.0)
        acc += adapter
    _store_tile(dx_ptr, rows, cols, stride_dxm, stride_dxk, M, K, acc.to(dx_ptr.dtype.element_ty))


@triton.autotune(configs=get_rowblock_configs(), key=["M", "K", "BLOCK_R", "HAS_DROPOUT"], prune_configs_by=_PRUNE)
@triton.jit
def _dq_bwd_kernel(
    # pointers: x (M, K), u (M, R), dQ (R, K)
    x_ptr, u_ptr, dq_ptr,
    # sizes
    M, K, R,
    # strides (u contiguous)
    stride_xm, stride_xk, stride_dqr, stride_dqk,
    # dropout
    seed, p, keep_scale,
    # meta
    HAS_DROPOUT: tl.constexpr, IS_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float64 if IS_FP64 else tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        x = _load_tile(x_ptr, rows, cols, stride_xm, stride_xk, M, K)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, rows, pid * BLOCK_K, p, BLOCK_M, BLOCK_K), x, 0.0)
        u = _load_tile(u_ptr, rows, rr, R, 1, M, R)
        acc += tl.dot(tl.trans(u.to(x.dtype)), x, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        acc = acc * keep_scale
    _store_tile(dq_ptr, rr, cols, stride_dqr, stride_dqk, R, K, acc.to(dq_ptr.dtype.element_ty))


@triton.jit
def _keep_mask_kernel(out_ptr, M, K, seed, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1).to(tl.int64) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    keep = _keep_mask(seed, rows, col0, p, BLOCK_M, BLOCK_K)
    _store_tile(out_ptr, rows, cols, K, 1, M, K, keep.to(tl.int8))


# ----------------------------------------------------------------------------------------------- launchers


def _meta(dtype: torch.dtype, R: int) -> dict:
    return {
        "IS_FP64": dtype == torch.float64,
        "DOT_PRECISION": "ieee" if dtype in (torch.float32, torch.float64) else "tf32",
        "BLOCK_R": max(16, triton.next_power_of_2(R)),
    }


def _dropout_args(dropout_p: float, seed: int) -> tuple:
    return (seed, dropout_p, 1.0 / (1.0 - dropout_p))


def dropout_keep_mask(shape: tuple[int, int], dropout_p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The mask these kernels apply for ``seed`` to an input of ``shape`` (rows, in)."""
    M, K = shape
    out = torch.empty(M, K, dtype=torch.int8, device=device)
    grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
    _keep_mask_kernel[grid](out, M, K, seed, dropout_p, BLOCK_M=32, BLOCK_K=32)
    return out.bool()


def linear_forward(x2, weight, bias, P, lam_eff, Q, dropout_p, seed):
    M, K = x2.shape
    N, R = P.shape
    meta = _meta(x2.dtype, R)
    y = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    t = torch.empty(M, R, dtype=x2.dtype, device=x2.device)
    if R > 0 and M > 0:
        _shrink_fwd_kernel[lambda c: (triton.cdiv(M, c["BLOCK_M"]),)](
            x2, Q, t, M, K, R,
            x2.stride(0), x2.stride(1), Q.stride(0), Q.stride(1), t.stride(0), t.stride(1),
            *_dropout_args(dropout_p, seed), HAS_DROPOUT=dropout_p > 0.0, **meta,
        )  # fmt: skip
    if M > 0:
        _fused_fwd_kernel[lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),)](
            x2, weight, bias if bias is not None else y, t, P, lam_eff, y, M, N, K, R,
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), t.stride(0), t.stride(1),
            P.stride(0), P.stride(1), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, HAS_ADAPTER=R > 0, **meta,
        )  # fmt: skip
    return y, t


def linear_backward(g2, x2, weight, P, lam_eff, Q, t, dropout_p, seed, need_dx, need_adapter):
    M, K = x2.shape
    N, R = P.shape
    meta = _meta(x2.dtype, R)
    acc_dtype = torch.float64 if x2.dtype == torch.float64 else torch.float32
    u = torch.empty(M, R, dtype=acc_dtype, device=x2.device)
    dP = torch.zeros(N, R, dtype=acc_dtype, device=x2.device)
    dlam = torch.zeros(R, dtype=acc_dtype, device=x2.device)
    has_adapter = R > 0 and M > 0
    if has_adapter:
        _dt_dp_bwd_kernel[lambda c: (triton.cdiv(M, c["BLOCK_M"]),)](
            g2, P, t, lam_eff, u, dP, dlam, M, N, R,
            g2.stride(0), g2.stride(1), P.stride(0), P.stride(1), t.stride(0), t.stride(1),
            NEED_ADAPTER=need_adapter, **meta,
        )  # fmt: skip
    dx = dQ = None
    if need_dx:
        dx = torch.empty(M, K, dtype=x2.dtype, device=x2.device)
        if M > 0:
            _fused_dx_bwd_kernel[lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(K, c["BLOCK_N"]),)](
                g2, weight, u, Q, dx, M, N, K, R,
                g2.stride(0), g2.stride(1), weight.stride(0), weight.stride(1), Q.stride(0), Q.stride(1),
                dx.stride(0), dx.stride(1), *_dropout_args(dropout_p, seed),
                HAS_DROPOUT=dropout_p > 0.0, HAS_ADAPTER=has_adapter, **meta,
            )  # fmt: skip
    if need_adapter:
        dQ = torch.zeros(R, K, dtype=x2.dtype, device=x2.device)
        if has_adapter:
            _dq_bwd_kernel[lambda c: (triton.cdiv(K, c["BLOCK_K"]),)](
                x2, u, dQ, M, K, R, x2.stride(0), x2.stride(1), dQ.stride(0), dQ.stride(1),
                *_dropout_args(dropout_p, seed), HAS_DROPOUT=dropout_p > 0.0, **meta,
            )  # fmt: skip
        return dx, dP.to(P.dtype), dlam.to(lam_eff.dtype), dQ
    return dx, None, None, None
