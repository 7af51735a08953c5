"""Backend selection (DESIGN §3): explicit ``backend=`` > ``ADALORA_KERNELS_BACKEND`` > auto.

Auto takes, in order, triton → csrc → torch on CUDA and csrc → torch elsewhere, the first that imports and
supports the device; a backend asked for by name that cannot run raises. On CUDA, where more than one backend
can run, eager calls of the fused linear op then time the candidates once per (shape, dtype, rank, dropout,
bias) and keep the fastest for the process (as ``torch.backends.cudnn.benchmark`` does): ``measured_choice``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable

import torch

from ..kernels import backend_names, get_backend, registry_generation, unavailable_reason

log = logging.getLogger("adalora_kernels")

ENV_VAR = "ADALORA_KERNELS_BACKEND"
AUTO_ORDER = {"cuda": ("triton", "triton_split", "csrc", "torch")}
DEFAULT_ORDER = ("csrc", "torch")

_CHOICES: dict[Hashable, tuple[str, dict[str, float]]] = {}


def auto_order(device: torch.device) -> tuple[str, ...]:
    return AUTO_ORDER.get(device.type, DEFAULT_ORDER)


def requested(backend: str | None) -> str:
    """The backend name asked for: the argument, else the environment variable, else ``auto``."""
    return backend if backend is not None else (os.environ.get(ENV_VAR) or "auto")


_RUNNABLE: dict[tuple[str, int], list[str]] = {}


def runnable(device: torch.device) -> list[str]:
    """The backends auto may pick on ``device``, in auto's order; found once per device type (auto resolves on
    every layer call) until a backend is registered."""
    key = (device.type, registry_generation())
    if key not in _RUNNABLE:
        _RUNNABLE[key] = [
            b for b in auto_order(device) if b in backend_names() and unavailable_reason(b, device) is None
        ]
    return list(_RUNNABLE[key])


@torch.compiler.assume_constant_result  # traced as a constant: evaluated once, eagerly, under torch.compile
def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The name of the backend to run on ``device`` (auto: the first runnable one in auto's order)."""
    name = requested(backend)
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a string or None, got {type(name).__name__}")
    if name == "auto":
        candidates = runnable(device)
        if not candidates:
            raise RuntimeError(f"no adalora_kernels backend can run on {device}")
        return candidates[0]
    if name not in backend_names():
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source}: unknown backend {name!r}; expected 'auto' or one of {backend_names()}")
    get_backend(name, device)
    return name


def measured_choice(key: Hashable, candidates: list[str], time_ms: Callable[[str], float]) -> str:
    """The fastest of ``candidates`` for ``key``, timed once with ``time_ms(name)`` and cached per process. A
    candidate whose timing raises is skipped (and logged); with every one failing, the first is kept."""
    if key not in _CHOICES:
        timings: dict[str, float] = {}
        for name in candidates:
            try:
                timings[name] = float(time_ms(name))
            except Exception as exc:  # a backend that fails on this shape must not break auto
                log.warning(
                    "adalora_kernels: auto skips backend %r for %s (%s: %s)", name, key, type(exc).__name__, exc
                )
        best = min(timings, key=timings.get) if timings else candidates[0]
        _CHOICES[key] = (best, timings)
        log.info("adalora_kernels: auto chose %r for %s (ms: %s)", best, key, timings)
    return _CHOICES[key][0]


def auto_choices() -> dict[Hashable, tuple[str, dict[str, float]]]:
    """What ``measured_choice`` decided so far: key → (backend, milliseconds of each candidate)."""
    return dict(_CHOICES)


def clear_auto_choices() -> None:
    _CHOICES.clear()
