"""``AdaLoRACallback``: the allocator step in ``transformers.Trainer``, at the one right moment."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..modules.allocator import RankAllocator, attached_allocators, is_attached
from .report import kept_by_module, rank_report

log = logging.getLogger("adalora_kernels")

ALLOCATOR_FILE = "adalora_allocator.pt"


class AdaLoRACallback(TrainerCallback):
    """Calls ``update_and_allocate(step)`` on ``on_optimizer_step``: after ``optimizer.step()`` and before the
    gradients are zeroed (``on_step_end`` is too late: the gradients are gone by then). Steps the Trainer's
    optimizer skipped (an fp16 overflow) are not counted.

    For a PEFT AdaLoRA model (accelerated or not) it calls ``model.base_model.update_and_allocate``; for a
    model with our layers it builds a ``RankAllocator`` with ``allocator_kwargs``. ``total_step`` is the
    Trainer's ``max_steps`` unless given here, for both (PEFT's config is set to it). The logs get
    ``adalora_budget`` and the kept ranks per module type (``adalora_kept/<module>``).

    Resuming: every checkpoint folder gets the allocator's state (``adalora_allocator.pt``: sensitivity EMAs,
    mask, frozen pattern; for PEFT models where ``accelerate_peft`` made the allocator ours), restored when the
    Trainer resumes from it; a PEFT model's checkpoints hold the unpruned adapter (PEFT's save would cut it to the
    rank pattern, which the resumed full-rank layers cannot load), while ``save_pretrained`` outside training
    still writes PEFT's pruned one. A resumed run scores and masks as the uninterrupted one.
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
            if is_attached(peft_base):
                raise RuntimeError(
                    "AdaLoRACallback: the model's allocator is attached to an optimizer (model.base_model.attach), "
                    "and the callback steps it too: that is two allocator steps per training step; use one of them"
                )
            self._set_peft_total_step(peft_base, state)
            allocator = getattr(peft_base, "rankallocator", None)
            if state.global_step > 0 and hasattr(allocator, "load_state_dict"):
                self._restore(allocator, args, state)
            return
        if self.allocator is None:
            if attached_allocators(model):
                raise RuntimeError(
                    "AdaLoRACallback: a RankAllocator of this model is attached to an optimizer (allocator.attach), "
                    "and the callback builds and steps one too: that is two allocator steps per training step; use "
                    "one of them"
                )
            kw = dict(self.allocator_kwargs)
            kw.setdefault("total_step", state.max_steps)
            if "target_r" not in kw:
                raise ValueError("AdaLoRACallback: target_r is required for a model with AdaLoRALinear layers")
            self.allocator = RankAllocator(model, **kw)
        if state.global_step > 0:  # resumed from a checkpoint
            self._restore(self.allocator, args, state)

    def _restore(self, allocator, args, state) -> None:
        path = self._checkpoint(args, state) / ALLOCATOR_FILE
        if path.exists():
            allocator.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            warnings.warn(
                f"AdaLoRACallback: resumed at step {state.global_step} without the allocator's state ({path} not "
                "found): the sensitivity scores start from zero, unlike the uninterrupted run",
                stacklevel=3,
            )

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(optimizer, "step_was_skipped", False):  # an fp16 overflow: the Trainer's optimizer did not step
            return
        peft_base = self._peft_base(model)
        if peft_base is not None:
            budget = peft_base.update_and_allocate(state.global_step)
            self.budget = (
                budget if isinstance(budget, int) else peft_base.rankallocator.budget_schedule(state.global_step)[0]
            )
        else:
            self.budget = self.allocator.update_and_allocate(state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        """A checkpoint is about to be written (the Trainer decided it before this call): for a PEFT model, PEFT's
        save would cut the adapter to the recorded rank pattern, which the resumed run's full-rank layers cannot
        load. The pattern is set aside for that save and put back in ``on_save``, so the checkpoint holds the
        unpruned adapter (the pruned ranks' λ are zero) and the allocator's state beside it."""
        peft_base = self._peft_base(model)
        if control.should_save and peft_base is not None:
            config = peft_base.peft_config[peft_base.trainable_adapter_name]
            self._stashed_pattern = (config, config.rank_pattern)
            config.rank_pattern = None

    def on_save(self, args, state, control, model=None, **kwargs):
        stashed = getattr(self, "_stashed_pattern", None)
        if stashed is not None:
            stashed[0].rank_pattern = stashed[1]
            self._stashed_pattern = None
        if not args.should_save:
            return
        allocator = self.allocator
        if allocator is None:  # a PEFT model: its allocator, where it is ours (accelerate_peft)
            peft_base = self._peft_base(model)
            allocator = getattr(peft_base, "rankallocator", None)
            if not hasattr(allocator, "state_dict"):
                return
        folder = self._checkpoint(args, state)
        if folder.is_dir():
            torch.save(allocator.state_dict(), folder / ALLOCATOR_FILE)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if self.budget is None:
            return
        values = {"adalora_budget": self.budget}
        if model is not None:
            kept = kept_by_module(rank_report(model))
            values |= {f"adalora_kept/{module}": n for module, n in kept.items()}
        if logs is not None:  # seen by the callbacks after this one (printers, trackers)
            logs.update(values)
        if state.log_history:  # the Trainer stored a copy of logs before calling us
            state.log_history[-1].update(values)
