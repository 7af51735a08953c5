"""The one setup factory of the benchmarks: the variants of a case (the frozen ``nn.Linear``, PEFT's ``SVDLinear``
eager and compiled, our backends) around one shared base layer, on the same inputs; and the LLaMA-like adapter
sets and block of the allocator and memory measurements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..kernels import backend_names, get_backend, unavailable_reason
from ..modules import AdaLoRALinear, RankAllocator
from .environment import check_fits

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
MODES = ("fwd", "bwd", "fwd_bwd")
BASELINES = ("linear", "peft", "peft_compiled")

# (in, out) of the projections of each model; tokens come from --tokens
PRESETS: dict[str, list[tuple[int, int]]] = {
    "cpu-small": [(1024, 1024), (1024, 2816), (2816, 1024)],
    "llama-7b": [(4096, 4096), (4096, 11008), (11008, 4096)],
    "llama3-8b": [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)],
    "llama-70b": [(8192, 8192), (8192, 1024), (8192, 28672), (28672, 8192)],
}
DEFAULT_TOKENS = {"cpu": 2048, "cuda": 8192}


def all_variants() -> list[str]:
    return [*BASELINES, *backend_names()]


def measurable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot be measured on ``device`` (``None`` if it can): it cannot run there, or it
    only runs through the Triton interpreter, whose timings and launches mean nothing."""
    reason = unavailable_reason(backend, device)
    if reason is None and backend.startswith("triton") and device.type != "cuda":
        return "Triton runs on the CPU only through its interpreter: not measured"
    return reason


def measurable_backends(device: torch.device) -> list[str]:
    return [b for b in backend_names() if measurable_reason(b, device) is None]


# --------------------------------------------------------------------------------------------- the factory


@dataclass
class Case:
    """One benchmark case: the variants (a module, or why it is unavailable) and their inputs."""

    tokens: int
    in_f: int
    out_f: int
    r: int
    dtype: torch.dtype
    dropout: float
    device: torch.device
    variants: dict[str, nn.Module | str]
    x: torch.Tensor
    grad: torch.Tensor
    base: str = "linear"

    def row(self, op: str, variant: str, **values) -> dict:
        extra = {"base": self.base} if self.base != "linear" else {}
        return {
            "op": op, "variant": variant, "tokens": self.tokens, "in": self.in_f, "out": self.out_f, "r": self.r,
            "dtype": str(self.dtype).removeprefix("torch."), "dropout": self.dropout, **extra, **values,
        }  # fmt: skip


def peft_svd_linear(linear: nn.Linear, r: int, lora_alpha: float, dropout: float) -> nn.Module:
    """PEFT's ``SVDLinear`` around ``linear`` (shared), adapters initialised as PEFT does."""
    import peft

    holder = nn.Module()
    holder.lin = linear
    cfg = peft.AdaLoraConfig(
        init_r=r, target_r=r, lora_alpha=lora_alpha, lora_dropout=dropout, target_modules=["lin"], total_step=10
    )
    return peft.get_peft_model(holder, cfg).base_model.model.lin


BASES = ("linear", "nf4", "int8")


def quantized_base(linear: nn.Linear, kind: str) -> nn.Module:
    """bitsandbytes' ``Linear4bit`` (nf4) or ``Linear8bitLt`` (int8) holding ``linear``'s weights, frozen, on its
    device (quantised there)."""
    import bitsandbytes as bnb

    w, b = linear.weight.detach(), linear.bias
    if kind == "nf4":
        q = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=b is not None, quant_type="nf4", compute_dtype=w.dtype)
        q.weight = bnb.nn.Params4bit(w.float().cpu(), requires_grad=False, quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=b is not None, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(w.float().cpu(), requires_grad=False, has_fp16_weights=False)
    if b is not None:
        q.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
    return q.to(linear.weight.device).requires_grad_(False)


def _quantized_variants(base: nn.Module, kind: str, wanted, r, lora_alpha, dropout, device) -> dict:
    """Over a quantised base: the frozen layer, PEFT's ``SVDLinear4bit`` / ``SVDLinear8bitLt``, and each of our
    backends with adapter kernels as PEFT's layer after ``accelerate_peft`` (the base runs its own forward)."""
    import peft

    from ..integrations import accelerate_peft

    def peft_model():
        holder = nn.Module()
        holder.lin = base
        setattr(holder, "is_loaded_in_4bit" if kind == "nf4" else "is_loaded_in_8bit", True)
        cfg = peft.AdaLoraConfig(init_r=r, target_r=r, lora_alpha=lora_alpha, lora_dropout=dropout,
                                 target_modules=["lin"], total_step=10)  # fmt: skip
        return peft.get_peft_model(holder, cfg)

    theirs = peft_model()
    with torch.no_grad():
        theirs.base_model.model.lin.lora_E["default"].normal_()
    built: dict[str, nn.Module | str] = {}
    for name in wanted:
        if name == "linear":
            built[name] = base
        elif name == "peft":
            built[name] = theirs.base_model.model.lin
        elif name == "peft_compiled":
            built[name] = "not measured over a quantised base"
        else:
            reason = measurable_reason(name, device)
            kernels = None if reason else get_backend(name, device)
            if kernels is not None and not hasattr(kernels, "adapter_forward"):
                reason = f"{name} has no adapter-only kernels (a quantised base runs its own forward)"
            if reason is not None:
                built[name] = reason
                continue
            ours = peft_model()
            src, dst = theirs.base_model.model.lin, ours.base_model.model.lin
            with torch.no_grad():
                for attr in ("lora_A", "lora_B", "lora_E"):
                    getattr(dst, attr)["default"].copy_(getattr(src, attr)["default"])
            built[name] = accelerate_peft(ours, backend=name).base_model.model.lin
    return built


def _linear_variants(linear: nn.Linear, wanted, r, lora_alpha, dropout, device, dtype) -> dict:
    """Around a frozen ``nn.Linear``: itself, PEFT's ``SVDLinear`` (eager and compiled) and each of our backends."""
    built: dict[str, nn.Module | str] = {}
    peft_layer: nn.Module | str | None = None
    for name in wanted:
        if name == "linear":
            built[name] = linear
        elif name in ("peft", "peft_compiled"):
            if peft_layer is None:
                try:
                    peft_layer = peft_svd_linear(linear, r, lora_alpha, dropout).to(device=device, dtype=dtype)
                    with torch.no_grad():
                        peft_layer.lora_E["default"].normal_()
                except ImportError as exc:
                    peft_layer = f"peft is not installed ({exc})"
            if isinstance(peft_layer, str) or name == "peft":
                built[name] = peft_layer
            else:
                built[name] = torch.compile(peft_layer)
        else:
            reason = measurable_reason(name, device)
            if reason is not None:
                built[name] = reason
                continue
            layer = AdaLoRALinear.from_linear(
                linear, init_r=r, lora_alpha=lora_alpha, lora_dropout=dropout, backend=name
            )
            with torch.no_grad():
                layer.lam.normal_()
            built[name] = layer
    return built


def make_case(
    tokens: int,
    in_f: int,
    out_f: int,
    r: int,
    dtype: torch.dtype,
    dropout: float,
    device: torch.device | str,
    variants: list[str] | None = None,
    lora_alpha: float = 8.0,
    base: str = "linear",
) -> Case:
    """The frozen nn.Linear (shared by every variant), PEFT's layer and ours around it, and inputs; ``base``:
    ``nf4`` or ``int8`` puts a bitsandbytes layer in the frozen layer's place."""
    device = torch.device(device)
    check_fits(tokens, in_f, out_f, r, dtype, device)
    if base not in BASES:
        raise ValueError(f"base: expected one of {BASES}, got {base!r}")
    wanted = variants or all_variants()
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(in_f, out_f, device=device, dtype=dtype).requires_grad_(False)
    if base != "linear":
        built = _quantized_variants(quantized_base(linear, base), base, wanted, r, lora_alpha, dropout, device)
    else:
        built = _linear_variants(linear, wanted, r, lora_alpha, dropout, device, dtype)
    for module in built.values():
        if isinstance(module, nn.Module):
            module.train()
    x = torch.randn(tokens, in_f, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    grad = torch.randn(tokens, out_f, generator=gen).to(device=device, dtype=dtype)
    return Case(tokens, in_f, out_f, r, dtype, dropout, device, built, x, grad, base)


def clear_grads(module: nn.Module, x: torch.Tensor) -> None:
    x.grad = None
    for p in module.parameters():
        p.grad = None


def step_fn(module: nn.Module, case: Case, mode: str) -> tuple[Callable[[], None], Callable[[], None] | None]:
    """``(timed, untimed_setup)`` for one mode: forward, backward (of a fresh forward), or both."""
    if mode == "fwd":
        return (lambda: module(case.x)), None
    if mode == "fwd_bwd":
        return (lambda: module(case.x).backward(case.grad)), None
    holder = {}

    def setup():
        clear_grads(module, case.x)
        holder["y"] = module(case.x)

    return (lambda: holder["y"].backward(case.grad)), setup


class _Block(nn.Module):
    def __init__(self, hidden: int, mlp: int, dtype, device):
        super().__init__()
        kw = {"dtype": dtype, "device": device, "bias": False}
        for name, (i, o) in {
            "q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
            "o_proj": (hidden, hidden), "gate_proj": (hidden, mlp), "up_proj": (hidden, mlp),
            "down_proj": (mlp, hidden),
        }.items():  # fmt: skip
            # the allocator never reads the base weights: allocate them, do not initialise them
            setattr(self, name, nn.utils.skip_init(nn.Linear, i, o, **kw))


MODULE_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def allocator_pair(blocks: int, hidden: int, mlp: int, init_r: int, dtype, device, backends: list[str]):
    """A LLaMA-like adapter set (blocks × q,k,v,o,gate,up,down) under PEFT and under each of our backends,
    with the same weights and gradients, each with its allocator at a masking step."""
    import peft

    torch.manual_seed(0)
    base = nn.Sequential(*[_Block(hidden, mlp, dtype, device) for _ in range(blocks)])
    ours = nn.ModuleList()  # our layers share the base weights with PEFT's
    for blk in base:
        holder = nn.Module()
        for name in MODULE_NAMES:
            setattr(holder, name, AdaLoRALinear.from_linear(getattr(blk, name), init_r=init_r))
        ours.append(holder)
    cfg = peft.AdaLoraConfig(init_r=init_r, target_r=init_r // 2, total_step=1000, tinit=0, tfinal=0, deltaT=1,
                             target_modules=MODULE_NAMES)  # fmt: skip
    pm = peft.get_peft_model(base, cfg)
    for p in pm.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    for blk_i, holder in enumerate(ours):
        for name in MODULE_NAMES:
            svd, layer = getattr(pm.base_model.model[blk_i], name), getattr(holder, name)
            with torch.no_grad():
                for ours_p, peft_p in ((layer.P, svd.lora_B["default"]), (layer.lam, svd.lora_E["default"]),
                                       (layer.Q, svd.lora_A["default"])):  # fmt: skip
                    ours_p.copy_(peft_p.view(ours_p.shape))
                    ours_p.grad = peft_p.grad.view(ours_p.shape).clone()
    allocators = {b: RankAllocator(ours, target_r=init_r // 2, total_step=1000, backend=b) for b in backends}
    return pm, allocators


def llama_block(dtype, device, quick: bool):
    """A one-layer LLaMA model built from a config (no download): attention + MLP, our targets inside."""
    from transformers import LlamaConfig, LlamaModel

    hidden = 256 if quick else 1024
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=1, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=1000, max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaModel(cfg).to(device=device, dtype=dtype)
