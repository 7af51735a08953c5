"""The rank allocator over FSDP2-sharded adapters (``fully_shard``: DTensor, ``Shard(0)``).

Each rank updates the EMAs of its own shards. P's rows are split, so each rank holds partial column sums;
λ and Q are split by rank index, so each rank holds the full terms of the ranks it owns. The three partial
r-vectors of every layer go into one ``all_reduce``, after which every rank has the same triplet scores,
takes the same threshold and masks its own λ shard the same way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_sharded(p: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(p, DTensor)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if is_sharded(t) else t


def _row_offset(p: Tensor) -> int:
    """Global index of the first local row of a ``Shard(0)`` parameter."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not is_sharded(p):
        return 0
    if any(not (isinstance(pl, Shard) and pl.dim == 0) for pl in p.placements if not pl.is_replicate()):
        raise ValueError(f"adapter parameter: expected FSDP2's Shard(0) placement, got {p.placements}")
    return compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)[1][0]


def zero_emas(triplets) -> list[tuple[Tensor, Tensor, Tensor]]:
    return [tuple(torch.zeros_like(_local(p)).view(_local(p).shape) for p in (t.P, t.lam, t.Q)) for t in triplets]


def _ema(p: Tensor, g: Tensor, avg: Tensor, unc: Tensor, beta1: float, beta2: float) -> Tensor:
    """PEFT's update, op by op, in place on the shard's EMAs; returns the element scores."""
    ipt = (p * g).abs()
    avg.mul_(beta1).add_(ipt * (1 - beta1))
    unc.mul_(beta2).add_((ipt - avg).abs() * (1 - beta2))
    return avg * unc


def _scores(triplets, element_scores) -> Tensor:
    """All-reduce the partial (s(λ), mean_in s(Q), Σ_out s(P)) r-vectors of every layer; return the scores."""
    parts, outs = [], []
    for t, (sP, sL, sQ) in zip(triplets, element_scores):
        r = t.lam.numel()
        full = torch.zeros(3, r, dtype=sP.dtype, device=sP.device)
        lo = _row_offset(t.lam)
        full[0, lo : lo + sL.numel()] = sL.view(-1)
        lo = _row_offset(t.Q)
        full[1, lo : lo + sQ.shape[0]] = sQ.mean(dim=1)
        full[2] = sP.sum(dim=0)
        parts.append(full)
        outs.append(torch.full((r,), float(t.P.shape[0]), dtype=sP.dtype, device=sP.device))
    total = torch.cat(parts, dim=1)
    group = triplets[0].P.device_mesh.get_group() if is_sharded(triplets[0].P) else None
    dist.all_reduce(total, group=group)
    return total[0] + (total[1] + total[2] / torch.cat(outs))


def sensitivity_update(triplets, grads, ema_ipt, ema_unc, beta1: float, beta2: float) -> Tensor:
    element_scores = []
    for t, g, avg, unc in zip(triplets, grads, ema_ipt, ema_unc):
        shards = zip((t.P, t.lam, t.Q), g, avg, unc)
        element_scores.append(
            tuple(_ema(_local(p), _local(d).view(a.shape), a, u, beta1, beta2) for p, d, a, u in shards)
        )
    return _scores(triplets, element_scores)


def triplet_scores(triplets, ema_ipt, ema_unc) -> Tensor:
    return _scores(triplets, [tuple(a * u for a, u in zip(avg, unc)) for avg, unc in zip(ema_ipt, ema_unc)])


@torch.no_grad()
def mask_lams(triplets, keep: Tensor) -> None:
    """Zero-fill, on every rank, the entries of its own λ shard that ``keep`` drops."""
    start = 0
    for t in triplets:
        r = t.lam.numel()
        lam = _local(t.lam).view(-1)
        lo = _row_offset(t.lam)
        lam.masked_fill_(~keep[start + lo : start + lo + lam.numel()], 0.0)
        start += r
