"""``rank_report``: where the rank budget went, per layer, for our layers and for PEFT's (accelerated or not)."""

from __future__ import annotations

import torch
from torch import nn

from ..modules import AdaLoRALinear


def _layers(model: nn.Module, adapter: str | None):
    """(name, init_r, the kept flags) of every AdaLoRA layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdaLoRALinear):
            yield name, module.init_r, module.rank_mask & (module.lam != 0)
        elif hasattr(module, "lora_E") and hasattr(module, "ranknum"):  # PEFT's AdaLoraLayer
            names = [adapter] if adapter is not None else list(module.lora_E)
            for a in names:
                if a in module.lora_E:
                    lam = module.lora_E[a].detach().view(-1)
                    yield name, int(module.r[a]) if hasattr(module, "r") else lam.numel(), lam != 0


@torch.no_grad()
def rank_report(model: nn.Module, adapter: str | None = None) -> list[dict]:
    """Per AdaLoRA layer: ``layer`` (its name), ``module`` (the last part of the name: q_proj, c_attn, ...),
    ``init_r``, ``kept_r`` (ranks whose λ is nonzero and not masked) and ``share`` (kept_r over the ranks kept in
    all layers). One host copy for the whole model."""
    rows = list(_layers(model, adapter))
    if not rows:
        raise ValueError("model: no AdaLoRA layer found")
    kept = torch.stack([flags.sum() for _, _, flags in rows]).tolist()  # one sync
    total = sum(kept) or 1
    return [
        {"layer": name, "module": name.rsplit(".", 1)[-1], "init_r": init_r, "kept_r": k, "share": k / total}
        for (name, init_r, _), k in zip(rows, kept)
    ]


def kept_by_module(report: list[dict]) -> dict[str, int]:
    """The kept ranks summed per module type (q_proj, v_proj, ...)."""
    out: dict[str, int] = {}
    for row in report:
        out[row["module"]] = out.get(row["module"], 0) + row["kept_r"]
    return out
