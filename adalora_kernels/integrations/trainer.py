"""``AdaLoRACallback``: the allocator step in ``transformers.Trainer``, at the one right moment."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..modules.allocator import RankAllocator

log = logging.getLogger("adalora_kernels")

ALLOCATOR_FILE = "adalora_allocator.pt"


class AdaLoRACallback(TrainerCallback):
    """Calls ``update_and_allocate(step)`` on ``on_optimizer_step``: after ``optimizer.step()`` and before the
    gradients are zeroed (``on_step_end`` is too late: the gradients are gone by then).

    For a PEFT AdaLoRA model (accelerated or not) it calls ``model.base_model.update_and_allocate``; for a
    model with our layers it builds a ``RankAllocator`` with ``allocator_kwargs``. ``total_step`` is the
    Trainer's ``max_steps`` unless given here, for both (PEFT's config is set to it). The budget goes into the
    Trainer's logs as ``adalora_budget``. With our layers the allocator's state (sensitivity EMAs, mask, frozen
    pattern) is saved in every checkpoint folder (``adalora_allocator.pt``) and restored when the Trainer
    resumes from one, so a resumed run scores and masks as the uninterrupted one.
    """

    def __init__(self, **allocator_kwargs) -> None:
        self.allocator_kwargs = allocator_kwargs
        self.allocator: RankAllocator | None = None
        self.budget: int | None = None

    @staticmethod
    def _peft_base(model):
        base = getattr(model, "base_model", None)
        return (
            base if base is not None and hasattr(base, "update_and_allocate") and hasattr(base, "peft_config") else None
        )

    @staticmethod
    def _checkpoint(args, state) -> Path:
        return Path(args.output_dir) / f"checkpoint-{state.global_step}"

    def _set_peft_total_step(self, peft_base, state) -> None:
        total = self.allocator_kwargs.get("total_step", state.max_steps)
        adapter = getattr(peft_base, "trainable_adapter_name", None)
        if adapter is None or not total or total <= 0:
            return
        config = peft_base.peft_config[adapter]
        if config.total_step == total:
            return
        if config.tinit >= total - config.tfinal:
            raise ValueError(
                f"AdaLoRACallback: total_step = {total} (the Trainer's max_steps) leaves no budgeting phase with "
                f"tinit={config.tinit}, tfinal={config.tfinal}; lower them or pass total_step="
            )
        log.info("AdaLoRACallback: PEFT's total_step %s -> %s (the Trainer's max_steps)", config.total_step, total)
        allocator = getattr(peft_base, "rankallocator", None)
        if allocator is not None and hasattr(allocator, "set_total_step"):
            allocator.set_total_step(total)  # PEFT's: it writes the config's
        config.total_step = total

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        peft_base = self._peft_base(model)
        if peft_base is not None:
            self._set_peft_total_step(peft_base, state)
            return
        if self.allocator is None:
            kw = dict(self.allocator_kwargs)
            kw.setdefault("total_step", state.max_steps)
            if "target_r" not in kw:
                raise ValueError("AdaLoRACallback: target_r is required for a model with AdaLoRALinear layers")
            self.allocator = RankAllocator(model, **kw)
        if state.global_step > 0:  # resumed from a checkpoint
            path = self._checkpoint(args, state) / ALLOCATOR_FILE
            if path.exists():
                self.allocator.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            else:
                warnings.warn(
                    f"AdaLoRACallback: resumed at step {state.global_step} without the allocator's state ({path} "
                    "not found): the sensitivity scores start from zero, unlike the uninterrupted run",
                    stacklevel=2,
                )

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        peft_base = self._peft_base(model)
        if peft_base is not None:
            budget = peft_base.update_and_allocate(state.global_step)
            self.budget = (
                budget if isinstance(budget, int) else peft_base.rankallocator.budget_schedule(state.global_step)[0]
            )
        else:
            self.budget = self.allocator.update_and_allocate(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if self.allocator is None or not args.should_save:
            return
        folder = self._checkpoint(args, state)
        if folder.is_dir():
            torch.save(self.allocator.state_dict(), folder / ALLOCATOR_FILE)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.budget is None:
            return
        if logs is not None:  # seen by the callbacks after this one (printers, trackers)
            logs["adalora_budget"] = self.budget
        if state.log_history:  # the Trainer stored a copy of logs before calling us
            state.log_history[-1]["adalora_budget"] = self.budget
