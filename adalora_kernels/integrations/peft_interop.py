"""``accelerate_peft``: make a PEFT AdaLoRA model compute through our op and allocator, in place.

The user's PEFT parameters (``lora_A``, ``lora_E``, ``lora_B``) stay the very same tensors, so their
optimizer, ``save_pretrained`` and ``PeftModel.from_pretrained`` keep working; the same
``model.base_model.update_and_allocate(step)`` call runs our allocator and writes PEFT's ``rank_pattern``.
"""

from __future__ import annotations

import warnings
from functools import cache

import torch
from torch import Tensor, nn

from ..modules.allocator import RankAllocator, _Triplet
from ..modules.linear import is_conv1d
from ..modules.orthogonal import orthogonal_regularization_of
from ..ops import adalora_linear


@cache
def _accelerated_class(peft_cls: type) -> type:
    """A subclass of PEFT's ``SVDLinear`` whose forward runs our fused op (PEFT's own for anything unusual)."""

    def forward(self, x: Tensor, *args, **kwargs):
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        base = self.get_base_layer()
        if self.disable_adapters or self.merged or args or kwargs or len(adapters) != 1 or x.dtype != base.weight.dtype:
            return peft_cls.forward(self, x, *args, **kwargs)
        a = adapters[0]
        P, lam, Q = self.lora_B[a], self.lora_E[a].view(-1), self.lora_A[a]
        if P.dtype != x.dtype:  # PEFT keeps fp32 adapters beside a 16-bit base: compute them in x's dtype
            P, lam, Q = P.to(x.dtype), lam.to(x.dtype), Q.to(x.dtype)
        dropout = self.lora_dropout[a]
        return adalora_linear(
            x,
            base.weight.T if self.fan_in_fan_out else base.weight,
            base.bias,
            P,
            lam,
            Q,
            scaling=self._ak_scaling[a],
            dropout_p=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
            training=self.training,
            backend=self._ak_backend,
        )

    return type(f"Accelerated{peft_cls.__name__}", (peft_cls,), {"forward": forward})


def _adapter_layers(model: nn.Module, adapter: str):
    from peft.tuners.adalora import AdaLoraLayer

    for name, module in model.named_modules():
        if isinstance(module, AdaLoraLayer) and adapter in module.lora_A:
            yield name, module


def accelerate_peft(peft_model: nn.Module, *, backend: str | None = None) -> nn.Module:
    """Accelerate a PEFT AdaLoRA model in place and return it (see the module docstring)."""
    from peft.tuners.adalora import AdaLoraModel, SVDLinear

    base_model = getattr(peft_model, "base_model", None)
    if not isinstance(base_model, AdaLoraModel):
        raise TypeError(
            f"peft_model: expected a PEFT model with an AdaLoRA adapter (get_peft_model(model, AdaLoraConfig(...))), "
            f"got {type(peft_model).__name__}"
        )
    if getattr(base_model, "_ak_accelerated", False):
        return peft_model
    adapter = getattr(base_model, "trainable_adapter_name", None) or base_model.active_adapters[0]
    cfg = base_model.peft_config[adapter]
    skipped, triplets = [], []
    for name, module in _adapter_layers(base_model.model, adapter):
        triplets.append(_Triplet(name, module.lora_B[adapter], module.lora_E[adapter], module.lora_A[adapter], None))
        layer_base = module.get_base_layer()
        if type(module) is SVDLinear and (isinstance(layer_base, nn.Linear) or is_conv1d(layer_base)):
            module.__class__ = _accelerated_class(SVDLinear)
            module._ak_backend = backend
            # ranknum is constant for the run: read it once here, not in every forward
            module._ak_scaling = {a: module.scaling[a] / (float(module.ranknum[a]) + 1e-5) for a in module.lora_A}
        else:
            skipped.append(f"{name} ({type(module).__name__} over {type(layer_base).__name__})")
    if skipped:
        warnings.warn(
            f"accelerate_peft: these layers stay PEFT's (not accelerated): {', '.join(skipped)}", stacklevel=2
        )
    if not cfg.inference_mode:
        _replace_allocator(base_model, cfg, adapter, triplets, backend)
        _replace_orthogonal_regularization(base_model, cfg, triplets)
    base_model._ak_accelerated = True
    return peft_model


def _replace_allocator(base_model, cfg, adapter: str, triplets: list[_Triplet], backend: str | None) -> None:
    allocator = RankAllocator(
        None, triplets=triplets, target_r=cfg.target_r, total_step=cfg.total_step, tinit=cfg.tinit,
        tfinal=cfg.tfinal, deltaT=cfg.deltaT, beta1=cfg.beta1, beta2=cfg.beta2, backend=backend,
    )  # fmt: skip

    def update_and_allocate(global_step: int) -> int:
        budget = allocator.update_and_allocate(global_step)
        if allocator.masked_last_step:  # PEFT's config holds the pattern under its parameter names
            cfg.rank_pattern = {f"{name}.lora_E.{adapter}": kept for name, kept in allocator.rank_pattern.items()}
        return budget

    base_model.update_and_allocate = update_and_allocate
    base_model.rankallocator = allocator


def _replace_orthogonal_regularization(base_model, cfg, triplets: list[_Triplet]) -> None:
    Ps, Qs = [t.P for t in triplets], [t.Q for t in triplets]

    def forward(*args, **kwargs):
        outputs = base_model.model.forward(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        if isinstance(loss, torch.Tensor):
            if cfg.orth_reg_weight < 0:
                raise ValueError(f"orth_reg_weight: expected a value >= 0, got {cfg.orth_reg_weight}")
            outputs.loss = loss + cfg.orth_reg_weight * orthogonal_regularization_of(Ps, Qs)
        return outputs

    base_model.forward = forward
