"""Custom ops (``torch.library``, namespace ``adalora_kernels``) and backend selection."""

from .adalora_linear import adalora_linear, adalora_linear_peft_order, linear_bwd, linear_fwd
from .backend import ENV_VAR, resolve_backend

__all__ = ["ENV_VAR", "adalora_linear", "adalora_linear_peft_order", "linear_bwd", "linear_fwd", "resolve_backend"]
