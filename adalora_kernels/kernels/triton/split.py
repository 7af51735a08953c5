"""The split route (DESIGN §4 route b): the two big GEMMs in cuBLAS, the adapter's memory-bound work in Triton
passes that each read one big tensor once, and the launchers. Registered as the ``triton_split`` backend.

Forward:  (1) over x: ``t = drop(x) Qᵀ`` (saved) and ``y₀ = b + (t · λeff) Pᵀ`` written into y's buffer;
          then ``y.addmm_(x, Wᵀ)`` (cuBLAS, beta = 1: y₀ is its C, read in its epilogue).
Backward: (2) over g: ``dt = g P`` and ``dPᵀ = (t · λeff)ᵀ g`` from the same tiles (t is saved, so both come
          from one read of g); then one launch on the r-wide results: ``u = dt · λeff`` and the row blocks'
          ``Σ dt ⊙ t``; (3) over x: ``dx₀ = drop'(u Q)`` written into dx's buffer and ``dQ = uᵀ drop(x)`` from the
          same tiles; then ``dx.addmm_(g, W)`` (cuBLAS, beta = 1), and one launch that sums the partials of dQ,
          dPᵀ (into dP's layout) and dλeff into the parameters' dtypes (with atomics: casts the accumulators).

Every reduction over rows or columns that is split across programs has two forms, chosen per call. Where
``torch.are_deterministic_algorithms_enabled()`` (``torch.use_deterministic_algorithms(True)``), each split writes
one partial into a buffer of its own, summed afterwards in a fixed order: no atomics, bitwise reproducible. Otherwise
(torch's default) the splits add into one zeroed float accumulator with relaxed atomics (``tl.atomic_add``): no
partial buffers, and the backward needs no launch between its two passes (pass (3) scales dt by λeff as it loads it,
and pass (2) adds its ``Σ dt ⊙ t`` into dλ); the sums' order, and so their last bits, vary run to run, as for
torch's own atomic kernels. Programs form a grid of (column split, row split), the column split the faster axis so
that programs sharing rows run together (a row block re-read by another split comes from L2); there are about two
per SM at any token count. The dropout mask is the ``triton`` backend's (``adalora_linear._keep_mask``): a run may
change route.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import grids
from ..torch_composite import triplet_scores
from . import adalora_linear as fused
from . import unavailable_reason as _triton_unavailable_reason
from .adalora_linear import (
    _UNSPECIALISED,
    _acc_dtype,
    _cdiv,
    _dropout_args,
    _keep_mask,
    _Launch,
    _load_tile,
    _meta,
    _offsets,
    _refuse_interpreted_bfloat16,
    _scaled,
    _sm_count,
    _store_tile,
    m_bucket,
)
from .config import INTERPRET, SPLIT_MAX_R, get_split_configs, split_prune
from .sensitivity import mask_lams, sensitivity_update

# ----------------------------------------------------------------------------------------------- kernels


@triton.autotune(
    configs=get_split_configs(),
    key=["M_BUCKET", "N", "K", "BLOCK_R", "HAS_DROPOUT", "HAS_BIAS", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": split_prune("fwd")},
)
@triton.jit(do_not_specialize=_UNSPECIALISED)
def _split_fwd_kernel(
    # pointers: x (M, K), Q (R, K), P (N, R), λeff (R), b (N), outputs t (M, R) and y (M, N)
    x_ptr, q_ptr, p_ptr, lam_ptr, b_ptr, t_ptr, y_ptr,
    # sizes
    M, N, K, R, M_BUCKET,
    # strides
    stride_xm, stride_xk, stride_qr, stride_qk, stride_pn, stride_pr, stride_tm, stride_tr, stride_ym, stride_yn,
    # dropout
    seed: tl.int64, p, keep_scale: tl.float64,
    # meta
    HAS_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, IS_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # program (column split c, row block m): t of its rows over all of K, then y₀ over its share of N (BLOCK_K
    # tiles N in the second loop); column splits > 1 recompute t (their x rows come from L2), split 0 stores it
    c = tl.program_id(0)
    splits = tl.num_programs(0)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=acc_dtype)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = _load_tile(x_ptr, rows, cols, stride_xm, stride_xk, M, K)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, rows, k0, p, BLOCK_M, BLOCK_K), x, 0.0)
        q = _load_tile(q_ptr, cols, rr, stride_qk, stride_qr, K, R)
        acc += tl.dot(x, q, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        acc = _scaled(acc, keep_scale, IS_FP64)
    t = acc.to(t_ptr.dtype.element_ty)
    if c == 0:
        _store_tile(t_ptr, rows, rr, stride_tm, stride_tr, M, R, t)
    lam = tl.load(lam_ptr + rr, mask=rr < R, other=0.0).to(acc_dtype)
    u = (t.to(acc_dtype) * lam[None, :]).to(x_ptr.dtype.element_ty)
    n_per_split = tl.cdiv(tl.cdiv(N, splits), BLOCK_K) * BLOCK_K
    for n0 in range(c * n_per_split, min(N, (c + 1) * n_per_split), BLOCK_K):
        rn = n0 + tl.arange(0, BLOCK_K)
        pt = _load_tile(p_ptr, rr, rn, stride_pr, stride_pn, R, N)
        y = tl.dot(u, pt, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(acc_dtype)[None, :]
        _store_tile(y_ptr, rows, rn, stride_ym, stride_yn, M, N, y.to(y_ptr.dtype.element_ty))


@triton.jit
def _add_tile(ptr, rows, cols, stride_rows, stride_cols, n_rows, n_cols, value):
    """``value`` added into the ``rows × cols`` tile at ``ptr`` with relaxed atomics (the order of the additions is
    not fixed: only where deterministic algorithms are off)."""
    tl.atomic_add(
        ptr + _offsets(rows, cols, stride_rows, stride_cols),
        value,
        mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols),
        sem="relaxed",
    )


@triton.autotune(
    configs=get_split_configs(),
    key=["M_BUCKET", "N", "BLOCK_R", "NEED_DP", "ATOMIC", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": split_prune("g")},
    reset_to_zero=["dt_ptr", "dp_ptr", "dlam_ptr"],  # the atomic form accumulates: each timed run starts from zero
)
@triton.jit(do_not_specialize=_UNSPECIALISED)
def _split_g_bwd_kernel(
    # pointers: g (M, N), P (N, R), t (M, R), λeff (R); outputs in the accumulator dtype, contiguous: dt and dPᵀ as
    # partials (C, M, R) and (S, R, N), or (ATOMIC) accumulators (M, R), (R, N) and dλeff (R)
    g_ptr, p_ptr, t_ptr, lam_ptr, dt_ptr, dp_ptr, dlam_ptr,
    # sizes
    M, N, R, M_BUCKET,
    # strides
    stride_gm, stride_gn, stride_pn, stride_pr, stride_tm, stride_tr,
    # meta
    NEED_DP: tl.constexpr, ATOMIC: tl.constexpr, IS_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # program (column split c, row split s); BLOCK_K tiles N. Each g tile is read once and feeds both products:
    # dt of its rows (partial over c) and dPᵀ of its columns (partial over s); with atomics, also Σ dt ⊙ t
    c = tl.program_id(0)
    s = tl.program_id(1)
    n_per_split = tl.cdiv(tl.cdiv(N, tl.num_programs(0)), BLOCK_K) * BLOCK_K
    m_per_split = tl.cdiv(tl.cdiv(M, tl.num_programs(1)), BLOCK_M) * BLOCK_M
    rr = tl.arange(0, BLOCK_R)
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    lam = tl.load(lam_ptr + rr, mask=rr < R, other=0.0).to(acc_dtype)
    n_start = c * n_per_split
    if ATOMIC:
        dt_part = dt_ptr
        dp_part = dp_ptr
        dl = tl.zeros([BLOCK_R], dtype=acc_dtype)
    else:
        dt_part = dt_ptr + c.to(tl.int64) * M * R
        dp_part = dp_ptr + s.to(tl.int64) * R * N
        if n_start >= N:  # no column tile for this split (a tile wider than N / splits): its dt slice holds zeros
            for m0 in range(s * m_per_split, min(M, (s + 1) * m_per_split), BLOCK_M):
                rows = m0 + tl.arange(0, BLOCK_M)
                _store_tile(dt_part, rows, rr, R, 1, M, R, tl.zeros([BLOCK_M, BLOCK_R], dtype=acc_dtype))
    for n0 in range(n_start, min(N, n_start + n_per_split), BLOCK_K):
        rn = n0 + tl.arange(0, BLOCK_K)
        pt = _load_tile(p_ptr, rn, rr, stride_pn, stride_pr, N, R)
        dp = tl.zeros([BLOCK_R, BLOCK_K], dtype=acc_dtype)
        for m0 in range(s * m_per_split, min(M, (s + 1) * m_per_split), BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            g = _load_tile(g_ptr, rows, rn, stride_gm, stride_gn, M, N)
            dt = tl.dot(g, pt, input_precision=DOT_PRECISION)
            if ATOMIC:
                _add_tile(dt_part, rows, rr, R, 1, M, R, dt)
            else:
                if n0 != n_start:  # the program's own slice: read back what its earlier column tiles added
                    dt += _load_tile(dt_part, rows, rr, R, 1, M, R)
                _store_tile(dt_part, rows, rr, R, 1, M, R, dt)
            if NEED_DP:
                t = _load_tile(t_ptr, rows, rr, stride_tm, stride_tr, M, R).to(acc_dtype)
                tl_ = (t * lam[None, :]).to(g_ptr.dtype.element_ty)
                dp += tl.dot(tl.trans(tl_), g, input_precision=DOT_PRECISION)
                if ATOMIC:  # this tile's share of dλeff = Σ dt ⊙ t (dt is linear in the column tiles)
                    dl += tl.sum(dt * t, axis=0)
        if NEED_DP:
            if ATOMIC:
                _add_tile(dp_part, rr, rn, N, 1, R, N, dp)
            else:
                _store_tile(dp_part, rr, rn, N, 1, R, N, dp)
    if ATOMIC and NEED_DP:
        tl.atomic_add(dlam_ptr + rr, dl, mask=rr < R, sem="relaxed")


@triton.autotune(
    configs=get_split_configs(),
    key=["M_BUCKET", "K", "BLOCK_R", "HAS_DROPOUT", "WRITE_DX", "NEED_DQ", "ATOMIC", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": split_prune("x")},
    reset_to_zero=["dq_ptr"],  # the atomic form accumulates: each timed run starts from zero
)
@triton.jit(do_not_specialize=_UNSPECIALISED)
def _split_x_bwd_kernel(
    # pointers: x (M, K), u (M, R, accumulator dtype, contiguous; ATOMIC: dt, scaled by λeff here), λeff (R), Q (R, K);
    # outputs dx₀ (M, K) and dQ as partials (S, R, K) or (ATOMIC) an accumulator (R, K)
    x_ptr, u_ptr, lam_ptr, q_ptr, dx_ptr, dq_ptr,
    # sizes
    M, K, R, M_BUCKET,
    # strides
    stride_xm, stride_xk, stride_qr, stride_qk, stride_dxm, stride_dxk,
    # dropout
    seed: tl.int64, p, keep_scale: tl.float64,
    # meta
    HAS_DROPOUT: tl.constexpr, WRITE_DX: tl.constexpr, NEED_DQ: tl.constexpr, ATOMIC: tl.constexpr,
    IS_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # program (column split c, row split s) over x's columns K: the mask of a tile drawn once for both products
    c = tl.program_id(0)
    s = tl.program_id(1)
    k_per_split = tl.cdiv(tl.cdiv(K, tl.num_programs(0)), BLOCK_K) * BLOCK_K
    m_per_split = tl.cdiv(tl.cdiv(M, tl.num_programs(1)), BLOCK_M) * BLOCK_M
    rr = tl.arange(0, BLOCK_R)
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    if ATOMIC:
        lam = tl.load(lam_ptr + rr, mask=rr < R, other=0.0).to(acc_dtype)
        dq_part = dq_ptr
    else:
        dq_part = dq_ptr + s.to(tl.int64) * R * K
    for k0 in range(c * k_per_split, min(K, (c + 1) * k_per_split), BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        q = _load_tile(q_ptr, rr, cols, stride_qr, stride_qk, R, K)
        dq = tl.zeros([BLOCK_R, BLOCK_K], dtype=acc_dtype)
        for m0 in range(s * m_per_split, min(M, (s + 1) * m_per_split), BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            u = _load_tile(u_ptr, rows, rr, R, 1, M, R)
            if ATOMIC:
                u = u * lam[None, :]
            u = u.to(x_ptr.dtype.element_ty)
            if HAS_DROPOUT:
                keep = _keep_mask(seed, rows, k0, p, BLOCK_M, BLOCK_K)
            if WRITE_DX:
                a = tl.dot(u, q, input_precision=DOT_PRECISION)
                if HAS_DROPOUT:
                    a = tl.where(keep, _scaled(a, keep_scale, IS_FP64), 0.0)
                _store_tile(dx_ptr, rows, cols, stride_dxm, stride_dxk, M, K, a.to(dx_ptr.dtype.element_ty))
            if NEED_DQ:
                x = _load_tile(x_ptr, rows, cols, stride_xm, stride_xk, M, K)
                if HAS_DROPOUT:
                    x = tl.where(keep, x, 0.0)
                dq += tl.dot(tl.trans(u), x, input_precision=DOT_PRECISION)
        if NEED_DQ:
            if HAS_DROPOUT:
                dq = _scaled(dq, keep_scale, IS_FP64)
            if ATOMIC:
                _add_tile(dq_part, rr, cols, K, 1, R, K, dq)
            else:
                _store_tile(dq_part, rr, cols, K, 1, R, K, dq)


FINALIZE_ROWS = grids.FINALIZE_ROWS  # rows per program of the dt finalize (and so the count of its dλ partials)
_FINALIZE_COLUMNS = 128  # columns of dQ / dPᵀ per program of the last finalize


@triton.autotune(
    configs=[triton.Config({"BLOCK_M": FINALIZE_ROWS}, num_warps=4, num_stages=1)],
    key=["M_BUCKET", "BLOCK_R", "NEED_DLAM", "IS_FP64"],
)
@triton.jit(do_not_specialize=_UNSPECIALISED)
def _split_dt_finalize_kernel(
    # pointers: dt partials (C, M, R), t (M, R), λeff (R); outputs u = dt·λeff (M, R) and dλ partials (B, R)
    dt_ptr, t_ptr, lam_ptr, u_ptr, dlam_ptr,
    # sizes
    M, R, C, M_BUCKET,
    # strides of t (the rest contiguous)
    stride_tm, stride_tr,
    # meta
    NEED_DLAM: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # one row block: dt summed over the column splits in their order, u written, and Σ_rows dt ⊙ t of the block
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    dt = tl.zeros([BLOCK_M, BLOCK_R], dtype=acc_dtype)
    part = dt_ptr
    for _ in range(C):
        dt += _load_tile(part, rows, rr, R, 1, M, R)
        part += M.to(tl.int64) * R
    lam = tl.load(lam_ptr + rr, mask=rr < R, other=0.0).to(acc_dtype)
    _store_tile(u_ptr, rows, rr, R, 1, M, R, dt * lam[None, :])
    if NEED_DLAM:
        t = _load_tile(t_ptr, rows, rr, stride_tm, stride_tr, M, R).to(acc_dtype)
        tl.store(dlam_ptr + pid * R + rr, tl.sum(dt * t, axis=0), mask=rr < R)


@triton.jit
def _sum_partials(ptr, rr, cols, R, L, S, acc_dtype: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """The ``rr × cols`` tile of S contiguous (R, L) partials at ``ptr``, summed in their order."""
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=acc_dtype)
    for _ in range(S):
        acc += _load_tile(ptr, rr, cols, L, 1, R, L)
        ptr += R * L
    return acc


@triton.autotune(
    configs=[triton.Config({"BLOCK_K": _FINALIZE_COLUMNS}, num_warps=4, num_stages=1)],
    key=["M_BUCKET", "BLOCK_R", "IS_FP64"],
)
@triton.jit(do_not_specialize=_UNSPECIALISED)
def _split_finalize_kernel(
    # pointers: partials of dQ (SQ, R, K), dPᵀ (SP, R, N), dλ (B, R) (accumulator dtype, contiguous); outputs dQ
    # (R, K), dP (N, R) and dλeff (R) in the parameters' dtypes
    dq_parts_ptr, dp_parts_ptr, dlam_parts_ptr, dq_ptr, dp_ptr, dlam_ptr,
    # sizes
    K, N, R, SQ, SP, B, M_BUCKET,
    # strides of the outputs
    stride_dqr, stride_dqk, stride_dpn, stride_dpr,
    # meta
    IS_FP64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # programs [0, nq) sum dQ's column tiles, [nq, nq + np) dPᵀ's (stored transposed into dP), the last one dλ;
    # every sum runs over its partials in their order
    pid = tl.program_id(0)
    nq = tl.cdiv(K, BLOCK_K)
    n_p = tl.cdiv(N, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    if pid < nq:
        q_cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
        dq = _sum_partials(dq_parts_ptr, rr, q_cols, R, K, SQ, acc_dtype, BLOCK_R, BLOCK_K)
        _store_tile(dq_ptr, rr, q_cols, stride_dqr, stride_dqk, R, K, dq.to(dq_ptr.dtype.element_ty))
    elif pid < nq + n_p:
        p_cols = (pid - nq) * BLOCK_K + tl.arange(0, BLOCK_K)
        dp = _sum_partials(dp_parts_ptr, rr, p_cols, R, N, SP, acc_dtype, BLOCK_R, BLOCK_K)
        _store_tile(dp_ptr, rr, p_cols, stride_dpr, stride_dpn, R, N, dp.to(dp_ptr.dtype.element_ty))
    else:
        dl = tl.zeros([BLOCK_R], dtype=acc_dtype)
        part = dlam_parts_ptr
        for _ in range(B):
            dl += tl.load(part + rr, mask=rr < R, other=0.0)
            part += R
        tl.store(dlam_ptr + rr, dl.to(dlam_ptr.dtype.element_ty), mask=rr < R)


# ----------------------------------------------------------------------------------------------- launchers

_launch_split_fwd = _Launch(_split_fwd_kernel)
_launch_split_g_bwd = _Launch(_split_g_bwd_kernel)
_launch_split_x_bwd = _Launch(_split_x_bwd_kernel)
_launch_split_dt_finalize = _Launch(_split_dt_finalize_kernel)
_launch_split_finalize = _Launch(_split_finalize_kernel)


def pass_splits(M: int, length: int, device: torch.device) -> tuple[int, int]:
    """``grids.pass_splits`` on ``device``'s SM count."""
    return grids.pass_splits(M, length, _sm_count(device))


def _fwd_grid(M: int, N: int, device: torch.device):
    def grid(c):
        row_blocks = _cdiv(M, c["BLOCK_M"])
        col = max(1, min(_cdiv(2 * _sm_count(device), row_blocks), _cdiv(N, c["BLOCK_K"])))
        return (col, row_blocks)

    return grid


def adapter_forward(x2, P, lam_eff, Q, dropout_p, seed, bias=None):
    """Pass (1) alone: ``b + (t · λeff) Pᵀ`` (a fresh M × N buffer) and t; the adapter of any base layer."""
    _refuse_interpreted_bfloat16(x2.dtype)
    M, K = x2.shape
    N, R = P.shape
    _check_rank(R)
    t = torch.empty(M, R, dtype=x2.dtype, device=x2.device)
    y = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    if M == 0:
        return y, t
    if R == 0:
        return (y.copy_(bias.expand(M, N)) if bias is not None else y.zero_()), t
    _launch_split_fwd(_fwd_grid(M, N, x2.device),
        x2, Q, P, lam_eff, bias if bias is not None else y, t, y, M, N, K, R, m_bucket(M),
        x2.stride(0), x2.stride(1), Q.stride(0), Q.stride(1), P.stride(0), P.stride(1), t.stride(0), t.stride(1),
        y.stride(0), y.stride(1), *_dropout_args(dropout_p, seed),
        HAS_DROPOUT=dropout_p > 0.0, HAS_BIAS=bias is not None, **_meta(x2.dtype, R),
    )  # fmt: skip
    return y, t


def linear_forward(x2, weight, bias, P, lam_eff, Q, dropout_p, seed):
    if P.shape[1] == 0 or x2.shape[0] == 0:
        t = torch.empty(x2.shape[0], P.shape[1], dtype=x2.dtype, device=x2.device)
        return (torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()), t
    y, t = adapter_forward(x2, P, lam_eff, Q, dropout_p, seed, bias)
    return y.addmm_(x2, weight.t()), t


def adapter_backward(g2, x2, P, lam_eff, Q, t, dropout_p, seed, need_dx, need_adapter):
    """Passes (2) and (3) alone: the adapter's share of dx (``drop'(u Q)``), dP, dλeff and dQ. Their split reductions
    go through fixed-order partials where deterministic algorithms are on, through atomics otherwise."""
    _refuse_interpreted_bfloat16(x2.dtype)
    M, K = x2.shape
    N, R = P.shape
    _check_rank(R)
    if R == 0 or M == 0:
        dx = torch.zeros_like(x2) if need_dx else None
        if not need_adapter:
            return dx, None, None, None
        return dx, torch.zeros_like(P), torch.zeros_like(lam_eff), torch.zeros_like(Q)
    meta = _meta(x2.dtype, R)
    acc = _acc_dtype(x2.dtype)
    device = x2.device
    atomic = not torch.are_deterministic_algorithms_enabled()
    col, row = pass_splits(M, N, device)
    col_x, row_x = pass_splits(M, K, device)
    blocks = _cdiv(M, FINALIZE_ROWS)
    if not need_adapter:  # dPᵀ, dQ and dλ untouched: one spare pointer, never an alias that a reset could clear
        dp_parts = dq_parts = dlam_parts = torch.empty(1, dtype=acc, device=device)
    if atomic:  # one zeroed accumulator each, from one memset: dt (M, R), then dPᵀ (R, N), dQ (R, K) and dλ (R)
        sums = torch.zeros(M * R + (R * (N + K + 1) if need_adapter else 0), dtype=acc, device=device)
        dt_parts = sums[: M * R]
        if need_adapter:
            dp_parts, dq_parts, dlam_parts = sums[M * R :][: R * N], sums[M * R + R * N :][: R * K], sums[-R:]
        parts = (1, 1, 1)  # of dQ, dPᵀ and dλ, for the finalize
    else:
        dt_parts = torch.empty(col, M, R, dtype=acc, device=device)
        if need_adapter:
            dp_parts = torch.empty(row, R, N, dtype=acc, device=device)
            dq_parts = torch.empty(row_x, R, K, dtype=acc, device=device)
            dlam_parts = torch.empty(blocks, R, dtype=acc, device=device)  # (the g pass leaves it to the finalize)
        parts = (row_x, row, blocks)
    _launch_split_g_bwd(lambda c: (col, row),
        g2, P, t, lam_eff, dt_parts, dp_parts, dlam_parts, M, N, R, m_bucket(M),
        g2.stride(0), g2.stride(1), P.stride(0), P.stride(1), t.stride(0), t.stride(1),
        NEED_DP=need_adapter, ATOMIC=atomic, **meta,
    )  # fmt: skip
    if atomic:
        u = dt_parts  # pass (3) scales it by λeff as it loads it; pass (2) added Σ dt ⊙ t into dλ
    else:  # u = (Σ_c dt) · λeff and the row blocks' Σ dt ⊙ t, in one pass over the r-wide partials
        u = torch.empty(M, R, dtype=acc, device=device)
        _launch_split_dt_finalize(lambda c: (blocks,),
            dt_parts, t, lam_eff, u, dlam_parts, M, R, col, m_bucket(M), t.stride(0), t.stride(1),
            NEED_DLAM=need_adapter, IS_FP64=meta["IS_FP64"], BLOCK_R=meta["BLOCK_R"],
        )  # fmt: skip
    dP = dlam = dQ = None
    dx = torch.empty(M, K, dtype=x2.dtype, device=device) if need_dx else x2  # (x2: never written)
    _launch_split_x_bwd(lambda c: (col_x, row_x),
        x2, u, lam_eff, Q, dx, dq_parts, M, K, R, m_bucket(M),
        x2.stride(0), x2.stride(1), Q.stride(0), Q.stride(1), dx.stride(0), dx.stride(1),
        *_dropout_args(dropout_p, seed),
        HAS_DROPOUT=dropout_p > 0.0, WRITE_DX=need_dx, NEED_DQ=need_adapter, ATOMIC=atomic, **meta,
    )  # fmt: skip
    if need_adapter:  # dQ, dP and dλeff from their partials (or accumulators), in one launch
        dQ, dP, dlam = torch.empty_like(Q), torch.empty_like(P), torch.empty_like(lam_eff)
        programs = _cdiv(K, _FINALIZE_COLUMNS) + _cdiv(N, _FINALIZE_COLUMNS) + 1
        _launch_split_finalize(lambda c: (programs,),
            dq_parts, dp_parts, dlam_parts, dQ, dP, dlam, K, N, R, *parts, m_bucket(M),
            dQ.stride(0), dQ.stride(1), dP.stride(0), dP.stride(1),
            IS_FP64=meta["IS_FP64"], BLOCK_R=meta["BLOCK_R"],
        )  # fmt: skip
    return (dx if need_dx else None), dP, dlam, dQ


def linear_backward(g2, x2, weight, P, lam_eff, Q, t, dropout_p, seed, need_dx, need_adapter):
    if P.shape[1] == 0 or x2.shape[0] == 0:
        dx = g2 @ weight if need_dx else None
        if not need_adapter:
            return dx, None, None, None
        return dx, torch.zeros_like(P), torch.zeros_like(lam_eff), torch.zeros_like(Q)
    dx, dP, dlam, dQ = adapter_backward(g2, x2, P, lam_eff, Q, t, dropout_p, seed, need_dx, need_adapter)
    return (dx.addmm_(g2, weight) if need_dx else None), dP, dlam, dQ


# ----------------------------------------------------------------------------------------------- the backend

dropout_keep_mask = fused.dropout_keep_mask  # the same mask bits as the fused route


def shape_reason(device: torch.device, r: int) -> str | None:
    """The split route's rank limit (``config.SPLIT_MAX_R``): larger ranks take the other routes."""
    if r > SPLIT_MAX_R:
        return f"the split route's passes support r <= {SPLIT_MAX_R}, got r = {r}"
    return None


def _check_rank(r: int) -> None:
    if r > SPLIT_MAX_R:
        raise ValueError(f"backend 'triton_split': {shape_reason(torch.device('cpu'), r)}; use backend='triton'")


unavailable_reason = _triton_unavailable_reason

__all__ = [
    "INTERPRET",
    "adapter_backward",
    "adapter_forward",
    "dropout_keep_mask",
    "linear_backward",
    "linear_forward",
    "mask_lams",
    "pass_splits",
    "sensitivity_update",
    "shape_reason",
    "triplet_scores",
    "unavailable_reason",
]
