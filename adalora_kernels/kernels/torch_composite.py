"""The torch composite backend: ATen GEMMs accumulating in place, dropout from a seeded torch generator.

Runs on any device; it is what the CPU uses when the native extension is not built.
"""

from __future__ import annotations

import torch
from torch import Tensor


def unavailable_reason(device: torch.device) -> str | None:
    return None


_MASK64 = (1 << 64) - 1


def generator_seed(seed: int, device: torch.device) -> int:
    """The seed handed to torch's generator for dropout seed ``seed``. The CPU generator (mt19937) keeps only the
    low 32 bits of its seed, so there all 64 bits are mixed first (splitmix64's finaliser, then the halves
    folded): seeds that differ only in their high bits draw different masks (two seeds still share one with
    probability 2⁻³²). CUDA's Philox generator takes the 64-bit seed as it is."""
    if device.type != "cpu":
        return seed
    z = seed & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z ^ (z >> 32)) & 0xFFFFFFFF


def _uniform(shape, seed: int, device: torch.device) -> Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(generator_seed(seed, device))
    return torch.rand(shape, generator=gen, device=device)


def dropout_keep_mask(shape: tuple[int, int], dropout_p: float, seed: int, device: torch.device) -> Tensor:
    return _uniform(shape, seed, device) >= dropout_p


def _scaled_keep(x2: Tensor, dropout_p: float, seed: int) -> Tensor | None:
    """``keep / (1 - p)`` in x's dtype, or ``None`` without dropout; the same draws as ``dropout_keep_mask``."""
    if dropout_p == 0.0:
        return None
    return _uniform(x2.shape, seed, x2.device).ge_(dropout_p).to(x2.dtype).mul_(1.0 / (1.0 - dropout_p))


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
    scale = _scaled_keep(x2, dropout_p, seed)
    t = (x2 if scale is None else x2 * scale) @ Q.T
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
    scale = _scaled_keep(x2, dropout_p, seed)
    dx = dP = dlam = dQ = None
    if need_dx:
        dx = g2 @ weight
        if scale is None:
            dx.addmm_(u, Q)
        else:
            dx.add_((u @ Q).mul_(scale))
    if need_adapter:
        dP = g2.T @ (t * lam_eff)
        dlam = (dt * t).sum(0)
        dQ = u.T @ (x2 if scale is None else x2 * scale)
    return dx, dP, dlam, dQ


def adapter_forward(x2: Tensor, P: Tensor, lam_eff: Tensor, Q: Tensor, dropout_p: float, seed: int):
    """The adapter alone (for a base layer with a forward of its own): ``((drop(x) Qᵀ) · λeff) Pᵀ`` and t."""
    scale = _scaled_keep(x2, dropout_p, seed)
    t = (x2 if scale is None else x2 * scale) @ Q.T
    return (t * lam_eff) @ P.T, t


def adapter_backward(g2, x2, P, lam_eff, Q, t, dropout_p: float, seed: int, need_dx: bool, need_adapter: bool):
    """The adapter's gradients alone: the adapter's share of dx (``drop'(u Q)``), dP, dλeff, dQ."""
    dt = g2 @ P
    u = dt * lam_eff
    scale = _scaled_keep(x2, dropout_p, seed)
    dx = dP = dlam = dQ = None
    if need_dx:
        dx = u @ Q if scale is None else (u @ Q).mul_(scale)
    if need_adapter:
        dP = g2.T @ (t * lam_eff)
        dlam = (dt * t).sum(0)
        dQ = u.T @ (x2 if scale is None else x2 * scale)
    return dx, dP, dlam, dQ


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
