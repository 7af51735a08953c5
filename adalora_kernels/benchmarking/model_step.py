"""Whole-model training steps: a LLaMA built from a config (random weights, no download) with q, k, v, o, gate,
up and down adapted, stepped as a user's loop steps it: forward with labels (PEFT adds the orthogonal
regulariser to the loss), backward, AdamW on the adapters, ``update_and_allocate``. Variants, interleaved on the
same inputs:

- ``frozen``: the model with no adapter, base frozen; backward through the activations only (the floor);
- ``peft``: PEFT's AdaLoRA model, eager;
- ``peft_compiled``: the same under ``torch.compile`` (the allocator step stays eager, as PEFT's is);
- ``ours``: PEFT's model after ``accelerate_peft`` (the one-line change; on the CPU its forward rounds as PEFT's);
- ``ours_fused``: the same with ``numerics="fused"`` (the fused forward on the CPU too; the same as ``ours`` on a GPU).

The embeddings are computed once outside the timed step and fed as ``inputs_embeds`` requiring grad, so every
variant, the frozen one too, runs its backward through all decoder layers.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable

import torch
from torch import nn

from .cases import MODULE_NAMES
from .environment import steady_cpu_heap
from .timers import _rotated, _sync, spread

MODEL_VARIANTS = ("frozen", "peft", "peft_compiled", "ours", "ours_fused")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    layers: int = 4
    hidden: int = 4096
    intermediate: int = 11008
    heads: int = 32
    vocab: int = 32000
    tokens: int = 8192  # per step: batch × sequence
    seq: int = 2048

    @classmethod
    def quick(cls) -> ModelShape:
        return cls(layers=2, hidden=128, intermediate=344, heads=4, vocab=512, tokens=256, seq=128)

    def check(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field.name}: expected an int >= 1, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"heads: expected a divisor of hidden = {self.hidden}, got {self.heads}")
        if self.tokens % self.seq:
            raise ValueError(f"tokens: expected a multiple of seq = {self.seq}, got {self.tokens}")


def llama_model(shape: ModelShape, dtype: torch.dtype, device: torch.device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.heads, vocab_size=shape.vocab,
        max_position_embeddings=max(shape.seq, 128), attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).requires_grad_(False)


def _steps(base: nn.Module, variants, init_r: int, dropout: float, total_step: int, inputs) -> dict[str, Callable]:
    """One training-step callable per variant (each returns its loss), on its own model."""
    import peft

    from ..integrations import accelerate_peft

    embeds, labels = inputs
    cfg = peft.AdaLoraConfig(
        init_r=init_r, target_r=max(init_r // 2, 1), lora_alpha=8, lora_dropout=dropout, target_modules=MODULE_NAMES,
        total_step=total_step, tinit=1, tfinal=1, deltaT=1, task_type="CAUSAL_LM",
    )  # fmt: skip
    plain = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "lora_E" in name:
                p.normal_()
    out: dict[str, Callable] = {}
    for name in variants:
        if name == "frozen":
            model = base.train()

            def step(model=model):
                loss = model(inputs_embeds=embeds, labels=labels).loss
                loss.backward()
                embeds.grad = None
                return loss.detach()

        else:
            if name == "peft":
                model = plain
            elif name in ("ours", "ours_fused"):
                numerics = "fused" if name == "ours_fused" else "auto"
                model = accelerate_peft(copy.deepcopy(plain), numerics=numerics)
            else:
                model = copy.deepcopy(plain)
            model.train()
            forward = torch.compile(model) if name == "peft_compiled" else model
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)
            counter = [0]

            def step(model=model, forward=forward, opt=opt, counter=counter):
                loss = forward(inputs_embeds=embeds, labels=labels).loss
                loss.backward()
                opt.step()
                model.base_model.update_and_allocate(counter[0])
                opt.zero_grad(set_to_none=True)
                embeds.grad = None
                counter[0] += 1
                return loss.detach()

        out[name] = step
    return out


def model_step_rows(
    shape: ModelShape,
    dtype: torch.dtype,
    device: torch.device,
    *,
    dropout: float = 0.0,
    variants: list[str] | None = None,
    rounds: int = 10,
    warmup: int = 2,
    init_r: int = 12,
) -> list[dict]:
    """Median ms of one training step per variant, interleaved (rotating order), after ``warmup`` steps each
    (compiles and autotuning happen there); rows with ``slowdown_vs_frozen``, ``speedup_vs_peft``,
    ``speedup_vs_peft_compiled`` and each variant's first loss (``first_loss``: ours against PEFT's is a check)."""
    shape.check()
    wanted = list(variants or MODEL_VARIANTS)
    unknown = [v for v in wanted if v not in MODEL_VARIANTS]
    if unknown:
        raise ValueError(f"variants: expected some of {list(MODEL_VARIANTS)}, got {unknown}")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (shape.tokens // shape.seq, shape.seq), generator=gen).to(device)
    base = llama_model(shape, dtype, device)
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids)
    embeds = embeds.detach().requires_grad_()
    steps = _steps(base, wanted, init_r, dropout, rounds + warmup + 2, (embeds, ids))
    first: dict[str, float] = {}
    samples: dict[str, list[float]] = {name: [] for name in steps}
    if device.type == "cpu":
        steady_cpu_heap()
    for i in range(warmup + rounds):
        for name in _rotated(list(steps), i):
            _sync(device)
            start = time.perf_counter()
            loss = steps[name]()
            _sync(device)
            if i == 0:
                first[name] = float(loss)
            if i >= warmup:
                samples[name].append((time.perf_counter() - start) * 1e3)
    rows = []
    for name, values in samples.items():
        row = {
            "op": "model_step", "variant": name, **dataclasses.asdict(shape), "dtype": str(dtype).replace("torch.", ""),
            "dropout": dropout, "init_r": init_r, "rounds": rounds, "first_loss": first[name],
            **spread(values),
        }  # fmt: skip
        rows.append(row)
    medians = {row["variant"]: row["ms"] for row in rows}
    for row in rows:
        for other, key in (("frozen", "slowdown_vs_frozen"), ("peft", "speedup_vs_peft"),
                           ("peft_compiled", "speedup_vs_peft_compiled")):  # fmt: skip
            if other in medians:
                row[key] = row["ms"] / medians[other] if key.startswith("slowdown") else medians[other] / row["ms"]
    return rows
