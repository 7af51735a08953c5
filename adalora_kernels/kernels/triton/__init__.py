"""The Triton backend: the default on CUDA/ROCm GPUs; on the CPU only through ``TRITON_INTERPRET=1``."""

from __future__ import annotations

import torch

from . import interpreter_compat

interpreter_compat.install()  # before any kernel runs under the interpreter

from ..torch_composite import triplet_scores  # noqa: E402
from .adalora_linear import dropout_keep_mask, linear_backward, linear_forward  # noqa: E402
from .config import INTERPRET  # noqa: E402
from .sensitivity import mask_lams, sensitivity_update  # noqa: E402

__all__ = [
    "adapter_backward",
    "adapter_forward",
    "dropout_keep_mask",
    "linear_backward",
    "linear_forward",
    "mask_lams",
    "sensitivity_update",
    "triplet_scores",
    "unavailable_reason",
]


def unavailable_reason(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    if device.type == "cpu" and INTERPRET:
        return None
    return (
        f"Triton kernels run on CUDA/ROCm GPUs, not on {device.type} "
        "(TRITON_INTERPRET=1, set before import, runs them on the CPU through the interpreter)"
    )


def __getattr__(name):  # the adapter-only passes are the split route's (the same mask bits): imported on first use
    if name in ("adapter_forward", "adapter_backward"):
        from . import split

        return getattr(split, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
