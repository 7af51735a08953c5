"""Modules: the drop-in layer (and its form over a quantised base), the rank allocator and the orthogonal
regulariser."""

from .allocator import RankAllocator
from .linear import AdaLoRALinear
from .orthogonal import orthogonal_regularization, orthogonal_regularization_of
from .quantized import AdaLoRAQuantizedLinear

__all__ = [
    "AdaLoRALinear",
    "AdaLoRAQuantizedLinear",
    "RankAllocator",
    "orthogonal_regularization",
    "orthogonal_regularization_of",
]
