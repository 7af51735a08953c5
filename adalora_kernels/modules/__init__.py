"""Modules: the drop-in layer, the rank allocator and the orthogonal regulariser."""

from .linear import AdaLoRALinear

__all__ = ["AdaLoRALinear"]
