"""AdaLoRA's orthogonal regulariser, batched: one ``bmm`` per distinct adapter shape, not a loop per layer."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

from .linear import AdaLoRALinear


def orthogonal_regularization_of(Ps, Qs) -> Tensor:
    """``mean over all P and Q of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F`` (Frobenius, not squared), as PEFT.

    ``Ps``: (out, r) tensors; ``Qs``: (r, in) tensors. Equal shapes are stacked as they are (no transposed
    copies, so their gradients flow back in the parameters' own layout) and handled by one batched product.
    """
    groups: dict[tuple, list[Tensor]] = defaultdict(list)
    for P in Ps:
        groups[("P", tuple(P.shape), P.dtype, P.device)].append(P)
    for Q in Qs:
        groups[("Q", tuple(Q.shape), Q.dtype, Q.device)].append(Q)
    count = sum(len(g) for g in groups.values())
    if count == 0:
        raise ValueError("orthogonal_regularization: no adapter matrices given")
    total = None
    for (kind, *_), mats in groups.items():
        stack = torch.stack(mats)
        cov = torch.bmm(stack.transpose(1, 2), stack) if kind == "P" else torch.bmm(stack, stack.transpose(1, 2))
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        part = torch.linalg.matrix_norm(cov - eye, ord="fro").sum()
        total = part if total is None else total + part.to(total.device)
    return total / count


def orthogonal_regularization(model: nn.Module) -> Tensor:
    """PEFT's orthogonal regularisation over every ``AdaLoRALinear`` in ``model``; add ``weight *`` it to
    the loss (PEFT's ``orth_reg_weight`` defaults to 0.5)."""
    layers = [m for m in model.modules() if isinstance(m, AdaLoRALinear)]
    if not layers:
        raise ValueError("model: no AdaLoRALinear layer found")
    return orthogonal_regularization_of([m.P for m in layers], [m.Q for m in layers])
