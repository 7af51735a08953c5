"""``AdaLoRALinear``: a drop-in ``nn.Linear`` with a frozen base and PEFT's SVD-shaped adapter."""

from __future__ import annotations

import sys
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import check_backend_name
from ..ops import adalora_linear
from ..reference import effective_lam, peft_scaling


def check_adapter_args(init_r, lora_alpha, lora_dropout, backend) -> None:
    """The adapter hyper-parameters, checked before anything is built or frozen."""
    import math

    if isinstance(init_r, bool) or not isinstance(init_r, int) or init_r < 0:
        raise ValueError(f"init_r: expected an int >= 0, got {init_r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha: expected a finite number, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout: expected a float in [0, 1), got {lora_dropout!r}")
    check_backend_name(backend)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and friends): a linear layer whose weight is stored (in, out)."""
    return (
        type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2
    )


def unfusable_reason(module: nn.Module) -> str:
    """Why the fused op cannot stand in for ``module``'s own forward, or ``""`` when it can: an ``nn.Linear`` or
    transformers' ``Conv1D`` whose class keeps that forward. Decided by class, never by dtypes: a subclass that
    overrides ``forward`` (a scaled layer, bitsandbytes' ``Linear8bitLt`` / ``Linear4bit``) computes something
    else than ``F.linear`` with its weight."""
    cls = type(module)
    if isinstance(module, nn.Linear):
        return "" if cls.forward is nn.Linear.forward else f"{cls.__name__} overrides nn.Linear.forward"
    if is_conv1d(module):
        own = next(k for k in cls.__mro__ if k.__name__ == "Conv1D")
        if own.__module__ != "transformers.pytorch_utils":
            return f"{cls.__name__} is not transformers' Conv1D"
        return "" if cls.forward is own.forward else f"{cls.__name__} overrides Conv1D.forward"
    return f"{cls.__name__} is neither an nn.Linear nor transformers' Conv1D"


def quantized_kind(module: nn.Module) -> str:
    """``"nf4"`` or ``"fp4"`` for bitsandbytes' ``Linear4bit``, ``"int8"`` for its ``Linear8bitLt``, ``""`` for
    anything else (bitsandbytes is never imported here: a model holding its layers has imported it)."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    if bnb_nn is None:
        return ""
    if isinstance(module, bnb_nn.Linear4bit):
        return str(getattr(module.weight, "quant_type", "nf4"))
    if isinstance(module, bnb_nn.Linear8bitLt):
        return "int8"
    return ""


def adapter_hint(module: nn.Module) -> str:
    """Where a refused layer can take an adapter after all (bitsandbytes' quantised layers)."""
    if quantized_kind(module):
        return " (a bitsandbytes layer takes AdaLoRAQuantizedLinear.from_base, which keeps its own forward)"
    return ""


# layer -> a weak reference to the allocator of its ranks; a layer that keeps training with an allocator never
# stepped past ``tinit`` says so once (AdaLoRA would silently train as plain LoRA)
_ALLOCATOR_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def watch_allocation(layer: nn.Module, allocator) -> None:
    _ALLOCATOR_OF[layer] = weakref.ref(allocator)


def _check_allocation(layer: nn.Module) -> None:
    """Counted on the host only (no sync): training calls of ``layer`` against its allocator's calls."""
    ref = _ALLOCATOR_OF.get(layer)
    allocator = ref() if ref is not None else None
    if allocator is None or allocator.calls or getattr(allocator, "_warned_unstepped", False):
        return
    calls = layer.__dict__["_ak_train_calls"] = layer.__dict__.get("_ak_train_calls", 0) + 1
    if calls > allocator.tinit + 1:
        allocator._warned_unstepped = True
        warnings.warn(
            f"AdaLoRA: {calls} training calls of an adapted layer and no update_and_allocate yet, past tinit = "
            f"{allocator.tinit}: the ranks are never budgeted, so this trains as plain LoRA. Call "
            "allocator.attach(optimizer) once (or use AdaLoRACallback with the Trainer)",
            stacklevel=3,
        )


class AdaLoRALinear(nn.Module):
    """``y = x Wᵀ + b + s · ((drop(x) Qᵀ) ⊙ (λ ⊙ m)) Pᵀ`` with W and b frozen (PEFT's ``SVDLinear``).

    ``P`` (out, r) is PEFT's ``lora_B``, ``lam`` (r,) its ``lora_E``, ``Q`` (r, in) its ``lora_A``;
    ``rank_mask`` (r,) is the rank pattern the allocator froze (all true until then). ``fan_in_fan_out``:
    the shared base weight is stored (in, out), as in transformers' ``Conv1D`` (GPT-2).
    """

    fan_in_fan_out = False
    seed: int | None = None  # the dropout seed: None draws one per call; an int fixes the mask (CUDA graph capture)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        init_r: int = 12,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        device=None,
        dtype=None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False) if bias else None
        nn.Linear.reset_parameters(self)  # nn.Linear's own initialisation of weight and bias
        self._init_adapter(init_r, lora_alpha, lora_dropout, backend)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        *,
        init_r: int = 12,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        backend: str | None = None,
    ) -> AdaLoRALinear:
        """Wrap ``linear`` (an ``nn.Linear`` or transformers' ``Conv1D``): its weight and bias are shared (not
        copied) and frozen."""
        check_adapter_args(init_r, lora_alpha, lora_dropout, backend)
        if not isinstance(linear, nn.Linear) and not is_conv1d(linear):
            raise TypeError(f"linear: expected an nn.Linear or transformers' Conv1D, got {type(linear).__name__}")
        reason = unfusable_reason(linear)
        if reason:
            raise TypeError(
                f"linear: {reason}; the adapter would replace that forward with F.linear of its weight"
                + adapter_hint(linear)
            )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        if isinstance(linear, nn.Linear):
            layer.in_features, layer.out_features = linear.in_features, linear.out_features
        elif is_conv1d(linear):
            layer.in_features, layer.out_features = linear.weight.shape
            layer.fan_in_fan_out = True
        else:
            raise TypeError(f"linear: expected an nn.Linear or transformers' Conv1D, got {type(linear).__name__}")
        layer.weight = linear.weight.requires_grad_(False)
        layer.bias = linear.bias.requires_grad_(False) if linear.bias is not None else None
        layer._init_adapter(init_r, lora_alpha, lora_dropout, backend)
        return layer

    def _init_adapter(
        self, init_r: int, lora_alpha: float, lora_dropout: float, backend: str | None, dtype=None
    ) -> None:
        check_adapter_args(init_r, lora_alpha, lora_dropout, backend)
        self.init_r, self.lora_alpha, self.lora_dropout = init_r, lora_alpha, float(lora_dropout)
        self.scaling = peft_scaling(init_r, lora_alpha)
        self.backend = backend
        self.merged = False
        kw = {"device": self.weight.device, "dtype": dtype or self.weight.dtype}
        self.P = nn.Parameter(torch.empty(self.out_features, init_r, **kw))
        self.lam = nn.Parameter(torch.empty(init_r, **kw))
        self.Q = nn.Parameter(torch.empty(init_r, self.in_features, **kw))
        self.register_buffer("rank_mask", torch.ones(init_r, dtype=torch.bool, device=self.weight.device))
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """PEFT's initialisation: ``lam`` zeros, ``P`` and ``Q`` ~ N(0, 0.02); all ranks kept."""
        with torch.no_grad():
            nn.init.zeros_(self.lam)
            nn.init.normal_(self.Q, mean=0.0, std=0.02)
            nn.init.normal_(self.P, mean=0.0, std=0.02)
            self.rank_mask.fill_(True)

    @property
    def r(self) -> int:
        """The current rank (``init_r`` until ``keep_ranks`` drops pruned ones; ``init_r`` keeps the scale)."""
        return self.lam.numel()

    @torch.no_grad()
    def keep_ranks(self, keep: Tensor | None = None) -> None:
        """Drop the ranks not in ``keep`` (default: ``rank_mask``) from P, λ, Q, keeping ``scaling``: for
        inference and for PEFT's resized checkpoints (PEFT keeps ``ranknum`` = init_r the same way)."""
        keep = (self.rank_mask if keep is None else keep).to(device=self.lam.device, dtype=torch.bool)
        if keep.shape != self.lam.shape:
            raise ValueError(f"keep: expected a bool tensor of shape {tuple(self.lam.shape)}, got {tuple(keep.shape)}")
        requires_grad = self.lam.requires_grad
        self.P = nn.Parameter(self.P[:, keep].clone(), requires_grad=requires_grad)
        self.lam = nn.Parameter(self.lam[keep].clone(), requires_grad=requires_grad)
        self.Q = nn.Parameter(self.Q[keep].clone(), requires_grad=requires_grad)
        self.rank_mask = self.rank_mask[keep].clone()

    def forward(self, x: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            _check_allocation(self)
        if self.merged:
            return F.linear(x, self.weight.T if self.fan_in_fan_out else self.weight, self.bias)
        return adalora_linear(
            x,
            self.weight.T if self.fan_in_fan_out else self.weight,
            self.bias,
            self.P,
            self.lam,
            self.Q,
            scaling=self.scaling,
            rank_mask=self.rank_mask,
            dropout_p=self.lora_dropout,
            training=self.training,
            seed=self.seed,
            backend=self.backend,
        )

    def delta_weight(self) -> Tensor:
        """The adapter as a dense ``(out, in)`` matrix: ``s · P diag(λ ⊙ m) Q``."""
        return self.P @ (effective_lam(self.lam, self.rank_mask, self.scaling)[:, None] * self.Q)

    def _delta_in_weight_layout(self) -> Tensor:
        delta = self.delta_weight().to(self.weight.dtype)
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """Add the adapter into the (shared) base weight; forward then runs the base layer alone."""
        if self.merged:
            raise RuntimeError("AdaLoRALinear.merge: the adapter is already merged")
        self.weight.add_(self._delta_in_weight_layout())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter from the base weight again."""
        if not self.merged:
            raise RuntimeError("AdaLoRALinear.unmerge: the adapter is not merged")
        self.weight.sub_(self._delta_in_weight_layout())
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            f"init_r={self.init_r}, r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
            f"scaling={self.scaling:.6g}, merged={self.merged}, backend={self.backend or 'auto'}"
            + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
        )
