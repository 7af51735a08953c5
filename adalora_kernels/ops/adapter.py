"""``adalora_adapter``: AdaLoRA's adapter added onto the output of any frozen base layer, which runs its own forward
(bitsandbytes' 4-bit and 8-bit layers, a subclass with a forward of its own). The ``adalora_kernels::adapter_fwd`` /
``adapter_bwd`` custom ops compute the adapter alone, by the backend's kernels (the Triton backends: the split route's
streaming passes; the torch backend: ATen); the base layer's gradient comes from its own autograd.

    y = base_out + cast(s · ((drop(x_a) Qᵀ) ⊙ (λ ⊙ m)) Pᵀ)

``x_a`` is x in the adapters' dtype and the adapter's product is cast to ``base_out``'s dtype, as PEFT's quantised
AdaLoRA layers do. Saved for backward: x (already kept by the base layer), t (M×r) and the seed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import get_backend
from ..reference import effective_lam
from .adalora_linear import _check_tensor_args, _seed_tensor, adapter_by_aten, differentiable_backward
from .backend import requested, resolve_backend, runnable


def adapter_backend(backend: str | None, device: torch.device) -> str:
    """The backend that computes the adapter alone on ``device``: the one asked for (which must have adapter
    kernels), or auto's first that has them (the csrc extension has none: the torch backend runs there)."""
    name = resolve_backend(backend, device)
    if hasattr(get_backend(name, device), "adapter_forward"):
        return name
    if requested(backend) != "auto":
        raise ValueError(f"backend: {name!r} has no adapter-only kernels; use 'triton', 'triton_split' or 'torch'")
    return next(b for b in runnable(device) if hasattr(get_backend(b, device), "adapter_forward"))


def _rows(x: Tensor) -> Tensor:
    return x.reshape(x.shape[:-1].numel(), x.shape[-1])


@torch.library.custom_op("adalora_kernels::adapter_fwd", mutates_args=())
def adapter_fwd(
    x: Tensor, P: Tensor, lam_eff: Tensor, Q: Tensor, dropout_p: float, seed: Tensor, backend: str
) -> tuple[Tensor, Tensor]:
    ad, t = get_backend(backend, x.device).adapter_forward(_rows(x), P, lam_eff, Q, dropout_p, int(seed))
    return ad.reshape(*x.shape[:-1], P.shape[0]), t


@adapter_fwd.register_fake
def _(x, P, lam_eff, Q, dropout_p, seed, backend):
    return x.new_empty(*x.shape[:-1], P.shape[0]), x.new_empty(x.shape[:-1].numel(), Q.shape[0])


@torch.library.custom_op("adalora_kernels::adapter_bwd", mutates_args=())
def adapter_bwd(
    grad: Tensor, x: Tensor, P: Tensor, lam_eff: Tensor, Q: Tensor, t: Tensor, dropout_p: float, seed: Tensor,
    backend: str, need_dx: bool, need_adapter: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    kernels = get_backend(backend, x.device)
    x2, g2 = _rows(x), grad.reshape(x.shape[:-1].numel(), P.shape[0])
    dx, dP, dlam, dQ = kernels.adapter_backward(g2, x2, P, lam_eff, Q, t, dropout_p, int(seed), need_dx, need_adapter)
    empty = x.new_empty(0)
    return (dx.reshape(x.shape) if dx is not None else empty, *(v if v is not None else empty for v in (dP, dlam, dQ)))


@adapter_bwd.register_fake
def _(grad, x, P, lam_eff, Q, t, dropout_p, seed, backend, need_dx, need_adapter):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty(0)
    if not need_adapter:
        return dx, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    return dx, torch.empty_like(P), torch.empty_like(lam_eff), torch.empty_like(Q)


def _setup_context(ctx, inputs, output):
    x, P, lam_eff, Q, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, P, lam_eff, Q, output[1], seed)
    ctx.dropout_p, ctx.backend = dropout_p, backend


def _backward(ctx, grad, _grad_t=None):
    x, P, lam_eff, Q, t, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dx, need_adapter = need[0], need[1] or need[2] or need[3]
    if not (need_dx or need_adapter):
        return None, None, None, None, None, None, None
    if torch.is_grad_enabled():  # backward(create_graph=True): gradients autograd can differentiate again
        dx, dP, dlam, dQ = differentiable_backward(grad, x, None, P, lam_eff, Q, ctx.dropout_p, int(seed), need_dx,
                                                   need_adapter)  # fmt: skip
    else:
        dx, dP, dlam, dQ = adapter_bwd(grad.contiguous(), x, P, lam_eff, Q, t, ctx.dropout_p, seed, ctx.backend,
                                       need_dx, need_adapter)  # fmt: skip
    return (dx if need_dx else None, *(v if n else None for v, n in zip((dP, dlam, dQ), need[1:4])), None, None, None)


adapter_fwd.register_autograd(_backward, setup_context=_setup_context)


def adalora_adapter(
    x: Tensor,
    base_out: Tensor,
    P: Tensor,
    lam: Tensor,
    Q: Tensor,
    *,
    scaling: float,
    rank_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """``base_out + s · ((drop(x) Qᵀ) ⊙ (λ ⊙ m)) Pᵀ`` for a base layer that ran its own forward (``base_out``:
    ``(..., out)``). The adapter is computed in P's dtype from x cast to it, and its product is cast to
    ``base_out``'s dtype before the add (PEFT's quantised layers); the base layer's gradients flow through
    ``base_out`` by its own autograd."""
    _check_tensor_args(x=x, base_out=base_out, P=P, lam=lam, Q=Q, rank_mask=rank_mask)
    out_f, r = P.shape if P.dim() == 2 else (None, None)
    if P.dim() != 2 or lam.shape != (r,) or Q.dim() != 2 or Q.shape[0] != r:
        raise ValueError(f"P, lam, Q: expected (out, r), (r,), (r, in), got {tuple(P.shape)}, {tuple(lam.shape)}, "
                         f"{tuple(Q.shape)}")  # fmt: skip
    if x.shape[-1] != Q.shape[1] or base_out.shape != (*x.shape[:-1], out_f):
        raise ValueError(f"x, base_out: expected (..., {Q.shape[1]}) and (..., {out_f}) with the same leading sizes, "
                         f"got {tuple(x.shape)} and {tuple(base_out.shape)}")  # fmt: skip
    if lam.dtype != P.dtype or Q.dtype != P.dtype or not P.is_floating_point():
        raise TypeError(f"P, lam, Q: expected one floating dtype, got {P.dtype}, {lam.dtype}, {Q.dtype}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    p = float(dropout_p) if training else 0.0
    name = adapter_backend(backend, x.device)
    seed_t = _seed_tensor(seed) if (p > 0.0 or seed is not None) else torch.zeros((), dtype=torch.int64)
    x_a = x if x.dtype == P.dtype else x.to(P.dtype)
    lam_eff = effective_lam(lam, rank_mask, float(scaling))
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():  # torch.func transforms
        return base_out + adapter_by_aten(x_a, P, lam_eff, Q, p, int(seed_t)).to(base_out.dtype)
    ad, _ = adapter_fwd(x_a, P, lam_eff, Q, p, seed_t, name)
    return base_out + ad.to(base_out.dtype)
