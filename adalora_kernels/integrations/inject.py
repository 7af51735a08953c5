"""``inject_adalora``: put ``AdaLoRALinear`` in place of matching layers of any PyTorch/transformers model."""

from __future__ import annotations

import difflib
import re

from torch import nn

from ..modules import AdaLoRALinear, AdaLoRAQuantizedLinear
from ..modules.linear import check_adapter_args, is_conv1d, quantized_kind, unfusable_reason


def _matches(name: str, target_modules: str | list[str]) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list matches a name equal to an
    entry or ending in ``.entry``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _check_targets(model: nn.Module, target_modules: str | list[str]) -> None:
    names = [n for n, _ in model.named_modules() if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not entries:
        raise ValueError("target_modules: expected a regex or a non-empty list of module names")
    for entry in entries:
        if not any(_matches(n, entry if isinstance(target_modules, str) else [entry]) for n in names):
            near = difflib.get_close_matches(entry, leaves + names, n=5, cutoff=0.5)
            hint = f"near matches: {near}" if near else f"module names look like: {names[:8]}"
            raise ValueError(f"target_modules: {entry!r} matches no module of {type(model).__name__}; {hint}")


def inject_adalora(
    model: nn.Module,
    target_modules: str | list[str],
    *,
    init_r: int = 12,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    backend: str | None = None,
) -> list[str]:
    """Replace the modules matching ``target_modules`` (PEFT's rules: names, ``.suffix`` matches, or one regex
    over the full name) with ``AdaLoRALinear`` sharing their weights (``nn.Linear`` and transformers' ``Conv1D``),
    or ``AdaLoRAQuantizedLinear`` around them (bitsandbytes' ``Linear4bit`` nf4/fp4 and ``Linear8bitLt``: float32
    adapters, as PEFT's); freeze everything but the adapters; return the replaced names."""
    if isinstance(target_modules, (list, tuple, set)):
        target_modules = list(target_modules)
    elif not isinstance(target_modules, str):
        raise TypeError(
            f"target_modules: expected a regex string or a list of names, got {type(target_modules).__name__}"
        )
    check_adapter_args(init_r, lora_alpha, lora_dropout, backend)
    _check_targets(model, target_modules)
    chosen = [(n, m) for n, m in model.named_modules() if n and _matches(n, target_modules)]
    for name, module in chosen:
        if isinstance(module, AdaLoRALinear):
            raise ValueError(f"target_modules: {name} is already an AdaLoRALinear")
        parent_name, _, child = name.rpartition(".")
        if child == "out_proj" and isinstance(model.get_submodule(parent_name), nn.MultiheadAttention):
            raise TypeError(
                f"target_modules: {name} is the output projection of an nn.MultiheadAttention, whose forward reads "
                "its weight directly (F.multi_head_attention_forward) and never calls it: an adapter there would "
                "never run; leave it out of target_modules"
            )
        if quantized_kind(module):
            continue  # bitsandbytes' Linear4bit / Linear8bitLt: the adapter around the base's own forward
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise TypeError(
                f"target_modules: {name} is a {type(module).__name__}; only nn.Linear, transformers' Conv1D and "
                "bitsandbytes' Linear4bit and Linear8bitLt can take an AdaLoRA adapter"
            )
        reason = unfusable_reason(module)
        if reason:
            raise TypeError(
                f"target_modules: {name}: {reason}; the adapter would replace that forward with F.linear of its "
                "weight (use PEFT's AdaLoRA and accelerate_peft, which keeps such layers' own forward)"
            )
    model.requires_grad_(False)
    replaced = []
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        kw = {"init_r": init_r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "backend": backend}
        if quantized_kind(module):
            layer = AdaLoRAQuantizedLinear.from_base(module, **kw)
        else:
            layer = AdaLoRALinear.from_linear(module, **kw)
        setattr(parent, child, layer)
        replaced.append(name)
    for module in model.modules():  # every adapter trains, including those injected by an earlier call
        if isinstance(module, AdaLoRALinear):
            for p in (module.P, module.lam, module.Q):
                p.requires_grad_(True)
    return replaced
