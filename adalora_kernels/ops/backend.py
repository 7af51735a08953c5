"""Backend selection (DESIGN §3): explicit ``backend=`` > ``ADALORA_KERNELS_BACKEND`` > auto.

Auto tries, in order, triton → csrc → torch on CUDA and csrc → torch elsewhere, taking the first that
imports and supports the device; a backend asked for by name that cannot run raises.
"""

from __future__ import annotations

import os

import torch

from ..kernels import backend_names, get_backend, unavailable_reason

ENV_VAR = "ADALORA_KERNELS_BACKEND"
AUTO_ORDER = {"cuda": ("triton", "csrc", "torch")}
DEFAULT_ORDER = ("csrc", "torch")


def auto_order(device: torch.device) -> tuple[str, ...]:
    return AUTO_ORDER.get(device.type, DEFAULT_ORDER)


@torch.compiler.assume_constant_result  # traced as a constant: evaluated once, eagerly, under torch.compile
def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The name of the backend to run on ``device``."""
    name = backend if backend is not None else (os.environ.get(ENV_VAR) or "auto")
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a string or None, got {type(name).__name__}")
    if name == "auto":
        for candidate in auto_order(device):
            if candidate in backend_names() and unavailable_reason(candidate, device) is None:
                return candidate
        raise RuntimeError(f"no adalora_kernels backend can run on {device}")
    if name not in backend_names():
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source}: unknown backend {name!r}; expected 'auto' or one of {backend_names()}")
    get_backend(name, device)
    return name
