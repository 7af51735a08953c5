"""The torch composite backend: ATen GEMMs accumulating in place, DESIGN §4's Philox dropout mask.

Runs on any device; it is what the CPU uses when the native extension is not built.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference


def unavailable_reason(device: torch.device) -> str | None:
    return None


_U32 = 0xFFFFFFFF
_ROWS_PER_DRAW = 256  # rows of words drawn at a time on the CPU: the int64 temporaries stay in cache


def _philox_words(seed: int, c0: Tensor, c1: Tensor) -> Tensor:
    """Philox4x32-10 (DESIGN §4, ``reference.philox4x32``) as whole-tensor int64 ops, the four words stacked last.
    A product of two 32-bit values is taken modulo 2⁶⁴ in int64 (two's complement wraps on every device torch
    runs on) and its halves read with a shift and a mask; the reference computes the same without overflow, and
    the tests hold the two equal."""
    c0, c1 = torch.broadcast_tensors(c0, c1)
    c0, c1 = c0.clone(memory_format=torch.contiguous_format), c1.contiguous()  # c0 is updated in place
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        pb = c2.mul_(0xCD9E8D57)
        pa = c0.mul_(0xD2511F53)
        c0 = (pb >> 32).bitwise_and_(_U32).bitwise_xor_(c1).bitwise_xor_(k0)
        c2 = (pa >> 32).bitwise_and_(_U32).bitwise_xor_(c3).bitwise_xor_(k1)
        c1, c3 = pb.bitwise_and_(_U32), pa.bitwise_and_(_U32)
        k0, k1 = (k0 + 0x9E3779B9) & _U32, (k1 + 0xBB67AE85) & _U32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def _keep_rows(out: Tensor, row0: int, seed: int, threshold: int) -> None:
    rows, cols = out.shape
    groups = (cols + 3) // 4
    c0 = torch.arange(groups, dtype=torch.int64, device=out.device)[None, :]
    c1 = (torch.arange(row0, row0 + rows, dtype=torch.int64, device=out.device) & _U32)[:, None]
    words = _philox_words(seed, c0, c1).reshape(rows, 4 * groups)[:, :cols]
    v = torch.where(words >= 1 << 31, words ^ _U32, words)  # the int32 reading: ~w where negative
    torch.ge(v, threshold, out=out)


def keep_mask_by_torch_ops(shape: tuple[int, int], dropout_p: float, seed: int, device: torch.device) -> Tensor:
    """DESIGN §4's mask in whole-tensor torch ops, on any device; a block of rows at a time on the CPU."""
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    rows, cols = shape
    out = torch.empty(rows, cols, dtype=torch.bool, device=device)
    threshold = reference.dropout_threshold(dropout_p)
    step = _ROWS_PER_DRAW if device.type == "cpu" else max(rows, 1)
    for row0 in range(0, rows, step):
        _keep_rows(out[row0 : row0 + step], row0, seed, threshold)
    return out


def dropout_keep_mask(shape: tuple[int, int], dropout_p: float, seed: int, device: torch.device) -> Tensor:
    """DESIGN §4's mask, the bits every backend draws, from the fastest mask kernel here: the Triton backend's on
    CUDA, the native extension's where it is built, else torch ops (about 150 of them: slow at small shapes)."""
    from . import BackendUnavailableError, get_backend

    for name in ("triton", "csrc") if device.type == "cuda" else ("csrc",):
        try:
            kernels = get_backend(name, device)
        except BackendUnavailableError:
            continue
        return kernels.dropout_keep_mask(shape, dropout_p, seed, device)
    return keep_mask_by_torch_ops(shape, dropout_p, seed, device)


def _keep(x2: Tensor, dropout_p: float, seed: int) -> Tensor | None:
    """The keep-mask over ``x2``, or ``None`` without dropout: bool on CUDA, whose elementwise kernels read the
    byte mask as they go; elsewhere cast to x's dtype once, as the CPU's mixed-dtype kernels would cast it again in
    a slower pass of their own at every use."""
    if dropout_p == 0.0:
        return None
    keep = dropout_keep_mask(tuple(x2.shape), dropout_p, seed, x2.device)
    return keep if x2.device.type == "cuda" else keep.to(x2.dtype)


def _kept(x2: Tensor, keep: Tensor | None) -> Tensor:
    """``x2 ⊙ keep`` unscaled, one pass; ``1 / (1 - p)`` is applied to the rank-sized GEMM results instead
    (``_mm``)."""
    return x2 if keep is None else x2 * keep


def _mm(a: Tensor, b: Tensor, scale: float = 1.0) -> Tensor:
    """``scale · (a @ b)``, the scale applied as the GEMM's alpha (one rounding, no extra pass); beta = 0, so the
    0-dim input is never read."""
    return a @ b if scale == 1.0 else torch.addmm(a.new_empty(()), a, b, beta=0, alpha=scale)


def _keep_scale(dropout_p: float) -> float:
    return 1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0


def adapter_t(x2: Tensor, Q: Tensor, dropout_p: float, seed: int) -> Tensor:
    """``t = drop(x) Qᵀ``, the adapter's rank-r activation (what the forward saves, and what a differentiable
    backward recomputes)."""
    return _mm(_kept(x2, _keep(x2, dropout_p, seed)), Q.T, _keep_scale(dropout_p))


def linear_forward(
    x2: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    P: Tensor,
    lam_eff: Tensor,
    Q: Tensor,
    dropout_p: float,
    seed: int,
) -> tuple[Tensor, Tensor]:
    t = adapter_t(x2, Q, dropout_p, seed)
    y = torch.addmm(bias, x2, weight.T) if bias is not None else x2 @ weight.T
    y.addmm_(t * lam_eff, P.T)
    return y, t


def linear_backward(
    g2: Tensor,
    x2: Tensor,
    weight: Tensor,
    P: Tensor,
    lam_eff: Tensor,
    Q: Tensor,
    t: Tensor,
    dropout_p: float,
    seed: int,
    need_dx: bool,
    need_adapter: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    dt = g2 @ P
    u = dt * lam_eff
    keep, scale = _keep(x2, dropout_p, seed), _keep_scale(dropout_p)
    dx = None
    if need_dx:
        dx = g2 @ weight
        if keep is None:
            dx.addmm_(u, Q)
        else:
            dx.addcmul_(u @ Q, keep, value=scale)  # dx += scale · (u Q) ⊙ keep in one pass
    return (dx, *_adapter_grads(g2, x2, lam_eff, t, dt, u, keep, scale, need_adapter))


def adapter_forward(x2: Tensor, P: Tensor, lam_eff: Tensor, Q: Tensor, dropout_p: float, seed: int):
    """The adapter alone (for a base layer with a forward of its own): ``((drop(x) Qᵀ) · λeff) Pᵀ`` and t."""
    t = adapter_t(x2, Q, dropout_p, seed)
    return (t * lam_eff) @ P.T, t


def adapter_backward(g2, x2, P, lam_eff, Q, t, dropout_p: float, seed: int, need_dx: bool, need_adapter: bool):
    """The adapter's gradients alone: the adapter's share of dx (``drop'(u Q)``), dP, dλeff, dQ."""
    dt = g2 @ P
    u = dt * lam_eff
    keep, scale = _keep(x2, dropout_p, seed), _keep_scale(dropout_p)
    dx = _kept(_mm(u, Q, scale), keep) if need_dx else None
    return (dx, *_adapter_grads(g2, x2, lam_eff, t, dt, u, keep, scale, need_adapter))


def _adapter_grads(g2, x2, lam_eff, t, dt, u, keep, scale: float, need: bool):
    """dP, dλeff and dQ (``None`` each where not ``need``), from dt = g P and u = dt · λeff."""
    if not need:
        return None, None, None
    return g2.T @ (t * lam_eff), (dt * t).sum(0), _mm(u.T, _kept(x2, keep), scale)


def sensitivity_update(layout, params, grads, ema_ipt: Tensor, ema_unc: Tensor, beta1: float, beta2: float) -> Tensor:
    """Update PEFT's sensitivity EMAs (flat buffers in ``layout``) in place and return every triplet score.

    ``params``/``grads``: one ``(P, λ, Q)`` per layer. A few whole-buffer ops, each elementwise step rounded on
    its own as in PEFT (no fused multiply-add), so the EMAs match PEFT's bit for bit.
    """
    ipt = layout.gather(params).mul_(layout.gather(grads)).abs_()
    tmp = ipt * (1 - beta1)
    ema_ipt.mul_(beta1).add_(tmp)
    torch.sub(ipt, ema_ipt, out=tmp).abs_().mul_(1 - beta2)
    ema_unc.mul_(beta2).add_(tmp)
    return layout.triplet_scores(torch.mul(ema_ipt, ema_unc, out=tmp))


def triplet_scores(layout, ema_ipt: Tensor, ema_unc: Tensor) -> Tensor:
    """Triplet scores from the EMAs alone."""
    return layout.triplet_scores(ema_ipt * ema_unc)


def mask_lams(lams, keep: Tensor) -> None:
    """Zero-fill, in place, the λ entries whose ``keep`` entry (over all layers, concatenated) is false: the λ of
    every layer gathered, zero-filled and copied back, three ops whatever the number of layers (a fill per
    layer was two ops each, and on a GPU as many launches)."""
    flats = [lam.view(-1) for lam in lams]
    if not flats:
        return
    gathered = torch.cat(flats).masked_fill_(~keep, 0.0)
    torch._foreach_copy_(flats, list(gathered.split([f.numel() for f in flats])))
