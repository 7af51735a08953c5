"""Memory: bytes autograd saves for backward (device independent) and the CUDA peak of a step, per layer, across
rank budgets, and for a whole LLaMA block."""

from __future__ import annotations

import torch
from torch import nn

from ..integrations import inject_adalora
from ..modules import AdaLoRALinear
from .cases import MODULE_NAMES, Case, clear_grads, llama_block, measurable_backends


def saved_bytes(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Bytes autograd keeps for backward of ``module(x)``: ``(all, beyond x)``, parameters and buffers
    excluded, each storage counted once."""
    skip = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    x_storage = x.untyped_storage().data_ptr()
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    del out
    if not x.is_floating_point():  # token ids: nothing of x is saved beyond them
        x_storage = None
    total = sum(seen.values())
    return total, total - seen.get(x_storage, 0)


def resident_bytes(module: nn.Module) -> int:
    """Bytes the module's parameters and buffers hold (a quantised weight as stored, with its quantisation
    state), each storage counted once."""
    seen: dict[int, int] = {}
    tensors = [*module.parameters(), *module.buffers()]
    for t in list(tensors):
        state = getattr(t, "quant_state", None)  # bitsandbytes' 4-bit absmax and code
        if state is not None:
            tensors += [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
        scb = getattr(t, "SCB", None)  # bitsandbytes' int8 row scales
        if isinstance(scb, torch.Tensor):
            tensors.append(scb)
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def peak_bytes(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int:
    """Peak CUDA memory of one forward+backward above what was allocated before it, after a warm-up call (the
    first call of a shape autotunes the Triton kernels, and the autotuner's timing buffers are no step's)."""
    module(x).backward(grad)
    clear_grads(module, x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    module(x).backward(grad)
    torch.cuda.synchronize()
    clear_grads(module, x)
    return torch.cuda.max_memory_allocated() - base


def memory_rows(case: Case, kept_r: int | None = None) -> list[dict]:
    """saved_bytes (and peak_bytes on CUDA) of every runnable variant; ``kept_r``: ranks left by pruning."""
    rows = []
    for name, module in case.variants.items():
        if not isinstance(module, nn.Module) or name == "peft_compiled":
            continue
        if kept_r is not None:
            _prune(module, kept_r)
        total, beyond_x = saved_bytes(module, case.x)
        extra = {"budget_r": kept_r if kept_r is not None else case.r}
        rows.append(case.row("saved_bytes", name, bytes=total, bytes_beyond_x=beyond_x, **extra))
        rows.append(case.row("resident_bytes", name, bytes=resident_bytes(module), **extra))
        if case.device.type == "cuda":
            rows.append(case.row("peak_bytes", name, bytes=peak_bytes(module, case.x, case.grad), **extra))
    return rows


def _prune(module: nn.Module, kept_r: int) -> None:
    with torch.no_grad():
        if isinstance(module, AdaLoRALinear):
            module.rank_mask[kept_r:] = False
            module.lam[kept_r:] = 0
        elif hasattr(module, "lora_E"):
            module.lora_E["default"][kept_r:] = 0


def block_memory_rows(dtype, dropout: float, device, quick: bool, init_r: int = 12) -> list[dict]:
    """Bytes saved for backward by a whole LLaMA block, with PEFT's adapters and with each of our backends."""
    import copy

    import peft

    base = llama_block(dtype, device, quick)
    batch, seq = (2, 128) if quick else (4, 512)
    ids = torch.randint(0, 1000, (batch, seq), device=device)
    variants: dict[str, nn.Module] = {}
    cfg = peft.AdaLoraConfig(init_r=init_r, target_r=init_r, lora_dropout=dropout, target_modules=MODULE_NAMES,
                             total_step=10)  # fmt: skip
    variants["peft"] = peft.get_peft_model(copy.deepcopy(base), cfg)
    for b in measurable_backends(torch.device(device)):
        ours = copy.deepcopy(base).requires_grad_(False)
        inject_adalora(ours, MODULE_NAMES, init_r=init_r, lora_dropout=dropout, backend=b)
        variants[b] = ours
    hidden = base.config.hidden_size
    rows = []
    for name, model in variants.items():
        model.train()
        total, _ = saved_bytes(model, ids)
        rows.append({
            "op": "saved_bytes", "variant": name, "tokens": batch * seq, "in": hidden, "out": hidden, "r": init_r,
            "dtype": str(dtype).removeprefix("torch."), "dropout": dropout, "bytes": total, "scope": "llama_block",
        })  # fmt: skip
    return rows
