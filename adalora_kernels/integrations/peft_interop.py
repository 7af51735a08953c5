"""``accelerate_peft``: make a PEFT AdaLoRA model compute through our op and allocator, in place.

Nothing of PEFT's state is copied. The model's classes are swapped for real subclasses of PEFT's
(``integrations.peft_classes``: picklable, deep-copyable), whose methods read PEFT's live attributes on every
call: the active adapters, ``scaling`` and ``ranknum``, the dropout modules, the merged and disabled flags, the
config's schedule. The user's PEFT parameters stay the very same tensors, so their optimizer,
``save_pretrained`` and ``PeftModel.from_pretrained`` keep working, and the same
``model.base_model.update_and_allocate(step)`` call runs our allocator and writes PEFT's ``rank_pattern``.
"""

from __future__ import annotations

import logging
import warnings

from torch import nn

from ..kernels import check_backend_name
from ..modules.linear import unfusable_reason

log = logging.getLogger("adalora_kernels")


NUMERICS = ("auto", "peft", "fused")


def _quantized_classes() -> dict:
    """PEFT's bitsandbytes AdaLoRA classes → ours, where bitsandbytes is installed."""
    try:
        from .peft_quantized import QUANTIZED
    except ImportError:  # no bitsandbytes: PEFT has no such layers either
        return {}
    return QUANTIZED


def accelerate_peft(
    peft_model: nn.Module, *, backend: str | None = None, numerics: str = "auto", verbose: bool = False
) -> nn.Module:
    """Accelerate a PEFT AdaLoRA model in place and return it (see the module docstring).

    Every ``SVDLinear`` over an ``nn.Linear`` or ``Conv1D`` runs the fused op whenever it can reproduce PEFT's
    forward, and PEFT's own forward otherwise (hooks on the base layer, several active adapters, a merged or
    disabled adapter, an input dtype PEFT would cast); other adapter layers stay PEFT's. ``verbose`` prints
    how many layers are fused (the same line is logged at INFO). Validates everything before changing the
    model: a failed call leaves it as it was.

    ``numerics``: how a forward without dropout rounds. ``"peft"``: as PEFT's (its rank-r GEMMs in its order,
    the output PEFT's bit for bit where the GEMM library runs them the same way; the backward stays fused);
    ``"fused"``: our kernels' rounding (fp32-accurate, not PEFT's bits, the fastest); ``"auto"``: ``"peft"`` on
    the CPU, ``"fused"`` on GPUs. With dropout the masks are ours, so the fused kernels always run.
    """
    from peft.mixed_model import PeftMixedModel
    from peft.tuners.adalora import AdaLoraModel, SVDLinear

    from . import peft_classes

    if isinstance(peft_model, PeftMixedModel):
        raise TypeError(
            "peft_model: a PeftMixedModel mixes adapter types, which accelerate_peft does not fuse; build the "
            "AdaLoRA model with peft.get_peft_model(model, AdaLoraConfig(...)) (one adapter type) instead"
        )
    check_backend_name(backend)
    if numerics not in NUMERICS:
        raise ValueError(f"numerics: expected one of {NUMERICS}, got {numerics!r}")
    base_model = getattr(peft_model, "base_model", None)
    if not isinstance(base_model, AdaLoraModel):
        raise TypeError(
            f"peft_model: expected a PEFT model with an AdaLoRA adapter (get_peft_model(model, AdaLoraConfig(...))), "
            f"got {type(peft_model).__name__}"
        )
    if isinstance(base_model, peft_classes.FusedAdaLoraModel):
        return peft_model
    quantized = _quantized_classes()
    fused, skipped = [], []
    for name, module in base_model.model.named_modules():
        if not isinstance(module, peft_classes.AdaLoraLayer):
            continue
        layer_base = module.get_base_layer()
        reason = unfusable_reason(layer_base)
        # a quantised base runs its own forward (the adapter is ours); a linear base is fused whole
        if type(module) in quantized or (type(module) is SVDLinear and not reason):
            fused.append(module)
        else:
            why = f": {reason}" if type(module) is SVDLinear else ""
            skipped.append(f"{name} ({type(module).__name__} over {type(layer_base).__name__}{why})")
    allocator = None
    trainable = getattr(base_model, "trainable_adapter_name", None)
    if trainable is not None and not base_model.peft_config[trainable].inference_mode:
        # built (and so validated) before anything changes
        allocator = peft_classes.FusedRankAllocator(
            base_model.model, base_model.peft_config[trainable], trainable, backend=backend,
            like=getattr(base_model, "rankallocator", None),
        )  # fmt: skip
    for module in fused:
        module.__class__ = quantized.get(type(module), peft_classes.FusedSVDLinear)
        module._ak_backend, module._ak_numerics = backend, numerics
    if allocator is not None:
        base_model.rankallocator = allocator
    base_model.__class__ = peft_classes.FusedAdaLoraModel
    message = f"accelerate_peft: {len(fused)} of {len(fused) + len(skipped)} AdaLoRA layers fused"
    log.info(message)
    if verbose:
        print(message)
    if skipped:
        warnings.warn(
            f"accelerate_peft: these layers stay PEFT's (not accelerated): {', '.join(skipped)}", stacklevel=2
        )
    return peft_model
