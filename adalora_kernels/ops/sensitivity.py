"""The allocator's device work, dispatched to a backend: EMA update + triplet scores, and λ masking."""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import get_backend
from .backend import resolve_backend


def sensitivity_update(params, grads, ema_ipt, ema_unc, beta1: float, beta2: float, backend: str | None = None):
    """Update the sensitivity EMAs of every ``(P, lam, Q)`` in place; return all triplet scores (one launch
    on Triton, one ``torch._foreach_*`` chain on the torch backend)."""
    device = params[0][0].device
    name = resolve_backend(backend, device)
    return get_backend(name, device).sensitivity_update(params, grads, ema_ipt, ema_unc, beta1, beta2)


def triplet_scores(ema_ipt, ema_unc) -> Tensor:
    """Triplet scores from the EMAs alone (the final mask of PEFT's schedule does not update them)."""
    return get_backend("torch", ema_ipt[0][0].device).triplet_scores(ema_ipt, ema_unc)


def mask_lams(lams, keep: Tensor, backend: str | None = None) -> None:
    """Zero-fill the λ entries that ``keep`` (all layers, concatenated) drops."""
    name = resolve_backend(backend, keep.device)
    get_backend(name, keep.device).mask_lams(lams, keep)


def threshold_keep(scores: Tensor, k: int) -> Tensor:
    """``scores > kthvalue(scores, k)``: PEFT's mask (ties at the threshold are dropped); all kept if k = 0."""
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    return scores > torch.kthvalue(scores, k).values
