"""The allocator's device work, dispatched to a backend: EMA update + triplet scores, and λ masking."""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import get_backend
from ..kernels.layout import FlatLayout
from .backend import resolve_backend


def sensitivity_update(
    layout: FlatLayout, params, grads, ema_ipt: Tensor, ema_unc: Tensor, beta1: float, beta2: float, backend=None
) -> Tensor:
    """Update the sensitivity EMAs (flat buffers laid out by ``layout``) of every ``(P, λ, Q)`` in place and
    return all triplet scores: one launch on Triton, a few whole-buffer ops on the torch backend."""
    name = resolve_backend(backend, ema_ipt.device)
    return get_backend(name, ema_ipt.device).sensitivity_update(layout, params, grads, ema_ipt, ema_unc, beta1, beta2)


def triplet_scores(layout: FlatLayout, ema_ipt: Tensor, ema_unc: Tensor) -> Tensor:
    """Triplet scores from the EMAs alone (the final mask of PEFT's schedule does not update them)."""
    return get_backend("torch", ema_ipt.device).triplet_scores(layout, ema_ipt, ema_unc)


def mask_lams(lams, keep: Tensor, backend: str | None = None) -> None:
    """Zero-fill the λ entries that ``keep`` (all layers, concatenated) drops."""
    name = resolve_backend(backend, keep.device)
    get_backend(name, keep.device).mask_lams(lams, keep)


def threshold_keep(scores: Tensor, k: int) -> Tensor:
    """``~(scores <= kthvalue(scores, k))``: PEFT's ``masked_fill(score <= kth)`` (ties at the threshold are
    dropped, a NaN score is kept, as in PEFT); all kept if k = 0."""
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    return ~(scores <= torch.kthvalue(scores, k).values)
