"""The torch composite backend: ATen GEMMs accumulating in place, dropout from a seeded torch generator.

Runs on any device; it is what the CPU uses when the native extension is not built.
"""

from __future__ import annotations

import torch
from torch import Tensor


def unavailable_reason(device: torch.device) -> str | None:
    return None


def _bernoulli(shape, dropout_p: float, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    # the draws do not depend on dtype, so the mask is the same whichever dtype it is drawn in
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - dropout_p, generator=gen)


def dropout_keep_mask(shape: tuple[int, int], dropout_p: float, seed: int, device: torch.device) -> Tensor:
    return _bernoulli(shape, dropout_p, seed, device, torch.float32).bool()


def _scaled_keep(x2: Tensor, dropout_p: float, seed: int) -> Tensor | None:
    """``keep / (1 - p)`` in x's dtype, or ``None`` without dropout."""
    if dropout_p == 0.0:
        return None
    return _bernoulli(x2.shape, dropout_p, seed, x2.device, x2.dtype).mul_(1.0 / (1.0 - dropout_p))


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


def sensitivity_update(params, grads, ema_ipt, ema_unc, beta1: float, beta2: float) -> Tensor:
    """Update PEFT's sensitivity EMAs in place and return the triplet scores of all layers, concatenated.

    ``params``/``grads``/``ema_ipt``/``ema_unc``: one ``(P, lam, Q)`` triple per layer (lam 1-D). Each
    elementwise step is its own rounded op, as in PEFT, so the EMAs match PEFT's bit for bit.
    """
    flat = [t for triple in params for t in triple]
    ipt = torch._foreach_abs(torch._foreach_mul(flat, [t for triple in grads for t in triple]))
    avg = [t for triple in ema_ipt for t in triple]
    unc = [t for triple in ema_unc for t in triple]
    torch._foreach_mul_(avg, beta1)
    torch._foreach_add_(avg, torch._foreach_mul(ipt, 1 - beta1))
    dev = torch._foreach_abs(torch._foreach_sub(ipt, avg))
    torch._foreach_mul_(unc, beta2)
    torch._foreach_add_(unc, torch._foreach_mul(dev, 1 - beta2))
    return triplet_scores(ema_ipt, ema_unc)


def triplet_scores(ema_ipt, ema_unc) -> Tensor:
    """``S_i = s(λ)_i + (mean_in s(Q)_i + mean_out s(P)_i)`` with ``s = Ī ⊙ Ū``, per layer, concatenated."""
    scores = []
    for (aP, alam, aQ), (uP, ulam, uQ) in zip(ema_ipt, ema_unc):
        scores.append(alam * ulam + ((aQ * uQ).mean(dim=1) + (aP * uP).mean(dim=0)))
    return torch.cat(scores)


def mask_lams(lams, keep: Tensor) -> None:
    """Zero-fill, in place, the λ entries whose ``keep`` entry (over all layers, concatenated) is false."""
    for lam, k in zip(lams, keep.split([lam.numel() for lam in lams])):
        lam.masked_fill_(~k.view(lam.shape), 0.0)
