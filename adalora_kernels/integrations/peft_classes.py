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

import warnings

import torch
from peft.tuners.adalora import AdaLoraLayer, AdaLoraModel, RankAllocator, SVDLinear
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from ..modules.allocator import RankAllocator as DeviceAllocator
from ..modules.allocator import _Triplet, attach_step_hook
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
        if self.disable_adapters or self.merged or torch._C._are_functorch_transforms_active():
            return ""  # (torch.func transforms: PEFT's plain ATen ops, which every transform takes)
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
    """PEFT's ``AdaLoraModel``; the orthogonal regulariser is batched over the live adapter tensors; ``attach``
    binds the allocator to the optimizer; training past ``tinit`` with the allocator never stepped warns once."""

    @property
    def step_count(self) -> int:
        return self.rankallocator.step_count

    @step_count.setter
    def step_count(self, value: int) -> None:
        self.rankallocator.step_count = value

    def attach(self, optimizer: torch.optim.Optimizer, start_step: int | None = None):
        """``update_and_allocate`` once per real optimizer step (see ``adalora_kernels.RankAllocator.attach``);
        returns the hook's handle."""
        if not isinstance(getattr(self, "rankallocator", None), FusedRankAllocator):
            raise RuntimeError("attach: this model has no trainable AdaLoRA adapter (loaded for inference?)")
        return attach_step_hook(self, optimizer, start_step)

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        """PEFT's; a trainable adapter added after ``accelerate_peft`` becomes the trainable one, with an allocator
        of our own (PEFT keeps the name and allocator of the first one: a stale name after ``delete_adapter``), and
        new layers of ``SVDLinear`` over a plain linear base are fused like the others."""
        out = super().inject_adapter(model, adapter_name, *args, **kwargs)
        config = self.peft_config[adapter_name]
        backend = next((m._ak_backend for m in self.model.modules() if isinstance(m, FusedSVDLinear)), None)
        numerics = next((m._ak_numerics for m in self.model.modules() if isinstance(m, FusedSVDLinear)), "auto")
        for module in self.model.modules():
            if type(module) is SVDLinear and not unfusable_reason(module.get_base_layer()):
                module.__class__ = FusedSVDLinear
                module._ak_backend, module._ak_numerics = backend, numerics
        if not config.inference_mode:
            self.trainable_adapter_name = adapter_name
            self.rankallocator = FusedRankAllocator(self.model, config, adapter_name, backend=backend)
        return out

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's; deleting the trainable adapter leaves no trainable adapter (nor its allocator) behind."""
        super().delete_adapter(adapter_name)
        if getattr(self, "trainable_adapter_name", None) == adapter_name:
            self.trainable_adapter_name = None
            self.rankallocator = None

    def update_and_allocate(self, global_step: int):
        if getattr(self, "trainable_adapter_name", None) is None:
            raise RuntimeError("update_and_allocate: the model has no trainable AdaLoRA adapter (it was deleted, or "
                               "the model was loaded for inference); add one with add_adapter")  # fmt: skip
        return super().update_and_allocate(global_step)

    def _check_allocation(self) -> None:
        allocator = getattr(self, "rankallocator", None)
        if not isinstance(allocator, FusedRankAllocator) or allocator.calls or allocator._warned_unstepped:
            return
        calls = self.__dict__["_ak_train_calls"] = self.__dict__.get("_ak_train_calls", 0) + 1
        tinit = allocator.peft_config.tinit
        if calls > tinit + 1:
            allocator._warned_unstepped = True
            warnings.warn(
                f"AdaLoRA: {calls} training forwards and no update_and_allocate yet, past tinit = {tinit}: the "
                "ranks are never budgeted, so this trains as plain LoRA. Call model.base_model.attach(optimizer) "
                "once (or use adalora_kernels.AdaLoRACallback with the Trainer)",
                stacklevel=3,
            )

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            self._check_allocation()
        outputs = self.model.forward(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        if loss is not None and isinstance(loss, Tensor):
            adapter = self.trainable_adapter_name  # as PEFT: a model loaded for inference has none (it raises)
        if loss is not None and isinstance(loss, Tensor) and adapter is not None:  # None: the adapter was deleted
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
        self.calls, self.step_count, self._warned_unstepped = 0, 0, False
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
        self.calls += 1
        final = global_step == self.peft_config.total_step - self.peft_config.tfinal
        if core.masked_last_step or (final and force_mask):
            return budget, self._pattern(core)
        if force_mask:
            return budget, self.mask_to_budget(model, budget)
        return budget, None

    def state_dict(self) -> dict:
        """What a resumed run needs: the device allocator's state (EMAs, mask, frozen pattern), the hook's step
        count and PEFT's recorded rank pattern."""
        pattern = self.peft_config.rank_pattern
        return {"core": self._live().state_dict(), "step_count": self.step_count,
                "rank_pattern": dict(pattern) if pattern is not None else None}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` of the same model's allocator; one of another model (other layers or ranks) is
        refused, naming the layer, and changes nothing."""
        if not isinstance(state, dict) or {"core", "step_count", "rank_pattern"} - set(state):
            raise ValueError("state: not a FusedRankAllocator state_dict (core, step_count, rank_pattern)")
        self._live().load_state_dict(state["core"])
        self.step_count = int(state["step_count"])
        self.peft_config.rank_pattern = state["rank_pattern"]
        self._pattern_obj = None

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
