"""``AdaLoRAQuantizedLinear``: AdaLoRA's adapter around a frozen bitsandbytes base (``Linear4bit`` nf4/fp4,
``Linear8bitLt``) that runs its own forward; the adapter is added by our kernels (``adalora_adapter``) with the
casts of PEFT's ``SVDLinear4bit`` / ``SVDLinear8bitLt``: x cast to the adapters' dtype, the product cast to the base
output's dtype before the add."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import adalora_adapter
from .linear import AdaLoRALinear, _check_allocation, check_adapter_args, quantized_kind


class AdaLoRAQuantizedLinear(AdaLoRALinear):
    """``y = base(x) + cast(s · ((drop(x_a) Qᵀ) ⊙ (λ ⊙ m)) Pᵀ)`` over a frozen bitsandbytes layer ``base_layer``
    (PEFT's ``SVDLinear4bit`` / ``SVDLinear8bitLt``): ``x_a`` is x in the adapters' dtype (float32 unless asked
    otherwise, as PEFT creates them). The base cannot be merged into: its weight is quantised."""

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError("AdaLoRAQuantizedLinear: build it with AdaLoRAQuantizedLinear.from_base(layer, ...)")

    @classmethod
    def from_base(
        cls,
        base: nn.Module,
        *,
        init_r: int = 12,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        backend: str | None = None,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> AdaLoRAQuantizedLinear:
        """Wrap ``base`` (a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``), which is frozen and kept as
        ``base_layer``."""
        check_adapter_args(init_r, lora_alpha, lora_dropout, backend)
        kind = quantized_kind(base)
        if not kind:
            raise TypeError(
                f"base: expected a bitsandbytes Linear4bit or Linear8bitLt, got {type(base).__name__} "
                "(an nn.Linear takes AdaLoRALinear.from_linear)"
            )
        if not isinstance(adapter_dtype, torch.dtype) or not adapter_dtype.is_floating_point:
            raise TypeError(f"adapter_dtype: expected a floating torch.dtype, got {adapter_dtype!r}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = base.in_features, base.out_features
        layer.quant_kind = kind
        layer.base_layer = base.requires_grad_(False)
        layer._init_adapter(init_r, lora_alpha, lora_dropout, backend, dtype=adapter_dtype)
        return layer

    @property
    def weight(self) -> Tensor:  # the base's packed weight (read by device checks; never multiplied here)
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def forward(self, x: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            _check_allocation(self)
        return adalora_adapter(
            x,
            self.base_layer(x),
            self.P,
            self.lam,
            self.Q,
            scaling=self.scaling,
            rank_mask=self.rank_mask,
            dropout_p=self.lora_dropout,
            training=self.training,
            seed=self.seed,
            backend=self.backend,
        )

    def _refuse_merge(self, what: str):
        return TypeError(
            f"AdaLoRAQuantizedLinear.{what}: the base is a bitsandbytes {self.quant_kind} layer "
            f"({type(self.base_layer).__name__}); merging would requantise its weight and lose the adapter's "
            "precision. Export the adapter (export_peft, export_lora), or merge into a dequantised copy of the model"
        )

    def merge(self) -> None:
        raise self._refuse_merge("merge")

    def unmerge(self) -> None:
        raise self._refuse_merge("unmerge")

    def extra_repr(self) -> str:
        return f"base={type(self.base_layer).__name__}({self.quant_kind}), " + super().extra_repr().replace(
            ", merged=False", ""
        )
