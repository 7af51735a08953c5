"""``RankAllocator``: PEFT 0.21's AdaLoRA budget schedule and masking, on the device with no host sync."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..kernels import check_backend_name
from ..kernels.layout import FlatLayout
from ..ops.sensitivity import mask_lams, sensitivity_update, threshold_keep, triplet_scores
from . import sharded
from .linear import AdaLoRALinear, watch_allocation


@dataclass
class _Triplet:
    name: str
    P: nn.Parameter
    lam: nn.Parameter  # 1-D (r,), or PEFT's (r, 1)
    Q: nn.Parameter
    layer: AdaLoRALinear | None  # ours: its rank_mask takes the final pattern


def _refuse_unsupported_sharding(model: nn.Module | None, triplets: list[_Triplet]) -> None:
    """FSDP1 with flattened parameters and DeepSpeed ZeRO-3 hide each layer's P, λ, Q behind flat or
    partitioned storage the allocator cannot score; say what to use instead."""
    if model is not None:
        for name, module in model.named_modules():
            if type(module).__name__ == "FullyShardedDataParallel" and not getattr(module, "_use_orig_params", True):
                raise ValueError(
                    f"model: {name or 'the model'} is FSDP1 with flattened parameters (use_orig_params=False); "
                    "wrap it with FSDP1(use_orig_params=True) or FSDP2 (torch.distributed.fsdp.fully_shard), "
                    "or create the RankAllocator before wrapping"
                )
    for t in triplets:
        for label, p in (("P", t.P), ("lam", t.lam), ("Q", t.Q)):
            if hasattr(p, "ds_id") or hasattr(p, "ds_status"):
                raise ValueError(
                    f"{t.name}.{label}: DeepSpeed ZeRO-3 partitions this parameter; the allocator needs whole "
                    "adapter tensors: use ZeRO stage 1 or 2, DDP, or FSDP2 (torch.distributed.fsdp.fully_shard)"
                )


class MissingGradientError(RuntimeError, TypeError):
    """``update_and_allocate`` found an adapter parameter without ``.grad`` (a ``TypeError`` too, as PEFT raises)."""


class _StepHook:
    """An optimizer step post-hook that steps an allocator (``owner.update_and_allocate(owner.step_count)``): a
    class of its own, not a closure, so that it copies and pickles with the optimizer."""

    def __init__(self, owner) -> None:
        self.owner = owner

    def __call__(self, optimizer, args, kwargs) -> None:
        step = self.owner.step_count
        self.owner.update_and_allocate(step)
        self.owner.step_count = step + 1


def innermost_optimizer(optimizer):
    """The torch optimizer inside wrappers (Accelerate's ``AcceleratedOptimizer``, the Trainer's): the one whose
    ``step()`` runs only for real steps."""
    while not type(optimizer).__module__.startswith("torch.") and isinstance(
        getattr(optimizer, "optimizer", None), torch.optim.Optimizer
    ):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer: expected a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}"
        )
    return optimizer


_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # owner -> the optimizers it was attached to


def _hooked(owner, optimizer) -> bool:
    """Whether ``optimizer`` still holds a step hook of ``owner`` (its handle may have been removed since)."""
    hooks = getattr(optimizer, "_optimizer_step_post_hooks", {})
    return any(isinstance(h, _StepHook) and h.owner is owner for h in hooks.values())


def is_attached(owner) -> bool:
    """Whether an optimizer holds a step hook of ``owner`` (``attach``) now."""
    return any(_hooked(owner, optimizer) for optimizer in _ATTACHED.get(owner, ()))


def attached_allocators(model: nn.Module) -> list:
    """The allocators attached to an optimizer now that step layers of ``model``."""
    layers = {id(m) for m in model.modules()}
    return [owner for owner in list(_ATTACHED.keys()) if isinstance(owner, RankAllocator) and is_attached(owner)
            and any(id(t.layer) in layers for t in owner.triplets)]  # fmt: skip


def attach_step_hook(owner, optimizer, start_step: int | None) -> RemovableHandle:
    """``owner.update_and_allocate`` once per real step of ``optimizer``, its step counted in ``owner.step_count``.
    A second hook (on this optimizer or another) would step the allocator twice per training step: refused while
    the first is attached."""
    if start_step is not None and (isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0):
        raise ValueError(f"start_step: expected an int >= 0, got {start_step!r}")
    inner = innermost_optimizer(optimizer)
    if is_attached(owner):
        raise RuntimeError(
            "attach: already attached to an optimizer, so a second hook would step the allocator twice per training "
            "step; attach once (the handle attach returned has .remove() to detach)"
        )
    if start_step is not None:
        owner.step_count = start_step
    _ATTACHED.setdefault(owner, weakref.WeakSet()).add(inner)
    return inner.register_step_post_hook(_StepHook(owner))


def _find_triplets(model: nn.Module) -> list[_Triplet]:
    return [_Triplet(name, m.P, m.lam, m.Q, m) for name, m in model.named_modules() if isinstance(m, AdaLoRALinear)]


class RankAllocator:
    """AdaLoRA's rank allocator (PEFT's ``RankAllocator`` + ``AdaLoraModel.update_and_allocate``).

    Call ``update_and_allocate(step)`` after ``optimizer.step()`` and before ``zero_grad()``, ``step``
    0-indexed. Sensitivity EMAs, triplet scores, threshold and mask all stay on the device; only
    ``rank_pattern`` copies to the host.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        target_r: int,
        total_step: int,
        init_r: int | None = None,
        tinit: int = 0,
        tfinal: int = 0,
        deltaT: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
        backend: str | None = None,
        triplets: list[_Triplet] | None = None,
    ) -> None:
        check_backend_name(backend)
        self.triplets = triplets if triplets is not None else _find_triplets(model)
        _refuse_unsupported_sharding(model, self.triplets)
        if not self.triplets:
            raise ValueError("model: no AdaLoRALinear layer found; wrap layers with AdaLoRALinear first")
        ranks = [t.lam.numel() for t in self.triplets]
        if init_r is not None and any(r != init_r for r in ranks):
            raise ValueError(
                f"init_r: expected the layers' rank, got init_r={init_r} but layers have {sorted(set(ranks))}"
            )
        if isinstance(target_r, bool) or not isinstance(target_r, int):
            raise TypeError(f"target_r: expected an int, got {target_r!r}")
        if target_r < 0 or target_r * len(ranks) > sum(ranks):
            raise ValueError(
                f"target_r: expected 0 <= target_r and a final budget target_r × {len(ranks)} layers within the "
                f"{sum(ranks)} ranks the layers have, got {target_r}"
            )
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 < beta < 1.0:
                raise ValueError(f"{name}: expected a float in (0, 1), got {beta!r}")
        self.set_schedule(total_step=total_step, tinit=tinit, tfinal=tfinal, deltaT=deltaT)
        self.target_r = target_r
        self.beta1, self.beta2, self.backend = beta1, beta2, backend
        self.init_bgt = sum(ranks)
        self.target_bgt = target_r * len(self.triplets)
        first = self.triplets[0].P
        for t in self.triplets:
            for label, p in (("P", t.P), ("lam", t.lam), ("Q", t.Q)):
                if p.dtype != first.dtype or p.device != first.device:
                    raise TypeError(
                        f"{t.name}.{label}: expected every adapter parameter on {first.device} in {first.dtype}, "
                        f"got {p.device} {p.dtype}"
                    )
        owner: dict[int, str] = {}  # each adapter tensor once: the kernels update EMAs of layers concurrently
        for t in self.triplets:
            for label, p in (("P", t.P), ("lam", t.lam), ("Q", t.Q)):
                local = getattr(p, "_local_tensor", p)  # an FSDP2 shard: its local storage
                other = owner.setdefault(local.data_ptr(), f"{t.name}.{label}") if local.numel() else None
                if other is not None and other != f"{t.name}.{label}":
                    raise ValueError(
                        f"{t.name}.{label}: shares its storage with {other}; the allocator scores each layer's "
                        "P, λ and Q on their own, so every layer needs adapter tensors of its own"
                    )
        shapes = [(t.P.shape[0], t.lam.numel(), t.Q.shape[1]) for t in self.triplets]
        # FSDP2 (DTensor shards): per-shard EMAs, one all-reduce of the partial triplet terms per step
        self._sharded = sharded.is_sharded(first)
        self._layout = None if self._sharded else FlatLayout(shapes, first.dtype, first.device)
        self.reset_ipt()
        self._keep: Tensor | None = None  # last mask over all triplets (device), PEFT's rank_pattern
        self._final = False
        self.masked_last_step = False  # whether the last update_and_allocate computed a new mask
        self.calls = 0  # update_and_allocate calls so far (the layers warn where training runs without any)
        self.step_count = 0  # the next step an attached optimizer hook passes (attach)
        for t in self.triplets:
            if t.layer is not None:
                watch_allocation(t.layer, self)

    def set_schedule(self, *, total_step: int, tinit: int, tfinal: int, deltaT: int) -> None:
        """Check and set the budget schedule (PEFT reads its config's at every step; its Trainer sets total_step)."""
        for name, value in (("total_step", total_step), ("tinit", tinit), ("tfinal", tfinal)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected an int, got {value!r}")
        if total_step <= 0:
            raise ValueError(f"total_step: expected a positive int, got {total_step}")
        if tinit < 0 or tfinal < 0:
            raise ValueError(f"tinit and tfinal: expected ints >= 0, got tinit={tinit}, tfinal={tfinal}")
        if tinit >= total_step - tfinal:
            raise ValueError(
                f"tinit: expected tinit < total_step - tfinal = {total_step - tfinal} so that there is a budgeting "
                f"phase, got tinit={tinit}"
            )
        if isinstance(deltaT, bool) or not isinstance(deltaT, int) or deltaT < 1:
            raise ValueError(f"deltaT: expected an int >= 1, got {deltaT!r}")
        self.total_step, self.tinit, self.tfinal, self.deltaT = total_step, tinit, tfinal, deltaT

    # ---------------------------------------------------------------------------------------- state

    def reset_ipt(self) -> None:
        """Zero the sensitivity EMAs (PEFT allocates them lazily at zero)."""
        self._scored = False  # whether the EMAs hold scores (an update since the last reset)
        if self._sharded:
            self._ema_ipt, self._ema_unc = sharded.zero_emas(self.triplets), sharded.zero_emas(self.triplets)
            return
        self._ema_ipt = self._layout.zeros()
        self._ema_unc = self._layout.zeros()

    def _follow_layers(self) -> None:
        """Score and mask the adapter tensors our layers hold now: a ``load_state_dict(..., assign=True)`` or
        ``to_empty()`` replaces the parameter objects the allocator was built with. A changed rank (``keep_ranks``)
        is refused, naming the layer: the EMAs, scores and budget count the ranks the allocator was built with."""
        for t in self.triplets:
            params = t.layer._parameters if t.layer is not None else None  # (a dict read: this runs every step)
            if params is None or (params["lam"] is t.lam and params["P"] is t.P and params["Q"] is t.Q):
                continue
            now = [tuple(params[k].shape) for k in ("P", "lam", "Q")]
            if now != [tuple(t.P.shape), tuple(t.lam.shape), tuple(t.Q.shape)]:
                raise ValueError(
                    f"{t.name}: its adapter is now P, lam, Q of shapes {now[0]}, {now[1]}, {now[2]}, not the "
                    f"{tuple(t.P.shape)}, {tuple(t.lam.shape)}, {tuple(t.Q.shape)} this allocator was built for "
                    "(keep_ranks() during training?); keep_ranks belongs after training, or build a new RankAllocator"
                )
            if sharded.is_sharded(params["lam"]) != self._sharded:
                raise ValueError(
                    f"{t.name}: its adapter parameters were {'un' if self._sharded else ''}sharded (FSDP) after this "
                    "allocator was built; build the RankAllocator after wrapping the model"
                )
            t.P, t.lam, t.Q = params["P"], params["lam"], params["Q"]

    def _follow_params(self) -> None:
        """Move the EMAs (and the mask) to the adapters' dtype and device after ``model.to(...)``, ``.half()`` and
        the like: the allocator's state goes where the model went, as PEFT's dicts of tensors would have to."""
        first = self.triplets[0].P
        if self._sharded or (first.dtype == self._layout.dtype and first.device == self._layout.device):
            return
        self._layout = FlatLayout(self._layout.shapes, first.dtype, first.device)
        self._ema_ipt = self._ema_ipt.to(device=first.device, dtype=first.dtype)
        self._ema_unc = self._ema_unc.to(device=first.device, dtype=first.dtype)
        if self._keep is not None:
            self._keep = self._keep.to(first.device)

    def attach(self, optimizer: torch.optim.Optimizer, start_step: int | None = None) -> RemovableHandle:
        """Run ``update_and_allocate`` once per real optimizer step, after ``step()`` and before ``zero_grad()``,
        from an optimizer step post-hook: the step is counted by the hook (from ``start_step``, default the
        allocator's own count: 0, or the one a ``load_state_dict`` restored). A step the optimizer skips (an fp16
        overflow under a ``GradScaler``, which then does not call ``step()``) is not counted. Works under
        Accelerate and the Trainer alike (their wrapped optimizer's inner one gets the hook). Returns the hook's
        handle (``.remove()`` detaches)."""
        return attach_step_hook(self, optimizer, start_step)

    def state_dict(self) -> dict:
        self._follow_layers()
        self._follow_params()
        return {
            "ema_ipt": self._ema_ipt,
            "ema_unc": self._ema_unc,
            "keep": self._keep,
            "final": self._final,
            "scored": self._scored,
            "step_count": self.step_count,
            "names": [t.name for t in self.triplets],
        }

    @torch.no_grad()  # the final pattern's λ zero-fill writes into the parameters in place
    def load_state_dict(self, state: dict) -> None:
        self._follow_layers()
        names = [t.name for t in self.triplets]
        missing = {"ema_ipt", "ema_unc", "keep", "final", "names"} - set(state)
        if missing:
            raise ValueError(f"state: not a RankAllocator state_dict, it lacks {sorted(missing)}")
        if state["names"] != names:
            raise ValueError(f"state: saved for layers {state['names'][:3]}…, this allocator has {names[:3]}…")
        for key, ours in (("ema_ipt", self._ema_ipt), ("ema_unc", self._ema_unc)):  # all checked before any copy
            pairs = list(zip(ours, state[key])) if self._sharded else [(ours, state[key])]
            if self._sharded and len(state[key]) != len(ours):
                raise ValueError(f"state[{key!r}]: {len(state[key])} tensors, this allocator has {len(ours)}")
            for d, v in pairs:
                if not isinstance(v, Tensor) or v.shape != d.shape:
                    raise ValueError(f"state[{key!r}]: expected shape {tuple(d.shape)}, got {getattr(v, 'shape', v)}")
        keep = state["keep"]
        if keep is not None and (not isinstance(keep, Tensor) or keep.shape != (self.init_bgt,)):
            raise ValueError(f"state['keep']: expected None or a bool tensor of {self.init_bgt} triplets")
        self._follow_params()
        with torch.no_grad():
            for dst, src in ((self._ema_ipt, state["ema_ipt"]), (self._ema_unc, state["ema_unc"])):
                for d, v in zip(dst, src) if self._sharded else ((dst, src),):
                    d.copy_(v)
        self._keep = None if state["keep"] is None else state["keep"].to(self.triplets[0].lam.device)
        self._final = False
        self._scored = bool(state.get("scored", True))  # states saved before the flag: their EMAs are scores
        self.step_count = int(state.get("step_count", self.step_count))
        if state["final"]:
            self._freeze_pattern()
            self._mask_lams()

    # ---------------------------------------------------------------------------------------- schedule

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(budget, mask_now)`` at ``step``: warm-up, cubic decrease (int() truncation), final phase."""
        if step <= self.tinit:
            return self.init_bgt, False
        if step > self.total_step - self.tfinal:
            return self.target_bgt, True
        coeff = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (coeff**3) + self.target_bgt)
        return budget, step % self.deltaT == 0

    def _grads(self):
        grads = []
        for t in self.triplets:
            triple = []
            for label, p in (("P", t.P), ("lam", t.lam), ("Q", t.Q)):
                if p.grad is None:
                    raise MissingGradientError(
                        f"RankAllocator.update_and_allocate: {t.name}.{label} has no .grad; call it after "
                        "loss.backward() and optimizer.step(), before optimizer.zero_grad()"
                    )
                triple.append(p.grad)
            grads.append(tuple(triple))
        return grads

    def update_scores(self, grads=None) -> Tensor:
        """Update Ī and Ū from the current parameters and gradients (one fused launch); return the triplet scores.
        ``grads``: the ``(dP, dλ, dQ)`` of every layer where the caller has them (``_grads()``)."""
        grads = self._grads() if grads is None else grads
        if self._sharded:
            scores = sharded.sensitivity_update(self.triplets, grads, self._ema_ipt, self._ema_unc, self.beta1,
                                                self.beta2)  # fmt: skip
            self._scored = True
            return scores
        params = [(t.P, t.lam.view(-1), t.Q) for t in self.triplets]
        grads = [(g[0], g[1].view(-1), g[2]) for g in grads]
        self._follow_params()
        scores = sensitivity_update(
            self._layout, params, grads, self._ema_ipt, self._ema_unc, self.beta1, self.beta2, self.backend
        )
        self._scored = True
        return scores

    def scores(self) -> Tensor:
        """The triplet scores of the EMAs as they stand."""
        if self._sharded:
            return sharded.triplet_scores(self.triplets, self._ema_ipt, self._ema_unc)
        self._follow_params()
        return triplet_scores(self._layout, self._ema_ipt, self._ema_unc)

    def _mask(self, scores: Tensor, budget: int) -> None:
        self._keep = threshold_keep(scores, self.init_bgt - budget)
        self._mask_lams()

    def _mask_lams(self) -> None:
        if self._sharded:
            sharded.mask_lams(self.triplets, self._keep)
        else:
            mask_lams([t.lam for t in self.triplets], self._keep, self.backend)

    def _freeze_pattern(self) -> None:
        """The last mask becomes the final pattern, and our layers take it as their rank_mask: every layer's in one
        op, the flag set after it, so an interrupt (KeyboardInterrupt) leaves the pattern taken everywhere or
        nowhere, and taking it again is harmless."""
        masks, parts = [], []
        for t, part in zip(self.triplets, self._keep.split([t.lam.numel() for t in self.triplets])):
            if t.layer is not None:
                masks.append(t.layer.rank_mask)
                parts.append(part.to(t.layer.rank_mask.device))
        if masks:
            torch._foreach_copy_(masks, parts)
        self._final = True

    def _unfreeze_pattern(self) -> None:
        """Back before the final step (a step that goes back in time): ranks are masked by λ again, as PEFT."""
        for t in self.triplets:
            if t.layer is not None:
                t.layer.rank_mask.fill_(True)
        self._final = False

    @torch.no_grad()
    def update_and_allocate(self, global_step: int) -> int:
        """One step of PEFT's ``update_and_allocate``; returns the budget (triplets kept over all layers).

        Steps are taken by value, as PEFT does: a repeated step (say, once per micro-batch under gradient
        accumulation) updates the EMAs again and masks again where the schedule masks; a skipped step is not
        scored; a step back before ``total_step - tfinal`` after the pattern was frozen scores and masks by
        the schedule again (PEFT overwrites its rank pattern the same way). The final step repeated re-applies
        the frozen pattern (PEFT raises there, its EMAs being reset) rather than rescoring from the reset EMAs,
        which would prune every rank."""
        if isinstance(global_step, bool) or not hasattr(global_step, "__index__") or global_step.__index__() < 0:
            raise ValueError(f"global_step: expected an int >= 0, got {global_step!r}")
        global_step = global_step.__index__()
        self._follow_layers()
        final_step = self.total_step - self.tfinal
        # every refusal before anything changes: a failed call leaves the allocator as it was
        grads = self._grads() if global_step < final_step else None
        if global_step == final_step and not self._final and not self._scored and self._keep is None:
            # zero EMAs would prune every rank; PEFT raises a KeyError there
            raise RuntimeError(
                f"RankAllocator.update_and_allocate: step {global_step} is the final step (total_step - tfinal), "
                "but no sensitivity scores were ever computed and no mask taken: call update_and_allocate at "
                "every optimizer step from step 0, or restore the allocator's state_dict when resuming a run"
            )
        if global_step > final_step and not self._final and self._keep is None:
            raise RuntimeError(
                f"RankAllocator.update_and_allocate: step {global_step} is past total_step - tfinal = "
                f"{final_step}, but no mask was ever computed, so there is no rank pattern to apply"
            )
        self.calls += 1
        self._follow_params()
        if global_step < final_step and self._final:
            self._unfreeze_pattern()
        budget, mask_now = self.budget_schedule(global_step)
        repeated_final = global_step == final_step and self._final
        self.masked_last_step = (global_step == final_step and not repeated_final) or (
            global_step < final_step and mask_now
        )
        if global_step < final_step:
            scores = self.update_scores(grads)
            if mask_now:
                self._mask(scores, budget)
        elif repeated_final:  # the pattern stands (the EMAs were reset after it was taken): taken again
            self._freeze_pattern()
            self._mask_lams()
            if self._scored:  # a final step cut short before its reset
                self.reset_ipt()
        elif global_step == final_step:  # the last scores, without an update of the EMAs (as PEFT)
            if self._scored:
                self._keep = threshold_keep(self.scores(), self.init_bgt - budget)
            # (scores reset since the last mask, e.g. a restored final-phase state: that mask becomes the pattern)
            self._freeze_pattern()
            self._mask_lams()
            self.reset_ipt()
        else:
            if not self._final:
                self._freeze_pattern()  # as PEFT: the last budgeting pattern becomes the final one
            self._mask_lams()  # PEFT zero-fills the pruned λ at every step of the final phase
        return budget

    # ---------------------------------------------------------------------------------------- results

    @property
    def rank_pattern(self) -> dict[str, list[bool]] | None:
        """``{module_name: [kept, ...]}`` of the last mask (``None`` before the first); copies to the host."""
        if self._keep is None:
            return None
        keep = self._keep.tolist()
        pattern, offset = {}, 0
        for t in self.triplets:
            r = t.lam.numel()
            pattern[t.name] = keep[offset : offset + r]
            offset += r
        return pattern
