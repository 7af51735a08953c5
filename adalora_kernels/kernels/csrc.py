"""The csrc backend: the C++ (CPU) and CUDA ops of ``csrc/``, registered as ``torch.ops.adalora_kernels.csrc_*``.

Importing this module loads the extension; a missing or broken build makes the import fail, which the
backend registry logs once and auto selection skips.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (registers the ops)
from . import torch_composite
from .layout import FlatLayout
from .torch_composite import mask_lams, triplet_scores

__all__ = [
    "dropout_keep_mask",
    "layer_call",
    "linear_backward",
    "linear_forward",
    "mask_lams",
    "sensitivity_update",
    "triplet_scores",
]

_ops = torch.ops.adalora_kernels


def unavailable_reason(device: torch.device) -> str | None:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is None or not torch._C._dispatch_has_kernel_for_dispatch_key("adalora_kernels::csrc_linear_fwd", key):
        return f"the native extension was built without {device.type} kernels"
    return None


def dropout_keep_mask(shape: tuple[int, int], dropout_p: float, seed: int, device: torch.device) -> Tensor:
    return _ops.csrc_dropout_keep_mask(torch.empty(0, device=device), shape[0], shape[1], dropout_p, seed)


def linear_forward(x2, weight, bias, P, lam_eff, Q, dropout_p, seed):
    return _ops.csrc_linear_fwd(x2, weight, bias, P, lam_eff, Q, dropout_p, seed)


def layer_call(x, weight, bias, P, lam, Q, rank_mask, scaling: float, dropout_p: float, seed: int) -> Tensor:
    """A whole eager layer call, autograd included, in one op (``csrc/autograd.cpp``): ``lam_eff`` from
    ``lam``, ``rank_mask`` and ``scaling``, x of any leading shape; ``seed < 0`` draws from torch's generator."""
    return _ops.csrc_adalora_linear(x, weight, bias, P, lam, Q, rank_mask, scaling, dropout_p, seed)


def linear_backward(g2, x2, weight, P, lam_eff, Q, t, dropout_p, seed, need_dx, need_adapter):
    dx, dP, dlam, dQ = _ops.csrc_linear_bwd(g2, x2, weight, P, lam_eff, Q, t, dropout_p, seed, need_dx, need_adapter)
    return (dx if need_dx else None, *((v if need_adapter else None) for v in (dP, dlam, dQ)))


def sensitivity_update(layout: FlatLayout, params, grads, ema_ipt, ema_unc, beta1: float, beta2: float) -> Tensor:
    if ema_ipt.dtype not in (torch.float32, torch.float64):
        # 16-bit adapters: the C++ kernels hold float32/float64; the whole-buffer ops round each step in the
        # adapter dtype, as PEFT does, and stay on the device
        return torch_composite.sensitivity_update(layout, params, grads, ema_ipt, ema_unc, beta1, beta2)
    flat = [t for triple in params for t in triple]
    ipt_views = [t for triple in layout.views(ema_ipt) for t in triple]
    unc_views = [t for triple in layout.views(ema_unc) for t in triple]
    return _ops.csrc_sensitivity_update(
        flat, [g for triple in grads for g in triple], ipt_views, unc_views, beta1, beta2
    )
