"""``export_lora``: a finished AdaLoRA adapter as a plain PEFT LoRA adapter, for the tools that load only LoRA
(vLLM's ``lora_A``/``lora_B`` keys, merge scripts, servers).

AdaLoRA's increment ``s · P diag(λ ⊙ m) Q`` of a layer is a LoRA of that layer's kept rank k: ``lora_A`` = the kept
rows of Q (k × in), ``lora_B`` = the kept columns of P times their λ and AdaLoRA's scale ``s`` (out × k), with LoRA's
own scale ``lora_alpha / r`` made 1 per module (``rank_pattern`` and ``alpha_pattern``). ``uniform_rank=True``
zero-pads every module to the largest kept rank, for servers that need one rank. Modules pruned to rank 0 are left
out. The folder is written as ``export_peft`` writes one (each file replaced whole).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..modules import AdaLoRALinear
from .checkpoint import (
    _PREFIX,
    CONFIG_NAME,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    _commit,
    _read_json,
    _read_tensors,
    _target_folder,
    _weights_file,
)


def _from_model(model: nn.Module) -> tuple[list[tuple], bool]:
    """(name, P, λ ⊙ m, Q, s) of every adapted layer of ``model`` (ours, or PEFT's active AdaLoRA adapter), and
    whether the base weights are stored (in, out) (GPT-2's Conv1D)."""
    layers, fan_in_fan_out = [], False
    base = getattr(model, "base_model", None)
    peft_model = base is not None and hasattr(base, "peft_config") and hasattr(base, "model")
    root = base.model if peft_model else model
    for name, m in root.named_modules():
        if isinstance(m, AdaLoRALinear):
            lam = m.lam * m.rank_mask.to(m.lam.dtype)
            layers.append((name, m.P, lam, m.Q, m.scaling))
            fan_in_fan_out |= m.fan_in_fan_out
        elif peft_model and hasattr(m, "lora_E") and hasattr(m, "ranknum"):
            a = base.active_adapter if isinstance(base.active_adapter, str) else base.active_adapters[0]
            if a not in m.lora_E:
                continue
            scale = m.scaling[a] / (float(m.ranknum[a]) + 1e-5)
            layers.append((name, m.lora_B[a], m.lora_E[a].view(-1), m.lora_A[a], scale))
            fan_in_fan_out |= bool(getattr(m, "fan_in_fan_out", False))
    if not layers:
        raise ValueError("model: no AdaLoRA layer found (AdaLoRALinear layers, or a PEFT AdaLoRA model)")
    return layers, fan_in_fan_out


def _from_folder(folder: Path) -> tuple[list[tuple], bool]:
    """The same from a checkpoint folder: ours (``save_adalora``) or a PEFT AdaLoRA adapter folder."""
    if (folder / CONFIG_NAME).exists():
        config = _read_json(folder / CONFIG_NAME, "an adalora_kernels checkpoint")
        tensors = _read_tensors(_weights_file(folder, config))
        layers = []
        for name, spec in config["layers"].items():
            scale = (spec["lora_alpha"] if spec["lora_alpha"] > 0 else spec["init_r"]) / (spec["init_r"] + 1e-5)
            mask = tensors[f"{name}.rank_mask"].to(tensors[f"{name}.lam"].dtype)
            layers.append((name, tensors[f"{name}.P"], tensors[f"{name}.lam"] * mask, tensors[f"{name}.Q"], scale))
        return layers, False
    cfg = _read_json(folder / PEFT_CONFIG_NAME, "a PEFT adapter")
    if cfg.get("peft_type") != "ADALORA":
        raise ValueError(f"path: {folder} holds a {cfg.get('peft_type')} adapter, expected ADALORA or ours")
    tensors = {k.removeprefix(_PREFIX): v for k, v in _read_tensors(folder / PEFT_WEIGHTS_NAME).items()}
    alpha, init_r = cfg["lora_alpha"], cfg["init_r"]
    scale = (alpha if alpha > 0 else init_r) / (init_r + 1e-5)  # PEFT: scaling / (ranknum = init_r)
    names = sorted(k.removesuffix(".lora_A") for k in tensors if k.endswith(".lora_A"))
    layers = [
        (n, tensors[f"{n}.lora_B"], tensors[f"{n}.lora_E"].view(-1), tensors[f"{n}.lora_A"], scale) for n in names
    ]
    return layers, bool(cfg.get("fan_in_fan_out", False))


@torch.no_grad()
def export_lora(
    source: nn.Module | str | Path,
    path: str | Path,
    *,
    uniform_rank: bool = False,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write the AdaLoRA adapter of ``source`` (a model, or a checkpoint folder: ours or PEFT's AdaLoRA) to the
    folder ``path`` as a PEFT LoRA adapter that plain ``PeftModel.from_pretrained(base, path)`` loads, with the
    AdaLoRA model's outputs (to fp32 rounding). Returns the folder."""
    layers, fan_in_fan_out = _from_model(source) if isinstance(source, nn.Module) else _from_folder(Path(source))
    import peft  # after the source is read: a wrong path fails before peft (and bitsandbytes) load
    from safetensors.torch import save

    kept = {}
    for name, P, lam, Q, scale in layers:
        keep = lam != 0
        if int(keep.sum()):
            kept[name] = (P[:, keep], lam[keep], Q[keep], scale)
    if not kept:
        raise ValueError("source: every rank of every layer is pruned; there is no adapter to export")
    width = max(q.shape[0] for _, _, q, _ in kept.values())
    tensors, ranks = {}, {}
    for name, (P, lam, Q, scale) in kept.items():
        r = width if uniform_rank else Q.shape[0]
        A = torch.zeros(r, Q.shape[1], dtype=Q.dtype)
        B = torch.zeros(P.shape[0], r, dtype=P.dtype)
        A[: Q.shape[0]] = Q.cpu()
        B[:, : Q.shape[0]] = (P.cpu().double() * (lam.cpu().double() * scale)[None, :]).to(P.dtype)
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = B.contiguous()
        ranks[re.escape(name)] = r
    cfg = peft.LoraConfig(
        r=width, lora_alpha=width, target_modules=sorted(kept), rank_pattern=ranks, alpha_pattern=dict(ranks),
        fan_in_fan_out=fan_in_fan_out, base_model_name_or_path=base_model_name_or_path, task_type=task_type,
    )  # fmt: skip
    data = save(tensors, metadata={"format": "pt"})
    with _target_folder(path) as folder:
        scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
        try:
            cfg.save_pretrained(str(scratch))
            text = json.loads((scratch / PEFT_CONFIG_NAME).read_text())
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        _commit(folder, {PEFT_WEIGHTS_NAME: data}, PEFT_CONFIG_NAME, json.dumps(text, indent=2).encode())
    return folder
