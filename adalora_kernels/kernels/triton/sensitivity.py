"""Triton kernels of the rank allocator (DESIGN §2, §4): every layer's sensitivity EMAs and triplet scores
in one launch, and the λ mask in another, over a pointer table of the adapter tensors.

One program per triplet (layer l, rank i) owns row i of Q, column i of P and λ_i: it updates their EMAs
in place and writes ``S_i = s(λ)_i + (mean_in s(Q)_i + mean_out s(P)_i)``. No atomics: deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# a row of the per-layer table (16 int64): pointers to P, dP, Ī_P, Ū_P, Q, dQ, Ī_Q, Ū_Q, λ, dλ, Ī_λ, Ū_λ;
# then out, in, r, and one unused column

_TORCH_TO_TL = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


# ----------------------------------------------------------------------------------------------- helpers


@triton.jit
def _ptr(table, col, DTYPE: tl.constexpr):
    return tl.load(table + col).to(tl.pointer_type(DTYPE))


@triton.jit
def _ema_block(p_ptr, g_ptr, a_ptr, u_ptr, offs, mask, b1, c1, b2, c2, ACC: tl.constexpr):
    """Update Ī, Ū of one block in place (each product rounded on its own, as PEFT's ops); return Σ Ī·Ū."""
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(ACC)
    ipt = tl.abs(p * g)
    a = (b1 * a + c1 * ipt).to(a_ptr.dtype.element_ty)
    u = (b2 * u + c2 * tl.abs(ipt - a.to(ACC))).to(u_ptr.dtype.element_ty)
    tl.store(a_ptr + offs, a, mask=mask)
    tl.store(u_ptr + offs, u, mask=mask)
    return tl.sum(tl.where(mask, a.to(ACC) * u.to(ACC), 0.0), axis=0)


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _sensitivity_kernel(
    # pointers: the per-layer table (L × 16 int64), triplet → layer (int32), triplet → rank (int32), scores,
    # and the EMA coefficients β1, 1-β1, β2, 1-β2 (rounded from double to ACC on the host, as torch does)
    table_ptr, tri_layer_ptr, tri_rank_ptr, score_ptr, coef_ptr,
    # meta
    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    layer = tl.load(tri_layer_ptr + pid).to(tl.int64)
    i = tl.load(tri_rank_ptr + pid).to(tl.int64)
    b1, c1 = tl.load(coef_ptr), tl.load(coef_ptr + 1)
    b2, c2 = tl.load(coef_ptr + 2), tl.load(coef_ptr + 3)
    row = table_ptr + layer * 16
    n_out = tl.load(row + 12)
    n_in = tl.load(row + 13)
    r = tl.load(row + 14)
    # row i of Q (contiguous)
    q_sum = tl.zeros([], dtype=ACC)
    for k0 in range(0, n_in, BLOCK):
        offs = i * n_in + k0 + tl.arange(0, BLOCK)
        mask = (k0 + tl.arange(0, BLOCK)) < n_in
        q_sum += _ema_block(
            _ptr(row, 4, DTYPE), _ptr(row, 5, DTYPE), _ptr(row, 6, DTYPE), _ptr(row, 7, DTYPE),
            offs, mask, b1, c1, b2, c2, ACC,
        )  # fmt: skip
    # column i of P (stride r)
    p_sum = tl.zeros([], dtype=ACC)
    for n0 in range(0, n_out, BLOCK):
        rows = n0 + tl.arange(0, BLOCK)
        p_sum += _ema_block(
            _ptr(row, 0, DTYPE), _ptr(row, 1, DTYPE), _ptr(row, 2, DTYPE), _ptr(row, 3, DTYPE),
            rows.to(tl.int64) * r + i, rows < n_out, b1, c1, b2, c2, ACC,
        )  # fmt: skip
    # λ_i
    one = tl.arange(0, 2)
    lam_s = _ema_block(
        _ptr(row, 8, DTYPE), _ptr(row, 9, DTYPE), _ptr(row, 10, DTYPE), _ptr(row, 11, DTYPE),
        i + one, one < 1, b1, c1, b2, c2, ACC,
    )  # fmt: skip
    score = lam_s + (q_sum / n_in.to(ACC) + p_sum / n_out.to(ACC))
    tl.store(score_ptr + pid, score.to(score_ptr.dtype.element_ty))


@triton.jit
def _mask_lam_kernel(lam_table_ptr, tri_layer_ptr, tri_rank_ptr, keep_ptr, DTYPE: tl.constexpr):
    pid = tl.program_id(0)
    keep = tl.load(keep_ptr + pid)
    if keep == 0:
        layer = tl.load(tri_layer_ptr + pid).to(tl.int64)
        lam = tl.load(lam_table_ptr + layer).to(tl.pointer_type(DTYPE))
        tl.store(lam + tl.load(tri_rank_ptr + pid), tl.zeros([], dtype=DTYPE))


# ----------------------------------------------------------------------------------------------- launchers


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)  # no host sync


def _triplet_index(ranks: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    layers = [layer for layer, r in enumerate(ranks) for _ in range(r)]
    within = [i for r in ranks for i in range(r)]
    return _to_device(layers, device).to(torch.int32), _to_device(within, device).to(torch.int32)


def _check_uniform(tensors: list[torch.Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors:
        if t.dtype != dtype:
            raise TypeError(f"adapter tensors: expected one dtype for all layers, got {dtype} and {t.dtype}")
        if not t.is_contiguous():
            raise ValueError("adapter tensors: the Triton allocator kernel expects contiguous P, λ, Q and grads")
    return dtype


def sensitivity_update(layout, params, grads, ema_ipt, ema_unc, beta1: float, beta2: float) -> torch.Tensor:
    """One launch: update every EMA (flat buffers in ``layout``) in place, return all triplet scores."""
    device = params[0][0].device
    ema_ipt, ema_unc = layout.views(ema_ipt), layout.views(ema_unc)
    rows, tensors = [], []
    for (P, lam, Q), (dP, dlam, dQ), (aP, alam, aQ), (uP, ulam, uQ) in zip(params, grads, ema_ipt, ema_unc):
        group = [P, dP, aP, uP, Q, dQ, aQ, uQ, lam, dlam, alam, ulam]
        tensors += group
        rows.append([t.data_ptr() for t in group] + [P.shape[0], Q.shape[1], lam.numel(), 0])
    dtype = _check_uniform(tensors)
    ranks = [lam.numel() for _, lam, _ in params]
    table = _to_device([v for row in rows for v in row], device)
    tri_layer, tri_rank = _triplet_index(ranks, device)
    scores = torch.empty(sum(ranks), dtype=dtype, device=device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coef = torch.tensor([beta1, 1 - beta1, beta2, 1 - beta2], dtype=torch.float64).to(acc)
    coef = coef if device.type == "cpu" else coef.pin_memory().to(device, non_blocking=True)
    if scores.numel():
        _sensitivity_kernel[(scores.numel(),)](
            table, tri_layer, tri_rank, scores, coef,
            DTYPE=_TORCH_TO_TL[dtype], ACC=_TORCH_TO_TL[acc], BLOCK=128,
        )  # fmt: skip
    return scores


def mask_lams(lams, keep: torch.Tensor) -> None:
    """One launch: zero λ_i of every triplet whose ``keep`` entry is false."""
    dtype = _check_uniform(list(lams))
    table = _to_device([lam.data_ptr() for lam in lams], keep.device)
    tri_layer, tri_rank = _triplet_index([lam.numel() for lam in lams], keep.device)
    if keep.numel():
        _mask_lam_kernel[(keep.numel(),)](table, tri_layer, tri_rank, keep.to(torch.int8), DTYPE=_TORCH_TO_TL[dtype])
