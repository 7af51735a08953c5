"""adalora_kernels: AdaLoRA's adapter fused into the frozen layer, with PEFT's numbers."""

from . import reference
from .kernels import BackendUnavailableError, backend_names, register_backend
from .modules import AdaLoRALinear
from .ops import adalora_linear

__version__ = "0.1.0"

__all__ = [
    "AdaLoRALinear",
    "BackendUnavailableError",
    "adalora_linear",
    "backend_names",
    "reference",
    "register_backend",
]
