"""Custom ops (``torch.library``, namespace ``adalora_kernels``) and backend selection."""

from .adalora_linear import adalora_linear, adalora_linear_peft_order, linear_bwd, linear_fwd
from .adapter import adalora_adapter, adapter_bwd, adapter_fwd
from .backend import ENV_VAR, resolve_backend

__all__ = [
    "ENV_VAR",
    "adalora_adapter",
    "adalora_linear",
    "adalora_linear_peft_order",
    "adapter_bwd",
    "adapter_fwd",
    "linear_bwd",
    "linear_fwd",
    "resolve_backend",
]
