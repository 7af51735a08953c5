"""Kernel backends. Each is a module with the same functions, loaded lazily by name:

- ``linear_forward(x2, weight, bias, P, lam_eff, Q, dropout_p, seed) -> (y2, t)``
- ``linear_backward(g2, x2, weight, P, lam_eff, Q, t, dropout_p, seed, need_dx, need_adapter)
  -> (dx2, dP, dlam_raw, dQ)`` (``dlam_raw = Σ_rows (g P) ⊙ t``; ``None`` for what was not asked)
- ``dropout_keep_mask(shape, dropout_p, seed, device) -> bool Tensor``: the mask the backend draws
- ``unavailable_reason(device) -> str | None``

All tensors are 2-D (``x2``: M×in) and share one dtype and device; ``lam_eff = s · λ ⊙ m``.
Adding a backend is one ``register_backend`` call.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

log = logging.getLogger("adalora_kernels")

_MODULES: dict[str, str] = {}
_LOADED: dict[str, ModuleType | str] = {}
_READY: dict[tuple[str, str], ModuleType] = {}  # (name, device type) found runnable: no re-check per call


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here."""


_GENERATION = [0]  # bumped by every registration: what callers cached about the backends is stale then


def registry_generation() -> int:
    return _GENERATION[0]


def register_backend(name: str, module: str) -> None:
    """Register a backend module by import path (imported on first use)."""
    _GENERATION[0] += 1
    _MODULES[name] = module
    _LOADED.pop(name, None)
    for key in [k for k in _READY if k[0] == name]:
        del _READY[key]


def backend_names() -> list[str]:
    return list(_MODULES)


def check_backend_name(backend: str | None) -> None:
    """``backend`` is ``None``, ``"auto"`` or a registered name (whether it can run is found when it runs): a
    misspelt name is refused where it is given, before any layer is built or swapped."""
    if backend is None:
        return
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a backend name or None, got {type(backend).__name__}")
    if backend != "auto" and backend not in _MODULES:
        raise ValueError(f"backend: unknown backend {backend!r}; expected None, 'auto' or one of {backend_names()}")


def _import(name: str) -> ModuleType | str:
    if name not in _LOADED:
        try:
            _LOADED[name] = importlib.import_module(_MODULES[name])
        except Exception as exc:  # a broken optional backend must never break the package
            _LOADED[name] = f"import failed: {type(exc).__name__}: {exc}"
            log.warning("adalora_kernels: backend %r is unavailable (%s)", name, _LOADED[name])
    return _LOADED[name]


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device``, or ``None`` when it can."""
    if name not in _MODULES:
        return f"unknown backend {name!r}; known backends: {', '.join(_MODULES)}"
    module = _import(name)
    if isinstance(module, str):
        return module
    return module.unavailable_reason(device)


def get_backend(name: str, device: torch.device) -> ModuleType:
    """The backend module, or ``BackendUnavailableError`` saying why it cannot run on ``device``."""
    ready = _READY.get((name, device.type))
    if ready is not None:  # on the hot path of every call: a backend that ran once stays runnable
        return ready
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable on {device}: {reason}")
    _READY[(name, device.type)] = _LOADED[name]  # type: ignore[assignment]
    return _LOADED[name]  # type: ignore[return-value]


register_backend("torch", "adalora_kernels.kernels.torch_composite")
register_backend("triton", "adalora_kernels.kernels.triton")
register_backend("triton_split", "adalora_kernels.kernels.triton.split")
register_backend("csrc", "adalora_kernels.kernels.csrc")
