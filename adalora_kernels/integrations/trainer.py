"""``AdaLoRACallback``: the allocator step in ``transformers.Trainer``, at the one right moment."""

from __future__ import annotations

from transformers import TrainerCallback

from ..modules.allocator import RankAllocator


class AdaLoRACallback(TrainerCallback):
    """Calls ``update_and_allocate(step)`` on ``on_optimizer_step``: after ``optimizer.step()`` and before the
    gradients are zeroed (``on_step_end`` is too late: the gradients are gone by then).

    For a PEFT AdaLoRA model (accelerated or not) it calls ``model.base_model.update_and_allocate``; for a
    model with our layers it builds a ``RankAllocator`` with ``allocator_kwargs``, taking ``total_step`` from
    the Trainer's ``max_steps`` when not given. The budget goes into the Trainer's logs as ``adalora_budget``.
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

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._peft_base(model) is None and self.allocator is None:
            kw = dict(self.allocator_kwargs)
            kw.setdefault("total_step", state.max_steps)
            if "target_r" not in kw:
                raise ValueError("AdaLoRACallback: target_r is required for a model with AdaLoRALinear layers")
            self.allocator = RankAllocator(model, **kw)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        peft_base = self._peft_base(model)
        if peft_base is not None:
            budget = peft_base.update_and_allocate(state.global_step)
            self.budget = (
                budget if isinstance(budget, int) else peft_base.rankallocator.budget_schedule(state.global_step)[0]
            )
        else:
            self.budget = self.allocator.update_and_allocate(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.budget is None:
            return
        if logs is not None:  # seen by the callbacks after this one (printers, trackers)
            logs["adalora_budget"] = self.budget
        if state.log_history:  # the Trainer stored a copy of logs before calling us
            state.log_history[-1]["adalora_budget"] = self.budget
