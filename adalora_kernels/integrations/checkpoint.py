"""Checkpoints of the adapters: our own format, and PEFT's adapter format (export and import).

Ours: ``adalora.safetensors`` (P, lam, Q, rank_mask per layer) + ``adalora_config.json`` (per-layer init_r,
lora_alpha, lora_dropout, the rank pattern). ``resize=True`` keeps only the unpruned ranks, for inference.
PEFT's: ``adapter_model.safetensors`` + ``adapter_config.json``, which plain ``PeftModel.from_pretrained``
loads offline (pruned ranks dropped and ``rank_pattern`` recorded, as PEFT's own ``save_pretrained`` does).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..modules import AdaLoRALinear
from ..modules.linear import is_conv1d
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


@contextlib.contextmanager
def _staged(folder: Path, last: str) -> Iterator[Path]:
    """A temporary folder beside ``folder`` to write the files of a checkpoint into; on success each is moved
    into ``folder`` (``os.replace``; ``last``, the config, after the others), on any failure nothing in
    ``folder`` changes and the temporary folder is removed."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"path: {folder} exists and is not a folder")
    created = [p for p in (folder.parent, *folder.parent.parents) if not p.exists()]  # made here, removed on failure
    folder.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        yield stage
        folder.mkdir(exist_ok=True)
        for name in sorted(os.listdir(stage), key=lambda n: n == last):
            os.replace(stage / name, folder / name)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for path in created:  # innermost first
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_adalora(model: nn.Module, path: str | Path, *, resize: bool = False) -> Path:
    """Write the adapters of ``model`` to the folder ``path``; ``resize`` drops pruned ranks. The files are
    written to a temporary folder first and moved into place at the end, so a failed save leaves an earlier
    checkpoint there as it was; the config records the weights' digest, so a mismatched pair is refused."""
    from safetensors.torch import save_file

    folder = Path(path)
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
    with _staged(folder, last=CONFIG_NAME) as stage:
        save_file({k: v.detach().cpu() for k, v in tensors.items()}, stage / WEIGHTS_NAME)
        config["weights_sha256"] = _digest(stage / WEIGHTS_NAME)
        (stage / CONFIG_NAME).write_text(json.dumps(config, indent=1))
    return folder


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"path: {path.parent} has no {path.name} ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"path: {path} is not valid JSON ({exc}); the checkpoint is damaged") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"path: {path.parent} has no {path.name}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ValueError(
            f"path: {path} is not a readable safetensors file ({exc}); the checkpoint is damaged"
        ) from None


def _dims(module: nn.Module, name: str) -> tuple[int, int]:
    """(out, in) of a layer that is, or can take, an adapter."""
    if isinstance(module, AdaLoRALinear):
        return module.out_features, module.in_features
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if is_conv1d(module):
        return module.weight.shape[1], module.weight.shape[0]
    raise TypeError(f"{name}: is a {type(module).__name__}; only nn.Linear and transformers' Conv1D take an adapter")


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{name}: the checkpoint has this layer, the model has no module of that name") from None


def _expect(name: str, label: str, tensor: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if tensor is None:
        raise ValueError(f"{name}.{label}: missing from the checkpoint's weights")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name}.{label}: the checkpoint's shape {tuple(tensor.shape)} does not fit the layer {shape}")
    if label != "rank_mask" and not tensor.is_floating_point():
        raise TypeError(f"{name}.{label}: expected floating point, the checkpoint has {tensor.dtype}")


def load_adalora(model: nn.Module, path: str | Path, *, backend: str | None = None) -> list[str]:
    """Load adapters written by ``save_adalora`` into ``model``: layers that are still plain ``nn.Linear``/
    ``Conv1D`` get injected first; resized checkpoints resize the layers. Returns the layer names.

    All or nothing: every layer and tensor is checked against the model before the first one changes; an error
    names the layer and tensor that does not fit, and leaves the model as it was."""
    folder = Path(path)
    config = _read_json(folder / CONFIG_NAME, "an adalora_kernels checkpoint")
    if config.get("format") != "adalora_kernels" or not isinstance(config.get("layers"), dict):
        raise ValueError(f"path: {folder / CONFIG_NAME} is not an adalora_kernels checkpoint config")
    digest = config.get("weights_sha256")
    if digest is not None and (folder / WEIGHTS_NAME).exists() and _digest(folder / WEIGHTS_NAME) != digest:
        raise ValueError(
            f"path: {folder / WEIGHTS_NAME} is not the file its config was saved with (an interrupted save?)"
        )
    tensors = _read_tensors(folder / WEIGHTS_NAME)
    plan = []
    for name, spec in config["layers"].items():
        module = _submodule(model, name)
        out_f, in_f = _dims(module, name)
        pattern = spec.get("rank_pattern")
        if not isinstance(pattern, list) or len(pattern) != spec.get("init_r"):
            raise ValueError(
                f"{name}: the checkpoint's rank_pattern does not have init_r = {spec.get('init_r')} entries"
            )
        if isinstance(module, AdaLoRALinear) and (module.init_r, module.lora_alpha) != (
            spec["init_r"],
            spec["lora_alpha"],
        ):
            raise ValueError(
                f"{name}: the checkpoint has init_r={spec['init_r']}, lora_alpha={spec['lora_alpha']}, the model's "
                f"layer init_r={module.init_r}, lora_alpha={module.lora_alpha}"
            )
        r = sum(map(bool, pattern)) if config.get("resized") else spec["init_r"]
        current_r = module.r if isinstance(module, AdaLoRALinear) else spec["init_r"]
        if current_r not in (r, spec["init_r"]):
            raise ValueError(f"{name}: the layer has {current_r} ranks left, the checkpoint {r} of {spec['init_r']}")
        for label, shape in (("P", (out_f, r)), ("lam", (r,)), ("Q", (r, in_f)), ("rank_mask", (r,))):
            _expect(name, label, tensors.get(f"{name}.{label}"), shape)
        plan.append((name, spec, r, current_r))
    for name, spec, r, current_r in plan:  # nothing below can fail on a checked plan
        if not isinstance(model.get_submodule(name), AdaLoRALinear):
            inject_adalora(model, [name], init_r=spec["init_r"], lora_alpha=spec["lora_alpha"],
                           lora_dropout=spec["lora_dropout"], backend=backend)  # fmt: skip
        module = model.get_submodule(name)
        if current_r != r:
            module.keep_ranks(torch.tensor(spec["rank_pattern"], dtype=torch.bool))
        _copy(module, tensors[f"{name}.P"], tensors[f"{name}.lam"], tensors[f"{name}.Q"], tensors[f"{name}.rank_mask"])
    return list(config["layers"])


@torch.no_grad()
def _copy(module: AdaLoRALinear, P, lam, Q, rank_mask=None) -> None:
    for dst, src in ((module.P, P), (module.lam, lam), (module.Q, Q)):
        dst.copy_(src)
    if rank_mask is not None:
        module.rank_mask.copy_(rank_mask)


def export_peft(model: nn.Module, path: str | Path, *, base_model_name_or_path: str | None = None,
                task_type: str | None = None) -> Path:  # fmt: skip
    """Write a PEFT AdaLoRA adapter folder that plain ``PeftModel.from_pretrained(base, path)`` loads offline
    (written to a temporary folder first, moved into place at the end)."""
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
    with _staged(folder, last=PEFT_CONFIG_NAME) as stage:
        cfg.save_pretrained(str(stage))
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, stage / PEFT_WEIGHTS_NAME,
                  metadata={"format": "pt"})  # fmt: skip
    return folder


def import_peft(model: nn.Module, path: str | Path, *, backend: str | None = None) -> list[str]:
    """Inject AdaLoRA layers into a plain ``model`` from a PEFT AdaLoRA adapter folder (offline); returns the
    layer names. Pruned ranks stay dropped, with PEFT's scale (init_r). Trained biases (``bias="lora_only"`` or
    ``"all"``) and ``modules_to_save`` (a classifier head, say) are copied into the model's own modules.

    All or nothing: every tensor is checked against the model before the first layer changes; an error names
    the layer and tensor that does not fit, and leaves the model as it was."""
    folder = Path(path)
    cfg = _read_json(folder / PEFT_CONFIG_NAME, "a PEFT adapter")
    if cfg.get("peft_type") != "ADALORA":
        raise ValueError(f"path: {folder} holds a {cfg.get('peft_type')} adapter, expected ADALORA")
    tensors = _read_tensors(folder / PEFT_WEIGHTS_NAME)
    strange = [k for k in tensors if not k.startswith(_PREFIX)]
    if strange:
        raise ValueError(f"{strange[0]}: a tensor outside {_PREFIX}…; not a PEFT adapter file of a PeftModel")
    keys = {k[len(_PREFIX) :]: v for k, v in tensors.items()}
    names = sorted(k[: -len(".lora_A")] for k in keys if k.endswith(".lora_A"))
    pattern = cfg.get("rank_pattern") or {}
    init_r = cfg["init_r"]
    plan = []
    for name in names:
        module = _submodule(model, name)
        if isinstance(module, AdaLoRALinear):
            raise ValueError(f"{name}: is already an AdaLoRALinear; import_peft takes a plain model")
        out_f, in_f = _dims(module, name)
        kept = pattern.get(f"{name}.lora_E")
        if kept is not None and len(kept) != init_r:
            raise ValueError(f"{name}.lora_E: the config's rank_pattern has {len(kept)} entries, init_r is {init_r}")
        r = sum(map(bool, kept)) if kept is not None else init_r
        for label, shape in (("lora_A", (r, in_f)), ("lora_B", (out_f, r)), ("lora_E", (r, 1))):
            _expect(name, label, keys.get(f"{name}.{label}"), shape)
        plan.append((name, kept))
    # the rest: biases of any module (bias="lora_only"/"all") and modules_to_save copies, into the model's own
    # (PEFT's forward uses a modules_to_save copy over the module itself; the original_module is unused)
    extra = {}
    for key, value in sorted(keys.items(), key=lambda kv: ".modules_to_save." in kv[0]):
        if key.rsplit(".", 1)[0] in names and key.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_E"):
            continue
        if ".original_module." in key:
            continue
        target = key.replace(".modules_to_save.", ".").replace(".base_layer.", ".")  # PEFT's wrappers
        owner, _, attr = target.rpartition(".")
        module = _submodule(model, owner) if owner else model
        current = getattr(module, attr, None)
        if not isinstance(current, torch.Tensor) or current.shape != value.shape:
            have = "none" if not isinstance(current, torch.Tensor) else tuple(current.shape)
            raise ValueError(f"{key}: the adapter's tensor {tuple(value.shape)} fits no tensor of the model ({have})")
        extra[target] = (current, value)
    inject_adalora(model, names, init_r=init_r, lora_alpha=cfg["lora_alpha"],
                   lora_dropout=cfg["lora_dropout"], backend=backend)  # fmt: skip
    for name, kept in plan:
        module = model.get_submodule(name)
        if kept is not None:
            module.keep_ranks(torch.tensor(kept, dtype=torch.bool))
        _copy(module, keys[f"{name}.lora_B"], keys[f"{name}.lora_E"].view(-1), keys[f"{name}.lora_A"])
    with torch.no_grad():
        for current, value in extra.values():
            current.copy_(value)
    return names
