"""The classes ``accelerate_peft`` gives PEFT's AdaLoRA layers over bitsandbytes bases (``SVDLinear4bit``,
``SVDLinear8bitLt``): the base layer runs its own forward (bitsandbytes' 4-bit or int8 matmul) and the adapter is
added by our kernels (``adalora_adapter``), with PEFT's casts: the 4-bit layer computes the adapter in its dtype
from x cast to it, the 8-bit one from x in float32, and both cast the product to the base output's dtype before
the add. PEFT's own forward runs where ours would not give its result: several or no active adapters, disabled
adapters, extra arguments, a dropout module of another kind, and autocast (PEFT casts nothing there)."""

from __future__ import annotations

import torch
from peft.tuners.adalora.bnb import SVDLinear4bit, SVDLinear8bitLt
from torch import Tensor, nn

from ..ops import adalora_adapter
from .peft_classes import FusedSVDLinear

__all__ = ["QUANTIZED", "FusedSVDLinear4bit", "FusedSVDLinear8bitLt"]


class _FusedQuantized:
    _ak_backend: str | None = None
    _scale = FusedSVDLinear._scale

    def fusable(self, x: Tensor) -> str:
        """The adapter the fused path computes for ``x``, or ``""`` when PEFT's own forward must run."""
        if self.disable_adapters or torch.is_autocast_enabled():
            return ""
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1 or not isinstance(self.lora_dropout[active[0]], (nn.Dropout, nn.Identity)):
            return ""
        return active[0]

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        adapter = "" if (args or kwargs) else self.fusable(x)
        if not adapter:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        dropout = self.lora_dropout[adapter]
        drop = isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0
        return adalora_adapter(
            self._adapter_input(x, self.lora_A[adapter].dtype), result, self.lora_B[adapter],
            self.lora_E[adapter].view(-1), self.lora_A[adapter], scaling=self._scale(adapter),
            dropout_p=dropout.p if drop else 0.0, training=drop, backend=self._ak_backend,
        )  # fmt: skip


class FusedSVDLinear4bit(_FusedQuantized, SVDLinear4bit):
    """PEFT's ``SVDLinear4bit``; the adapter by our kernels."""

    def _adapter_input(self, x: Tensor, adapter_dtype: torch.dtype) -> Tensor:
        return self._cast_input_dtype(x, adapter_dtype)  # PEFT's cast (it may be disabled by the user)


class FusedSVDLinear8bitLt(_FusedQuantized, SVDLinear8bitLt):
    """PEFT's ``SVDLinear8bitLt``; the adapter by our kernels."""

    def _adapter_input(self, x: Tensor, adapter_dtype: torch.dtype) -> Tensor:
        return x.float() if x.dtype != torch.float32 else x  # PEFT's: the 8-bit layer's adapter input is float32


QUANTIZED = {SVDLinear4bit: FusedSVDLinear4bit, SVDLinear8bitLt: FusedSVDLinear8bitLt}
