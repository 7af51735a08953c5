"""adalora_kernels: AdaLoRA's adapter fused into the frozen layer, with PEFT's numbers."""

from . import reference
from .integrations import accelerate_peft, inject_adalora, rank_report
from .kernels import BackendUnavailableError, backend_names, register_backend
from .modules import (
    AdaLoRALinear,
    AdaLoRAQuantizedLinear,
    RankAllocator,
    orthogonal_regularization,
    orthogonal_regularization_of,
)
from .ops import adalora_linear

__version__ = "0.1.0"

__all__ = [
    "AdaLoRACallback",
    "AdaLoRALinear",
    "AdaLoRAQuantizedLinear",
    "BackendUnavailableError",
    "RankAllocator",
    "accelerate_peft",
    "adalora_linear",
    "backend_names",
    "inject_adalora",
    "orthogonal_regularization",
    "orthogonal_regularization_of",
    "rank_report",
    "reference",
    "register_backend",
]


def __getattr__(name):  # transformers is optional: the callback is imported on first use
    if name == "AdaLoRACallback":
        from .integrations.trainer import AdaLoRACallback

        return AdaLoRACallback
    raise AttributeError(f"module 'adalora_kernels' has no attribute {name!r}")
