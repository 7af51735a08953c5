"""Flat layout of the allocator's per-element state over every layer's ``(P, λ, Q)``.

All P's come first, grouped by shape, then every λ in layer order, then all Q's grouped by shape. An
elementwise step is then one op over the whole buffer. A shape group is one 3-D view, so the means that
make a triplet score are one reduction per group, over the same rows and columns as PEFT's per-layer
``mean``. Backends that work per tensor (Triton) use ``views``.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor


class FlatLayout:
    def __init__(self, shapes: list[tuple[int, int, int]], dtype: torch.dtype, device: torch.device) -> None:
        """``shapes``: ``(out, r, in)`` of each layer, in layer order."""
        self.shapes, self.dtype, self.device = shapes, dtype, device
        self._views: dict[tuple, list[tuple[Tensor, Tensor, Tensor]]] = {}  # see views()
        self.ranks = [r for _, r, _ in shapes]
        self.total_r = sum(self.ranks)
        starts = [0]
        for r in self.ranks:
            starts.append(starts[-1] + r)
        self.triplet_start = starts[:-1]
        p_groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        q_groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for layer, (out_f, r, in_f) in enumerate(shapes):
            p_groups[(out_f, r)].append(layer)
            q_groups[(r, in_f)].append(layer)
        offset = 0
        self.p_offset, self.q_offset, self.lam_offset = [0] * len(shapes), [0] * len(shapes), [0] * len(shapes)
        self.p_groups, self.q_groups = [], []  # (start, n, (out, r) or (r, in), layers)
        for (out_f, r), layers in p_groups.items():
            self.p_groups.append((offset, len(layers), (out_f, r), layers))
            for layer in layers:
                self.p_offset[layer], offset = offset, offset + out_f * r
        self.lam_start = offset
        for layer, r in enumerate(self.ranks):
            self.lam_offset[layer], offset = offset, offset + r
        for (r, in_f), layers in q_groups.items():
            self.q_groups.append((offset, len(layers), (r, in_f), layers))
            for layer in layers:
                self.q_offset[layer], offset = offset, offset + r * in_f
        self.numel = offset
        # grouped means come out in group order; these gather them back into triplet (layer) order
        self.p_gather = self._gather_index([g[3] for g in self.p_groups])
        self.q_gather = self._gather_index([g[3] for g in self.q_groups])

    def _gather_index(self, group_layers: list[list[int]]) -> Tensor:
        position = {}
        cursor = 0
        for layers in group_layers:
            for layer in layers:
                position[layer] = cursor
                cursor += self.ranks[layer]
        index = [position[layer] + i for layer, r in enumerate(self.ranks) for i in range(r)]
        return torch.tensor(index, dtype=torch.long, device=self.device)

    def zeros(self) -> Tensor:
        return torch.zeros(self.numel, dtype=self.dtype, device=self.device)

    def views(self, flat: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """``(P, λ, Q)``-shaped views of a flat buffer, one triple per layer. Made once per buffer (the EMAs are
        viewed every step): the cached views hold the buffer's storage, so a tensor at the same address with the
        same size, dtype and stride is that storage."""
        key = (flat.data_ptr(), flat.device, flat.dtype, flat.shape, flat.stride())
        cached = self._views.get(key)
        if cached is not None:
            return cached
        if len(self._views) >= 4:  # the two EMAs and a spare or two: forget buffers no longer used
            self._views.clear()
        self._views[key] = out = self._make_views(flat)
        return out

    def _make_views(self, flat: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        out = []
        for layer, (out_f, r, in_f) in enumerate(self.shapes):
            p, lam, q = self.p_offset[layer], self.lam_offset[layer], self.q_offset[layer]
            out.append(
                (flat[p : p + out_f * r].view(out_f, r), flat[lam : lam + r], flat[q : q + r * in_f].view(r, in_f))
            )
        return out

    def gather(self, triples: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
        """One flat tensor holding ``triples`` (per-layer ``(P, λ, Q)``) in this layout."""
        order = [triples[layer][0] for *_, layers in self.p_groups for layer in layers]
        order += [lam for _, lam, _ in triples]
        order += [triples[layer][2] for *_, layers in self.q_groups for layer in layers]
        return torch.cat([t.reshape(-1) for t in order])

    def triplet_scores(self, s: Tensor) -> Tensor:
        """``S_i = s(λ)_i + (mean_in s(Q)_i + mean_out s(P)_i)`` per triplet, in layer order, from element
        scores ``s`` in this layout."""
        p_means = [s[st : st + n * o * r].view(n, o, r).mean(dim=1).reshape(-1) for st, n, (o, r), _ in self.p_groups]
        q_means = [s[st : st + n * r * i].view(n, r, i).mean(dim=2).reshape(-1) for st, n, (r, i), _ in self.q_groups]
        mean_p = torch.cat(p_means)[self.p_gather]
        mean_q = torch.cat(q_means)[self.q_gather]
        return s[self.lam_start : self.lam_start + self.total_r] + (mean_q + mean_p)
