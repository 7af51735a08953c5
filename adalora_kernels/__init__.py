"""adalora_kernels: AdaLoRA's adapter fused into the frozen layer, with PEFT's numbers."""

from . import reference
from .kernels import BackendUnavailableError, backend_names, register_backend
from .modules import AdaLoRALinear, RankAllocator, orthogonal_regularization, orthogonal_regularization_of
from .ops import adalora_linear

__version__ = "0.1.0"

__all__ = [
    "AdaLoRALinear",
    "BackendUnavailableError",
    "RankAllocator",
    "adalora_linear",
    "backend_names",
    "orthogonal_regularization",
    "orthogonal_regularization_of",
    "reference",
    "register_backend",
]
