"""Plain-PyTorch reference of the AdaLoRA layer (DESIGN §1): readable, any dtype, the oracle of the tests.

    y = x Wᵀ + b + s · ((drop(x) Qᵀ) ⊙ (λ ⊙ m)) Pᵀ

``keep`` is the dropout keep-mask over the flattened ``(M, in)`` input (1 = kept); ``None`` means no dropout.
Every backend exposes the mask it draws for a seed, so a backend is checked against this reference with
its own mask.
"""

from __future__ import annotations

import torch
from torch import Tensor


def peft_scaling(init_r: int, lora_alpha: float) -> float:
    """PEFT's effective adapter scale ``s = scaling / (ranknum + 1e-5)``, ``scaling = alpha or r``."""
    scaling = lora_alpha if lora_alpha > 0 else float(init_r)
    return scaling / (init_r + 1e-5)


def effective_lam(lam: Tensor, rank_mask: Tensor | None, scaling: float) -> Tensor:
    """``s · λ ⊙ m`` as an r-vector."""
    lam = lam * scaling
    return lam if rank_mask is None else lam * rank_mask.to(lam.dtype)


def _dropped(x2: Tensor, keep: Tensor | None, dropout_p: float) -> Tensor:
    return x2 if keep is None else x2 * keep.to(x2.dtype) / (1.0 - dropout_p)


def _upcast(tensors, upcast: bool):
    return [t.double() if (upcast and t is not None and t.is_floating_point()) else t for t in tensors]


def adalora_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    P: Tensor,
    lam: Tensor,
    Q: Tensor,
    scaling: float,
    rank_mask: Tensor | None = None,
    keep: Tensor | None = None,
    dropout_p: float = 0.0,
    upcast: bool = False,
) -> Tensor:
    """Forward of DESIGN §1, differentiable by autograd; ``upcast=True`` computes in fp64."""
    x, weight, bias, P, lam, Q = _upcast([x, weight, bias, P, lam, Q], upcast)
    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ weight.T
    if bias is not None:
        y = y + bias
    t = _dropped(x2, keep, dropout_p) @ Q.T
    y = y + (t * effective_lam(lam, rank_mask, scaling)) @ P.T
    return y.reshape(*x.shape[:-1], weight.shape[0])


def adalora_linear_backward_ref(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    P: Tensor,
    lam: Tensor,
    Q: Tensor,
    scaling: float,
    rank_mask: Tensor | None = None,
    keep: Tensor | None = None,
    dropout_p: float = 0.0,
    upcast: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The closed-form backward of DESIGN §1: ``(dx, dP, dlam, dQ)``, with W frozen."""
    grad, x, weight, P, lam, Q = _upcast([grad, x, weight, P, lam, Q], upcast)
    x2 = x.reshape(-1, x.shape[-1])
    g = grad.reshape(-1, weight.shape[0])
    lam_eff = effective_lam(lam, rank_mask, scaling)
    xd = _dropped(x2, keep, dropout_p)
    t = xd @ Q.T
    dt = g @ P
    dx = g @ weight + _dropped(dt * lam_eff @ Q, keep, dropout_p)
    dP = g.T @ (t * lam_eff)
    m = torch.ones_like(lam) if rank_mask is None else rank_mask.to(lam.dtype)
    dlam = scaling * m * (dt * t).sum(0)
    dQ = (dt * lam_eff).T @ xd
    return dx.reshape(x.shape), dP, dlam, dQ
