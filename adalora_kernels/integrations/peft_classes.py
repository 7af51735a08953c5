"""The classes ``accelerate_peft`` gives a PEFT AdaLoRA model: subclasses of PEFT's own, importable by name
(so ``copy.deepcopy``, pickle and ``torch.save(model)`` behave as for PEFT's), holding no copy of PEFT's state.

- ``FusedSVDLinear``: PEFT's ``SVDLinear`` whose forward runs the fused op when that reproduces PEFT's forward,
  reading the active adapter, ``scaling``, ``ranknum`` and the dropout module on every call; PEFT's forward
  otherwise, with the reason in ``fusable``.
- ``FusedAdaLoraModel``: PEFT's ``AdaLoraModel`` with the orthogonal regulariser batched (one ``bmm`` per
  adapter shape) over the live adapter tensors, weighted by the live ``orth_reg_weight``.
- ``FusedRankAllocator``: PEFT's ``RankAllocator`` (its attributes, methods and return values) whose work runs
  on our device allocator, reading PEFT's live config and the live adapter tensors at every step.
"""

from __future__ import annotations

import torch
from peft.tuners.adalora import AdaLoraLayer, AdaLoraModel, RankAllocator, SVDLinear
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from ..modules.allocator import RankAllocator as DeviceAllocator
from ..modules.allocator import _Triplet
from ..modules.linear import unfusable_reason
from ..modules.orthogonal import orthogonal_regularization_of
from ..ops import adalora_linear, adalora_linear_peft_order

__all__ = ["AdaLoraLayer", "FusedAdaLoraModel", "FusedRankAllocator", "FusedSVDLinear"]


def _global_hooks() -> bool:
    return bool(_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks)


class FusedSVDLinear(SVDLinear):
    """PEFT's ``SVDLinear``, computing through ``adalora_kernels`` whenever that gives PEFT's result."""

    _ak_backend: str | None = None
    _ak_numerics: str = "auto"

    def peft_rounding(self, x: Tensor) -> bool:
        """Whether the forward rounds as PEFT's (``accelerate_peft(numerics=...)``; ``auto``: on the CPU)."""
        numerics = self._ak_numerics
        return numerics == "peft" or (numerics == "auto" and x.device.type == "cpu")

    def fusable(self, x: Tensor, base: nn.Module | None = None) -> str:
        """The adapter the fused op can compute for ``x``, or ``""`` when PEFT's own forward must run
        (``base``: the base layer, where the caller has it)."""
        if self.disable_adapters or self.merged:
            return ""
        lora_A = self.lora_A
        active = [a for a in self.active_adapters if a in lora_A]
        if len(active) != 1:  # none, or several adapters summed
            return ""
        base = base if base is not None else self.get_base_layer()
        if base._forward_hooks or base._forward_pre_hooks or _global_hooks():  # hooks must see the base layer run
            return ""
        if unfusable_reason(base) or x.dtype != base.weight.dtype:
            return ""  # a base layer whose forward is not F.linear of its weight, or an input PEFT would cast
        if not isinstance(self.lora_dropout[active[0]], (nn.Dropout, nn.Identity)):
            return ""
        return active[0]

    def _scale(self, adapter: str) -> float:
        """``scaling / (ranknum + 1e-5)``, read live; ranknum is read from the device once per tensor (PEFT makes a
        new one whenever it changes), not once per call."""
        ranknum = self.ranknum[adapter]
        key = (id(ranknum), ranknum.data_ptr(), ranknum._version)
        cache = self.__dict__.setdefault("_ak_ranknum", {})
        if adapter not in cache or cache[adapter][0] != key:
            cache[adapter] = (key, float(ranknum))
        return self.scaling[adapter] / (cache[adapter][1] + 1e-5)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        base = self.get_base_layer()
        adapter = "" if (args or kwargs) else self.fusable(x, base)
        if not adapter:
            return super().forward(x, *args, **kwargs)
        P, lam, Q = self.lora_B[adapter], self.lora_E[adapter].view(-1), self.lora_A[adapter]
        dropout = self.lora_dropout[adapter]
        drop = isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0
        weight = base.weight.T if self.fan_in_fan_out else base.weight
        if not drop and P.dtype == x.dtype and self.peft_rounding(x):
            return adalora_linear_peft_order(
                x, weight, base.bias, P, lam, Q, scaling=self.scaling[adapter], ranknum=self.ranknum[adapter],
                scale=self._scale(adapter), backend=self._ak_backend,
            )  # fmt: skip
        if P.dtype != x.dtype:  # PEFT keeps fp32 adapters beside a 16-bit base: compute them in x's dtype
            P, lam, Q = P.to(x.dtype), lam.to(x.dtype), Q.to(x.dtype)
        return adalora_linear(
            x,
            weight,
            base.bias,
            P,
            lam,
            Q,
            scaling=self._scale(adapter),
            dropout_p=dropout.p if drop else 0.0,
            training=drop,
            backend=self._ak_backend,
        )


class FusedAdaLoraModel(AdaLoraModel):
    """PEFT's ``AdaLoraModel``; the orthogonal regulariser is batched over the live adapter tensors."""

    def forward(self, *args, **kwargs):
        outputs = self.model.forward(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        if loss is not None and isinstance(loss, Tensor):
            adapter = self.trainable_adapter_name  # as PEFT: a model loaded for inference has none
            weight = self.peft_config[adapter].orth_reg_weight
            if weight < 0:
                raise ValueError(f"orth_reg_weight: expected a value >= 0, got {weight}")
            Ps, Qs = [], []
            for module in self.model.modules():
                if isinstance(module, AdaLoraLayer) and adapter in module.lora_A:
                    Ps.append(module.lora_B[adapter])
                    Qs.append(module.lora_A[adapter])
            if Ps:
                outputs.loss = loss + weight * orthogonal_regularization_of(Ps, Qs)
        return outputs


class FusedRankAllocator(RankAllocator):
    """PEFT's ``RankAllocator`` with the work on the device: one fused launch for every EMA and triplet score,
    the threshold and the mask on the device, the rank pattern copied to the host only at mask steps (PEFT's
    config holds it there). ``exp_avg_ipt`` / ``exp_avg_unc`` are views of the device EMAs by parameter name;
    ``ipt`` is ``|θ·∇θ|`` of the current parameters and gradients (PEFT's last update until ``zero_grad``)."""

    def __init__(self, model: nn.Module, peft_config, adapter_name: str, backend: str | None = None, like=None) -> None:
        """``like``: PEFT's allocator being replaced; its budgets (counted when PEFT made it, before a reload
        resized the layers, say) are kept, so the schedule is PEFT's."""
        self.backend = backend
        self._core: DeviceAllocator | None = None
        self._pattern_obj: dict | None = None
        self._layers = [
            (name, m) for name, m in model.named_modules() if isinstance(m, AdaLoraLayer) and adapter_name in m.lora_A
        ]
        if not self._layers:
            raise ValueError(f"peft_model: no AdaLoRA layer holds the adapter {adapter_name!r}")
        super().__init__(model, peft_config, adapter_name)
        if like is not None:
            self.init_bgt, self.target_bgt, self.name_set = like.init_bgt, like.target_bgt, like.name_set
        self._live()

    # ------------------------------------------------------------------------------------ live state

    def _live(self) -> DeviceAllocator:
        """The device allocator over the adapter tensors the layers hold now, with the config's schedule now."""
        a, cfg = self.adapter_name, self.peft_config
        triplets = [_Triplet(name, m.lora_B[a], m.lora_E[a], m.lora_A[a], None) for name, m in self._layers]
        core = self._core
        same = core is not None and all(
            t.P is c.P and t.lam is c.lam and t.Q is c.Q for t, c in zip(triplets, core.triplets)
        )
        if not same:  # first call, or PEFT replaced the tensors (resize_modules_by_rank_pattern, a reload)
            core = DeviceAllocator(
                None, triplets=triplets, target_r=cfg.target_r, total_step=cfg.total_step, tinit=cfg.tinit,
                tfinal=cfg.tfinal, deltaT=cfg.deltaT, beta1=self.beta1, beta2=self.beta2, backend=self.backend,
            )  # fmt: skip
            self._core, self._pattern_obj = core, None
        else:
            core.set_schedule(total_step=cfg.total_step, tinit=cfg.tinit, tfinal=cfg.tfinal, deltaT=cfg.deltaT)
        core.init_bgt, core.target_bgt = self.init_bgt, self.target_bgt  # PEFT's, fixed when it was created
        return core

    def _pattern(self, core: DeviceAllocator) -> dict[str, list[bool]]:
        """PEFT's ``rank_pattern`` (keyed by the lora_E parameter names) of the device mask: a host copy."""
        pattern = {f"{name}.lora_E.{self.adapter_name}": kept for name, kept in core.rank_pattern.items()}
        self._pattern_obj = pattern
        return pattern

    def _views(self, which: str) -> dict[str, Tensor]:
        """The device EMA ``which`` (``_ema_ipt`` or ``_ema_unc``) as views keyed by PEFT's parameter names."""
        core = self._live()
        if core._layout is None:
            raise NotImplementedError("exp_avg_ipt / exp_avg_unc of sharded (FSDP2) adapters: see RankAllocator")
        a, out = self.adapter_name, {}
        for (name, _), (P, lam, Q) in zip(self._layers, core._layout.views(getattr(core, which))):
            out.update({f"{name}.lora_B.{a}": P, f"{name}.lora_E.{a}": lam.view(-1, 1), f"{name}.lora_A.{a}": Q})
        return out

    # ------------------------------------------------------------------------------------ PEFT's interface

    @property
    def exp_avg_ipt(self) -> dict[str, Tensor]:
        return self._views("_ema_ipt")

    @property
    def exp_avg_unc(self) -> dict[str, Tensor]:
        return self._views("_ema_unc")

    @property
    def ipt(self) -> dict[str, Tensor]:
        out = {}
        for name, m in self._layers:
            for label in ("lora_A", "lora_B", "lora_E"):
                p = getattr(m, label)[self.adapter_name]
                if p.grad is not None:
                    out[f"{name}.{label}.{self.adapter_name}"] = (p * p.grad).abs().detach()
        return out

    def reset_ipt(self) -> None:
        if getattr(self, "_core", None) is not None:
            self._core.reset_ipt()

    def update_ipt(self, model: nn.Module) -> None:
        self._live().update_scores()

    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        core = self._live()
        core._mask(core.scores(), budget)
        return self._pattern(core)

    @torch.no_grad()
    def update_and_allocate(self, model: nn.Module, global_step: int, force_mask: bool = False):
        """PEFT's: ``(budget, rank_pattern or None)``; our step semantics (README): a repeated final step keeps
        the frozen pattern."""
        core = self._live()
        budget = core.update_and_allocate(global_step)
        final = global_step == self.peft_config.total_step - self.peft_config.tfinal
        if core.masked_last_step or (final and force_mask):
            return budget, self._pattern(core)
        if force_mask:
            return budget, self.mask_to_budget(model, budget)
        return budget, None

    @torch.no_grad()
    def mask_using_rank_pattern(self, model: nn.Module, rank_pattern: dict) -> None:
        """Zero-fill λ outside ``rank_pattern`` (PEFT's final phase): the device mask when the pattern is the one
        we produced, else read from ``rank_pattern`` once (keys with or without the adapter name, as PEFT)."""
        core = self._live()
        if rank_pattern is not self._pattern_obj or not core._final:
            suffix = f".{self.adapter_name}" if self.adapter_name in next(iter(rank_pattern)) else ""
            kept = []
            for name, _ in self._layers:
                key = f"{name}.lora_E{suffix}"
                if key not in rank_pattern:
                    raise KeyError(f"rank_pattern: no entry {key!r} for the layer {name}")
                kept += [bool(v) for v in rank_pattern[key]]
            ranks = sum(t.lam.numel() for t in core.triplets)
            if len(kept) != ranks:
                raise ValueError(f"rank_pattern: {len(kept)} ranks, the layers hold {ranks}")
            keep = torch.tensor(kept, dtype=torch.bool, device=core.triplets[0].lam.device)
            core._keep = keep
            core._freeze_pattern()
            self._pattern_obj = rank_pattern
        core._mask_lams()
