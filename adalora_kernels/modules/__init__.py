"""Modules: the drop-in layer, the rank allocator and the orthogonal regulariser."""

from .allocator import RankAllocator
from .linear import AdaLoRALinear
from .orthogonal import orthogonal_regularization, orthogonal_regularization_of

__all__ = ["AdaLoRALinear", "RankAllocator", "orthogonal_regularization", "orthogonal_regularization_of"]
