"""Checkpoints of the adapters: our own format, and PEFT's adapter format (export and import).

Ours: ``adalora.safetensors`` (P, lam, Q, rank_mask per layer) + ``adalora_config.json`` (per-layer init_r,
lora_alpha, lora_dropout, the rank pattern). ``resize=True`` keeps only the unpruned ranks, for inference.
PEFT's: ``adapter_model.safetensors`` + ``adapter_config.json``, which plain ``PeftModel.from_pretrained``
loads offline (pruned ranks dropped and ``rank_pattern`` recorded, as PEFT's own ``save_pretrained`` does).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..modules import AdaLoRALinear
from .inject import inject_adalora

CONFIG_NAME, WEIGHTS_NAME = "adalora_config.json", "adalora.safetensors"
PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _layers(model: nn.Module) -> dict[str, AdaLoRALinear]:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, AdaLoRALinear)}
    if not layers:
        raise ValueError("model: no AdaLoRALinear layer found (use inject_adalora first)")
    return layers


def _uniform(layers: dict[str, AdaLoRALinear], attr: str):
    values = {getattr(m, attr) for m in layers.values()}
    if len(values) != 1:
        raise ValueError(f"export_peft: PEFT's config holds one {attr}, but the layers have {sorted(values)}")
    return values.pop()


def save_adalora(model: nn.Module, path: str | Path, *, resize: bool = False) -> Path:
    """Write the adapters of ``model`` to the folder ``path``; ``resize`` drops pruned ranks."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, config = {}, {"format": "adalora_kernels", "version": 1, "resized": resize, "layers": {}}
    for name, m in _layers(model).items():
        keep = m.rank_mask if resize else torch.ones_like(m.rank_mask)
        tensors[f"{name}.P"] = m.P[:, keep].contiguous()
        tensors[f"{name}.lam"] = m.lam[keep].contiguous()
        tensors[f"{name}.Q"] = m.Q[keep].contiguous()
        tensors[f"{name}.rank_mask"] = m.rank_mask[keep].contiguous()
        config["layers"][name] = {
            "init_r": m.init_r, "lora_alpha": m.lora_alpha, "lora_dropout": m.lora_dropout,
            "rank_pattern": m.rank_mask.tolist(),
        }  # fmt: skip
    save_file({k: v.detach().cpu() for k, v in tensors.items()}, folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=1))
    return folder


def load_adalora(model: nn.Module, path: str | Path, *, backend: str | None = None) -> list[str]:
    """Load adapters written by ``save_adalora`` into ``model``: layers that are still plain ``nn.Linear``/
    ``Conv1D`` get injected first; resized checkpoints resize the layers. Returns the layer names."""
    from safetensors.torch import load_file

    folder = Path(path)
    config = json.loads((folder / CONFIG_NAME).read_text())
    tensors = load_file(folder / WEIGHTS_NAME)
    missing = [n for n in config["layers"] if not isinstance(model.get_submodule(n), AdaLoRALinear)]
    for name in missing:
        spec = config["layers"][name]
        inject_adalora(model, [name], init_r=spec["init_r"], lora_alpha=spec["lora_alpha"],
                       lora_dropout=spec["lora_dropout"], backend=backend)  # fmt: skip
    for name, spec in config["layers"].items():
        module = model.get_submodule(name)
        if module.init_r != spec["init_r"] or module.lora_alpha != spec["lora_alpha"]:
            raise ValueError(
                f"{name}: the checkpoint has init_r={spec['init_r']}, lora_alpha={spec['lora_alpha']}, the model's "
                f"layer init_r={module.init_r}, lora_alpha={module.lora_alpha}"
            )
        if config["resized"] and module.r != tensors[f"{name}.lam"].numel():
            module.keep_ranks(torch.tensor(spec["rank_pattern"]))
        _copy(module, tensors[f"{name}.P"], tensors[f"{name}.lam"], tensors[f"{name}.Q"], tensors[f"{name}.rank_mask"])
    return list(config["layers"])


@torch.no_grad()
def _copy(module: AdaLoRALinear, P, lam, Q, rank_mask=None) -> None:
    for dst, src, label in ((module.P, P, "P"), (module.lam, lam, "lam"), (module.Q, Q, "Q")):
        if dst.shape != src.shape:
            raise ValueError(
                f"{label}: the checkpoint's shape {tuple(src.shape)} differs from the layer's {tuple(dst.shape)}"
            )
        dst.copy_(src)
    if rank_mask is not None:
        module.rank_mask.copy_(rank_mask)


def export_peft(model: nn.Module, path: str | Path, *, base_model_name_or_path: str | None = None,
                task_type: str | None = None) -> Path:  # fmt: skip
    """Write a PEFT AdaLoRA adapter folder that plain ``PeftModel.from_pretrained(base, path)`` loads offline."""
    import peft
    from safetensors.torch import save_file

    layers = _layers(model)
    init_r = _uniform(layers, "init_r")
    pattern, tensors = {}, {}
    for name, m in layers.items():
        keep = m.rank_mask
        pattern[f"{name}.lora_E"] = keep.tolist()
        tensors[f"{_PREFIX}{name}.lora_A"] = m.Q[keep]
        tensors[f"{_PREFIX}{name}.lora_B"] = m.P[:, keep]
        tensors[f"{_PREFIX}{name}.lora_E"] = m.lam[keep].view(-1, 1)
    cfg = peft.AdaLoraConfig(
        init_r=init_r, target_r=min(sum(v) for v in pattern.values()) or 1, lora_alpha=_uniform(layers, "lora_alpha"),
        lora_dropout=_uniform(layers, "lora_dropout"), target_modules=sorted(layers), total_step=1,
        fan_in_fan_out=_uniform(layers, "fan_in_fan_out"), rank_pattern=pattern,
        base_model_name_or_path=base_model_name_or_path, task_type=task_type,
    )  # fmt: skip
    folder = Path(path)
    cfg.save_pretrained(str(folder))
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, folder / PEFT_WEIGHTS_NAME,
              metadata={"format": "pt"})  # fmt: skip
    return folder


def import_peft(model: nn.Module, path: str | Path, *, backend: str | None = None) -> list[str]:
    """Inject AdaLoRA layers into a plain ``model`` from a PEFT AdaLoRA adapter folder (offline); returns the
    layer names. Pruned ranks stay dropped, with PEFT's scale (init_r)."""
    from safetensors.torch import load_file

    folder = Path(path)
    cfg = json.loads((folder / PEFT_CONFIG_NAME).read_text())
    if cfg.get("peft_type") != "ADALORA":
        raise ValueError(f"path: {folder} holds a {cfg.get('peft_type')} adapter, expected ADALORA")
    tensors = load_file(folder / PEFT_WEIGHTS_NAME)
    names = sorted({k[len(_PREFIX) :].rsplit(".", 1)[0] for k in tensors if k.startswith(_PREFIX)})
    pattern = cfg.get("rank_pattern") or {}
    inject_adalora(model, names, init_r=cfg["init_r"], lora_alpha=cfg["lora_alpha"],
                   lora_dropout=cfg["lora_dropout"], backend=backend)  # fmt: skip
    for name in names:
        module = model.get_submodule(name)
        kept = pattern.get(f"{name}.lora_E")
        if kept is not None:
            module.keep_ranks(torch.tensor(kept, dtype=torch.bool))
        _copy(module, tensors[f"{_PREFIX}{name}.lora_B"], tensors[f"{_PREFIX}{name}.lora_E"].view(-1),
              tensors[f"{_PREFIX}{name}.lora_A"])  # fmt: skip
    return names
